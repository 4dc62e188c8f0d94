"""`--memory kv`: the key-value energy, whose write is the delta rule and whose `redraw`
read draws the value a query's key recalls, and `kv-conv`, the same with a 3x3
convolution as the written layer; the `bce` loss; and writes without the gradient-norm
term (α = 0)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch.func import functional_call

from ebmm_cli.energy import EnergyConfig, build_energy, memory_floats, memory_layers
from ebmm_cli.errors import EbmmError
from ebmm_cli.kv import delta_curvature, redrawn
from ebmm_cli.memory import (
    RuleConfig,
    Rules,
    initial_memory,
    write,
    write_episodes,
    write_step,
)
from ebmm_cli.meta import start_from
from ebmm_cli.metrics import reconstruction_loss
from ebmm_cli.model import Memory, Model, retrieve, unwritten_memory, write_memory
from ebmm_cli.runconfig import train_config
from ebmm_cli.store import _digest, load_model, read_header, save_model
from tests.conftest import run_ebmm


def _tiny_kv(memory: str = "kv", **options: object) -> tuple[Model, torch.Tensor, torch.Tensor]:
    """A seeded untrained kv (or kv-conv) model on 16x16 images, 4 random binary patterns
    and their occluded queries."""
    config = train_config(dataset="omniglot", memory=memory, image_size=16, batch_size=4,
                          steps=1, distortion="occlude:8", device="cpu", **options)  # fmt: skip
    torch.manual_seed(0)
    model = Model(config.model)
    patterns = (torch.rand(4, 1, 16, 16) > 0.5).float()
    return model, patterns, model.distortion(patterns, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize(("kind", "half"), [("kv", 36), ("kv-conv", 4)])
def test_kv_sizes_shapes_and_an_empty_initial_memory(size: int, kind: str, half: int) -> None:
    """4,608 written floats by default (the paper's 4,616 budget): kv 64 x 72, kv-conv a
    3x3 convolution 64 → 8; half of them with half the `dynamic` units; one energy per
    image; the redraw is an image in [0, 1]; θ̄ is zero."""
    net = build_energy(EnergyConfig(kind, (1, size, size)))
    assert memory_floats(net) == 4608
    assert memory_floats(build_energy(EnergyConfig(kind, (1, size, size), dynamic=half))) == 2304
    x = torch.rand(3, 1, size, size)
    assert net(x).shape == (3,)
    drawn = net(x, redraw=True)
    assert drawn.shape == x.shape and drawn.min() >= 0 and drawn.max() <= 1
    assert all(torch.count_nonzero(v) == 0 for v in initial_memory(net).values())


@pytest.mark.parametrize(("value", "loads"), [(None, True), (False, True), (128, False)])
def test_a_removed_network_option_loads_when_it_was_off_and_is_refused_when_set(
    tmp_path: Path, value: object, loads: bool
) -> None:
    """A file made while an energy option existed that ebmm later removed (the key
    width, `keys`, was one) holds today's network when the option was off (null or
    false) and loads; set, its network is not today's, and the file is refused with
    one line naming the option."""
    model, _, _ = _tiny_kv()
    path = tmp_path / "trial.safetensors"
    save_model(model, path)
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    config = json.loads(meta["config"])
    config["energy"]["keys"] = value
    meta["config"] = json.dumps(config)
    tensors = load_file(path)
    meta["checksum"] = _digest(tensors, meta)  # as such a file was written: not damaged
    path.write_bytes(save(tensors, metadata=meta))
    if loads:
        assert load_model(path).config == model.config
    else:
        with pytest.raises(EbmmError, match=r"trial.safetensors: .*energy option keys"):
            load_model(path)


def test_the_prior_energy_adds_a_weighted_reconstruction_gap_and_leaves_the_write() -> None:
    """`--set prior=true`: E(x) = ½‖θ k(x) − v(x)‖² + w ½‖x − R(x)‖², with w and R slow
    weights; the write, which sees only keys and values, stores the same θ with or
    without it; kv-conv refuses it."""
    model, patterns, queries = _tiny_kv(prior=True, read="gd")
    net = model.energy
    with torch.no_grad():
        net.prior_weight.fill_(0.5)
    memory = write_memory(model, patterns).params
    keys, values = net.associations(queries)
    (theta,) = memory.values()
    gap = (queries - net.prior(queries)).pow(2).flatten(1).sum(1)
    kv = 0.5 * (keys @ theta.T - values).pow(2).sum(1)
    expected = kv + F.softplus(net.prior_weight) * gap / 2
    assert torch.allclose(functional_call(net, memory, (queries,)), expected, atol=1e-5)
    plain = Model(replace(model.config, energy=replace(model.config.energy, prior=False)))
    plain.load_state_dict(model.state_dict(), strict=False)
    (without,) = write_memory(plain, patterns).params.values()
    assert torch.equal(theta, without)
    with pytest.raises(EbmmError, match="--set prior: is a prior energy for --memory kv"):
        train_config(dataset="omniglot", memory="kv-conv", prior=True, steps=1)
    with pytest.raises(EbmmError, match="--set prior: shapes the energy that --read gd"):
        train_config(dataset="omniglot", memory="kv", read="redraw", prior=True, steps=1)


def test_a_run_with_the_prior_starts_from_a_kv_model_without_it(tmp_path: Path) -> None:
    """`--init` from a kv model trained without the prior energy: every weight the model
    has is copied, and the prior starts as in a fresh run (its weight at 0.01)."""
    trained, _, _ = _tiny_kv()
    path = tmp_path / "trained.safetensors"
    save_model(trained, path)
    model, _, _ = _tiny_kv(prior=True, read="gd")
    fresh = {k: v.clone() for k, v in model.state_dict().items() if "prior" in k}
    start_from(model, path)
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in trained.state_dict().items())
    assert all(torch.equal(ours[k], v) for k, v in fresh.items())
    assert float(F.softplus(model.energy.prior_weight.detach())) == pytest.approx(0.01, abs=1e-3)


def test_a_kv_write_is_the_delta_rule_on_its_keys_and_values() -> None:
    """Each write step moves θ by (η / λmax) (1/N) Σi (vi − θ ki) kiᵀ (and the β pull to
    θ̄), λmax the largest eigenvalue of (1/N) Σi ki kiᵀ: the paper's write rule on
    E = ½‖θ k(x) − v(x)‖² with its rate in units of 1/λmax, computed here from the keys
    and values."""
    model, patterns, _ = _tiny_kv(write_steps=3)
    net = model.energy
    with torch.no_grad():
        h = net.encoder(patterns)
        keys, values = F.normalize(net.key(h), dim=1), net.value(h)
        lam = torch.linalg.eigvalsh(keys.T @ keys / len(patterns)).max()
        rates, _, betas = model.rules.write_schedule(len(patterns))
        theta = torch.zeros_like(net.memory.weight)
        for eta, beta in zip(rates, betas, strict=True):
            energy_rate, _, prior_rate = eta[0]
            delta = (values - keys @ theta.T).T @ keys / len(patterns)
            theta = theta + energy_rate / lam * delta - prior_rate * beta * 2 * theta
    written = write_memory(model, patterns).params["memory.weight"]
    assert torch.allclose(written, theta, atol=1e-6)
    assert rates[0, 0, 0].item() == pytest.approx(1.0)  # kv's starting rate


def test_the_kv_conv_memory_is_a_3x3_convolution_over_a_map_of_unit_keys() -> None:
    """kv-conv's energy is ½ the mean over positions of ‖θ ⋆ K(x) − V(x)‖², θ the written
    3x3 convolution over a map of unit keys from the encoder's whole last map (each
    position's key and value see every position), and `associations` gives
    one row per pattern and position whose product with θ (read as a matrix) is that
    convolution's output there, so that the closed-form write is the delta rule on it."""
    model, patterns, _ = _tiny_kv("kv-conv")
    net = model.energy
    theta = {"memory.weight": torch.randn_like(net.memory.weight)}
    with torch.no_grad():
        h = net.encoder[:-1](patterns)  # (4, 128, 2, 2) at 16x16
        keys, values = F.normalize(net.key(h), dim=1), net.value(h)
        assert torch.allclose(keys.norm(dim=1), torch.ones(4, 2, 2))
        recalled = F.conv2d(keys, theta["memory.weight"], padding=1)
        energy = 0.5 * (recalled - values).pow(2).sum(1).mean((1, 2))
        assert torch.allclose(functional_call(net, theta, (patterns,)), energy, atol=1e-5)
        rows, targets = net.associations(patterns)
        assert rows.shape == (4 * 4, 64 * 9) and targets.shape == (4 * 4, 8)
        matrix = theta["memory.weight"].reshape(8, -1)
        flat = recalled.flatten(2).transpose(1, 2).flatten(0, 1)
        assert torch.allclose(rows @ matrix.T, flat, atol=1e-5)
        assert torch.allclose(targets, values.flatten(2).transpose(1, 2).flatten(0, 1))
        # each position's key and value see the whole map, not their own position alone
        # (local keys left an occluded query's hole keyed apart)
        moved = h.clone()
        moved[:, :, 0, 0] += 1.0
        for head in (net.key, net.value):
            assert not torch.allclose(head(moved)[:, :, 1, 1], head(h)[:, :, 1, 1])
    written = write_memory(model, patterns).params["memory.weight"]
    assert written.shape == (8, 64, 3, 3) and torch.count_nonzero(written) > 0


