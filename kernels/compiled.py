"""The fused-linear per-domain loss as a PyTorch custom operator, for ``torch.compile``.

``torch.compile`` cannot trace into a Triton launch made from Python inside an autograd function (nor
into Triton's interpreter), so without help a compiled model breaks its graph at the loss. Here the
Triton path of :func:`aioli_fast.kernels.linear_domain_cross_entropy` is registered as the operator
``aioli_fast::linear_domain_ce`` (forward: the loss, the per-domain sums and counts and, in the same
pass, the gradients for the promised upstream gradient) with a fake implementation (shapes only) and
an autograd formula (backward: the precomputed gradients times ``grad_loss / grad_scale``). Dynamo
sees one opaque node, so the training step compiles as one graph. Under compile only ``loss`` is
differentiable: ``loss_sum`` and ``count`` are statistics (what the trainer and the mixers read); a
per-domain objective that backpropagates ``loss_sum`` runs eagerly. The eager path (no
``torch.compile``) keeps the autograd function of ``linear_domain_ce.py``, which hands its buffers to
autograd without copies; this file is used only while compiling (``torch.compiler.is_compiling()``).
"""

from __future__ import annotations

import torch

from .domain_ce import kernel_options
from .linear_domain_ce import forward_pass

_EMPTY = (0,)


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A custom operator returns tensors only: an absent gradient is an empty one."""
    return t if t is not None else like.new_empty(_EMPTY)


@torch.library.custom_op("aioli_fast::linear_domain_ce", mutates_args=())
def linear_domain_ce_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    domain_ids: torch.Tensor,
    domain_weights: torch.Tensor | None,
    num_domains: int,
    ignore_index: int,
    lse_square_scale: float,
    softcap: float,
    deterministic: bool,
    grad_scale: float,
    weight_grad_fp32: bool,
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, loss_sum [D], count [D], grad_hidden, grad_weight, grad_bias; absent gradients empty)."""
    _, opts = kernel_options(
        None,
        ignore_index=ignore_index,
        lse_square_scale=lse_square_scale,
        softcap=None if softcap <= 0 else softcap,  # an operator takes no None float: 0 is "no cap"
        deterministic=deterministic,
        grad_scale=grad_scale,
    )
    needs = (need_hidden, need_weight, need_bias)
    (loss, loss_sum, count), grads, _ = forward_pass(
        hidden,
        weight,
        bias,
        labels,
        domain_ids,
        domain_weights,
        num_domains,
        opts,
        needs,
        weight_grad_fp32=weight_grad_fp32,
        chunk_size=chunk_size,
    )
    gh, gw, gb = (_or_empty(g, hidden) for g in grads)
    return loss, loss_sum.clone(), count.clone(), gh, gw, gb


@linear_domain_ce_op.register_fake
def _(
    hidden,
    weight,
    bias,
    labels,
    domain_ids,
    domain_weights,
    num_domains,
    ignore_index,
    lse_square_scale,
    softcap,
    deterministic,
    grad_scale,
    weight_grad_fp32,
    chunk_size,
    need_hidden,
    need_weight,
    need_bias,
):
    f32 = dict(dtype=torch.float32, device=hidden.device)
    acc = torch.float32 if weight_grad_fp32 else weight.dtype
    gh = hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(_EMPTY)
    gw = weight.new_empty(weight.shape, dtype=acc) if need_weight else hidden.new_empty(_EMPTY)
    gb = torch.empty(weight.shape[0], **f32) if need_bias else hidden.new_empty(_EMPTY)
    return (
        torch.empty((), **f32),
        torch.empty(num_domains, **f32),
        torch.empty(num_domains, **f32),
        gh,
        gw,
        gb,
    )


_ARGS = (
    "hidden",
    "weight",
    "bias",
    "labels",
    "domain_ids",
    "domain_weights",
    "num_domains",
    "ignore_index",
    "lse_square_scale",
    "softcap",
    "deterministic",
    "grad_scale",
    "weight_grad_fp32",
    "chunk_size",
    "need_hidden",
    "need_weight",
    "need_bias",
)


def _setup_context(ctx, inputs, output):
    args = dict(zip(_ARGS, inputs))
    ctx.args = {k: v for k, v in args.items() if not isinstance(v, torch.Tensor) and v is not None}
    ctx.has_bias = args["bias"] is not None
    ctx.has_weights = args["domain_weights"] is not None
    saved = [args["hidden"], args["weight"], args["labels"], args["domain_ids"], *output[3:]]
    saved += [args["bias"]] if ctx.has_bias else []
    saved += [args["domain_weights"]] if ctx.has_weights else []
    ctx.save_for_backward(*saved)
    ctx.mark_non_differentiable(output[1], output[2])  # under compile only `loss` is differentiable


def _backward(ctx, grad_loss, _grad_sum, _grad_count, *_grad_of_grads):
    hidden, weight, labels, domain_ids, gh, gw, gb, *rest = ctx.saved_tensors
    bias = rest.pop(0) if ctx.has_bias else None
    a = ctx.args
    dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    needs = (a["need_hidden"], a["need_weight"], a["need_bias"])
    if grad_loss is None:
        return (None,) * len(_ARGS)
    factor = grad_loss.to(torch.float32) / a["grad_scale"]  # a uniform factor on the forward's gradients
    out = [(g * factor).to(d) if need else None for g, d, need in zip((gh, gw, gb), dtypes, needs)]
    return (*out, *(None,) * (len(_ARGS) - 3))


linear_domain_ce_op.register_autograd(_backward, setup_context=_setup_context)
