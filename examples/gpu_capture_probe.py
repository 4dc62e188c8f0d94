"""Which part of the meta-step a CUDA graph cannot capture (for a lent GPU).

On an H200 with torch 2.11 (2026-11-28) every second-order meta-step's capture failed
inside `backward()` ("operation not permitted when stream is capturing") and ebmm ran the
step eagerly, while the read's graph replayed fine. This probe captures the step's parts
one by one, each in a fresh process (a failed capture can spoil the CUDA context), and
prints one line per part: captured, with the replay's and a later eager call's value (the
same for every part but the two steps, whose AdamW moves the parameters in between), or
the first error.

    python examples/gpu_capture_probe.py            # every part, fc and rnn
    python examples/gpu_capture_probe.py fc write-backward   # one part
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import ebmm_cli  # noqa: F401  first: OpenMP's threads sleep, not spin (ebmm_cli's docstring)

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ebmm_cli.memory import energy, initial_memory, read_flags, write_flags
from tests.test_fast_path import _episode, _setup


def _parts(memory: str, device: str = "cuda") -> dict[str, Callable[[], torch.Tensor]]:
    """Each part: a function of fixed inputs returning a tensor (after its backward,
    if any, the parameters' gradient norm)."""
    setup = _setup(memory, False, device)
    net, rules = setup.model.energy, setup.model.rules
    batch = _episode(setup, 0)
    params = list(setup.model.parameters())

    def grad_norm() -> torch.Tensor:
        return torch.stack([p.grad.norm() for p in params if p.grad is not None]).sum()

    def backward(loss: torch.Tensor) -> torch.Tensor:
        for p in params:
            p.grad = None
        loss.backward()
        return grad_norm()

    def energy_backward() -> torch.Tensor:
        return backward(energy(net, initial_memory(net), batch.patterns).sum())

    def input_grad_backward() -> torch.Tensor:  # ∇x E with its graph, then backward
        x = batch.patterns.detach().requires_grad_(True)
        (gx,) = torch.autograd.grad(energy(net, initial_memory(net), x).sum(), x, create_graph=True)
        return backward(gx.pow(2).sum())

    def param_grad_backward() -> torch.Tensor:  # ∇θ E with its graph, then backward
        theta = initial_memory(net)
        e = energy(net, theta, batch.patterns).sum()
        grads = torch.autograd.grad(e, list(theta.values()), create_graph=True)
        return backward(sum(g.pow(2).sum() for g in grads))

    def read_backward() -> torch.Tensor:  # the first-order step's part
        iterates, _ = read_flags(net, rules, initial_memory(net), batch.queries, True)
        return backward(sum((x - batch.patterns).pow(2).mean() for x in iterates))

    def write_forward() -> torch.Tensor:
        theta, _ = write_flags(net, rules, batch.patterns, create_graph=True)
        return sum(v.sum() for v in theta.values())

    def write_backward() -> torch.Tensor:  # the second-order step's extra part
        theta, _ = write_flags(net, rules, batch.patterns, create_graph=True)
        return backward(sum(v.pow(2).sum() for v in theta.values()))

    def step(first_order: bool) -> Callable[[], torch.Tensor]:
        own = _setup(memory, first_order, device)
        episode = _episode(own, 0)
        return lambda: own.meta_step.episodes(episode.patterns[None], episode.queries[None], None)

    return {
        "energy-backward": energy_backward,
        "input-grad-backward": input_grad_backward,
        "param-grad-backward": param_grad_backward,
        "read-backward": read_backward,
        "write-forward": write_forward,
        "write-backward": write_backward,
        "step-first-order": step(True),
        "step-second-order": step(False),
    }


def _probe(memory: str, part: str) -> str:
    """Two warm-ups and a capture on one side stream, a replay, eager once more."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    fn = _parts(memory)[part]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=side):
            out = fn()
    except Exception as e:  # the first error is the cause; later ones say "previous error"
        cause = e.__context__ or e
        return f"FAILED  {type(cause).__name__}: {str(cause).splitlines()[0]}"
    graph.replay()
    replayed = out.clone()
    eager = fn()
    torch.cuda.synchronize()
    return f"ok      replay {replayed.item():.6g}  eager {eager.item():.6g}"


def main() -> None:
    if len(sys.argv) == 3:
        print(f"{sys.argv[1]:4} {sys.argv[2]:20} {_probe(sys.argv[1], sys.argv[2])}", flush=True)
        return
    print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
    for memory in ("fc", "rnn"):
        for part in _PARTS:
            run = [sys.executable, __file__, memory, part]
            done = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False)
            lines = [line for line in done.stdout.splitlines() if line.strip()]
            print(lines[-1] if lines else f"{memory:4} {part:20} CRASHED {done.stderr[-200:]!r}")


_PARTS = (
    "energy-backward",
    "input-grad-backward",
    "param-grad-backward",
    "read-backward",
    "write-forward",
    "write-backward",
    "step-first-order",
    "step-second-order",
)

if __name__ == "__main__":
    main()