@pytest.mark.parametrize("copies", [True, False], ids=["copies", "spread"])
def test_a_kv_write_rate_acts_alike_on_every_episode_whatever_its_keys(copies: bool) -> None:
    """The write's rates are in units of the episode's λmax (`memory.write`),
    so a rate means the same on every episode: one step of rate 1.5 leaves −0.5 of the
    error θ − θ* along the top eigendirection of the keys (θ* the least-squares memory),
    whether the 64 keys are one (copies of one pattern, λmax 1) or spread out (λmax
    ~0.07). With absolute rates the factor was 1 − 1.5 λmax, and a rate tuned on typical
    episodes blew up on those with the most similar keys (docs/TRAINING.md, the kv family).
    Below rate 2, each step lowers the stored energy on either kind."""
    torch.manual_seed(0)
    net = build_energy(EnergyConfig("kv", (1, 16, 16)))
    net.encoder = torch.nn.Sequential(  # signed features, so that random patterns' keys spread
        torch.nn.Flatten(), torch.nn.Linear(256, net.key.in_features)
    )
    patterns = torch.randn(64, 1, 16, 16)
    if copies:
        patterns = patterns[:1].expand(64, -1, -1, -1)
    with torch.no_grad():
        keys, values = net.addresses(patterns), net.value(net.encoder(patterns))
        lams, vecs = torch.linalg.eigh(keys.T @ keys / 64)
    assert (lams[-1].item() > 0.99) if copies else (lams[-1].item() < 0.2)
    top = vecs[:, -1]
    target = values.T @ keys @ top / 64 / lams[-1]  # θ* along the top direction

    def rules(steps: int, rate: float) -> Rules:
        return Rules(RuleConfig(write_steps=steps, write_lr=rate, alpha=0.0, beta=0.0), 1)

    written = write(net, rules(1, 1.5), patterns)["memory.weight"].detach()
    assert torch.allclose(written @ top - target, -0.5 * (0 - target), atol=1e-4)
    energies = [net(patterns).mean().item()]
    for steps in range(1, 5):
        theta = write(net, rules(steps, 1.9), patterns)
        energies.append(functional_call(net, theta, (patterns,)).mean().item())
    assert all(b < a for a, b in pairwise(energies)), energies


