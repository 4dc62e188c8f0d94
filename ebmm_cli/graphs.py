"""CUDA graphs: a step captured once per shape and replayed, instead of ~40,000 launches.

On a GPU an EBMM step is thousands of tiny kernels (T write steps with a double
backward, K read steps, the loss over all iterates, AdamW), each launched from Python:
the GPU waits for the launcher most of the time. PyTorch's "whole-network capture"
records them once into a `torch.cuda.CUDAGraph` and replays the recording with one
launch. The functions captured here (`meta.MetaStep.episodes`, `memory.write_flags`,
`memory.read_flags`) never wait for the device, which capture requires; their
finiteness checks are tensors that the caller reads after the replay.

A graph holds the addresses of its inputs, outputs and of every parameter it read: the
inputs are copied into static tensors before each replay, the outputs are cloned after
it, and the model must stay where it was when captured (no `.to()`, no
`load_state_dict` replacing tensors; in-place updates such as the optimiser's are fine).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ebmm_cli.choices import CUDA_GRAPHS
from ebmm_cli.errors import EbmmError
from ebmm_cli.memory import Params, read_flags, write_flags


def wanted(mode: str, device: torch.device) -> bool:
    """Whether `mode` (`choices.CUDA_GRAPHS`) asks for graphs on `device`; an unknown
    mode, or `on` off CUDA, is an EbmmError naming `--cuda-graph`."""
    if mode not in CUDA_GRAPHS:
        allowed = ", ".join(CUDA_GRAPHS)
        raise EbmmError("--cuda-graph", f"unknown value {mode!r}; use one of {allowed}")
    if mode == "on" and device.type != "cuda":
        raise EbmmError("--cuda-graph", f"on needs a CUDA device, not {device.type}")
    return mode != "off" and device.type == "cuda"


def _clone(value: Any) -> Any:
    """A copy of a graph's outputs (tensors inside dicts, lists and tuples), which the
    next replay would overwrite."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_clone(v) for v in value)
    return value


# Warm-ups and captures all run on one side stream per device, as PyTorch advises:
# autograd remembers the stream on which a parameter's gradient accumulator was made,
# and one made on a warm-up's own stream lies outside the capture. (Not sufficient on an
# H200 with torch 2.11, 2026-11-28: the second-order meta-step's backward still could not
# be captured there; README, "On a GPU: CUDA graphs".)
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The one stream on which every graph of `device` warms up and is captured."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


@contextlib.contextmanager
def _stale_streams_redirected() -> Iterator[None]:
    """Where PyTorch offers it (2.14 does, 2.11 does not), let autograd move a gradient
    accumulator made on another stream (eager work before the graphs: an evaluation, a
    step launched without graphs) onto the capturing stream instead of failing the
    capture; the process-wide setting is restored afterwards."""
    setter = getattr(torch.autograd.graph, "set_override_stale_capture_stream", None)
    getter = getattr(torch._C, "_override_stale_capture_stream", None)
    if setter is None or getter is None:
        yield
        return
    before = getter()
    setter(True)
    try:
        yield
    finally:
        setter(before)


@dataclass
class _Entry:
    """One input shape: its eager calls so far, then its graph, whose static inputs take
    each call's values and whose outputs each replay overwrites."""

    calls: int = 0
    graph: torch.cuda.CUDAGraph | None = None
    inputs: tuple[torch.Tensor, ...] = ()
    outputs: Any = None


