"""`--memory kv-pix`: a key-value energy whose values are the pixels, written by the
delta rule (the paper's gradient write on E, in closed form) and read by projected
gradient descent on E, with no network that draws an image."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ebmm_cli.energy import EnergyConfig, build_energy, memory_floats
from ebmm_cli.memory import delta_curvature, energy, energy_grad, initial_memory, read, write
from ebmm_cli.model import Model
from ebmm_cli.recipes import RECIPES
from ebmm_cli.runconfig import TrainConfig, train_config
from ebmm_cli.store import load_checkpoint
from tests.conftest import run_ebmm


def _tiny(**options: object) -> tuple[Model, torch.Tensor, torch.Tensor]:
    """A seeded untrained kv-pix model on 16x16 images, 4 random binary patterns and
    their occluded queries."""
    config = train_config(dataset="omniglot", memory="kv-pix", image_size=16, batch_size=4,
                          steps=1, distortion="occlude:8", device="cpu", **options)  # fmt: skip
    torch.manual_seed(0)
    model = Model(config.model)
    patterns = (torch.rand(4, 1, 16, 16) > 0.7).float()
    return model, patterns, model.distortion(patterns, torch.Generator().manual_seed(1))


def test_kv_pix_holds_the_papers_budget_reads_by_descent_and_starts_empty() -> None:
    """4,608 written floats at 32x32 (16 pixels x 9 x 32 keys); one energy per image;
    θ̄ zero; the gradient read and the delta write (α = 0, rate 1) by default."""
    net = build_energy(EnergyConfig("kv-pix", (1, 32, 32)))
    assert memory_floats(net) == 4608
    assert net(torch.rand(3, 1, 32, 32)).shape == (3,)
    assert all(torch.count_nonzero(v) == 0 for v in initial_memory(net).values())
    rules = train_config(memory="kv-pix", image_size=32, steps=1).model.rules
    assert (rules.read, rules.alpha, rules.write_lr) == ("gd", 0.0, 1.0)


def test_the_kv_pix_write_is_a_gradient_step_on_its_energy() -> None:
    """One write step from θ̄ = 0 is θ̄ − (η / λ) ∇θ mean E(xi; θ̄), λ the largest
    curvature of the mean energy in θ (the rate in units of 1/λmax): the closed form
    agrees with autograd's gradient of E itself."""
    model, patterns, _ = _tiny(write_steps=1)
    net = model.energy
    theta = initial_memory(net)
    (name,) = theta
    grad = torch.autograd.grad(energy(net, theta, patterns).mean(), theta[name])[0]
    keys = net.associations(patterns)[0]
    curvature = delta_curvature(keys) * keys.shape[0] / patterns.shape[0]
    rate = F.softplus(model.rules.write_rate)[0, 0, 0]
    written = write(net, model.rules, patterns)[name]
    torch.testing.assert_close(written, theta[name] - rate / curvature * grad, rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(written) > 0


def test_the_kv_pix_read_descends_its_energy() -> None:
    """The read's first iterate is the projected gradient step clip(q − γ1 ∇x E(q; θ)),
    and after a write its steps lower the queries' energy; the last iterate lies in
    [0, 1]."""
    model, patterns, queries = _tiny(read_steps=4, read_lr=0.5)
    net = model.energy
    memory = write(net, model.rules, patterns)
    iterates = read(net, model.rules, memory, queries)
    gamma = model.rules.read_schedule()[0][0].detach()
    _, g = energy_grad(net, memory, queries, create_graph=False)
    torch.testing.assert_close(iterates[0], (queries - gamma * g).clamp(0, 1))
    with torch.no_grad():
        before = energy(net, memory, queries).mean()
        after = energy(net, memory, iterates[-1]).mean()
    assert after < before
    assert iterates[-1].min() >= 0 and iterates[-1].max() <= 1


def test_the_ebmm_recipe_trains_kv_pix_by_descent_through_the_cli(
    data_root: Path, tmp_path: Path
) -> None:
    """`ebmm train --recipe omniglot-32-ebmm` (at N = 4 here) meta-trains the kv-pix
    energy through its gradient read for a step and records held-out numbers; the
    run's model reads by descent, without refinement, within the paper's budget."""
    run = tmp_path / "run"
    result = run_ebmm("train", "--recipe", "omniglot-32-ebmm", "--batch-size", "4",
                      "--steps", "1", "--eval-every", "1", "--eval-episodes", "1",
                      "--episodes-per-step", "1", "--device", "cpu",
                      "--data-root", str(data_root), "--out", str(run))  # fmt: skip
    assert result.returncode == 0, result.stderr
    state = load_checkpoint(run / "checkpoint.safetensors")[2]
    config = TrainConfig.from_json(state["train_config"])
    recipe = RECIPES["omniglot-32-ebmm"]["train"]
    assert config.model.energy.kind == recipe["memory"] == "kv-pix"
    rules = config.model.rules
    assert (rules.read, rules.refine) == ("gd", 0) and rules.write_steps <= 5
    assert (run / "metrics.jsonl").read_text().count("heldout_unwritten_hamming") == 1
