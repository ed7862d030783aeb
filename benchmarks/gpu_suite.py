"""GPU suite for the per-domain cross-entropy kernels: correctness first, then timing, then a table.

    python benchmarks/gpu_suite.py [--quick]        # needs a CUDA device; writes $OUT/gpu_suite.json

1. Correctness (fresh random inputs, float64 expected values on the same rounded inputs): the logits
   kernel in bf16 and fp32 (atomic and deterministic modes, upstream gradient 2.5 * loss + w . loss_sum),
   confident bf16 rows (label logit far above the rest: our true-class gradient error against torch's
   own bf16 error), and the fused-linear kernel in bf16.
2. Timing (``triton.testing.do_bench``, median, after warm-up) of forward + backward, side by side:
   (a) eager ``F.cross_entropy(reduction="none")`` + ``scatter_add_``, (b) ``torch.compile`` of (a),
   (c) Liger-Kernel + ``scatter_add_`` when installed, (d) ours (default, deterministic, in place).
   Shapes: N=16384, V in {50304, 128256}, bf16, D in {2, 7, 64}; fused linear with H in {768, 4096}.
   Reported: median ms, GB/s against the floor (one read + one write of the bf16 logits) and against
   the measured copy bandwidth, TFLOP/s (6 N H V) for the fused-linear variant, peak memory.
3. A markdown table on stdout (last) and the full JSON under ``$OUT`` (or ``benchmarks/results``).
Exits with status 1 when a correctness check failed (the timings are still reported).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from aioli_fast.kernels import domain_cross_entropy, linear_domain_cross_entropy

IGNORE = -100


def env_info() -> dict:
    import triton

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        commit=commit,
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
    )


def make_batch(n, v, d, dtype, seed=0, ignore_frac=0.05):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = (2.0 * torch.randn(n, v, generator=gen, device="cuda")).to(dtype)
    labels = torch.randint(0, v, (n,), generator=gen, device="cuda")
    labels = torch.where(torch.rand(n, generator=gen, device="cuda") < ignore_frac, IGNORE, labels)
    domains = torch.randint(0, d, (n,), generator=gen, device="cuda", dtype=torch.int32)
    return logits, labels, domains


# ---------------------------------------------------------------------------------------------------
# Implementations compared


def reduce_scatter(token_loss, labels, domains, d):
    valid = (labels != IGNORE).float()
    safe = torch.where(labels != IGNORE, domains, 0).long()
    loss_sum = torch.zeros(d, device=token_loss.device).scatter_add_(0, safe, token_loss)
    count = torch.zeros(d, device=token_loss.device).scatter_add_(0, safe, valid)
    return token_loss.sum() / valid.sum().clamp_min(1), loss_sum, count


def eager(logits, labels, domains, d):
    token_loss = F.cross_entropy(logits.float(), labels, reduction="none", ignore_index=IGNORE)
    return reduce_scatter(token_loss, labels, domains, d)


compiled = torch.compile(eager)


def liger(logits, labels, domains, d):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    token_loss = LigerCrossEntropyLoss(reduction="none", ignore_index=IGNORE)(logits, labels)
    return reduce_scatter(token_loss.float(), labels, domains, d)


def ours(**options):
    def run(logits, labels, domains, d):
        return tuple(domain_cross_entropy(logits, labels, domains, d, **options))

    return run


def liger_installed() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------
# Correctness


def expected_fp64(logits, labels, domains, d, w_D):
    """float64 (loss, loss_sum [D], count [D], gradient of 2.5 * loss + w_D . loss_sum)."""
    x = logits.detach().double().requires_grad_()
    ce = F.cross_entropy(x, labels, reduction="none", ignore_index=IGNORE)
    valid = labels != IGNORE
    safe = torch.where(valid, domains, 0).long()
    zeros = torch.zeros(d, dtype=torch.float64, device="cuda")
    loss_sum, count = zeros.index_add(0, safe, ce), zeros.index_add(0, safe, valid.double())
    loss = ce.sum() / count.sum().clamp_min(1)
    (2.5 * loss + (w_D.double() * loss_sum).sum()).backward()
    return loss.detach(), loss_sum.detach(), count, x.grad


def check_logits_kernel(n, v, d, dtype, deterministic) -> dict:
    logits, labels, domains = make_batch(n, v, d, dtype, seed=11)
    w_D = torch.linspace(-0.5, 1.5, d, device="cuda")
    leaf = logits.clone().requires_grad_()
    out = domain_cross_entropy(leaf, labels, domains, d, deterministic=deterministic)
    (2.5 * out.loss + (w_D * out.loss_sum).sum()).backward()
    loss, loss_sum, count, grad = expected_fp64(logits, labels, domains, d, w_D)
    grad_rtol = {torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[dtype]
    grad_err = ((leaf.grad.double() - grad).abs() / (grad.abs() + 1e-9 / grad_rtol)).max().item()
    row = dict(
        check=f"logits N{n} V{v} D{d} {str(dtype)[6:]} {'det' if deterministic else 'atomic'}",
        loss_abs_err=abs(out.loss.double() - loss).item(),
        loss_sum_rel_err=((out.loss_sum.double() - loss_sum).abs() / loss_sum.abs().clamp_min(1))
        .max()
        .item(),
        count_exact=bool(torch.equal(out.count.double(), count)),
        grad_rel_err=grad_err,
    )
    row["passed"] = row["loss_abs_err"] < 1e-4 and row["loss_sum_rel_err"] < 1e-4 and row["count_exact"]
    row["passed"] = row["passed"] and grad_err <= 1.0 + 1e-6  # |err| <= rtol * |want| + 1e-9
    return row


def check_confident_bf16(margin: float) -> dict:
    n, v = 4096, 50304
    logits, labels, domains = make_batch(n, v, 2, torch.float32, seed=12, ignore_frac=0.0)
    rows = torch.arange(n, device="cuda")
    logits[rows, labels] += margin
    logits = logits.to(torch.bfloat16)
    x64 = logits.double()
    p = torch.softmax(x64, dim=-1)
    others = torch.ones_like(p, dtype=torch.bool)
    others[rows, labels] = False
    want = -torch.where(others, p, 0.0).sum(-1) / n  # exact true-class gradient of the mean loss
    x32 = logits.float().requires_grad_()
    F.cross_entropy(x32, labels).backward()
    torch_err = (x32.grad.to(torch.bfloat16)[rows, labels].double() - want).abs().max().item()
    leaf = logits.clone().requires_grad_()
    domain_cross_entropy(leaf, labels, domains, 2).loss.backward()
    our_err = (leaf.grad[rows, labels].double() - want).abs().max().item()
    return dict(
        check=f"confident bf16, label +{margin:g}",
        our_true_class_err=our_err,
        torch_bf16_true_class_err=torch_err,
        passed=our_err <= 4 * torch_err + 1e-12,
    )


def check_linear_bf16(h: int) -> dict:
    n, v, d = 2048, 50304, 7
    gen = torch.Generator(device="cuda").manual_seed(13)
    hidden = torch.randn(n, h, generator=gen, device="cuda").bfloat16().requires_grad_()
    weight = (torch.randn(v, h, generator=gen, device="cuda") / math.sqrt(h)).bfloat16().requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen, device="cuda")
    domains = torch.randint(0, d, (n,), generator=gen, device="cuda")
    out = linear_domain_cross_entropy(hidden, weight, labels, domains, d, weight_grad_fp32=True)
    (2.5 * out.loss + out.loss_sum.sum()).backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ce = F.cross_entropy(F.linear(h64, w64), labels, reduction="none")
    (2.5 * ce.mean() + ce.sum()).backward()
    errs = {
        name: ((got.grad.double() - want.grad).norm() / want.grad.norm()).item()
        for name, got, want in (("hidden", hidden, h64), ("weight", weight, w64))
    }
    loss_err = abs(out.loss.double() - ce.mean()).item()
    return dict(
        check=f"linear bf16 N{n} H{h} V{v}",
        loss_abs_err=loss_err,
        hidden_grad_rel_norm_err=errs["hidden"],
        weight_grad_rel_norm_err=errs["weight"],
        passed=loss_err < 2e-2 and max(errs.values()) < 2e-2,
    )


# ---------------------------------------------------------------------------------------------------
# Timing


def copy_bandwidth_gbs() -> float:
    """Measured device copy bandwidth (bytes read + written per second), the floor's yardstick."""
    from triton.testing import do_bench

    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300)
    return 2 * src.numel() / ms / 1e6


