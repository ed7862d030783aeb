"""The Triton per-domain cross-entropy kernels against an independent float64 computation.

On a CPU the kernels run under Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` on
CPU-only torch builds), so the shapes stay small (hundreds of rows, vocabularies of a few hundred) and
the dtypes are fp32 and fp16 (the interpreter mishandles bf16; tests/test_kernels_gpu.py covers it).
The vocabulary block is lowered to 128 so that every row spans several blocks and V is not a multiple
of the block. Every buffer the kernels must write is filled with NaN before the call, so an unwritten
element fails. The expected values come from ``F.log_softmax`` in float64 and a Python loop over
domains; every option is checked there, for the Triton path and the reference alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from test_kernels_reference import ForbidHostSync

from aioli_fast.kernels import (
    DomainLoss,
    domain_cross_entropy,
    linear_domain_cross_entropy,
    resolve_backend,
)

domain_ce = pytest.importorskip("aioli_fast.kernels.domain_ce", reason="needs triton")
linear_domain_ce = pytest.importorskip("aioli_fast.kernels.linear_domain_ce", reason="needs triton")

pytestmark = pytest.mark.skipif(
    not domain_ce.INTERPRETED, reason="CPU Triton tests need TRITON_INTERPRET=1 (tests/conftest.py)"
)

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16"}
# (rtol, atol): outputs are fp32; gradients come back in the input dtype.
OUT_TOL = dict(rtol=2e-5, atol=2e-5)
# fp16: when backward rescales a row (upstream != expected), the forward's fp16 value is rounded twice
# and values below fp16's normal range (6e-5) keep their absolute, not relative, error times the ratio.
GRAD_TOL = {torch.float32: dict(rtol=2e-5, atol=2e-7), torch.float16: dict(rtol=2e-3, atol=3e-6)}


@pytest.fixture(autouse=True)
def nan_poisoned_buffers(monkeypatch):
    """Every buffer the kernels must fully write starts as NaN."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, math.nan, dtype=dtype, device=device)

    monkeypatch.setattr(domain_ce, "new_buffer", poisoned)
    monkeypatch.setattr(linear_domain_ce, "new_buffer", poisoned)
    # rows up to 128 columns take the one-read path, longer ones two reads in blocks of 128
    monkeypatch.setattr(domain_ce, "MAX_BLOCK_V", 128)
    monkeypatch.setattr(domain_ce, "ONE_READ_MAX_V", 128)


@dataclass(frozen=True)
class Case:
    n: int = 63
    v: int = 257
    d: int = 4
    dtype: torch.dtype = torch.float32
    ignore_frac: float = 0.0
    ignore_index: int = -100
    ids_dtype: torch.dtype = torch.int64
    noncontiguous: bool = False
    options: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        parts = [f"N{self.n}", f"V{self.v}", f"D{self.d}", DTYPE_NAMES[self.dtype]]
        if self.ignore_frac:
            parts.append(f"ignore{int(self.ignore_frac * 100)}pct@{self.ignore_index}")
        if self.ids_dtype != torch.int64:
            parts.append("int32ids")
        if self.noncontiguous:
            parts.append("noncontig")
        parts += [f"{k}={v}" for k, v in self.options.items()]
        return "-".join(parts)


def make_batch(case: Case, seed: int):
    """logits [N, V], labels [N], domain_ids [N], per-domain loss weights [D] (used when asked)."""
    gen = torch.Generator().manual_seed(seed)
    width = case.v + 5 if case.noncontiguous else case.v
    logits = (3.0 * torch.randn(case.n, width, generator=gen)).to(case.dtype)[:, : case.v]
    labels = torch.randint(0, case.v, (case.n,), generator=gen)
    if case.ignore_frac:
        drop = torch.rand(case.n, generator=gen) < case.ignore_frac
        drop[0] = True
        labels = torch.where(drop, torch.full_like(labels, case.ignore_index), labels)
    domains = torch.randint(0, case.d, (case.n,), generator=gen)
    weights = torch.rand(case.d, generator=gen) + 0.5
    return logits, labels.to(case.ids_dtype), domains.to(case.ids_dtype), weights


