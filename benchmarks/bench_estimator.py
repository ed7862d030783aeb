"""How well each LearnParams design estimates Aioli's update direction, and at what cost, for 2 to 64 domains.

Aioli's update depends on the estimated A only through its column sums, up to a shift common to all
columns and a positive scale: p ∝ exp(η·colsum(Â)). So the quantity to estimate is the direction of the
centred column sums of A. On the linear-law simulator (:mod:`aioli_fast.harness.sim`) the planted A is
known; each design runs one round of LearnParams from uniform proportions and its estimate (the mixer's
normalised A of that round) is compared with the planted one:

    error = the angle, in degrees, between the centred column sums of the estimate and of the truth

(0: the update moves p exactly as the true A would; 90: no information). Costs of a design, per round:

- ``steps``: optimizer steps spent on block mixtures;
- ``share``: block steps x ``learn_fraction``, the training sequences drawn for LearnParams;
- ``quad``: the sum over those steps of ||m_t - p||², the squared distance of the trained mixture from the
  proportions. On real text the quality cost of LearnParams scales with it (docs/mixing.md: at six domains
  one-hot factor 0.75 against 0.3 is 19x in ||m - p||² and 17x in cost), so designs are compared at equal
  ``quad``.

Designs: the paper's (whole batches on the smoothed one-hot mixtures, one random sweep, S steps per block),
and the partial design (a fraction e of each batch on them, the rest on p, mirrored sweeps), at the
paper's ``quad`` (1/e² the steps), in random order at that ``quad``, and at the paper's number of steps
(e² the ``quad``). The planted A decays by 0.999 a step (diminishing returns), so a design that spreads
over more steps measures a smaller, changing effect.

    python benchmarks/bench_estimator.py                  # k = 2 .. 64, 8 seeds, about 2 minutes on a CPU
    python benchmarks/bench_estimator.py --k 2 8 --seeds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch

from aioli_fast.harness.sim import LinearLawSimulator, run_mixer
from aioli_fast.mixing import build_mixer
from aioli_fast.mixing.aioli import learn_params_steps

S_PAPER = 4  # the paper's block length at 2 domains (10 at 7): the reference design's S


def designs(k: int, fractions: list[float]) -> dict[str, dict]:
    """Each design's Aioli options for one round from uniform (no uniform phase, no cap)."""
    common = dict(measurement="probe", prior_steps=0, max_learn_share=1.0, one_hot_factor=0.75, eta=1.0)
    out = {"paper (e=1, R=1, S=4)": dict(common, learn_fraction=1.0, sweeps=1, block_steps=S_PAPER)}
    for i, e in enumerate(fractions):
        longer = round(S_PAPER / e**2 / 2)  # two mirrored sweeps of blocks 1/e² as long: equal quad
        partial = dict(common, learn_fraction=e, sweeps=2, block_order="mirrored")
        out[f"partial e={e:g}, equal quad"] = dict(partial, block_steps=longer)
        if i == 0:
            out[f"partial e={e:g}, random order, equal quad"] = dict(
                partial, block_steps=longer, block_order="random"
            )
            out[f"partial e={e:g}, equal steps"] = dict(partial, block_steps=S_PAPER // 2)
    return out


def centred_colsums(A: torch.Tensor) -> torch.Tensor:
    c = A.to(torch.float64).sum(dim=0)
    return c - c.mean()


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-300))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def run_design(k: int, options: dict, seed: int, regime: dict) -> dict:
    sim = LinearLawSimulator.random(k, seed=seed, **regime)
    truth = centred_colsums(sim.A0_kk)
    learn = learn_params_steps(options["sweeps"], k, options["block_steps"])
    mixer = build_mixer("aioli", [f"d{i}" for i in range(k)], round_steps=learn + 1, seed=seed, **options)
    history = run_mixer(mixer, sim, learn + 1)
    uniform = torch.full((k,), 1.0 / k, dtype=torch.float64)
    quad = sum(
        float(((torch.tensor(p, dtype=torch.float64) - uniform) ** 2).sum())
        for p in history["proportions"][:learn]
    )
    return {
        "error": angle(centred_colsums(mixer.last_A_DD), truth),
        "steps": learn,
        "share": learn * options["learn_fraction"],
        "quad": quad,
        "measurements": history["measurements"][0],
    }


REGIMES = {
    # the probe's error dominates: a fixed probe of 4096 tokens per domain, little training noise
    "probe noise": dict(measure_noise=0.02, noise=1e-5, decay=0.999),
    # SGD noise dominates: every step moves each domain's loss by a random 1e-4 (about a step's drop)
    "training noise": dict(measure_noise=0.002, noise=1e-4, decay=0.999),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[0.25, 0.5],
        help="learn_fraction of the partial designs",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = []
    for regime_name, regime in REGIMES.items():
        print(f"\n### {regime_name}: {regime}\n")
        print("| k | design | error (deg), mean ± sd | steps | share | quad | measurements |")
        print("|---:|---|---:|---:|---:|---:|---:|")
        for k in args.k:
            for name, options in designs(k, args.fractions).items():
                runs = [run_design(k, options, seed, regime) for seed in range(args.seeds)]
                errors = [r["error"] for r in runs]
                mean = sum(errors) / len(errors)
                sd = (sum((x - mean) ** 2 for x in errors) / max(len(errors) - 1, 1)) ** 0.5
                row = {"regime": regime_name, "k": k, "design": name, "error_mean": mean, "error_sd": sd}
                row.update({key: runs[0][key] for key in ("steps", "share", "quad", "measurements")})
                results.append(row)
                print(
                    f"| {k} | {name} | {mean:.1f} ± {sd:.1f} | {row['steps']} | {row['share']:g} | "
                    f"{row['quad']:.2f} | {row['measurements']} |",
                    flush=True,
                )
    elapsed = time.perf_counter() - started
    versions = f"python {platform.python_version()}, torch {torch.__version__}"
    print(f"\n{platform.machine()}, {versions}; {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "results": results, "seconds": elapsed}, f, indent=1)


if __name__ == "__main__":
    main()
