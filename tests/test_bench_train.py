"""benchmarks/bench_train.py at a tiny size: every method runs, the table and JSON carry its figures,
and the h200 preset's configs validate (without running them)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import write_alphabet_domain

from aioli_fast.data import prepare
from aioli_fast.errors import ConfigError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_train")
    domains = {
        "ab": [str(write_alphabet_domain(root / "raw" / "ab", "ab", 30, 0))],
        "xyz": [str(write_alphabet_domain(root / "raw" / "xyz", "xyz", 30, 1))],
    }
    prepare(domains, root / "corpus", seq_len=16, val_fraction=0.2, test_fraction=0.2, progress=False)
    return root / "corpus"


TINY = [
    "--steps",
    "8",
    "--warmup-steps",
    "2",
    "--set",
    "model.preset=tiny",
    "--set",
    "train.batch_size=4",
    "--set",
    "optim.warmup_steps=2",
    "--set",
    "eval.batch_size=8",
    "--set",
    "eval.max_sequences=4",
    # 2 domains, LearnParams 1 x 2 x 1 = 2 steps; train mode needs round_steps >= 2 + 1 + 1
    "--aioli",
    "round_steps=4",
    "--aioli",
    "sweeps=1",
    "--aioli",
    "block_steps=1",
    "--aioli",
    "probe_sequences=2",
]


def test_every_method_runs_and_is_reported(bench, corpus, tmp_path, capsys):
    out = tmp_path / "result.json"
    argv = ["--corpus", str(corpus), "--dir", str(tmp_path / "work"), "--json", str(out), *TINY]
    threads = torch.get_num_threads()
    try:
        result = bench.main([*argv, "--threads", "1"])
    finally:
        torch.set_num_threads(threads)  # the rest of the test session keeps its thread count
    stdout = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    assert set(saved["summary"]) == set(bench.METHODS)
    for key in ("python", "torch", "triton", "numpy"):
        assert saved["versions"][key]
    for method, row in saved["summary"].items():
        assert row["steps"] == 8
        assert row["tokens"] == 8 * 4 * 16
        assert row["tokens_per_s"] > 0
        assert row["wall_s"] > 0
        assert row["test_ppl"] > 1
        assert bench._label(method) in stdout
        assert len(saved["runs"][method]) == 1
    # 2 rounds of 2 + 1 block boundaries; the train mode measures the training batches (no extra pass)
    assert saved["summary"]["probe"]["measurements"] == 6
    assert saved["summary"]["full_val"]["measurements"] == 6
    assert saved["summary"]["probe"]["measurement_time_s"] > 0
    assert saved["summary"]["train"]["measurements"] == 0
    # the start-up line's cost: 6 measurements x 2 domains x 2 probe sequences / (3 x 4 x 8) = 25%
    assert saved["summary"]["probe"]["compute_cost"] == pytest.approx(0.25)
    assert saved["summary"]["train"]["compute_cost"] == saved["summary"]["static"]["compute_cost"] == 0.0
    assert saved["summary"]["full_val"]["compute_cost"] is None
    assert 0 < saved["summary"]["probe"]["time_share"] < 1
    assert saved["summary"]["static"]["fraction_of_static"] == 1.0
    # the same seed, steps and data for every method: static and Aioli differ only in their mixing
    configs = saved["configs"]
    assert {c["train"]["seed"] for c in configs.values()} == {0}
    assert configs["static"]["mixing"]["proportions"] == {"ab": 1.0, "xyz": 1.0}
    assert {c["mixing"]["measurement"] for m, c in configs.items() if m not in ("static", "round")} == {
        "train",
        "probe",
        "full_val",
    }
    # the defaults: nothing set but the method, no measurement and nothing to pay for one
    assert configs["round"]["mixing"]["method"] == "aioli"
    assert configs["round"]["mixing"].get("measurement") is None  # unset: the default, round
    assert saved["summary"]["round"]["measurements"] == 0
    assert saved["summary"]["round"]["compute_cost"] == 0.0
    header = stdout.splitlines()
    assert any("tokens/s" in line and "% of static" in line and "cost (formula)" in line for line in header)
    assert "GPU target aioli probe >= 98% of static" in stdout


def test_subset_and_repeats_take_the_median(bench, corpus, tmp_path):
    argv = ["--corpus", str(corpus), "--dir", str(tmp_path), "--methods", "static,probe", "--repeats", "2"]
    result = bench.main([*argv, *TINY, "--warmup-steps", "0"])
    assert list(result["summary"]) == ["static", "probe"]
    for method, row in result["summary"].items():
        speeds = [r["tokens_per_s"] for r in result["runs"][method]]
        assert len(speeds) == 2 and row["tokens_per_s"] == pytest.approx(sum(speeds) / 2)


def test_h200_preset_validates_without_running(bench, tmp_path):
    result = bench.main(["--preset", "h200", "--validate-only", "--dir", str(tmp_path)])
    configs = result["configs"]
    assert set(configs) == set(bench.METHODS)
    for cfg in configs.values():
        assert cfg["model"]["preset"] == "pythia-160m"
        assert cfg["model"]["vocab_size"] == 50304
        assert cfg["train"]["precision"] == "bf16"
        assert cfg["train"]["device"] == "cuda"
    assert bench.PRESETS["h200"]["seq_len"] == 2048
    assert not any(tmp_path.iterdir())  # nothing was built or run


def test_an_invalid_aioli_setting_fails_before_any_run(bench, corpus, tmp_path):
    # 4 LearnParams steps + measure_steps 1 + 1 > 5: Aioli's own check rejects it
    argv = ["--corpus", str(corpus), "--dir", str(tmp_path), *TINY, "--aioli", "block_steps=2"]
    argv += ["--aioli", "round_steps=5"]
    with pytest.raises(ConfigError, match="round_steps"):
        bench.main(argv)
    assert not (tmp_path / "runs").exists()
