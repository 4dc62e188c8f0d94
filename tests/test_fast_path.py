"""The GPU fast path (`graphs.py`): steps that never wait for the device.

On the CPU (CI): a non-finite meta-step is skipped on the device and leaves parameters and
optimiser state exactly as they were; inference's finiteness checks, read once after the
write and once after the read, still name the first step that left the reals.

On CUDA (skipped without a GPU; `examples/gpu_check.sh` runs them): a replayed step gives
the parameters of an eager one, replayed training follows eager training, and a replayed
write and read give eager's memory and retrieval.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch

from ebmm_cli.errors import EbmmError
from ebmm_cli.evaluation import Batch, evaluate_episodes
from ebmm_cli.graphs import InferenceGraphs, replayed_step
from ebmm_cli.memory import RuleConfig, Rules, raise_first_non_finite, read, write
from ebmm_cli.meta import MetaStep
from ebmm_cli.model import Model, retrieve, write_memory
from ebmm_cli.runconfig import TrainConfig, model_config, train_config
from tests.test_memory import Tiny

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


class _Setup(NamedTuple):
    model: Model
    meta_step: MetaStep
    step_fn: Callable[[list[Batch], torch.Generator], torch.Tensor]
    generator: torch.Generator


def _setup(memory: str, first_order: bool, device: str, graph: str = "off") -> _Setup:
    """A small model of `memory` and its meta-step, replayed where `graph` asks for it,
    as `Trainer` sets them up (without a dataset)."""
    if memory == "rnn":
        model = model_config(dataset="binary", dynamic=16, distortion="eraseblock:64",
                             rules=RuleConfig(write_lr=1.0, read_lr=5.0))  # fmt: skip
    elif memory == "kv":  # the closed-form write (its λmax by matmuls) and a re-keyed redraw
        model = model_config(dataset="omniglot", memory=memory, image_size=16, dynamic=2,
                             rules=RuleConfig(write_steps=3, read="redraw", rekeys=1,
                                              alpha=0.0, write_lr=1.0))  # fmt: skip
    else:
        model = model_config(dataset="omniglot", memory=memory, image_size=16, dynamic=2,
                             rules=RuleConfig(write_steps=3, read_steps=3))  # fmt: skip
    config = TrainConfig(model, batch_size=8, device=device, first_order=first_order)
    torch.manual_seed(0)
    net = Model(model).to(device)
    meta = MetaStep(net, config, torch.device(device), world=1)
    step_fn = replayed_step(meta) if net.use_cuda_graphs(graph) else meta
    return _Setup(net, meta, step_fn, torch.Generator().manual_seed(0))


def _episode(setup: _Setup, seed: int) -> Batch:
    """A random episode of the model's pattern shape."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.rand((8, *setup.model.config.energy.shape), generator=generator).round()
    queries = setup.model.distortion(patterns, generator)
    device = next(setup.model.parameters()).device
    return Batch(patterns.to(device), queries.to(device))


def _snapshot(step: MetaStep) -> dict[str, torch.Tensor]:
    out = {f"param.{n}": p.detach().clone() for n, p in step.model.named_parameters()}
    for i, state in enumerate(step.optimizer.state.values()):
        out.update({f"state.{i}.{k}": v.clone() for k, v in state.items()})
    return out


@pytest.mark.parametrize("first_order", [False, True])
def test_a_non_finite_step_changes_nothing(first_order: bool, tmp_path: Path) -> None:
    setup = _setup("fc", first_order, "cpu")
    step, generator = setup.meta_step, setup.generator
    twin = copy.deepcopy(step)  # never sees the poisoned steps
    poisoned = _episode(setup, 0)
    poisoned.queries[0, 0] = float("nan")
    # The first step poisoned: AdamW's state, made by that step, must read as fresh.
    before = _snapshot(step)
    assert step([poisoned], generator).isnan()
    after = _snapshot(step)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all((v == 0).all() for k, v in after.items() if k.startswith("state."))
    # A good step then is the twin's first step, exactly.
    good = _episode(setup, 1)
    assert torch.equal(step([good], generator), twin([good], generator))
    ours, theirs = _snapshot(step), _snapshot(twin)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # Once AdamW has moments, a poisoned step keeps them and the parameters too.
    assert step([poisoned], generator).isnan()
    again = _snapshot(step)
    assert all(torch.equal(ours[k], again[k]) for k in ours)


