"""Ahead-of-time compilation of the Triton kernels for an NVIDIA Hopper GPU (sm_90), without a GPU.

The CPU suite runs the kernels under Triton's interpreter, which accepts constructs the compiler
rejects. Here every kernel variant the host launchers produce is compiled to PTX and a cubin (ptxas
ships with the triton wheel, so no GPU or CUDA toolkit is needed). The variants are not written down
by hand: the public Triton entry points run on small CPU tensors over a grid of options with the
kernels replaced by recorders, so each distinct launch signature (pointer dtypes, integer
specialisations, constexpr values, num_warps) is captured exactly as the launchers make it.

Whether Triton interprets or compiles is decided when the kernels are decorated, that is when
``aioli_fast.kernels.domain_ce`` is imported, and tests/conftest.py sets ``TRITON_INTERPRET=1`` for
CPU-only torch builds. So the work runs in a subprocess with ``TRITON_INTERPRET`` removed: this file
is also a script. ``python tests/test_kernels_compile.py --all`` compiles every variant (every
pointer dtype for every flag combination, about a minute on two cores); the test compiles each distinct
launch configuration once, with one pointer dtype picked in turn (well under a minute).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

import pytest

# Compute capability of the target (Hopper) and the warp size; no device is queried.
TARGET_ARCH = 90
WARP_SIZE = 32
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
INT_DTYPES = ("int64", "int32")
GRAD_MODES = ("none", "loss", "loss_sum")  # which outputs backward reaches
KERNELS = ("_domain_ce_fwd_kernel", "_domain_ce_bwd_kernel", "_domain_reduce_kernel")
TIMEOUT_S = 600
POINTER_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}
POINTER_TYPES.update({f"int{b}": f"i{b}" for b in (8, 16, 32, 64)})


# ---------------------------------------------------------------------------------------------------
# Script side (runs with TRITON_INTERPRET unset)


def unavailable_reason() -> str | None:
    """Why an sm_90 compile cannot be attempted here, or None."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as exc:
        return f"triton cannot be imported: {exc}"
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        return "the triton wheel has no NVIDIA backend"
    try:
        from triton import knobs

        ptxas = knobs.nvidia.ptxas.path
    except Exception as exc:  # noqa: BLE001 - any failure to locate ptxas means: cannot compile here
        return f"ptxas not found: {exc}"
    if not ptxas or not Path(ptxas).is_file():
        return f"ptxas not found (got {ptxas!r})"
    return None


