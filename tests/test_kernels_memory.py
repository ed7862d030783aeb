"""Peak memory of the Triton paths, measured on the CPU against the formulas of docs/kernels.md.

Every tensor created inside the measured call is tracked by storage; the live bytes (storages still
referenced by anyone but the tracker) are summed around every op, and the peak must match the formula's
leading terms within O(N + V) bytes. The Triton kernels run under the interpreter (tests/conftest.py);
the interpreter's own numpy copies are not torch allocations and are not counted.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from aioli_fast.kernels import domain_cross_entropy, linear_domain_cross_entropy

domain_ce = pytest.importorskip("aioli_fast.kernels.domain_ce", reason="needs triton")
linear_domain_ce = pytest.importorskip("aioli_fast.kernels.linear_domain_ce", reason="needs triton")

pytestmark = pytest.mark.skipif(
    not domain_ce.INTERPRETED, reason="CPU Triton tests need TRITON_INTERPRET=1 (tests/conftest.py)"
)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created inside the mode and still referenced (besides by it)."""

    def __init__(self, *existing: torch.Tensor):
        super().__init__()
        self.exclude = {t.untyped_storage().data_ptr() for t in existing}
        self.tracked: dict[int, torch.UntypedStorage] = {}
        self.peak = 0

    def live(self) -> int:
        uses = torch._C._storage_Use_Count
        return sum(st.nbytes() for st in self.tracked.values() if uses(st._cdata) > 1)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.peak = max(self.peak, self.live())
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.exclude and key not in self.tracked:
                    self.tracked[key] = storage
        self.peak = max(self.peak, self.live())
        return out


def _small(n: int, v: int, d: int) -> int:
    """The O(N + V + D) terms a formula leaves out, generously: per-row state, sums, a bias gradient."""
    return 4 * (16 * n + 2 * v + 16 * d) + 4096


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("weight_grad_fp32", [True, False])
def test_fused_linear_peak_memory_matches_the_formula(dtype, weight_grad_fp32):
    n, h, v, d, chunk = 256, 32, 1000, 3, 64
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).to(dtype).requires_grad_()
    weight = (0.1 * torch.randn(v, h, generator=gen)).to(dtype).requires_grad_()
    labels, domains = torch.randint(0, v, (n,), generator=gen), torch.randint(0, d, (n,), generator=gen)
    with LiveBytes(hidden, weight, labels, domains) as mem:
        out = linear_domain_cross_entropy(
            hidden,
            weight,
            labels,
            domains,
            d,
            chunk_size=chunk,
            weight_grad_fp32=weight_grad_fp32,
            grad_scale=0.5,
            backend="triton",
        )
        (out.loss * 0.5).backward()
    itemsize = hidden.element_size()
    formula = linear_domain_ce.peak_extra_bytes(
        n, h, v, itemsize, chunk, weight_grad_fp32=weight_grad_fp32, mixed_addmm=False
    )
    assert formula <= mem.peak <= formula + _small(n, v, d), (mem.peak, formula)
    # the chunk is the budget's: at most CHUNK_BYTES of logits whatever N
    assert (
        linear_domain_ce.default_chunk_size(1 << 20, 151_936, 2) * 151_936 * 2 <= linear_domain_ce.CHUNK_BYTES
    )


@pytest.mark.parametrize("inplace", [False, True])
def test_logits_path_peak_memory(inplace):
    n, v, d = 96, 500, 4
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(n, v, generator=gen).requires_grad_()
    labels, domains = torch.randint(0, v, (n,), generator=gen), torch.randint(0, d, (n,), generator=gen)
    logits = base * 1.0  # made before the measurement, as a model's output
    with LiveBytes(base, logits, labels, domains) as mem:
        out = domain_cross_entropy(logits, labels, domains, d, inplace=inplace, backend="triton")
        out.loss.backward()
    # forward: the [N, V] gradient unless in place; the [5, N] per-row state and [2, N] row losses
    gradient = 0 if inplace else n * v * 4
    # backward hands the gradient on; MulBackward of `base * 1.0` makes base.grad, one more [N, V]
    formula = gradient + n * v * 4
    assert formula <= mem.peak <= formula + _small(n, v, d), (mem.peak, formula)