@pytest.mark.parametrize("memory", ["kv", "kv-conv"])
@pytest.mark.parametrize("second_order", [True, False])
def test_the_closed_form_kv_write_is_the_autograd_write_gradients_included(
    second_order: bool, memory: str
) -> None:
    """The kv write's closed-form steps on one encoder pass's keys and values give the
    memory, and the meta-gradients through it to every slow weight and rate, that the
    generic autograd steps (`write_step`, differentiating the energy at each step) give
    with the same rates in units of 1/λmax; first order treats each step's gradient as
    a constant in both. Under `vmap` (`write_episodes`) each episode gets its own λmax.
    kv-conv's rows are its key patches at every position, its θ the 3x3 convolution."""
    model, patterns, queries = _tiny_kv(memory, write_steps=3)
    net, rules = model.energy, model.rules
    with torch.no_grad():
        rules.beta.fill_(0.5)  # a β term that matters (softplus: 0.97)
    layers = list(memory_layers(net).values())

    def autograd_write(x: torch.Tensor) -> dict[str, torch.Tensor]:
        rates, alphas, betas = rules.write_schedule(len(x))
        lam = delta_curvature(net.associations(x)[0])
        theta_bar = initial_memory(net)
        theta = dict(theta_bar)
        for eta, alpha, beta in zip(rates, alphas, betas, strict=True):
            eta = eta * torch.tensor([1 / lam, 1.0, 1.0])
            theta, _ = write_step(net, theta, theta_bar, x, layers, eta, alpha, beta,
                                  create_graph=second_order, grad_norm=False)  # fmt: skip
        return theta

    slow = [p for name, p in model.named_parameters() if p.requires_grad]
    grads = []
    for write_fn in (autograd_write, lambda x: write(net, rules, x, create_graph=second_order)):
        theta = write_fn(patterns)
        loss = functional_call(net, theta, (queries,), {"redraw": True}).sum()
        grad = torch.autograd.grad(loss, slow, allow_unused=True, materialize_grads=True)
        grads.append((theta["memory.weight"], grad))  # the unused α, η_grad_norm: zeros
    (theta_a, grads_a), (theta_c, grads_c) = grads
    assert torch.allclose(theta_a, theta_c, atol=1e-6)
    for a, c in zip(grads_a, grads_c, strict=True):
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads_c[:4])  # the encoder's first layers
    episodes = torch.stack([patterns, patterns.flip(0) * 0.5])
    batched = write_episodes(net, rules, episodes)["memory.weight"]
    for i in range(2):
        single = write(net, rules, episodes[i])["memory.weight"]
        assert torch.allclose(batched[i], single, atol=1e-6)


