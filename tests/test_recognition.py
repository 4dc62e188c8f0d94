"""Recognition and completion (issue 17): whether a write lowers the energy of what it
stored more than that of novel patterns (a held-out metric and an optional term of the
meta-loss), and whether it lowers a query completed with its own stored content more than
one completed with another stored pattern's (an optional term); and whether each stored
pattern lies lower in the energy than where its read ended (an optional term); and a
penalty on the energy's prior repairing a query without the memory, or with a memory of
other patterns (an optional term)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from ebmm_cli.distort import Distortion
from ebmm_cli.errors import EbmmError
from ebmm_cli.evaluation import Batch, evaluate_episodes
from ebmm_cli.memory import (
    completion_margins,
    endpoint_margins,
    energy,
    identification_logits,
    initial_memory,
    long_descent,
    read,
    recognition_margins,
    write,
    write_features,
)
from ebmm_cli.meta import MetaStep, read_metrics
from ebmm_cli.model import Model, retrieve, unwritten_memory, write_memory
from ebmm_cli.runconfig import TrainConfig, train_config
from ebmm_cli.store import load_checkpoint
from tests.conftest import run_ebmm, tiny_binary

_TINY_TRAIN = ["--dataset", "binary", "--batch-size", "6", "--write-steps", "2",
               "--read-steps", "2", "--dynamic", "8", "--eval-every", "1", "--eval-episodes",
               "2", "--device", "cpu", "--write-lr", "1"]  # fmt: skip
"""`ebmm train` options for a tiny binary run that trains in seconds (the CLI tests)."""


def _binary(**options: object) -> tuple[Model, TrainConfig, torch.Tensor, torch.Tensor]:
    """Three episodes for a model whose write stores (the binary write rate, 1)."""
    return tiny_binary(3, write_lr=1.0, **options)


def test_margins_are_the_difference_of_what_the_write_did_to_each_energy() -> None:
    model, _, patterns, _ = _binary()
    net = model.energy
    stored, novel = patterns[0], patterns[1]
    memory = write_memory(model, stored).params
    with torch.no_grad():
        margins = recognition_margins(net, memory, stored, novel)
        blank = initial_memory(net)
        moved_stored = energy(net, memory, stored) - energy(net, blank, stored)
        moved_novel = energy(net, memory, novel) - energy(net, blank, novel)
    assert margins.shape == (6, 6)
    torch.testing.assert_close(margins[2, 4], moved_stored[2] - moved_novel[4])
    # Written with the binary rates, the memory singles out what it stored: most pairs
    # have the stored pattern's energy lowered more.
    assert (margins < 0).float().mean() > 0.75
    # θ̄ itself moves nothing: every margin is 0.
    assert recognition_margins(net, initial_memory(net), stored, novel).abs().max() == 0


def test_held_out_recognition_is_a_half_for_a_write_that_stores_nothing() -> None:
    model, _, patterns, queries = _binary()
    held = [Batch(p, q) for p, q in zip(patterns, queries, strict=True)]
    assert evaluate_episodes(model, held)["recognition"] > 0.75
    with torch.no_grad():
        model.rules.write_rate.fill_(-40.0)  # softplus: rates of 4e-18, a write of nothing
    assert evaluate_episodes(model, held)["recognition"] == 0.5
    # One episode has no other episode's patterns to be novel: no recognition then.
    assert "recognition" not in evaluate_episodes(model, held[:1])


def test_a_negative_weight_is_refused() -> None:
    with pytest.raises(EbmmError, match=r"must be 0 or more, got -1"):
        train_config(dataset="binary", steps=5, recognition=-1.0)


@pytest.mark.parametrize(
    "term,weight",
    [
        ("recognition", 0.5),
        ("completion", 2.5),
        ("contrast", 2.5),
        ("identification", 1.5),
        ("prior_penalty", 3.0),
    ],
)
def test_the_weight_is_part_of_the_run_config(term: str, weight: float) -> None:
    config = train_config(dataset="binary", steps=5, **{term: weight})
    assert getattr(TrainConfig.from_json(config.to_json()), term) == weight
    old = json.loads(config.to_json())
    del old[term]  # a checkpoint from before the option
    assert TrainConfig.from_json(json.dumps(old)) == dataclasses.replace(config, **{term: 0.0})


@pytest.mark.parametrize(
    "spec,shape,drawn,keeps",
    [
        ("occlude:16", (4, 1, 32, 32), 256, True),
        ("noise:7", (4, 3, 28, 28), 49, True),  # the first channel only; clamped noise
        ("eraseblock:64", (4, 128), 64, False),
        ("flip:10", (4, 128), 10, False),
    ],
)
def test_with_mask_marks_every_drawn_position_and_draws_the_same_queries(
    spec: str, shape: tuple[int, ...], drawn: int, keeps: bool
) -> None:
    """The mask counts a drawn position even where the distortion left its value (an
    occluding 0 over ink-free pixels), and the queries and the generator's state after
    are those of the distortion alone."""
    distortion = Distortion.parse(spec)
    x = (torch.rand(shape, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    alone, paired = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    queries, mask = distortion.with_mask(x, paired)
    torch.testing.assert_close(queries, distortion(x, alone))
    assert torch.equal(paired.get_state(), alone.get_state())
    assert mask.shape == x.shape and mask.dtype == x.dtype
    assert (mask.flatten(1).sum(1) == drawn).all()
    assert ((queries != x) <= (mask == 1)).all()  # every change lies inside the mask
    # occluding and clamped noise leave some drawn positions as they were
    assert ((queries == x) & (mask == 1)).any() == keeps


def test_completion_margins_are_own_against_other_content_of_what_the_write_did() -> None:
    model, _, patterns, _ = _binary()
    net = model.energy
    stored = patterns[0]
    queries, masks = Distortion.parse("eraseblock:64").with_mask(stored, torch.Generator())
    lam = torch.linspace(0.1, 1.0, 6)
    memory = write_memory(model, stored).params
    with torch.no_grad():
        margins = completion_margins(net, memory, stored, queries, masks, lam)
        blank = initial_memory(net)

        def moved(x: torch.Tensor) -> torch.Tensor:
            return energy(net, memory, x[None]) - energy(net, blank, x[None])

        i, r = 4, 2  # query 4 against stored pattern 2's content
        own = queries[i] + lam[i] * masks[i] * (stored[i] - queries[i])
        other = queries[i] + lam[i] * masks[i] * (stored[i - r] - queries[i])
        assert margins.shape == (3, 6)
        torch.testing.assert_close(margins[r - 1, i], (moved(own) - moved(other))[0])
        # θ̄ itself moves nothing: every margin is 0; one pattern has nothing to contrast
        assert completion_margins(net, blank, stored, queries, masks, lam).abs().max() == 0
        one = completion_margins(net, memory, stored[:1], queries[:1], masks[:1], lam[:1])
        assert one.shape == (0, 1)


@pytest.mark.parametrize("episodes", [1, 3])
@pytest.mark.parametrize("term", ["recognition", "completion", "contrast"])
def test_each_term_trains_the_write_but_not_the_reported_loss(term: str, episodes: int) -> None:
    """With a term's weight > 0 the step's gradient gains the term (one episode, and
    several written together under vmap): the write rates move differently, while the
    loss the step reports is the read's alone, the same as without the term."""
    results = {}
    for weight in (0.0, 5.0):
        model, config, patterns, _ = _binary(**{term: weight})
        step = MetaStep(model, config, torch.device("cpu"), world=1)
        distortion, generator = model.distortion, torch.Generator().manual_seed(1)
        batches = [Batch(p, *distortion.with_mask(p, generator)) for p in patterns[:episodes]]
        foils = (torch.rand(6, 128, generator=torch.Generator().manual_seed(2)) > 0.5).float()
        torch.manual_seed(5)  # λ
        loss = step(batches, torch.Generator(), foils=foils)
        results[weight] = (loss, model.rules.write_rate.detach().clone())
    torch.testing.assert_close(results[5.0][0], results[0.0][0])
    assert not torch.equal(results[5.0][1], results[0.0][1])


