"""Aioli's default measurement, ``round``: each domain's training-batch losses fitted against its exposure
over the rounds (``lmo.accumulate_trend`` / ``lmo.fit_trends``), and the gated update that lowers only the
domains the fit says are worth less than the average (``lmo.gated_update``)."""

from __future__ import annotations

import math

import pytest
import torch

from aioli_fast.errors import ConfigError
from aioli_fast.harness.sim import LinearLawSimulator, run_mixer
from aioli_fast.mixing import build_mixer, lmo
from aioli_fast.mixing.aioli import GATED_ETA, GATED_MAX_CHANGE, GATED_MEMORY, GATED_SIGNIFICANCE


def names(k: int) -> list[str]:
    return [f"d{i}" for i in range(k)]


def trend_stats(slopes, steps=60, noise=0.0, seed=0, p=None):
    """Per-domain statistics of ``steps`` observations of losses 3 - slope_i * X_i (X_i = p_i * t), with
    token counts that vary by step and domain, and per-token noise of std ``noise``."""
    k = len(slopes)
    gen = torch.Generator().manual_seed(seed)
    p = torch.full((k,), 1 / k, dtype=torch.float64) if p is None else torch.tensor(p, dtype=torch.float64)
    F = torch.zeros(k, 3, 3, dtype=torch.float64)
    obs = torch.zeros(k, dtype=torch.float64)
    X = torch.zeros(k, dtype=torch.float64)
    a = torch.tensor(slopes, dtype=torch.float64)
    for _ in range(steps):
        count = torch.randint(64, 512, (k,), generator=gen).to(torch.float64)
        loss = 3.0 - a * X + noise / count.sqrt() * torch.randn(k, generator=gen, dtype=torch.float64)
        lmo.accumulate_trend(F, X, loss * count, count)
        obs += 1
        X += p
    return F, obs


def test_fit_trends_recovers_each_domains_slope_exactly_without_noise():
    slopes = [0.02, 0.0, -0.01, 0.05, 0.003]
    gain, var = lmo.fit_trends(*trend_stats(slopes, p=[0.3, 0.1, 0.2, 0.25, 0.15]))
    torch.testing.assert_close(gain, torch.tensor(slopes, dtype=torch.float64), atol=1e-10, rtol=0)
    assert (var >= 0).all() and var.max() < 1e-12


def test_fit_trends_variance_is_the_spread_over_draws():
    slopes = [0.02, 0.01, 0.0]
    draws, variances = [], []
    for seed in range(300):
        gain, var = lmo.fit_trends(*trend_stats(slopes, noise=3.0, seed=seed))
        draws.append(gain)
        variances.append(var)
    draws_t = torch.stack(draws)
    empirical = draws_t.var(0)
    stated = torch.stack(variances).mean(0)
    torch.testing.assert_close(draws_t.mean(0), torch.tensor(slopes, dtype=torch.float64), atol=0.01, rtol=0)
    # 300 draws: the sample variance is within about 16% of the truth (2 standard errors)
    assert ((stated / empirical) - 1).abs().max() < 0.2, (stated, empirical)


def test_fit_trends_gives_no_evidence_without_observations_or_exposure():
    F, obs = trend_stats([0.02, 0.01, 0.03], steps=40, p=[0.5, 0.5, 0.0])
    F[1] = 0
    obs[1] = 0  # never seen
    gain, var = lmo.fit_trends(F, obs)
    assert gain[0] > 0 and gain[1] == 0 and var[1] == 0
    assert gain[2] == 0 and var[2] == 0  # never trained on: its exposure never changed


def test_gated_update_moves_nothing_within_the_noise():
    p = torch.full((4,), 0.25)
    gain = torch.tensor([1.0, 1.1, 0.9, 1.0])
    var = torch.full((4,), 0.2**2)  # each 2.5 standard errors wide: the 0.1 differences are noise
    assert torch.equal(lmo.gated_update(p, gain, var, 2.0, 2.0, 2.0), torch.softmax(torch.log(p), -1))


def test_gated_update_lowers_a_domain_worth_less_by_its_shortfall_beyond_the_noise():
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    gain = torch.tensor([1.0, 1.0, 1.0, 0.6])  # mean 0.9, the last falls short by 0.3
    se = 0.05
    var = torch.zeros(4)
    var[3] = se**2 / (1 - 1 / 4) ** 2  # the standard error of its shortfall is then exactly se
    eta, z = 0.5, 2.0
    new = lmo.gated_update(p, gain, var, eta, z, 10.0)
    expected_step = eta * (0.3 - z * se) / 0.9
    ratio = (new[3] / new[0]) / (p[3] / p[0])
    assert math.isclose(ratio.item(), math.exp(-expected_step), rel_tol=1e-5)
    # the others keep their ratios: a domain that gains more is not raised for it
    assert math.isclose((new[0] / new[1]).item(), 0.4 / 0.3, rel_tol=1e-6)
    assert math.isclose(new.sum().item(), 1.0, rel_tol=1e-6)


def test_gated_update_is_bounded_and_still_when_nothing_learns():
    p = torch.full((3,), 1 / 3)
    new = lmo.gated_update(p, torch.tensor([2.0, 2.0, -1.0]), torch.zeros(3), 100.0, 0.0, 2.0)
    assert math.isclose((new[2] / new[0]).item(), 0.5, rel_tol=1e-6)  # at most halved in one update
    still = lmo.gated_update(p, torch.tensor([-1.0, 0.0, -2.0]), torch.zeros(3), 2.0, 0.0, 2.0)
    torch.testing.assert_close(still, p)
    zero = lmo.gated_update(
        torch.tensor([0.5, 0.5, 0.0]), torch.tensor([1.0, 0.0, 1.0]), torch.zeros(3), 2, 0, 2
    )
    assert zero[2] == 0 and math.isclose(zero.sum().item(), 1.0, rel_tol=1e-6)


