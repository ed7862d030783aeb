"""Aioli with no option set: the paper's settings by domain count, a schedule sized to the run, partial
LearnParams blocks around the current proportions, and the cap on the LearnParams share."""

from __future__ import annotations

import pytest
import torch

from aioli_fast.errors import ConfigError
from aioli_fast.harness.sim import LinearLawSimulator, run_mixer
from aioli_fast.mixing import build_mixer as build_any_mixer
from aioli_fast.mixing import lmo
from aioli_fast.mixing.aioli import (
    DEFAULT_LEARN_FRACTION,
    DEFAULT_MAX_LEARN_SHARE,
    PAPER_SETTINGS,
    AioliMixer,
    paper_setting,
    percent,
)


def build_mixer(method, domains, *args, **options):
    """The mixer with Aioli's probe measurements unless a test names another: these tests are of
    LearnParams (the default measurement, ``round``, is tested in test_aioli_round.py)."""
    if method == "aioli":
        options.setdefault("measurement", "probe")
    return build_any_mixer(method, domains, *args, **options)


def names(k: int) -> list[str]:
    return [f"d{i}" for i in range(k)]


def test_the_nearest_paper_setting_by_domain_count():
    assert [paper_setting(k) for k in (2, 3, 4, 5, 6, 7, 12, 64)] == [2, 3, 3, 3, 7, 7, 7, 7]
    for k, setting in ((2, 2), (3, 3), (5, 3), (7, 7), (20, 7)):
        mixer = build_mixer("aioli", names(k), total_steps=1000)
        paper = PAPER_SETTINGS[setting]
        expected = (paper["eta"], paper["one_hot_factor"], paper["ema"])
        assert (mixer.eta, mixer.one_hot_factor, mixer.ema) == expected
    # an option that is set wins over the default of its k
    assert build_mixer("aioli", names(7), total_steps=1000, eta=0.3).eta == 0.3


@pytest.mark.parametrize("k", [2, 3, 6, 7, 12, 64])
@pytest.mark.parametrize("steps, warmup", [(160, 20), (200, 20), (1000, 100), (5000, 500), (40000, 500)])
def test_auto_schedule_fits_the_run(k, steps, warmup):
    mixer = build_mixer("aioli", names(k), total_steps=steps, warmup_steps=warmup)
    assert isinstance(mixer, AioliMixer)
    plan = mixer.plan
    assert plan.learn_fraction == DEFAULT_LEARN_FRACTION and mixer.options["block_order"] == "mirrored"
    assert plan.sweeps == 2
    # the uniform phase covers the warm-up and a quarter of the run, unless one round would not fit then
    uniform, round_steps = plan.uniform_steps, plan.round_steps
    assert uniform >= max(warmup, steps // 4) or (uniform >= warmup and steps - uniform == round_steps)
    # LearnParams fills each round but for its last step, which trains on the learned proportions
    learn = plan.learn_steps
    assert learn < round_steps <= learn + plan.sweeps * k * 1 + 1 or plan.block_steps >= 4
    rounds = (steps - uniform) // round_steps
    assert rounds >= 1
    if steps - uniform >= round_steps:
        assert (steps - uniform) % round_steps == 0  # whole rounds: the run ends on learned proportions
        assert not mixer.in_learn_params(steps - 1)
    assert mixer.learn_share(steps) <= DEFAULT_MAX_LEARN_SHARE
    if steps >= 40000:
        assert plan.block_steps >= 4  # a long run has blocks of several steps whatever k


def test_auto_without_the_run_length_takes_the_paper_round():
    mixer = build_mixer("aioli", names(2), warmup_steps=30)
    assert (mixer.plan.uniform_steps, mixer.plan.round_steps, mixer.plan.sweeps) == (30, 250, 2)
    assert mixer.plan.block_steps == (250 - 1) // 4
    paper = build_mixer("aioli", names(7), learn_fraction=1.0, max_learn_share=1.0)
    p = paper.plan
    assert (p.uniform_steps, p.round_steps, p.sweeps, p.block_steps) == (0, 200, 2, 10)
    assert paper.options["block_order"] == "random"


def test_the_cap_on_the_learn_params_share_is_a_clear_error():
    # the paper's 7-domain settings train 140 of every 200 steps on block mixtures
    paper7 = dict(learn_fraction=1.0, sweeps=2, block_steps=10, round_steps=200, prior_steps=0)
    with pytest.raises(
        ConfigError, match=r"LearnParams would train 70% of the run's 40000 steps.*max_learn_share=0.3"
    ):
        build_mixer("aioli", names(7), total_steps=40000, **paper7)
    assert build_mixer("aioli", names(7), total_steps=40000, max_learn_share=0.7, **paper7).learn_share(
        40000
    ) == (pytest.approx(0.7))
    with pytest.raises(ConfigError, match="each round of 200 steps"):
        build_mixer("aioli", names(7), **paper7)
    with pytest.raises(ConfigError, match=r"max_learn_share must be in \(0, 1\]"):
        build_mixer("aioli", names(2), max_learn_share=0.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"learn_fraction": 0.0}, r"learn_fraction must be in \(0, 1\]"),
        ({"learn_fraction": 1.5}, r"learn_fraction must be in \(0, 1\]"),
        ({"diagonal": True}, "diagonal .* needs mixing.learn_fraction=1"),
        ({"block_order": "sorted"}, "block_order must be 'random', 'mirrored' or 'auto'"),
        ({"block_order": "mirrored", "sweeps": 3}, "needs an even mixing.sweeps"),
        ({"round_steps": "often"}, "round_steps must be an integer or 'auto'"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ConfigError, match=message):
        build_mixer("aioli", names(3), total_steps=400, **options)