def test_write_features_are_each_patterns_gradient_over_the_written_weights() -> None:
    """g(xi) is ∇θ E(xi; θ̄) over the written weights alone, one row per pattern, and
    the identification logits are their cosines (queries against stored patterns)."""
    model, _, patterns, queries = _binary()
    net, theta = model.energy, initial_memory(model.energy)
    features = write_features(net, patterns[0])
    assert features.shape == (6, sum(v.numel() for v in theta.values()))
    grads = torch.autograd.grad(energy(net, theta, patterns[0][2:3]).sum(), list(theta.values()))
    torch.testing.assert_close(features[2], torch.cat([g.flatten() for g in grads]))
    logits = identification_logits(net, patterns[0], queries[0], temperature=0.5)
    q = torch.nn.functional.normalize(write_features(net, queries[0]), dim=1)
    x = torch.nn.functional.normalize(features, dim=1)
    torch.testing.assert_close(logits, q @ x.T / 0.5)


def test_held_out_identification_is_reported_where_there_is_more_than_one_pattern() -> None:
    """Random strings give near-orthogonal features: most queries single out their own
    string, far above chance (1/6); one pattern has nothing to tell apart."""
    model, _, patterns, queries = _binary()
    held = [Batch(p, q) for p, q in zip(patterns, queries, strict=True)]
    assert evaluate_episodes(model, held)["identification"] > 0.5
    one = [Batch(p[:1], q[:1]) for p, q in zip(patterns, queries, strict=True)]
    assert "identification" not in evaluate_episodes(model, one)