def expected_fp64(
    logits,
    labels,
    domains,
    num_domains,
    *,
    ignore_index=-100,
    domain_weights=None,
    lse_square_scale=0.0,
    softcap=None,
) -> DomainLoss:
    """Independent float64 computation: log_softmax, per-token terms, a Python loop over domains."""
    x = logits.double()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    lse = torch.logsumexp(x, dim=-1)
    ce = (lse - x.gather(1, safe_labels[:, None])[:, 0]) * valid
    term = ce + lse_square_scale * lse.square() * valid
    w = torch.ones(len(labels), dtype=torch.float64)
    if domain_weights is not None:
        w = domain_weights.double()[torch.where(valid, domains, 0).long()]
    loss_sum = [ce[valid & (domains.long() == d)].sum() for d in range(num_domains)]
    count = [(valid & (domains.long() == d)).sum().double() for d in range(num_domains)]
    loss = (w * term)[valid].sum() / max(int(valid.sum()), 1)
    return DomainLoss(loss, torch.stack(loss_sum), torch.stack(count))


UPSTREAMS = {
    # name: (gradient of loss or None, per-domain gradient of loss_sum or None)
    "loss=1": (1.0, None),
    "loss=2.5": (2.5, None),
    "loss=2.5+sums": (2.5, "random"),
    "sums-only": (None, "random"),
}


def backward_through(out: DomainLoss, upstream: str, num_domains: int) -> None:
    """Backpropagate ``upstream`` gradients (loss, loss_sum) from ``out``."""
    g_loss, g_sum = UPSTREAMS[upstream]
    objective = 0.0
    if g_loss is not None:
        objective = g_loss * out.loss
    if g_sum is not None:
        w_D = torch.linspace(-0.5, 1.5, num_domains, dtype=out.loss_sum.dtype)
        objective = objective + (w_D * out.loss_sum).sum()
    objective.backward()


def assert_outputs_close(out: DomainLoss, exp: DomainLoss) -> None:
    for name in ("loss", "loss_sum", "count"):
        got = getattr(out, name)
        assert got.dtype == torch.float32, f"{name} must be fp32, got {got.dtype}"
        assert torch.isfinite(got).all(), f"{name} has non-finite values: {got}"
    assert out.loss.shape == () and out.loss_sum.shape == exp.loss_sum.shape
    torch.testing.assert_close(out.loss.double(), exp.loss.detach(), **OUT_TOL)
    torch.testing.assert_close(out.loss_sum.double(), exp.loss_sum.detach(), **OUT_TOL)
    assert torch.equal(out.count.double(), exp.count), (out.count, exp.count)


def check_case(case: Case, upstream: str, backend: str = "triton", seed: int = 0) -> torch.Tensor:
    """Run fwd + bwd of ``case`` and compare everything with float64; returns the logits gradient."""
    logits, labels, domains, weights = make_batch(case, seed)
    options = dict(case.options)
    inplace = options.pop("inplace", False)
    if options.pop("weights", False):
        options["domain_weights"] = weights
    perf = {k: options.pop(k) for k in ("deterministic", "grad_scale") if k in options}
    leaf = logits.detach().requires_grad_()
    # in place needs a non-leaf: the gradient overwrites it
    source = leaf * 1.0 if inplace else leaf
    out = domain_cross_entropy(
        source,
        labels,
        domains,
        case.d,
        ignore_index=case.ignore_index,
        backend=backend,
        **options,
        **({"inplace": inplace, **perf} if backend == "triton" else {}),
    )
    assert isinstance(out, DomainLoss)
    assert not out.count.requires_grad
    backward_through(out, upstream, case.d)

    logits64 = logits.detach().double().requires_grad_()
    exp = expected_fp64(logits64, labels, domains, case.d, ignore_index=case.ignore_index, **options)
    backward_through(exp, upstream, case.d)
    assert_outputs_close(out, exp)
    assert leaf.grad is not None and leaf.grad.dtype == case.dtype
    assert torch.isfinite(leaf.grad).all(), "gradient has non-finite values (an unwritten element?)"
    torch.testing.assert_close(leaf.grad.double(), logits64.grad, **GRAD_TOL[case.dtype])
    ignored = labels == case.ignore_index
    assert torch.equal(leaf.grad[ignored], torch.zeros_like(leaf.grad[ignored]))
    return leaf.grad


