"""What the per-domain loss costs on each caller's path, counted rather than timed.

- Grad mode: under ``torch.no_grad()`` / ``torch.inference_mode()`` (or with inputs that need no
  gradient) neither function allocates a gradient buffer, launches a gradient pass or runs a gradient
  matmul, on either backend: the ops are counted with a dispatch mode.
- The gradient contract (docs/kernels.md): a caller that says where its upstream gradient arrives gets
  the final gradient from the forward pass; backward then rewrites no row (a sentinel written into the
  gradient buffer between forward and backward survives) and no second [N, V] buffer is allocated.
  This is checked for the kernel itself, the adapters' :meth:`OnlineMixing.domain_loss`, torchtitan's
  ``AioliLoss`` scale and the native trainer's fused-linear path.

The Triton kernels run under the interpreter here (tests/conftest.py), so every launch is real.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aioli_fast.kernels import domain_cross_entropy, linear_domain_cross_entropy

domain_ce = pytest.importorskip("aioli_fast.kernels.domain_ce", reason="needs triton")
linear_domain_ce = pytest.importorskip("aioli_fast.kernels.linear_domain_ce", reason="needs triton")

pytestmark = pytest.mark.skipif(
    not domain_ce.INTERPRETED, reason="CPU Triton tests need TRITON_INTERPRET=1 (tests/conftest.py)"
)


class OpLog(TorchDispatchMode):
    """Records every aten op and the tensors it creates (outputs that share no storage with an input)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.created: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__)
        self.ops.append(name)
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.created.append((name, tuple(t.shape)))
        return out

    def big(self, numel: int) -> list[tuple[str, tuple[int, ...]]]:
        """The created tensors of at least ``numel`` elements."""
        return [(n, s) for n, s in self.created if math.prod(s) >= numel]