@pytest.mark.parametrize("memory", ["kv", "kv-conv"])
def test_rekeys_redraw_each_drawing_by_the_key_of_the_one_before(memory: str) -> None:
    """With `rekeys` R the redraw read has 1 + R iterates: the first is the plain
    redraw; each next one keeps the query's value, maps and pixels but is recalled by
    the key of the drawing before, so it differs from the first; the answer is the last."""
    model, patterns, queries = _tiny_kv(memory)
    model.rules.config = replace(model.rules.config, rekeys=2)
    memory = write_memory(model, patterns)
    drawings = retrieve(model, memory, queries)
    assert len(drawings) == 3
    with torch.no_grad():
        assert torch.equal(drawings[0], redrawn(model.energy, memory.params, queries))
        again = functional_call(model.energy, memory.params, (queries,),
                                {"redraw": True, "cue": drawings[1]})  # fmt: skip
    assert torch.allclose(drawings[2], again, atol=1e-6)
    assert not torch.allclose(drawings[1], drawings[0], atol=1e-4)


def test_a_kv_model_from_before_the_rate_units_is_refused_by_name(tmp_path: Path) -> None:
    """A kv file saved before the write rates were in units of 1/λmax (its rules have
    no `rekeys`) is refused with one line naming it: its absolute rates (up
    to 41) would blow every write up under the new units."""
    model, _, _ = _tiny_kv()
    path = tmp_path / "old.safetensors"
    save_model(model, path)
    assert load_model(path).rules.config.rekeys == 0
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(path)
    config = json.loads(meta["config"])
    del config["rules"]["rekeys"]
    meta["config"] = json.dumps(config)
    path.write_bytes(save(tensors, metadata=meta))  # its checksum covers the tensors only
    with pytest.raises(EbmmError, match=r"old.safetensors: .*from before its write rates .*1/λmax"):
        load_model(path)