# ---------------------------------------------------------------------------------------------------
# domain_cross_entropy


SHAPE_CASES = [
    Case(1, 257, 3),
    Case(63, 257, 4),
    Case(63, 1, 2),
    Case(64, 100, 1),
    Case(50, 33, 64),
    Case(40, 50, 70),
    Case(63, 257, 4, ignore_frac=0.3),
    Case(63, 257, 4, ignore_frac=0.3, ignore_index=5),
    Case(63, 257, 4, ids_dtype=torch.int32),
    Case(63, 257, 4, noncontiguous=True),
    Case(63, 257, 4, torch.float16, ignore_frac=0.3),
]

OPTION_CASES = [
    Case(options=dict(softcap=5.0), ignore_frac=0.3),
    Case(options=dict(lse_square_scale=0.01), ignore_frac=0.3),
    Case(options=dict(weights=True), ignore_frac=0.3),
    Case(options=dict(softcap=8.0, lse_square_scale=0.003, weights=True), ignore_frac=0.3),
    Case(options=dict(deterministic=True), ignore_frac=0.3),
    Case(50, 33, 70, options=dict(deterministic=True, weights=True)),
    Case(options=dict(inplace=True), ignore_frac=0.3),
    Case(options=dict(grad_scale=0.5)),
    # the one-read path (V <= 128 here) with every option
    Case(63, 100, 4, options=dict(softcap=8.0, lse_square_scale=0.003, weights=True), ignore_frac=0.3),
    Case(63, 128, 4, options=dict(inplace=True, deterministic=True), ignore_frac=0.3),
    Case(63, 100, 4, torch.float16, options=dict(softcap=5.0), ignore_frac=0.3),
]


@pytest.mark.parametrize("case", SHAPE_CASES + OPTION_CASES, ids=lambda c: c.id)
def test_matches_fp64(case: Case) -> None:
    check_case(case, "loss=2.5+sums")


UPSTREAM_OPTION_CASES = [
    Case(),
    Case(options=dict(softcap=8.0, lse_square_scale=0.003, weights=True), ignore_frac=0.3),
    Case(options=dict(inplace=True, deterministic=True), ignore_frac=0.3),
]


@pytest.mark.parametrize("upstream", list(UPSTREAMS), ids=list(UPSTREAMS))
@pytest.mark.parametrize("case", UPSTREAM_OPTION_CASES, ids=lambda c: c.id)
def test_any_upstream_gradient(case: Case, upstream: str) -> None:
    check_case(case, upstream)


@pytest.mark.parametrize("case", OPTION_CASES[:4], ids=lambda c: c.id)
def test_reference_options_match_fp64(case: Case) -> None:
    """The reference gains the same options; it is held to the same float64 computation."""
    check_case(case, "loss=2.5+sums", backend="reference")


def test_all_tokens_ignored_gives_exact_zeros() -> None:
    case = Case(17, 200, 3, ignore_frac=1.0, options=dict(lse_square_scale=0.01))
    logits, labels, domains, _ = make_batch(case, 1)
    labels.fill_(-100)
    logits.requires_grad_()
    out = domain_cross_entropy(logits, labels, domains, 3, lse_square_scale=0.01, backend="triton")
    backward_through(out, "loss=2.5+sums", 3)
    assert out.loss.item() == 0.0
    assert torch.equal(out.loss_sum, torch.zeros(3)) and torch.equal(out.count, torch.zeros(3))
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_empty_domains_and_garbage_ids_of_ignored_tokens(deterministic: bool) -> None:
    case = Case(40, 150, 6)
    logits, labels, domains, _ = make_batch(case, 2)
    domains = (domains % 2) * 3  # only domains 0 and 3 hold tokens
    labels[:4], domains[:4] = -100, 5  # domain 5 only has ignored tokens
    labels[4:8], domains[4:8] = -100, 99  # an ignored token's domain id is never used
    out = domain_cross_entropy(logits, labels, domains, 6, deterministic=deterministic, backend="triton")
    exp = expected_fp64(logits, labels, domains, 6)
    assert_outputs_close(out, exp)
    for empty in (1, 2, 4, 5):
        assert out.loss_sum[empty].item() == 0.0 and out.count[empty].item() == 0.0
    assert out.count.sum().item() == 32