@pytest.mark.parametrize("episodes", [1, 3])
def test_the_identification_term_trains_the_slow_weights_but_not_the_reported_loss(
    episodes: int,
) -> None:
    """The term reaches the energy's slow weights (its features are taken at θ̄), not
    the loss the step reports."""
    results = {}
    for weight in (0.0, 5.0):
        model, config, patterns, queries = _binary(identification=weight)
        step = MetaStep(model, config, torch.device("cpu"), world=1)
        batches = [Batch(p, q) for p, q in zip(patterns[:episodes], queries, strict=False)]
        loss = step(batches, torch.Generator())
        results[weight] = (loss, model.energy.memory.weight.detach().clone())
    torch.testing.assert_close(results[5.0][0], results[0.0][0])
    assert not torch.equal(results[5.0][1], results[0.0][1])


def test_the_completion_term_without_masks_is_refused() -> None:
    """Without masks the term cannot be computed: refused rather than silently skipped."""
    model, config, patterns, queries = _binary(completion=1.0)
    step = MetaStep(model, config, torch.device("cpu"), world=1)
    with pytest.raises(ValueError, match="masks"):
        step([Batch(patterns[0], queries[0])], torch.Generator())


def test_endpoint_margins_are_the_energy_of_the_stored_pattern_less_the_read_end() -> None:
    model, _, patterns, queries = _binary()
    net, stored = model.energy, patterns[0]
    written = write_memory(model, stored)
    ends = retrieve(model, written, queries[0])[-1]
    with torch.no_grad():
        margins = endpoint_margins(net, written.params, stored, ends)
        expected = energy(net, written.params, stored) - energy(net, written.params, ends)
        assert margins.shape == (6,)
        torch.testing.assert_close(margins, expected)
        # a read that ends on the stored pattern itself leaves nothing to contrast
        assert endpoint_margins(net, written.params, stored, stored).abs().max() == 0


def test_a_long_descent_goes_down_inside_the_box_without_a_graph() -> None:
    """Plain descent from the read's end: lower energy for every pattern, values kept
    in [0, 1], nothing to backpropagate, the starts left alone; zero steps are the starts;
    under vmap over episodes each episode descends as it would alone."""
    model, _, patterns, queries = _binary()
    net = model.energy
    memory = write_memory(model, patterns[0]).params
    starts = retrieve(model, write_memory(model, patterns[0]), queries[0])[-1]
    kept = starts.clone()
    ends = long_descent(net, memory, starts, steps=30)
    assert ends.shape == starts.shape and not ends.requires_grad
    assert ((ends >= 0) & (ends <= 1)).all()
    with torch.no_grad():
        assert (energy(net, memory, ends) < energy(net, memory, starts)).all()
    assert torch.equal(starts, kept)
    assert torch.equal(long_descent(net, memory, starts, steps=0), starts)
    memories = {k: torch.stack([v, v]) for k, v in memory.items()}
    both = torch.func.vmap(lambda m, x: long_descent(net, m, x, 30))(
        memories, torch.stack([starts, queries[0]])
    )
    torch.testing.assert_close(both[0], ends)
    torch.testing.assert_close(both[1], long_descent(net, memory, queries[0], 30))


