"""The compiled Triton kernels on a CUDA device: bf16, large vocabularies, N*V beyond 2**31.

Every test here carries the ``gpu`` marker and skips inside the test (no GPU query at import time)
when no CUDA device is present. Expected values are float64 computations on the same (rounded) inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from aioli_fast.kernels import domain_cross_entropy, linear_domain_cross_entropy

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("triton")
    from aioli_fast.kernels import domain_ce

    if domain_ce.INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: the kernels do not compile")
    return torch.device("cuda")


def batch(n: int, v: int, d: int, dtype: torch.dtype, device, seed: int = 0, ignore_frac: float = 0.05):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits = (2.0 * torch.randn(n, v, generator=gen)).to(device=device, dtype=dtype)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_frac] = -100
    domains = torch.randint(0, d, (n,), generator=gen, dtype=torch.int32)
    return logits, labels.to(device), domains.to(device)


def expected(logits, labels, domains, d, w_D):
    """float64 loss, loss_sum, count and the gradient of 2.5 * loss + w_D . loss_sum."""
    x = logits.detach().double().requires_grad_()
    ce = F.cross_entropy(x, labels, reduction="none", ignore_index=-100)
    valid = labels != -100
    safe = torch.where(valid, domains.long(), 0)
    loss_sum = torch.zeros(d, dtype=torch.float64, device=x.device).index_add(0, safe, ce)
    count = torch.zeros(d, dtype=torch.float64, device=x.device).index_add(0, safe, valid.double())
    loss = ce.sum() / count.sum().clamp_min(1)
    (2.5 * loss + (w_D.double() * loss_sum).sum()).backward()
    return loss.detach(), loss_sum.detach(), count, x.grad


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize(
    ("n", "v", "d", "dtype"),
    [
        (4096, 50304, 7, torch.bfloat16),
        (2048, 128256, 64, torch.bfloat16),
        (1024, 131072 + 17, 2, torch.bfloat16),
        (2048, 50304, 7, torch.float32),
        (63, 50257, 1, torch.float16),
    ],
    ids=["N4096-V50304-D7-bf16", "N2048-V128256-D64-bf16", "N1024-V131089-D2-bf16", "N2048-fp32", "N63-fp16"],
)
def test_matches_fp64_on_gpu(cuda, n, v, d, dtype, deterministic) -> None:
    logits, labels, domains = batch(n, v, d, dtype, cuda)
    w_D = torch.linspace(-0.5, 1.5, d, device=cuda)
    leaf = logits.clone().requires_grad_()
    out = domain_cross_entropy(leaf, labels, domains, d, deterministic=deterministic)
    (2.5 * out.loss + (w_D * out.loss_sum).sum()).backward()
    loss, loss_sum, count, grad = expected(logits, labels, domains, d, w_D)
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss_sum.double(), loss_sum, rtol=1e-5, atol=1e-3)
    assert torch.equal(out.count.double(), count)
    tol = {torch.float32: (1e-5, 1e-9), torch.bfloat16: (1.6e-2, 1e-9), torch.float16: (2e-3, 1e-7)}[dtype]
    torch.testing.assert_close(leaf.grad.double(), grad, rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("margin", [12.0, 30.0], ids=["label-12-above", "label-30-above"])
def test_confident_bf16_true_class_gradient(cuda, margin: float) -> None:
    """The label's logit far above the rest: our true-class gradient error stays within a small
    multiple of torch's own bf16 error (fp32 math, one rounding to bf16) against float64."""
    n, v = 2048, 50304
    logits, labels, domains = batch(n, v, 2, torch.float32, cuda, ignore_frac=0.0)
    rows = torch.arange(n, device=cuda)
    logits[rows, labels] += margin
    logits = logits.to(torch.bfloat16)

    x64 = logits.double().requires_grad_()
    F.cross_entropy(x64, labels).backward()
    x32 = logits.float().requires_grad_()
    F.cross_entropy(x32, labels).backward()
    torch_bf16 = x32.grad.to(torch.bfloat16).double()
    ours = logits.clone().requires_grad_()
    domain_cross_entropy(ours, labels, domains, 2).loss.backward()

    want = x64.grad[rows, labels]
    torch_err = (torch_bf16[rows, labels] - want).abs().max().item()
    our_err = (ours.grad[rows, labels].double() - want).abs().max().item()
    assert our_err <= 4 * torch_err + 1e-12, (our_err, torch_err)


@pytest.mark.slow
def test_n_times_v_beyond_2_pow_31(cuda) -> None:
    """64-bit offsets: the last rows of a [N, V] bf16 tensor with N*V > 2**31."""
    v = 128256
    n = (2**31) // v + 64
    assert n * v > 2**31
    logits, labels, domains = batch(n, v, 3, torch.bfloat16, cuda, ignore_frac=0.0)
    leaf = logits.requires_grad_()
    out = domain_cross_entropy(leaf, labels, domains, 3)
    out.loss.backward()
    tail = slice(n - 64, n)
    x = logits.detach()[tail].double().requires_grad_()
    ce = F.cross_entropy(x, labels[tail], reduction="sum")
    ce.backward()
    # the last rows' gradient (scaled by 1/N for the mean) matches float64
    torch.testing.assert_close(leaf.grad[tail].double() * n, x.grad, rtol=1.6e-2, atol=1e-6)
    ref = F.cross_entropy(logits.detach().float(), labels, reduction="sum") / n
    torch.testing.assert_close(out.loss, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("h", [768, 4096])
def test_linear_bf16_matches_fp64(cuda, h: int) -> None:
    n, v, d = 1024, 50304, 7
    gen = torch.Generator(device="cpu").manual_seed(1)
    hidden = torch.randn(n, h, generator=gen).to(cuda, torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / math.sqrt(h)).to(cuda, torch.bfloat16).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen).to(cuda)
    domains = torch.randint(0, d, (n,), generator=gen).to(cuda)
    out = linear_domain_cross_entropy(hidden, weight, labels, domains, d, weight_grad_fp32=True)
    (2.5 * out.loss + out.loss_sum.sum()).backward()

    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logits = F.linear(h64, w64)
    ce = F.cross_entropy(logits, labels, reduction="none")
    (2.5 * ce.mean() + ce.sum()).backward()
    torch.testing.assert_close(out.loss.double(), ce.mean().detach(), rtol=2e-2, atol=2e-2)
    for name, got, want in (("hidden", hidden, h64), ("weight", weight, w64)):
        err = (got.grad.double() - want.grad).norm() / want.grad.norm()
        assert err < 2e-2, f"{name}: relative error {err:.3g}"