def test_partial_blocks_are_the_round_proportions_mixed_with_the_smoothed_one_hot_rows():
    k, e, f = 3, 0.25, 0.5
    prior = {"d0": 0.6, "d1": 0.3, "d2": 0.1}
    mixer = build_mixer(
        "aioli", names(k), proportions=prior, learn_fraction=e, one_hot_factor=f, sweeps=2, block_steps=2,
        round_steps=13, prior_steps=4, block_counts="exact",
    )  # fmt: skip
    p = torch.tensor([0.6, 0.3, 0.1])
    W = lmo.smoothed_one_hot(k, f)
    schedule = mixer.schedule(4)
    assert len(schedule) == 12
    order = mixer.order(0)
    assert order[3:] == order[:3][::-1]  # the second sweep mirrors the first
    for step in range(4, 16):
        j = order[(step - 4) // 2]
        expected = (1 - e) * p + e * W[j]
        torch.testing.assert_close(mixer.proportions(step), expected)
        assert mixer.host_values(step) == pytest.approx(expected.tolist())
        assert schedule[step - 4] == pytest.approx(expected.tolist())
    assert mixer.proportions(16) is mixer.proportions(4 - 1)  # the last step of the round: p itself


def test_partial_estimate_is_exact_under_the_law_from_any_proportions():
    k, e = 5, 0.2
    gen = torch.Generator().manual_seed(0)
    A = torch.rand(k, k, generator=gen, dtype=torch.float64)
    p = torch.softmax(torch.randn(k, generator=gen, dtype=torch.float64), 0)
    W = lmo.smoothed_one_hot(k, 0.75, dtype=torch.float64)
    G = A @ ((1 - e) * p[:, None] + e * W)  # column j: the drop from training on block j's mixture
    W_inv = lmo.smoothed_one_hot_inverse(k, 0.75, dtype=torch.float64)
    torch.testing.assert_close(lmo.solve_partial_mixing_law(G, W_inv, p, e), A)
    torch.testing.assert_close(lmo.solve_partial_mixing_law(G, W_inv, p, 1.0), lmo.solve_mixing_law(G, W_inv))


def test_mirrored_sweeps_cancel_a_linear_drift():
    """A loss drift linear in time adds the same amount to every column of G under mirrored sweeps, so the
    centred column sums (all the update uses) are those of the planted A; random sweeps credit the
    domains trained early with the drift."""
    k, e = 4, 0.25
    errors = {}
    for order_kind in ("mirrored", "random"):
        sim = LinearLawSimulator.random(k, seed=3)
        mixer = build_mixer(
            "aioli", names(k), learn_fraction=e, sweeps=2, block_steps=4, round_steps=2 * k * 4 + 1,
            block_order=order_kind, prior_steps=0, one_hot_factor=0.75, seed=1, max_learn_share=1.0,
        )  # fmt: skip

        def drifting(p_k, sim=sim, start=sim.train_step, base_drop=2e-3):
            # every domain's loss also falls by base_drop a step at the start, less every step
            start(p_k)
            sim.L_k = sim.L_k - base_drop * (1 - sim.step / 40)

        sim.train_step = drifting
        run_mixer(mixer, sim, mixer.plan.round_steps)
        estimate = mixer.last_A_DD.double().sum(0)
        truth = lmo.normalize_mixing_matrix(sim.A0_kk).sum(0)
        centred = (estimate - estimate.mean()) / (estimate - estimate.mean()).norm()
        target = (truth - truth.mean()) / (truth - truth.mean()).norm()
        error = float((centred - target).abs().max())
        errors[order_kind] = error
    # mirrored: exact up to float32 round-off (losses near 4 in fp32, drops of 1e-3 divided by e)
    assert errors["mirrored"] < 2e-3 and errors["random"] > 10 * errors["mirrored"], errors


def test_defaults_do_not_lose_to_stratified_on_the_simulator():
    """The linear law with noise, 3 and 8 domains: Aioli with nothing set drops the average loss at least
    99% as much as stratified sampling (the balanced blocks cost nothing to first order; the learned p,
    within e^eta of uniform, can help or, when the estimate is noisy, cost a little)."""
    for k in (3, 8):
        for seed in range(2):
            drops = {}
            for method in ("stratified", "aioli"):
                sim = LinearLawSimulator.random(k, seed=seed, measure_noise=0.01, noise=1e-5)
                start = sim.average_loss()
                mixer = build_mixer(method, names(k), total_steps=800, warmup_steps=50)
                drops[method] = start - run_mixer(mixer, sim, 800)["loss"][-1]
            assert drops["aioli"] >= 0.99 * drops["stratified"], (k, seed, drops)


def test_a_run_too_short_for_a_round_says_so_and_stays_uniform():
    mixer = build_mixer("aioli", names(3), total_steps=3)
    assert "too short to apply a round's proportions: it trains on the uniform mixture" in mixer.describe(3)
    assert all(mixer.host_proportions(step) == pytest.approx([1 / 3] * 3) for step in range(3))


def test_a_run_that_ends_inside_learnparams_is_warned_about():
    """round_steps 250 in a 20-step run (seen with an adapter): LearnParams starts and never ends; the
    start-up line every loop prints says so, with the remedy."""
    line = build_mixer("aioli", names(3), total_steps=20, round_steps=250).describe(20)
    assert "warning: the run is too short to apply a round's proportions: it ends inside LearnParams" in line
    assert "lower mixing.round_steps or train longer" in line


@pytest.mark.parametrize("k", [2, 3, 7, 12, 22, 64])
@pytest.mark.parametrize("steps", [300, 5000])
def test_the_measurement_cost_counts_the_measurements_the_run_makes(k, steps):
    mixer = build_mixer("aioli", names(k), total_steps=steps)
    made = sum(mixer.measurement_due(s) for s in range(steps))
    assert mixer.plan.measurements_in(steps) == made > 0
    # each a forward of k x probe sequences; a training step is about 3 forwards of its batch
    assert mixer.measurement_cost(steps, 512, 16) == pytest.approx(made * k * 16 / (3 * 512 * steps))
    line = mixer.describe(steps, 512, 16)
    assert f"{made} probe measurement(s) of {k} x 16 sequences: " in line
    assert f"{percent(made * k * 16 / (3 * 512 * steps))} of the training compute" in line
    train = build_mixer("aioli", names(k), total_steps=steps, measurement="train")
    assert train.measurement_cost(steps, 512, 16) == 0.0
    assert "no extra compute" in train.describe(steps, 512, 16)


def test_the_cost_of_the_issue_example():
    """22 domains (the Pile's), a global batch of 512 and 50k steps: about 3.9% with the defaults."""
    mixer = build_mixer("aioli", names(22), total_steps=50_000)
    assert mixer.measurement_cost(50_000, 512, 16) == pytest.approx(0.039, abs=0.001)


@pytest.mark.parametrize(("k", "steps", "batch"), [(7, 5000, 256), (22, 50_000, 512), (64, 5000, 1024)])
def test_a_measure_budget_sizes_the_probe_within_it(k, steps, batch):
    mixer = build_mixer("aioli", names(k), total_steps=steps, measure_budget=0.01)
    probe = mixer.probe_size(steps, batch, 16)
    assert 1 <= probe <= 16
    assert mixer.measurement_cost(steps, batch, probe) <= 0.01
    assert probe == 16 or mixer.measurement_cost(steps, batch, probe + 1) > 0.01  # the most that fit
    assert "(mixing.measure_budget 1%)" in mixer.describe(steps, batch, probe)
    unbounded = build_mixer("aioli", names(k), total_steps=steps)
    assert unbounded.probe_size(steps, batch, 16) == 16


def test_a_measure_budget_too_small_for_one_sequence_is_refused_with_the_numbers():
    mixer = build_mixer("aioli", names(12), total_steps=300, measure_budget=0.01)
    with pytest.raises(
        ConfigError, match=r"measure_budget=0.01: the run's 100 probe measurements cost .*% of"
    ):
        mixer.probe_size(300, 16, 16)
    with pytest.raises(ConfigError, match=r"mixing.measure_budget must be in \(0, 1\]"):
        build_mixer("aioli", names(3), total_steps=300, measure_budget=0.0)
    train = build_mixer("aioli", names(12), total_steps=300, measure_budget=0.01, measurement="train")
    assert train.probe_size(300, 16, 16) == 16  # no probe: nothing to size
