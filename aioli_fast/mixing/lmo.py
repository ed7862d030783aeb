"""The linear mixing optimization (LMO) mathematics as pure tensor functions.

Every online method in the Aioli paper assumes the linear dynamic mixing law

    L_{t+1} = L_t - A_t p_t          (L: [k] per-domain losses, p: [k] proportions, A: [k, k])

and updates the proportions by exponentiated gradient on the average loss. The methods differ only in
how they set A_t. Aioli fits A_t online from sequential loss drops measured while training on
*smoothed one-hot* mixtures (LearnParams); this module holds each step of that procedure as a function
of tensors, so it can be tested alone and run on the training device without host round trips.

Shapes follow the paper's notation, so the number of domains is ``k`` here (everywhere else in the
package, kernels, stream and mixers included, it is ``D``): ``L_k`` losses, ``p_k`` proportions,
``A_kk``/``G_kk`` matrices whose row i is the loss of domain i and column j the domain trained on.
Leading batch dimensions are allowed wherever a function says so. Nothing here calls ``.item()`` or
otherwise reads device values on the host.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError


def check_one_hot_factor(one_hot_factor: float, num_domains: int) -> None:
    """Reject settings where the smoothed one-hot mixtures are not a usable basis.

    The mixture matrix W is singular exactly when ``f = 1/k`` (every row is uniform); values close to
    it make the solve for A ill-conditioned by ``1/|kf - 1|``.
    """
    k, f = num_domains, one_hot_factor
    if k < 2:
        raise ConfigError(f"LearnParams needs at least 2 domains, got {k}")
    if not (math.isfinite(f) and 0 < f <= 1):
        raise ConfigError(f"mixing.one_hot_factor must be in (0, 1], got {f}")
    if abs(k * f - 1) < 1e-3:
        raise ConfigError(
            f"mixing.one_hot_factor={f} is (almost) 1/k for k={k} domains: every smoothed one-hot mixture "
            f"is then uniform and A cannot be solved for; use a value away from {1 / k:.4g}"
        )


def smoothed_one_hot(
    num_domains: int, one_hot_factor: float, *, device=None, dtype=torch.float32
) -> torch.Tensor:
    """W [k, k]: row j is the mixture that puts ``f`` on domain j and ``(1-f)/(k-1)`` on every other one."""
    check_one_hot_factor(one_hot_factor, num_domains)
    k, f = num_domains, one_hot_factor
    off = (1.0 - f) / (k - 1)
    W = torch.full((k, k), off, device=device, dtype=dtype)
    W.fill_diagonal_(f)
    return W


def smoothed_one_hot_inverse(
    num_domains: int, one_hot_factor: float, *, device=None, dtype=torch.float32
) -> torch.Tensor:
    """W⁻¹ [k, k] in closed form.

    W = a·I + b·11ᵀ with b = (1-f)/(k-1), a = f - b, and a + k·b = 1, so W⁻¹ = (I - b·11ᵀ) / a.
    """
    check_one_hot_factor(one_hot_factor, num_domains)
    k, f = num_domains, one_hot_factor
    b = (1.0 - f) / (k - 1)
    a = f - b
    W_inv = torch.full((k, k), -b / a, device=device, dtype=dtype)
    W_inv.diagonal().add_(1.0 / a)
    return W_inv


def learn_params_order(
    num_domains: int, sweeps: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[R·k] int64 (CPU): R random permutations of the k domains, concatenated.

    The order in which LearnParams trains on each domain's smoothed one-hot mixture. It is drawn on the
    host from ``generator`` (a CPU generator), so the schedule of a round is known without a device read.
    """
    if sweeps < 1:
        raise ConfigError(f"mixing.sweeps must be >= 1, got {sweeps}")
    perms = [torch.randperm(num_domains, generator=generator) for _ in range(sweeps)]
    return torch.cat(perms)