@pytest.mark.parametrize("memory", ["kv", "kv-conv"])
def test_the_redraw_read_draws_what_the_written_memory_recalls(memory: str) -> None:
    """One iterate: the energy's drawing of each query under the memory. It depends on
    what was written: the unwritten memory draws otherwise."""
    model, patterns, queries = _tiny_kv(memory)
    memory = write_memory(model, patterns)
    (out,) = retrieve(model, memory, queries)
    with torch.no_grad():
        drawn = redrawn(model.energy, memory.params, queries)
    assert torch.equal(out, drawn)
    (blank,) = retrieve(model, unwritten_memory(model), queries)
    assert not torch.allclose(out, blank)
    broken = Memory({k: torch.full_like(v, float("nan")) for k, v in memory.params.items()},
                    None, memory.patterns)  # fmt: skip
    with pytest.raises(FloatingPointError, match="read step 1 of 1: the redrawn image holds NaN"):
        retrieve(model, broken, queries)


def test_the_redraw_sees_the_query_maps() -> None:
    """The redraw depends on the query's encoder maps through the skips, not only
    through its key, value and pixels."""
    model, patterns, queries = _tiny_kv()
    net = model.energy
    memory = write_memory(model, patterns)
    (drawn,) = retrieve(model, memory, queries)
    with torch.no_grad():
        net.ups[-1].weight[net.width :].mul_(0)  # silence the finest skip's input
        (silenced,) = retrieve(model, memory, queries)
    assert not torch.allclose(drawn, silenced)


def test_kv_rule_defaults_and_the_redraw_read_checks() -> None:
    """kv and kv-conv read by `redraw` and write from rate 1 without the gradient-norm
    term unless told otherwise; other memories keep `gd`; `redraw` on an energy that
    cannot draw is refused, naming `--read`."""
    for memory in ("kv", "kv-conv"):
        rules = train_config(dataset="omniglot", memory=memory, steps=1).model.rules
        assert (rules.read, rules.alpha, rules.write_lr) == ("redraw", 0.0, 1.0)
    rules = train_config(dataset="omniglot", memory="kv", steps=1, write_lr=0.2, read="gd")
    assert (rules.model.rules.read, rules.model.rules.write_lr) == ("gd", 0.2)
    assert train_config(dataset="omniglot", steps=1).model.rules.read == "gd"
    with pytest.raises(EbmmError, match=r"^--read: redraw needs --memory kv or kv-conv"):
        train_config(dataset="omniglot", memory="conv", steps=1, read="redraw")
    for option, given in (
        ("--read-steps", dict(read_steps=3)),
        ("--set read_lr", dict(read_lr=1.0)),
    ):
        with pytest.raises(EbmmError, match=f"^{option}: is the gradient read's; the redraw"):
            train_config(dataset="omniglot", memory="kv", steps=1, **given)


