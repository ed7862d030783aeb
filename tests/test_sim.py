"""The linear-law simulator, and what it shows about the mixers.

1. The simulator follows its law (L_{t+1} = L_t - A_t p_t + noise, A_t = A_0 · decay^t + drift) and its
   measurements have the stated noise.
2. LearnParams recovers a planted A: with a fixed A (no drift, no decay) the normalised A that Aioli
   estimates (``last_A_DD``) approaches the normalised planted A as the measurement noise shrinks. Stated
   tolerance: max-abs error < 1e-4 at noise 0 (fp32 round-off only), and the error grows with the noise
   (roughly linearly: it is a linear function of the measurement errors), for the probe and train sources.
3. Each mixer lowers the simulator's final average loss relative to stratified sampling in a scenario
   where its assumption holds (each scenario says why).
"""

from __future__ import annotations

import json

import pytest
import torch
from mixing_helpers import drive

from aioli_fast.harness.sim import LinearLawSimulator, run_mixer
from aioli_fast.mixing import build_mixer, lmo

D3 = ["a", "b", "c"]


def sim_of(A, L, **kwargs) -> LinearLawSimulator:
    return LinearLawSimulator(
        A_kk=torch.tensor(A, dtype=torch.float64), L_k=torch.tensor(L, dtype=torch.float64), **kwargs
    )


# ---- the simulator itself --------------------------------------------------------------------------


def test_train_step_follows_the_linear_law_exactly_without_noise():
    A = [[2e-3, 1e-3], [0.0, 3e-3]]
    sim = sim_of(A, [4.0, 5.0])
    p = torch.tensor([0.25, 0.75])
    sim.train_step(p)
    expected = torch.tensor([4.0 - (2e-3 * 0.25 + 1e-3 * 0.75), 5.0 - 3e-3 * 0.75], dtype=torch.float64)
    torch.testing.assert_close(sim.L_k, expected, atol=1e-15, rtol=0)
    assert sim.step == 1 and sim.average_loss() == pytest.approx(expected.mean().item())


