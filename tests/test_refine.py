"""The refined write (`model.refine_memory`, `ebmm write --refine`, `ebmm compare
--refine`): Adam steps on the written floats so that the model's own read restores
distorted copies of what it stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ebmm_cli import builtin
from ebmm_cli.errors import EbmmError
from ebmm_cli.memory import read
from ebmm_cli.metrics import iterates_loss, reconstruction_loss
from ebmm_cli.model import Model, refine_memory, unwritten_memory, write_memory
from ebmm_cli.runconfig import TrainConfig, train_config
from ebmm_cli.store import load_memory, load_model, save_model
from tests.conftest import run_ebmm


def _read_loss(model: Model, params: dict, patterns: torch.Tensor, seed: int) -> float:
    queries = model.distortion(patterns, torch.Generator().manual_seed(seed))
    out = read(model.energy, model.rules, params, queries)
    return sum(reconstruction_loss("mse", x, patterns).mean().item() for x in out) / len(out)


def test_refining_lowers_the_read_loss_and_leaves_the_written_memory_alone() -> None:
    """The shipped binary-128 at 16 strings: on queries the refinement never drew
    (another seed), the refined memory reads back with far less loss; the memory it
    started from and the model's own weights are untouched, the count of stored patterns
    kept, and the same generator gives the same floats."""
    model = load_model(builtin.resolve("binary-128"))
    stored = (torch.rand(16, 128, generator=torch.Generator().manual_seed(5)) > 0.5).float()
    memory = write_memory(model, stored).detach()
    before = {k: v.clone() for k, v in memory.params.items()}
    refined = refine_memory(model, memory, stored, 10, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(before[k], memory.params[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())  # only the memory was fitted
    assert refined.patterns == memory.patterns == 16
    ours, theirs = (_read_loss(model, m.params, stored, 99) for m in (refined, memory))
    assert ours < 0.5 * theirs, (ours, theirs)
    again = refine_memory(model, memory, stored, 10, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(again.params[k], refined.params[k]) for k in again.params)


def test_a_decoder_model_cannot_be_refined() -> None:
    config = train_config(dataset="omniglot", image_size=28, batch_size=4, steps=1,
                          read="decoder", device="cpu")  # fmt: skip
    model = Model(config.model)
    patterns = torch.rand(4, 1, 28, 28)
    with pytest.raises(ValueError, match="not the decoder read"):
        refine_memory(model, unwritten_memory(model), patterns, 1)


@pytest.mark.slow
def test_compare_refine_recalls_what_the_built_in_write_misses() -> None:
    """The user's path, on the shipped binary-128: at 32 patterns its own write leaves
    several error bits; refined for 20 steps the same floats hold the strings (README:
    0 bits after 100 steps)."""
    result = run_ebmm(
        "compare", "--model", "binary-128", "--dataset", "binary", "--patterns", "32",
        "--episodes", "2", "--refine", "20", "--baselines", "identity", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {row["method"]: row for row in json.loads(result.stdout)["rows"]}
    own = rows["ebmm:binary-128"]["hamming"]["mean"]
    refined = rows["ebmm:binary-128 refined 20"]["hamming"]["mean"]
    assert own > 3 and refined < 1.0, (own, refined)


def test_compare_names_a_refinement_at_another_rate() -> None:
    """`ebmm compare --refine-lr`: the refined row says its rate, beside the model's own."""
    result = run_ebmm(
        "compare", "--model", "binary-128", "--dataset", "binary", "--patterns", "8",
        "--episodes", "1", "--refine", "2", "--refine-lr", "0.1", "--baselines", "identity",
        "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {row["method"] for row in json.loads(result.stdout)["rows"]}
    assert {"ebmm:binary-128", "ebmm:binary-128 refined 2 at 0.1"} <= rows


def test_write_refine_stores_another_memory_that_reads(omniglot_dir: Path, tmp_path: Path) -> None:
    """`ebmm write --refine` on image files: a memory that loads and reads, and differs
    from the plain write's and from one refined at another rate; a decoder-read model, a
    rate without --refine and a rate that is not a number are refused with exit 2, nothing
    written."""
    images = omniglot_dir / "Greek" / "character03"
    plain, refined = tmp_path / "plain.safetensors", tmp_path / "refined.safetensors"
    common = ["--model", "omniglot-28", "--device", "cpu", str(images)]
    assert run_ebmm("write", *common, "-o", str(plain)).returncode == 0
    made = run_ebmm("write", *common, "-o", str(refined), "--refine", "2")
    assert made.returncode == 0, made.stderr
    (_, a), (_, b) = load_memory(plain), load_memory(refined)
    assert a.patterns == b.patterns
    assert any(not torch.equal(a.params[k], b.params[k]) for k in a.params)
    other_rate = tmp_path / "rate.safetensors"
    made = run_ebmm("write", *common, "-o", str(other_rate), "--refine", "2", "--refine-lr", "0.05")
    assert made.returncode == 0, made.stderr
    _, c = load_memory(other_rate)
    assert any(not torch.equal(b.params[k], c.params[k]) for k in b.params)
    for bad, problem in (
        (["--refine-lr", "0.05"], "needs --refine above 0"),
        (["--refine", "2", "--refine-lr", "nan"], "--refine-lr: must be in (0, 1e6]"),
        (["--refine", "2", "--refine-lr", "2e6"], "--refine-lr: must be in (0, 1e6]"),
    ):
        refused = run_ebmm("write", *common, "-o", str(tmp_path / "bad.safetensors"), *bad)
        assert refused.returncode == 2 and problem in refused.stderr, refused.stderr
        assert len(refused.stderr.splitlines()) == 1
    assert not (tmp_path / "bad.safetensors").exists()
    out = tmp_path / "read"
    back = run_ebmm("read", "--memory", str(refined), str(images), "-o", str(out))
    assert back.returncode == 0, back.stderr
    assert len(list(out.iterdir())) == len(list(images.iterdir()))

    config = train_config(dataset="omniglot", image_size=28, batch_size=4, steps=1,
                          read="decoder", device="cpu")  # fmt: skip
    decoder = tmp_path / "decoder.safetensors"
    save_model(Model(config.model), decoder)
    target = tmp_path / "d.safetensors"
    refused = run_ebmm("write", "--model", str(decoder), str(images), "-o", str(target),
                       "--refine", "2")  # fmt: skip
    assert refused.returncode == 2
    assert "needs a read through the energy" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1
    assert not target.exists()


def _refined_step_loss(model: Model, patterns: torch.Tensor, queries: torch.Tensor) -> float:
    """What a `--refine 3` meta-step should report: each episode written, refined 3 steps
    (distortions drawn in episode order from one generator, seed 7), read; the mean over
    episodes of the read's loss."""
    generator = torch.Generator().manual_seed(7)
    losses = []
    for p, q in zip(patterns, queries, strict=True):
        memory = refine_memory(model, write_memory(model, p).detach(), p, 3, generator=generator)
        iterates = read(model.energy, model.rules, memory.params, q)
        losses.append(iterates_loss(model.config.loss, iterates, p))
    return float(sum(losses) / len(losses))


def test_a_model_trained_to_refine_its_write_does_so_in_write_and_compare(
    omniglot_dir: Path, data_root: Path, tmp_path: Path
) -> None:
    """`ebmm train --write-refine R --set write_refine_lr=LR` makes refining the model's own
    write: `ebmm write` without --refine stores the memory refined R steps at LR (the
    same floats `refine_memory` gives), `--refine 0` the learned write alone, and `ebmm
    compare` reads the model's row from its refined write and adds the learned write's
    row when asked."""
    config = train_config(dataset="omniglot", image_size=28, batch_size=4, steps=1,
                          device="cpu", write_refine=3, write_refine_lr=0.05)  # fmt: skip
    assert (config.model.rules.refine, config.model.rules.refine_lr) == (3, 0.05)
    torch.manual_seed(0)
    path = tmp_path / "refining.safetensors"
    save_model(Model(config.model), path)
    images = omniglot_dir / "Greek" / "character03"
    common = ["--model", str(path), "--device", "cpu", "--seed", "5", str(images)]
    own, alone = tmp_path / "own.safetensors", tmp_path / "alone.safetensors"
    assert run_ebmm("write", *common, "-o", str(own)).returncode == 0
    assert run_ebmm("write", *common, "-o", str(alone), "--refine", "0").returncode == 0
    model, written = load_memory(own)
    _, learned = load_memory(alone)
    expected = refine_memory(model, learned, _images(images, model), 3, 0.05,
                             generator=torch.Generator().manual_seed(5))  # fmt: skip
    for k in written.params:
        assert torch.allclose(written.params[k], expected.params[k], atol=1e-6)
        assert not torch.equal(written.params[k], learned.params[k])

    result = run_ebmm("compare", "--model", str(path), "--data-root", str(data_root),
                      "--batch-size", "4", "--episodes", "1", "--refine", "0", "--baselines",
                      "identity", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {row["method"]: row for row in json.loads(result.stdout)["rows"]}
    assert rows["ebmm:refining"]["mse"]["mean"] != rows["ebmm:refining refined 0"]["mse"]["mean"]


def _images(folder: Path, model: Model) -> torch.Tensor:
    """The folder's images as `ebmm write` loads them for `model`."""
    from ebmm_cli.imageio import collect_images, load_batch

    shape = model.config.energy.shape
    found = collect_images([folder], None)
    batch = load_batch(found, shape[0], shape[1], model.config.invert_files, False, False)
    return batch.images


def test_write_refine_is_checked_and_old_files_write_without_it() -> None:
    for options, problem in (
        (dict(write_refine=-1), r"--write-refine: must be at least 0"),
        (dict(write_refine=2, read="decoder"), r"--write-refine: needs a read through the"),
        (dict(write_refine=2, write_refine_lr=0.0), r"--set write_refine_lr: must be in"),
        (dict(write_refine=2, write_refine_lr=float("nan")), r"--set write_refine_lr: must be in"),
    ):
        with pytest.raises(EbmmError, match=problem):
            train_config(dataset="omniglot", steps=1, **options)
    config = train_config(dataset="omniglot", steps=1, write_refine=4, write_refine_lr=0.03)
    again = TrainConfig.from_json(config.to_json()).model.rules
    assert (again.refine, again.refine_lr) == (4, 0.03)
    old = json.loads(config.to_json())
    del old["model"]["rules"]["refine"], old["model"]["rules"]["refine_lr"]
    rules = TrainConfig.from_json(json.dumps(old)).model.rules
    assert (rules.refine, rules.refine_lr) == (0, 0.01)