@pytest.mark.parametrize("margin", [20.0, 40.0], ids=["label-20-above", "label-40-above"])
def test_confident_rows_keep_the_true_class_gradient(margin: float) -> None:
    """1 - p_label is computed without cancellation: the label's gradient keeps its relative accuracy.

    The label's gradient is -(1 - p_label) / N = -sum_{j != label} p_j / N. With a margin of 20,
    1 - p_label is about 1e-6 and p - 1 in fp32 keeps one or two digits; with 40 it is about 1e-15 and
    p - 1 is 0 even in float64. The expected value sums the other classes' probabilities in float64.
    """
    case = Case(31, 300, 2)
    logits, labels, domains, _ = make_batch(case, 3)
    logits = (logits / 3.0).clone()
    rows = torch.arange(case.n)
    logits[rows, labels] += margin
    leaf = logits.requires_grad_()
    domain_cross_entropy(leaf, labels, domains, 2, backend="triton").loss.backward()

    x = logits.detach().double()
    p = torch.softmax(x, dim=-1)
    others = torch.ones_like(p, dtype=torch.bool)
    others[rows, labels] = False
    rest = torch.where(others, p, torch.zeros_like(p)).sum(dim=-1)
    want = -rest / case.n
    got = leaf.grad[rows, labels].double()
    assert (want < 0).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0.0)


def test_determinism_flag_gives_bitwise_repeatable_sums() -> None:
    case = Case(200, 64, 3)
    logits, labels, domains, _ = make_batch(case, 4)
    runs = [
        domain_cross_entropy(logits, labels, domains, 3, deterministic=True, backend="triton")
        for _ in range(2)
    ]
    assert torch.equal(runs[0].loss_sum, runs[1].loss_sum) and torch.equal(runs[0].loss, runs[1].loss)


def test_inplace_overwrites_logits_and_guards_saved_tensors() -> None:
    case = Case(20, 130, 2)
    logits, labels, domains, _ = make_batch(case, 5)
    base = logits.clone().requires_grad_()
    hidden = base * 1.0
    out = domain_cross_entropy(hidden, labels, domains, 2, inplace=True, backend="triton")
    out.loss.backward()
    assert torch.equal(base.grad, hidden.detach()), "the gradient lives in the logits' buffer"

    # an op that saved the logits for its own backward must fail loudly, not use the gradient
    exp_logits = base.detach().clone().requires_grad_().exp()  # exp saves its output
    out = domain_cross_entropy(exp_logits, labels, domains, 2, inplace=True, backend="triton")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


def test_inplace_on_a_leaf_is_refused() -> None:
    logits = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(ValueError, match="must not be a leaf"):
        labels = domains = torch.zeros(4, dtype=torch.long)
        domain_cross_entropy(logits, labels, domains, 1, inplace=True, backend="triton")


def test_no_grad_forward_writes_no_gradient() -> None:
    case = Case(30, 100, 3, ignore_frac=0.2)
    logits, labels, domains, _ = make_batch(case, 6)
    with torch.no_grad():
        out = domain_cross_entropy(logits.requires_grad_(), labels, domains, 3, backend="triton")
    assert_outputs_close(out, expected_fp64(logits.detach(), labels, domains, 3))
    assert out.loss.grad_fn is None


def test_second_backward_is_refused_with_a_message() -> None:
    logits, labels, domains, _ = make_batch(Case(8, 40, 2), 7)
    out = domain_cross_entropy(logits.requires_grad_(), labels, domains, 2, backend="triton")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        out.loss.backward()


