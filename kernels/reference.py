"""Pure-PyTorch reference of the per-domain cross-entropy.

This is the function every fast kernel must match, and the path CPU runs take. It computes the token
losses with one fp32 ``F.cross_entropy(reduction="none")`` and reduces them per domain with
``index_add`` (no Python loop over domains, no host synchronisation: nothing here calls ``.item()``
or branches on tensor values).

Contract (docs/kernels.md, section API):
    inputs   logits [N, V] (any float dtype) or hidden [N, H] + weight [V, H] (+ bias [V]),
             labels [N] (int), domain_ids [N] (int, values in [0, num_domains)),
             ``ignore_index`` marks tokens that count nowhere.
    outputs  loss      [] fp32, mean token loss over the non-ignored tokens (0 when there are none),
             loss_sum  [D] fp32, per-domain sum of token losses,
             count     [D] fp32, per-domain number of non-ignored tokens.
    ``loss`` and ``loss_sum`` are differentiable; ``count`` is not.

Options (the fused kernels implement the same ones; each is tested against this file):
    softcap            logits are replaced by ``softcap * tanh(logits / softcap)`` before everything else;
    lse_square_scale   z-loss: ``lse_square_scale * logsumexp(logits) ** 2`` is added to each counted
                       token's term in ``loss`` (not to ``loss_sum``);
    domain_weights_D   [D] per-domain weights of the terms in ``loss`` (not of ``loss_sum``).
    So ``loss = sum_i w[d_i] * (ce_i + z_i) / max(count, 1)`` while ``loss_sum[d]`` stays the plain
    cross-entropy sum of domain d (the statistic mixers and perplexities use).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .checks import check_call, check_inputs, check_linear_inputs


class DomainLoss(NamedTuple):
    """Result of a per-domain cross-entropy.

    loss:     [] fp32 mean over non-ignored tokens (0 when every token is ignored).
    loss_sum: [D] fp32 sum of token losses per domain.
    count:    [D] fp32 number of non-ignored tokens per domain.
    """

    loss: torch.Tensor
    loss_sum: torch.Tensor
    count: torch.Tensor


def domain_cross_entropy_reference(
    logits_NV: torch.Tensor,
    labels_N: torch.Tensor,
    domain_ids_N: torch.Tensor,
    num_domains: int,
    *,
    ignore_index: int = -100,
    domain_weights_D: torch.Tensor | None = None,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
) -> DomainLoss:
    """Mean cross-entropy plus per-domain loss sums and token counts, computed in fp32.

    Args:
        logits_NV: [N, V] logits, any float dtype (upcast to fp32 internally).
        labels_N: [N] integer class indices; ``ignore_index`` marks tokens that are skipped.
        domain_ids_N: [N] integer domain of each token, in [0, num_domains) for counted tokens
            (the value on ignored tokens is not used).
        num_domains: D, the number of domains.
        ignore_index: label value of tokens that count nowhere.
        domain_weights_D, lse_square_scale, softcap: the options in the module docstring.

    Returns:
        DomainLoss(loss [], loss_sum [D], count [D]), all fp32 on the logits' device.
    """
    check_call(
        logits_NV,
        labels_N,
        domain_ids_N,
        num_domains,
        domain_weights_D=domain_weights_D,
        lse_square_scale=lse_square_scale,
        softcap=softcap,
    )
    valid_N = labels_N != ignore_index
    safe_domains_N = torch.where(valid_N, domain_ids_N, torch.zeros_like(domain_ids_N)).long()
    logits_f_NV = logits_NV.float()
    if softcap is not None:
        logits_f_NV = softcap * torch.tanh(logits_f_NV / softcap)
    # One fused log-softmax + gather in fp32; ignored tokens get exactly 0 (even when their row of
    # logits is not finite) and no gradient.
    token_loss_N = F.cross_entropy(logits_f_NV, labels_N.long(), ignore_index=ignore_index, reduction="none")
    objective_N = token_loss_N
    if lse_square_scale:
        lse_N = torch.logsumexp(logits_f_NV, dim=-1)
        z_loss_N = torch.where(valid_N, lse_square_scale * lse_N.square(), torch.zeros_like(lse_N))
        objective_N = objective_N + z_loss_N
    if domain_weights_D is not None:
        objective_N = objective_N * domain_weights_D.float()[safe_domains_N]
    valid_f_N = valid_N.float()
    zeros_D = torch.zeros(num_domains, dtype=torch.float32, device=logits_NV.device)
    loss_sum_D = zeros_D.index_add(0, safe_domains_N, token_loss_N)
    count_D = zeros_D.index_add(0, safe_domains_N, valid_f_N)
    loss = objective_N.sum() / valid_f_N.sum().clamp_min(1.0)
    return DomainLoss(loss, loss_sum_D, count_D)


def linear_domain_cross_entropy_reference(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    labels_N: torch.Tensor,
    domain_ids_N: torch.Tensor,
    num_domains: int,
    *,
    bias_V: torch.Tensor | None = None,
    ignore_index: int = -100,
    domain_weights_D: torch.Tensor | None = None,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
) -> DomainLoss:
    """Per-domain cross-entropy of ``hidden_NH @ weight_VH.T (+ bias_V)``.

    The reference materialises the [N, V] logits (in the input dtype, as a plain matmul would); the
    fused kernel computes the same values without them. Gradients flow to hidden, weight and bias.

    Returns:
        DomainLoss(loss [], loss_sum [D], count [D]), fp32.
    """
    check_inputs(hidden_NH, labels_N, domain_ids_N, num_domains, name="hidden")
    check_linear_inputs(hidden_NH, weight_VH, bias_V)
    logits_NV = F.linear(hidden_NH, weight_VH, bias_V)
    return domain_cross_entropy_reference(
        logits_NV,
        labels_N,
        domain_ids_N,
        num_domains,
        ignore_index=ignore_index,
        domain_weights_D=domain_weights_D,
        lse_square_scale=lse_square_scale,
        softcap=softcap,
    )
