"""The pure-PyTorch per-domain cross-entropy against an independent float64 computation.

The expected values come from ``F.cross_entropy(reduction="none")`` in float64 followed by a Python loop
over domains with boolean masks: a different route from the reference's fp32 log-sum-exp + ``index_add``.
Gradients are checked with an upstream gradient that is not 1 and differs per domain
(``2.5 * loss + (w_D * loss_sum).sum()``), so a wrong scale on either output shows.

Low-precision inputs are compared with float64 of the *same* low-precision values: the reference computes
in fp32, so outputs must agree to fp32 accuracy; gradients come back in the input dtype and get that
dtype's tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from aioli_fast.kernels import (
    DomainLoss,
    domain_cross_entropy,
    domain_cross_entropy_reference,
    linear_domain_cross_entropy,
    linear_domain_cross_entropy_reference,
)

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# (rtol, atol) for gradients returned in the input dtype: half an ulp of rounding, plus fp32 noise.
GRAD_TOL = {torch.float32: (1e-5, 1e-7), torch.bfloat16: (8e-3, 1e-7), torch.float16: (1e-3, 1e-7)}
# Outputs are fp32 whatever the input dtype.
OUT_TOL = dict(rtol=1e-5, atol=1e-5)

CE_IMPLS = {"public": domain_cross_entropy, "reference": domain_cross_entropy_reference}


def call_linear_public(hidden, weight, labels, domains, num_domains, *, bias=None, ignore_index=-100):
    return linear_domain_cross_entropy(
        hidden, weight, labels, domains, num_domains, bias=bias, ignore_index=ignore_index
    )


def call_linear_reference(hidden, weight, labels, domains, num_domains, *, bias=None, ignore_index=-100):
    return linear_domain_cross_entropy_reference(
        hidden, weight, labels, domains, num_domains, bias_V=bias, ignore_index=ignore_index
    )


LINEAR_IMPLS = {"public": call_linear_public, "reference": call_linear_reference}


@dataclass(frozen=True)
class Case:
    n: int
    v: int
    d: int
    dtype: torch.dtype = torch.float32
    ignore_frac: float = 0.0
    ignore_index: int = -100
    ids_dtype: torch.dtype = torch.int64
    noncontiguous: bool = False

    @property
    def id(self) -> str:
        parts = [f"N{self.n}", f"V{self.v}", f"D{self.d}", DTYPE_NAMES[self.dtype]]
        if self.ignore_frac:
            parts.append(f"ignore{int(self.ignore_frac * 100)}pct@{self.ignore_index}")
        if self.ids_dtype != torch.int64:
            parts.append("int32ids")
        if self.noncontiguous:
            parts.append("noncontig")
        return "-".join(parts)


CASES = [
    Case(1, 257, 3),
    Case(63, 257, 4),
    Case(63, 1, 2),
    Case(64, 100, 1),
    Case(50, 33, 64),
    Case(63, 257, 4, ignore_frac=0.3),
    Case(63, 257, 4, ignore_frac=0.3, ignore_index=-1),
    Case(63, 257, 4, ignore_frac=0.3, ignore_index=5),
    Case(63, 257, 4, ids_dtype=torch.int32),
    Case(63, 257, 4, noncontiguous=True),
    Case(63, 257, 4, torch.bfloat16),
    Case(63, 257, 4, torch.bfloat16, ignore_frac=0.3),
    Case(63, 257, 4, torch.float16),
    Case(1, 257, 3, torch.float16),
]

LINEAR_CASES = [
    Case(1, 257, 3),
    Case(63, 257, 4),
    Case(63, 1, 2),
    Case(50, 33, 64),
    Case(63, 257, 4, ignore_frac=0.3, ignore_index=-1),
    Case(63, 257, 4, torch.bfloat16),
    Case(63, 257, 4, torch.float16, ignore_frac=0.3),
]


def make_targets(case: Case, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """labels [N] and domain_ids [N] for a case; a fraction of labels set to ``ignore_index``."""
    labels = torch.randint(0, case.v, (case.n,), generator=gen)
    if case.ignore_frac:
        drop = torch.rand(case.n, generator=gen) < case.ignore_frac
        drop[0] = True  # at least one ignored token whatever the draw
        labels = torch.where(drop, torch.full_like(labels, case.ignore_index), labels)
    domains = torch.randint(0, case.d, (case.n,), generator=gen)
    return labels.to(case.ids_dtype), domains.to(case.ids_dtype)


def make_logits(case: Case, gen: torch.Generator) -> torch.Tensor:
    """logits [N, V] in the case dtype (a column slice of a wider tensor when noncontiguous)."""
    width = case.v + 7 if case.noncontiguous else case.v
    logits = (3.0 * torch.randn(case.n, width, generator=gen)).to(case.dtype)
    return logits[:, : case.v] if case.noncontiguous else logits


def domain_weights(num_domains: int, gen: torch.Generator) -> torch.Tensor:
    """Distinct per-domain upstream weights w_D (fp32), so each domain's gradient has its own scale."""
    return torch.rand(num_domains, generator=gen) * 2.0 - 0.5


