"""Per-domain cross-entropy, installed as ``aioli_fast.kernels``.

Public functions:

- :func:`domain_cross_entropy`: logits [N, V] -> mean loss, per-domain loss sums [D], counts [D].
- :func:`linear_domain_cross_entropy`: hidden [N, H] and weight [V, H] -> the same, without ever
  materialising the [N, V] logits on the Triton path.

Each runs one of two backends: the fused Triton kernels (``domain_ce.py``, ``linear_domain_ce.py``) or
the pure-PyTorch reference (``reference.py``); every argument check of both is in ``checks.py``.
``backend="auto"`` (the default) picks Triton for CUDA tensors when Triton is importable and the
reference otherwise; ``backend=`` or the environment variable ``AIOLI_KERNELS`` (``auto``, ``triton``,
``reference``; the argument wins) forces one. The Triton path runs on CPU tensors only under Triton's
interpreter (``TRITON_INTERPRET=1`` set before the kernels are imported), which is how the CPU test
suite exercises it. See docs/kernels.md.

This package imports nothing from the rest of ``aioli_fast``; Triton is imported on first use.
"""

from __future__ import annotations

import os

import torch

from .checks import check_grad_contract, check_public_options
from .reference import (
    DomainLoss,
    domain_cross_entropy_reference,
    linear_domain_cross_entropy_reference,
)

__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "DomainLoss",
    "domain_cross_entropy",
    "domain_cross_entropy_reference",
    "linear_domain_cross_entropy",
    "linear_domain_cross_entropy_reference",
    "resolve_backend",
]

BACKENDS = ("auto", "triton", "reference")
BACKEND_ENV_VAR = "AIOLI_KERNELS"


def _triton_interpreted() -> bool | None:
    """None when Triton cannot be imported; else whether its kernels run under the interpreter."""
    try:
        from . import domain_ce
    except ImportError:
        return None
    return domain_ce.INTERPRETED


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """``"triton"`` or ``"reference"`` for tensors on ``device`` (argument, then AIOLI_KERNELS, then auto)."""
    choice = backend if backend is not None else os.environ.get(BACKEND_ENV_VAR, "auto")
    if choice not in BACKENDS:
        source = "backend" if backend is not None else BACKEND_ENV_VAR
        raise ValueError(f"{source} must be one of {BACKENDS}, got {choice!r}")
    if choice == "reference" or (choice == "auto" and device.type != "cuda"):
        return "reference"
    interpreted = _triton_interpreted()
    if choice == "auto":
        return "triton" if interpreted is False else "reference"
    if interpreted is None:
        raise ValueError("backend 'triton' needs the triton package, which cannot be imported here")
    if device.type == "cuda" and interpreted:
        raise ValueError("backend 'triton' on CUDA tensors needs TRITON_INTERPRET unset")
    if device.type != "cuda" and not interpreted:
        raise ValueError(
            f"backend 'triton' needs CUDA tensors (got {device.type}), or TRITON_INTERPRET=1 set before "
            "aioli_fast.kernels runs its first Triton call (CPU, for tests)"
        )
    return "triton"


def _loss_options(
    ignore_index: int,
    domain_weights: torch.Tensor | None,
    lse_square_scale: float,
    softcap: float | None,
) -> dict:
    """The keyword arguments that both backends of both public functions take."""
    return dict(
        ignore_index=ignore_index,
        domain_weights_D=domain_weights,
        lse_square_scale=lse_square_scale,
        softcap=softcap,
    )


