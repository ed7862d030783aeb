"""The LMO mathematics (``aioli_fast.mixing.lmo``), each pure function alone.

Every function is checked against an independent computation: ``torch.linalg`` in float64 for the
closed-form inverse of the smoothed one-hot matrix and for the solve, explicit Python loops for the
accumulation of sequential loss drops, the normalisation and the exponentiated-gradient updates.
"""

from __future__ import annotations

import math

import pytest
import torch
from mixing_helpers import loop_loss_drops

from aioli_fast.errors import ConfigError
from aioli_fast.mixing import lmo

# (k, f) pairs: the paper's three settings, f = 1 (A = G), f < 1/k (W still invertible), many domains
SETTINGS = [(2, 0.625), (3, 0.5), (7, 0.75), (2, 1.0), (3, 0.2), (16, 0.3)]
SETTING_IDS = [f"k{k}-f{f}" for k, f in SETTINGS]


def w_float64(k: int, f: float) -> torch.Tensor:
    """W built entry by entry in float64 (independent of ``smoothed_one_hot``)."""
    return torch.tensor(
        [[f if i == j else (1 - f) / (k - 1) for j in range(k)] for i in range(k)], dtype=torch.float64
    )


# ---- check_one_hot_factor --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, f",
    [(2, 0.5), (3, 1 / 3), (4, 0.25), (7, 1 / 7), (3, 1 / 3 + 1e-4), (2, 0.5 - 2e-4)],
    ids=["k2-half", "k3-third", "k4-quarter", "k7-seventh", "k3-near-third", "k2-near-half"],
)
def test_one_hot_factor_of_one_over_k_is_rejected_with_a_clear_message(k, f):
    for fn in (lmo.check_one_hot_factor, lmo.smoothed_one_hot, lmo.smoothed_one_hot_inverse):
        args = (f, k) if fn is lmo.check_one_hot_factor else (k, f)
        with pytest.raises(ConfigError) as info:
            fn(*args)
        text = str(info.value)
        assert f"mixing.one_hot_factor={f} is (almost) 1/k for k={k} domains" in text
        assert "A cannot be solved for" in text
        assert f"{1 / k:.4g}" in text