def test_no_host_sync_on_the_triton_path() -> None:
    case = Case(31, 100, 3, ignore_frac=0.3, options=dict(lse_square_scale=0.01, weights=True))
    logits, labels, domains, weights = make_batch(case, 8)
    logits.requires_grad_()
    with ForbidHostSync() as mode:
        out = domain_cross_entropy(
            logits, labels, domains, 3, domain_weights=weights, lse_square_scale=0.01, backend="triton"
        )
        n_forward = len(mode.seen)
        (2.0 * out.loss + out.loss_sum.sum()).backward()
    assert n_forward > 0 and len(mode.seen) > n_forward
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------------------
# linear_domain_cross_entropy


@dataclass(frozen=True)
class LinearCase:
    base: Case
    h: int = 24
    bias: bool = False
    chunk_size: int | None = 16
    weight_grad_fp32: bool = False

    @property
    def id(self) -> str:
        parts = [self.base.id, f"H{self.h}", "bias" if self.bias else "no-bias", f"chunk{self.chunk_size}"]
        if self.weight_grad_fp32:
            parts.append("fp32-wgrad")
        return "-".join(parts)


def check_linear(lcase: LinearCase, upstream: str, seed: int = 0) -> None:
    case = lcase.base
    gen = torch.Generator().manual_seed(seed)
    _, labels, domains, weights = make_batch(case, seed)
    hidden = torch.randn(case.n, lcase.h, generator=gen).to(case.dtype).requires_grad_()
    weight = (
        (torch.randn(case.v, lcase.h, generator=gen) / math.sqrt(lcase.h)).to(case.dtype).requires_grad_()
    )
    bias = (0.5 * torch.randn(case.v, generator=gen)).to(case.dtype).requires_grad_() if lcase.bias else None
    options = dict(case.options)
    if options.pop("weights", False):
        options["domain_weights"] = weights
    perf = {k: options.pop(k) for k in ("deterministic", "grad_scale") if k in options}

    out = linear_domain_cross_entropy(
        hidden,
        weight,
        labels,
        domains,
        case.d,
        bias=bias,
        ignore_index=case.ignore_index,
        chunk_size=lcase.chunk_size,
        weight_grad_fp32=lcase.weight_grad_fp32,
        backend="triton",
        **options,
        **perf,
    )
    backward_through(out, upstream, case.d)

    leaves64 = [
        t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)
    ]
    logits64 = F.linear(*leaves64)
    exp = expected_fp64(logits64, labels, domains, case.d, ignore_index=case.ignore_index, **options)
    backward_through(exp, upstream, case.d)

    # fp16: the chunk's logits are rounded to fp16 before the loss, as a plain matmul would round them
    out_tol = OUT_TOL if case.dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    grad_tol = dict(rtol=1e-5, atol=1e-6) if case.dtype == torch.float32 else dict(rtol=1e-2, atol=2e-3)
    torch.testing.assert_close(out.loss.double(), exp.loss.detach(), **out_tol)
    torch.testing.assert_close(out.loss_sum.double(), exp.loss_sum.detach(), **out_tol)
    assert torch.equal(out.count.double(), exp.count)
    for name, got, want in zip(("hidden", "weight", "bias"), (hidden, weight, bias), leaves64):
        if got is None:
            continue
        assert got.grad is not None and got.grad.dtype == case.dtype, name
        assert torch.isfinite(got.grad).all(), f"{name}.grad has non-finite values"
        torch.testing.assert_close(
            got.grad.double(), want.grad, **grad_tol, msg=lambda m, n=name: f"{n}: {m}"
        )


LINEAR_CASES = [
    LinearCase(Case(1, 257, 3)),
    LinearCase(Case(63, 257, 4, ignore_frac=0.3)),
    LinearCase(Case(63, 257, 4, ignore_frac=0.3), bias=True, chunk_size=None),
    LinearCase(Case(50, 33, 64), bias=True),
    LinearCase(
        Case(63, 200, 4, ignore_frac=0.3, options=dict(softcap=8.0, lse_square_scale=0.003, weights=True)),
        bias=True,
    ),
    LinearCase(Case(63, 200, 4, options=dict(deterministic=True, grad_scale=0.5))),
    LinearCase(Case(63, 200, 4, torch.float16, ignore_frac=0.3), bias=True, weight_grad_fp32=True),
]


