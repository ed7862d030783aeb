"""Argument checks of the per-domain cross-entropy, shared by the public functions, the reference and
the Triton path.

Every check reads metadata only (types, shapes, dtypes, devices, strides), never a tensor's values, so
none of them synchronises with the device. Each failure raises ``ValueError`` with a message that names
the argument (docs/kernels.md).
"""

from __future__ import annotations

import math

import torch


def check_flag(name: str, value: object) -> None:
    """``value`` is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def check_public_options(
    ignore_index: object, grad_scale: object, deterministic: object, **flags: object
) -> None:
    """The options the public functions check before dispatch: ``ignore_index`` an int, ``grad_scale``
    a finite non-zero float, ``deterministic`` and each of ``flags`` (name=value) a bool."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if isinstance(grad_scale, torch.Tensor):
        pass  # a tensor scale (grad_on="loss_sum" only): check_grad_contract checks its shape, no values
    elif isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float)) or grad_scale == 0:
        raise ValueError(f"grad_scale must be a non-zero float, got {grad_scale!r}")
    elif grad_scale != grad_scale or abs(grad_scale) == float("inf"):
        raise ValueError(f"grad_scale must be finite, got {grad_scale!r}")
    check_flag("deterministic", deterministic)
    for name, value in flags.items():
        check_flag(name, value)


GRAD_TARGETS = ("loss", "loss_sum")


def check_grad_contract(grad_on: object, grad_scale: object, num_domains: int, device: torch.device) -> None:
    """``grad_on`` names the output that receives the gradient (``"loss"`` or ``"loss_sum"``);
    ``grad_scale`` is a float, or for ``"loss_sum"`` also a [] or [D] float tensor on ``device``."""
    if grad_on not in GRAD_TARGETS:
        raise ValueError(f"grad_on must be one of {GRAD_TARGETS}, got {grad_on!r}")
    if not isinstance(grad_scale, torch.Tensor):
        return
    if grad_on != "loss_sum":
        raise ValueError('a tensor grad_scale is for grad_on="loss_sum"; for "loss" give a float')
    if not grad_scale.is_floating_point() or grad_scale.shape not in ((), (num_domains,)):
        raise ValueError(
            f"grad_scale must be a float, or a float tensor of shape () or ({num_domains},), got "
            f"{grad_scale.dtype} {tuple(grad_scale.shape)}"
        )
    if grad_scale.device != device:
        raise ValueError(f"grad_scale must be on {device} like the other inputs, got {grad_scale.device}")
    if grad_scale.requires_grad:
        raise ValueError("grad_scale must not require a gradient (it is a constant of the contract)")


def check_inputs(
    logits_or_hidden: torch.Tensor,
    labels: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    name: str = "logits",
) -> None:
    """``logits_or_hidden`` [N, *] float (called ``name`` in messages), ``labels`` [N] and
    ``domain_ids`` [N] integer, ``num_domains`` a positive int."""
    if logits_or_hidden.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, *], got shape {tuple(logits_or_hidden.shape)}")
    if not logits_or_hidden.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {logits_or_hidden.dtype}")
    n = logits_or_hidden.shape[0]
    for what, t in (("labels", labels), ("domain_ids", domain_ids)):
        if t.shape != (n,):
            raise ValueError(f"{what} must have shape ({n},) to match {name}, got {tuple(t.shape)}")
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"{what} must be an integer tensor, got {t.dtype}")
    if not isinstance(num_domains, int) or isinstance(num_domains, bool) or num_domains < 1:
        raise ValueError(f"num_domains must be a positive int, got {num_domains!r}")


def check_linear_inputs(
    hidden_NH: torch.Tensor, weight_VH: torch.Tensor, bias_V: torch.Tensor | None
) -> None:
    """The projection's shapes: ``weight_VH`` [V, H] for ``hidden_NH`` [N, H], ``bias_V`` [V] or None."""
    if weight_VH.dim() != 2 or weight_VH.shape[1] != hidden_NH.shape[1]:
        raise ValueError(
            f"weight must have shape [V, {hidden_NH.shape[1]}] to match hidden, got {tuple(weight_VH.shape)}"
        )
    if bias_V is not None and bias_V.shape != (weight_VH.shape[0],):
        raise ValueError(f"bias must have shape ({weight_VH.shape[0]},), got {tuple(bias_V.shape)}")


