"""The algorithm against finite differences and its defining properties."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ebmm_cli.data import Episodes, load_dataset
from ebmm_cli.energy import EnergyConfig, build_energy, memory_layers
from ebmm_cli.memory import (
    RuleConfig,
    Rules,
    energy,
    energy_grad,
    initial_memory,
    read,
    read_episodes,
    write,
    write_episodes,
)


class Tiny(nn.Module):
    """A small smooth energy with one written layer, in float64 for finite differences."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.memory = nn.Linear(5, 3)
        self.static = nn.Linear(5, 4)
        self.out = nn.Linear(7, 1)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(torch.cat([self.memory(x), self.static(x)], 1))
        return self.out(h).squeeze(1) + 0.5 * (x**2).sum(1)


def _rules(**kw) -> Rules:
    config = RuleConfig(
        **{
            "write_steps": 2,
            "read_steps": 3,
            "write_lr": 0.3,
            "alpha": 0.7,
            "beta": 0.2,
            "read_lr": 0.2,
            "momentum": 0.3,
            **kw,
        }
    )
    return Rules(config, layers=1).double()


def _grad_norm(net: nn.Module, theta: dict, x: torch.Tensor) -> torch.Tensor:
    """mean_i ||∇x E(x_i; θ)||², ∇x taken at fixed θ."""
    xs = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(energy(net, theta, xs).sum(), xs, create_graph=True)
    return g.pow(2).sum(1).mean()


def _fd_grad(f, theta: dict, name: str, eps: float = 1e-6) -> torch.Tensor:
    """Central finite differences of a scalar f(θ) in θ[name]."""
    base = theta[name].detach()
    out = torch.zeros_like(base)
    for i in range(base.numel()):
        for sign in (1, -1):
            t = dict(theta)
            p = base.clone().view(-1)
            p[i] += sign * eps
            t[name] = p.view_as(base)
            out.view(-1)[i] += sign * float(f(t).detach()) / (2 * eps)
    return out


def test_write_follows_its_equation_step_by_step() -> None:
    """θ(t+1) = θ(t) − η_E ∇θ mean E − η_G α ∇θ mean ||∇x E||² − η_B β 2 (θ − θ̄), with the
    θ-gradients checked by finite differences (so ∇x E is the partial at fixed θ)."""
    net, rules = Tiny(), _rules()
    x = torch.rand(4, 5, dtype=torch.float64)
    rates, alphas, betas = rules.write_schedule()
    theta_bar = {k: v.detach() for k, v in initial_memory(net).items()}
    theta = dict(theta_bar)
    for t in range(2):
        new = {}
        for n in theta:
            g_e = _fd_grad(lambda th: energy(net, th, x).mean(), theta, n)
            g_g = _fd_grad(lambda th: _grad_norm(net, th, x), theta, n)
            r_e, r_g, r_b = rates[t, 0].detach()
            new[n] = (
                theta[n]
                - r_e * g_e
                - r_g * alphas[t].detach() * g_g
                - r_b * betas[t].detach() * 2 * (theta[n] - theta_bar[n])
            )
        theta = new
    written = write(net, rules, x)
    for n in theta:
        assert torch.allclose(written[n].detach(), theta[n], atol=1e-7), n


def test_read_follows_projected_nesterov_descent() -> None:
    net, rules = Tiny(), _rules()
    theta = initial_memory(net)
    q = 0.3 + 0.4 * torch.rand(3, 5, dtype=torch.float64)
    gammas, psis = (v.detach() for v in rules.read_schedule())
    x, v, expected = q, torch.zeros_like(q), []
    for k in range(3):
        look = (x + psis[k] * v).clamp(0, 1)
        g = torch.stack([_fd_input_grad(net, theta, look[i]) for i in range(3)])
        v = psis[k] * v - gammas[k] * g
        x = (x + v).clamp(0, 1)
        expected.append(x)
    got = read(net, rules, theta, q)
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-7)
    assert (gammas[1:] <= gammas[:-1]).all() and (psis[1:] <= psis[:-1]).all()