def test_a_write_without_the_gradient_norm_term_equals_one_with_alpha_zero() -> None:
    """α = 0 in the rules skips the gradient-norm term's double backward: the memory is
    the one a step computing the term with α = 0 gives."""
    torch.manual_seed(0)
    net = build_energy(EnergyConfig("conv", (1, 16, 16), dynamic=2)).double()
    rules = Rules(RuleConfig(write_steps=1, alpha=0.0, write_lr=0.1), len(memory_layers(net)))
    patterns = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    skipped = write(net, rules.double(), patterns)
    theta = initial_memory(net)
    eta = rules.write_schedule(3)[0][0]
    zero = torch.zeros((), dtype=torch.float64)
    computed, _ = write_step(net, theta, theta, patterns, list(memory_layers(net).values()),
                             eta, zero, zero, grad_norm=True)  # fmt: skip
    for name, value in computed.items():
        assert torch.allclose(skipped[name], value)


def test_bce_is_the_pixels_cross_entropy_and_passes_nan_through() -> None:
    x = torch.tensor([[0.9, 0.2, 0.0, 1.0]])
    target = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    expected = -(math.log(0.9) + math.log(0.8) + 2 * math.log(1 - 1e-6)) / 4
    assert reconstruction_loss("bce", x, target).item() == pytest.approx(expected, rel=1e-5)
    assert reconstruction_loss("bce", torch.full((1, 4), math.nan), target).isnan().all()


@pytest.mark.slow
@pytest.mark.parametrize("memory", ["kv", "kv-conv"])
def test_train_and_compare_a_kv_memory_through_the_cli(
    memory: str, data_root: Path, tmp_path: Path
) -> None:
    """`ebmm train --memory kv --loss bce` (or kv-conv) on Omniglot, then `ebmm compare`
    of the model on evaluation characters; `--read redraw` on a conv memory is one line
    and exit 2."""
    out = tmp_path / "run"
    common = ["train", "--data-root", str(data_root), "--image-size", "16", "--batch-size",
              "3", "--distortion", "occlude:8", "--eval-every", "2", "--eval-episodes", "1",
              "--device", "cpu", "--steps", "2"]  # fmt: skip
    result = run_ebmm(*common, "--memory", memory, "--loss", "bce", "--rekeys", "1",
                      "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    model = str(out / "model.safetensors")
    assert json.loads(read_header(Path(model))["config"])["rules"]["rekeys"] == 1
    compared = run_ebmm("compare", "--model", model, "--data-root", str(data_root),
                        "--batch-size", "3", "--episodes", "2", "--json")  # fmt: skip
    assert compared.returncode == 0, compared.stderr
    rows = {r["method"]: r for r in json.loads(compared.stdout)["rows"]}
    (row,) = [r for m, r in rows.items() if m.startswith("ebmm") and not m.endswith("unwritten")]
    assert row["memory_floats"] == 4608 and math.isfinite(row["hamming"]["mean"])
    refused = run_ebmm(*common, "--read", "redraw", "--out", str(tmp_path / "no"))
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1 and "--read" in refused.stderr
    assert not (tmp_path / "no").exists()
    refused = run_ebmm(*common, "--rekeys", "1", "--out", str(tmp_path / "no"))
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1 and "--rekeys" in refused.stderr
    assert not (tmp_path / "no").exists()


def test_read_refuses_steps_that_the_redraw_read_would_ignore(tmp_path: Path) -> None:
    """`ebmm read --steps K` on a memory of the redraw read is a one-line error naming
    the option, and nothing is written: that read takes no steps."""
    from typer.testing import CliRunner

    from ebmm_cli.cli import app
    from ebmm_cli.imageio import save_image
    from ebmm_cli.store import save_memory

    model, patterns, queries = _tiny_kv()
    path = tmp_path / "m.safetensors"
    save_memory(model, write_memory(model, patterns), path)
    save_image(queries[0], tmp_path / "q.png")
    out = tmp_path / "out"
    args = ["read", "--memory", str(path), str(tmp_path / "q.png"), "-o", str(out), "--steps", "3"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 2
    assert "--steps: is the gradient read's" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()