class LaunchCounter:
    """Counts the launches of one kernel of ``domain_ce`` (installed with monkeypatch)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _batch(n=48, v=96, d=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n, v, generator=gen)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::7] = -100
    domains = torch.randint(0, d, (n,), generator=gen)
    return logits, labels, domains


def _linear_batch(n=40, h=16, v=96, d=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.nn.Parameter(0.3 * torch.randn(v, h, generator=gen))
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::5] = -100
    domains = torch.randint(0, d, (n,), generator=gen)
    return hidden, weight, labels, domains


# ---------------------------------------------------------------------------------------------------
# grad mode


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_gradient_work_without_grad_mode(backend, mode):
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    logits, labels, domains = _batch()
    hidden, weight, lab2, dom2 = _linear_batch()

    def run(needs_grad: bool):
        x = logits.clone().requires_grad_(needs_grad)
        w = weight if needs_grad else weight.detach()
        h = hidden.clone().requires_grad_(needs_grad)
        with OpLog() as log, context():
            a = domain_cross_entropy(x, labels, domains, 3, backend=backend)
            b = linear_domain_cross_entropy(h, w, lab2, dom2, 3, backend=backend)
        return log, a, b

    grad_log, a1, b1 = run(True)
    plain_log, a0, b0 = run(False)
    # the same ops as with inputs that need no gradient: nothing is done for a gradient
    assert grad_log.ops == plain_log.ops
    if backend == "triton":  # the reference's forward itself makes an [N, V] log-softmax
        assert not grad_log.big(logits.numel()), grad_log.big(logits.numel())  # no [N, V] buffer
    grad_shapes = {tuple(weight.shape), tuple(hidden.shape)}  # no [V, H] or [N, H] gradient buffer
    assert not [c for c in grad_log.created if c[1] in grad_shapes], grad_log.created
    for got, want in ((a1, a0), (b1, b0)):
        assert got.loss.grad_fn is None and got.loss_sum.grad_fn is None
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_no_gradient_launch_without_grad_mode(monkeypatch):
    forward = LaunchCounter(domain_ce._domain_ce_fwd_kernel)
    monkeypatch.setattr(domain_ce, "_domain_ce_fwd_kernel", forward)
    logits, labels, domains = _batch()
    hidden, weight, lab2, dom2 = _linear_batch()
    with OpLog() as log, torch.no_grad():
        domain_cross_entropy(logits.requires_grad_(), labels, domains, 3, backend="triton")
        linear_domain_cross_entropy(hidden.requires_grad_(), weight, lab2, dom2, 3, backend="triton")
    assert forward.launches >= 2
    # the only matmuls are the logits chunks: no hidden- or weight-gradient contraction
    chunks = math.ceil(hidden.shape[0] / linear_domain_ce.default_chunk_size(hidden.shape[0], 96, 4))
    assert log.ops.count("mm") == chunks and "addmm" not in log.ops


# ---------------------------------------------------------------------------------------------------
# the gradient contract


def _fp64_grad(logits, labels, domains, d, objective):
    x = logits.detach().double().requires_grad_()
    valid = labels != -100
    safe = torch.where(valid, labels, 0)
    ce = (torch.logsumexp(x, -1) - x.gather(1, safe[:, None])[:, 0]) * valid
    loss_sum = torch.zeros(d, dtype=torch.float64).index_add(0, torch.where(valid, domains, 0), ce)
    loss = ce.sum() / valid.sum().clamp_min(1)
    objective(loss, loss_sum).backward()
    return x.grad


SCALES = {
    "float": lambda d: 1.0 / 41,
    "tensor[]": lambda d: torch.tensor(1.0 / 41),
    "tensor[D]": lambda d: torch.linspace(0.01, 0.05, d),
}


@pytest.mark.parametrize("scale_kind", list(SCALES))
def test_a_kept_contract_rewrites_no_row_in_backward(scale_kind):
    logits, labels, domains = _batch()
    scale = SCALES[scale_kind](3)
    base = logits.clone().requires_grad_()
    x = base * 1.0  # not a leaf: the gradient goes over it
    out = domain_cross_entropy(
        x, labels, domains, 3, grad_on="loss_sum", grad_scale=scale, inplace=True, backend="triton"
    )
    seen = []
    x.register_hook(lambda g: seen.append(g))
    # a row pass of backward rewrites at least the label's entry: a sentinel there shows whether one ran
    sentinel, at = 1234.5, int(labels[1])
    assert at != -100
    with torch.no_grad():
        x[1, at] = sentinel
    (out.loss_sum * scale).sum().backward()
    grad = seen[0]
    assert grad.untyped_storage().data_ptr() == x.untyped_storage().data_ptr(), "a second [N, V] buffer"
    assert grad[1, at] == sentinel, "backward rewrote a row the forward had already finished"
    want = _fp64_grad(logits, labels, domains, 3, lambda loss, s: (s * torch.as_tensor(scale).double()).sum())
    mask = torch.ones_like(grad, dtype=torch.bool)
    mask[1, at] = False
    torch.testing.assert_close(grad.double()[mask], want[mask], rtol=2e-5, atol=2e-7)


def test_a_scale_off_by_a_few_roundings_still_rewrites_nothing():
    # Lightning multiplies the step loss by the accumulation steps and divides it again
    logits, labels, domains = _batch(seed=3)
    tokens = int((labels != -100).sum())
    x = logits.clone().requires_grad_() * 1.0
    out = domain_cross_entropy(
        x, labels, domains, 3, grad_on="loss_sum", grad_scale=1.0 / tokens, inplace=True, backend="triton"
    )
    seen = []
    x.register_hook(lambda g: seen.append(g))
    at = int(labels[1])
    with torch.no_grad():
        x[1, at] = 99.0  # the label's entry: any row pass rewrites it
    ((out.loss_sum.sum() / tokens) * 49 / 49).backward()
    assert seen[0][1, at] == 99.0


@pytest.mark.parametrize("upstream", ["loss", "loss_sum x 3", "both"])
def test_a_broken_contract_is_still_correct(upstream):
    logits, labels, domains = _batch(seed=4)
    leaf = logits.clone().requires_grad_()
    scale = torch.tensor([0.1, 0.2, 0.3])
    contract = dict(grad_on="loss_sum", grad_scale=scale)
    out = domain_cross_entropy(leaf, labels, domains, 3, **contract, backend="triton")
    objectives = {
        "loss": lambda loss, s: 2.0 * loss,
        "loss_sum x 3": lambda loss, s: (s * torch.tensor([0.3, 0.6, 0.9], dtype=s.dtype)).sum(),
        "both": lambda loss, s: loss + (s * torch.tensor([0.1, 0.2, 0.3], dtype=s.dtype)).sum(),
    }
    objectives[upstream](out.loss, out.loss_sum).backward()
    want = _fp64_grad(logits, labels, domains, 3, objectives[upstream])
    torch.testing.assert_close(leaf.grad.double(), want, rtol=2e-5, atol=2e-7)


@pytest.mark.parametrize(
    ("grad_on", "scale", "match"),
    [
        ("sums", 1.0, "grad_on must be one of"),
        ("loss", torch.tensor(1.0), "a tensor grad_scale"),
        ("loss_sum", torch.ones(2), "shape"),
        ("loss_sum", torch.ones((), dtype=torch.int64), "float tensor"),
        ("loss_sum", torch.ones((), requires_grad=True), "must not require a gradient"),
    ],
)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_a_bad_contract_is_refused(grad_on, scale, match, backend):
    logits, labels, domains = _batch()
    with pytest.raises(ValueError, match=match):
        domain_cross_entropy(logits, labels, domains, 3, grad_on=grad_on, grad_scale=scale, backend=backend)


# ---------------------------------------------------------------------------------------------------
# the callers


@pytest.fixture(scope="module")
def mixing(tmp_path_factory):
    from helpers import prepare_three_domains

    from aioli_fast.integrations.common import OnlineMixing

    root = prepare_three_domains(tmp_path_factory.mktemp("contract"))
    m = OnlineMixing(root / "corpus", step_rows=4, device="cpu", mixer="stratified")
    yield m
    m.close()


def _model_logits(mixing, batch, seed=0):
    """Logits [B, T, V] made as a language model makes them: a linear layer's output (not a leaf)."""
    torch.manual_seed(seed)
    vocab = mixing.manifest.vocab_size
    embed = torch.nn.Embedding(vocab, 8)
    head = torch.nn.Linear(8, vocab)
    return head(embed(batch["input_ids"])), head


