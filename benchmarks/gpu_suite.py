"""GPU suite of the per-domain cross-entropy: correctness first, then timing, then a table.

    python3 benchmarks/gpu_suite.py                 # on a CUDA machine; JSON under $OUT (as it goes)
    python3 benchmarks/gpu_suite.py --dry-run       # every code path at tiny shapes on the CPU

On a bare GPU machine (torch and triton present, nothing else) the suite installs what it needs first:
the wheels in ``.whl/`` when that folder exists (``--target /tmp/site``), then this repository with
``pip install --no-deps -e .`` (which maps ``kernels/`` to ``aioli_fast.kernels``), and re-runs itself.

1. Correctness, against float64 on the same rounded inputs, each a pass/fail with the tolerance
   ``|got - want| <= rtol * |want| + atol`` element by element (:func:`within`): the logits kernel in
   bf16 and fp32 (atomic and deterministic) for every caller's backward: ``plain`` (2.5 * loss +
   w . loss_sum, no contract), ``adapter`` (the gradient contract on ``loss_sum`` with 1 / tokens, in
   place) and the fused-linear ``trainer`` path (``grad_scale`` = 1 / micro-steps); confident bf16 rows
   (the true-class gradient against torch's own bf16 error); the fused-linear kernel in bf16.
2. Timing (``triton.testing.do_bench``, median, after warm-up), forward + backward, side by side:
   eager ``F.cross_entropy`` + ``scatter_add_``, ``torch.compile`` of it, Liger-Kernel + scatter where
   importable, and ours for each caller (plain, adapter contract in place). Shapes: N in {16k, 64k},
   V in {32000, 50304, 128256, 151936}, D in {2, 7, 64}, bf16; fused linear at H in {2048, 8192}.
   Reported: ms, GB/s of the 4V-bytes-per-token floor (one bf16 read and one write of the logits), % of
   the measured copy bandwidth, peak memory. An implementation that runs out of memory is recorded so.
3. Training throughput of static proportions against Aioli on the 160M model
   (``benchmarks/bench_train.py --preset h200``, short runs), when ``--train-steps`` > 0.

The table is printed last; ``$OUT/gpu_suite.json`` (or ``benchmarks/results/``) is rewritten after every
measurement, so a run cut short keeps what it measured. ``--budget-s`` stops the timing early. Exit
status 1 when a correctness check failed (the timings are still reported).

``--dry-run`` runs all of it on CPU tensors under Triton's interpreter at tiny shapes, fp32 (the
interpreter's bf16 is broken), with a wall-clock timer instead of ``do_bench``, ``torch.compile`` with
the ``aot_eager`` backend (no C++ compiler needed) and a 2-step CPU training comparison; CI runs it so
that the suite cannot rot before a GPU runs it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORE = -100


# ---------------------------------------------------------------------------------------------------
# Set-up: what a bare GPU machine lacks


def ensure_installed() -> None:
    """Make ``aioli_fast.kernels`` importable: install ``.whl/`` and this repository, then re-run."""
    try:
        import aioli_fast.kernels  # noqa: F401

        return
    except ImportError:
        pass
    if os.environ.get("AIOLI_GPU_SUITE_INSTALLED"):
        raise SystemExit("gpu_suite: aioli_fast.kernels is still not importable after installing")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-cache-dir"]
    env = dict(os.environ, AIOLI_GPU_SUITE_INSTALLED="1")
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if wheels:
        site = "/tmp/aioli-site"
        subprocess.run([*pip, "--upgrade", "--target", site, *map(str, wheels)], check=True)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    subprocess.run([*pip, "--no-build-isolation", "-e", str(ROOT)], check=True, env=env)
    print("gpu_suite: installed the package; running again", file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


# ---------------------------------------------------------------------------------------------------
# The check every correctness row uses


def within(got, want, rtol: float, atol: float) -> float:
    """max over elements of ``|got - want| / (rtol * |want| + atol)``: at most 1 passes."""
    import torch

    got, want = got.detach().double(), want.detach().double()
    err = (got - want).abs()
    bound = rtol * want.abs() + atol
    return float(torch.max(err / bound)) if err.numel() else 0.0


class Suite:
    """Sizes, device and the JSON written as it goes."""

    def __init__(self, args):
        import torch

        self.args = args
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.dtype = torch.float32 if self.dry else torch.bfloat16
        self.out = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results") / "gpu_suite.json"
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.result = dict(env=env_info(self.dry), checks=[], timings=[], train=None)

    def save(self) -> None:
        self.out.write_text(json.dumps(self.result, indent=2, default=str))

    def over_budget(self) -> bool:
        return time.perf_counter() - self.started > self.args.budget_s

    def record(self, kind: str, row: dict) -> None:
        self.result[kind].append(row)
        if kind == "checks":
            print(("PASS " if row["passed"] else "FAIL ") + json.dumps(row, default=str), flush=True)
        self.save()


def env_info(dry: bool) -> dict:
    import torch
    import triton

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=ROOT
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return dict(
        gpu="cpu (dry run)" if dry else torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        commit=commit,
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
    )


def make_batch(s: Suite, n, v, d, dtype, seed=0, ignore_frac=0.05):
    import torch

    gen = torch.Generator(device=s.device).manual_seed(seed)
    logits = (2.0 * torch.randn(n, v, generator=gen, device=s.device)).to(dtype)
    labels = torch.randint(0, v, (n,), generator=gen, device=s.device)
    drop = torch.rand(n, generator=gen, device=s.device) < ignore_frac
    labels = torch.where(drop, IGNORE, labels)
    domains = torch.randint(0, d, (n,), generator=gen, device=s.device, dtype=torch.int32)
    return logits, labels, domains


# ---------------------------------------------------------------------------------------------------
# Implementations compared (forward + backward of what each caller backpropagates)


def reduce_scatter(token_loss, labels, domains, d):
    import torch

    valid = (labels != IGNORE).float()
    safe = torch.where(labels != IGNORE, domains, 0).long()
    loss_sum = torch.zeros(d, device=token_loss.device).scatter_add_(0, safe, token_loss)
    count = torch.zeros(d, device=token_loss.device).scatter_add_(0, safe, valid)
    return token_loss.sum() / valid.sum().clamp_min(1), loss_sum, count


def eager(logits, labels, domains, d):
    import torch.nn.functional as F

    token_loss = F.cross_entropy(logits.float(), labels, reduction="none", ignore_index=IGNORE)
    return reduce_scatter(token_loss, labels, domains, d)


def liger(logits, labels, domains, d):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    token_loss = LigerCrossEntropyLoss(reduction="none", ignore_index=IGNORE)(logits, labels)
    return reduce_scatter(token_loss.float(), labels, domains, d)


def liger_installed() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def implementations(s: Suite) -> dict:
    """name -> (fn(x, labels, domains, d) -> the scalar to backpropagate, needs a non-leaf x)."""
    import torch

    from aioli_fast.kernels import domain_cross_entropy

    compiled = torch.compile(eager, backend="aot_eager" if s.dry else "inductor")

    def plain(x, labels, domains, d):
        return domain_cross_entropy(x, labels, domains, d).loss

    def adapter(x, labels, domains, d):  # the adapters' contract: loss_sum.sum() / tokens, in place
        scale = 1.0 / max(x.shape[0], 1)
        out = domain_cross_entropy(x, labels, domains, d, grad_on="loss_sum", grad_scale=scale, inplace=True)
        return out.loss_sum.sum() * scale

    impls = {
        "eager+scatter": (lambda *a: eager(*a)[0], False),
        "compiled": (lambda *a: compiled(*a)[0], False),
    }
    if liger_installed() and not s.dry:
        impls["liger+scatter"] = (lambda *a: liger(*a)[0], False)
    impls["ours plain"] = (plain, False)
    impls["ours adapter (contract, in place)"] = (adapter, True)
    return impls


# ---------------------------------------------------------------------------------------------------
# Correctness


def expected_fp64(logits, labels, domains, d, objective):
    """float64 (loss, loss_sum [D], count [D], gradient of ``objective(loss, loss_sum)``)."""
    import torch
    import torch.nn.functional as F

    x = logits.detach().double().requires_grad_()
    ce = F.cross_entropy(x, labels, reduction="none", ignore_index=IGNORE)
    valid = labels != IGNORE
    safe = torch.where(valid, domains, 0).long()
    zeros = torch.zeros(d, dtype=torch.float64, device=x.device)
    loss_sum, count = zeros.index_add(0, safe, ce), zeros.index_add(0, safe, valid.double())
    loss = ce.sum() / count.sum().clamp_min(1)
    objective(loss, loss_sum).backward()
    return loss.detach(), loss_sum.detach(), count, x.grad


# per dtype: (rtol, atol) of a gradient element (bf16 stores 8 significant bits) and of the sums
GRAD_TOL = {"bfloat16": (1.6e-2, 1e-9), "float32": (1e-5, 1e-9)}


def check_logits(s: Suite, n, v, d, dtype, deterministic, caller) -> dict:
    import torch

    from aioli_fast.kernels import domain_cross_entropy

    logits, labels, domains = make_batch(s, n, v, d, dtype, seed=11)
    w_D = torch.linspace(-0.5, 1.5, d, device=s.device)
    tokens = int((labels != IGNORE).sum())
    base = logits.clone().requires_grad_()
    if caller == "plain":
        out = domain_cross_entropy(base, labels, domains, d, deterministic=deterministic)
        (2.5 * out.loss + (w_D * out.loss_sum).sum()).backward()
        grad = base.grad

        def objective(loss, loss_sum):
            return 2.5 * loss + (w_D.double() * loss_sum).sum()
    else:  # adapter: the contract on loss_sum, the gradient written over the logits
        x = base * 1  # a non-leaf the gradient is written over; base.grad receives it
        out = domain_cross_entropy(
            x,
            labels,
            domains,
            d,
            deterministic=deterministic,
            grad_on="loss_sum",
            grad_scale=1.0 / tokens,
            inplace=True,
        )
        (out.loss_sum.sum() / tokens).backward()
        grad = base.grad

        def objective(loss, loss_sum):
            return loss_sum.sum() / tokens

    loss, loss_sum, count, want = expected_fp64(logits, labels, domains, d, objective)
    rtol, atol = GRAD_TOL[str(dtype).removeprefix("torch.")]
    row = dict(
        check=f"logits {caller} N{n} V{v} D{d} {str(dtype)[6:]} {'det' if deterministic else 'atomic'}",
        loss_err=within(out.loss, loss, 1e-5, 1e-5),
        loss_sum_err=within(out.loss_sum, loss_sum, 1e-5, 1e-4),
        count_exact=bool(torch.equal(out.count.double(), count)),
        grad_err=within(grad, want, rtol, atol * 1.0 / max(tokens, 1)),
    )
    row["passed"] = row["loss_err"] <= 1 and row["loss_sum_err"] <= 1 and row["count_exact"]
    row["passed"] = row["passed"] and row["grad_err"] <= 1
    return row


def check_confident(s: Suite, margin: float) -> dict:
    import torch
    import torch.nn.functional as F

    from aioli_fast.kernels import domain_cross_entropy

    n, v = (64, 200) if s.dry else (4096, 50304)
    logits, labels, domains = make_batch(s, n, v, 2, torch.float32, seed=12, ignore_frac=0.0)
    rows = torch.arange(n, device=s.device)
    logits[rows, labels] += margin
    logits = logits.to(s.dtype)
    p = torch.softmax(logits.double(), dim=-1)
    others = torch.ones_like(p, dtype=torch.bool)
    others[rows, labels] = False
    want = -torch.where(others, p, 0.0).sum(-1) / n  # exact true-class gradient of the mean loss
    x32 = logits.detach().float().clone().requires_grad_()
    F.cross_entropy(x32, labels).backward()
    torch_err = (x32.grad.to(s.dtype)[rows, labels].double() - want).abs().max().item()
    leaf = logits.detach().clone().requires_grad_()
    domain_cross_entropy(leaf, labels, domains, 2).loss.backward()
    our_err = (leaf.grad[rows, labels].double() - want).abs().max().item()
    return dict(
        check=f"confident {str(s.dtype)[6:]}, label +{margin:g}",
        our_true_class_err=our_err,
        torch_true_class_err=torch_err,
        passed=our_err <= 4 * torch_err + 1e-12,
    )


def check_linear(s: Suite, h: int, micro_steps: int) -> dict:
    """The trainer's path: fused linear with grad_scale = 1 / micro-steps, (loss / k).backward()."""
    import torch
    import torch.nn.functional as F

    from aioli_fast.kernels import linear_domain_cross_entropy

    n, v, d = (48, 200, 7) if s.dry else (2048, 50304, 7)
    gen = torch.Generator(device=s.device).manual_seed(13)
    hidden = torch.randn(n, h, generator=gen, device=s.device).to(s.dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen, device=s.device) / math.sqrt(h)).to(s.dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen, device=s.device)
    domains = torch.randint(0, d, (n,), generator=gen, device=s.device)
    out = linear_domain_cross_entropy(hidden, weight, labels, domains, d, grad_scale=1 / micro_steps)
    (out.loss / micro_steps).backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ce = F.cross_entropy(F.linear(h64, w64), labels, reduction="none")
    (ce.mean() / micro_steps).backward()
    errs = {
        name: ((got.grad.double() - want.grad).norm() / want.grad.norm()).item()
        for name, got, want in (("hidden", hidden, h64), ("weight", weight, w64))
    }
    tol = 1e-5 if s.dry else 2e-2
    loss_err = within(out.loss, ce.mean(), tol, tol)
    return dict(
        check=f"linear trainer N{n} H{h} V{v} {str(s.dtype)[6:]} grad_scale 1/{micro_steps}",
        loss_err=loss_err,
        hidden_grad_rel_norm_err=errs["hidden"],
        weight_grad_rel_norm_err=errs["weight"],
        passed=loss_err <= 1 and max(errs.values()) < tol,
    )