def test_one_hot_factor_just_outside_the_rejection_band_is_accepted():
    lmo.check_one_hot_factor(1 / 3 + 4e-4, 3)  # |k f - 1| = 1.2e-3 >= 1e-3
    W_inv = lmo.smoothed_one_hot_inverse(3, 1 / 3 + 4e-4, dtype=torch.float64)
    eye = w_float64(3, 1 / 3 + 4e-4) @ W_inv
    torch.testing.assert_close(eye, torch.eye(3, dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("k", [0, 1], ids=["k0", "k1"])
def test_fewer_than_two_domains_is_rejected(k):
    with pytest.raises(ConfigError, match=f"LearnParams needs at least 2 domains, got {k}"):
        lmo.check_one_hot_factor(0.7, k)
    with pytest.raises(ConfigError, match="at least 2 domains"):
        lmo.smoothed_one_hot(k, 0.7)


@pytest.mark.parametrize(
    "f", [0.0, -0.1, 1.5, math.nan, math.inf], ids=["zero", "negative", "above-one", "nan", "inf"]
)
def test_one_hot_factor_out_of_range_is_rejected(f):
    with pytest.raises(ConfigError, match=r"mixing.one_hot_factor must be in \(0, 1\]"):
        lmo.check_one_hot_factor(f, 3)


# ---- smoothed one-hot matrix and its inverse -------------------------------------------------------


@pytest.mark.parametrize("k, f", SETTINGS, ids=SETTING_IDS)
def test_smoothed_one_hot_rows_are_the_mixtures(k, f):
    W = lmo.smoothed_one_hot(k, f)
    assert W.shape == (k, k) and W.dtype == torch.float32 and W.device.type == "cpu"
    torch.testing.assert_close(W.double(), w_float64(k, f), atol=1e-7, rtol=0)
    torch.testing.assert_close(W.sum(dim=1), torch.ones(k), atol=1e-6, rtol=0)  # each row is a mixture
    assert torch.equal(W, W.T)
    W64 = lmo.smoothed_one_hot(k, f, dtype=torch.float64)
    assert W64.dtype == torch.float64
    torch.testing.assert_close(W64, w_float64(k, f), atol=1e-15, rtol=0)


@pytest.mark.parametrize("k, f", SETTINGS, ids=SETTING_IDS)
def test_closed_form_inverse_matches_linalg_inv(k, f):
    expected = torch.linalg.inv(w_float64(k, f))
    got64 = lmo.smoothed_one_hot_inverse(k, f, dtype=torch.float64)
    torch.testing.assert_close(got64, expected, atol=1e-12, rtol=1e-12)
    got32 = lmo.smoothed_one_hot_inverse(k, f)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, atol=1e-5, rtol=1e-5)


def test_inverse_of_identity_when_f_is_one():
    torch.testing.assert_close(lmo.smoothed_one_hot_inverse(5, 1.0), torch.eye(5))
    torch.testing.assert_close(lmo.smoothed_one_hot(5, 1.0), torch.eye(5))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_smoothed_one_hot_on_the_requested_device(device):
    assert lmo.smoothed_one_hot(3, 0.5, device=device).device.type == device
    assert lmo.smoothed_one_hot_inverse(3, 0.5, device=device).device.type == device


# ---- the LearnParams schedule ----------------------------------------------------------------------


@pytest.mark.parametrize("k, R", [(2, 4), (3, 4), (7, 2), (5, 1)], ids=["k2R4", "k3R4", "k7R2", "k5R1"])
def test_learn_params_order_is_R_concatenated_permutations(k, R):
    order = lmo.learn_params_order(k, R, torch.Generator().manual_seed(1))
    assert order.shape == (R * k,) and order.dtype == torch.int64 and order.device.type == "cpu"
    for r in range(R):
        assert sorted(order[r * k : (r + 1) * k].tolist()) == list(range(k))


def test_learn_params_order_follows_the_generator():
    a = lmo.learn_params_order(7, 3, torch.Generator().manual_seed(5))
    b = lmo.learn_params_order(7, 3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    others = [lmo.learn_params_order(7, 3, torch.Generator().manual_seed(s)) for s in range(6, 12)]
    assert any(not torch.equal(a, o) for o in others)
    # the sweeps are drawn independently: not every sweep repeats the first permutation
    many = lmo.learn_params_order(7, 20, torch.Generator().manual_seed(0)).view(20, 7)
    assert len({tuple(row) for row in many.tolist()}) > 1
    # default generator works too
    assert sorted(lmo.learn_params_order(4, 1).tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("sweeps", [0, -1], ids=["zero", "negative"])
def test_learn_params_order_rejects_no_sweeps(sweeps):
    with pytest.raises(ConfigError, match=f"mixing.sweeps must be >= 1, got {sweeps}"):
        lmo.learn_params_order(3, sweeps)


@pytest.mark.parametrize("S", [1, 4, 10], ids=["S1", "S4", "S10"])
def test_learn_params_schedule_repeats_each_block_S_times(S):
    order = lmo.learn_params_order(3, 4, torch.Generator().manual_seed(2))
    schedule = lmo.learn_params_schedule(order, S)
    assert schedule.shape == (3 * 4 * S,) and schedule.dtype == torch.int64
    expected = [order[n].item() for n in range(order.numel()) for _ in range(S)]
    assert schedule.tolist() == expected
    # every domain is trained on for exactly R * S steps
    assert torch.bincount(schedule, minlength=3).tolist() == [4 * S] * 3


def test_learn_params_schedule_rejects_empty_blocks():
    with pytest.raises(ConfigError, match="mixing.block_steps must be >= 1, got 0"):
        lmo.learn_params_schedule(torch.arange(3), 0)


# ---- losses from sums ------------------------------------------------------------------------------


def test_losses_from_sums_marks_missing_domains_nan():
    sums = torch.tensor([8.0, 0.0, 5.0, math.inf, math.nan, -3.0])
    counts = torch.tensor([4, 0, 0, 2, 2, 3])  # integer counts are accepted
    got = lmo.losses_from_sums(sums, counts)
    assert got.dtype == torch.float32
    expected = [2.0, math.nan, math.nan, math.nan, math.nan, -1.0]
    for g, e in zip(got.tolist(), expected):
        assert (math.isnan(g) and math.isnan(e)) or g == e


def test_losses_from_sums_is_batched():
    sums = torch.tensor([[2.0, 4.0], [9.0, 0.0]], dtype=torch.float64)
    counts = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    got = lmo.losses_from_sums(sums, counts)
    assert got.dtype == torch.float64 and got.shape == (2, 2)
    assert got[0].tolist() == [2.0, 2.0] and got[1, 0].item() == 3.0 and math.isnan(got[1, 1].item())


# ---- accumulate_loss_drops -------------------------------------------------------------------------


@pytest.mark.parametrize("k, R", [(2, 4), (3, 4), (7, 2)], ids=["k2R4", "k3R4", "k7R2"])
def test_accumulate_loss_drops_matches_loops(k, R):
    gen = torch.Generator().manual_seed(k * 10 + R)
    order = lmo.learn_params_order(k, R, gen)
    L = (4.0 - torch.rand(R * k + 1, k, generator=gen, dtype=torch.float64).cumsum(0) * 0.1).tolist()
    G = lmo.accumulate_loss_drops(torch.tensor(L, dtype=torch.float64), order, k)
    expected = torch.tensor(loop_loss_drops(L, order.tolist(), k), dtype=torch.float64)
    assert G.shape == (k, k) and G.dtype == torch.float64
    torch.testing.assert_close(G, expected, atol=1e-12, rtol=0)
    # every measurement present: the mean is the sum over the R sweeps divided by R
    sums = torch.zeros(k, k, dtype=torch.float64)
    for n, j in enumerate(order.tolist()):
        sums[:, j] += torch.tensor(L[n], dtype=torch.float64) - torch.tensor(L[n + 1], dtype=torch.float64)
    torch.testing.assert_close(G, sums / R, atol=1e-12, rtol=0)


def test_accumulate_loss_drops_are_sequential_differences():
    # k = 2, R = 1, order [1, 0]: the drop of block n is measurement n minus measurement n + 1
    L = torch.tensor([[5.0, 7.0], [4.0, 6.5], [3.5, 6.0]])
    G = lmo.accumulate_loss_drops(L, torch.tensor([1, 0]), 2)
    # block 0 trained on domain 1: drops (1.0, 0.5) -> column 1; block 1 on domain 0: (0.5, 0.5) -> column 0
    assert G.tolist() == [[0.5, 1.0], [0.5, 0.5]]


def test_accumulate_loss_drops_leaves_out_missing_measurements():
    k, nan, inf = 3, math.nan, math.inf
    order = [0, 1, 2, 2, 0, 1]  # R = 2
    L = [
        [5.0, 6.0, 7.0],
        [4.0, nan, 6.8],  # domain 1 missing: the drops of blocks 0 and 1 for domain 1 are left out
        [3.9, 5.0, 6.7],
        [3.8, 4.9, inf],  # an infinite loss is as good as missing
        [3.7, 4.8, 6.0],
        [3.0, 4.7, 5.9],
        [nan, nan, nan],  # the closing measurement is missing entirely
    ]
    G = lmo.accumulate_loss_drops(torch.tensor(L), torch.tensor(order), k)
    expected = loop_loss_drops(L, order, k)
    torch.testing.assert_close(G, torch.tensor(expected), atol=1e-6, rtol=0)
    assert torch.isfinite(G).all()
    # spot checks of the loop itself: G[1, 1] has no valid drop (blocks 1 and 5) -> 0;
    # G[0, 1] keeps only block 1 (block 5's end is missing)
    assert expected[1][1] == 0.0 and G[1, 1].item() == 0.0
    assert G[0, 1].item() == pytest.approx(0.1, abs=1e-6)
    # G[2, 2]: block 2 ends at inf, block 3 starts at inf -> no valid drop
    assert G[2, 2].item() == 0.0


def test_accumulate_loss_drops_all_missing_is_zero():
    G = lmo.accumulate_loss_drops(torch.full((5, 2), math.nan), torch.tensor([0, 1, 1, 0]), 2)
    assert torch.equal(G, torch.zeros(2, 2))


# ---- solve and diagonal ablation -------------------------------------------------------------------


@pytest.mark.parametrize("k, f", SETTINGS, ids=SETTING_IDS)
def test_solve_mixing_law_matches_linalg_solve(k, f):
    gen = torch.Generator().manual_seed(k)
    G = torch.randn(k, k, generator=gen, dtype=torch.float64)
    W = w_float64(k, f)
    # A W = G  <=>  W^T A^T = G^T
    expected = torch.linalg.solve(W.T, G.T).T
    got = lmo.solve_mixing_law(G, lmo.smoothed_one_hot_inverse(k, f, dtype=torch.float64))
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    got32 = lmo.solve_mixing_law(G.float(), lmo.smoothed_one_hot_inverse(k, f))
    torch.testing.assert_close(got32.double(), expected, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("k, f", SETTINGS, ids=SETTING_IDS)
def test_solve_recovers_a_planted_A_under_the_linear_law(k, f):
    gen = torch.Generator().manual_seed(100 + k)
    A = torch.rand(k, k, generator=gen, dtype=torch.float64)
    W = w_float64(k, f)
    # column j of G is the drop from training on mixture W[j]: A @ W[j]
    G = torch.stack([A @ W[j] for j in range(k)], dim=1)
    got = lmo.solve_mixing_law(G, lmo.smoothed_one_hot_inverse(k, f, dtype=torch.float64))
    torch.testing.assert_close(got, A, atol=1e-10, rtol=1e-10)


def test_solve_mixing_law_is_batched():
    k, f = 4, 0.7
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(2, 3, k, k, generator=gen, dtype=torch.float64)
    W_inv = lmo.smoothed_one_hot_inverse(k, f, dtype=torch.float64)
    got = lmo.solve_mixing_law(G, W_inv)
    assert got.shape == (2, 3, k, k)
    W = w_float64(k, f)
    for a in range(2):
        for b in range(3):
            torch.testing.assert_close(got[a, b], torch.linalg.solve(W.T, G[a, b].T).T)


def test_diagonal_ablation():
    G = torch.tensor([[[2.0, 9.0], [9.0, 4.0]], [[1.0, -1.0], [-1.0, -3.0]]])
    got = lmo.diagonal_ablation(G, 0.5)
    assert got.shape == (2, 2, 2)
    assert got.tolist() == [[[4.0, 0.0], [0.0, 8.0]], [[2.0, 0.0], [0.0, -6.0]]]


def test_diagonal_ablation_recovers_a_diagonal_A_exactly():
    # under the linear law with a diagonal A: G[j, j] = A[j, j] * f, so diag(G) / f = diag(A)
    k, f = 5, 0.6
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64))
    W = w_float64(k, f)
    G = torch.stack([A @ W[j] for j in range(k)], dim=1)
    torch.testing.assert_close(lmo.diagonal_ablation(G, f), A)


# ---- normalisation ---------------------------------------------------------------------------------


def loop_normalize(A: list[list[float]]) -> list[list[float]]:
    lo = min(min(row) for row in A)
    shift = lo if lo < 0 else 0.0
    B = [[v - shift for v in row] for row in A]
    total = sum(sum(row) for row in B)
    return [[v / total if total > 0 else 0.0 for v in row] for row in B]


@pytest.mark.parametrize(
    "A",
    [
        [[1.0, 2.0], [3.0, 4.0]],
        [[-1.0, 2.0], [3.0, 0.5]],
        [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [-2.0, 5.0, 1.0]],
        [[-5.0, -1.0], [-2.0, -3.0]],
    ],
    ids=["positive", "negative-min", "zeros-and-negative", "all-negative"],
)
def test_normalize_matches_loops(A):
    got = lmo.normalize_mixing_matrix(torch.tensor(A, dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor(loop_normalize(A), dtype=torch.float64))
    assert (got >= 0).all() and got.sum().item() == pytest.approx(1.0)


def test_normalize_positive_minimum_is_not_shifted():
    A = torch.tensor([[2.0, 3.0], [4.0, 1.0]])
    torch.testing.assert_close(lmo.normalize_mixing_matrix(A), A / 10)


@pytest.mark.parametrize("value", [0.0, -2.5], ids=["all-zero", "all-equal-negative"])
def test_normalize_zero_sum_guard_gives_zeros(value):
    got = lmo.normalize_mixing_matrix(torch.full((3, 3), value))
    assert torch.equal(got, torch.zeros(3, 3))


def test_normalize_all_equal_positive_is_uniform():
    got = lmo.normalize_mixing_matrix(torch.full((3, 3), 7.0))
    torch.testing.assert_close(got, torch.full((3, 3), 1 / 9))


def test_normalize_is_batched_per_matrix():
    batch = [
        [[1.0, 2.0], [3.0, 4.0]],
        [[-1.0, 2.0], [3.0, 0.5]],
        [[-2.0, -2.0], [-2.0, -2.0]],
    ]
    got = lmo.normalize_mixing_matrix(torch.tensor(batch, dtype=torch.float64))
    for b, A in enumerate(batch):
        torch.testing.assert_close(got[b], torch.tensor(loop_normalize(A), dtype=torch.float64))


# ---- exponentiated gradient, EMA, floor ------------------------------------------------------------


def loop_eg(p: list[float], A: list[list[float]], eta: float) -> list[float]:
    k = len(p)
    col = [sum(A[i][j] for i in range(k)) for j in range(k)]
    w = [p[j] * math.exp(eta * col[j]) for j in range(k)]
    return [v / sum(w) for v in w]


def test_exponentiated_gradient_matches_loops():
    gen = torch.Generator().manual_seed(3)
    A = lmo.normalize_mixing_matrix(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    for eta in (0.1, 1.0, 5.0):
        got = lmo.exponentiated_gradient(p, A, eta)
        torch.testing.assert_close(
            got, torch.tensor(loop_eg(p.tolist(), A.tolist(), eta), dtype=torch.float64)
        )


def test_exponentiated_gradient_keeps_zeros_and_is_batched():
    A = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    p = torch.tensor([[0.0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    got = lmo.exponentiated_gradient(p, A.expand(2, 3, 3), 1.0)
    assert got[0, 0].item() == 0.0
    torch.testing.assert_close(got[0], torch.tensor(loop_eg([0.0, 0.5, 0.5], A.tolist(), 1.0)))
    torch.testing.assert_close(got[1], torch.tensor(loop_eg([1 / 3] * 3, A.tolist(), 1.0)))
    # eta = 0 leaves p unchanged
    torch.testing.assert_close(lmo.exponentiated_gradient(p[1], A, 0.0), p[1])


def test_ema_matrix():
    A = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    prev = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(lmo.ema_matrix(A, prev, 0.1), torch.tensor([[0.9, 0.0], [0.0, 0.1]]))
    assert torch.equal(lmo.ema_matrix(A, prev, 0.0), A)
    assert torch.equal(lmo.ema_matrix(A, prev, 1.0), prev)


def test_ema_proportions_start_from_uniform():
    A = torch.tensor([[0.2, 0.3], [0.1, 0.4]], dtype=torch.float64)
    got = lmo.ema_proportions(A, 0.7)
    torch.testing.assert_close(got, torch.tensor(loop_eg([0.5, 0.5], A.tolist(), 0.7), dtype=torch.float64))


@pytest.mark.parametrize("eta", [0.1, 0.2, 1.0, 3.0], ids=lambda e: f"eta{e}")
def test_ema_proportions_ratio_is_bounded_by_e_to_the_eta(eta):
    gen = torch.Generator().manual_seed(int(eta * 10))
    A = lmo.normalize_mixing_matrix(torch.randn(64, 5, 5, generator=gen, dtype=torch.float64))
    p = lmo.ema_proportions(A, eta)
    ratio = p.amax(dim=-1) / p.amin(dim=-1)
    assert (ratio <= math.exp(eta) * (1 + 1e-12)).all()
    # the bound is attained when the whole mass sits in one column
    one_column = torch.zeros(5, 5, dtype=torch.float64)
    one_column[:, 2] = 0.2
    p = lmo.ema_proportions(one_column, eta)
    assert (p.max() / p.min()).item() == pytest.approx(math.exp(eta), rel=1e-12)


def test_cumulative_compounds_while_ema_stays_bounded():
    eta, rounds = 1.0, 10
    A = torch.zeros(3, 3, dtype=torch.float64)
    A[:, 0] = 1 / 3  # normalised, every domain's loss drops from training on domain 0
    p_cum = torch.full((3,), 1 / 3, dtype=torch.float64)
    A_bar = A.clone()
    for _ in range(rounds):
        p_cum = lmo.exponentiated_gradient(p_cum, A, eta)
        A_bar = lmo.ema_matrix(A, A_bar, 0.5)
        p_ema = lmo.ema_proportions(A_bar, eta)
    assert (p_cum[0] / p_cum[1]).item() == pytest.approx(math.exp(eta * rounds), rel=1e-9)
    assert (p_ema[0] / p_ema[1]).item() == pytest.approx(math.exp(eta), rel=1e-9)


@pytest.mark.parametrize("floor", [0.01, 0.1, 0.25], ids=lambda f: f"floor{f}")
def test_apply_floor(floor):
    p = torch.tensor([[0.97, 0.01, 0.02, 0.0], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    got = lmo.apply_floor(p, floor)
    torch.testing.assert_close(got, (1 - 4 * floor) * p + floor)
    assert (got >= floor - 1e-15).all()
    torch.testing.assert_close(got.sum(-1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(got[1], p[1])  # uniform is a fixed point


def test_apply_floor_zero_is_identity_and_one_over_k_is_uniform():
    p = torch.tensor([0.7, 0.2, 0.1])
    assert lmo.apply_floor(p, 0.0) is p
    torch.testing.assert_close(lmo.apply_floor(p, 1 / 3), torch.full((3,), 1 / 3))
