"""What Aioli's estimates looked like in finished sweeps: noise, agreement between sources, the EMA bound.

Reads ``results.json`` of one or more sweeps (``aioli-fast sweep``) and prints, for every Aioli method:

- per round, the spread of the learned proportions (max p / min p, mean over seeds) against the bound
  e^eta that the EMA update puts on it;
- how consistent the estimates are: the direction Aioli moves the proportions in a round is the centred
  column sums of its normalised A (``c = colsum(A) - mean``); the table gives the mean pairwise cosine
  of c between seeds (the same method and round, different data order and initialisation: 1 means the
  estimate is reproducible, 0 that it is noise) and, in round 0, where every measurement source trains
  exactly the same model on the same data, the cosine between each source's c and ``full_val``'s
  (the paper's procedure) for the same seed, so only the measurement differs.

With two domains a cosine of centred vectors is +1 or -1: whether the two estimates favour the same
domain. Nothing here reads the test split.

    python3 benchmarks/sweep_diagnostics.py runs/sweeps/text2 runs/sweeps/text3 runs/sweeps/text6
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

import yaml

from aioli_fast.mixing import MIXERS
from aioli_fast.mixing.aioli import resolve_options


def centred_colsums(A: list[list[float]]) -> list[float]:
    k = len(A)
    cols = [sum(A[i][j] for i in range(k)) for j in range(k)]
    mean = sum(cols) / k
    return [c - mean for c in cols]


def cosine(a: list[float], b: list[float]) -> float:
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    if na == 0 or nb == 0:
        return math.nan
    return sum(x * y for x, y in zip(a, b)) / (na * nb)


def _fmt(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:+.2f}"


def mixing_of(sweep_dir: Path, method: str, seed: int) -> dict:
    """The run's Aioli options, unset ones read as the mixer's defaults."""
    path = sweep_dir / "runs" / method / f"seed{seed}" / "config.yaml"
    mixing = yaml.safe_load(path.read_text())["mixing"]
    return {**MIXERS["aioli"].OPTIONS, **{k: v for k, v in mixing.items() if v is not None}}


# options that change only what is measured or how p follows from A: runs differing only in these train
# the same model on the same data through round 0's LearnParams
MEASUREMENT_ONLY = {
    "measurement",
    "measure_steps",
    "eta",
    "update",
    "ema",
    "min_proportion",
    "probe_sequences",
}


def rounds_by_index(seed_entry: dict) -> dict[int, dict]:
    """The applied rounds of one run by round number (a resumed run lists only its last launch's)."""
    return {r["round"]: r for r in seed_entry["mixer"].get("rounds", []) if r.get("applied", True)}


def analyse(sweep_dir: Path) -> str:
    results = json.loads((sweep_dir / "results.json").read_text())
    aioli = {
        m: e["seeds"]
        for m, e in results["methods"].items()
        if any(v["mixer"].get("rounds") for v in e["seeds"].values())
    }
    lines = [f"## {results['spec']} ({', '.join(results['domains'])})", ""]
    if not aioli:
        return "\n".join([*lines, "no Aioli runs with per-round estimates", ""])
    lines += [
        "| method | update, eta | bound e^eta | round | max p / min p (mean over seeds) | "
        "cos(c) between seeds | cos(c) with full_val, same seed |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    reference = aioli.get("aioli_full_val")
    if reference is not None:
        ref_mixing = mixing_of(sweep_dir, "aioli_full_val", int(next(iter(reference))))
    for method, seeds in aioli.items():
        mixing = mixing_of(sweep_dir, method, int(next(iter(seeds))))
        resolved = resolve_options(mixing, len(results["domains"]), None)  # eta and update by default
        eta, update = float(resolved["eta"]), str(resolved["update"])
        bound = math.exp(eta) if update == "ema" else math.inf
        same_round0 = (
            reference is not None
            and method != "aioli_full_val"
            and all(
                mixing.get(k) == ref_mixing.get(k) for k in (set(mixing) | set(ref_mixing)) - MEASUREMENT_ONLY
            )
        )
        by_seed = {s: rounds_by_index(v) for s, v in seeds.items()}
        numbers = sorted(set.intersection(*(set(r) for r in by_seed.values())))
        for r in numbers:
            ratios = [max(rs[r]["proportions"]) / min(rs[r]["proportions"]) for rs in by_seed.values()]
            cs = {s: centred_colsums(rs[r]["A"]) for s, rs in by_seed.items()}
            pairs = [cosine(cs[a], cs[b]) for a, b in itertools.combinations(sorted(cs), 2)]
            between = statistics.fmean(pairs) if pairs else math.nan
            same = math.nan
            if r == 0 and same_round0:
                sims = [
                    cosine(cs[s], centred_colsums(rounds_by_index(reference[s])[0]["A"]))
                    for s in cs
                    if s in reference and 0 in rounds_by_index(reference[s])
                ]
                same = statistics.fmean(sims) if sims else math.nan
            lines.append(
                f"| {method} | {update}, {eta:g} | {bound:.2f} | {r} | {statistics.fmean(ratios):.3f} | "
                f"{_fmt(between)} | {_fmt(same)} |"
            )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", help="sweep output folders (holding results.json)")
    args = parser.parse_args(argv)
    for folder in args.sweeps:
        path = Path(folder)
        if not (path / "results.json").is_file():
            print(f"{path}: no results.json (run aioli-fast sweep first)", file=sys.stderr)
            return 2
        print(analyse(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
