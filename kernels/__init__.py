"""Per-domain cross-entropy, installed as ``aioli_fast.kernels``.

Public functions (stable signatures; the fused Triton kernels slot in behind them):

- :func:`domain_cross_entropy`: logits [N, V] -> mean loss, per-domain loss sums [D], counts [D].
- :func:`linear_domain_cross_entropy`: hidden [N, H] and weight [V, H] -> the same, without the caller
  materialising the logits.

This package imports nothing from the rest of ``aioli_fast``.
"""

from __future__ import annotations

import torch

from .reference import (
    DomainLoss,
    domain_cross_entropy_reference,
    linear_domain_cross_entropy_reference,
)

__all__ = [
    "DomainLoss",
    "domain_cross_entropy",
    "domain_cross_entropy_reference",
    "linear_domain_cross_entropy",
    "linear_domain_cross_entropy_reference",
]


def domain_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    *,
    ignore_index: int = -100,
) -> DomainLoss:
    """Mean token cross-entropy and per-domain fp32 loss sums and token counts.

    Args:
        logits: [N, V] float logits (fp32 math internally whatever the dtype).
        labels: [N] integer targets; ``ignore_index`` tokens count nowhere.
        domain_ids: [N] integer domain per token, in [0, num_domains).
        num_domains: D.

    Returns:
        DomainLoss(loss [] fp32, loss_sum [D] fp32, count [D] fp32); differentiable in ``logits``.
        ``loss`` is 0 (not NaN) when every token is ignored. No host synchronisation.
    """
    return domain_cross_entropy_reference(logits, labels, domain_ids, num_domains, ignore_index=ignore_index)


def linear_domain_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> DomainLoss:
    """Per-domain cross-entropy of the projection ``hidden @ weight.T + bias``.

    Args:
        hidden: [N, H] final hidden states.
        weight: [V, H] output projection (lm_head) weight.
        labels, domain_ids, num_domains, ignore_index: as in :func:`domain_cross_entropy`.
        bias: optional [V].

    Returns:
        DomainLoss as in :func:`domain_cross_entropy`; differentiable in hidden, weight and bias.
    """
    return linear_domain_cross_entropy_reference(
        hidden, weight, labels, domain_ids, num_domains, bias_V=bias, ignore_index=ignore_index
    )
