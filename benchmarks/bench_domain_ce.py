"""Per-domain cross-entropy, forward + backward: what users write today vs. ``aioli_fast.kernels``.

Implementations, side by side on the same inputs:

- ``loop``: ``F.cross_entropy(reduction="none")`` then a Python loop over domains with boolean masks
  (the usual hand-written version; every masked sum is a host sync on CUDA).
- ``scatter``: the same token losses reduced per domain with one ``scatter_add_`` (eager).
- ``compiled``: ``torch.compile`` of ``scatter``.
- ``liger``: Liger-Kernel's cross-entropy (``reduction="none"``) + ``scatter_add_``, when installed.
- ``aioli``: :func:`aioli_fast.kernels.domain_cross_entropy` (the reference path on CPU; the fused
  Triton kernel on CUDA).

Before anything is timed, each implementation is checked against ``scatter`` (loss, per-domain sums and
counts, gradient of the logits).

Two ways to run it (it is not part of the default ``pytest`` run, whose ``testpaths`` is ``tests``):

    pytest benchmarks/bench_domain_ce.py --benchmark-only     # pytest-benchmark, grouped by size
    python benchmarks/bench_domain_ce.py [--device cuda]      # torch.utils.benchmark, markdown table

Importing this file never queries a GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aioli_fast.kernels import domain_cross_entropy

IGNORE_INDEX = -100
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Size:
    n: int
    v: int
    d: int
    dtype: torch.dtype = torch.float32

    @property
    def id(self) -> str:
        return f"N{self.n}-V{self.v}-D{self.d}-{DTYPE_NAMES[self.dtype]}"


CPU_SIZES = [
    Size(2048, 4096, 3),
    Size(2048, 4096, 16),
    Size(4096, 32768, 7),
]
GPU_SIZES = [
    Size(8192, 50304, 7, torch.bfloat16),
    Size(16384, 50304, 7, torch.bfloat16),
    Size(8192, 128256, 7, torch.bfloat16),
]


def baseline_loop(logits_NV, labels_N, domain_ids_N, num_domains, *, ignore_index=IGNORE_INDEX):
    """Token losses, then a Python loop over domains with masks: (loss [], loss_sum [D], count [D])."""
    token_loss_N = F.cross_entropy(logits_NV.float(), labels_N, reduction="none", ignore_index=ignore_index)
    valid_N = labels_N != ignore_index
    loss_sum, count = [], []
    for d in range(num_domains):
        in_d_N = valid_N & (domain_ids_N == d)
        loss_sum.append(token_loss_N[in_d_N].sum())
        count.append(in_d_N.sum())
    loss = token_loss_N.sum() / valid_N.sum().clamp_min(1)
    return loss, torch.stack(loss_sum), torch.stack(count).float()


def _reduce_scatter(token_loss_N, labels_N, domain_ids_N, num_domains, ignore_index):
    valid_f_N = (labels_N != ignore_index).float()
    safe_domains_N = torch.where(labels_N != ignore_index, domain_ids_N, 0).long()
    loss_sum_D = torch.zeros(num_domains, device=token_loss_N.device).scatter_add_(
        0, safe_domains_N, token_loss_N
    )
    count_D = torch.zeros(num_domains, device=token_loss_N.device).scatter_add_(0, safe_domains_N, valid_f_N)
    loss = token_loss_N.sum() / valid_f_N.sum().clamp_min(1)
    return loss, loss_sum_D, count_D


def baseline_scatter(logits_NV, labels_N, domain_ids_N, num_domains, *, ignore_index=IGNORE_INDEX):
    """Token losses reduced per domain with ``scatter_add_``: (loss [], loss_sum [D], count [D])."""
    token_loss_N = F.cross_entropy(logits_NV.float(), labels_N, reduction="none", ignore_index=ignore_index)
    return _reduce_scatter(token_loss_N, labels_N, domain_ids_N, num_domains, ignore_index)


_COMPILED: dict[str, Callable] = {}


def baseline_compiled(logits_NV, labels_N, domain_ids_N, num_domains, *, ignore_index=IGNORE_INDEX):
    """``torch.compile`` of :func:`baseline_scatter` (compiled on first call, outside the timing)."""
    if "scatter" not in _COMPILED:
        _COMPILED["scatter"] = torch.compile(baseline_scatter)
    return _COMPILED["scatter"](logits_NV, labels_N, domain_ids_N, num_domains, ignore_index=ignore_index)


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def baseline_liger(logits_NV, labels_N, domain_ids_N, num_domains, *, ignore_index=IGNORE_INDEX):
    """Liger-Kernel's cross-entropy (token losses, gradient in place) + ``scatter_add_``."""
    from liger_kernel.transformers import LigerCrossEntropyLoss

    token_loss_N = LigerCrossEntropyLoss(reduction="none", ignore_index=ignore_index)(logits_NV, labels_N)
    return _reduce_scatter(token_loss_N.float(), labels_N, domain_ids_N, num_domains, ignore_index)


def aioli(logits_NV, labels_N, domain_ids_N, num_domains, *, ignore_index=IGNORE_INDEX):
    """``aioli_fast.kernels.domain_cross_entropy``: (loss [], loss_sum [D], count [D])."""
    out = domain_cross_entropy(logits_NV, labels_N, domain_ids_N, num_domains, ignore_index=ignore_index)
    return tuple(out)