@pytest.mark.parametrize("lcase", LINEAR_CASES, ids=lambda c: c.id)
def test_linear_matches_fp64(lcase: LinearCase) -> None:
    check_linear(lcase, "loss=2.5")


@pytest.mark.parametrize("upstream", list(UPSTREAMS), ids=list(UPSTREAMS))
def test_linear_any_upstream_gradient(upstream: str) -> None:
    options = dict(lse_square_scale=0.003, weights=True)
    check_linear(LinearCase(Case(40, 150, 3, ignore_frac=0.3, options=options), bias=True), upstream)


def test_linear_all_tokens_ignored() -> None:
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(70, 8, requires_grad=True)
    labels = torch.full((9,), -100)
    out = linear_domain_cross_entropy(
        hidden, weight, labels, torch.zeros(9, dtype=torch.long), 2, backend="triton"
    )
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.equal(out.count, torch.zeros(2))
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(
        weight.grad, torch.zeros_like(weight)
    )


def test_linear_gradient_accumulation_over_micro_batches() -> None:
    """Two micro-batches, each loss divided by 2 (grad_scale=0.5): grads add up like the reference."""
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(130, 16, generator=gen, requires_grad=True)
    weight_ref = weight.detach().clone().requires_grad_()
    for _ in range(2):
        hidden = torch.randn(30, 16, generator=gen)
        labels = torch.randint(0, 130, (30,), generator=gen)
        domains = torch.randint(0, 3, (30,), generator=gen)
        for w, backend in ((weight, "triton"), (weight_ref, "reference")):
            out = linear_domain_cross_entropy(
                hidden, w, labels, domains, 3, grad_scale=0.5, chunk_size=8, backend=backend
            )
            (out.loss / 2).backward()
    torch.testing.assert_close(weight.grad, weight_ref.grad, rtol=1e-5, atol=1e-7)


def test_linear_frozen_weight_gets_no_gradient() -> None:
    hidden = torch.randn(12, 8, requires_grad=True)
    weight = torch.randn(50, 8)
    labels = torch.randint(0, 50, (12,))
    out = linear_domain_cross_entropy(
        hidden, weight, labels, torch.zeros(12, dtype=torch.long), 1, backend="triton"
    )
    out.loss.backward()
    ref = linear_domain_cross_entropy(
        hidden.detach().requires_grad_(),
        weight,
        labels,
        torch.zeros(12, dtype=torch.long),
        1,
        backend="reference",
    )
    torch.testing.assert_close(out.loss, ref.loss)
    assert weight.grad is None and hidden.grad is not None