def warm_peak_gb(run) -> float:
    """Calls ``run`` twice (the first warms up); peak GB allocated by the second beyond what was held."""
    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1e9


def time_fwd_bwd(impl, logits, labels, domains, d, *, inplace=False) -> tuple[float, float]:
    """(median ms, peak extra GB) of forward + backward of the mean loss."""
    from triton.testing import do_bench

    base = logits.detach().clone().requires_grad_()

    def run():
        base.grad = None
        x = base.view_as(base) if inplace else base  # in place needs a non-leaf
        impl(x, labels, domains, d)[0].backward()

    peak = warm_peak_gb(run)
    ms = do_bench(run, warmup=25, rep=200, return_mode="median")
    return ms, peak


def time_linear(impl_name, hidden, weight, labels, domains, d) -> tuple[float, float]:
    from triton.testing import do_bench

    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()

    def run():
        h.grad = w.grad = None
        if impl_name == "eager":
            loss = eager(F.linear(h, w), labels, domains, d)[0]
        else:
            loss = linear_domain_cross_entropy(h, w, labels, domains, d).loss
        loss.backward()

    peak = warm_peak_gb(run)
    return do_bench(run, warmup=5, rep=100, return_mode="median"), peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one V, one D, one H (a smoke run)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_suite: needs a CUDA device", file=sys.stderr)
        return 2
    info = env_info()
    print(json.dumps(info))

    checks = []
    for dtype in (torch.bfloat16, torch.float32):
        for v in (50304, 128256):
            for det in (False, True):
                checks.append(check_logits_kernel(2048, v, 7, dtype, det))
    checks += [check_confident_bf16(m) for m in (12.0, 30.0)]
    checks += [check_linear_bf16(h) for h in (768, 4096)]
    for c in checks:
        print(("PASS " if c["passed"] else "FAIL ") + json.dumps(c))
    all_passed = all(c["passed"] for c in checks)

    copy_gbs = copy_bandwidth_gbs()
    n = 16384
    vocabs = (50304,) if args.quick else (50304, 128256)
    domain_counts = (7,) if args.quick else (2, 7, 64)
    impls = {"(a) eager+scatter": eager, "(b) compiled": compiled}
    if liger_installed():
        impls["(c) liger+scatter"] = liger
    impls |= {
        "(d) ours": ours(),
        "(d) ours deterministic": ours(deterministic=True),
        "(d) ours in place": ours(inplace=True),
    }
    rows = []
    for v in vocabs:
        floor_bytes = 2 * n * v * 2  # one read + one write of the bf16 logits
        for d in domain_counts:
            logits, labels, domains = make_batch(n, v, d, torch.bfloat16, seed=v + d)
            for name, impl in impls.items():
                ms, peak = time_fwd_bwd(impl, logits, labels, domains, d, inplace=name.endswith("in place"))
                gbs = floor_bytes / ms / 1e6
                rows.append(
                    dict(
                        kind="logits",
                        n=n,
                        v=v,
                        d=d,
                        impl=name,
                        ms=ms,
                        gbs=gbs,
                        frac_copy=gbs / copy_gbs,
                        peak_gb=peak,
                    )
                )
            del logits

    hiddens = (768,) if args.quick else (768, 4096)
    for v in vocabs:
        for h in hiddens:
            gen = torch.Generator(device="cuda").manual_seed(h)
            hidden = torch.randn(n, h, generator=gen, device="cuda").bfloat16()
            weight = (torch.randn(v, h, generator=gen, device="cuda") / math.sqrt(h)).bfloat16()
            labels = torch.randint(0, v, (n,), generator=gen, device="cuda")
            domains = torch.randint(0, 7, (n,), generator=gen, device="cuda")
            for name in ("eager", "ours"):
                ms, peak = time_linear(name, hidden, weight, labels, domains, 7)
                tflops = 6 * n * h * v / ms / 1e9
                rows.append(
                    dict(kind="linear", n=n, v=v, h=h, d=7, impl=name, ms=ms, tflops=tflops, peak_gb=peak)
                )

    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = dict(env=info, copy_gbs=copy_gbs, checks=checks, all_checks_passed=all_passed, timings=rows)
    (out_dir / "gpu_suite.json").write_text(json.dumps(result, indent=2))

    print(f"\n## Per-domain cross-entropy on {info['gpu']} (torch {info['torch']}, triton {info['triton']})")
    print(f"- commit {info['commit']}, {info['date']}; measured copy bandwidth {copy_gbs:.0f} GB/s")
    print(f"- correctness: {'all checks passed' if all_passed else 'SOME CHECKS FAILED (see above)'}\n")
    print("| V | D | implementation | median ms | GB/s (floor bytes) | % of copy | peak GB |")
    print("|---:|---:|:---|---:|---:|---:|---:|")
    for r in rows:
        if r["kind"] == "logits":
            cells = (
                r["v"],
                r["d"],
                r["impl"],
                f"{r['ms']:.3f}",
                f"{r['gbs']:.0f}",
                f"{100 * r['frac_copy']:.0f}%",
            )
            print("| " + " | ".join(str(c) for c in (*cells, f"{r['peak_gb']:.2f}")) + " |")
    print("\n| V | H | implementation | median ms | TFLOP/s (6NHV) | peak GB |")
    print("|---:|---:|:---|---:|---:|---:|")
    for r in rows:
        if r["kind"] == "linear":
            cells = (r["v"], r["h"], r["impl"], f"{r['ms']:.2f}", f"{r['tflops']:.0f}", f"{r['peak_gb']:.2f}")
            print("| " + " | ".join(str(c) for c in cells) + " |")
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
