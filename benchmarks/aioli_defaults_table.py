"""The summary table of the Aioli-defaults sweeps (configs/sweeps/aioli-text*.yaml), from their results.

For every setting and method: the paired difference of the average test perplexity against `stratified`
(mean ± standard error over the seeds, and how many seeds were better), the share of the training
sequences LearnParams drew from block mixtures (from the method's resolved config), and the median wall
time. The restricted setting is also compared with its own baseline: `aioli_poor_prior` against
`static_poor_prior` (the same poor prior used statically), paired by seed.

    python benchmarks/aioli_defaults_table.py configs/sweeps/aioli-text2.yaml configs/sweeps/aioli-text6.yaml
    python benchmarks/aioli_defaults_table.py SPEC --results runs/sweeps/aioli-text6/results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from aioli_fast.harness.sweep import load_spec, run_config
from aioli_fast.train import build_run_mixer


def paired(results: dict, method: str, against: str) -> tuple[list[float], list[str]]:
    """Per-seed differences of the average test perplexity, seeds both runs finished."""
    mine, base = results["methods"].get(method, {}).get("seeds", {}), results["methods"][against]["seeds"]
    seeds = [s for s in mine if s in base]
    return [mine[s]["test_ppl"] - base[s]["test_ppl"] for s in seeds], seeds


def mean_se(values: list[float]) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return f"{mean:+.3f} ± {se:.3f}"


def learn_share(spec, method: str) -> str:
    cfg = run_config(spec, method, spec.seeds[0], Path("OUT"), placeholders=True)
    if cfg.mixing.method != "aioli":
        return "0%"
    mixer = build_run_mixer(cfg, spec.domains, torch.device("cpu"))
    return f"{100 * mixer.learn_share(cfg.train.steps):.0f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="+")
    parser.add_argument(
        "--results", nargs="*", default=None, help="results.json per spec (default: runs/sweeps)"
    )
    args = parser.parse_args()
    print("| setting | k | method | n | Δ avg test ppl vs stratified | better | LearnParams share | wall s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    restricted = []
    for i, spec_path in enumerate(args.specs):
        spec = load_spec(spec_path)
        path = Path(args.results[i]) if args.results else Path("runs/sweeps") / spec.name / "results.json"
        results = json.loads(path.read_text(encoding="utf-8"))
        for method in spec.methods:
            seeds = results["methods"].get(method, {}).get("seeds", {})
            if not seeds:
                continue
            diffs, _ = paired(results, method, "stratified")
            better = sum(d < 0 for d in diffs)
            wall = statistics.median(s["wall_s"] for s in seeds.values())
            delta = "" if method == "stratified" else mean_se(diffs)
            count = "" if method == "stratified" else f"{better}/{len(diffs)}"
            print(
                f"| {spec.name} | {len(spec.domains)} | {method} | {len(seeds)} | {delta} | {count} | "
                f"{learn_share(spec, method)} | {wall:.0f} |"
            )
        if "aioli_poor_prior" in spec.methods and "static_poor_prior" in spec.methods:
            diffs, _ = paired(results, "aioli_poor_prior", "static_poor_prior")
            if diffs:
                restricted.append((spec.name, len(spec.domains), diffs))
    if restricted:
        print("\nThe restricted setting: `aioli_poor_prior` against `static_poor_prior`, paired by seed:\n")
        print("| setting | k | n | Δ avg test ppl | better |")
        print("|---|---:|---:|---:|---:|")
        for name, k, diffs in restricted:
            print(
                f"| {name} | {k} | {len(diffs)} | {mean_se(diffs)} | "
                f"{sum(d < 0 for d in diffs)}/{len(diffs)} |"
            )


if __name__ == "__main__":
    main()