def _fd_input_grad(net: nn.Module, theta: dict, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    out = torch.zeros_like(x)
    for i in range(x.numel()):
        for sign in (1, -1):
            y = x.clone()
            y[i] += sign * eps
            out[i] += sign * float(energy(net, theta, y[None])[0].detach()) / (2 * eps)
    return out


@pytest.mark.parametrize("second_order", [True, False])
def test_meta_gradient_through_write_and_read_matches_finite_differences(second_order) -> None:
    """d/dθ̄ of the read loss summed over iterates: autograd (second order) against
    central differences of the whole write-then-read computation."""
    net, rules = Tiny(), _rules()
    x = 0.3 + 0.4 * torch.rand(4, 5, dtype=torch.float64)
    q = (x + 0.05 * torch.randn(4, 5, dtype=torch.float64)).clamp(0.2, 0.8)

    def loss(bias: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            net.memory.bias.copy_(bias)
        memory = write(net, rules, x, create_graph=second_order)
        return sum((it - x).pow(2).sum() for it in read(net, rules, memory, q, create_graph=True))

    bias = net.memory.bias.detach().clone()
    net.zero_grad()
    loss(bias).backward()
    autograd = net.memory.bias.grad.clone()
    eps = 1e-6
    numeric = torch.zeros_like(bias)
    for i in range(bias.numel()):
        up, down = bias.clone(), bias.clone()
        up[i] += eps
        down[i] -= eps
        numeric[i] = (float(loss(up).detach()) - float(loss(down).detach())) / (2 * eps)
    if second_order:
        assert torch.allclose(autograd, numeric, rtol=1e-5, atol=1e-8)
    else:  # first order drops the write's own second derivatives: close, not equal
        assert not torch.allclose(autograd, numeric, rtol=1e-5, atol=1e-8)
        assert torch.nn.functional.cosine_similarity(autograd, numeric, dim=0) > 0.5


def test_energy_grad_matches_finite_differences() -> None:
    net = Tiny()
    theta = initial_memory(net)
    x = torch.rand(2, 5, dtype=torch.float64)
    _, g = energy_grad(net, theta, x, create_graph=False)
    for i in range(2):
        assert torch.allclose(g[i], _fd_input_grad(net, theta, x[i]), atol=1e-7)


@pytest.fixture(scope="module")
def omniglot_batch(data_root: Path) -> torch.Tensor:
    chars = load_dataset("omniglot", "train", data_root, 28)
    return Episodes(chars, 10, seed=0).sample()[0]


def test_writing_lowers_the_energy_of_written_patterns_more(omniglot_batch) -> None:
    torch.manual_seed(0)
    net = build_energy(EnergyConfig("conv", (1, 28, 28)))
    rules = Rules(RuleConfig.report("conv"), layers=2)
    written, other = omniglot_batch[:5], omniglot_batch[5:]
    theta_bar = initial_memory(net)
    theta = write(net, rules, written)
    with torch.no_grad():
        drop_written = energy(net, theta, written) - energy(net, theta_bar, written)
        drop_other = energy(net, theta, other) - energy(net, theta_bar, other)
    assert drop_written.mean() < 0
    assert drop_written.mean() < drop_other.mean()


def test_read_lowers_the_energy_along_its_iterates(omniglot_batch) -> None:
    torch.manual_seed(0)
    net = build_energy(EnergyConfig("conv", (1, 28, 28)))
    rules = Rules(RuleConfig(read_steps=6, read_lr=0.02, momentum=1e-6, read_decay=0.9), 2)
    theta = write(net, rules, omniglot_batch[:5])
    q = (omniglot_batch[:5] * 0.8 + 0.1).detach()
    iterates = [q, *read(net, rules, theta, q)]
    with torch.no_grad():
        energies = torch.stack([energy(net, theta, x) for x in iterates])  # (K+1, B)
    assert (energies[1:] <= energies[:-1] + 1e-6).all()
    assert (energies[-1] < energies[0]).all()


def test_fixed_schedule_is_the_reports() -> None:
    rules = Rules(RuleConfig.report("conv"), layers=2)
    rates, alphas, betas = rules.write_schedule()
    assert torch.allclose(rates, torch.full_like(rates, 0.05))
    assert torch.allclose(alphas, 0.5 * 0.95 ** torch.arange(5.0)) and (betas == 0).all()
    gammas, psis = rules.read_schedule()
    assert gammas.tolist() == [500.0, 250.0, 125.0, 62.5, 31.25] and (psis == 0).all()
    assert list(rules.parameters()) == []
    assert Rules(RuleConfig.report("fc"), layers=1).write_schedule()[0].max() == 0.5


def test_write_and_read_stop_at_the_first_non_finite_step() -> None:
    net, x = Tiny(), torch.rand(4, 5, dtype=torch.float64)
    rules = _rules()
    with torch.no_grad():
        rules.write_rate.fill_(float("inf"))  # step 1 sends θ to infinity: step 2 is NaN
    with pytest.raises(FloatingPointError, match="write step 2 of 2: the energy holds NaN"):
        write(net, rules, x)
    # Meta-training builds the graph and checks its loss instead: no exception there.
    theta = write(net, rules, x, create_graph=True)
    assert not torch.isfinite(theta["memory.weight"]).all()
    broken = {k: torch.full_like(v, float("nan")) for k, v in initial_memory(net).items()}
    with pytest.raises(FloatingPointError, match="read step 1 of 3: the energy gradient"):
        read(net, _rules(), broken, x)


def _plain_write(net: nn.Module, rules: Rules, patterns: torch.Tensor, create_graph: bool) -> dict:
    """The write as equation (4) reads, with no shortcut: the whole network on a fresh
    leaf every step, and ∇x E, ∇θ E and ∇θ ||∇x E||² from three autograd calls."""
    theta_bar = initial_memory(net)
    theta = dict(theta_bar)
    rates, alphas, betas = rules.write_schedule()
    for t in range(rates.shape[0]):
        x = patterns.detach().requires_grad_(True)
        e = energy(net, theta, x)
        (gx,) = torch.autograd.grad(e.sum(), x, create_graph=True)
        values = list(theta.values())
        g_e = torch.autograd.grad(e.mean(), values, create_graph=create_graph, retain_graph=True)
        g_n = torch.autograd.grad(
            gx.pow(2).flatten(1).sum(1).mean(), values, create_graph=create_graph
        )
        layer = {n: i for i, names in enumerate(memory_layers(net).values()) for n in names}
        theta = {
            n: theta[n]
            - rates[t, layer[n], 0] * ge
            - rates[t, layer[n], 1] * alphas[t] * gn
            - rates[t, layer[n], 2] * betas[t] * 2 * (theta[n] - theta_bar[n])
            for (n, ge, gn) in zip(theta, g_e, g_n, strict=True)
        }
    return theta


@pytest.mark.parametrize("kind", ["conv", "fc", "rnn"])
@pytest.mark.parametrize("second_order", [True, False])
def test_the_fast_write_gives_the_plain_writes_memory_and_meta_gradients(
    kind, second_order
) -> None:
    """`write` takes ∇x E and ∇θ E from one backward pass; the memory it writes and the
    meta-gradients through it must be the plain write's."""
    torch.manual_seed(0)
    shape = (16,) if kind == "rnn" else (1, 16, 16)
    net = build_energy(EnergyConfig(kind, shape, 2)).double()
    config = RuleConfig(write_steps=2, read_steps=2, write_lr=0.3, alpha=0.7, beta=0.2)
    rules = Rules(config, layers=len(memory_layers(net))).double()
    with torch.no_grad():  # distinct rates per step, layer and term
        rules.write_rate.add_(torch.rand_like(rules.write_rate))
    patterns = torch.rand(3, *shape, dtype=torch.float64)
    queries = (patterns + 0.1 * torch.randn_like(patterns)).clamp(0, 1)
    results = []
    for writer in (write, _plain_write):
        theta = writer(net, rules, patterns, create_graph=second_order)
        loss = sum((x - patterns).pow(2).sum() for x in read(net, rules, theta, queries, True))
        params = [p for p in net.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        results.append((theta, grads))
    (ours, our_grads), (plain, plain_grads) = results
    for n in plain:
        assert torch.allclose(ours[n], plain[n], rtol=1e-9, atol=1e-12), n
    for a, b in zip(our_grads, plain_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("kind", ["conv", "fc", "rnn"])
@pytest.mark.parametrize("second_order", [True, False])
def test_episodes_written_together_equal_episodes_written_one_by_one(kind, second_order) -> None:
    """`write_episodes`/`read_episodes` (torch.func.vmap over episodes) give each
    episode's memory, iterates and meta-gradients exactly as `write`/`read` one by one."""
    torch.manual_seed(0)
    shape = (16,) if kind == "rnn" else (1, 16, 16)
    net = build_energy(EnergyConfig(kind, shape, 2)).double()
    rules = Rules(RuleConfig(write_steps=2, read_steps=2), len(memory_layers(net))).double()
    patterns = torch.rand(3, 4, *shape, dtype=torch.float64)  # 3 episodes of 4
    queries = (patterns + 0.1 * torch.randn_like(patterns)).clamp(0, 1)
    params = list(net.parameters()) + list(rules.parameters())

    memories = write_episodes(net, rules, patterns, create_graph=second_order)
    together = read_episodes(net, rules, memories, queries, create_graph=True)
    loss = sum((x - patterns).pow(2).sum() for x in together)
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    loss_each = 0
    for e in range(3):
        theta = write(net, rules, patterns[e], create_graph=second_order)
        for n, v in theta.items():
            assert torch.allclose(memories[n][e], v, rtol=1e-10, atol=1e-12), n
        each = read(net, rules, theta, queries[e], create_graph=True)
        for a, b in zip(together, each, strict=True):
            assert torch.allclose(a[e], b, rtol=1e-10, atol=1e-12)
        loss_each = loss_each + sum((x - patterns[e]).pow(2).sum() for x in each)
    grads_each = torch.autograd.grad(loss_each, params, allow_unused=True)
    for a, b in zip(grads, grads_each, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
