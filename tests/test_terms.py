"""Auxiliary terms of the meta-loss (`terms.TERMS`: the contrast term), the unwritten
control of held-out evaluation, and runs from before the removed training options."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from ebmm_cli.errors import EbmmError
from ebmm_cli.evaluation import Batch, evaluate_episodes
from ebmm_cli.memory import energy
from ebmm_cli.meta import MetaStep, read_metrics
from ebmm_cli.model import retrieve, write_memory
from ebmm_cli.runconfig import REMOVED_OPTIONS, TrainConfig, train_config
from ebmm_cli.store import load_checkpoint, save_model
from ebmm_cli.terms import TERMS, contrast_loss, weights
from tests.conftest import run_ebmm, tiny_binary

_TINY_TRAIN = ["--dataset", "binary", "--batch-size", "6", "--write-steps", "2",
               "--read-steps", "2", "--dynamic", "8", "--eval-every", "1", "--eval-episodes",
               "2", "--device", "cpu", "--set", "write_lr=1"]  # fmt: skip
"""`ebmm train` options for a tiny binary run that trains in seconds."""


def test_contrast_is_the_softplus_of_the_stored_energy_above_the_read_end() -> None:
    model, _, patterns, queries = tiny_binary(1, write_lr=1.0)
    net, stored = model.energy, patterns[0]
    written = write_memory(model, stored)
    ends = retrieve(model, written, queries[0])[-1]
    with torch.no_grad():
        term = contrast_loss(net, written.params, stored, queries[0], ends)
        margins = energy(net, written.params, stored) - energy(net, written.params, ends)
        torch.testing.assert_close(term, torch.nn.functional.softplus(margins).mean())
        # a read that ends on the stored pattern itself: every margin 0, softplus(0)
        same = contrast_loss(net, written.params, stored, queries[0], stored)
        torch.testing.assert_close(same, torch.tensor(0.6931472))


def test_a_run_uses_the_terms_it_weighs() -> None:
    assert list(TERMS) == ["contrast"]
    assert weights(train_config(dataset="binary", steps=5)) == {}
    assert weights(train_config(dataset="binary", steps=5, contrast=0.1)) == {"contrast": 0.1}
    with pytest.raises(EbmmError, match=r"^--contrast: must be 0 or more, got -1"):
        train_config(dataset="binary", steps=5, contrast=-1.0)


@pytest.mark.parametrize("episodes", [1, 3])
def test_the_contrast_term_trains_the_write_but_not_the_reported_loss(episodes: int) -> None:
    """With the weight > 0 the step's gradient gains the term (one episode, and several
    written together under vmap): the write rates move differently, while the loss the
    step reports is the read's alone, the same as without the term."""
    results = {}
    for weight in (0.0, 5.0):
        model, config, patterns, queries = tiny_binary(3, write_lr=1.0, contrast=weight)
        step = MetaStep(model, config, torch.device("cpu"), world=1)
        batches = [Batch(p, q) for p, q in zip(patterns[:episodes], queries, strict=False)]
        loss = step(batches, torch.Generator())
        results[weight] = (loss, model.rules.write_rate.detach().clone())
    torch.testing.assert_close(results[5.0][0], results[0.0][0])
    assert not torch.equal(results[5.0][1], results[0.0][1])


def test_held_out_metrics_show_what_the_write_stores_and_the_terms_used() -> None:
    """`unwritten_*`: the queries read from θ̄. A write whose rates are nil stores
    nothing and reads exactly as θ̄ does; a write with the binary rates stores. A run's
    term is reported by its name, unweighted."""
    model, _, patterns, queries = tiny_binary(2, write_lr=1.0)
    held = [Batch(p, q) for p, q in zip(patterns, queries, strict=True)]
    stored = evaluate_episodes(model, held, {"contrast": 0.1})
    assert stored["mse"] < stored["unwritten_mse"] - 1e-3
    assert stored["contrast"] > 0
    assert "contrast" not in evaluate_episodes(model, held)
    with torch.no_grad():
        model.rules.write_rate.fill_(-40.0)  # softplus: rates of 4e-18
    nothing = evaluate_episodes(model, held)
    assert nothing["mse"] == pytest.approx(nothing["unwritten_mse"], abs=1e-7)
    assert nothing["unwritten_mse"] == pytest.approx(stored["unwritten_mse"], abs=1e-7)
    assert nothing["hamming"] == nothing["unwritten_hamming"]


def test_a_run_from_before_the_removed_options_resumes_unless_it_used_one() -> None:
    """A checkpoint's config that records a removed option at its neutral value loads
    without it; one that used it is refused by the option's name."""
    config = train_config(dataset="binary", steps=5, contrast=0.5)
    assert TrainConfig.from_json(config.to_json()) == config
    old = json.loads(config.to_json()) | REMOVED_OPTIONS
    assert TrainConfig.from_json(json.dumps(old)) == config
    del old["contrast"]  # from before the contrast term
    assert TrainConfig.from_json(json.dumps(old)) == dataclasses.replace(config, contrast=0.0)
    with pytest.raises(ValueError, match="--penalty-memory, which ebmm no longer has"):
        TrainConfig.from_json(json.dumps(old | {"penalty_memory": "foil"}))


def test_compare_shows_the_unwritten_control(tmp_path: Path) -> None:
    """`ebmm compare --unwritten`: beside each model, the same model reading from θ̄."""
    model, *_ = tiny_binary(2, write_lr=1.0)
    save_model(model, tmp_path / "net" / "model.safetensors")
    result = run_ebmm("compare", "--model", str(tmp_path / "net" / "model.safetensors"),
                      "--dataset", "binary", "--batch-size", "6", "--episodes", "3",
                      "--baselines", "identity", "--unwritten", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {r["method"]: r for r in json.loads(result.stdout)["rows"]}
    assert list(rows) == ["identity", "ebmm:net", "ebmm:net unwritten"]
    written, blank = rows["ebmm:net"], rows["ebmm:net unwritten"]
    assert blank["memory_floats"] == written["memory_floats"] == 129 * 8  # rnn, D = 8
    assert written["sq_error"]["mean"] < blank["sq_error"]["mean"]


@pytest.mark.slow
def test_train_with_the_contrast_term_through_the_cli(tmp_path: Path) -> None:
    """`ebmm train --contrast W` trains, reports the term held out and keeps the weight
    across --resume; a bad weight is a one-line error and creates nothing."""
    refused = run_ebmm("train", *_TINY_TRAIN, "--steps", "1", "--contrast", "-0.5", "-o",
                       str(tmp_path / "bad"))  # fmt: skip
    assert refused.returncode == 2
    assert "--contrast" in refused.stderr and "0 or more" in refused.stderr
    assert not (tmp_path / "bad").exists()

    out = tmp_path / "run"
    result = run_ebmm("train", *_TINY_TRAIN, "--steps", "2", "--contrast", "1.5", "-o", str(out))
    assert result.returncode == 0, result.stderr
    resumed = run_ebmm("train", "-o", str(out), "--resume", "--steps", "3")
    assert resumed.returncode == 0, resumed.stderr
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["heldout_contrast"] > 0 for r in records)
    _, _, state = load_checkpoint(out / "checkpoint.safetensors")
    assert json.loads(state["train_config"])["contrast"] == 1.5