def _type_of(value, torch) -> tuple[str, bool]:
    """(Triton signature type, divisible by 16) of a launch argument, as the JIT specialises it."""
    if isinstance(value, torch.Tensor):
        name = str(value.dtype).removeprefix("torch.")
        return "*" + POINTER_TYPES.get(name, name), value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"unexpected launch argument {value!r}")


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records the launch signature."""

    def __init__(self, fn, launches: dict) -> None:
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return self.launch

    def launch(self, *args, num_warps: int = 4, **kwargs) -> None:
        import torch

        values = dict(zip(self.fn.arg_names, args))
        values.update(kwargs)
        constexpr_names = {p.name for p in self.fn.params if p.is_constexpr}
        signature, constexprs, divisible = {}, {}, []
        for i, name in enumerate(self.fn.arg_names):
            value = values[name]
            if name in constexpr_names:
                signature[name], constexprs[name] = "constexpr", value
                continue
            signature[name], div = _type_of(value, torch)
            if signature[name] == "constexpr":
                constexprs[name] = value
            elif div:
                divisible.append(i)
        # alignment hints vary with where a buffer happens to start: the first seen stands for all
        key = (self.fn.__name__, tuple(signature.items()), tuple(constexprs.items()), num_warps)
        variant = dict(
            kernel=self.fn.__name__, signature=signature, constexprs=constexprs, num_warps=num_warps
        )
        self.launches.setdefault(key, dict(variant, divisible=divisible))


def launch_cases():
    """Option sets for the entry points: every flag combination, then every vocabulary regime.

    The flags (pointer dtype, domain weights, softcap, deterministic, which outputs get a gradient)
    are crossed at one vocabulary size. Then each (BLOCK_V, num_warps) regime of ``launch_config``
    (V = 1, 100, 3000, 50000), D = 1 (an int argument equal to 1 is specialised to a constexpr) and
    int32 labels and domain ids (deterministic) are crossed with the gradient modes.
    """
    base = dict(dtype="float32", ints="int64", vocab=3000, n_dom=3, weighted=False, softcap=None)
    for dtype, weighted, softcap, deterministic, grad in product(
        FLOAT_DTYPES, (False, True), (None, 30.0), (False, True), GRAD_MODES
    ):
        yield dict(
            base, dtype=dtype, weighted=weighted, softcap=softcap, deterministic=deterministic, grad=grad
        )
    for i, (vocab, n_dom, ints, grad) in enumerate(product((1, 100, 50_000), (1, 3), INT_DTYPES, GRAD_MODES)):
        dtype = FLOAT_DTYPES[i % len(FLOAT_DTYPES)]
        deterministic = ints == "int32"  # the per-domain reduction kernel with each index dtype and D
        yield dict(
            base, dtype=dtype, ints=ints, vocab=vocab, n_dom=n_dom, deterministic=deterministic, grad=grad
        )


def record_launches() -> list[dict]:
    """Every distinct kernel launch of the Triton entry points over :func:`launch_cases`."""
    import torch

    from aioli_fast.kernels import domain_ce
    from aioli_fast.kernels.domain_ce import domain_cross_entropy_triton
    from aioli_fast.kernels.linear_domain_ce import linear_domain_cross_entropy_triton

    kernels = {name: getattr(domain_ce, name) for name in KERNELS}
    launches: dict = {}
    torch.manual_seed(0)
    n_rows, hidden = 4, 8
    try:
        for name, fn in kernels.items():
            setattr(domain_ce, name, _Recorder(fn, launches))
        for case in launch_cases():
            dtype, int_dtype = getattr(torch, case["dtype"]), getattr(torch, case["ints"])
            vocab, n_dom, needs_grad = case["vocab"], case["n_dom"], case["grad"] != "none"
            labels = torch.randint(0, vocab, (n_rows,), dtype=int_dtype)
            domains = torch.randint(0, n_dom, (n_rows,), dtype=int_dtype)
            options = dict(
                domain_weights_D=torch.rand(n_dom) if case["weighted"] else None,
                softcap=case["softcap"],
                deterministic=case["deterministic"],
            )
            logits = torch.randn(n_rows, vocab, dtype=dtype, requires_grad=needs_grad)
            h = torch.randn(n_rows, hidden, dtype=dtype, requires_grad=needs_grad)
            w = torch.randn(vocab, hidden, dtype=dtype, requires_grad=needs_grad)
            bias = torch.randn(vocab, dtype=dtype) if case["weighted"] else None
            results = (
                domain_cross_entropy_triton(logits, labels, domains, n_dom, **options),
                linear_domain_cross_entropy_triton(h, w, labels, domains, n_dom, bias_V=bias, **options),
            )
            for result in results:
                if case["grad"] == "loss":
                    result.loss.backward()
                elif case["grad"] == "loss_sum":
                    (result.loss + result.loss_sum.sum()).backward()
    finally:
        for name, fn in kernels.items():
            setattr(domain_ce, name, fn)
    return list(launches.values())


def flag_key(variant: dict) -> tuple:
    """The launch configuration of a variant, whatever its pointer and index dtypes."""
    return (variant["kernel"], tuple(sorted(variant["constexprs"].items())), variant["num_warps"])


def select(variants: list[dict]) -> list[dict]:
    """One variant per launch configuration, its float dtype taken in turn (every dtype appears)."""
    chosen: dict[tuple, dict] = {}
    for variant in variants:
        chosen.setdefault(flag_key(variant), [])
        chosen[flag_key(variant)].append(variant)
    picked = []
    for i, group in enumerate(chosen.values()):
        want = "*" + ("fp32", "fp16", "bf16")[i % 3]
        match = [v for v in group if want in v["signature"].values()]
        picked.append((match or group)[0])
    return picked


def compile_variant(variant: dict) -> str | None:
    """Compile one variant for sm_90 down to a cubin; the error text, or None on success."""
    import triton
    from triton.backends.compiler import GPUTarget

    from aioli_fast.kernels import domain_ce

    fn = getattr(domain_ce, variant["kernel"])
    target = GPUTarget("cuda", TARGET_ARCH, WARP_SIZE)
    backend = triton.compiler.make_backend(target)
    attrs = {(i,): [["tt.divisibility", 16]] for i in variant["divisible"]}
    src = triton.compiler.ASTSource(
        fn=fn, signature=variant["signature"], constexprs=variant["constexprs"], attrs=attrs
    )
    options = backend.parse_options({"num_warps": variant["num_warps"]})
    try:
        compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as exc:  # noqa: BLE001 - report every compiler error with its variant
        return f"{type(exc).__name__}: {exc}"
    if not compiled.asm.get("cubin"):
        return "no cubin produced"
    return None


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(
            "run with TRITON_INTERPRET unset: the kernels must be compiled, not interpreted", file=sys.stderr
        )
        return 2
    reason = unavailable_reason()
    if reason is not None:
        print(json.dumps({"skip": reason}))
        return 0
    variants = record_launches()
    todo = variants if "--all" in argv else select(variants)
    results = []
    for variant in todo:
        start = time.perf_counter()
        error = compile_variant(variant)
        results.append(dict(variant, error=error, seconds=round(time.perf_counter() - start, 2)))
        if "--verbose" in argv:
            status = "ok" if error is None else "FAIL " + error.splitlines()[-1][:200]
            print(variant["kernel"], variant["constexprs"], variant["num_warps"], status, file=sys.stderr)
    print(json.dumps({"recorded": len(variants), "results": results}, default=str))
    return 0


# ---------------------------------------------------------------------------------------------------
# Test side


def _describe(result: dict) -> str:
    pointers = sorted({t for t in result["signature"].values() if t.startswith("*")})
    return f"{result['kernel']} {result['constexprs']} num_warps={result['num_warps']} {pointers}"


@pytest.mark.slow
def test_every_launched_variant_compiles_for_sm90(tmp_path):
    pytest.importorskip("triton")
    # compile, not interpret; and no escape hatch for non-constexpr globals
    unset = ("TRITON_INTERPRET", "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    # a private cache: a cached cubin from an earlier run must not stand in for a compile
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip(f"cannot compile for sm_{TARGET_ARCH} here: {report['skip']}")
    results = report["results"]
    kernels = {r["kernel"] for r in results}
    assert kernels == set(KERNELS)
    failures = [f"{_describe(r)}\n{r['error']}" for r in results if r["error"] is not None]
    assert not failures, f"{len(failures)} of {len(results)} variants fail:\n\n" + "\n\n".join(failures[:5])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
