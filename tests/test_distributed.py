"""Distributed meta-training on PyTorch's engine (gloo on the CPU): a step of two processes
is a single-process step over the union of their episodes, and torchrun runs `ebmm train`
end to end, resumable at another world size."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open

from ebmm_cli.distort import Distortion
from ebmm_cli.evaluation import Batch
from ebmm_cli.memory import RuleConfig
from ebmm_cli.meta import Trainer, read_metrics
from ebmm_cli.runconfig import TrainConfig, model_config

ROOT = Path(__file__).resolve().parents[1]


def _config() -> TrainConfig:
    rules = RuleConfig(write_lr=1.0, read_lr=5.0)
    model = model_config(dataset="binary", dynamic=16, rules=rules, distortion="eraseblock:64")
    return TrainConfig(model, batch_size=8, steps=1, device="cpu", eval_episodes=1)


def _episode(index: int) -> Batch:
    """Episode `index`: the same tensors in any process."""
    generator = torch.Generator().manual_seed(index)
    patterns = torch.randint(0, 2, (8, 128), generator=generator).float()
    return Batch(patterns, Distortion.parse("eraseblock:64")(patterns, generator))


def _step(trainer: Trainer, batches: list[Batch]) -> dict[str, torch.Tensor]:
    """One step; the (clipped) gradients it applied, which parameters got none, and the
    parameters after it."""
    assert torch.isfinite(trainer.meta_step(batches, trainer.generator))
    out = {}
    for name, p in trainer.model.named_parameters():
        out[f"nograd.{name}"] = torch.tensor(float(p.grad is None))
        out[f"grad.{name}"] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        out[f"param.{name}"] = p.detach().clone()
    return out


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One process of a group: a step on its episode (saved as `rank<r>.pt`), then, on a
    fresh trainer, a step where the last rank's queries hold NaN, so that its loss is not
    finite (the loss and whether every parameter stayed put, saved as `poisoned<r>.pt`)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trainer = Trainer.create(_config(), Path(out) / f"rank{rank}")
        assert (trainer.rank, trainer.world) == (rank, world)
        torch.save(_step(trainer, [_episode(rank)]), Path(out) / f"rank{rank}.pt")
        trainer = Trainer.create(_config(), Path(out) / f"poisoned{rank}")
        batch = _episode(rank)
        if rank == world - 1:
            batch.queries[0, 0] = float("nan")
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        loss = trainer.meta_step([batch], trainer.generator)
        after = trainer.model.state_dict()
        kept = all(torch.equal(before[k], after[k]) for k in before)
        torch.save({"loss": loss.detach(), "kept": torch.tensor(kept)},
                   Path(out) / f"poisoned{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder where two processes (one group, started once: seconds each) left their
    steps."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return out


def test_two_processes_take_the_single_process_step_over_both_episodes(
    two_ranks: Path, tmp_path: Path
) -> None:
    ranks = [torch.load(two_ranks / f"rank{r}.pt") for r in range(2)]
    single = _step(Trainer.create(_config(), tmp_path / "single"), [_episode(0), _episode(1)])
    # The energy's offset gets no gradient alone, so AdamW leaves it (no weight decay):
    # after the all-reduce it must get none either (compared below as "nograd.*").
    assert any(v.item() for k, v in single.items() if k.startswith("nograd."))
    alone = _step(Trainer.create(_config(), tmp_path / "alone"), [_episode(0)])
    for key, value in single.items():
        # Both processes end the step equal to one process, which writes and reads its two
        # episodes together (vmap) while each process has one: the same sums in another
        # order. Gradients agree to ~1e-9; AdamW's first step divides by |g| + 1e-8, so on
        # near-zero gradients that rounding moves a parameter by up to ~0.2% of a step
        # (lr 1e-3): parameters are compared to 1% of one.
        for rank in ranks:
            tolerance = {"atol": 1e-7} if key.startswith("grad.") else {"atol": 1e-5}
            assert torch.allclose(rank[key], value, rtol=1e-5, **tolerance), key
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # the processes agree exactly
    # ... and the step did use the other process's episode.
    grads = [k for k in single if k.startswith("grad.")]
    assert any(not torch.allclose(single[k], alone[k], rtol=1e-3) for k in grads)


def test_a_non_finite_loss_on_one_process_skips_the_step_on_all(two_ranks: Path) -> None:
    for rank in range(2):  # the first rank's own loss was finite: it skips all the same
        poisoned = torch.load(two_ranks / f"poisoned{rank}.pt")
        assert poisoned["loss"].isnan() and poisoned["kept"].item(), rank


def _torchrun(nproc: int, out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    command += ["--master-port", str(_free_port()), "-m", "ebmm_cli", "train", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )


@pytest.mark.slow
def test_torchrun_trains_writes_once_and_resumes_at_another_world_size(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _torchrun(
        2, out, "--dataset", "binary", "--memory", "rnn", "--batch-size", "8",
        "--dynamic", "16", "--steps", "2", "--eval-every", "1", "--eval-episodes", "1",
        "--set", "episodes_per_step=2", "--device", "cpu",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("model.safetensors") == 1  # rank 0 alone reports
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    with safe_open(out / "checkpoint.safetensors", "pt") as f:
        state = json.loads(f.metadata()["state"])
        keys = set(f.keys())
    assert state["world_size"] == 2 and state["step"] == 2
    assert {"state.generator", "state.rank1_generator"} <= keys  # both streams kept
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []

    # Three processes continue the two-process run: the third draws a fresh stream.
    again = _torchrun(3, out, "--resume", "--steps", "3")
    assert again.returncode == 0, again.stderr
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    with safe_open(out / "checkpoint.safetensors", "pt") as f:
        assert json.loads(f.metadata()["state"])["world_size"] == 3
        assert "state.rank2_generator" in set(f.keys())