@pytest.mark.parametrize("episodes", [1, 3])
def test_contrast_steps_move_the_negatives_but_not_the_reported_loss(episodes: int) -> None:
    """The contrast term against long-descent ends is another gradient than against the
    read's ends (the rates move differently); the loss the step reports is the same."""
    results = {}
    for steps in (0, 20):
        model, config, patterns, _ = _binary(contrast=5.0, contrast_steps=steps)
        step = MetaStep(model, config, torch.device("cpu"), world=1)
        generator = torch.Generator().manual_seed(1)
        batches = [Batch(p, model.distortion(p, generator)) for p in patterns[:episodes]]
        loss = step(batches, torch.Generator())
        results[steps] = (loss, model.rules.write_rate.detach().clone())
    torch.testing.assert_close(results[20][0], results[0][0])
    assert not torch.equal(results[20][1], results[0][1])


def test_contrast_steps_are_checked_and_kept_in_the_run_config() -> None:
    with pytest.raises(EbmmError, match=r"needs --contrast above 0"):
        train_config(dataset="binary", steps=5, contrast_steps=10)
    with pytest.raises(EbmmError, match=r"must be 0 or more, got -1"):
        train_config(dataset="binary", steps=5, contrast=1.0, contrast_steps=-1)
    config = train_config(dataset="binary", steps=5, contrast=1.0, contrast_steps=50)
    assert TrainConfig.from_json(config.to_json()).contrast_steps == 50
    old = json.loads(config.to_json())
    del old["contrast_steps"]  # a checkpoint from before the option
    assert TrainConfig.from_json(json.dumps(old)).contrast_steps == 0


@pytest.mark.parametrize("episodes", [1, 3])
def test_the_prior_penalty_acts_only_where_the_unwritten_read_beats_the_query(
    episodes: int,
) -> None:
    """Targets where the read from θ̄ ends (so it beats the query): the penalty changes
    the step (the network's weights move otherwise) but not the loss it reports. Targets
    equal to the queries (nothing to beat): the step is exactly the one without it."""
    model, _, _, queries = _binary()
    with torch.no_grad():
        ends = retrieve(model, unwritten_memory(model), queries.flatten(0, 1))[-1]
    reached = ends.view_as(queries)[:episodes]
    for targets, changes in ((reached, True), (queries[:episodes], False)):
        results = {}
        for weight in (0.0, 5.0):
            model, config, _, _ = _binary(prior_penalty=weight)
            step = MetaStep(model, config, torch.device("cpu"), world=1)
            batches = [Batch(t, q) for t, q in zip(targets, queries[:episodes], strict=True)]
            loss = step(batches, torch.Generator())
            results[weight] = (loss, model.energy.static.weight.detach().clone())
        torch.testing.assert_close(results[5.0][0], results[0.0][0])
        moved_otherwise = not torch.equal(results[5.0][1], results[0.0][1])
        assert moved_otherwise == changes


