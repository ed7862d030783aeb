"""Fused linear + per-domain cross-entropy: hidden [N, H] and weight [V, H] to the per-domain loss.

The [N, V] logits are never materialised: the rows are processed in chunks of C tokens, C chosen so
that a chunk of logits fits ``CHUNK_BYTES`` (256 MiB). For each chunk one matmul makes the chunk's
logits [C, V], the cross-entropy kernel of ``domain_ce.py`` overwrites them with their gradient (fp32
math, written in the same pass that reads them), and two more matmuls contract that gradient into the
hidden and weight gradients; the next chunk reuses nothing of it. The weight gradient accumulates over
the chunks in fp32 by default (``weight_grad_fp32``): on CUDA the matmul adds into the fp32 buffer
directly (``addmm`` with ``out_dtype``), elsewhere the chunk's operands are upcast (C x (V + H) fp32,
bounded by the chunk). Peak extra memory: docs/kernels.md, "Fused linear: memory and gradients".

The gradients are computed in forward for the upstream gradient the caller promises (``grad_scale``
on ``loss``). Backward multiplies them by ``grad_loss / grad_scale`` on the device (a uniform factor,
so this is exact), in place or fused into the cast to the parameter's dtype. When ``loss_sum`` also
receives a gradient, each domain's rows need their own factor, which cannot be applied after the
contraction: backward then recomputes the chunks with the true upstream gradients (one more pass of
matmuls; correct for any upstream). Without a gradient to compute (``torch.no_grad()``,
``torch.inference_mode()``, or no input that requires one) only the logits chunks are made: no
gradient buffer and no gradient matmul.
"""

from __future__ import annotations

import torch
import triton

from .checks import check_call, check_chunk_size, check_projection_dtypes, check_same_device
from .domain_ce import (
    CEOptions,
    RowInputs,
    Stats,
    Upstream,
    finish_stats,
    forward_state,
    kernel_options,
    launch_forward,
    new_buffer,
    upstream_gradients,
)
from .reference import DomainLoss

# Bytes of one chunk of logits (the memory budget of the chunking).
CHUNK_BYTES = 256 * 2**20

# Device types on which addmm accumulates low-precision products into an fp32 buffer (out_dtype).
_MIXED_ADDMM: dict[str, bool] = {}