def run_checks(s: Suite) -> bool:
    import torch

    n, vocabs = (40, (96, 300)) if s.dry else (2048, (50304, 151936))
    dtypes = (torch.float32,) if s.dry else (torch.bfloat16, torch.float32)
    for dtype in dtypes:
        for v in vocabs:
            for det in (False, True):
                for caller in ("plain", "adapter"):
                    s.record("checks", check_logits(s, n, v, 7, dtype, det, caller))
    for margin in (12.0, 30.0):
        s.record("checks", check_confident(s, margin))
    for h in (16,) if s.dry else (2048, 8192):
        s.record("checks", check_linear(s, h, micro_steps=4))
    return all(c["passed"] for c in s.result["checks"])


# ---------------------------------------------------------------------------------------------------
# Timing


def bench(s: Suite, fn) -> float:
    """Median ms of ``fn``: ``do_bench`` on a GPU, a wall-clock median in the dry run."""
    if s.dry:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def peak_gb(s: Suite, fn) -> float | None:
    """Peak GB allocated by one call of ``fn`` beyond what was held (None on the CPU)."""
    import torch

    if s.dry:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1e9


def copy_bandwidth_gbs(s: Suite) -> float:
    """Measured copy bandwidth (bytes read + written per second), the floor's yardstick."""
    import torch

    src = torch.empty((1 << 16) if s.dry else 2 * 1024**3, dtype=torch.uint8, device=s.device).random_()
    dst = torch.empty_like(src)
    ms = bench(s, lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def timed(s: Suite, run) -> dict:
    import torch

    try:
        run()  # warm-up (compiles)
        peak = peak_gb(s, run)
        return dict(ms=bench(s, run), peak_gb=peak)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return dict(ms=None, peak_gb=None, oom=True)


def logits_step(logits, fn, non_leaf: bool, labels, domains, d):
    """A forward + backward of ``fn`` on a private copy of ``logits``."""
    base = logits.detach().clone().requires_grad_()

    def run():
        base.grad = None
        # in place needs a non-leaf; a view costs no pass (the values drift to gradients over the
        # repetitions, which changes no memory traffic)
        x = base.view_as(base) if non_leaf else base
        fn(x, labels, domains, d).backward()

    return run


def linear_step(name: str, hidden, weight, labels, domains, d: int, micro_steps: int = 4):
    """A forward + backward of the fused linear (``ours trainer``: the trainer's contract) or eager."""
    import torch

    from aioli_fast.kernels import linear_domain_cross_entropy

    def run():
        hidden.grad = weight.grad = None
        if name == "eager":
            loss = eager(torch.nn.functional.linear(hidden, weight), labels, domains, d)[0]
        else:
            out = linear_domain_cross_entropy(hidden, weight, labels, domains, d, grad_scale=1 / micro_steps)
            loss = out.loss
        (loss / micro_steps).backward()

    return run


def time_logits(s: Suite, copy_gbs: float) -> None:
    import torch

    impls = implementations(s)
    if s.dry:
        shapes = [(32, 96, 2), (32, 300, 7)]
    else:
        shapes = [(16384, v, d) for v in (32000, 50304, 128256, 151936) for d in (2, 7, 64)]
        shapes += [(65536, v, 7) for v in (32000, 50304, 128256, 151936)]
    for n, v, d in shapes:
        if s.over_budget():
            print("gpu_suite: timing budget spent; stopping the logits timings", flush=True)
            return
        logits, labels, domains = make_batch(s, n, v, d, s.dtype, seed=v + d)
        floor_bytes = 4 * n * v * logits.element_size() // 2  # read + write of the logits, 4V for bf16
        for name, (fn, non_leaf) in impls.items():
            run = logits_step(logits, fn, non_leaf, labels, domains, d)
            row = dict(kind="logits", n=n, v=v, d=d, impl=name, **timed(s, run))
            if row["ms"]:
                row["gbs"] = floor_bytes / row["ms"] / 1e6
                row["pct_copy"] = 100 * row["gbs"] / copy_gbs
            s.record("timings", row)
            del run
        del logits
        if not s.dry:
            torch.cuda.empty_cache()


def time_linear(s: Suite) -> None:
    import torch

    shapes = [(48, 200, 16)] if s.dry else [(16384, v, h) for v in (32000, 151936) for h in (2048, 8192)]
    for n, v, h in shapes:
        if s.over_budget():
            print("gpu_suite: timing budget spent; stopping the fused-linear timings", flush=True)
            return
        gen = torch.Generator(device=s.device).manual_seed(h)
        hidden = torch.randn(n, h, generator=gen, device=s.device).to(s.dtype).requires_grad_()
        weight = (torch.randn(v, h, generator=gen, device=s.device) / math.sqrt(h)).to(s.dtype)
        weight.requires_grad_()
        labels = torch.randint(0, v, (n,), generator=gen, device=s.device)
        domains = torch.randint(0, 7, (n,), generator=gen, device=s.device)
        for name in ("eager", "ours trainer"):
            run = linear_step(name, hidden, weight, labels, domains, 7)
            row = dict(kind="linear", n=n, v=v, h=h, d=7, impl=name, **timed(s, run))
            if row["ms"]:
                row["tflops"] = 6 * n * h * v / row["ms"] / 1e9
            s.record("timings", row)


def train_comparison(s: Suite) -> None:
    """Static against Aioli tokens/s with bench_train (the 160M preset on a GPU, the CPU preset dry)."""
    steps = s.args.train_steps
    if steps <= 0 or s.over_budget():
        return
    out = s.out.parent / "gpu_suite_train.json"
    preset = "cpu" if s.dry else "h200"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_train.py"),
        "--preset",
        preset,
        "--methods",
        "static,train,probe",
        "--steps",
        str(steps),
        "--warmup-steps",
        "0" if s.dry else "5",
        "--dir",
        str(s.out.parent / "bench_train"),
        "--json",
        str(out),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "AIOLI_KERNELS")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    s.result["train"] = dict(
        command=" ".join(cmd[1:]),
        returncode=proc.returncode,
        result=json.loads(out.read_text()) if out.is_file() else None,
        stderr_tail=proc.stderr[-2000:],
    )
    print(proc.stdout[-3000:], flush=True)
    s.save()