def objective(out, w_D: torch.Tensor) -> torch.Tensor:
    """Scalar whose gradient exercises both differentiable outputs with upstream gradients != 1."""
    return 2.5 * out.loss + (w_D.to(out.loss_sum.dtype) * out.loss_sum).sum()


def expected_fp64(logits, labels, domains, num_domains, ignore_index=-100) -> DomainLoss:
    """Independent float64 per-domain cross-entropy: F.cross_entropy + a Python loop over domains.

    ``logits`` may require grad (in float64); loss and loss_sum are differentiable, count is not.
    """
    token_loss = F.cross_entropy(logits, labels.long(), reduction="none", ignore_index=ignore_index)
    valid = labels != ignore_index
    loss_sum = torch.empty(num_domains, dtype=torch.float64).fill_(math.nan)
    count = torch.empty(num_domains, dtype=torch.float64).fill_(math.nan)
    for d in range(num_domains):
        in_d = valid & (domains.long() == d)
        loss_sum[d] = token_loss[in_d].sum()
        count[d] = in_d.sum()
    n_valid = int(valid.sum())
    loss = token_loss[valid].sum() / max(n_valid, 1)
    return DomainLoss(loss, loss_sum, count)


def assert_outputs_match(out: DomainLoss, exp: DomainLoss) -> None:
    for name in ("loss", "loss_sum", "count"):
        got = getattr(out, name)
        assert got.dtype == torch.float32, f"{name} must be fp32, got {got.dtype}"
        assert torch.isfinite(got).all(), f"{name} has non-finite values: {got}"
    assert out.loss.shape == ()
    assert out.loss_sum.shape == exp.loss_sum.shape
    assert out.count.shape == exp.count.shape
    torch.testing.assert_close(out.loss.double(), exp.loss.detach(), **OUT_TOL)
    torch.testing.assert_close(out.loss_sum.double(), exp.loss_sum.detach(), **OUT_TOL)
    # Counts are small integers: exact.
    assert torch.equal(out.count.double(), exp.count), (out.count, exp.count)


# ---------------------------------------------------------------------------------------------------
# domain_cross_entropy: forward and backward against float64


@pytest.mark.parametrize("impl", list(CE_IMPLS), ids=list(CE_IMPLS))
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_forward_matches_fp64(case: Case, impl: str) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = make_logits(case, gen)
    labels, domains = make_targets(case, gen)

    out = CE_IMPLS[impl](logits, labels, domains, case.d, ignore_index=case.ignore_index)

    assert isinstance(out, DomainLoss)
    exp = expected_fp64(logits.double(), labels, domains, case.d, case.ignore_index)
    assert_outputs_match(out, exp)
    assert not out.count.requires_grad


@pytest.mark.parametrize("impl", list(CE_IMPLS), ids=list(CE_IMPLS))
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_backward_matches_fp64(case: Case, impl: str) -> None:
    gen = torch.Generator().manual_seed(1)
    logits = make_logits(case, gen).detach().requires_grad_()
    labels, domains = make_targets(case, gen)
    w_D = domain_weights(case.d, gen)

    out = CE_IMPLS[impl](logits, labels, domains, case.d, ignore_index=case.ignore_index)
    objective(out, w_D).backward()

    logits64 = logits.detach().double().requires_grad_()
    exp = expected_fp64(logits64, labels, domains, case.d, case.ignore_index)
    objective(exp, w_D).backward()

    assert logits.grad is not None and logits.grad.dtype == case.dtype
    assert logits.grad.shape == logits.shape
    assert torch.isfinite(logits.grad).all()
    rtol, atol = GRAD_TOL[case.dtype]
    torch.testing.assert_close(logits.grad.double(), logits64.grad, rtol=rtol, atol=atol)
    if case.ignore_frac:
        ignored = labels == case.ignore_index
        assert torch.equal(logits.grad[ignored], torch.zeros_like(logits.grad[ignored]))