def default_chunk_size(n_rows: int, vocab: int, itemsize: int, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk: the largest power of 2 whose [C, V] logits fit ``budget`` bytes (at least 1,
    at most the next power of 2 of ``n_rows``)."""
    fit = max(budget // max(vocab * itemsize, 1), 1)
    rows = 1 << (fit.bit_length() - 1)
    return max(1, min(rows, triton.next_power_of_2(max(n_rows, 1))))


def peak_extra_bytes(
    n_rows: int,
    hidden_size: int,
    vocab: int,
    itemsize: int,
    chunk_size: int,
    *,
    weight_grad_fp32: bool = True,
    mixed_addmm: bool = True,
) -> int:
    """Peak bytes that forward + backward allocate beyond the inputs, leading terms (docs/kernels.md):

    ``N H b`` (the hidden gradient) + ``V H a`` (the weight gradient, ``a`` = 4 with
    ``weight_grad_fp32``, else ``b``) + the larger of one chunk ``C V b`` (plus, on a device without a
    mixed-dtype addmm, its fp32 operands ``C (V + H) 4``) and, when ``a != b``, the ``V H b`` weight
    gradient handed back in the weight's dtype. Terms of O(N + V) (per-row state, a bias gradient) are
    left out.
    """
    acc = 4 if weight_grad_fp32 else itemsize
    chunk = chunk_size * vocab * itemsize
    if acc != itemsize and not mixed_addmm:
        chunk += chunk_size * (vocab + hidden_size) * acc
    handed_back = vocab * hidden_size * itemsize if acc != itemsize else 0
    return n_rows * hidden_size * itemsize + vocab * hidden_size * acc + max(chunk, handed_back)


def add_weight_grad(acc_VH: torch.Tensor, grad_CV: torch.Tensor, hidden_CH: torch.Tensor) -> None:
    """``acc_VH += grad_CV.T @ hidden_CH``, with no [V, H] temporary whatever the dtypes: the same
    dtype adds in place; an fp32 ``acc_VH`` over lower-precision operands uses addmm's ``out_dtype``
    where the device has it, else upcasts the operands (bounded by the chunk)."""
    if acc_VH.dtype == grad_CV.dtype:
        acc_VH.addmm_(grad_CV.t(), hidden_CH)
        return
    kind = acc_VH.device.type
    if _MIXED_ADDMM.get(kind, kind == "cuda"):
        try:
            torch.addmm(acc_VH, grad_CV.t(), hidden_CH, out_dtype=acc_VH.dtype, out=acc_VH)
            return
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            if "out_dtype" not in str(exc) and "Could not run" not in str(exc) and "dtype" not in str(exc):
                raise
            _MIXED_ADDMM[kind] = False  # this build has no mixed-dtype addmm here: upcast from now on
    acc_VH.addmm_(grad_CV.t().to(acc_VH.dtype), hidden_CH.to(acc_VH.dtype))


def scaled(grad: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad * factor`` in ``dtype``: in place when ``grad`` already has it, else written straight
    into the one new tensor of ``dtype`` (no intermediate copy)."""
    if grad.dtype == dtype:
        return grad.mul_(factor)
    return torch.mul(grad, factor, out=torch.empty(grad.shape, dtype=dtype, device=grad.device))


def linear_pass(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None,
    rows: RowInputs,
    upstream: Upstream,
    *,
    stats: Stats | None,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    weight_grad_fp32: bool,
    chunk_size: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One chunked pass over the rows.

    ``stats`` are the forward statistics to fill, or None (a gradient-only pass).
    Returns (grad_hidden [N, H], grad_weight [V, H], grad_bias [V]) for ``upstream``, each None when
    not needed; grad_hidden is in hidden's dtype, grad_weight in weight's (fp32 when
    ``weight_grad_fp32``), grad_bias always fp32.
    """
    n_rows, _ = hidden_NH.shape
    vocab = weight_VH.shape[0]
    device = hidden_NH.device
    compute_grad = need_hidden or need_weight or need_bias
    grad_hidden_NH = new_buffer(hidden_NH.shape, hidden_NH.dtype, device) if need_hidden else None
    grad_weight_VH = None
    if need_weight:
        accum_dtype = torch.float32 if weight_grad_fp32 else weight_VH.dtype
        grad_weight_VH = torch.zeros(weight_VH.shape, dtype=accum_dtype, device=device)
    grad_bias_V = torch.zeros(vocab, dtype=torch.float32, device=device) if need_bias else None

    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        hidden_CH = hidden_NH[start:end]
        if bias_V is None:
            logits_CV = hidden_CH @ weight_VH.t()
        else:
            logits_CV = torch.addmm(bias_V, hidden_CH, weight_VH.t())
        launch_forward(
            logits_CV,
            rows.chunk(start, end),
            upstream,
            grad_NV=logits_CV if compute_grad else None,
            stats=None if stats is None else stats.chunk(start, end),
        )
        if compute_grad:  # the kernel wrote the gradient over the chunk's logits
            if need_hidden:
                torch.mm(logits_CV, weight_VH, out=grad_hidden_NH[start:end])
            if need_weight:
                add_weight_grad(grad_weight_VH, logits_CV, hidden_CH)
            if need_bias:
                grad_bias_V += logits_CV.sum(dim=0, dtype=torch.float32)
        del logits_CV  # freed before the next chunk's matmul: one chunk alive at a time
    return grad_hidden_NH, grad_weight_VH, grad_bias_V


def forward_pass(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None,
    labels_N: torch.Tensor,
    domain_ids_N: torch.Tensor,
    weights_D: torch.Tensor | None,
    num_domains: int,
    opts: CEOptions,
    needs: tuple[bool, bool, bool],
    weight_grad_fp32: bool,
    chunk_size: int,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple, RowInputs]:
    """The forward over every chunk: ((loss, loss_sum, count), the gradients of hidden, weight and bias
    that ``needs`` asks for (each else None) for ``opts.grad_scale`` on ``loss``, the RowInputs)."""
    rows, stats, upstream = forward_state(
        labels_N, domain_ids_N, weights_D, num_domains, opts, hidden_NH.device
    )
    need_hidden, need_weight, need_bias = needs
    grads = linear_pass(
        hidden_NH,
        weight_VH,
        bias_V,
        rows,
        upstream,
        stats=stats,
        need_hidden=need_hidden,
        need_weight=need_weight,
        need_bias=need_bias,
        weight_grad_fp32=weight_grad_fp32,
        chunk_size=chunk_size,
    )
    return finish_stats(rows, stats), grads, rows


class _LinearDomainCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden_NH,
        weight_VH,
        bias_V,
        labels_N,
        domain_ids_N,
        weights_D,
        num_domains,
        opts,
        weight_grad_fp32,
        chunk_size,
    ):
        ctx.set_materialize_grads(False)
        config = dict(weight_grad_fp32=weight_grad_fp32, chunk_size=chunk_size)
        (loss, loss_sum_D, count_D), grads, rows = forward_pass(
            hidden_NH,
            weight_VH,
            bias_V,
            labels_N,
            domain_ids_N,
            weights_D,
            num_domains,
            opts,
            tuple(ctx.needs_input_grad[:3]),
            **config,
        )
        ctx.mark_non_differentiable(count_D)
        ctx.grads = grads
        ctx.save_for_backward(
            hidden_NH, weight_VH, bias_V, rows.labels_N, rows.domain_ids_N, weights_D, rows.n_valid
        )
        ctx.num_domains, ctx.opts, ctx.config = num_domains, opts, config
        return loss, loss_sum_D, count_D

    @staticmethod
    def backward(ctx, grad_loss, grad_sum_D, _grad_count):
        nones = (None,) * 7
        if grad_loss is None and grad_sum_D is None:
            return (None, None, None, *nones)
        if ctx.grads is None:
            raise RuntimeError(
                "backward through the Triton linear_domain_cross_entropy runs once per forward "
                "(use the reference backend for retain_graph=True)"
            )
        hidden_NH, weight_VH, bias_V, labels_N, domain_ids_N, weights_D, n_valid = ctx.saved_tensors
        dtypes = (hidden_NH.dtype, weight_VH.dtype, None if bias_V is None else bias_V.dtype)
        opts: CEOptions = ctx.opts
        if grad_sum_D is None:
            # only `loss` has a gradient: a uniform factor on what forward computed, applied in place
            # or fused into the cast to each input's dtype
            factor = grad_loss.to(torch.float32) / opts.grad_scale
            out = [None if g is None else scaled(g, factor, d) for g, d in zip(ctx.grads, dtypes)]
            ctx.grads = None
            return (*out, *nones)
        ctx.grads = None  # freed before the recompute allocates its own
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        rows = RowInputs(
            labels_N=labels_N,
            domain_ids_N=domain_ids_N,
            weights_D=weights_D,
            n_valid=n_valid,
            num_domains=ctx.num_domains,
            opts=opts,
        )
        grads = linear_pass(
            hidden_NH,
            weight_VH,
            bias_V,
            rows,
            upstream_gradients(grad_loss, grad_sum_D, hidden_NH.device),
            stats=None,
            need_hidden=need_hidden,
            need_weight=need_weight,
            need_bias=need_bias,
            **ctx.config,
        )
        out = [None if g is None else g.to(dtype) for g, dtype in zip(grads, dtypes)]
        return (*out, *nones)


def linear_domain_cross_entropy_triton(
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
    deterministic: bool = False,
    grad_scale: float = 1.0,
    weight_grad_fp32: bool = True,
    chunk_size: int | None = None,
) -> DomainLoss:
    """The Triton path of :func:`aioli_fast.kernels.linear_domain_cross_entropy` (same arguments)."""
    check_call(
        hidden_NH,
        labels_N,
        domain_ids_N,
        num_domains,
        domain_weights_D=domain_weights_D,
        lse_square_scale=lse_square_scale,
        softcap=softcap,
        projection=(weight_VH, bias_V),
    )
    device = hidden_NH.device
    check_same_device(device, weight=weight_VH, bias=bias_V, labels=labels_N, domain_ids=domain_ids_N)
    check_chunk_size(chunk_size)
    if torch.is_autocast_enabled(device.type):
        # what F.linear would do under autocast: the projection runs in the autocast dtype
        dtype = torch.get_autocast_dtype(device.type)
        hidden_NH, weight_VH = hidden_NH.to(dtype), weight_VH.to(dtype)
        bias_V = None if bias_V is None else bias_V.to(dtype)
    check_projection_dtypes(hidden_NH, weight_VH, bias_V)
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden_NH.shape[0], weight_VH.shape[0], hidden_NH.element_size())
    weights_D, opts = kernel_options(
        domain_weights_D,
        ignore_index=ignore_index,
        lse_square_scale=lse_square_scale,
        softcap=softcap,
        deterministic=deterministic,
        grad_scale=grad_scale,
    )
    inputs = (hidden_NH, weight_VH, bias_V)
    if torch.compiler.is_compiling():  # one opaque operator for torch.compile (kernels/compiled.py)
        from .compiled import linear_domain_ce_op

        grad = torch.is_grad_enabled()
        needs = [grad and t is not None and t.requires_grad for t in inputs]
        loss, loss_sum_D, count_D, *_ = linear_domain_ce_op(
            hidden_NH,
            weight_VH,
            bias_V,
            labels_N,
            domain_ids_N,
            weights_D,
            num_domains,
            opts.ignore_index,
            opts.lse_square_scale,
            opts.softcap or 0.0,
            opts.deterministic,
            opts.grad_scale,
            bool(weight_grad_fp32),
            chunk_size,
            *needs,
        )
        return DomainLoss(loss, loss_sum_D, count_D)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)):
        # no_grad, inference_mode or constant inputs: the statistics only, no gradient work
        with torch.autocast(device.type, enabled=False):
            stats, _, _ = forward_pass(
                hidden_NH,
                weight_VH,
                bias_V,
                labels_N,
                domain_ids_N,
                weights_D,
                num_domains,
                opts,
                (False, False, False),
                weight_grad_fp32=False,
                chunk_size=chunk_size,
            )
        return DomainLoss(*stats)
    with torch.autocast(device.type, enabled=False):
        loss, loss_sum_D, count_D = _LinearDomainCrossEntropy.apply(
            hidden_NH,
            weight_VH,
            bias_V,
            labels_N,
            domain_ids_N,
            weights_D,
            num_domains,
            opts,
            bool(weight_grad_fp32),
            chunk_size,
        )
    return DomainLoss(loss, loss_sum_D, count_D)