def check_options(
    num_domains: int,
    device: torch.device,
    *,
    domain_weights_D: torch.Tensor | None = None,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
) -> None:
    """The loss options: ``lse_square_scale`` a finite float >= 0, ``softcap`` None or a finite float
    > 0, ``domain_weights_D`` None or a float tensor [D] on ``device``."""
    if isinstance(lse_square_scale, bool) or not isinstance(lse_square_scale, (int, float)):
        raise ValueError(f"lse_square_scale must be a float >= 0, got {lse_square_scale!r}")
    if not math.isfinite(lse_square_scale) or lse_square_scale < 0:
        raise ValueError(f"lse_square_scale must be a finite float >= 0, got {lse_square_scale!r}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise ValueError(f"softcap must be None or a float > 0, got {softcap!r}")
        if not math.isfinite(softcap) or softcap <= 0:
            raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")
    if domain_weights_D is not None:
        if not isinstance(domain_weights_D, torch.Tensor) or not domain_weights_D.is_floating_point():
            raise ValueError(f"domain_weights must be a floating-point tensor of shape ({num_domains},)")
        if domain_weights_D.shape != (num_domains,):
            raise ValueError(
                f"domain_weights must have shape ({num_domains},), got {tuple(domain_weights_D.shape)}"
            )
        if domain_weights_D.device != device:
            raise ValueError(f"domain_weights must be on {device}, got {domain_weights_D.device}")


def check_call(
    logits_or_hidden: torch.Tensor,
    labels: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    *,
    domain_weights_D: torch.Tensor | None,
    lse_square_scale: float,
    softcap: float | None,
    projection: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> None:
    """:func:`check_inputs`, :func:`check_linear_inputs` for a ``projection`` (weight [V, H], bias [V]
    or None) of hidden states, then :func:`check_options`."""
    if projection is None:
        check_inputs(logits_or_hidden, labels, domain_ids, num_domains)
    else:
        check_inputs(logits_or_hidden, labels, domain_ids, num_domains, name="hidden")
        check_linear_inputs(logits_or_hidden, *projection)
    check_options(
        num_domains,
        logits_or_hidden.device,
        domain_weights_D=domain_weights_D,
        lse_square_scale=lse_square_scale,
        softcap=softcap,
    )


def check_same_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    """Each of ``tensors`` (name=tensor) that is not None lies on ``device``."""
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} must be on {device} like the other inputs, got {t.device}")


def check_inplace(logits_NV: torch.Tensor, inplace: bool) -> None:
    """``inplace=True`` overwrites the logits with their gradient, which autograd refuses for a leaf."""
    if inplace and logits_NV.requires_grad and logits_NV.is_leaf:
        raise ValueError("inplace=True overwrites the logits with their gradient: they must not be a leaf")


def check_inplace_stride(logits_NV: torch.Tensor, inplace: bool) -> None:
    """``inplace=True`` writes the gradient over the logits, so they need unit stride along V."""
    if inplace and logits_NV.stride(1) != 1:
        raise ValueError("inplace=True needs logits with unit stride along the vocabulary")


def check_launch_strides(logits_NV: torch.Tensor, grad_NV: torch.Tensor | None) -> None:
    """The forward kernel reads ``logits_NV`` [N, V] and writes ``grad_NV`` [N, V] with unit stride
    along V."""
    if logits_NV.stride(1) != 1 or (grad_NV is not None and grad_NV.stride(1) != 1):
        raise ValueError("logits and their gradient buffer must have unit stride along the vocabulary")


def check_chunk_size(chunk_size: object) -> None:
    """``chunk_size`` is None or a positive int."""
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


def check_projection_dtypes(
    hidden_NH: torch.Tensor, weight_VH: torch.Tensor, bias_V: torch.Tensor | None
) -> None:
    """``weight_VH`` and ``bias_V`` (when given) have the dtype of ``hidden_NH``."""
    for name, t in (("weight", weight_VH), ("bias", bias_V)):
        if t is not None and t.dtype != hidden_NH.dtype:
            raise ValueError(f"{name} must have the dtype of hidden ({hidden_NH.dtype}), got {t.dtype}")