def test_the_adapters_training_loss_does_its_backward_in_forward(mixing, monkeypatch):
    monkeypatch.setenv("AIOLI_KERNELS", "triton")
    batch = mixing.micro_batches(mixing.draw(0, lambda ids: None), 4)[0]
    logits, head = _model_logits(mixing, batch)
    n_rows = logits.shape[0] * logits.shape[1]
    backward = LaunchCounter(domain_ce._domain_ce_bwd_kernel)
    monkeypatch.setattr(domain_ce, "_domain_ce_bwd_kernel", backward)
    seen = []
    logits.register_hook(lambda g: seen.append(g))
    with OpLog() as log:
        out = mixing.domain_loss(logits, batch["labels"], batch["domain_ids"], train_scale=mixing.step_scale)
        flat_labels = batch["labels"].reshape(-1)
        rows = torch.nonzero(flat_labels != -100)[:, 0]
        logits_NV = logits.view(-1, logits.shape[-1])
        with torch.no_grad():  # every counted row's label entry: any row pass rewrites it
            logits_NV[rows, flat_labels[rows]] = 4321.0
        mixing.step_loss(out).backward()
    assert not log.big(logits.numel()), f"a second [N, V] buffer: {log.big(logits.numel())}"
    assert seen[0].untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    got = seen[0].reshape(-1, logits.shape[-1])[rows, flat_labels[rows]]
    assert (got == 4321.0).all(), "backward made a pass over the logits' rows"
    assert backward.launches == 1 and n_rows > 1
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()