# ---------------------------------------------------------------------------------------------------
# linear_domain_cross_entropy: hidden, weight and bias gradients


def linear_tolerances(dtype: torch.dtype) -> tuple[dict, dict]:
    """(output tol, gradient tol). Low precision: the reference rounds the logits to the input dtype."""
    if dtype == torch.float32:
        return OUT_TOL, dict(rtol=1e-5, atol=1e-6)
    if dtype == torch.float16:
        return dict(rtol=2e-3, atol=2e-3), dict(rtol=1e-2, atol=1e-3)
    return dict(rtol=1.5e-2, atol=1.5e-2), dict(rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("impl", list(LINEAR_IMPLS), ids=list(LINEAR_IMPLS))
@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c.id for c in LINEAR_CASES])
def test_linear_matches_fp64(case: Case, impl: str, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    h = 24
    hidden = torch.randn(case.n, h, generator=gen).to(case.dtype).requires_grad_()
    weight = (torch.randn(case.v, h, generator=gen) / math.sqrt(h)).to(case.dtype).requires_grad_()
    bias = (0.5 * torch.randn(case.v, generator=gen)).to(case.dtype).requires_grad_() if with_bias else None
    labels, domains = make_targets(case, gen)
    w_D = domain_weights(case.d, gen)

    out = LINEAR_IMPLS[impl](
        hidden, weight, labels, domains, case.d, bias=bias, ignore_index=case.ignore_index
    )
    objective(out, w_D).backward()

    hidden64 = hidden.detach().double().requires_grad_()
    weight64 = weight.detach().double().requires_grad_()
    bias64 = bias.detach().double().requires_grad_() if with_bias else None
    exp = expected_fp64(F.linear(hidden64, weight64, bias64), labels, domains, case.d, case.ignore_index)
    objective(exp, w_D).backward()

    out_tol, grad_tol = linear_tolerances(case.dtype)
    for name in ("loss", "loss_sum", "count"):
        assert getattr(out, name).dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), exp.loss.detach(), **out_tol)
    torch.testing.assert_close(out.loss_sum.double(), exp.loss_sum.detach(), **out_tol)
    assert torch.equal(out.count.double(), exp.count)
    pairs = [("hidden", hidden, hidden64), ("weight", weight, weight64)]
    if with_bias:
        pairs.append(("bias", bias, bias64))
    for name, got, want in pairs:
        assert got.grad is not None, f"no gradient reached {name}"
        assert got.grad.dtype == case.dtype, f"{name}.grad dtype {got.grad.dtype}"
        assert torch.isfinite(got.grad).all(), f"{name}.grad has non-finite values"
        message = lambda m, n=name: f"{n}.grad: {m}"
        torch.testing.assert_close(got.grad.double(), want.grad, **grad_tol, msg=message)


# ---------------------------------------------------------------------------------------------------
# Edge cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("ignore_index", [-100, 3], ids=["ignore@-100", "ignore@3"])
def test_all_tokens_ignored_gives_exact_zeros(dtype: torch.dtype, ignore_index: int) -> None:
    gen = torch.Generator().manual_seed(3)
    n, v, d = 17, 40, 3
    logits = torch.randn(n, v, generator=gen).to(dtype).requires_grad_()
    labels = torch.full((n,), ignore_index)
    domains = torch.randint(0, d, (n,), generator=gen)

    out = domain_cross_entropy(logits, labels, domains, d, ignore_index=ignore_index)
    objective(out, domain_weights(d, gen)).backward()

    assert out.loss.dtype == torch.float32
    assert not torch.isnan(out.loss), "all-ignored batch must give loss 0, not NaN"
    assert out.loss.item() == 0.0
    assert torch.equal(out.loss_sum, torch.zeros(d))
    assert torch.equal(out.count, torch.zeros(d))
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_empty_domains_have_zero_sum_and_count() -> None:
    gen = torch.Generator().manual_seed(4)
    n, v, d = 40, 50, 6
    logits = torch.randn(n, v, generator=gen).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen)
    domains = torch.randint(0, 2, (n,), generator=gen) * 3  # only domains 0 and 3 present
    # Domain 5 only holds ignored tokens: it must count nothing either.
    labels[:4], domains[:4] = -100, 5

    out = domain_cross_entropy(logits, labels, domains, d)

    for empty in (1, 2, 4, 5):
        assert out.loss_sum[empty].item() == 0.0 and out.count[empty].item() == 0.0, empty
    assert (out.count[[0, 3]] > 0).all()
    exp = expected_fp64(logits.double(), labels, domains, d)
    assert_outputs_match(out, exp)
    assert out.count.sum().item() == n - 4

    # Only the empty domains get weight: nothing flows back.
    w_D = torch.tensor([0.0, 1.0, 2.0, 0.0, 3.0, 4.0])
    (w_D * out.loss_sum).sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("bad_domain", [-1, 99], ids=["negative", "out-of-range"])