def test_decay_and_drift():
    A = torch.tensor([[1.0, 0.5], [0.2, 1.0]], dtype=torch.float64)
    sim = LinearLawSimulator(A_kk=A, L_k=torch.zeros(2), decay=0.9)
    for _ in range(3):
        sim.train_step(torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(sim.A_kk, A * 0.9**3)
    drifting = LinearLawSimulator(A_kk=A, L_k=torch.zeros(2), drift=0.5, seed=1)
    for _ in range(50):
        drifting.train_step(torch.tensor([0.5, 0.5]))
    assert not torch.allclose(drifting.A_kk, A) and (drifting.A_kk >= 0).all()


def test_simulator_is_deterministic_given_its_seed():
    def run(seed):
        sim = LinearLawSimulator.random(3, seed=seed, noise=1e-3, measure_noise=1.0, drift=0.1)
        out = []
        for _ in range(20):
            p = torch.tensor([0.2, 0.3, 0.5])
            out.append(torch.cat([*sim.train_batch_stats(p), *sim.probe_stats()]))
            sim.train_step(p)
        return torch.stack(out), sim.L_k

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_measurements_have_the_stated_token_counts_and_noise():
    sim = sim_of([[0.0, 0.0], [0.0, 0.0]], [4.0, 2.0], measure_noise=2.0, probe_tokens=1024, seed=0)
    probes = [sim.probe_stats() for _ in range(4000)]
    counts = torch.stack([c for _, c in probes])
    assert (counts == 1024).all()
    losses = torch.stack([s / c for s, c in probes]).double()
    torch.testing.assert_close(
        losses.mean(0), torch.tensor([4.0, 2.0], dtype=torch.float64), atol=5e-3, rtol=0
    )
    # std = measure_noise / sqrt(tokens) = 2 / 32
    torch.testing.assert_close(
        losses.std(0), torch.full((2,), 2.0 / 32, dtype=torch.float64), atol=4e-3, rtol=0
    )
    sums, counts = sim.train_batch_stats(torch.tensor([0.25, 0.75]))
    assert counts.sum().item() == sim.tokens_per_step and (counts % 256 == 0).all()
    sums, counts = sim.train_batch_stats(torch.tensor([0.0, 1.0]))
    assert counts.tolist() == [0.0, float(sim.tokens_per_step)] and sums[0].item() == 0.0


# the paper's procedure: whole batches on the block mixtures, no uniform phase, no cap on LearnParams
PAPER = dict(learn_fraction=1.0, prior_steps=0, max_learn_share=1.0)


def test_run_mixer_history():
    sim = LinearLawSimulator.random(2, seed=0)
    mixer = build_mixer(
        "aioli", ["a", "b"], measurement="probe", sweeps=1, block_steps=2, round_steps=10, **PAPER
    )
    history = run_mixer(mixer, sim, 30)
    assert len(history["loss"]) == len(history["proportions"]) == 30
    assert history["measurements"] == [3 * (1 * 2 + 1)]
    assert history["loss"][-1] == pytest.approx(sim.average_loss())
    assert history["proportions"][0] == pytest.approx([0.625, 0.375]) or history["proportions"][0] == (
        pytest.approx([0.375, 0.625])
    )


# ---- LearnParams recovers a planted A --------------------------------------------------------------

PLANTED = [[0.8, 0.1, 0.1], [0.7, 0.6, 0.1], [0.7, 0.1, 0.6]]  # domain 0 helps every domain
NOISES = [0.0, 0.003, 0.01, 0.03, 0.1]


def recovery_error(
    measurement: str, noise: float, seed: int = 0, rounds: int = 3, learn_fraction: float = 1.0
) -> float:
    """Mean over rounds of max |normalised estimate - normalised planted A| (no drift, no decay)."""
    sim = sim_of(
        [[v * 1e-2 for v in row] for row in PLANTED], [4.0, 4.1, 4.2], measure_noise=noise, seed=seed
    )
    target = lmo.normalize_mixing_matrix(sim.A_kk).float()
    U = 2 * 3 * 4 + 4
    mixer = build_mixer(
        "aioli",
        D3,
        measurement=measurement,
        sweeps=2,
        block_steps=4,
        one_hot_factor=0.6,
        round_steps=U,
        eta=0.5,
        **{**PAPER, "learn_fraction": learn_fraction},
    )
    errors = []
    for r in range(rounds):
        drive(mixer, sim, r * U, (r + 1) * U)
        assert mixer.state_dict()["round_done"] == r
        errors.append((mixer.last_A_DD - target).abs().max().item())
    return sum(errors) / rounds


@pytest.mark.parametrize("measurement", ["probe", "train", "full_val"])
def test_learn_params_recovers_a_planted_A_as_noise_shrinks(measurement):
    errors = [recovery_error(measurement, noise) for noise in NOISES]
    assert errors[0] < 1e-4, errors  # exact up to fp32 round-off
    assert all(a < b for a, b in zip(errors, errors[1:])), errors  # monotone in the noise
    # the estimate is linear in the measurement errors: error / noise stays bounded (about 0.4-0.6 here)
    assert all(e < 1.0 * n for e, n in zip(errors[1:], NOISES[1:])), errors
    assert errors[2] < 0.01  # noise 0.01 per unit token: the normalised entries (0.03-0.3) within 0.01


@pytest.mark.parametrize("measurement", ["probe", "train"])
def test_partial_blocks_recover_a_planted_A(measurement):
    """A quarter of each batch on the block mixture, the rest on the round's proportions (which move after
    the first round): A = G·W⁻¹·(I − (1 − e)·p·1ᵀ)/e is exact without noise, and its noise is about 1/e
    times the paper's at the same measurement noise."""
    exact = recovery_error(measurement, 0.0, learn_fraction=0.25)
    assert exact < 1e-4, exact
    noisy = [recovery_error(measurement, 0.003, seed=s, learn_fraction=0.25) for s in range(3)]
    paper = [recovery_error(measurement, 0.003, seed=s) for s in range(3)]
    assert sum(paper) < sum(noisy) < 8 * sum(paper), (noisy, paper)


def test_diagonal_ablation_recovers_a_planted_diagonal_A():
    A = [[3e-2, 0.0, 0.0], [0.0, 1e-2, 0.0], [0.0, 0.0, 2e-2]]
    sim = sim_of(A, [4.0, 4.0, 4.0])
    mixer = build_mixer(
        "aioli", D3, measurement="probe", diagonal=True, sweeps=1, block_steps=2, round_steps=10, **PAPER
    )
    drive(mixer, sim, 0, 10)
    torch.testing.assert_close(
        mixer.last_A_DD, torch.diag(torch.tensor([0.5, 1 / 6, 1 / 3])), atol=1e-5, rtol=0
    )


# ---- each mixer beats stratified where its assumption holds ----------------------------------------

STEPS = 600


def final_loss(mixer, sim, steps=STEPS) -> float:
    drive(mixer, sim, 0, steps)
    return sim.average_loss()


def gain(method_loss: float, stratified_loss: float, start: float) -> float:
    """Extra loss reduction relative to stratified: (drop_method - drop_stratified) / drop_stratified."""
    return (stratified_loss - method_loss) / (start - stratified_loss)


# Aioli / Skill-it scenario: training on domain 0 lowers every domain's loss (column 0 of A is large),
# while domains 1 and 2 mostly help themselves. The column sums of A are (2.5, 0.8, 0.8): the average
# loss drops fastest on domain 0, which is what exponentiated gradient on the column sums of a
# correctly estimated A moves towards; the law is exactly linear with a fixed A, so Aioli's model holds.
HELPS = [[1.1e-3, 0.1e-3, 0.1e-3], [0.7e-3, 0.6e-3, 0.1e-3], [0.7e-3, 0.1e-3, 0.6e-3]]
HELPS_L0 = [4.0, 4.2, 4.4]


GAIN_AIOLI = {"ema": 0.1, "cumulative": 0.2}  # measured: 0.17-0.21 and 0.28-0.32


@pytest.mark.parametrize(
    "update, measurement, eta",
    [
        ("ema", "probe", 3.0),
        ("ema", "train", 3.0),
        ("cumulative", "probe", 1.0),
        ("cumulative", "train", 1.0),
    ],
    ids=["ema-probe", "ema-train", "cumulative-probe", "cumulative-train"],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_aioli_beats_stratified_when_one_domain_helps_all(update, measurement, eta, seed):
    # measurement noise well below the loss drop of a block (S·A·W ≈ 1e-3..4e-3; the std of a train
    # measurement of a domain with ~1600 tokens is 0.01/40): the drops resolve A
    kw = dict(measure_noise=0.01, seed=seed)
    base = final_loss(build_mixer("stratified", D3), sim_of(HELPS, HELPS_L0, **kw))
    mixer = build_mixer(
        "aioli", D3, measurement=measurement, update=update, eta=eta, ema=0.5,
        sweeps=2, block_steps=4, one_hot_factor=0.6, round_steps=60, **PAPER,
    )  # fmt: skip
    loss = final_loss(mixer, sim_of(HELPS, HELPS_L0, **kw))
    assert gain(loss, base, sum(HELPS_L0) / 3) > GAIN_AIOLI[update], (loss, base)
    p = mixer.proportions(STEPS - 1)
    assert p.argmax().item() == 0


def test_skillit_beats_stratified_with_the_right_graph(tmp_path):
    # Skill-it assumes a known skills graph: here the graph has the planted A's structure (domain 0 is a
    # prerequisite skill for 1 and 2), so A = diag(L)·S points at domain 0 as the true A does
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps([[1.0, 0.0, 0.0], [0.6, 0.5, 0.0], [0.6, 0.0, 0.5]]))
    kw = dict(measure_noise=0.05, seed=0)
    base = final_loss(build_mixer("stratified", D3), sim_of(HELPS, HELPS_L0, **kw))
    mixer = build_mixer("skillit", D3, skills_graph=str(graph), update_every=10, eta=0.5)
    loss = final_loss(mixer, sim_of(HELPS, HELPS_L0, **kw))
    assert gain(loss, base, sum(HELPS_L0) / 3) > 0.4, (loss, base)  # measured 0.81


# ODM / DoReMi scenario: A is diagonal (domains do not transfer) and domain a both has the most left to
# learn and learns fastest (A_aa = 3e-3 vs 1e-3 and 0.5e-3). ODM's assumption (a high training loss
# means much left to learn) holds because domain a's loss (8) is far above the others (3, 2) and stays
# above them over the run; DoReMi's (excess loss over a reference = learnable headroom) holds because the
# reference model reached 1.0 on domain a but no lower than the current losses on b and c.
DIAG = [[3e-3, 0.0, 0.0], [0.0, 1e-3, 0.0], [0.0, 0.0, 0.5e-3]]
DIAG_L0 = [8.0, 3.0, 2.0]


@pytest.mark.parametrize("seed", [0, 1])
def test_odm_beats_stratified_when_the_high_loss_domain_learns_fastest(seed):
    kw = dict(measure_noise=0.05, seed=seed)
    base = final_loss(build_mixer("stratified", D3), sim_of(DIAG, DIAG_L0, **kw))
    mixer = build_mixer("odm", D3)
    loss = final_loss(mixer, sim_of(DIAG, DIAG_L0, **kw))
    assert gain(loss, base, sum(DIAG_L0) / 3) > 0.06, (loss, base)  # measured 0.127
    assert mixer.proportions(STEPS).argmax().item() == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_doremi_beats_stratified_when_the_reference_is_low_on_the_learnable_domain(tmp_path, seed):
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps({"a": 1.0, "b": 3.0, "c": 2.0}))
    kw = dict(measure_noise=0.05, seed=seed)
    base = final_loss(build_mixer("stratified", D3), sim_of(DIAG, DIAG_L0, **kw))
    mixer = build_mixer("doremi", D3, reference=str(reference))
    loss = final_loss(mixer, sim_of(DIAG, DIAG_L0, **kw))
    assert gain(loss, base, sum(DIAG_L0) / 3) > 0.5, (loss, base)  # measured 0.997
    average = mixer.average_proportions()
    assert average.argmax().item() == 0 and average.sum().item() == pytest.approx(1.0, abs=1e-5)