def test_an_infinite_gradient_with_a_finite_loss_is_skipped() -> None:
    setup = _setup("fc", False, "cpu")
    step = setup.meta_step
    weight = next(step.model.energy.parameters())
    weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    before = _snapshot(step)
    assert step([_episode(setup, 0)], setup.generator).isnan()
    after = _snapshot(step)
    assert all(torch.equal(before[k], after[k]) for k in before)


class _Root(Tiny):
    """Tiny plus Σ √(x − 0.3): finite for x above 0.3, NaN below, so a large read step
    from queries near 1 leaves the reals at the second step, not the first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + (x - 0.3).sqrt().sum(1)


def test_inference_checks_once_and_names_the_first_bad_step() -> None:
    net = _Root()
    rules = Rules(RuleConfig(write_steps=2, read_steps=3, read_lr=50.0, momentum=0.01), 1)
    rules = rules.double()
    x = 0.9 + 0.1 * torch.rand(4, 5, dtype=torch.float64)
    memory = write(net, rules, x)
    with pytest.raises(FloatingPointError, match=r"^read step 2 of 3: the energy gradient"):
        read(net, rules, memory, x)
    flags = torch.tensor([[True, True], [True, False], [False, False]])
    with pytest.raises(FloatingPointError, match=r"^write step 2 of 3: the energy gradient"):
        raise_first_non_finite(flags, "write")
    raise_first_non_finite(torch.ones(0, 2, dtype=torch.bool), "write")  # T = 0: nothing


def test_cuda_graph_option_is_checked_before_any_data(tmp_path: Path) -> None:
    with pytest.raises(EbmmError, match="unknown value 'sometimes'") as bad:
        train_config(dataset="binary", data_root=tmp_path / "none", steps=1, cuda_graph="sometimes")
    assert bad.value.subject == "--cuda-graph"
    if not CUDA:
        with pytest.raises(EbmmError, match="on needs a CUDA device") as cpu:
            train_config(dataset="binary", device="cpu", steps=1, cuda_graph="on")
        assert cpu.value.subject == "--cuda-graph"


def test_cpu_runs_never_build_graphs() -> None:
    setup = _setup("fc", False, "cpu", "auto")
    assert setup.model.graphs is None and setup.step_fn is setup.meta_step


# -- CUDA only ---------------------------------------------------------------------------


def _params(setup: _Setup) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in setup.model.named_parameters()}


@pytest.mark.parametrize("memory", ["fc", "rnn"])
def test_a_first_order_step_never_takes_the_replayed_write(memory: str) -> None:
    """On CUDA the model replays its write (`InferenceGraphs`), and that write returns a
    memory cut from θ̄. The first-order meta-step must write eagerly all the same, or
    θ̄ and the write rates learn nothing from the read's loss (found on the first lent
    GPU: first-order graphed steps drifted from eager ones). Here, without a GPU, the
    model is given the very function that the write's graph captures, called directly:
    the step must be exactly the eager step, and the write rates must get a gradient."""
    replaying, eager = _setup(memory, True, "cpu"), _setup(memory, True, "cpu")
    replaying.model.graphs = SimpleNamespace(write=InferenceGraphs(replaying.model)._write_fn)
    for seed in range(3):
        a = replaying.meta_step([_episode(replaying, seed)], replaying.generator)
        b = eager.meta_step([_episode(eager, seed)], eager.generator)
        assert torch.equal(a, b)
    assert replaying.model.rules.write_rate.grad is not None
    ours, theirs = _params(replaying), _params(eager)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


@needs_cuda
@pytest.mark.parametrize("memory", ["conv", "fc", "rnn", "kv"])
@pytest.mark.parametrize("first_order", [False, True])
def test_a_replayed_step_is_an_eager_step(memory: str, first_order: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    graphed = _setup(memory, first_order, "cuda", "on")
    eager = _setup(memory, first_order, "cuda", "off")
    assert graphed.step_fn is not graphed.meta_step
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a capture that fell back would warn
        for seed in range(5):  # 2 warm-up steps, the capture, 2 replays
            batches = [_episode(graphed, seed)]
            a = graphed.step_fn(batches, graphed.generator)
            b = eager.step_fn(batches, eager.generator)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    ours, theirs = _params(graphed), _params(eager)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-3, atol=1e-5, msg=name)


@needs_cuda
def test_a_replayed_step_skips_a_non_finite_episode() -> None:
    setup = _setup("conv", False, "cuda", "on")
    for seed in range(3):  # warm-up twice, capture
        setup.step_fn([_episode(setup, seed)], setup.generator)
    before = _snapshot(setup.meta_step)
    poisoned = _episode(setup, 3)
    poisoned.queries[0] = float("nan")
    assert setup.step_fn([poisoned], setup.generator).isnan()
    after = _snapshot(setup.meta_step)
    assert all(torch.equal(before[k], after[k]) for k in before)


@needs_cuda
@pytest.mark.parametrize("episodes", [1, 4])
def test_replayed_training_follows_eager_training(episodes: int) -> None:
    losses = {}
    for graph in ("on", "off"):
        setup = _setup("conv", False, "cuda", graph)
        curve = []
        for seed in range(50):
            batches = [_episode(setup, 100 * seed + e) for e in range(episodes)]
            curve.append(setup.step_fn(batches, setup.generator))
        held = [_episode(setup, 10_000 + i) for i in range(4)]
        losses[graph] = (torch.stack(curve).cpu(), evaluate_episodes(setup.model, held)["loss"])
    (curve_on, held_on), (curve_off, held_off) = losses["on"], losses["off"]
    assert torch.isfinite(curve_on).all()
    assert abs(held_on - held_off) <= 0.05 * held_off + 1e-4, (held_on, held_off)
    assert abs(curve_on[-10:].mean() - curve_off[-10:].mean()) <= 0.05 * curve_off[-10:].mean()


@needs_cuda
@pytest.mark.parametrize("memory", ["conv", "rnn", "kv"])
def test_replayed_inference_is_eager_inference(memory: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    setup = _setup(memory, False, "cuda", "on")
    model = setup.model.eval()
    assert model.graphs is not None
    for seed in range(4):  # two warm-up calls, the capture, a replay
        batch = _episode(setup, seed)
        graphed = write_memory(model, batch.patterns)
        got = retrieve(model, graphed, batch.queries)
        graphs, model.graphs = model.graphs, None
        eager = write_memory(model, batch.patterns).detach()
        want = retrieve(model, eager, batch.queries)
        model.graphs = graphs
        for name in eager.params:
            torch.testing.assert_close(graphed.params[name], eager.params[name], msg=name)
        torch.testing.assert_close(got[-1], want[-1])
    broken = write_memory(model, batch.patterns)
    broken.params = {k: torch.full_like(v, float("nan")) for k, v in broken.params.items()}
    with pytest.raises(FloatingPointError, match=r"^read step 1 of"):
        retrieve(model, broken, batch.queries)


@needs_cuda
def test_a_capture_that_fails_warns_once_and_runs_eagerly() -> None:
    from ebmm_cli.graphs import Captured

    calls = []

    def syncs(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x * float(x.sum())  # a host sync: cannot be captured

    f = Captured(syncs, "a function that syncs")
    x = torch.ones(3, device="cuda")
    with pytest.warns(RuntimeWarning, match="capture of a function that syncs failed"):
        for _ in range(3):
            assert torch.equal(f(x), x * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(f(x), x * 3)
    assert f.failed is not None