def test_domain_id_of_ignored_tokens_is_not_used(bad_domain: int) -> None:
    gen = torch.Generator().manual_seed(5)
    n, v, d = 30, 20, 3
    logits = torch.randn(n, v, generator=gen)
    labels = torch.randint(0, v, (n,), generator=gen)
    domains = torch.randint(0, d, (n,), generator=gen)
    labels[::4] = -100
    garbage = domains.clone()
    garbage[::4] = bad_domain

    out = domain_cross_entropy(logits, labels, garbage, d)

    assert_outputs_match(out, expected_fp64(logits.double(), labels, domains, d))


def test_mean_weights_every_token_equally_across_domains() -> None:
    """loss is the token mean (sum of loss_sum / sum of count), not a mean of domain means."""
    gen = torch.Generator().manual_seed(6)
    n, v, d = 41, 30, 3
    logits = torch.randn(n, v, generator=gen)
    labels = torch.randint(0, v, (n,), generator=gen)
    domains = torch.cat([torch.zeros(35, dtype=torch.long), torch.tensor([1] * 5 + [2])])

    out = domain_cross_entropy(logits, labels, domains, d)

    torch.testing.assert_close(out.loss, out.loss_sum.sum() / out.count.sum())
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, labels))


@pytest.mark.parametrize(
    "margin", [60.0, 1000.0, -60.0], ids=["label-60-above", "label-1000-above", "label-60-below"]
)
def test_confident_predictions_bf16(margin: float) -> None:
    """The label logit far from the rest: loss near 0 (or near the margin) and finite, gradient finite."""
    gen = torch.Generator().manual_seed(7)
    n, v, d = 33, 257, 2
    labels = torch.randint(0, v, (n,), generator=gen)
    domains = torch.randint(0, d, (n,), generator=gen)
    logits_f = torch.randn(n, v, generator=gen)
    logits_f[torch.arange(n), labels] += margin
    logits = logits_f.to(torch.bfloat16).requires_grad_()

    w_D = domain_weights(d, gen)

    out = domain_cross_entropy(logits, labels, domains, d)
    objective(out, w_D).backward()

    logits64 = logits.detach().double().requires_grad_()
    exp = expected_fp64(logits64, labels, domains, d)
    objective(exp, w_D).backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.loss_sum).all()
    assert torch.isfinite(logits.grad).all()
    assert out.loss.item() >= 0.0
    if margin > 0:
        assert out.loss.item() < 1e-6
        assert logits.grad.abs().max().item() < 1e-6
    else:
        assert out.loss.item() > margin * -0.9
    torch.testing.assert_close(out.loss.double(), exp.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss_sum.double(), exp.loss_sum.detach(), rtol=1e-5, atol=1e-5)
    rtol, atol = GRAD_TOL[torch.bfloat16]
    torch.testing.assert_close(logits.grad.double(), logits64.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=DTYPE_NAMES.get)
def test_huge_logits_do_not_overflow(dtype: torch.dtype) -> None:
    """Logits near the fp16 maximum: exp must not overflow (max subtracted before the exponent)."""
    gen = torch.Generator().manual_seed(8)
    n, v, d = 20, 64, 2
    logits = ((torch.rand(n, v, generator=gen) * 2 - 1) * 6.0e4).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen)
    domains = torch.randint(0, d, (n,), generator=gen)

    out = domain_cross_entropy(logits, labels, domains, d)
    out.loss.backward()

    exp = expected_fp64(logits.detach().double(), labels, domains, d)
    assert torch.isfinite(logits.grad).all()
    assert_outputs_match(out, exp)