def domain_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    *,
    ignore_index: int = -100,
    domain_weights: torch.Tensor | None = None,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    inplace: bool = False,
    deterministic: bool = False,
    grad_scale: float | torch.Tensor = 1.0,
    grad_on: str = "loss",
    backend: str | None = None,
) -> DomainLoss:
    """Mean token cross-entropy and per-domain fp32 loss sums and token counts.

    Args:
        logits: [N, V] float logits (fp32 math internally whatever the dtype).
        labels: [N] integer targets in [0, V); ``ignore_index`` tokens count nowhere.
        domain_ids: [N] integer domain per token, in [0, num_domains) (unused on ignored tokens).
        num_domains: D.
        domain_weights: optional [D] weights of each domain's terms in ``loss`` (not in ``loss_sum``).
        lse_square_scale: z-loss coefficient; ``lse_square_scale * logsumexp**2`` joins ``loss``.
        softcap: optional logit soft-cap ``c``: logits become ``c * tanh(logits / c)`` first.
        inplace: Triton path only: write the gradient over ``logits`` (saves N*V memory; the logits
            are destroyed; refused for leaf tensors).
        deterministic: Triton path only: reduce per domain in a fixed order instead of with atomics.
        grad_scale, grad_on: Triton path only, the gradient contract: the gradient the caller will
            send back. ``grad_on="loss"`` (default): ``loss`` receives ``grad_scale`` (1.0 for
            ``loss.backward()``; 1/k when the loss is divided by k for gradient accumulation).
            ``grad_on="loss_sum"``: ``loss_sum`` receives ``grad_scale`` (a float, or a [] or [D]
            device tensor), for example ``1 / tokens`` when ``loss_sum.sum() / tokens`` is
            backpropagated. Any upstream gradient is correct; the promised one makes backward free.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (default: ``AIOLI_KERNELS`` or auto).

    Returns:
        DomainLoss(loss [] fp32, loss_sum [D] fp32, count [D] fp32): ``loss`` is
        ``sum_i w[d_i] * (ce_i + z_i) / max(count.sum(), 1)`` (0, not NaN, when every token is
        ignored); ``loss_sum`` is the plain cross-entropy sum per domain. ``loss`` and ``loss_sum`` are
        differentiable in ``logits``. No host synchronisation.
    """
    check_public_options(ignore_index, grad_scale, deterministic, inplace=inplace)
    check_grad_contract(grad_on, grad_scale, num_domains, logits.device)
    options = _loss_options(ignore_index, domain_weights, lse_square_scale, softcap)
    if resolve_backend(logits.device, backend) == "reference":
        return domain_cross_entropy_reference(logits, labels, domain_ids, num_domains, **options)
    from .domain_ce import domain_cross_entropy_triton

    return domain_cross_entropy_triton(
        logits,
        labels,
        domain_ids,
        num_domains,
        **options,
        inplace=inplace,
        deterministic=deterministic,
        grad_scale=grad_scale,
        grad_on=grad_on,
    )


def linear_domain_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    domain_weights: torch.Tensor | None = None,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    deterministic: bool = False,
    grad_scale: float = 1.0,
    weight_grad_fp32: bool = True,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> DomainLoss:
    """Per-domain cross-entropy of the projection ``hidden @ weight.T + bias``.

    Args:
        hidden: [N, H] final hidden states.
        weight: [V, H] output projection (lm_head) weight, same dtype as ``hidden`` (under autocast
            both are cast to the autocast dtype, as ``F.linear`` would).
        bias: optional [V].
        labels, domain_ids, num_domains, ignore_index, domain_weights, lse_square_scale, softcap,
            deterministic, grad_scale, backend: as in :func:`domain_cross_entropy`.
        weight_grad_fp32: Triton path only: accumulate the weight gradient over chunks in fp32
            (default; False accumulates in the weight's dtype, saving 2 x V x H bytes for bf16).
        chunk_size: Triton path only: rows per chunk of logits (default: the largest power of 2
            whose [C, V] logits fit 256 MiB).

    Returns:
        DomainLoss as in :func:`domain_cross_entropy`; differentiable in hidden, weight and bias.
    """
    check_public_options(ignore_index, grad_scale, deterministic, weight_grad_fp32=weight_grad_fp32)
    check_grad_contract("loss", grad_scale, num_domains, hidden.device)
    options = dict(bias_V=bias, **_loss_options(ignore_index, domain_weights, lse_square_scale, softcap))
    if resolve_backend(hidden.device, backend) == "reference":
        return linear_domain_cross_entropy_reference(
            hidden, weight, labels, domain_ids, num_domains, **options
        )
    from .linear_domain_ce import linear_domain_cross_entropy_triton

    return linear_domain_cross_entropy_triton(
        hidden,
        weight,
        labels,
        domain_ids,
        num_domains,
        **options,
        deterministic=deterministic,
        grad_scale=grad_scale,
        weight_grad_fp32=weight_grad_fp32,
        chunk_size=chunk_size,
    )
