"""`conv-ae`, `ebmm train --redraw` and `--redraw-stored`: the image the written
bottleneck redraws from a query or a stored pattern (`memory.redrawn`) as meta-loss terms
and as held-out metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ebmm_cli.errors import EbmmError
from ebmm_cli.evaluation import Batch, evaluate_episodes
from ebmm_cli.memory import redrawn
from ebmm_cli.meta import MetaStep, read_metrics
from ebmm_cli.metrics import hamming, ssim
from ebmm_cli.model import Model, unwritten_memory, write_memory
from ebmm_cli.runconfig import TrainConfig, train_config
from ebmm_cli.store import load_checkpoint
from tests.conftest import run_ebmm


def _tiny_ae(
    episodes: int, **options: object
) -> tuple[Model, TrainConfig, torch.Tensor, torch.Tensor]:
    """A seeded untrained conv-ae on 16x16 images, 3 per episode, T = K = 2, and
    `episodes` episodes of random binary images with an occluded block."""
    config = train_config(dataset="omniglot", memory="conv-ae", image_size=16, batch_size=3,
                          steps=1, write_steps=2, read_steps=2, distortion="occlude:8",
                          device="cpu", **options)  # fmt: skip
    torch.manual_seed(0)
    model = Model(config.model)
    patterns = (torch.rand(episodes, 3, 1, 16, 16) > 0.5).float()
    queries = model.distortion(patterns.flatten(0, 1), torch.Generator().manual_seed(1))
    return model, config, patterns, queries.view_as(patterns)


@pytest.mark.parametrize("episodes", [1, 2])
def test_the_redraw_term_is_the_loss_of_what_each_written_memory_redraws(episodes: int) -> None:
    """The step's extra term is `redraw` times the mean squared error between what each
    episode's own written memory redraws from its queries and the stored patterns (one
    episode through `write_memory`, two under vmap); nothing without the option."""
    model, config, patterns, queries = _tiny_ae(episodes, redraw=2.0)
    step = MetaStep(model, config, torch.device("cpu"), world=1)
    _, _, extra = step._episode_losses(patterns, queries, torch.Generator().manual_seed(7))
    expected = []
    for p, q in zip(patterns, queries, strict=True):
        memory = write_memory(model, p, replay=False)
        expected.append(2.0 * (redrawn(model.energy, memory.params, q) - p).pow(2).mean())
    assert torch.allclose(extra, torch.stack(expected), rtol=1e-4)
    model, config, patterns, queries = _tiny_ae(episodes)
    step = MetaStep(model, config, torch.device("cpu"), world=1)
    _, _, extra = step._episode_losses(patterns, queries, torch.Generator().manual_seed(7))
    assert torch.equal(extra, torch.zeros_like(extra))


@pytest.mark.parametrize("episodes", [1, 2])
def test_the_stored_redraw_term_is_the_loss_of_what_each_memory_redraws_of_its_patterns(
    episodes: int,
) -> None:
    """`redraw_stored` adds its weight times the mean squared error between what each
    episode's written memory redraws from its stored patterns and those patterns, on top
    of the query's term."""
    model, config, patterns, queries = _tiny_ae(episodes, redraw=2.0, redraw_stored=0.5)
    step = MetaStep(model, config, torch.device("cpu"), world=1)
    _, _, extra = step._episode_losses(patterns, queries, torch.Generator().manual_seed(7))
    expected = []
    for p, q in zip(patterns, queries, strict=True):
        params = write_memory(model, p, replay=False).params
        from_query = (redrawn(model.energy, params, q) - p).pow(2).mean()
        from_pattern = (redrawn(model.energy, params, p) - p).pow(2).mean()
        expected.append(2.0 * from_query + 0.5 * from_pattern)
    assert torch.allclose(extra, torch.stack(expected), rtol=1e-4)


def test_the_redraw_term_trains_the_decoder_and_the_write() -> None:
    """From the same weights, a step with the term moves the reconstruction's decoder
    and the write rates otherwise than a step without it."""
    moved = {}
    for weight in (0.0, 1.0):
        model, config, patterns, queries = _tiny_ae(2, redraw=weight)
        step = MetaStep(model, config, torch.device("cpu"), world=1)
        batches = [Batch(p, q) for p, q in zip(patterns, queries, strict=True)]
        step(batches, torch.Generator().manual_seed(7))
        moved[weight] = (
            model.energy.decode.convs[0].weight.detach().clone(),
            model.rules.write_rate.detach().clone(),
        )
    assert not torch.equal(moved[0.0][0], moved[1.0][0])
    assert not torch.equal(moved[0.0][1], moved[1.0][1])