# ---------------------------------------------------------------------------------------------------
# Input validation


def _valid_inputs(n: int = 8, v: int = 16):
    logits = torch.randn(n, v)
    labels = torch.randint(0, v, (n,))
    domains = torch.randint(0, 2, (n,))
    return logits, labels, domains


BAD_CE_INPUTS = {
    "logits-1d": (lambda lg, lb, dm: (lg[0], lb[:1], dm[:1], 2), "logits must be 2-D"),
    "logits-3d": (lambda lg, lb, dm: (lg[None], lb, dm, 2), "logits must be 2-D"),
    "logits-int": (lambda lg, lb, dm: (lg.long(), lb, dm, 2), "floating-point"),
    "labels-short": (lambda lg, lb, dm: (lg, lb[:-1], dm, 2), "labels must have shape"),
    "labels-2d": (lambda lg, lb, dm: (lg, lb[:, None], dm, 2), "labels must have shape"),
    "labels-float": (lambda lg, lb, dm: (lg, lb.float(), dm, 2), "labels must be an integer"),
    "labels-bool": (lambda lg, lb, dm: (lg, lb > 3, dm, 2), "labels must be an integer"),
    "domains-long": (lambda lg, lb, dm: (lg, lb, torch.cat([dm, dm]), 2), "domain_ids must have shape"),
    "domains-float": (lambda lg, lb, dm: (lg, lb, dm.float(), 2), "domain_ids must be an integer"),
    "num-domains-0": (lambda lg, lb, dm: (lg, lb, dm, 0), "num_domains must be a positive int"),
    "num-domains-neg": (lambda lg, lb, dm: (lg, lb, dm, -3), "num_domains must be a positive int"),
    "num-domains-float": (lambda lg, lb, dm: (lg, lb, dm, 2.0), "num_domains must be a positive int"),
    "num-domains-bool": (lambda lg, lb, dm: (lg, lb, dm, True), "num_domains must be a positive int"),
}


@pytest.mark.parametrize("impl", list(CE_IMPLS), ids=list(CE_IMPLS))
@pytest.mark.parametrize("bad", list(BAD_CE_INPUTS), ids=list(BAD_CE_INPUTS))
def test_bad_inputs_raise_value_error(bad: str, impl: str) -> None:
    build, message = BAD_CE_INPUTS[bad]
    args = build(*_valid_inputs())
    with pytest.raises(ValueError, match=message):
        CE_IMPLS[impl](*args)


BAD_LINEAR_INPUTS = {
    "hidden-3d": (dict(hidden=torch.randn(2, 4, 8)), "hidden must be 2-D"),
    "weight-wrong-H": (dict(weight=torch.randn(16, 7)), r"weight must have shape \[V, 8\]"),
    "weight-1d": (dict(weight=torch.randn(16)), r"weight must have shape \[V, 8\]"),
    "bias-wrong-V": (dict(bias=torch.randn(15)), r"bias must have shape \(16,\)"),
    "labels-float": (dict(labels=torch.zeros(4)), "labels must be an integer"),
    "num-domains-0": (dict(num_domains=0), "num_domains must be a positive int"),
}


@pytest.mark.parametrize("impl", list(LINEAR_IMPLS), ids=list(LINEAR_IMPLS))
@pytest.mark.parametrize("bad", list(BAD_LINEAR_INPUTS), ids=list(BAD_LINEAR_INPUTS))
def test_linear_bad_inputs_raise_value_error(bad: str, impl: str) -> None:
    override, message = BAD_LINEAR_INPUTS[bad]
    kwargs = dict(
        hidden=torch.randn(4, 8),
        weight=torch.randn(16, 8),
        labels=torch.randint(0, 16, (4,)),
        domains=torch.zeros(4, dtype=torch.long),
        num_domains=2,
        bias=torch.zeros(16),
    )
    kwargs.update(override)
    bias = kwargs.pop("bias")
    with pytest.raises(ValueError, match=message):
        LINEAR_IMPLS[impl](*kwargs.values(), bias=bias)


# ---------------------------------------------------------------------------------------------------
# No host synchronisation


class HostSyncError(RuntimeError):
    pass


def _forbidden_packets() -> set:
    """Ops that copy a device value to the host (each one a stream sync on CUDA)."""
    names = ["_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select"]
    return {getattr(torch.ops.aten, name) for name in names if hasattr(torch.ops.aten, name)}