# ---------------------------------------------------------------------------------------------------


def table(s: Suite) -> None:
    info = s.result["env"]
    print(f"\n## Per-domain cross-entropy on {info['gpu']} (torch {info['torch']}, triton {info['triton']})")
    print(f"- commit {info['commit']}, {info['date']}; copy bandwidth {s.result['copy_gbs']:.0f} GB/s")
    passed = all(c["passed"] for c in s.result["checks"])
    print(f"- correctness: {'all checks passed' if passed else 'SOME CHECKS FAILED (see above)'}\n")
    print("| N | V | D | implementation | median ms | GB/s (4V floor bytes) | % of copy | peak GB |")
    print("|---:|---:|---:|:---|---:|---:|---:|---:|")
    for r in s.result["timings"]:
        if r["kind"] != "logits":
            continue
        if r.get("oom"):
            print(f"| {r['n']} | {r['v']} | {r['d']} | {r['impl']} | out of memory | | | |")
            continue
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        print(
            f"| {r['n']} | {r['v']} | {r['d']} | {r['impl']} | {r['ms']:.3f} | {r['gbs']:.0f} | "
            f"{r['pct_copy']:.0f}% | {peak} |"
        )
    print("\n| N | V | H | implementation | median ms | TFLOP/s (6NHV) | peak GB |")
    print("|---:|---:|---:|:---|---:|---:|---:|")
    for r in s.result["timings"]:
        if r["kind"] != "linear":
            continue
        if r.get("oom"):
            print(f"| {r['n']} | {r['v']} | {r['h']} | {r['impl']} | out of memory | | |")
            continue
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        cells = (r["n"], r["v"], r["h"], r["impl"], f"{r['ms']:.2f}", f"{r['tflops']:.1f}", peak)
        print("| " + " | ".join(str(c) for c in cells) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (interpreter)")
    parser.add_argument("--budget-s", type=float, default=360.0, help="stop timing after this many seconds")
    parser.add_argument("--train-steps", type=int, default=None, help="steps of each training run (0: none)")
    args = parser.parse_args(argv)
    if args.train_steps is None:
        args.train_steps = 2 if args.dry_run else 60
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
        os.environ["AIOLI_KERNELS"] = "triton"
    else:
        ensure_installed()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite: needs a CUDA device (or --dry-run)", file=sys.stderr)
        return 2
    s = Suite(args)
    print(json.dumps(s.result["env"]), flush=True)
    passed = run_checks(s)
    s.result["all_checks_passed"] = passed
    s.result["copy_gbs"] = copy_bandwidth_gbs(s)
    time_logits(s, s.result["copy_gbs"])
    time_linear(s)
    train_comparison(s)
    s.result["seconds"] = round(time.perf_counter() - s.started, 1)
    s.save()
    table(s)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