@pytest.mark.parametrize("option", ["--redraw", "--redraw-stored"])
def test_redraw_weights_are_checked_and_kept_in_the_run_config(option: str) -> None:
    """Each weight: not negative, conv-ae only, kept through a checkpoint's JSON, and 0
    for a checkpoint from before the option."""
    name = option.removeprefix("--").replace("-", "_")
    with pytest.raises(EbmmError, match=rf"^{option}: must be 0 or more, got -1"):
        train_config(dataset="omniglot", memory="conv-ae", steps=5, **{name: -1.0})
    with pytest.raises(EbmmError, match=rf"^{option}: needs --memory conv-ae"):
        train_config(dataset="omniglot", memory="conv", steps=5, **{name: 1.0})
    config = train_config(dataset="omniglot", memory="conv-ae", steps=5, **{name: 0.5})
    assert getattr(TrainConfig.from_json(config.to_json()), name) == 0.5
    old = json.loads(config.to_json())
    del old[name]  # a checkpoint from before the option
    assert getattr(TrainConfig.from_json(json.dumps(old)), name) == 0.0


def test_held_out_metrics_of_a_conv_ae_report_what_it_redraws() -> None:
    """A conv-ae model's held-out metrics carry `redrawn_*` from the written memory and
    `unwritten_redrawn_hamming` from θ̄, as computed directly; a conv model's do not."""
    model, _, patterns, queries = _tiny_ae(1)
    batches = [Batch(patterns[0], queries[0])]
    metrics = evaluate_episodes(model, batches)
    memory = write_memory(model, patterns[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        drawn = redrawn(model.energy, memory.params, queries[0])
        blank = redrawn(model.energy, unwritten_memory(model).params, queries[0])
    assert metrics["redrawn_mse"] == pytest.approx((drawn - patterns[0]).pow(2).mean().item())
    assert metrics["redrawn_hamming"] == pytest.approx(hamming(drawn, patterns[0]).mean().item())
    assert metrics["unwritten_redrawn_hamming"] == pytest.approx(
        hamming(blank, patterns[0]).mean().item()
    )
    assert metrics["redrawn_ssim"] == pytest.approx(ssim(drawn, patterns[0]).mean().item())
    with torch.no_grad():
        whole = redrawn(model.energy, memory.params, patterns[0])
    assert metrics["redrawn_stored_hamming"] == pytest.approx(
        hamming(whole, patterns[0]).mean().item()
    )
    config = train_config(dataset="omniglot", memory="conv", image_size=16, batch_size=3,
                          steps=1, write_steps=2, read_steps=2, device="cpu")  # fmt: skip
    plain = evaluate_episodes(Model(config.model), batches)
    assert not any(k.startswith(("redrawn", "unwritten_redrawn")) for k in plain)


def test_a_conv_energy_refuses_to_redraw() -> None:
    config = train_config(dataset="omniglot", memory="conv", image_size=16, steps=1)
    model = Model(config.model)
    with pytest.raises(ValueError, match="only conv-ae"):
        redrawn(model.energy, unwritten_memory(model).params, torch.rand(2, 1, 16, 16))


@pytest.mark.slow
def test_train_redraw_through_the_cli(data_root: Path, tmp_path: Path) -> None:
    """`ebmm train --memory conv-ae --redraw 1` on Omniglot: the run records the redrawn
    held-out metrics and keeps the option for a resume; `--redraw` on a conv model is
    one line and exit 2, before any data is read."""
    out = tmp_path / "run"
    common = ["train", "--data-root", str(data_root), "--image-size", "16",
              "--batch-size", "3", "--write-steps", "2", "--read-steps", "2",
              "--eval-every", "2", "--eval-episodes", "1", "--device", "cpu",
              "--steps", "2"]  # fmt: skip
    result = run_ebmm(*common, "--memory", "conv-ae", "--redraw", "1", "--redraw-stored", "2",
                      "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    last = read_metrics(out)[-1]
    assert last["step"] == 2 and "heldout_redrawn_hamming" in last, last
    assert "heldout_redrawn_stored_hamming" in last, last
    _, _, state = load_checkpoint(out / "checkpoint.safetensors")
    config = TrainConfig.from_json(state["train_config"])
    assert (config.redraw, config.redraw_stored) == (1.0, 2.0)
    refused = run_ebmm(*common, "--redraw", "1", "--out", str(tmp_path / "no"))
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1 and "--redraw" in refused.stderr
    assert not (tmp_path / "no").exists()
