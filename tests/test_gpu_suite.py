"""benchmarks/gpu_suite.py cannot pass wrongly, and runs end to end before any GPU does.

- :func:`within` is the one tolerance every correctness row uses: exact values pass, a 100% error
  fails (the old check let it through), and the tolerance is relative plus absolute.
- A correctness row fails when the kernel's gradient is perturbed: the real kernel runs, a hook
  doubles its gradient on the way back, and the row must say FAIL.
- ``--dry-run`` runs every code path (checks, every implementation's timing, the fused linear, the
  training comparison) on the CPU under the interpreter, as CI does, and writes its JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "gpu_suite.py"

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def suite_module():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_within_is_relative_plus_absolute(suite_module):
    want = torch.tensor([1.0, -2.0, 1e-12])
    assert suite_module.within(want, want, 1e-2, 1e-9) == 0.0
    assert suite_module.within(2 * want, want, 1e-2, 1e-9) > 1  # a 100% error fails
    assert suite_module.within(want * (1 + 0.5e-2), want, 1e-2, 1e-9) <= 1  # half the tolerance
    assert suite_module.within(want * (1 + 2e-2), want, 1e-2, 1e-9) > 1  # twice the tolerance


@pytest.mark.parametrize("caller", ["plain", "adapter"])
def test_a_perturbed_gradient_fails_its_check(suite_module, monkeypatch, caller, tmp_path):
    import aioli_fast.kernels as kernels

    if not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("the CPU run of the suite needs TRITON_INTERPRET=1 (tests/conftest.py)")
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("AIOLI_KERNELS", "triton")
    suite = suite_module.Suite(Namespace(dry_run=True, budget_s=60.0, train_steps=0))
    args = (suite, 40, 96, 7, torch.float32, False, caller)
    assert suite_module.check_logits(*args)["passed"]

    real = kernels.domain_cross_entropy

    def perturbed(logits, *a, **kw):
        if logits.requires_grad:
            logits.register_hook(lambda g: g * 2.0)  # the gradient leaves 100% wrong
        return real(logits, *a, **kw)

    monkeypatch.setattr(kernels, "domain_cross_entropy", perturbed)
    row = suite_module.check_logits(*args)
    assert not row["passed"] and row["grad_err"] > 1, row


@pytest.mark.slow
def test_the_dry_run_runs_every_path(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "AIOLI_KERNELS")}
    env["OUT"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(SUITE), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert result["all_checks_passed"]
    callers = {c["check"].split()[1] for c in result["checks"] if c["check"].startswith("logits")}
    assert callers == {"plain", "adapter"}
    assert any(c["check"].startswith("linear trainer") for c in result["checks"])
    impls = {r["impl"] for r in result["timings"]}
    assert {"eager+scatter", "compiled", "ours plain", "ours adapter (contract, in place)"} <= impls
    assert {"eager", "ours trainer"} <= impls
    assert all(r["ms"] and r["ms"] > 0 for r in result["timings"])
    train = result["train"]
    assert train["returncode"] == 0, train["stderr_tail"]
    assert set(train["result"]["methods"]) == {"static", "train", "probe"}
    assert set(train["result"]["summary"]) >= {"static", "probe"}, train["result"]["summary"]
    assert "| N | V | D | implementation |" in proc.stdout
