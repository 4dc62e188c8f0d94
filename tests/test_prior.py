"""The prior phase of training (issue 17): before meta-training, steps that write nothing
and read every query from θ̄, so the slow weights learn the data's shapes cheaply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ebmm_cli.errors import EbmmError
from ebmm_cli.evaluation import Batch, evaluate_episodes
from ebmm_cli.memory import initial_memory, read
from ebmm_cli.meta import MetaStep, read_metrics
from ebmm_cli.metrics import hamming, reconstruction_loss
from ebmm_cli.model import Model
from ebmm_cli.runconfig import train_config
from ebmm_cli.store import load_model, save_model
from tests.conftest import run_ebmm, tiny_binary


def _binary_step(**options: object) -> tuple[Model, MetaStep, torch.Tensor, torch.Tensor]:
    model, config, patterns, queries = tiny_binary(2, **options)
    return model, MetaStep(model, config, torch.device("cpu"), world=1), patterns, queries


@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_a_prior_step_reads_from_the_initial_weights_and_writes_nothing(loss: str) -> None:
    model, step, patterns, queries = _binary_step(loss=loss)
    # The loss a prior step should follow: every query read from θ̄, summed over the
    # read's iterates, averaged over the patterns (computed here without MetaStep).
    net = model.energy
    iterates = read(net, model.rules, initial_memory(net), queries.flatten(0, 1))
    flat = patterns.flatten(0, 1)
    expected = sum(reconstruction_loss(loss, x, flat).mean() for x in iterates) / len(iterates)
    rules_before = {k: v.clone() for k, v in model.rules.named_parameters()}
    slow_before = {k: v.clone() for k, v in net.named_parameters()}

    loss = step([Batch(p, q) for p, q in zip(patterns, queries, strict=True)], None, prior=True)

    torch.testing.assert_close(loss, expected)
    after = dict(model.rules.named_parameters())
    # Nothing is written, so no gradient reaches the write's rates, α or β ...
    for name in ("write_rate", "alpha", "beta"):
        torch.testing.assert_close(after[name], rules_before[name], rtol=0, atol=0)
    # ... while the read's first step size and the energy (θ̄ included) move.
    assert not torch.equal(after["read_rate"], rules_before["read_rate"])
    moved = [k for k, v in net.named_parameters() if not torch.equal(v, slow_before[k])]
    assert set(initial_memory(net)) <= set(moved)


def test_held_out_metrics_show_what_the_write_stores() -> None:
    """`unwritten_*`: the queries read from θ̄. A write whose rates are nil stores
    nothing and reads exactly as θ̄ does; a write with the binary rates stores."""
    model, _, patterns, queries = _binary_step(write_lr=1.0)
    held = [Batch(p, q) for p, q in zip(patterns, queries, strict=True)]
    stored = evaluate_episodes(model, held)
    assert stored["mse"] < stored["unwritten_mse"] - 1e-3
    with torch.no_grad():
        model.rules.write_rate.fill_(-40.0)  # softplus: rates of 4e-18
    nothing = evaluate_episodes(model, held)
    assert nothing["mse"] == pytest.approx(nothing["unwritten_mse"], abs=1e-7)
    assert nothing["unwritten_mse"] == pytest.approx(stored["unwritten_mse"], abs=1e-7)
    assert nothing["hamming"] == nothing["unwritten_hamming"]


def test_compare_shows_the_unwritten_control(tmp_path: Path) -> None:
    """`ebmm compare --unwritten`: beside each model, the same model reading from θ̄."""
    model, *_ = _binary_step(write_lr=1.0)
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


def test_the_prior_phase_is_checked_with_the_other_options() -> None:
    with pytest.raises(EbmmError, match="leaves no time"):
        train_config(dataset="binary", minutes=5, prior_minutes=5)
    with pytest.raises(EbmmError, match="gradient read"):
        train_config(dataset="binary", minutes=5, prior_minutes=1, read="decoder")
    with pytest.raises(EbmmError, match="0 or more"):
        train_config(dataset="binary", steps=5, prior_minutes=-1)


@pytest.mark.slow
def test_train_starts_with_the_prior_then_writes(tmp_path: Path) -> None:
    """Through the CLI: a run whose prior phase outlasts its steps never changes the write
    rates; one whose prior phase is over after its first step records both phases and
    resumes in the second."""
    common = ["--dataset", "binary", "--batch-size", "6", "--write-steps", "2", "--read-steps",
              "2", "--dynamic", "8", "--eval-every", "1", "--eval-episodes", "1",
              "--device", "cpu"]  # fmt: skip
    only = tmp_path / "only-prior"
    result = run_ebmm("train", *common, "--steps", "3", "--minutes", "60", "--prior-minutes",
                      "30", "-o", str(only))  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = read_metrics(only)
    assert [r["prior"] for r in records] == [True, True, True]
    trained = load_model(only / "model.safetensors")
    fresh = Model(trained.config)
    torch.testing.assert_close(trained.rules.write_rate, fresh.rules.write_rate, rtol=0, atol=0)
    assert not torch.equal(trained.rules.read_rate, fresh.rules.read_rate)

    both = tmp_path / "both"  # 0.6 ms of prior: the first step's, and no other
    result = run_ebmm("train", *common, "--steps", "2", "--minutes", "60", "--prior-minutes",
                      "1e-5", "-o", str(both))  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = read_metrics(both)
    assert [r["prior"] for r in records] == [True, False]
    resumed = run_ebmm("train", "-o", str(both), "--resume", "--steps", "3")
    assert resumed.returncode == 0, resumed.stderr
    records = read_metrics(both)
    assert [r["prior"] for r in records] == [True, False, False]
    written = load_model(both / "model.safetensors")
    assert not torch.equal(written.rules.write_rate, fresh.rules.write_rate)


def test_l1_is_the_expected_hamming_error_of_a_randomly_rounded_read() -> None:
    """Why `--loss l1` suits the Hamming bars: for binary targets it is the error a read
    would have, rounded at random, per pixel; the squared error is not."""
    g = torch.Generator().manual_seed(0)
    read_out = torch.rand(3, 1, 8, 8, generator=g)
    target = (torch.rand(3, 1, 8, 8, generator=g) > 0.5).float()
    draws = 4000
    rounded = (torch.rand(draws, *read_out.shape, generator=g) < read_out).float()
    errors = hamming(rounded.flatten(0, 1), target.repeat(draws, 1, 1, 1)).view(draws, 3)
    expected = errors.mean(0) / 64
    torch.testing.assert_close(
        reconstruction_loss("l1", read_out, target), expected, atol=0.01, rtol=0
    )
    assert (reconstruction_loss("mse", read_out, target) - expected).abs().max() > 0.05