def test_model_trains_identically_on_both_backends(monkeypatch) -> None:
    from aioli_fast.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, max_seq_len=16, d_model=32, n_layers=1, n_heads=4, d_ff=64))
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (2, 13), generator=gen)
    labels = tokens[:, 1:].clone()
    labels[0, :3] = -100
    domain_ids = torch.tensor([0, 2])
    results = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("AIOLI_KERNELS", backend)
        model.zero_grad()
        out = model(tokens[:, :-1], labels, domain_ids, num_domains=3)
        out.loss.backward()
        results[backend] = (out, model.lm_head.weight.grad.clone())
    (out_t, grad_t), (out_r, grad_r) = results["triton"], results["reference"]
    torch.testing.assert_close(out_t.loss, out_r.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_t.loss_sum, out_r.loss_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_t, grad_r, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Dispatch and validation


def test_backend_resolution(monkeypatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.delenv("AIOLI_KERNELS", raising=False)
    assert resolve_backend(cpu) == "reference"
    assert resolve_backend(cpu, "triton") == "triton"  # under the interpreter
    monkeypatch.setenv("AIOLI_KERNELS", "triton")
    assert resolve_backend(cpu) == "triton"
    assert resolve_backend(cpu, "reference") == "reference"  # the argument wins
    monkeypatch.setenv("AIOLI_KERNELS", "fast")
    with pytest.raises(ValueError, match="AIOLI_KERNELS must be one of"):
        resolve_backend(cpu)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend(cpu, "cuda")


def _inputs():
    return torch.randn(4, 8), torch.randint(0, 8, (4,)), torch.zeros(4, dtype=torch.long)


BAD_OPTIONS = {
    "zloss-negative": (dict(lse_square_scale=-1.0), "lse_square_scale must be a finite float >= 0"),
    "zloss-nan": (dict(lse_square_scale=math.nan), "lse_square_scale must be a finite float >= 0"),
    "softcap-zero": (dict(softcap=0.0), "softcap must be None or a finite float > 0"),
    "softcap-str": (dict(softcap="30"), "softcap must be None or a float > 0"),
    "weights-shape": (dict(domain_weights=torch.ones(3)), r"domain_weights must have shape \(2,\)"),
    "weights-int": (
        dict(domain_weights=torch.ones(2, dtype=torch.long)),
        "domain_weights must be a floating",
    ),
    "ignore-float": (dict(ignore_index=-100.0), "ignore_index must be an int"),
    "grad-scale-zero": (dict(grad_scale=0.0), "grad_scale must be a non-zero float"),
    "grad-scale-inf": (dict(grad_scale=math.inf), "grad_scale must be finite"),
    "deterministic-str": (dict(deterministic="yes"), "deterministic must be a bool"),
    "inplace-int": (dict(inplace=1), "inplace must be a bool"),
}


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("bad", list(BAD_OPTIONS), ids=list(BAD_OPTIONS))
def test_bad_options_raise_value_error(bad: str, backend: str) -> None:
    kwargs, message = BAD_OPTIONS[bad]
    with pytest.raises(ValueError, match=message):
        domain_cross_entropy(*_inputs(), 2, backend=backend, **kwargs)


BAD_LINEAR_OPTIONS = {
    "chunk-zero": (dict(chunk_size=0), "chunk_size must be None or a positive int"),
    "chunk-float": (dict(chunk_size=2.0), "chunk_size must be None or a positive int"),
    "weight-dtype": (
        dict(weight=torch.randn(16, 8, dtype=torch.float64)),
        "weight must have the dtype of hidden",
    ),
    "wgrad-flag": (dict(weight_grad_fp32="no"), "weight_grad_fp32 must be a bool"),
}


@pytest.mark.parametrize("bad", list(BAD_LINEAR_OPTIONS), ids=list(BAD_LINEAR_OPTIONS))
def test_bad_linear_options_raise_value_error(bad: str) -> None:
    kwargs = dict(weight=torch.randn(16, 8))
    override, message = BAD_LINEAR_OPTIONS[bad]
    kwargs.update(override)
    weight = kwargs.pop("weight")
    with pytest.raises(ValueError, match=message):
        linear_domain_cross_entropy(
            torch.randn(4, 8),
            weight,
            torch.zeros(4, dtype=torch.long),
            torch.zeros(4, dtype=torch.long),
            2,
            backend="triton",
            **kwargs,
        )


@pytest.mark.parametrize("softcap", [None, 6.0])
def test_one_read_and_two_reads_agree(monkeypatch, softcap) -> None:
    case = Case(40, 120, 3, ignore_frac=0.2)
    logits, labels, domains, _ = make_batch(case, 9)
    results = []
    for limit in (128, 1):  # 120 columns: one read, then two reads in blocks of 128
        monkeypatch.setattr(domain_ce, "ONE_READ_MAX_V", limit)
        leaf = logits.clone().requires_grad_()
        out = domain_cross_entropy(leaf, labels, domains, 3, softcap=softcap, backend="triton")
        (out.loss + out.loss_sum.sum()).backward()
        results.append((out, leaf.grad))
    (a, ga), (b, gb) = results
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-9)
    assert domain_ce.launch_config(120)[2] is False  # the limit is still 1 here