def test_defaults_are_the_round_fit_without_block_mixtures():
    mixer = build_mixer("aioli", names(7), total_steps=300, warmup_steps=20)
    o = mixer.options
    assert (mixer.measurement, o["update"], mixer.plan.sweeps) == ("round", "gated", 0)
    assert (mixer.eta, o["significance"], o["max_change"], o["memory"]) == (
        GATED_ETA,
        GATED_SIGNIFICANCE,
        GATED_MAX_CHANGE,
        GATED_MEMORY,
    )
    assert mixer.plan.learn_steps == 0 and mixer.learn_share(300) == 0
    assert mixer.measurement_cost(300, 16, 16) == 0.0 and not mixer.measurement_due(100)
    line = mixer.describe(300, 16, 16)
    assert "no extra compute" in line and "LearnParams" not in line, line
    assert mixer.schedule(mixer.plan.uniform_steps) is None
    # the paper's procedure is one option away, unchanged
    paper = build_mixer("aioli", names(7), total_steps=300, measurement="probe")
    assert (paper.options["update"], paper.plan.sweeps, paper.eta) == ("ema", 2, 1.0)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"update": "gated", "measurement": "probe"}, "go together"),
        ({"update": "ema"}, "go together"),
        ({"sweeps": 2}, "0 with mixing.measurement=round"),
        ({"memory": 0.0}, "memory"),
        ({"max_change": 1.0}, "max_change"),
        ({"significance": -1.0}, "significance"),
    ],
)
def test_bad_round_options_are_named(options, message):
    with pytest.raises(ConfigError, match=message):
        build_mixer("aioli", names(3), total_steps=300, **options)


def planted(k: int, useless: int | None) -> torch.Tensor:
    """Loss drop per unit of each domain: each helps itself, a little the others; ``useless`` helps
    nothing and nothing helps it."""
    A = torch.full((k, k), 2e-3, dtype=torch.float64) + torch.eye(k, dtype=torch.float64) * 10e-3
    if useless is not None:
        A[:, useless] = 0
        A[useless, :] = 0
        A[useless, useless] = 3e-4
    return A


def make_sim(A, seed):
    """The linear law at the CPU evidence scale: batch 16 x 128 tokens, per-domain losses as noisy as real
    text's (about 0.35 nats between sequences of 128 tokens), and a useless last domain (nothing helps
    it, it helps nothing) of uniform random text (0.05: every sequence is equally hard)."""
    k = A.shape[0]
    noise = [4.0] * k
    if A[-1, :-1].abs().sum() == 0:
        noise[-1] = 0.6
    return LinearLawSimulator(
        A_kk=A, L_k=torch.full((k,), 3.0), measure_noise=noise, tokens_per_step=2048, seed=seed
    )


def simulate(A, seed, steps=300, **options):
    sim = make_sim(A, seed)
    mixer = build_mixer("aioli", names(A.shape[0]), total_steps=steps, warmup_steps=20, **options)
    history = run_mixer(mixer, sim, steps)
    return mixer, history


def test_proportions_change_only_at_the_start_of_a_round():
    mixer, history = simulate(planted(5, useless=4), seed=0)
    starts = {mixer.fit_end(r) for r in range(mixer.plan.rounds_in(300))}
    changed = {t for t in range(1, 300) if history["proportions"][t] != history["proportions"][t - 1]}
    assert changed and changed <= starts, (changed, starts)


@pytest.mark.parametrize("seed", range(4))
def test_a_useless_domain_is_lowered_and_equal_domains_stay_uniform(seed):
    k = 7
    mixer, _ = simulate(planted(k, useless=k - 1), seed)
    p = mixer.host_proportions(299)
    assert p[-1] <= 1 / (2 * k), p
    assert max(p[:-1]) - min(p[:-1]) < 0.02, p  # the real domains share what it gave up evenly
    equal, _ = simulate(planted(k, useless=None), seed)
    q = equal.host_proportions(299)
    assert max(abs(x - 1 / k) for x in q) < 0.03, q


def test_resume_mid_round_is_exact():
    A = planted(4, useless=3)
    whole, history = simulate(A, seed=1)
    assert history["proportions"][-1] != history["proportions"][0]  # it moved: the comparison means something
    sim = make_sim(A, seed=1)
    first = build_mixer("aioli", names(4), total_steps=300, warmup_steps=20)
    run_mixer(first, sim, 150)
    second = build_mixer("aioli", names(4), total_steps=300, warmup_steps=20)
    second.load_state_dict(first.state_dict())
    rest = []
    for step in range(150, 300):
        p = second.proportions(step)
        sums, counts = sim.train_batch_stats(p)
        second.observe(step, sums, counts)
        sim.train_step(p)
        rest.append(second.host_proportions(step))
    assert rest == history["proportions"][150:]


def test_the_exposure_is_what_each_step_trained_on():
    mixer, history = simulate(planted(5, useless=4), seed=0, steps=200)
    assert history["proportions"][-1] != history["proportions"][0]  # updates happened inside the fit
    trained = torch.tensor(history["proportions"][mixer.fit_start() : 199], dtype=torch.float64)
    # the fit's exposure is that before the last observed step (199)
    torch.testing.assert_close(mixer._fit_X, trained.sum(0), rtol=1e-6, atol=1e-6)