class Captured:
    """`fn(*tensors)`, replayed from a CUDA graph per input shape.

    The first `warmup` calls of a shape run eagerly on a side stream (cuDNN chooses its
    algorithms, autograd and the optimiser make their state), the next one is captured
    and replayed, and every later one copies its inputs into the graph's static tensors
    and replays. Every call does exactly what `fn` would: warm-up calls are real calls.
    If capture fails (an operation that cannot be captured, a driver without support),
    one warning names the cause and `fn` runs eagerly from then on: never a crash
    because of the fast path.

    Example:
        >>> step = Captured(lambda p, q: meta_step.episodes(p, q, None), "the meta-step")
        >>> loss = step(patterns, queries)     # what meta_step.episodes(...) returns
    """

    def __init__(self, fn: Callable[..., Any], name: str, warmup: int = 2) -> None:
        self.fn = fn
        self.name = name
        self.warmup = warmup
        self.failed: str | None = None
        # One graph per input shape, each with its own memory pool: graphs sharing a
        # pool are safe only when replayed in the order they were captured.
        self.entries: dict[tuple, _Entry] = {}

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if self.failed is not None:
            return self.fn(*inputs)
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        entry = self.entries.setdefault(key, _Entry())
        if entry.graph is not None:
            for static, value in zip(entry.inputs, inputs, strict=True):
                static.copy_(value)
            entry.graph.replay()
            return _clone(entry.outputs)
        if entry.calls < self.warmup:
            entry.calls += 1
            return self._on_side_stream(inputs)
        return self._capture(entry, inputs)

    def _on_side_stream(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        side = _side_stream(inputs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, entry: _Entry, inputs: tuple[torch.Tensor, ...]) -> Any:
        statics = tuple(t.clone() for t in inputs)
        graph = torch.cuda.CUDAGraph()
        try:
            with (
                _stale_streams_redirected(),
                torch.cuda.graph(graph, stream=_side_stream(inputs[0].device)),
            ):
                outputs = self.fn(*statics)
        except Exception as e:  # any failure means: run eagerly
            self.failed = f"{type(e).__name__}: {e}".splitlines()[0]
            self.entries.clear()
            warnings.warn(
                f"CUDA graph capture of {self.name} failed ({self.failed}); running it "
                "without graphs",
                RuntimeWarning,
                stacklevel=3,
            )
            torch.cuda.synchronize()
            return self.fn(*inputs)
        entry.graph, entry.inputs, entry.outputs = graph, statics, outputs
        graph.replay()
        return _clone(outputs)


class InferenceGraphs:
    """The model's write and read as `Captured` functions (per shape, and per read step
    count), for `model.write_memory` and `model.retrieve` on CUDA: a 64-image write and
    read replay in a few launches instead of thousands."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._write = Captured(self._write_fn, "the write")
        self._reads: dict[int | None, Captured] = {}

    def _write_fn(self, patterns: torch.Tensor) -> tuple[Params, torch.Tensor]:
        theta, finite = write_flags(self.model.energy, self.model.rules, patterns)
        return {k: v.detach() for k, v in theta.items()}, finite

    def write(self, patterns: torch.Tensor) -> tuple[Params, torch.Tensor]:
        """θ(T) of `patterns`, and the write's (T, 2) finiteness flags."""
        return self._write(patterns)

    def read(
        self, memory: Params, queries: torch.Tensor, steps: int | None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The read's iterates from `memory`, and its (K, 1) finiteness flags."""
        names = sorted(memory)
        if steps not in self._reads:

            def fn(x: torch.Tensor, *values: torch.Tensor) -> Any:
                theta = dict(zip(names, values, strict=True))
                return read_flags(self.model.energy, self.model.rules, theta, x, steps=steps)

            self._reads[steps] = Captured(fn, "the read")
        return self._reads[steps](queries, *(memory[n] for n in names))


def replayed_step(meta_step: Any) -> Callable[[list[Any], torch.Generator], torch.Tensor]:
    """`meta_step` (a `meta.MetaStep` of the gradient read) replayed from a CUDA graph per
    episode shape: called as the step is, with a list of `Batch`es (the generator is
    unused: nothing in the gradient read draws random numbers)."""
    captured = Captured(lambda p, q: meta_step.episodes(p, q, None), "the meta-step")

    def step(batches: list[Any], generator: torch.Generator) -> torch.Tensor:
        patterns = torch.stack([b.patterns for b in batches])
        return captured(patterns, torch.stack([b.queries for b in batches]))

    return step