@pytest.mark.parametrize("episodes", [1, 3])
def test_the_penalty_against_a_foil_acts_only_where_the_foil_read_beats_the_query(
    episodes: int,
) -> None:
    """`penalty_memory="foil"`: the control reads the queries from a memory written with
    the foils. Targets where that read ends (so it beats the query): the step changes, and
    differently from the penalty against θ̄; targets equal to the queries: the step is
    exactly the one without the penalty. The reported loss never changes."""
    model, _, _, queries = _binary()
    foils = (torch.rand(6, 128, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    foil_memory = write(model.energy, model.rules, foils)
    ends = read(model.energy, model.rules, foil_memory, queries.flatten(0, 1))[-1]
    reached = ends.view_as(queries)[:episodes]
    for targets, changes in ((reached, True), (queries[:episodes], False)):
        results = {}
        for weight, against in ((0.0, "unwritten"), (5.0, "foil"), (5.0, "unwritten")):
            model, config, _, _ = _binary(prior_penalty=weight, penalty_memory=against)
            step = MetaStep(model, config, torch.device("cpu"), world=1)
            batches = [Batch(t, q) for t, q in zip(targets, queries[:episodes], strict=True)]
            loss = step(batches, torch.Generator(), foils=foils)
            results[weight, against] = (loss, model.energy.static.weight.detach().clone())
        plain, foil = results[0.0, "unwritten"], results[5.0, "foil"]
        torch.testing.assert_close(foil[0], plain[0])
        assert (not torch.equal(foil[1], plain[1])) == changes
        if changes:  # a different control from θ̄'s
            assert not torch.equal(foil[1], results[5.0, "unwritten"][1])


def test_the_penalty_against_a_foil_without_foils_is_refused() -> None:
    model, config, patterns, queries = _binary(prior_penalty=1.0, penalty_memory="foil")
    step = MetaStep(model, config, torch.device("cpu"), world=1)
    with pytest.raises(ValueError, match="foils"):
        step([Batch(patterns[0], queries[0])], torch.Generator())


def test_the_penalty_memory_is_checked_and_kept_in_the_run_config() -> None:
    config = train_config(dataset="binary", steps=5, prior_penalty=1.0, penalty_memory="foil")
    assert TrainConfig.from_json(config.to_json()).penalty_memory == "foil"
    old = json.loads(config.to_json())
    del old["penalty_memory"]  # a checkpoint from before the option
    assert TrainConfig.from_json(json.dumps(old)).penalty_memory == "unwritten"
    with pytest.raises(EbmmError, match=r"foil needs --prior-penalty above 0"):
        train_config(dataset="binary", steps=5, penalty_memory="foil")
    with pytest.raises(EbmmError, match=r"unknown value 'blank'"):
        train_config(dataset="binary", steps=5, prior_penalty=1.0, penalty_memory="blank")


def test_the_prior_penalty_needs_the_gradient_read() -> None:
    with pytest.raises(EbmmError, match=r"needs the gradient read"):
        train_config(dataset="omniglot", steps=5, read="decoder", prior_penalty=1.0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "option,bad,weight",
    [
        ("--recognition", "-2", 1.0),
        ("--completion", "nan", 2.0),
        ("--contrast", "-0.5", 1.5),
        ("--identification", "-1", 0.5),
        ("--prior-penalty", "-1", 2.0),
    ],
)
def test_train_with_a_term_through_the_cli(
    option: str, bad: str, weight: float, tmp_path: Path
) -> None:
    """`ebmm train --recognition W` / `--completion W` / `--contrast W` /
    `--prior-penalty W` trains and keeps the weight across --resume (with recognition,
    held-out recognition is reported at each evaluation); a bad weight is a one-line
    error."""
    refused = run_ebmm("train", *_TINY_TRAIN, "--steps", "1", option, bad, "-o",
                       str(tmp_path / "bad"))  # fmt: skip
    assert refused.returncode == 2
    assert option in refused.stderr and "0 or more" in refused.stderr
    assert not (tmp_path / "bad").exists()

    out = tmp_path / "run"
    result = run_ebmm("train", *_TINY_TRAIN, "--steps", "2", option, str(weight), "-o", str(out))
    assert result.returncode == 0, result.stderr
    resumed = run_ebmm("train", "-o", str(out), "--resume", "--steps", "3")
    assert resumed.returncode == 0, resumed.stderr
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    if option == "--recognition":
        assert all(0.5 < r["heldout_recognition"] <= 1 for r in records)
    assert all(0 <= r["heldout_identification"] <= 1 for r in records)
    _, _, state = load_checkpoint(out / "checkpoint.safetensors")
    assert json.loads(state["train_config"])[option.lstrip("-").replace("-", "_")] == weight


@pytest.mark.slow
@pytest.mark.parametrize(
    "alone,needs,options,kept",
    [
        (["--penalty-memory", "foil"], "--prior-penalty",
         ["--prior-penalty", "2", "--penalty-memory", "foil"],
         {"prior_penalty": 2.0, "penalty_memory": "foil"}),
        (["--contrast-steps", "5"], "--contrast",
         ["--contrast", "1", "--contrast-steps", "5"],
         {"contrast": 1.0, "contrast_steps": 5}),
    ],
)  # fmt: skip
def test_train_with_an_option_that_needs_another_through_the_cli(
    alone: list[str], needs: str, options: list[str], kept: dict[str, object], tmp_path: Path
) -> None:
    """`ebmm train --prior-penalty W --penalty-memory foil` and `--contrast W
    --contrast-steps L` train and keep both options across --resume; the second option
    without the first is a one-line error naming both, and nothing is created."""
    refused = run_ebmm("train", *_TINY_TRAIN, "--steps", "1", *alone, "-o",
                       str(tmp_path / "bad"))  # fmt: skip
    assert refused.returncode == 2
    assert alone[0] in refused.stderr and needs in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()

    out = tmp_path / "run"
    result = run_ebmm("train", *_TINY_TRAIN, "--steps", "2", *options, "-o", str(out))
    assert result.returncode == 0, result.stderr
    resumed = run_ebmm("train", "-o", str(out), "--resume", "--steps", "3")
    assert resumed.returncode == 0, resumed.stderr
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    _, _, state = load_checkpoint(out / "checkpoint.safetensors")
    config = json.loads(state["train_config"])
    assert {k: config[k] for k in kept} == kept