class ForbidHostSync(TorchDispatchMode):
    """Raises HostSyncError on any op that would synchronise with the host; records the ops it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.forbidden = _forbidden_packets()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.seen.append(str(func.overloadpacket))
        if func.overloadpacket in self.forbidden:
            raise HostSyncError(f"host synchronisation: {func}")
        if func.overloadpacket is torch.ops.aten.index and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        ):
            raise HostSyncError(f"host synchronisation: boolean-mask indexing via {func}")
        return func(*args, **kwargs)


class _ItemInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        grad.sum().item()
        return 2 * grad


def _sync_item(x):
    x.sum().item()


def _sync_bool(x):
    bool(x.sum() > 0)


def _sync_mask_index(x):
    x[x > 0]


def _sync_in_backward(x):
    _ItemInBackward.apply(x.clone().requires_grad_()).sum().backward()


POSITIVE_CONTROLS = {
    "item": _sync_item,
    "bool": _sync_bool,
    "mask-index": _sync_mask_index,
    "item-in-backward": _sync_in_backward,
}


@pytest.mark.parametrize("control", list(POSITIVE_CONTROLS), ids=list(POSITIVE_CONTROLS))
def test_forbid_host_sync_mode_catches_syncs(control: str) -> None:
    """Positive control: the mode really fires, in forward and inside autograd's backward."""
    x = torch.randn(5)
    with pytest.raises(HostSyncError, match="host synchronisation"):
        with ForbidHostSync():
            POSITIVE_CONTROLS[control](x)


@pytest.mark.parametrize("ignore_frac", [0.0, 0.3, 1.0], ids=["none-ignored", "some-ignored", "all-ignored"])
def test_no_host_sync_in_forward_and_backward(ignore_frac: float) -> None:
    case = Case(63, 257, 4, ignore_frac=ignore_frac)
    gen = torch.Generator().manual_seed(9)
    logits = make_logits(case, gen).requires_grad_()
    labels, domains = make_targets(case, gen)
    if ignore_frac == 1.0:
        labels.fill_(case.ignore_index)
    w_D = domain_weights(case.d, gen)

    with ForbidHostSync() as mode:
        out = domain_cross_entropy(logits, labels, domains, case.d)
        n_forward = len(mode.seen)
        objective(out, w_D).backward()

    assert n_forward > 0, "the mode saw no forward op: it was not active"
    assert len(mode.seen) > n_forward, "the mode saw no backward op: it was not active"
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_no_host_sync_linear_forward_and_backward() -> None:
    gen = torch.Generator().manual_seed(10)
    hidden = torch.randn(31, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    bias = torch.zeros(50, requires_grad=True)
    labels = torch.randint(0, 50, (31,), generator=gen)
    labels[::3] = -100
    domains = torch.randint(0, 3, (31,), generator=gen)

    with ForbidHostSync() as mode:
        out = linear_domain_cross_entropy(hidden, weight, labels, domains, 3, bias=bias)
        n_forward = len(mode.seen)
        objective(out, domain_weights(3, gen)).backward()

    assert n_forward > 0 and len(mode.seen) > n_forward
    assert all(t.grad is not None for t in (hidden, weight, bias))


def test_non_finite_logits_in_an_ignored_row_do_not_leak():
    logits = torch.randn(4, 8)
    logits[1] = float("nan")
    logits[3, 2] = float("inf")
    labels = torch.tensor([1, -100, 2, -100])
    domains = torch.tensor([0, 0, 1, 1])
    logits.requires_grad_(True)
    out = domain_cross_entropy(logits, labels, domains, 2)
    kept = torch.tensor([0, 2])
    expected = F.cross_entropy(logits.detach()[kept].double(), labels[kept], reduction="none")
    assert torch.allclose(out.loss_sum.double(), expected, atol=1e-6)
    assert torch.allclose(out.loss.double(), expected.mean(), atol=1e-6)
    out.loss.backward()
    # counted rows get the usual gradient; (like F.cross_entropy, the gradient of a non-finite
    # ignored row is not defined and not checked)
    expected_grad = (logits.detach()[kept].softmax(-1) - F.one_hot(labels[kept], 8)) / 2
    assert torch.allclose(logits.grad[kept], expected_grad, atol=1e-6)