def test_the_adapters_training_gradient_equals_the_reference(mixing, monkeypatch):
    batch = mixing.micro_batches(mixing.draw(1, lambda ids: None), 4)[0]
    grads = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("AIOLI_KERNELS", backend)
        logits, head = _model_logits(mixing, batch, seed=1)
        out = mixing.domain_loss(logits, batch["labels"], batch["domain_ids"], train_scale=mixing.step_scale)
        mixing.step_loss(out).backward()
        grads[backend] = head.weight.grad
    torch.testing.assert_close(grads["triton"], grads["reference"], rtol=1e-4, atol=1e-6)


def test_logits_their_producer_saved_are_not_overwritten(mixing, monkeypatch):
    from aioli_fast.integrations.common import can_overwrite

    monkeypatch.setenv("AIOLI_KERNELS", "triton")
    batch = mixing.micro_batches(mixing.draw(2, lambda ids: None), 4)[0]
    logits, head = _model_logits(mixing, batch)
    saved = (logits / 4).exp()  # exp keeps its output for backward
    assert can_overwrite(logits) and not can_overwrite(saved) and not can_overwrite(logits.detach())

    class Capped(torch.autograd.Function):  # a custom Function: what it saved cannot be inspected
        @staticmethod
        def forward(ctx, x):
            y = x.tanh()
            ctx.save_for_backward(y)
            return y

        @staticmethod
        def backward(ctx, g):
            (y,) = ctx.saved_tensors
            return g * (1 - y * y)

    assert not can_overwrite(Capped.apply(logits))
    assert not can_overwrite(logits.half())  # fp16 keeps the default contract
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert not can_overwrite(logits)  # checkpointing/offloading hooks are never run to look
    before = saved.detach().clone()
    out = mixing.domain_loss(saved, batch["labels"], batch["domain_ids"], train_scale=mixing.step_scale)
    assert torch.equal(saved.detach(), before)
    mixing.step_loss(out).backward()  # exp's backward reads its intact output
    assert torch.isfinite(head.weight.grad).all()
    kept = logits * 1.0
    mixing.domain_loss(
        kept, batch["labels"], batch["domain_ids"], train_scale=mixing.step_scale, keep_logits=True
    )
    assert torch.equal(kept.detach(), logits.detach())


def test_the_trainers_fused_linear_backward_launches_no_kernel(monkeypatch):
    from aioli_fast.model import GPT, GPTConfig

    counters = {}
    for name in ("_domain_ce_fwd_kernel", "_domain_ce_bwd_kernel"):
        counters[name] = LaunchCounter(getattr(domain_ce, name))
        monkeypatch.setattr(domain_ce, name, counters[name])
    cfg = GPTConfig(vocab_size=80, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=8)
    torch.manual_seed(0)
    model, ref = GPT(cfg), GPT(cfg)
    ref.load_state_dict(model.state_dict())
    ids, doms, micro_steps = torch.randint(0, 80, (3, 8)), torch.tensor([0, 1, 0]), 3
    # the trainer promises what the engine sends: 1 / micro-steps on `loss`
    out = model(ids, ids, doms, 2, loss_backend="triton", grad_scale=1 / micro_steps)
    launched = {k: c.launches for k, c in counters.items()}
    assert launched["_domain_ce_fwd_kernel"] >= 1
    (out.loss / micro_steps).backward()
    assert {k: c.launches for k, c in counters.items()} == launched, "backward launched a row pass"
    ref_out = ref(ids, ids, doms, 2, loss_backend="reference")
    (ref_out.loss / micro_steps).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)

    # the head alone: backward is one in-place multiply per gradient, no matmul, no new [V, H]
    hidden = torch.randn(24, 16, requires_grad=True)
    labels, dom24 = torch.randint(0, 80, (24,)), torch.randint(0, 2, (24,))
    head_out = model.lm_head(hidden, labels, dom24, 2, loss_backend="triton", grad_scale=0.5)
    with OpLog() as log:
        (head_out.loss * 0.5).backward()
    assert not {"mm", "addmm", "bmm"} & set(log.ops), log.ops
    assert not log.big(model.lm_head.weight.numel()), log.big(model.lm_head.weight.numel())
