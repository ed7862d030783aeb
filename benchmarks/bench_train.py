"""End-to-end training throughput: static proportions against Aioli in each measurement mode.

Every method trains the same model on the same data for the same steps with the same seed through the
public API (``aioli_fast.train.train``); the figure is the run's ``tokens / train_time_s``, where the
training time runs from the first step to the last and includes the mixer's measurements:

- ``static``: ``mixing.method=static`` with uniform ``mixing.proportions`` (no mixer work at all);
- ``round``: Aioli's defaults (``mixing.method=aioli`` and nothing else): every training batch's
  per-domain losses fitted over the rounds, no LearnParams, no extra passes;
- ``train``: Aioli measuring the per-domain losses of the training batches themselves (no extra passes);
- ``probe``: Aioli measuring a small fixed per-domain validation probe (one batched no-grad forward);
- ``full_val``: Aioli measuring the validation split (at most ``eval.max_sequences`` per domain) after
  every block, as the paper.

Beside the throughput, each row gives what the run's start-up line states (the measurements' share of
the training compute, by the formula of docs/mixing.md; ``split`` for ``full_val``, whose cost the
validation split's size decides) and the share of the training time the measurements took.

Nothing inside a timed run is excluded: compile/warm-up of the first steps counts. Before the timed runs
one short untimed run (``--warmup-steps``) warms the process (thread pool, allocator, page cache of the
shards). With ``--repeats N`` the methods run N times, in an order rotated each repeat, and the table
shows the median of each column.

    python3 benchmarks/bench_train.py --preset cpu --repeats 3 --json out.json
    python3 benchmarks/bench_train.py --preset h200 --repeats 3      # on a GPU
    python3 benchmarks/bench_train.py --preset h200 --validate-only   # check the configs, run nothing

The data is the corpus ``aioli-fast demo`` builds (aioli_fast/harness/demo.py), prepared at the preset's
sequence length and cached under ``--dir``; ``--corpus PATH`` uses an existing prepared corpus instead.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from aioli_fast.config import config_from_dict
from aioli_fast.fileio import say
from aioli_fast.mixing.aioli import AioliMixer, percent
from aioli_fast.train import build_run_mixer

METHODS = ("static", "round", "train", "probe", "full_val")
# the demo's four domains, for checking a preset's configs without a corpus
DEMO_DOMAINS = ("python_code", "language_reference", "licenses", "noise")
# The GPU targets this benchmark tracks (Aioli throughput as a fraction of static's).
GPU_TARGETS = {"round": 0.995, "train": 0.995, "probe": 0.98}
# the paper's LearnParams (whole batches on the block mixtures, no uniform phase): the costliest schedule
PAPER_LEARN_PARAMS = {"learn_fraction": 1.0, "prior_steps": 0, "max_learn_share": 1.0}

PRESETS: dict[str, dict] = {
    # the demo's model and batch on a CPU: a run of each method takes ~30-60 s on 2 cores
    "cpu": {
        "model": {"preset": "mini"},
        "seq_len": 128,
        "scale": 1.0,
        "device": "cpu",
        "precision": "fp32",
        "steps": 150,
        "batch_size": 16,
        "log_every": 10,
        "optim": {
            "lr": 3.0e-3,
            "warmup_steps": 30,
            "min_lr_ratio": 0.1,
            "weight_decay": 0.1,
            "grad_clip": 1.0,
        },
        "eval": {"batch_size": 32, "max_sequences": 128},
        # LearnParams: 1 sweep x 4 domains x 4 steps = 16 steps of every 60-step round
        "aioli": {"round_steps": 60, "sweeps": 1, "block_steps": 4, **PAPER_LEARN_PARAMS},
    },
    # the paper's 160M model (vocabulary of the GPT-NeoX tokenizer kept, although the demo corpus is
    # byte tokens) at seq 2048 in bf16 on one H200
    "h200": {
        "model": {"preset": "pythia-160m", "vocab_size": 50304},
        "seq_len": 2048,
        "scale": 4.0,
        "device": "cuda",
        "precision": "bf16",
        "steps": 300,
        "batch_size": 16,
        "log_every": 50,
        "optim": {
            "lr": 5.0e-4,
            "warmup_steps": 50,
            "min_lr_ratio": 0.1,
            "weight_decay": 0.1,
            "grad_clip": 1.0,
        },
        "eval": {"batch_size": 32, "max_sequences": None},  # full_val: the whole validation split
        # LearnParams: 2 sweeps x 4 domains x 4 steps = 32 steps of every 100-step round
        "aioli": {"round_steps": 100, "sweeps": 2, "block_steps": 4, **PAPER_LEARN_PARAMS},
    },
}


def _versions() -> dict:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    import numpy

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "numpy": numpy.__version__,
        "aioli_fast": version("aioli_fast"),
    }


def _machine(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def _parse_pairs(pairs: list[str], what: str) -> dict:
    import yaml

    out = {}
    for text in pairs:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"{what} {text!r} is not of the form key=value")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def method_configs(
    preset: str,
    corpus: str,
    domains: list[str],
    out_dir: str,
    *,
    steps: int | None = None,
    seed: int = 0,
    overrides: list[str] | None = None,
    aioli_options: dict | None = None,
    verbose: bool = False,
) -> dict[str, dict]:
    """Raw config mapping of each method (before ``config_from_dict``) for a preset and a corpus."""
    p = PRESETS[preset]
    base = {
        "model": dict(p["model"]),
        "data": {"path": corpus},
        "optim": dict(p["optim"]),
        "train": {
            "steps": steps if steps is not None else p["steps"],
            "batch_size": p["batch_size"],
            "seed": seed,
            "device": p["device"],
            "precision": p["precision"],
            "log_every": p["log_every"],
            "out_dir": out_dir,
            "overwrite": True,
            "progress": verbose,
        },
        "eval": dict(p["eval"]),
    }
    aioli = {**p["aioli"], **(aioli_options or {})}
    out = {}
    for method in METHODS:
        cfg = json.loads(json.dumps(base))
        cfg["train"]["name"] = method
        if method == "static":
            cfg["mixing"] = {"method": "static", "proportions": {d: 1.0 for d in domains}}
        elif method == "round":
            cfg["mixing"] = {"method": "aioli"}  # the defaults: nothing else set
        else:
            cfg["mixing"] = {"method": "aioli", "measurement": method, **aioli}
        out[method] = {"config": cfg, "overrides": list(overrides or [])}
    return out


def validate_configs(configs: dict[str, dict], domains: list[str]) -> dict:
    """Every method's config through ``config_from_dict`` and its mixer built for ``domains``.

    Raises the library's ConfigError on an invalid setting (for example Aioli's round_steps too short for
    LearnParams); returns method -> the resolved config as a dict.
    """
    resolved = {}
    for method, entry in configs.items():
        cfg = config_from_dict(entry["config"], entry["overrides"])
        build_run_mixer(cfg, list(domains), torch.device("cpu"))
        resolved[method] = cfg.to_dict()
    return resolved


def demo_corpus(folder: Path, seq_len: int, scale: float) -> Path:
    """The ``aioli-fast demo`` corpus at ``seq_len``, prepared once under ``folder`` and reused."""
    from aioli_fast.data import prepare
    from aioli_fast.harness.demo import build_demo_sources

    corpus = folder / f"corpus-seq{seq_len}-scale{scale:g}"
    if (corpus / "manifest.json").is_file():
        say(f"using the cached demo corpus {corpus}")
        return corpus
    say(f"building the demo corpus (seq_len {seq_len}, scale {scale:g}) in {corpus} ...")
    sources = build_demo_sources(folder / f"raw-scale{scale:g}", scale=scale)
    prepare(
        sources,
        corpus,
        seq_len=seq_len,
        tokenizer="byte",
        val_fraction=0.1,
        test_fraction=0.1,
        overwrite=True,
        progress=False,
    )
    return corpus


def run_one(entry: dict, name: str, verbose: bool) -> dict:
    """Train one config; returns the figures of its final.json (and the call's own wall time)."""
    from aioli_fast.train import train

    cfg = config_from_dict(entry["config"], [*entry["overrides"], f"train.name={name}"])
    start = time.perf_counter()
    sink = io.StringIO()
    # the loop prints its per-domain table on stdout: keep stdout for this benchmark's own table
    with contextlib.redirect_stdout(sys.stderr if verbose else sink):
        result = train(cfg)
    call_s = time.perf_counter() - start
    f = result.final
    mixer = f.get("mixer", {})
    # what the start-up line states: the measurements' share of the training compute, by the formula
    built = build_run_mixer(cfg, list(f["domains"]), torch.device("cpu"))
    cost = 0.0
    if isinstance(built, AioliMixer):
        probe = built.probe_size(cfg.train.steps, cfg.train.batch_size, cfg.mixing.probe_sequences)
        cost = built.measurement_cost(cfg.train.steps, cfg.train.batch_size, probe)
    average = f.get("average", {})
    wall = float(f["train_time_s"])
    return {
        "steps": int(f.get("steps", cfg.train.steps)),
        "tokens": int(f["tokens"]),
        "wall_s": wall,
        # the loop's figure: tokens trained by this launch / train_time_s (measurements included)
        "tokens_per_s": f.get("tokens_per_s") or (f["tokens"] / wall if wall > 0 else None),
        "measurements": int(mixer.get("measurements", 0)),
        "measurement_time_s": float(mixer.get("measurement_time_s", 0.0)),
        "compute_cost": cost,  # None: full_val (the split's size decides)
        "missing_measurements": mixer.get("missing_measurements"),
        "val_ppl": average.get("val_ppl"),
        "test_ppl": average.get("test_ppl"),
        "proportions": f.get("proportions"),
        "call_s": call_s,
    }


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Median of every figure over the repeats of each method, and its throughput relative to static."""
    out = {}
    for method, reps in runs.items():
        row = {"repeats": len(reps), "steps": reps[0]["steps"], "tokens": reps[0]["tokens"]}
        for key in ("wall_s", "tokens_per_s", "measurements", "measurement_time_s", "val_ppl", "test_ppl"):
            row[key] = _median([r[key] for r in reps])
        row["compute_cost"] = reps[0]["compute_cost"]  # the formula's: the same for every repeat
        row["time_share"] = row["measurement_time_s"] / row["wall_s"] if row["wall_s"] else None
        tps = [r["tokens_per_s"] for r in reps]
        row["tokens_per_s_min"], row["tokens_per_s_max"] = min(tps), max(tps)
        out[method] = row
    static = out.get("static", {}).get("tokens_per_s")
    for row in out.values():
        row["fraction_of_static"] = row["tokens_per_s"] / static if static else None
    return out


def _label(method: str) -> str:
    return "static" if method == "static" else f"aioli {method}"


def format_table(summary: dict[str, dict]) -> str:
    head = (
        f"{'method':<15} {'steps':>6} {'tokens':>11} {'wall s':>8} {'tokens/s':>10} "
        f"{'% of static':>11} {'measurements':>12} {'measurement s':>13} {'cost (formula)':>14} "
        f"{'time share':>10} {'test ppl':>9}"
    )
    lines = [head, "-" * len(head)]
    for method, r in summary.items():
        frac = f"{100 * r['fraction_of_static']:.1f}%" if r["fraction_of_static"] is not None else "-"
        ppl = f"{r['test_ppl']:.3f}" if r["test_ppl"] is not None else "-"
        cost = percent(r["compute_cost"]) if r["compute_cost"] is not None else "split"
        share = f"{100 * r['time_share']:.1f}%" if r["time_share"] is not None else "-"
        lines.append(
            f"{_label(method):<15} {r['steps']:>6} {r['tokens']:>11,} {r['wall_s']:>8.2f} "
            f"{r['tokens_per_s']:>10,.0f} {frac:>11} {r['measurements']:>12g} "
            f"{r['measurement_time_s']:>13.2f} {cost:>14} {share:>10} {ppl:>9}"
        )
    return "\n".join(lines)


def target_lines(summary: dict[str, dict], on_gpu: bool) -> list[str]:
    """How each Aioli mode compares with the GPU targets (which apply to a GPU run only)."""
    lines = []
    for method, target in GPU_TARGETS.items():
        frac = summary.get(method, {}).get("fraction_of_static")
        if frac is None:
            continue
        verdict = ("meets" if frac >= target else "misses") + (" it" if on_gpu else " it (a CPU run)")
        lines.append(
            f"GPU target aioli {method} >= {100 * target:g}% of static: measured {100 * frac:.1f}%, {verdict}"
        )
    frac = summary.get("full_val", {}).get("fraction_of_static")
    if frac is not None:
        lines.append(f"aioli full_val (the paper's procedure, no target): {100 * frac:.1f}% of static")
    return lines


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--corpus", help="an existing prepared corpus (default: build the demo corpus in --dir)")
    ap.add_argument("--dir", default="runs/bench_train", help="cache of the demo corpus and the run folders")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    ap.add_argument("--steps", type=int, help="training steps of every run (default: the preset's)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each method; the table shows medians")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-steps", type=int, default=10, help="steps of the untimed warm-up run (0: none)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every method (e.g. train.batch_size=8); repeatable",
    )
    ap.add_argument(
        "--aioli",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="mixing option of the Aioli runs (e.g. round_steps=80); repeatable",
    )
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--validate-only", action="store_true", help="check the preset's configs; run nothing")
    ap.add_argument("--verbose", action="store_true", help="the training loop's progress and tables")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.repeats < 1 or (args.steps is not None and args.steps < 1) or args.warmup_steps < 0:
        raise SystemExit("--repeats and --steps must be >= 1, --warmup-steps >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    aioli_options = _parse_pairs(args.aioli, "--aioli")
    versions = _versions()
    machine = _machine(preset["device"])
    say("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    say(
        f"machine: {machine['platform']}, {machine['cpu_count']} CPUs, torch threads "
        f"{machine['torch_threads']}" + (f", {machine['gpu']}" if "gpu" in machine else "")
    )

    out_dir = str(Path(args.dir) / "runs")
    if args.validate_only:
        corpus, domains = args.corpus or "data/bench_train", list(DEMO_DOMAINS)
    else:
        if args.corpus:
            corpus = args.corpus
        else:
            corpus = str(demo_corpus(Path(args.dir), preset["seq_len"], preset["scale"]))
        from aioli_fast.data import load_manifest

        manifest = load_manifest(corpus)
        domains = list(manifest.domains)
    configs = method_configs(
        args.preset,
        corpus,
        domains,
        out_dir,
        steps=args.steps,
        seed=args.seed,
        overrides=args.set,
        aioli_options=aioli_options,
        verbose=args.verbose,
    )
    configs = {m: configs[m] for m in methods}
    resolved = validate_configs(configs, domains)  # every config checked before anything runs
    first = resolved[methods[0]]
    say(
        f"preset {args.preset}: model {first['model']['preset']}, {first['train']['steps']} steps x "
        f"{first['train']['batch_size']} sequences, {len(domains)} domains, configs valid for {methods}"
    )
    result = {
        "benchmark": "bench_train",
        "date": datetime.date.today().isoformat(),
        "command": "python3 benchmarks/bench_train.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "preset": args.preset,
        "methods": methods,
        "repeats": args.repeats,
        "warmup_steps": args.warmup_steps,
        "versions": versions,
        "machine": machine,
        "git_commit": _git_commit(),
        "configs": resolved,
    }
    if args.validate_only:
        say(f"--validate-only: the {args.preset} configs are valid; nothing was run")
        return result

    if not preset["device"].startswith("cpu") and not torch.cuda.is_available():
        raise SystemExit(f"--preset {args.preset} needs a CUDA device (use --validate-only to check it)")
    load_start = _load_average()
    bench_start = time.perf_counter()
    if args.warmup_steps:
        say(f"warm-up: an untimed {args.warmup_steps}-step static run ...")
        warm = method_configs(args.preset, corpus, domains, out_dir, seed=args.seed)["static"]
        warm["overrides"] = [*args.set, f"train.steps={args.warmup_steps}", "optim.warmup_steps=0"]
        run_one(warm, "warmup", args.verbose)

    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(args.repeats):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for method in order:
            say(f"[repeat {r + 1}/{args.repeats}] {_label(method)}: training ...")
            rec = run_one(configs[method], f"{method}-r{r + 1}", args.verbose)
            runs[method].append(rec)
            say(
                f"[repeat {r + 1}/{args.repeats}] {_label(method)}: {rec['tokens']:,} tokens in "
                f"{rec['wall_s']:.1f} s = {rec['tokens_per_s']:,.0f} tokens/s, {rec['measurements']} "
                f"measurements ({rec['measurement_time_s']:.1f} s), test ppl {rec['test_ppl']}"
            )
    summary = summarise(runs)
    result.update(
        {
            "load_average_start": load_start,
            "load_average_end": _load_average(),
            "total_s": time.perf_counter() - bench_start,
            "summary": summary,
            "runs": runs,
            "targets_gpu": {m: t for m, t in GPU_TARGETS.items()},
        }
    )
    on_gpu = preset["device"].startswith("cuda")
    warm_note = (
        f"after one untimed {args.warmup_steps}-step warm-up run" if args.warmup_steps else "no warm-up run"
    )
    print(
        f"End-to-end training throughput, preset {args.preset}: median of {args.repeats} repeat(s); "
        f"every step of each run timed, measurements included ({warm_note})"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(
        f"machine: {machine['machine']}, {machine['cpu_count']} CPUs, torch threads {torch.get_num_threads()}"
        + (f", {machine['gpu']}" if "gpu" in machine else ", no GPU")
        + f"; load average (1/5/15 min) at start {load_start}, at end {result['load_average_end']}"
    )
    print(format_table(summary))
    for line in target_lines(summary, on_gpu):
        print(line)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        say(f"results written to {path}")
    return result


if __name__ == "__main__":
    main()
