"""Ahead-of-time compilation of the Triton kernels for NVIDIA Hopper (sm_90) and Ampere (sm_80), without
a GPU, with the registers, spills and shared memory of every launch configuration.

The CPU suite runs the kernels under Triton's interpreter, which accepts constructs the compiler
rejects. Here every kernel variant the host launchers produce is compiled to PTX and a cubin (ptxas
ships with the triton wheel, so no GPU or CUDA toolkit is needed). The variants are not written down
by hand: the public Triton entry points run on small CPU tensors over a grid of options with the
kernels replaced by recorders, so each distinct launch signature (pointer dtypes, integer
specialisations, constexpr values, num_warps) is captured exactly as the launchers make it.

Each compiled variant's PTX also goes through ptxas with the options Triton gives it, ``-v``, for its
resource usage. ``tests/ptxas_table.json`` is the committed table (one row per configuration and
architecture: registers per thread, spill stores and loads in bytes, shared memory in bytes); the test
requires 0 spills everywhere and, with the Triton version that wrote the table, the same numbers.
``python tests/test_kernels_compile.py --table tests/ptxas_table.json`` rewrites it.

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

# Compute capabilities of the targets (Hopper, Ampere) and the warp size; no device is queried.
TARGET_ARCHS = (90, 80)
WARP_SIZE = 32
TABLE = Path(__file__).resolve().parent / "ptxas_table.json"
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
    are crossed at one vocabulary size. Then each (BLOCK_V, num_warps, one_read) regime of
    ``launch_config`` (V = 1, 100, 2000, 3000, 16000 read once; 50000 read twice), D = 1 (an int argument
    equal to 1 is specialised to a constexpr) and int32 labels and domain ids (deterministic) are
    crossed with the gradient modes.
    """
    base = dict(dtype="float32", ints="int64", vocab=3000, n_dom=3, weighted=False, softcap=None)
    for dtype, weighted, softcap, deterministic, grad in product(
        FLOAT_DTYPES, (False, True), (None, 30.0), (False, True), GRAD_MODES
    ):
        yield dict(
            base, dtype=dtype, weighted=weighted, softcap=softcap, deterministic=deterministic, grad=grad
        )
    regimes = product((1, 100, 2000, 16_000, 50_000), (1, 3), INT_DTYPES, GRAD_MODES)
    for i, (vocab, n_dom, ints, grad) in enumerate(regimes):
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


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and the ptxas log of ``ptx`` assembled as Triton assembles it."""
    import re
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2"]
        cmd += [f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(Path(tmp) / "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        return dict(log=log[-2000:])
    stores, loads = (int(g) for g in spills.groups())
    return dict(registers=int(regs.group(1)), spill_stores=stores, spill_loads=loads)


def compile_variant(variant: dict, arch: int) -> tuple[str | None, dict]:
    """Compile one variant for ``sm_<arch>`` down to a cubin: (the error text or None, its resource
    usage: registers, spill bytes and shared memory)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from aioli_fast.kernels import domain_ce

    fn = getattr(domain_ce, variant["kernel"])
    target = GPUTarget("cuda", arch, WARP_SIZE)
    backend = triton.compiler.make_backend(target)
    attrs = {(i,): [["tt.divisibility", 16]] for i in variant["divisible"]}
    src = triton.compiler.ASTSource(
        fn=fn, signature=variant["signature"], constexprs=variant["constexprs"], attrs=attrs
    )
    options = backend.parse_options({"num_warps": variant["num_warps"]})
    try:
        compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as exc:  # noqa: BLE001 - report every compiler error with its variant
        return f"{type(exc).__name__}: {exc}", {}
    if not compiled.asm.get("cubin"):
        return "no cubin produced", {}
    usage = ptxas_usage(compiled.asm["ptx"], arch)
    usage["shared"] = int(compiled.metadata.shared)
    return None, usage


def table_key(result: dict) -> str:
    """One line naming a compiled configuration: kernel, constexprs, warps, pointer dtypes, arch."""
    pointers = sorted({t for t in result["signature"].values() if t.startswith("*")})
    flags = ",".join(f"{k}={v}" for k, v in sorted(result["constexprs"].items()))
    return f"sm_{result['arch']} {result['kernel']} warps={result['num_warps']} {flags} {'/'.join(pointers)}"


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
    import triton

    variants = record_launches()
    todo = variants if "--all" in argv else select(variants)
    results = []
    for variant in todo:
        for arch in TARGET_ARCHS:
            start = time.perf_counter()
            error, usage = compile_variant(variant, arch)
            seconds = round(time.perf_counter() - start, 2)
            results.append(dict(variant, arch=arch, error=error, usage=usage, seconds=seconds))
            if "--verbose" in argv:
                status = "ok" if error is None else "FAIL " + error.splitlines()[-1][:200]
                print(table_key(results[-1]), usage, status, file=sys.stderr)
    if "--table" in argv:
        rows = {table_key(r): r["usage"] for r in results if r["error"] is None}
        table = {"triton": triton.__version__, "configurations": dict(sorted(rows.items()))}
        Path(argv[argv.index("--table") + 1]).write_text(json.dumps(table, indent=1) + "\n")
    report = {"recorded": len(variants), "triton": triton.__version__, "results": results}
    print(json.dumps(report, default=str))
    return 0


# ---------------------------------------------------------------------------------------------------
# Test side


def _describe(result: dict) -> str:
    pointers = sorted({t for t in result["signature"].values() if t.startswith("*")})
    return f"{result['kernel']} {result['constexprs']} num_warps={result['num_warps']} {pointers}"


@pytest.mark.slow
def test_every_launched_variant_compiles_for_sm90_and_sm80_without_spills(tmp_path):
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
        pytest.skip(f"cannot compile for sm_90 / sm_80 here: {report['skip']}")
    results = report["results"]
    kernels = {r["kernel"] for r in results}
    assert kernels == set(KERNELS)
    assert {r["arch"] for r in results} == set(TARGET_ARCHS)
    failures = [f"{_describe(r)}\n{r['error']}" for r in results if r["error"] is not None]
    assert not failures, f"{len(failures)} of {len(results)} variants fail:\n\n" + "\n\n".join(failures[:5])
    unparsed = [table_key(r) for r in results if "registers" not in r["usage"]]
    assert not unparsed, f"no ptxas resource line for {unparsed[:3]}: {results[0]['usage']}"
    spilling = [(table_key(r), r["usage"]) for r in results if r["usage"]["spill_stores"]]
    assert not spilling, f"{len(spilling)} configurations spill registers: {spilling[:5]}"
    # the committed table holds every configuration, with these numbers when Triton is the same
    table = json.loads(TABLE.read_text())
    got = {table_key(r): r["usage"] for r in results}
    assert set(got) == set(table["configurations"]), (
        "the launch configurations changed: rewrite the table with "
        "`python tests/test_kernels_compile.py --table tests/ptxas_table.json`; "
        f"new {sorted(set(got) - set(table['configurations']))[:3]}, "
        f"gone {sorted(set(table['configurations']) - set(got))[:3]}"
    )
    if report["triton"] == table["triton"]:
        assert got == table["configurations"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
