"""The recipe `omniglot-32-ebmm`: the kv energy written by its learned delta-rule steps
(gradient steps on E in closed form) and read by projected gradient descent on E (the
kv term and a learned prior energy), not by its decoder."""

from __future__ import annotations

from pathlib import Path

import torch

from ebmm_cli.energy import memory_floats
from ebmm_cli.memory import energy, energy_grad, read, write
from ebmm_cli.model import Model
from ebmm_cli.recipes import RECIPES
from ebmm_cli.runconfig import TrainConfig, train_config
from ebmm_cli.store import load_checkpoint, load_model
from tests.conftest import run_ebmm


def test_the_ebmm_recipe_reads_by_descending_the_energy() -> None:
    """The recipe's model (on 16x16 images here): after a write, the read's first iterate
    is the projected gradient step clip(q − γ1 ∇x E(q; θ)), and its steps lower the
    queries' energy; no refinement, at most 5 write steps, within the paper's 4,616
    floats."""
    options = {**RECIPES["omniglot-32-ebmm"]["train"], "image_size": 16, "batch_size": 4,
               "distortion": "occlude:8"}  # fmt: skip
    config = train_config(**options, steps=1, device="cpu")
    torch.manual_seed(0)
    model = Model(config.model)
    rules = model.rules.config
    assert (rules.read, rules.refine, rules.alpha) == ("gd", 0, 0.0) and rules.write_steps <= 5
    assert model.config.energy.prior  # its R and weight are slow weights, not written
    assert memory_floats(model.energy) <= 4616
    patterns = (torch.rand(4, 1, 16, 16) > 0.7).float()
    queries = model.distortion(patterns, torch.Generator().manual_seed(1))
    memory = write(model.energy, model.rules, patterns)
    iterates = read(model.energy, model.rules, memory, queries)
    gamma = model.rules.read_schedule()[0][0].detach()
    _, g = energy_grad(model.energy, memory, queries, create_graph=False)
    torch.testing.assert_close(iterates[0], (queries - gamma * g).clamp(0, 1))
    with torch.no_grad():
        before = energy(model.energy, memory, queries).mean()
        after = energy(model.energy, memory, iterates[-1]).mean()
    assert after < before


def test_the_ebmm_recipe_trains_through_the_cli(data_root: Path, tmp_path: Path) -> None:
    """`ebmm train --recipe omniglot-32-ebmm` (at N = 4 here) meta-trains through the
    gradient read for a step and records the held-out written, unwritten and query
    Hamming distances; the model it saves reads by descent."""
    run = tmp_path / "run"
    result = run_ebmm("train", "--recipe", "omniglot-32-ebmm", "--batch-size", "4",
                      "--steps", "1", "--eval-every", "1", "--eval-episodes", "1",
                      "--set", "episodes_per_step=1", "--device", "cpu",
                      "--data-root", str(data_root), "--out", str(run))  # fmt: skip
    assert result.returncode == 0, result.stderr
    state = load_checkpoint(run / "checkpoint.safetensors")[2]
    config = TrainConfig.from_json(state["train_config"])
    assert config.model.energy.kind == "kv" and config.model.rules.read == "gd"
    assert load_model(run / "model.safetensors").rules.config.read == "gd"
    metrics = (run / "metrics.jsonl").read_text()
    for field in ("heldout_hamming", "heldout_unwritten_hamming", "heldout_query_hamming"):
        assert f'"{field}"' in metrics
