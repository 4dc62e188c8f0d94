"""Meta-training: learn θ̄, the slow weights and the write/read rules end to end.

Each step samples an episode X (N patterns, by default N distinct classes) with
learn2learn's task sampler, distorts it into queries X̃, writes X, reads X̃ and
minimises the loss summed over all read iterates (paper eq. 2, applied step-wise),
backpropagating through the read and, by default, through the write's own gradient
steps (second order; `first_order` treats each write gradient as a constant).
Outer optimiser: AdamW, weight decay 1e-6, gradient clipping by global norm 0.05 (the
paper's). Auxiliary terms of the loss (`terms.TERMS`) join it where a run weighs them.
The library never prints: progress goes to a callback.

Distributed (torchrun, `init_distributed`): every process holds the same model, draws
its own episodes, and all-reduces its gradients before the identical clipped AdamW step
(a manual all-reduce, as learn2learn's distributed examples do: DistributedDataParallel
does not support the double backward through the write). Rank 0 alone decides when to
stop and to checkpoint, evaluates and writes files.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ebmm_cli.atomic import atomic_path
from ebmm_cli.data import BinaryStrings, Episodes, load_dataset
from ebmm_cli.device import resolve_device
from ebmm_cli.errors import EbmmError
from ebmm_cli.evaluation import Batch, evaluate_sets, heldout_sets, plot_curves
from ebmm_cli.graphs import replayed_step
from ebmm_cli.memory import read_episodes, write_episodes
from ebmm_cli.metrics import reconstruction_loss
from ebmm_cli.model import Model, retrieve, write_memory
from ebmm_cli.runconfig import TrainConfig
from ebmm_cli.store import (
    load_checkpoint,
    load_model,
    match_tensors,
    save_checkpoint,
    save_model,
)
from ebmm_cli.terms import episode_terms, weights

# Rank r > 0 draws its episodes from seed + r * RANK_SEED_STRIDE: streams that never meet
# each other's, or the held-out ones (seed + 10,000 and + 20,000), for any sane seed.
RANK_SEED_STRIDE = 1_000_003


def init_distributed(device: str) -> str | None:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1): NCCL with one
    GPU per process (LOCAL_RANK) on CUDA, gloo on the CPU; the group is left at exit.
    Returns this process's device, or None for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if dist.is_initialized():
        return device
    if resolve_device(device).type == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = "cpu"
        dist.init_process_group("gloo")
    atexit.register(dist.destroy_process_group)
    return device


class MetaStep:
    """One meta-gradient step, apart from the loop around it: episodes in; the mean loss
    out and the clipped AdamW step applied (distributed: after one all-reduce).

    It holds the optimiser and nothing of the run's bookkeeping (schedule, evaluation,
    checkpoints, files), so it can be timed, profiled or captured on its own. Nothing in
    it waits for the device: whether the step was finite is decided there, and a
    non-finite step leaves parameters and optimiser state as they were (as a
    GradScaler's found-inf does, without its host sync). On CUDA the optimiser is
    `capturable` and its rates are tensors, so that the whole step can be replayed from
    a CUDA graph (`graphs.Captured`) while the schedule changes them.
    """

    def __init__(self, model: Model, config: TrainConfig, device: torch.device, world: int) -> None:
        self.model = model
        self.loss = config.model.loss
        self.second_order = not config.first_order
        self.terms = weights(config)
        self.device = device
        self.world = world
        rule_params = list(model.rules.parameters())
        rule_ids = {id(p) for p in rule_params}
        net_params = [p for p in model.parameters() if id(p) not in rule_ids]
        groups = [{"params": net_params, "lr": config.lr}]
        if rule_params:
            groups.append({"params": rule_params, "lr": config.rule_lr})
        self.base_lrs = [g["lr"] for g in groups]
        self.capturable = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, weight_decay=1e-6, capturable=self.capturable)
        self._tensor_lrs()

    def _tensor_lrs(self) -> None:
        """On CUDA, each group's rate lives in a device tensor that `scale_lr` fills: a
        captured step reads it, where a Python float would be frozen into the graph."""
        if self.capturable:
            for group in self.optimizer.param_groups:
                if not isinstance(group["lr"], torch.Tensor):
                    group["lr"] = torch.tensor(float(group["lr"]), device=self.device)

    def load_optimizer(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's optimiser state (saved with plain-number rates)."""
        self.optimizer.load_state_dict(state)
        self._tensor_lrs()

    def scale_lr(self, scale: float) -> None:
        """Set every parameter group's rate to `scale` times its base rate."""
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(base * scale)
            else:
                group["lr"] = base * scale

    def __call__(self, batches: list[Batch], generator: torch.Generator) -> torch.Tensor:
        """One meta-gradient step on the mean loss of `batches` (and, distributed, of
        every process's batches). `generator` draws the decoder read's adaptation queries.

        Returns:
            The mean loss, a 0-dim tensor on the device: NaN if the loss or the gradient
            was not finite anywhere, and then nothing changed. The run's auxiliary terms
            (`terms.TERMS`) join the gradient, not the loss returned, so curves stay
            comparable.
        """
        patterns = torch.stack([b.patterns for b in batches])
        queries = torch.stack([b.queries for b in batches])
        return self.episodes(patterns, queries, generator)

    def episodes(
        self, patterns: torch.Tensor, queries: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """`__call__` on stacked episodes, (E, N, ...) each: the form a CUDA graph
        captures (fixed-shape tensors in, a tensor out, no host sync). Several episodes
        of the gradient read are written and read together, under `torch.func.vmap`; the
        decoder read (which draws adaptation queries with `generator`) one at a time."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        count = patterns.shape[0]
        share = 1.0 / (count * self.world)
        together = count > 1 and self.model.decoder is None
        groups = [slice(0, count)] if together else [slice(i, i + 1) for i in range(count)]
        total = torch.zeros((), device=patterns.device)
        finite = torch.ones((), dtype=torch.bool, device=patterns.device)
        for group in groups:  # group by group: one group's graph at a time
            losses, iterates, extra = self._episode_losses(
                patterns[group], queries[group], generator
            )
            objective = losses.sum() + extra.sum()
            finite = finite & objective.isfinite()
            (objective * share).backward()
            total = total + losses.detach().sum() / iterates * share
        params = list(self.model.parameters())
        if self.world > 1:
            total, finite = self._all_reduce(params, total, finite)
        norm = torch.nn.utils.clip_grad_norm_(params, 0.05)
        finite = finite & norm.isfinite()
        self._step_where(finite)
        return torch.where(finite, total, torch.full_like(total, math.nan))

    def _step_where(self, ok: torch.Tensor) -> None:
        """AdamW's step where `ok` (a device bool), else none at all: every parameter
        and optimiser state tensor the step touches keeps its value. State the step made
        for the first time goes back to zeros, which is AdamW's fresh state."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        with torch.no_grad():
            kept = [(t, t.clone()) for p in params for t in (p, *self._state(p))]
            fresh = [p for p in params if not self.optimizer.state.get(p)]
            self.optimizer.step()
            for tensor, before in kept:
                tensor.copy_(torch.where(ok, tensor, before))
            for tensor in (t for p in fresh for t in self._state(p)):
                tensor.copy_(torch.where(ok, tensor, torch.zeros_like(tensor)))

    def _state(self, param: torch.nn.Parameter) -> list[torch.Tensor]:
        return [v for v in self.optimizer.state.get(param, {}).values() if torch.is_tensor(v)]

    def _summed(self, iterates: list[torch.Tensor], patterns: torch.Tensor) -> torch.Tensor:
        """Each episode's loss summed over the read iterates (each (E·N, ...) or
        (E, N, ...)), shape (E,)."""
        flat = patterns.flatten(0, 1)
        return sum(
            reconstruction_loss(self.loss, x.reshape(flat.shape), flat)
            .view(patterns.shape[0], -1)
            .mean(1)
            for x in iterates
        )

    def _episode_losses(
        self, patterns: torch.Tensor, queries: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Write each episode, read its queries: each episode's loss summed over read
        iterates, shape (E,) (NaN where a write or read left the reals), the number of
        iterates, and each episode's weighted auxiliary terms (E,; `terms.episode_terms`,
        zeros without any). One episode goes through `write_memory` (any read); several
        through `write_episodes` and `read_episodes` (the gradient read)."""
        second = self.second_order
        energy_net = self.model.energy
        if patterns.shape[0] == 1:
            memory = write_memory(
                self.model,
                patterns[0],
                create_graph=second,
                generator=generator,
                check=False,
                replay=False,
            )
            memories = {k: v[None] for k, v in memory.params.items()}
            iterates = [x[None] for x in retrieve(self.model, memory, queries[0], True)]
        else:
            rules = self.model.rules
            memories = write_episodes(energy_net, rules, patterns, create_graph=second)
            iterates = read_episodes(energy_net, rules, memories, queries, create_graph=True)
        losses = self._summed(iterates, patterns)
        extra = episode_terms(energy_net, self.terms, memories, patterns, queries, iterates[-1])
        return losses, len(iterates), extra

    def _all_reduce(
        self, params: list[torch.nn.Parameter], total: torch.Tensor, finite: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum every process's gradient shares, loss shares and failures in one
        all-reduce: afterwards each process holds the mean gradient over all episodes."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        tail = torch.stack([total, (~finite).to(total.dtype)])
        flat = torch.cat([g.flatten() for g in grads] + [tail])
        dist.all_reduce(flat)
        offset = 0
        for p in params:  # a parameter no loss reaches (the energy's offset) stays without
            if p.grad is not None:  # one on every process, as in a single process
                p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        return flat[-2], flat[-1] == 0


class Trainer:
    """The training loop and its bookkeeping around a `MetaStep`: episode streams and
    generators, the learning-rate schedule, held-out evaluation, checkpoints and files.

    Use `Trainer.create(config, out)` for a new run, `Trainer.resume(out)` to continue
    one from `out/checkpoint.safetensors`, then `run()`.
    """

    def __init__(self, config: TrainConfig, model: Model, out: Path) -> None:
        self.config = config
        self.out = out
        self.device = resolve_device(config.device)
        if self.device.type == "cuda":
            # TF32 matmuls and convolutions (fp32 range, 10-bit mantissa): meta-gradients
            # are clipped, averaged by AdamW and far noisier than that rounding. The
            # command line's write and read stay in full fp32.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.model = model.to(self.device)
        self.rank, self.world = (
            (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        )
        self.meta_step = MetaStep(self.model, config, self.device, self.world)
        # On CUDA (--cuda-graph auto|on) the held-out write and read, and a single
        # process's meta-step, replay CUDA graphs; a distributed step's all-reduce is
        # left outside graphs, and the decoder read (which draws adaptation queries on
        # the host) runs eagerly.
        self.step_fn: Callable[[list[Batch], torch.Generator], torch.Tensor] = self.meta_step
        graphs = self.model.use_cuda_graphs(config.cuda_graph)
        if graphs and self.world == 1:
            self.step_fn = replayed_step(self.meta_step)
        train_data, held_data, self.heldout_split = _datasets(config)
        split = "train"
        try:
            self.episodes, self.generator = self._streams(train_data, self.rank, 0)
            split = self.heldout_split
            self.heldout = heldout_sets(held_data, config, self.model.distortion)
        except EbmmError as e:  # say which data could not fill an episode
            raise EbmmError(e.subject, f"{e.problem} (the {split} split)") from None
        if self.world > 1:  # the same start everywhere, whatever each process built
            for tensor in self.model.state_dict().values():
                dist.broadcast(tensor, 0)
        self.step = 0
        self.elapsed = 0.0
        self.skipped = 0
        # Training losses since the last evaluation: their mean is the next record's
        # train_loss, so a checkpoint keeps them too. `pending` holds the steps' losses
        # still on the device (NaN: skipped), read by `_settle` at most once per
        # evaluation or checkpoint on CUDA, and after every step on the CPU, where
        # reading costs nothing.
        self.window: list[float] = []
        self.pending: list[torch.Tensor] = []
        self.last_loss: float | None = None
        self.metrics: list[dict[str, Any]] = []
        # True while evaluating: a stop then loses nothing a resume needs (the resumed
        # run evaluates that step again first), so the CLI's SIGTERM need not wait.
        self.evaluating = False
        # True from a step's first draw until its loss is settled: a KeyboardInterrupt
        # there finds the model, optimiser and random streams out of step with each
        # other, so nothing is saved and the last checkpoint (`checkpointed`) stands.
        self.stepping = False
        self.checkpointed: int | None = None

    def _settle(self) -> None:
        """Read the losses of the steps not looked at yet (one host sync): finite ones
        join the window, NaN ones were skipped steps."""
        if not self.pending:
            return
        values = torch.stack(self.pending).tolist()
        self.pending = []
        for value in values:
            if math.isfinite(value):
                self.window.append(value)
            else:
                self.skipped += 1
        self.last_loss = values[-1] if math.isfinite(values[-1]) else None

    def _streams(self, data: Any, rank: int, step: int) -> tuple[Episodes, torch.Generator]:
        """Rank `rank`'s episode stream and query-distortion generator. Rank 0's are the
        single-process run's; a rank that a resumed checkpoint did not have starts fresh
        ones at the resumed `step`."""
        seed = self.config.seed + rank * RANK_SEED_STRIDE + step
        cfg = self.config
        episodes = Episodes(data, cfg.batch_size, cfg.shots, seed=seed, least=cfg.batch_min)
        return episodes, torch.Generator().manual_seed(seed + 1)

    @classmethod
    def create(cls, config: TrainConfig, out: Path) -> Trainer:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = Model(config.model)
        if config.init is not None:
            start_from(model, Path(config.init))
        return cls(config, model, out)

    @classmethod
    def resume(
        cls,
        out: Path,
        steps: int | None,
        minutes: float | None,
        device: str | None = None,
        cuda_graph: str | None = None,
    ) -> Trainer:
        """Continue from `out/checkpoint.safetensors`; only the stopping rule, the
        device (a distributed run's processes) and `cuda_graph` may change. Without a
        new `steps` or `minutes` the run keeps its own, and so its learning-rate
        schedule, which spans the budget: a run of `--steps 1000` resumed with only
        `--minutes` would otherwise restart its cosine near the base rate.

        Temporary files a killed run left half-written (`atomic_path`'s `.NAME.*.tmp`)
        are removed: the files they were replacing are still whole.
        """
        path = out / "checkpoint.safetensors"
        if not path.exists():
            raise EbmmError(path, "no checkpoint to resume from")
        for name in ("checkpoint.safetensors", "model.safetensors", "metrics.jsonl", "loss.png"):
            for stale in out.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)
        model, optimizer, state = load_checkpoint(path)
        try:
            config = TrainConfig.from_json(state["train_config"])
        except (KeyError, ValueError, TypeError) as e:
            raise EbmmError(path, f"damaged training config ({e})") from None
        if steps is not None or minutes is not None:
            config = replace(config, steps=steps, minutes=minutes)
        if device is not None:
            config = replace(config, device=device)
        if cuda_graph is not None:
            config = replace(config, cuda_graph=cuda_graph)
        trainer = cls(config, model, out)
        trainer.meta_step.load_optimizer(optimizer)
        trainer.step, trainer.elapsed = int(state["step"]), float(state["elapsed"])
        trainer.checkpointed = trainer.step
        trainer.skipped = int(state["skipped"])
        trainer.window = [float(v) for v in state.get("window", [])]
        prefix = "" if trainer.rank == 0 else f"rank{trainer.rank}_"
        if f"{prefix}generator" in state:
            trainer.episodes.load_state(
                {
                    "random": _as_tuple(state[f"{prefix}episodes_random"]),
                    "generator": state[f"{prefix}episodes_generator"],
                }
            )
            trainer.generator.set_state(state[f"{prefix}generator"])
        else:  # more processes than the checkpointed run had
            trainer.episodes, trainer.generator = trainer._streams(
                trainer.episodes.dataset, trainer.rank, trainer.step
            )
        random.setstate(_as_tuple(state["python_random"]))
        torch.set_rng_state(state["torch_rng"])
        trainer.metrics = [m for m in read_metrics(out) if m["step"] <= trainer.step]
        return trainer

    def batch(self, n: int | None = None) -> Batch:
        """The next training episode of `n` patterns (default: the configured N)."""
        patterns, _ = self.episodes.sample(n)
        queries = self.model.distortion(patterns, self.generator)
        return Batch(patterns.to(self.device), queries.to(self.device))

    def _from_rank0(self, *values: float) -> list[float]:
        """Rank 0's `values` on every process: decisions that must agree (stop, the
        learning-rate clock, checkpoint) follow one clock."""
        if self.world == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, 0)
        return tensor.tolist()

    def evaluate(self) -> dict[str, Any]:
        """Held-out retrieval on the fixed held-out episodes, at each held-out N
        (see `evaluate_sets`)."""
        self.evaluating = True
        try:
            return evaluate_sets(self.model, self.heldout, weights(self.config))
        finally:
            self.evaluating = False

    def _catch_up(self) -> None:
        """A run stopped (Ctrl-C, SIGTERM) while evaluating, or just after, resumes at an
        evaluation step: record it first if it has no row yet, and start the next window
        empty, so that its metrics are the uninterrupted run's."""
        if self.step == 0 or self.step % self.config.eval_every:
            return
        if self.rank == 0 and not self._recorded():
            self._record(self.window)
            self._save_outputs()
        self.window = []

    def _recorded(self) -> bool:
        """Whether the current step has its row of metrics."""
        return bool(self.metrics) and self.metrics[-1]["step"] == self.step

    def run(self, on_progress: Callable[[dict[str, Any]], None] | None = None) -> Path:
        """Train until `steps` or `minutes` (whichever first); save the model, checkpoint,
        metrics and curve. On KeyboardInterrupt, save the checkpoint and the model (its
        metrics stay at the last evaluation) and re-raise; inside a step (`stepping`),
        save nothing, since its parts may be half updated, and re-raise.
        Distributed, every process calls it; rank 0 evaluates and writes."""
        cfg = self.config
        lead = self.rank == 0
        if lead:
            self.out.mkdir(parents=True, exist_ok=True)
        try:
            if self.checkpointed is None:  # resumable from the start, whenever stopped
                self.save_checkpoint()  # (before the clock starts: not a training second)
            start = time.monotonic() - self.elapsed
            last_checkpoint = time.monotonic()
            rate_clock, rate_steps = time.monotonic(), self.step
            self._catch_up()
            heldout = self.metrics[-1]["heldout_loss"] if self.metrics else None
            while True:
                done, self.elapsed = self._from_rank0(
                    self._done(time.monotonic() - start), time.monotonic() - start
                )
                if done:
                    break
                self._schedule_lr(self.elapsed)
                self.stepping = True
                n = self.episodes.draw_size()  # one N per step: its episodes go together
                batches = [self.batch(n) for _ in range(cfg.episodes_per_step)]
                self.pending.append(self.step_fn(batches, self.generator))
                self.step += 1
                if self.device.type != "cuda":
                    self._settle()
                self.stepping = False
                self.elapsed = time.monotonic() - start
                evaluated = self.step % cfg.eval_every == 0
                if evaluated:
                    self._settle()
                    if lead:
                        heldout = self._record(self.window)["heldout_loss"]
                        self._save_outputs()
                    self.window = []
                due = time.monotonic() - last_checkpoint > cfg.checkpoint_minutes * 60
                if self._from_rank0(due)[0]:
                    self.save_checkpoint()
                    last_checkpoint = time.monotonic()
                if on_progress is not None and lead:
                    now = time.monotonic()
                    rate = (self.step - rate_steps) / max(now - rate_clock, 1e-9)
                    on_progress(
                        {
                            "step": self.step,
                            "steps": cfg.steps,
                            "loss": self.last_loss,
                            "heldout_loss": heldout,
                            "steps_per_s": rate,
                            "elapsed": self.elapsed,
                            "minutes": cfg.minutes,
                            "evaluated": evaluated,
                        }
                    )
            self._settle()
            # the last step's evaluation, unless it just had one (a resumed run that was
            # stopped here, before it was recorded, comes back to it)
            if lead and (self.window or not self._recorded()):
                self._record(self.window)
                self.window = []
            if lead:
                self._save_outputs()
            self.save_checkpoint()
        except KeyboardInterrupt:
            if self.stepping:  # a torn step: saving it would resume a different run
                raise
            self.save_checkpoint(gather=False)  # the other processes may be gone already
            if lead:  # the model as it stands, usable by `ebmm write` (not evaluated)
                save_model(self.model, self.out / "model.safetensors", step=self.step)
            raise
        return self.out / "model.safetensors"

    def _schedule_lr(self, elapsed: float) -> None:
        """Cosine decay from the base rates to `lr_floor` of them over the budget."""
        cfg = self.config
        progress = 0.0
        if cfg.steps is not None:
            progress = self.step / cfg.steps
        if cfg.minutes:
            progress = max(progress, elapsed / (cfg.minutes * 60))
        scale = cfg.lr_floor + (1 - cfg.lr_floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1)))
        self.meta_step.scale_lr(scale)

    def _done(self, elapsed: float) -> bool:
        cfg = self.config
        if cfg.steps is not None and self.step >= cfg.steps:
            return True
        return cfg.minutes is not None and elapsed >= cfg.minutes * 60

    def _record(self, window: list[float]) -> dict[str, Any]:
        heldout = self.evaluate()
        record = {
            "step": self.step,
            "seconds": round(self.elapsed, 3),
            "train_loss": sum(window) / len(window) if window else None,
            "heldout_loss": heldout["loss"],
            "heldout_split": self.heldout_split,
            "skipped": self.skipped,
            **{f"heldout_{k}": v for k, v in heldout.items() if k != "loss"},
        }
        self.metrics.append(record)
        return record

    def _save_outputs(self) -> None:
        save_model(self.model, self.out / "model.safetensors", step=self.step)
        with atomic_path(self.out / "metrics.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(m) + "\n" for m in self.metrics))
        plot_curves(self.metrics, self.out / "loss.png")

    def save_checkpoint(self, gather: bool = True) -> None:
        """Model, optimiser, step and every random state, so a resumed run is identical.
        Distributed, every process must call it (with `gather`): rank 0 collects the
        others' episode streams and writes; without `gather` rank 0 writes its own only,
        and the others' streams restart fresh on resume."""
        self._settle()
        streams = [self._stream_state()]
        if self.world > 1 and gather:
            streams = [None] * self.world
            dist.all_gather_object(streams, self._stream_state())
        if self.rank != 0:
            return
        state = {
            "step": self.step,
            "elapsed": self.elapsed,
            "skipped": self.skipped,
            "window": self.window,
            "world_size": self.world,
            "train_config": self.config.to_json(),
            "python_random": random.getstate(),
            "torch_rng": torch.get_rng_state(),
        }
        for rank, stream in enumerate(streams):
            prefix = "" if rank == 0 else f"rank{rank}_"
            state.update({prefix + k: v for k, v in stream.items()})
        save_checkpoint(
            self.out / "checkpoint.safetensors", self.model, self.meta_step.optimizer, state
        )
        self.checkpointed = self.step

    def _stream_state(self) -> dict[str, Any]:
        episodes = self.episodes.state()
        return {
            "episodes_random": episodes["random"],
            "episodes_generator": episodes["generator"],
            "generator": self.generator.get_state(),
        }


def start_from(model: Model, path: Path) -> None:
    """Copy a trained model's weights into `model` (`ebmm train --init`): slow weights,
    θ̄ and the learned rules. Only the parameters must match, so a model trained at
    another N, distortion or loss can start a run (a curriculum's next stage), one
    trained at a single N included for a run over a range of N, and a kv model trained
    without the prior energy for a run with it.

    Raises:
        EbmmError: naming `path`, when its parameters are not this run's.
    """
    theirs = load_model(path).state_dict()
    ours = model.state_dict()
    # What a run adds to the model it starts from starts where a fresh run's does: κ
    # (`RuleConfig.sees_n`) for a run over a range of N from a model trained at one N,
    # at 0 (the same rates at every N); a prior energy (`--set prior`) for a kv model
    # trained without one, at its small initial weight.
    added = ("rules.rate_exponent", "energy.prior")
    theirs |= {k: v for k, v in ours.items() if k.startswith(added) and k not in theirs}
    match_tensors(
        path,
        theirs,
        ours,
        "its parameters",
        against="this run",
        hint="; --init needs the same --memory, --dynamic, --image-size, --write-steps, "
        "--read-steps, --set schedule and --read",
    )
    model.load_state_dict(theirs)


def _as_tuple(value: Any) -> Any:
    """JSON turns tuples into lists; random.setstate needs them back."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """A run folder's `metrics.jsonl`, one dict per recorded step (none before the first).

    The one reader of the file, for resuming and for anything that inspects a run."""
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metrics_parting(
    ours: list[dict[str, Any]], theirs: list[dict[str, Any]], rel_tol: float = 1e-5
) -> dict[str, Any] | None:
    """Where two runs' metrics part: the first row that differs (its step and each
    differing field with both values; `rows` if one run has more), or None if they agree.

    Wall-clock `seconds` are left out. Numbers agree within `rel_tol` (or 1e-7 absolute),
    everything else exactly: the same model file evaluated on the same episodes in two
    processes can differ in the last bits, since MKL's CPU reductions are not
    bit-reproducible from process to process (seen: held-out energies 3e-8 apart in about
    1 of 50 processes, the trained model identical to the bit). A resumed run's metrics
    that follow a wrong window or a wrong model part by far more."""

    def close(a: Any, b: Any) -> bool:
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(map(close, a, b))
        if isinstance(a, float) and isinstance(b, float):
            both_nan = math.isnan(a) and math.isnan(b)
            return both_nan or math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-7)
        return type(a) is type(b) and a == b

    for a, b in zip(ours, theirs, strict=False):
        fields = {
            k: [a.get(k), b.get(k)]
            for k in sorted(a.keys() | b.keys())
            if k != "seconds" and not close(a.get(k), b.get(k))
        }
        if fields:
            return {"step": a.get("step"), "fields": fields}
    if len(ours) != len(theirs):
        return {"rows": [len(ours), len(theirs)]}
    return None


def _datasets(config: TrainConfig) -> tuple[Any, Any, str]:
    """Training data, held-out data, and the held-out split's name."""
    name = config.model.dataset
    size = config.model.energy.shape[-1] if config.model.energy.kind != "rnn" else None
    pixels = dict(invert=config.model.invert_files, binarize=config.model.binarize)
    train = load_dataset(name, "train", config.data_root, size, **pixels)
    if isinstance(train, BinaryStrings):
        return train, train, "fresh random strings"
    split = "val" if name == "fc100" else "test"
    try:
        return train, load_dataset(name, split, config.data_root, size, **pixels), split
    except EbmmError:
        # No held-out split here (e.g. a plain folder or CIFAR-10 JPEG folders with only
        # train/): evaluate on other training episodes, and say so in the metrics.
        return train, train, "train (no held-out split found)"