IMPLS: dict[str, Callable] = {
    "loop": baseline_loop,
    "scatter": baseline_scatter,
    "compiled": baseline_compiled,
    **({"liger": baseline_liger} if liger_available() else {}),
    "aioli": aioli,
}


def make_inputs(size: Size, device: str | torch.device, seed: int = 0):
    """logits [N, V] (requires grad), labels [N] (about 5% ignored), domain_ids [N] int32."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(size.n, size.v, generator=gen).to(device=device, dtype=size.dtype)
    labels = torch.randint(0, size.v, (size.n,), generator=gen)
    labels[torch.rand(size.n, generator=gen) < 0.05] = IGNORE_INDEX
    domain_ids = torch.randint(0, size.d, (size.n,), generator=gen, dtype=torch.int32)
    return logits.requires_grad_(), labels.to(device), domain_ids.to(device)


def fwd_bwd(impl: Callable, logits, labels, domain_ids, num_domains):
    """One training-style call: forward, backward of the mean loss; returns the outputs."""
    logits.grad = None
    out = impl(logits, labels, domain_ids, num_domains)
    out[0].backward()
    return out


def check_against_scatter(name: str, size: Size, device) -> None:
    """Raise AssertionError unless ``name`` matches the scatter baseline on ``size``."""
    logits, labels, domain_ids = make_inputs(size, device)
    want = [t.detach() for t in fwd_bwd(baseline_scatter, logits, labels, domain_ids, size.d)]
    want_grad = logits.grad.clone()
    got = [t.detach() for t in fwd_bwd(IMPLS[name], logits, labels, domain_ids, size.d)]
    grad_tol = dict(rtol=1e-5, atol=1e-9) if size.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-7)
    for what, g, w in zip(("loss", "loss_sum", "count"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda m, n=name, k=what: f"{n} {k}: {m}")
    torch.testing.assert_close(logits.grad, want_grad, **grad_tol, msg=lambda m, n=name: f"{n} grad: {m}")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------
# pytest-benchmark


try:
    import pytest
except ImportError:  # running the table without pytest installed
    pytest = None

if pytest is not None:
    _PARAMS = [pytest.param(s, "cpu", id=f"cpu-{s.id}") for s in CPU_SIZES] + [
        pytest.param(s, "cuda", id=f"cuda-{s.id}", marks=pytest.mark.gpu) for s in GPU_SIZES
    ]

    _NAMES = ["loop", "scatter", "compiled", "liger", "aioli"]

    @pytest.mark.parametrize("impl", _NAMES, ids=_NAMES)
    @pytest.mark.parametrize(("size", "device"), _PARAMS)
    def test_domain_ce_fwd_bwd(benchmark, size: Size, device: str, impl: str) -> None:
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        if impl not in IMPLS:
            pytest.skip("Liger-Kernel is not installed")
        check_against_scatter(impl, size, device)
        logits, labels, domain_ids = make_inputs(size, device)
        benchmark.group = f"{device}-{size.id}"
        benchmark.extra_info.update(machine=machine_name(device), torch=torch.__version__, size=size.id)

        def run():
            fwd_bwd(IMPLS[impl], logits, labels, domain_ids, size.d)
            _sync(device)

        benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)


# ---------------------------------------------------------------------------------------------------
# Stand-alone table


def machine_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def time_ms(impl: Callable, size: Size, device, min_run_time: float) -> float:
    """Median milliseconds of one forward + backward."""
    from torch.utils.benchmark import Timer

    logits, labels, domain_ids = make_inputs(size, device)
    run = lambda: (fwd_bwd(impl, logits, labels, domain_ids, size.d), _sync(device))
    run()  # warm-up
    timer = Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = GPU_SIZES if torch.device(device).type == "cuda" else CPU_SIZES

    rows = []
    for size in sizes:
        for name in IMPLS:
            check_against_scatter(name, size, device)
        times = {name: time_ms(impl, size, device, args.min_run_time) for name, impl in IMPLS.items()}
        for name, ms in times.items():
            rows.append((size, name, ms, times["loop"] / ms, times["scatter"] / ms))

    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print("## Per-domain cross-entropy, forward + backward\n")
    print(f"- machine: {machine_name(device)} ({device})")
    print(f"- torch {torch.__version__}, python {platform.python_version()}, {platform.system()}")
    print(f"- date: {now}")
    print("- correctness: every implementation matched the scatter baseline (loss, per-domain sums and")
    print("  counts, logits gradient) on the same inputs before timing; about 5% of labels ignored")
    if "liger" not in IMPLS:
        print("- liger: Liger-Kernel is not installed here, so its rows are absent")
    print()
    print("| N | V | D | dtype | implementation | median ms | speed-up vs loop | vs scatter |")
    print("|---:|---:|---:|:---|:---|---:|---:|---:|")
    for size, name, ms, vs_loop, vs_scatter in rows:
        cells = (size.n, size.v, size.d, DTYPE_NAMES[size.dtype], name, f"{ms:.2f}")
        cells += (f"{vs_loop:.2f}x", f"{vs_scatter:.2f}x")
        print("| " + " | ".join(str(c) for c in cells) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
