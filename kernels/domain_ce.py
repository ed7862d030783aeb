"""Fused per-domain cross-entropy on [N, V] logits in Triton.

One program per row reads the row twice: pass 1 keeps an online max and sum of exponentials over
vocabulary blocks (fp32 whatever the input dtype), with the label's column kept out of the sum so that
``1 - p_label`` is exact even for confident predictions; pass 2 writes the gradient. The row's loss goes
into a per-row buffer and, in the default mode, straight into the per-domain sums and counts with
atomics; the deterministic mode reduces the per-row buffer per domain in a second, tiny kernel
(fixed order). Nothing reads a device value on the host: the number of counted tokens stays a device
scalar that the kernel loads.

The gradient is computed in the forward pass, for the upstream gradients the caller expects
(``grad_scale`` for ``loss`` and none for ``loss_sum``: ``loss.backward()``). Every row's gradient is
``coef * p_j`` off the label (times the soft-cap derivative) and a separately computed value at the
label, so backward only has to rescale the rows whose coefficient differs from the expected one. A
small per-row state makes that possible; rows whose coefficient matches (to within ``MATCH_RTOL``,
a few fp32 roundings) are not touched, so a backward that keeps the contract costs no pass over the
logits. Without a gradient to compute (``torch.no_grad()``, ``torch.inference_mode()`` or logits that
do not require one) no gradient buffer is allocated and nothing is written.

Layers: ``@triton.jit`` kernels, host functions that allocate and launch (``domain_ce_forward``,
``domain_ce_backward``; the argument checks are in ``checks.py``), the private ``_DomainCrossEntropy``
autograd function, and ``domain_cross_entropy_triton``; the public entry point with backend dispatch
is ``aioli_fast.kernels.domain_cross_entropy``. The pure-PyTorch reference is ``reference.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .checks import (
    check_call,
    check_grad_contract,
    check_inplace,
    check_inplace_stride,
    check_launch_strides,
    check_same_device,
)
from .reference import DomainLoss

# Vocabulary block of the two-read path (tests lower it to force many blocks).
MAX_BLOCK_V = 8192
# Longest row read once and kept in registers (tests lower it too; longer rows spill: launch_config).
ONE_READ_MAX_V = 16384
# Rows of the per-row state kept for backward. The kernels read them as globals, which the compiler
# (unlike the interpreter) accepts only for tl.constexpr values.
SAVED_ZFAC, SAVED_REST, SAVED_SCALE, SAVED_LABEL_COEF, SAVED_CAPGRAD = (tl.constexpr(i) for i in range(5))
NUM_SAVED = 5
# Backward leaves a row as forward wrote it when the upstream coefficient differs from the expected one
# by at most this relative amount: a few fp32 roundings, which a caller's own scaling arithmetic (a loss
# multiplied and divided by the accumulation steps) can introduce; far below the gradient's precision.
MATCH_RTOL = tl.constexpr(2.0**-20)


@dataclass(frozen=True)
class CEOptions:
    """Loss options shared by the logits and fused-linear variants (checked by the public function)."""

    ignore_index: int = -100
    lse_square_scale: float = 0.0
    softcap: float | None = None
    deterministic: bool = False
    grad_scale: float = 1.0


# ---------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _softcap(x, softcap):
    # softcap * tanh(x / softcap), with tanh from exp(-2|u|) (no libdevice; never overflows)
    u = x / softcap
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return softcap * tl.where(u < 0.0, -t, t)


@triton.jit
def _grad_block(x_in, offs, label, scale, lse, grad_label, softcap, SOFTCAP: tl.constexpr):
    # [BV] gradient of a block of logits x_in (input dtype; -inf outside the row gives 0):
    # scale * p_j (times the soft-cap derivative) off the label, grad_label at it
    x = x_in.to(tl.float32)
    if SOFTCAP:
        x = _softcap(x, softcap)
    g = scale * tl.exp(x - lse)
    if SOFTCAP:
        g = g * (1.0 - (x / softcap) * (x / softcap))
    return tl.where(offs == label, grad_label, g)


@triton.jit
def _row_coefficients(grad_loss_ptr, grad_sum_ptr, w, n_valid, zfac, dom_safe, dom_ok, HAS_GRAD_SUM):
    # d(objective)/d(logit_j) = coef * p_j - label_coef * [j == label]   (before the soft-cap factor)
    c_loss = tl.load(grad_loss_ptr).to(tl.float32) * w / n_valid
    c_sum = 0.0
    if HAS_GRAD_SUM:
        c_sum = tl.load(grad_sum_ptr + dom_safe, mask=dom_ok, other=0.0).to(tl.float32)
    return c_loss * zfac + c_sum, c_loss + c_sum


@triton.jit
def _domain_ce_fwd_kernel(
    logits_ptr,
    logits_row_stride,
    grad_ptr,
    grad_row_stride,
    labels_ptr,
    domains_ptr,
    weights_ptr,
    n_valid_ptr,
    grad_loss_ptr,
    grad_sum_ptr,
    row_loss_ptr,
    row_loss_plane,
    saved_ptr,
    saved_plane,
    loss_sum_ptr,
    count_ptr,
    V,
    D,
    ignore_index,
    lse_square_scale,
    softcap,
    BLOCK_V: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    HAS_GRAD_SUM: tl.constexpr,
    SOFTCAP: tl.constexpr,
    WRITE_STATS: tl.constexpr,
    ATOMIC_STATS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    SAVE_STATE: tl.constexpr,
    ONE_READ: tl.constexpr,
):
    # ONE_READ (BLOCK_V >= V): the row is read once and kept on chip for the gradient; otherwise it is
    # read twice, block by block (statistics, then the gradient).
    # 64-bit row offsets: N * V can exceed 2**31
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_row_stride
    grad_row = grad_ptr + row * grad_row_stride
    cols = tl.arange(0, BLOCK_V)  # [BV]
    label = tl.load(labels_ptr + row).to(tl.int64)

    if label == ignore_index:
        if WRITE_STATS:
            tl.store(row_loss_ptr + row, 0.0)
            tl.store(row_loss_ptr + row_loss_plane + row, 0.0)
        if SAVE_STATE:
            tl.store(saved_ptr + SAVED_ZFAC * saved_plane + row, 1.0)
            tl.store(saved_ptr + SAVED_REST * saved_plane + row, 0.0)
            tl.store(saved_ptr + SAVED_SCALE * saved_plane + row, 1.0)
            tl.store(saved_ptr + SAVED_LABEL_COEF * saved_plane + row, 0.0)
            tl.store(saved_ptr + SAVED_CAPGRAD * saved_plane + row, 1.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                zeros = tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty)
                tl.store(grad_row + offs, zeros, mask=offs < V)
        return

    dom = tl.load(domains_ptr + row).to(tl.int64)
    dom_ok = (dom >= 0) & (dom < D)
    dom_safe = tl.where(dom_ok, dom, 0)
    label_ok = (label >= 0) & (label < V)
    # a label outside [0, V) reads nothing and gives an infinite loss
    x_label = tl.load(logits_row + tl.where(label_ok, label, 0), mask=label_ok, other=float("-inf"))
    x_label = x_label.to(tl.float32)
    if SOFTCAP:
        x_label = _softcap(x_label, softcap)

    # pass 1: online max m and sum s of exp(x - m) over every column except the label's
    m = float("-inf")
    s = 0.0
    if ONE_READ:
        row_in = cols < V
        x_row = tl.load(logits_row + cols, mask=row_in, other=float("-inf"))  # [BV], kept for pass 2
        x = x_row.to(tl.float32)
        if SOFTCAP:
            x = tl.where(row_in, _softcap(x, softcap), float("-inf"))
        m = tl.max(x, axis=0)
        s = tl.sum(tl.exp(tl.where(cols == label, float("-inf"), x) - m), axis=0)
    else:
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            in_row = offs < V
            x = tl.load(logits_row + offs, mask=in_row, other=float("-inf")).to(tl.float32)  # [BV]
            if SOFTCAP:
                x = tl.where(in_row, _softcap(x, softcap), float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            x_rest = tl.where(offs == label, float("-inf"), x)
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x_rest - m_new), axis=0)
            m = m_new

    log_total = tl.log(s + tl.exp(x_label - m))
    lse = m + log_total
    ce = (m - x_label) + log_total
    rest = s * tl.exp(m - lse)  # 1 - p_label, no cancellation when p_label is close to 1
    zfac = 1.0 + 2.0 * lse_square_scale * lse
    w = 1.0
    if HAS_WEIGHTS:
        w = tl.load(weights_ptr + dom_safe).to(tl.float32)

    if WRITE_STATS:
        tl.store(row_loss_ptr + row, ce)
        tl.store(row_loss_ptr + row_loss_plane + row, w * (ce + lse_square_scale * lse * lse))
        if ATOMIC_STATS:
            tl.atomic_add(loss_sum_ptr + dom_safe, ce, mask=dom_ok, sem="relaxed")
            tl.atomic_add(count_ptr + dom_safe, 1.0, mask=dom_ok, sem="relaxed")

    if COMPUTE_GRAD:
        n_valid = tl.maximum(tl.load(n_valid_ptr), 1.0)
        coef, label_coef = _row_coefficients(
            grad_loss_ptr, grad_sum_ptr, w, n_valid, zfac, dom_safe, dom_ok, HAS_GRAD_SUM
        )
        # the stored row is scale * p_j; a zero coefficient stores p_j so that backward can rescale it
        scale = tl.where(coef != 0.0, coef, 1.0)
        capgrad_label = 1.0
        if SOFTCAP:
            capgrad_label = 1.0 - (x_label / softcap) * (x_label / softcap)
        # the label's entry is always the true one: coef * p_label - label_coef, with 1 - p_label = rest
        grad_label = ((coef - label_coef) - coef * rest) * capgrad_label

        # pass 2: the gradient, written where the logits were read (in place when grad_ptr == logits_ptr)
        if ONE_READ:
            g = _grad_block(x_row, cols, label, scale, lse, grad_label, softcap, SOFTCAP)
            tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=row_in)
        else:
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                in_row = offs < V
                x_in = tl.load(logits_row + offs, mask=in_row, other=float("-inf"))  # [BV]
                g = _grad_block(x_in, offs, label, scale, lse, grad_label, softcap, SOFTCAP)
                tl.store(grad_row + offs, g.to(grad_ptr.dtype.element_ty), mask=in_row)

        if SAVE_STATE:
            tl.store(saved_ptr + SAVED_ZFAC * saved_plane + row, zfac)
            tl.store(saved_ptr + SAVED_REST * saved_plane + row, rest)
            tl.store(saved_ptr + SAVED_SCALE * saved_plane + row, scale)
            tl.store(saved_ptr + SAVED_LABEL_COEF * saved_plane + row, label_coef)
            tl.store(saved_ptr + SAVED_CAPGRAD * saved_plane + row, capgrad_label)


@triton.jit
def _domain_ce_bwd_kernel(
    grad_ptr,
    grad_row_stride,
    labels_ptr,
    domains_ptr,
    weights_ptr,
    n_valid_ptr,
    grad_loss_ptr,
    grad_sum_ptr,
    saved_ptr,
    saved_plane,
    V,
    D,
    ignore_index,
    BLOCK_V: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    HAS_GRAD_SUM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == ignore_index:
        return
    grad_row = grad_ptr + row * grad_row_stride
    cols = tl.arange(0, BLOCK_V)  # [BV]
    dom = tl.load(domains_ptr + row).to(tl.int64)
    dom_ok = (dom >= 0) & (dom < D)
    dom_safe = tl.where(dom_ok, dom, 0)
    label_ok = (label >= 0) & (label < V)
    w = 1.0
    if HAS_WEIGHTS:
        w = tl.load(weights_ptr + dom_safe).to(tl.float32)
    n_valid = tl.maximum(tl.load(n_valid_ptr), 1.0)
    zfac = tl.load(saved_ptr + SAVED_ZFAC * saved_plane + row)
    rest = tl.load(saved_ptr + SAVED_REST * saved_plane + row)
    scale = tl.load(saved_ptr + SAVED_SCALE * saved_plane + row)
    label_coef_fwd = tl.load(saved_ptr + SAVED_LABEL_COEF * saved_plane + row)
    capgrad_label = tl.load(saved_ptr + SAVED_CAPGRAD * saved_plane + row)

    coef, label_coef = _row_coefficients(
        grad_loss_ptr, grad_sum_ptr, w, n_valid, zfac, dom_safe, dom_ok, HAS_GRAD_SUM
    )
    grad_label = ((coef - label_coef) - coef * rest) * capgrad_label
    if tl.abs(coef - scale) > MATCH_RTOL * tl.abs(scale):
        # the forward assumed another upstream gradient for this row: rescale it, rewrite the label
        ratio = coef / scale
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            in_row = offs < V
            g = tl.load(grad_row + offs, mask=in_row, other=0.0).to(tl.float32) * ratio  # [BV]
            g = tl.where(offs == label, grad_label, g)
            tl.store(grad_row + offs, g.to(grad_ptr.dtype.element_ty), mask=in_row)
    elif tl.abs(label_coef - label_coef_fwd) > MATCH_RTOL * tl.abs(label_coef_fwd):
        tl.store(
            grad_row + tl.where(label_ok, label, 0), grad_label.to(grad_ptr.dtype.element_ty), mask=label_ok
        )


@triton.jit
def _domain_reduce_kernel(
    row_ce_ptr,
    labels_ptr,
    domains_ptr,
    partial_ptr,
    N,
    D,
    ignore_index,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # deterministic mode: per-program partial sums and counts per domain, [P, 2, BD]
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    in_range = rows < N
    label = tl.load(labels_ptr + rows, mask=in_range, other=ignore_index).to(tl.int64)
    dom = tl.load(domains_ptr + rows, mask=in_range, other=-1).to(tl.int64)
    ce = tl.load(row_ce_ptr + rows, mask=in_range, other=0.0)
    counted = in_range & (label != ignore_index) & (dom >= 0) & (dom < D)
    domains = tl.arange(0, BLOCK_D)  # [BD]
    hit = counted[:, None] & (dom[:, None] == domains[None, :])  # [BN, BD]
    sum_D = tl.sum(tl.where(hit, ce[:, None], 0.0), axis=0)
    count_D = tl.sum(hit.to(tl.float32), axis=0)
    out = partial_ptr + pid * 2 * BLOCK_D
    tl.store(out + domains, sum_D)
    tl.store(out + BLOCK_D + domains, count_D)


# ---------------------------------------------------------------------------------------------------
# Host functions: allocate, launch

# The kernels run under Triton's interpreter (on CPU tensors) when TRITON_INTERPRET=1 was set before
# they were decorated, that is before this module was imported; otherwise they compile for the GPU.
INTERPRETED = not isinstance(_domain_ce_fwd_kernel, triton.runtime.jit.JITFunction)


def new_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel must fully write comes from here (tests fill them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def launch_config(V: int) -> tuple[int, int, bool]:
    """(BLOCK_V, num_warps, one_read) of the forward kernel for rows of V columns.

    A row of at most ``ONE_READ_MAX_V`` columns is one block, read once and kept in registers for the
    gradient; a longer row is read twice in blocks of ``MAX_BLOCK_V``. The warps grow with the block.
    Every configuration compiles for sm_90 and sm_80 without register spills (tests/ptxas_table.json;
    a one-read block of 32768 columns spills on both, hence the limit: docs/kernels.md).
    """
    v = max(V, 1)
    one_read = v <= ONE_READ_MAX_V
    block_v = triton.next_power_of_2(v) if one_read else MAX_BLOCK_V
    return block_v, warps_for(block_v), one_read


def warps_for(block_v: int) -> int:
    """Warps of a program over a block of ``block_v`` columns (4 up to 1024, 8 up to 2048, else 16:
    a one-read block of 4096 with 8 warps spills on sm_80 with a soft-cap)."""
    return 4 if block_v <= 1024 else 8 if block_v <= 2048 else 16


def count_valid(labels_N: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """[] fp32 number of counted tokens, kept on the device."""
    return (labels_N != ignore_index).sum(dtype=torch.float32)


def kernel_options(
    domain_weights_D: torch.Tensor | None,
    *,
    ignore_index: int,
    lse_square_scale: float,
    softcap: float | None,
    deterministic: bool,
    grad_scale: float,
) -> tuple[torch.Tensor | None, CEOptions]:
    """(fp32 contiguous domain weights [D] or None, CEOptions) from the checked public arguments."""
    weights_D = None if domain_weights_D is None else domain_weights_D.to(torch.float32).contiguous()
    opts = CEOptions(
        ignore_index=int(ignore_index),
        lse_square_scale=float(lse_square_scale),
        softcap=None if softcap is None else float(softcap),
        deterministic=bool(deterministic),
        grad_scale=float(grad_scale),
    )
    return weights_D, opts


@dataclass(frozen=True)
class RowInputs:
    """What every launch reads besides the logits, for the rows of a batch (all on one device).

    labels_N: [N] integer targets, contiguous (``opts.ignore_index`` on ignored rows).
    domain_ids_N: [N] integer domain of each row, contiguous.
    weights_D: [D] fp32 contiguous domain weights, or None.
    n_valid: [] fp32 number of counted tokens of the whole batch (stays on the device).
    num_domains: D.
    opts: the loss options.
    """

    labels_N: torch.Tensor
    domain_ids_N: torch.Tensor
    weights_D: torch.Tensor | None
    n_valid: torch.Tensor
    num_domains: int
    opts: CEOptions

    def chunk(self, start: int, end: int) -> RowInputs:
        """The inputs of rows ``start:end`` (views; ``n_valid`` stays the whole batch's)."""
        return replace(self, labels_N=self.labels_N[start:end], domain_ids_N=self.domain_ids_N[start:end])


@dataclass(frozen=True)
class Upstream:
    """The upstream gradients a gradient is computed for.

    grad_loss: [] fp32 gradient of ``loss``.
    grad_sum_D: [D] fp32 contiguous gradient of ``loss_sum``, or None (no gradient).
    """

    grad_loss: torch.Tensor
    grad_sum_D: torch.Tensor | None = None


@dataclass(frozen=True)
class Stats:
    """The forward statistics a launch fills, all fp32.

    row_loss_2N: [2, N] per-row cross-entropy (row 0) and weighted objective (row 1), fully written.
    loss_sum_D, count_D: [D] per-domain sums and counts, zeroed; atomic mode adds into them.
    """

    row_loss_2N: torch.Tensor
    loss_sum_D: torch.Tensor
    count_D: torch.Tensor

    def chunk(self, start: int, end: int) -> Stats:
        """The statistics of rows ``start:end`` (a view of ``row_loss_2N``; the same [D] sums)."""
        return replace(self, row_loss_2N=self.row_loss_2N[:, start:end])


def _pointer(t: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """``t``, or ``stand_in`` for a pointer that the launch's configuration does not read."""
    return stand_in if t is None else t


def _plane_stride(t: torch.Tensor | None) -> int:
    """Elements between the planes (rows) of a [P, N] buffer; 0 for a buffer that is not read."""
    return 0 if t is None else t.stride(0)


def expected_upstream(
    grad_scale: float | torch.Tensor, grad_on: str, num_domains: int, device: torch.device
) -> Upstream:
    """The upstream gradients a caller promises (the gradient contract), as device tensors.

    ``grad_on="loss"``: ``loss`` receives ``grad_scale`` (a float) and ``loss_sum`` nothing.
    ``grad_on="loss_sum"``: ``loss_sum`` receives ``grad_scale``, a float or a [] or [D] float tensor
    on ``device`` (the same scale for every domain, or one per domain), and ``loss`` nothing.
    """
    if grad_on == "loss":
        return Upstream(grad_loss=torch.full((), float(grad_scale), dtype=torch.float32, device=device))
    if isinstance(grad_scale, torch.Tensor):
        scale_D = grad_scale.to(device=device, dtype=torch.float32).expand(num_domains).contiguous()
    else:
        scale_D = torch.full((num_domains,), float(grad_scale), dtype=torch.float32, device=device)
    return Upstream(grad_loss=torch.zeros((), dtype=torch.float32, device=device), grad_sum_D=scale_D)


def forward_state(
    labels_N: torch.Tensor,
    domain_ids_N: torch.Tensor,
    weights_D: torch.Tensor | None,
    num_domains: int,
    opts: CEOptions,
    device: torch.device,
    expected: Upstream | None = None,
) -> tuple[RowInputs, Stats, Upstream]:
    """What a forward pass over the N rows starts from.

    Returns (RowInputs with labels [N] and domain_ids [N] made contiguous and n_valid [] counted on
    the device; Stats with row_loss [2, N] to be fully written and loss_sum [D], count [D] zeroed;
    the Upstream the gradient is computed for: ``expected``, or by default ``opts.grad_scale`` on
    ``loss``).
    """
    labels_N, domain_ids_N = labels_N.contiguous(), domain_ids_N.contiguous()
    n_valid = count_valid(labels_N, opts.ignore_index)
    rows = RowInputs(
        labels_N=labels_N,
        domain_ids_N=domain_ids_N,
        weights_D=weights_D,
        n_valid=n_valid,
        num_domains=num_domains,
        opts=opts,
    )
    stats = Stats(
        row_loss_2N=new_buffer((2, labels_N.shape[0]), torch.float32, device),
        loss_sum_D=torch.zeros(num_domains, dtype=torch.float32, device=device),
        count_D=torch.zeros(num_domains, dtype=torch.float32, device=device),
    )
    upstream = expected
    if upstream is None:
        upstream = expected_upstream(opts.grad_scale, "loss", num_domains, device)
    return rows, stats, upstream


def launch_forward(
    logits_NV: torch.Tensor,
    rows: RowInputs,
    upstream: Upstream,
    *,
    grad_NV: torch.Tensor | None = None,
    stats: Stats | None = None,
    saved_5N: torch.Tensor | None = None,
) -> None:
    """One forward launch over the rows of ``logits_NV`` [N, V] (a chunk of a larger batch is fine).

    Writes, for the rows given: with ``stats``, their row losses and, in atomic mode, their sums and
    counts; with ``grad_NV`` [N, V] (may be ``logits_NV`` itself), the gradient for ``upstream``;
    with ``saved_5N`` [5, N] fp32, the state backward needs.
    """
    n_rows, vocab = logits_NV.shape
    if n_rows == 0:
        return
    check_launch_strides(logits_NV, grad_NV)
    block_v, num_warps, one_read = launch_config(vocab)
    opts = rows.opts
    row_loss_2N = None if stats is None else stats.row_loss_2N
    dummy = rows.n_valid  # any fp32 device tensor stands in for pointers a configuration does not read
    _domain_ce_fwd_kernel[(n_rows,)](
        logits_ptr=logits_NV,
        logits_row_stride=logits_NV.stride(0),
        grad_ptr=_pointer(grad_NV, logits_NV),
        grad_row_stride=0 if grad_NV is None else grad_NV.stride(0),
        labels_ptr=rows.labels_N,
        domains_ptr=rows.domain_ids_N,
        weights_ptr=_pointer(rows.weights_D, dummy),
        n_valid_ptr=rows.n_valid,
        grad_loss_ptr=upstream.grad_loss,
        grad_sum_ptr=_pointer(upstream.grad_sum_D, dummy),
        row_loss_ptr=_pointer(row_loss_2N, dummy),
        row_loss_plane=_plane_stride(row_loss_2N),
        saved_ptr=_pointer(saved_5N, dummy),
        saved_plane=_plane_stride(saved_5N),
        loss_sum_ptr=dummy if stats is None else stats.loss_sum_D,
        count_ptr=dummy if stats is None else stats.count_D,
        V=vocab,
        D=rows.num_domains,
        ignore_index=opts.ignore_index,
        lse_square_scale=float(opts.lse_square_scale),
        softcap=1.0 if opts.softcap is None else float(opts.softcap),
        BLOCK_V=block_v,
        HAS_WEIGHTS=rows.weights_D is not None,
        HAS_GRAD_SUM=upstream.grad_sum_D is not None,
        SOFTCAP=opts.softcap is not None,
        WRITE_STATS=stats is not None,
        ATOMIC_STATS=stats is not None and not opts.deterministic,
        COMPUTE_GRAD=grad_NV is not None,
        SAVE_STATE=saved_5N is not None,
        ONE_READ=one_read,
        num_warps=num_warps,
    )


def reduce_per_domain(row_ce_N: torch.Tensor, rows: RowInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (loss_sum [D], count [D]) fp32 from the per-row losses ``row_ce_N`` [N] fp32:
    per-program partials, then a sum."""
    n_rows = row_ce_N.shape[0]
    block_d = triton.next_power_of_2(rows.num_domains)
    block_n = max(16, min(1024, 8192 // block_d))
    n_programs = max(triton.cdiv(n_rows, block_n), 1)
    partial_P2D = new_buffer((n_programs, 2, block_d), torch.float32, row_ce_N.device)  # [P, 2, BD]
    _domain_reduce_kernel[(n_programs,)](
        row_ce_ptr=row_ce_N,
        labels_ptr=rows.labels_N,
        domains_ptr=rows.domain_ids_N,
        partial_ptr=partial_P2D,
        N=n_rows,
        D=rows.num_domains,
        ignore_index=rows.opts.ignore_index,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
    total_2D = partial_P2D.sum(dim=0)  # [2, BD]
    return total_2D[0, : rows.num_domains], total_2D[1, : rows.num_domains]


def finish_stats(rows: RowInputs, stats: Stats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [], loss_sum [D], count [D]) fp32 once every row is done; mean = sum / max(count, 1) on
    the device."""
    loss_sum_D, count_D = stats.loss_sum_D, stats.count_D
    if rows.opts.deterministic:
        loss_sum_D, count_D = reduce_per_domain(stats.row_loss_2N[0], rows)
    loss = stats.row_loss_2N[1].sum() / rows.n_valid.clamp_min(1.0)
    return loss, loss_sum_D, count_D


def domain_ce_forward(
    logits_NV: torch.Tensor,
    labels_N: torch.Tensor,
    domain_ids_N: torch.Tensor,
    num_domains: int,
    weights_D: torch.Tensor | None,
    opts: CEOptions,
    *,
    compute_grad: bool,
    inplace: bool,
    expected: Upstream | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Forward (and, with ``compute_grad``, the gradient for the ``expected`` upstream, by default
    ``opts.grad_scale`` on ``loss``) of the per-domain cross-entropy.

    Returns (loss [] fp32, loss_sum [D] fp32, count [D] fp32, grad [N, V] in the logits' dtype or
    None, saved [5, N] fp32 or None, n_valid [] fp32). With ``inplace`` the gradient overwrites
    ``logits_NV``. Without ``compute_grad`` nothing but the [2, N] row losses and the [D] sums is
    allocated, and no gradient is written.
    """
    n_rows, _ = logits_NV.shape
    device = logits_NV.device
    check_inplace_stride(logits_NV, inplace)
    if logits_NV.stride(1) != 1:
        logits_NV = logits_NV.contiguous()
    rows, stats, upstream = forward_state(
        labels_N, domain_ids_N, weights_D, num_domains, opts, device, expected
    )
    grad_NV = saved_5N = None
    if compute_grad:
        grad_NV = logits_NV if inplace else new_buffer(logits_NV.shape, logits_NV.dtype, device)
        saved_5N = new_buffer((NUM_SAVED, n_rows), torch.float32, device)
    launch_forward(logits_NV, rows, upstream, grad_NV=grad_NV, stats=stats, saved_5N=saved_5N)
    loss, loss_sum_D, count_D = finish_stats(rows, stats)
    return loss, loss_sum_D, count_D, grad_NV, saved_5N, rows.n_valid


def domain_ce_backward(
    grad_NV: torch.Tensor, rows: RowInputs, saved_5N: torch.Tensor, upstream: Upstream
) -> None:
    """Turn the forward's gradient ``grad_NV`` [N, V] into the one for ``upstream``, in place, from the
    forward's per-row state ``saved_5N`` [5, N] fp32."""
    n_rows, vocab = grad_NV.shape
    if n_rows == 0:
        return
    # backward streams a row once, when it rewrites it at all, in blocks as the two-read path
    block_v = min(triton.next_power_of_2(max(vocab, 1)), MAX_BLOCK_V)
    num_warps = warps_for(block_v)
    dummy = rows.n_valid  # any fp32 device tensor stands in for pointers a configuration does not read
    _domain_ce_bwd_kernel[(n_rows,)](
        grad_ptr=grad_NV,
        grad_row_stride=grad_NV.stride(0),
        labels_ptr=rows.labels_N,
        domains_ptr=rows.domain_ids_N,
        weights_ptr=_pointer(rows.weights_D, dummy),
        n_valid_ptr=rows.n_valid,
        grad_loss_ptr=upstream.grad_loss,
        grad_sum_ptr=_pointer(upstream.grad_sum_D, dummy),
        saved_ptr=saved_5N,
        saved_plane=saved_5N.stride(0),
        V=vocab,
        D=rows.num_domains,
        ignore_index=rows.opts.ignore_index,
        BLOCK_V=block_v,
        HAS_WEIGHTS=rows.weights_D is not None,
        HAS_GRAD_SUM=upstream.grad_sum_D is not None,
        num_warps=num_warps,
    )


def upstream_gradients(
    grad_loss: torch.Tensor | None, grad_sum_D: torch.Tensor | None, device: torch.device
) -> Upstream:
    """The upstream gradients autograd passes (``loss`` [], ``loss_sum`` [D], either may be None) as
    fp32 contiguous tensors; a missing ``loss`` gradient is 0."""
    if grad_loss is None:
        grad_loss = torch.zeros((), dtype=torch.float32, device=device)
    grad_loss = grad_loss.to(torch.float32).contiguous()
    if grad_sum_D is not None:
        grad_sum_D = grad_sum_D.to(torch.float32).contiguous()
    return Upstream(grad_loss=grad_loss, grad_sum_D=grad_sum_D)


# ---------------------------------------------------------------------------------------------------
# Autograd


class _DomainCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV, labels_N, domain_ids_N, weights_D, num_domains, opts, inplace, expected):
        # only called when the logits need a gradient (domain_cross_entropy_triton checks grad mode)
        ctx.set_materialize_grads(False)
        loss, loss_sum_D, count_D, grad_NV, saved_5N, n_valid = domain_ce_forward(
            logits_NV,
            labels_N,
            domain_ids_N,
            num_domains,
            weights_D,
            opts,
            compute_grad=True,
            inplace=inplace,
            expected=expected,
        )
        if inplace:
            # the logits now hold their gradient: an op that saved them must fail loudly in backward
            torch.autograd.graph.increment_version(logits_NV)
        ctx.mark_non_differentiable(count_D)
        ctx.grad_NV = grad_NV
        ctx.save_for_backward(labels_N, domain_ids_N, weights_D, n_valid, saved_5N)
        ctx.num_domains, ctx.opts = num_domains, opts
        return loss, loss_sum_D, count_D

    @staticmethod
    def backward(ctx, grad_loss, grad_sum_D, _grad_count):
        nones = (None,) * 7
        if grad_loss is None and grad_sum_D is None:
            return (None, *nones)
        if ctx.grad_NV is None:
            raise RuntimeError(
                "backward through the Triton domain_cross_entropy runs once per forward: its gradient "
                "buffer was handed to autograd (use the reference backend for retain_graph=True)"
            )
        labels_N, domain_ids_N, weights_D, n_valid, saved_5N = ctx.saved_tensors
        grad_NV, ctx.grad_NV = ctx.grad_NV, None
        rows = RowInputs(
            labels_N=labels_N.contiguous(),
            domain_ids_N=domain_ids_N.contiguous(),
            weights_D=weights_D,
            n_valid=n_valid,
            num_domains=ctx.num_domains,
            opts=ctx.opts,
        )
        upstream = upstream_gradients(grad_loss, grad_sum_D, grad_NV.device)
        domain_ce_backward(grad_NV, rows, saved_5N, upstream)
        return (grad_NV, *nones)


def domain_cross_entropy_triton(
    logits_NV: torch.Tensor,
    labels_N: torch.Tensor,
    domain_ids_N: torch.Tensor,
    num_domains: int,
    *,
    ignore_index: int = -100,
    domain_weights_D: torch.Tensor | None = None,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    inplace: bool = False,
    deterministic: bool = False,
    grad_scale: float | torch.Tensor = 1.0,
    grad_on: str = "loss",
) -> DomainLoss:
    """The Triton path of :func:`aioli_fast.kernels.domain_cross_entropy` (same arguments and result)."""
    check_call(
        logits_NV,
        labels_N,
        domain_ids_N,
        num_domains,
        domain_weights_D=domain_weights_D,
        lse_square_scale=lse_square_scale,
        softcap=softcap,
    )
    device = logits_NV.device
    check_same_device(device, labels=labels_N, domain_ids=domain_ids_N)
    check_grad_contract(grad_on, grad_scale, num_domains, device)
    check_inplace(logits_NV, inplace)
    weights_D, opts = kernel_options(
        domain_weights_D,
        ignore_index=ignore_index,
        lse_square_scale=lse_square_scale,
        softcap=softcap,
        deterministic=deterministic,
        grad_scale=grad_scale if grad_on == "loss" else 1.0,
    )
    if not (torch.is_grad_enabled() and logits_NV.requires_grad):
        # no_grad, inference_mode or constant logits: statistics only, no gradient buffer or pass
        loss, loss_sum_D, count_D, *_ = domain_ce_forward(
            logits_NV, labels_N, domain_ids_N, num_domains, weights_D, opts, compute_grad=False, inplace=False
        )
        return DomainLoss(loss, loss_sum_D, count_D)
    expected = expected_upstream(grad_scale, grad_on, num_domains, device)
    loss, loss_sum_D, count_D = _DomainCrossEntropy.apply(
        logits_NV, labels_N, domain_ids_N, weights_D, num_domains, opts, inplace, expected
    )
    return DomainLoss(loss, loss_sum_D, count_D)
