"""benchmarks/bench_mixer.py's table of the default measurement drives the mixer's own ``observe``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mixer.py"


def test_the_round_table_times_every_micro_batch_and_update_of_a_default_run():
    spec = importlib.util.spec_from_file_location("bench_mixer", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (row,) = bench.bench_round([3], "cpu", repeats=1, steps=200)
    # 200 steps: a uniform phase of 52, then 4 rounds of 37; the fit starts at step 26, the start of
    # round 0 (step 52) has less than a round of batches and moves nothing, the next three update
    assert row["k"] == 3 and row["round_steps"] == 37
    assert row["updates"] == 3
    assert row["micro_batches"] == 200 - 26 - 1 - 3
    assert 0 < row["observe_us"] < row["update_us"]