def mirrored_order(num_domains: int, sweeps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[R·k] int64 (CPU): R sweeps in pairs, a random permutation of the k domains followed by its reverse.

    Every domain's two blocks of a pair sit at mirrored positions, so their mean position is the same for
    all domains: a loss drift that is linear in time adds the same amount to every column of G, which the
    update does not see (it depends on column sums only through differences). Needs an even ``sweeps``.
    """
    if sweeps < 2 or sweeps % 2:
        raise ConfigError(f"mixing.block_order 'mirrored' needs an even mixing.sweeps >= 2, got {sweeps}")
    perms = []
    for _ in range(sweeps // 2):
        perm = torch.randperm(num_domains, generator=generator)
        perms += [perm, perm.flip(0)]
    return torch.cat(perms)


def learn_params_schedule(order: torch.Tensor, block_steps: int) -> torch.Tensor:
    """[R·k·S] int64: the domain whose smoothed one-hot mixture is trained on at each LearnParams step."""
    if block_steps < 1:
        raise ConfigError(f"mixing.block_steps must be >= 1, got {block_steps}")
    return order.repeat_interleave(block_steps)


def losses_from_sums(loss_sum_k: torch.Tensor, count_k: torch.Tensor) -> torch.Tensor:
    """Mean loss per domain [..., k] from sums and counts; NaN where a domain has no tokens or a bad sum."""
    count = count_k.to(loss_sum_k.dtype)
    loss = loss_sum_k / count.clamp_min(1)
    return torch.where((count > 0) & torch.isfinite(loss), loss, torch.full_like(loss, float("nan")))


def accumulate_loss_drops(L_nk: torch.Tensor, order: torch.Tensor, num_domains: int) -> torch.Tensor:
    """G [k, k] from the sequential loss measurements of one LearnParams round.

    Args:
        L_nk: [R·k + 1, k] per-domain losses: row 0 before the first block, row n+1 after block n.
            NaN marks a domain missing from a measurement.
        order: [R·k] domain trained on in each block (device or CPU; moved to ``L_nk``'s device).

    Returns:
        G with G[i, j] = the mean, over the blocks that trained on j, of the drop of domain i's loss across
        that block (``L_prev - L_new``: the differences are sequential). With every measurement present
        this is the sum over the R sweeps divided by R. Drops with a missing end are left out of the mean;
        an entry with no valid drop at all is 0 (no evidence of an effect).
    """
    drops_nk = L_nk[:-1] - L_nk[1:]
    valid_nk = torch.isfinite(drops_nk)
    drops_nk = torch.where(valid_nk, drops_nk, torch.zeros_like(drops_nk))
    idx = order.to(L_nk.device)
    k = num_domains
    sums_kk = torch.zeros(k, k, device=L_nk.device, dtype=L_nk.dtype).index_add_(1, idx, drops_nk.T)
    counts_kk = torch.zeros(k, k, device=L_nk.device, dtype=L_nk.dtype).index_add_(
        1, idx, valid_nk.T.to(L_nk.dtype)
    )
    return torch.where(counts_kk > 0, sums_kk / counts_kk.clamp_min(1), torch.zeros_like(sums_kk))


def solve_mixing_law(G: torch.Tensor, W_inv: torch.Tensor) -> torch.Tensor:
    """A = G·W⁻¹ ([..., k, k], batched): the A for which ``A @ W = G``.

    Column j of G is the loss drop from training on mixture W[j]; under the linear law that drop is
    A·W[j], so G = A·Wᵀ = A·W (W is symmetric). Pass the inverse from :func:`smoothed_one_hot_inverse`.
    """
    return G @ W_inv


def solve_partial_mixing_law(
    G: torch.Tensor, W_inv: torch.Tensor, p_k: torch.Tensor, learn_fraction: float
) -> torch.Tensor:
    """A [..., k, k] when each block trained on ``(1 - e)·p + e·W[j]`` (a fraction e of every batch on
    the smoothed one-hot mixture, the rest on the current proportions p).

    Under the linear law G = (1 - e)·(A p)·1ᵀ + e·A·W, so G·W⁻¹ = (1 - e)·(A p)·1ᵀ + e·A (W is symmetric
    with unit row sums, hence 1ᵀW⁻¹ = 1ᵀ) and (G·W⁻¹)·p = A p. Therefore

        A = G·W⁻¹·(I − (1 − e)·p·1ᵀ) / e,

    exact under the law; e = 1 is :func:`solve_mixing_law`. The noise of G is amplified by 1/e.
    """
    if not 0 < learn_fraction <= 1:
        raise ConfigError(f"mixing.learn_fraction must be in (0, 1], got {learn_fraction}")
    GW = G @ W_inv
    Ap = (GW @ p_k.unsqueeze(-1)).squeeze(-1)  # [..., k]
    return (GW - (1.0 - learn_fraction) * Ap.unsqueeze(-1)) / learn_fraction


def diagonal_ablation(G: torch.Tensor, one_hot_factor: float) -> torch.Tensor:
    """The diagonal-only estimate [..., k, k]: diag(G) / f, zero off the diagonal."""
    return torch.diag_embed(torch.diagonal(G, dim1=-2, dim2=-1) / one_hot_factor)


def normalize_mixing_matrix(A: torch.Tensor) -> torch.Tensor:
    """Shift A by its minimum when that is negative, then divide by its sum ([..., k, k], batched).

    An all-equal A (sum 0 after the shift) becomes all zeros, which leaves the proportions unchanged.
    A non-finite A also becomes zeros: check ``torch.isfinite(A)`` *before* normalising to skip it.
    """
    lo = A.amin(dim=(-2, -1), keepdim=True).clamp(max=0)
    A = A - lo
    total = A.sum(dim=(-2, -1), keepdim=True)
    return torch.where(total > 0, A / total.clamp_min(torch.finfo(A.dtype).tiny), torch.zeros_like(A))


def exponentiated_gradient(p_k: torch.Tensor, A_kk: torch.Tensor, eta: float) -> torch.Tensor:
    """Cumulative update p ∝ p ⊙ exp(η · Σ_i A[i, :]) (batched over leading dims); zeros stay zero."""
    logits = torch.log(p_k) + eta * A_kk.sum(dim=-2)
    return torch.softmax(logits, dim=-1)


def ema_matrix(A_kk: torch.Tensor, A_prev_kk: torch.Tensor, ema: float) -> torch.Tensor:
    """Ā = (1 - e)·A + e·Ā_prev."""
    return (1.0 - ema) * A_kk + ema * A_prev_kk


def ema_proportions(A_bar_kk: torch.Tensor, eta: float) -> torch.Tensor:
    """EMA variant: p ∝ exp(η · Σ_i Ā[i, :]) from uniform (max p_i/p_j <= e^η for a normalised Ā)."""
    return torch.softmax(eta * A_bar_kk.sum(dim=-2), dim=-1)


def apply_floor(p_k: torch.Tensor, min_proportion: float) -> torch.Tensor:
    """Mix with uniform so that every proportion is at least ``min_proportion`` (needs k·floor <= 1)."""
    if min_proportion <= 0:
        return p_k
    k = p_k.shape[-1]
    return (1.0 - k * min_proportion) * p_k + min_proportion


# ---- the loss-trend fit (measurement: round) --------------------------------------------------------


def accumulate_trend(
    F_k33: torch.Tensor, exposure_k: torch.Tensor, loss_sum_k: torch.Tensor, count_k: torch.Tensor
) -> None:
    """Add one observation to the per-domain trend statistics ``F_k33`` [k, 3, 3] in place.

    The observation is a micro-batch's per-domain loss sums and token counts, trained after
    ``exposure_k`` steps' worth of each domain. Domain i gets F[i] += n_i · f fᵀ, with
    f = (1, X_i, ℓ_i) and ℓ_i its mean token loss: a token-weighted least-squares fit of ℓ_i on X_i."""
    F_k33 += trend_increment(exposure_k, loss_sum_k, count_k, F_k33.dtype)


def trend_increment(
    exposure_k: torch.Tensor, loss_sum_k: torch.Tensor, count_k: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """One observation's term of :func:`accumulate_trend`, n_i · f fᵀ [k, 3, 3] in ``dtype`` (computed
    once when several statistics take the same observation)."""
    n_k = count_k.to(dtype)
    loss_k = loss_sum_k.to(dtype) / n_k.clamp_min(1)
    f_k3 = torch.stack([torch.ones_like(loss_k), exposure_k.to(dtype), loss_k], dim=-1)
    return n_k[:, None, None] * f_k3.unsqueeze(-1) * f_k3.unsqueeze(-2)


def fit_trends(
    F_k33: torch.Tensor, obs_k: torch.Tensor, F2_k33: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each domain's loss drop per step's worth of its own data, and the variance of that estimate.

    Fits ``ℓ_i = c_i − a_i·X_i`` to the statistics of :func:`accumulate_trend` (``obs_k``: each domain's
    number of observations, weighted as the statistics are): ``a`` [k] is the diagonal A of the linear
    mixing law, everything that lowered domain i's loss credited to training on it (the paper's diagonal
    ablation). When the statistics down-weight older observations by factors w (``memory``), ``F2_k33``
    holds the same sums with w² and the variance is the weighted fit's,
    σ²_i · Σ n w² (X_i − X̄_i)² / (Σ n w (X_i − X̄_i)²)²; without it (every w = 1) that is the least-squares
    σ²_i / Σ n (X_i − X̄_i)². σ²_i is the residual variance per token. A domain with fewer than three
    observations, or whose exposure never changed, gets 0 and variance 0 (no evidence).
    """
    F = F_k33.to(torch.float64)
    n, sx, sy = F[:, 0, 0], F[:, 0, 1], F[:, 0, 2]
    tiny = torch.finfo(F.dtype).tiny
    inv_n = 1 / n.clamp_min(tiny)
    mean_x = sx * inv_n
    sxx = F[:, 1, 1] - sx * mean_x  # centred sums
    sxy = F[:, 1, 2] - sx * sy * inv_n
    syy = F[:, 2, 2] - sy * sy * inv_n
    ok = (obs_k >= 3) & (sxx > 1e-9 * F[:, 1, 1].clamp_min(tiny)) & (n > 0)
    slope = sxy / sxx.clamp_min(tiny)
    rss = (syy - slope * sxy).clamp_min(0)
    sigma2 = rss / (obs_k.to(F.dtype) - 2).clamp_min(1)
    if F2_k33 is None:
        spread = sxx
    else:
        F2 = F2_k33.to(torch.float64)
        spread = (F2[:, 1, 1] - 2 * mean_x * F2[:, 0, 1] + mean_x**2 * F2[:, 0, 0]).clamp_min(0)
    var = sigma2 * spread / sxx.clamp_min(tiny) ** 2
    zero = torch.zeros_like(slope)
    return torch.where(ok, -slope, zero).to(F_k33.dtype), torch.where(ok, var, zero).to(F_k33.dtype)


def gated_update(
    p_k: torch.Tensor,
    gain_k: torch.Tensor,
    var_k: torch.Tensor,
    eta: float,
    significance: float,
    max_change: float,
    lowest: float = 0.0,
    useful: float = 1.0,
) -> torch.Tensor:
    """p ∝ p ⊙ exp(−Δ): lower the domains the data say are worth little, and only those.

    ``gain_k`` is each domain's column of A summed (how much a step on domain j lowers the summed loss;
    with the diagonal A of :func:`fit_trends`, its own loss), ``var_k`` its variance. A domain's shortfall
    is ``useful`` x mean(gain) − gain_j: how far it falls below that fraction of the average domain. It
    counts only beyond ``significance`` standard errors of gain_j − mean(gain) (a soft threshold: a
    difference within the estimate's own noise moves nothing); divided by mean(gain) (unit-free) and
    times ``eta`` it is Δ_j, the decrease of the domain's log proportion, at most ln(``max_change``)
    per update, and none that would take it below ``lowest`` (a proportion; one below it already is
    not lowered further). The renormalisation shares the freed mass among the others in proportion: a
    domain that gains more than the average is not raised for it (a fast-falling loss is often an easy
    domain near its floor). When mean(gain) is not ``significance`` standard errors above 0 (no clear
    loss drop to compare with) nothing moves. Zeros stay zero.
    """
    k = gain_k.shape[-1]
    mean = gain_k.mean(-1, keepdim=True)
    shortfall = useful * mean - gain_k
    se = torch.sqrt((var_k * (1 - 2 / k) + var_k.sum(-1, keepdim=True) / k**2).clamp_min(0))
    beyond = torch.relu(shortfall - significance * se)
    tiny = torch.finfo(gain_k.dtype).tiny
    # the average domain's drop must itself stand out of the noise, or relative shortfalls mean nothing
    mean_se = torch.sqrt(var_k.sum(-1, keepdim=True).clamp_min(0)) / k
    learning = mean > significance * mean_se
    step = torch.where(learning, eta * beyond / mean.clamp_min(tiny), torch.zeros_like(beyond))
    step = step.clamp(max=math.log(max_change))
    log_p = torch.log(p_k)
    # no lower than ``lowest`` (before the renormalisation, which only raises the lowered ones)
    step = torch.minimum(step.to(p_k.dtype), (log_p - math.log(lowest)).clamp_min(0) if lowest > 0 else step)
    return torch.softmax(log_p - step, dim=-1)
