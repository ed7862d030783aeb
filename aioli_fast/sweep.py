"""``aioli-fast sweep``: methods x seeds on one corpus with identical budgets, as tables and plots.

A sweep spec (YAML, ``configs/sweeps/*.yaml``, format in docs/benchmarks.md) names a corpus, the seeds, a
base training config and the methods, each as overrides of the base. Every run of a method and a seed is
an ordinary training run (``aioli_fast.train.train``) in ``OUT/runs/<method>/seed<N>``; a finished run
whose config is unchanged is not run again, an unfinished one resumes from its last checkpoint, so the
same command continues an interrupted sweep. Afterwards ``OUT/results.md`` and ``OUT/results.json`` hold
the tables (average and per-domain test perplexity, Δ against the baseline with its spread over seeds,
wall time, tokens/s) and ``OUT/proportions.png`` the proportions of every method over time.

Values in a method's overrides may refer to other runs of the same seed (those run first):

- ``"@run:METHOD"``: that run's directory (DoReMi's ``mixing.reference``);
- ``"@proportions:METHOD"``: that run's final proportions (a prior, or static proportions);
- ``"@skills_graph"``: a Skill-it skills graph learned once per sweep from the base config
  (``skills_graph_steps`` steps of single-domain training per domain, first seed).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import RunConfig, config_from_dict, dump_config
from .errors import AioliError, ConfigError
from .fileio import atomic_write_bytes, atomic_write_json, ensure_writable_dir
from .train.loop import build_run_mixer

SPEC_KEYS = {
    "name", "description", "corpus", "domains", "seeds", "base", "methods", "baseline",
    "skills_graph_steps", "poor_prior_note",
}  # fmt: skip
CORPUS_KEYS = {"path", "seq_len", "budget_bytes"}
RUN_OWNED_KEYS = ("data.path", "data.domains", "train.seed", "train.name", "train.out_dir")


@dataclass
class SweepSpec:
    name: str
    corpus: dict
    domains: list[str]
    seeds: list[int]
    base: dict
    methods: dict[str, dict]
    baseline: str
    description: str = ""
    skills_graph_steps: int = 40
    source: str = ""
    extra: dict = field(default_factory=dict)


def _refs(value: Any) -> list[tuple[str, str | None]]:
    """The ``@`` references inside a method's overrides: (kind, method or None)."""
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    if isinstance(value, str) and value.startswith("@"):
        kind, _, target = value[1:].partition(":")
        return [(kind, target or None)]
    return []


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec; every method's config is validated before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; a sweep spec takes {sorted(SPEC_KEYS)}")
    for key in ("corpus", "domains", "seeds", "base", "methods"):
        if key not in raw:
            raise ConfigError(f"{path}: missing {key!r}")
    corpus = dict(raw["corpus"] or {})
    bad = sorted(set(corpus) - CORPUS_KEYS)
    if bad:
        raise ConfigError(f"{path}: corpus takes {sorted(CORPUS_KEYS)}, got {bad}")
    from .corpora import DOMAINS

    domains = list(raw["domains"] or [])
    if not domains or any(d not in DOMAINS for d in domains) or len(set(domains)) != len(domains):
        raise ConfigError(f"{path}: domains must be distinct names from {list(DOMAINS)}, got {domains}")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"{path}: seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    methods = raw["methods"]
    if not isinstance(methods, dict) or not methods:
        raise ConfigError(f"{path}: methods must be a mapping name -> config overrides")
    baseline = raw.get("baseline", next(iter(methods)))
    if baseline not in methods:
        raise ConfigError(f"{path}: baseline {baseline!r} is not one of the methods {list(methods)}")
    spec = SweepSpec(
        name=str(raw.get("name") or path.stem),
        corpus=corpus,
        domains=domains,
        seeds=list(seeds),
        base=dict(raw["base"] or {}),
        methods={str(k): dict(v or {}) for k, v in methods.items()},
        baseline=baseline,
        description=str(raw.get("description") or ""),
        skills_graph_steps=int(raw.get("skills_graph_steps", 40)),
        source=str(path),
    )
    for key in RUN_OWNED_KEYS:
        section, _, name = key.partition(".")
        if name in (spec.base.get(section) or {}) or any(
            name in (m.get(section) or {}) for m in spec.methods.values()
        ):
            raise ConfigError(f"{path}: {key} is set by the sweep for every run; remove it from the spec")
    seen: list[str] = []
    for method, over in spec.methods.items():
        if not method.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{path}: method name {method!r}: use letters, digits, '_' and '-'")
        for kind, target in _refs(over):
            if kind not in ("run", "proportions", "skills_graph"):
                raise ConfigError(f"{path}: {method}: unknown reference '@{kind}'")
            if kind != "skills_graph" and target not in seen:
                raise ConfigError(
                    f"{path}: {method} refers to {target!r}, which must be a method listed before it"
                )
        seen.append(method)
        # validated with placeholders for the references, the mixer's own checks included
        cfg = run_config(spec, method, spec.seeds[0], Path("OUT"), placeholders=True)
        if any(kind in ("run", "skills_graph") for kind, _ in _refs(over)):
            continue  # a mixer given a file made by the sweep (a reference run, a graph) reads it when built
        try:
            build_run_mixer(cfg, spec.domains, torch.device("cpu"))
        except ConfigError as exc:
            raise ConfigError(f"{path}: method {method!r}: {exc}") from exc
    return spec


def corpus_dir(spec: SweepSpec, out: Path) -> Path:
    return Path(spec.corpus.get("path") or out / "corpus")


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / method / f"seed{seed}"


def _resolve(value: Any, seed: int, out: Path, placeholders: bool, domains: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, seed, out, placeholders, domains) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, seed, out, placeholders, domains) for v in value]
    if not (isinstance(value, str) and value.startswith("@")):
        return value
    kind, _, target = value[1:].partition(":")
    if kind == "skills_graph":
        return str(out / "skills_graph.json")
    if kind == "run":
        return str(run_dir(out, target, seed))
    if placeholders:
        return {d: 1.0 for d in domains}
    final = run_dir(out, target, seed) / "final.json"
    if not final.is_file():
        raise AioliError(f"@proportions:{target} needs the finished run {final.parent}")
    return json.loads(final.read_text(encoding="utf-8"))["proportions"]


def run_config(spec: SweepSpec, method: str, seed: int, out: Path, placeholders: bool = False) -> RunConfig:
    """The full training config of one run (references resolved against ``out``)."""
    data = _merge(spec.base, spec.methods[method])
    data = _resolve(data, seed, out, placeholders, spec.domains)
    data.setdefault("data", {})
    data["data"]["path"] = str(corpus_dir(spec, out) / "corpus")
    data["data"]["domains"] = list(spec.domains)
    data.setdefault("train", {})
    data["train"].update(seed=seed, name=f"seed{seed}", out_dir=str(out / "runs" / method))
    data["train"].setdefault("progress", False)
    try:
        cfg = config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"sweep method {method!r}: {exc}") from exc
    return cfg


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_done(directory: Path, cfg: RunConfig) -> bool:
    final, saved = directory / "final.json", directory / "config.yaml"
    return final.is_file() and saved.is_file() and saved.read_text(encoding="utf-8") == dump_config(cfg)


def learn_graph(spec: SweepSpec, out: Path) -> Path:
    from .train.skills import learn_skills_graph

    path = out / "skills_graph.json"
    if path.is_file():
        return path
    cfg = run_config(_graph_spec(spec), "graph", spec.seeds[0], out)
    cfg.train.out_dir = str(out / "skills")
    cfg.train.name = "graph"
    start = time.perf_counter()
    _say(f"sweep {spec.name}: learning the skills graph ({spec.skills_graph_steps} steps per domain) ...")
    with _quiet(out / "skills" / "skills_graph.log"):
        learn_skills_graph(cfg, spec.skills_graph_steps, path)
    atomic_write_json(out / "skills" / "timing.json", {"wall_s": time.perf_counter() - start})
    return path


def _graph_spec(spec: SweepSpec) -> SweepSpec:
    g = copy.copy(spec)
    g.methods = {"graph": {"mixing": {"method": "stratified"}}}
    return g


@contextlib.contextmanager
def _quiet(log: Path):
    """A run's own output (progress lines, its result table) goes to a log file, not the terminal."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as fh:
        with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            yield


def plan(spec: SweepSpec, methods: list[str] | None = None) -> list[str]:
    """The methods to run, in spec order, with the methods they refer to added."""
    if methods is None:
        return list(spec.methods)
    unknown = [m for m in methods if m not in spec.methods]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; the spec has {list(spec.methods)}")
    wanted = set(methods)
    for method in reversed(list(spec.methods)):
        if method in wanted:
            wanted.update(t for kind, t in _refs(spec.methods[method]) if t)
    if spec.baseline in spec.methods:
        wanted.add(spec.baseline)
    return [m for m in spec.methods if m in wanted]


def run_sweep(
    spec: SweepSpec,
    out: str | Path | None = None,
    *,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
) -> dict:
    """Run every (method, seed) not yet finished, then write the tables; returns the results mapping."""
    from .corpora import build_corpus
    from .train import train

    out = ensure_writable_dir(Path(out or Path("runs/sweeps") / spec.name), "sweep output folder")
    if seeds is not None:
        bad = [s for s in seeds if s not in spec.seeds]
        if bad:
            raise ConfigError(f"seed(s) {bad} are not in the spec's seeds {spec.seeds}")
        spec = copy.copy(spec)
        spec.seeds = list(seeds)
    todo_methods = plan(spec, methods)
    corpus = corpus_dir(spec, out)
    _say(f"sweep {spec.name}: corpus {corpus} (domains {', '.join(spec.domains)})")
    build_corpus(
        corpus,
        seq_len=int(spec.corpus.get("seq_len", 128)),
        budget_bytes=int(spec.corpus.get("budget_bytes", 1_500_000)),
        progress=False,
    )
    if any(k == "skills_graph" for m in todo_methods for k, _ in _refs(spec.methods[m])):
        learn_graph(spec, out)
    runs = [(m, s) for s in spec.seeds for m in todo_methods]
    failures = []
    for n, (method, seed) in enumerate(runs, start=1):
        directory = run_dir(out, method, seed)
        try:
            cfg = run_config(spec, method, seed, out)
        except AioliError as exc:
            failures.append((method, seed, str(exc)))
            _say(f"[{n}/{len(runs)}] {method} seed {seed}: cannot start: {exc}")
            continue
        if _run_done(directory, cfg):
            _say(f"[{n}/{len(runs)}] {method} seed {seed}: done before, kept")
            continue
        saved = directory / "config.yaml"
        if (directory / "final.json").is_file() or (
            saved.is_file() and saved.read_text(encoding="utf-8") != dump_config(cfg)
        ):
            _say(f"[{n}/{len(runs)}] {method} seed {seed}: the spec changed since it ran; running it again")
            cfg.train.overwrite = True
            cfg.checkpoint.resume = "never"
        _say(f"[{n}/{len(runs)}] {method} seed {seed}: training {cfg.train.steps} steps ...")
        start = time.perf_counter()
        try:
            with _quiet(directory.parent / f"seed{seed}.log"):
                result = train(cfg)
        except KeyboardInterrupt:
            _say("interrupted; the same command continues the sweep")
            raise
        except AioliError as exc:
            failures.append((method, seed, str(exc)))
            _say(f"    failed: {exc} (log: {directory.parent / f'seed{seed}.log'})")
            continue
        wall = time.perf_counter() - start
        timing = {"wall_s": wall, "finished": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        atomic_write_json(directory / "sweep_timing.json", timing)
        avg = result.final["average"]
        _say(
            f"    test ppl {avg['test_ppl']:.3f}, {result.final['tokens_per_s']:,.0f} tokens/s, "
            f"{wall:.0f} s"
        )
    results = collect_results(spec, out)
    write_results(spec, out, results)
    print(format_tables(spec, results))
    if failures:
        listed = "; ".join(f"{m} seed {s}: {e}" for m, s, e in failures)
        raise AioliError(f"{len(failures)} run(s) failed (the others are in the tables): {listed}")
    return results


# ----------------------------------------------------------------------------------------------- results


def _mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def collect_results(spec: SweepSpec, out: Path) -> dict:
    """Read every finished run of the spec under ``out`` into one mapping (also written as results.json)."""
    from .report import read_metrics

    methods: dict[str, dict] = {}
    for method in spec.methods:
        seeds = {}
        for seed in spec.seeds:
            directory = run_dir(out, method, seed)
            final_path = directory / "final.json"
            if not final_path.is_file():
                continue
            final = json.loads(final_path.read_text(encoding="utf-8"))
            timing_path = directory / "sweep_timing.json"
            timing = json.loads(timing_path.read_text(encoding="utf-8")) if timing_path.is_file() else {}
            train_records = read_metrics(directory / "metrics.jsonl", tolerate_partial_last_line=True)[0]
            seeds[seed] = {
                "test_ppl": final["average"]["test_ppl"],
                "val_ppl": final["average"]["val_ppl"],
                "test_domain_ppl": {d: v["ppl"] for d, v in final["test"]["domains"].items()},
                "proportions": final["proportions"],
                "tokens_per_s": final["tokens_per_s"],
                "train_time_s": final["train_time_s"],
                "wall_s": timing.get("wall_s"),
                "tokens": final["tokens"],
                "measurement_time_s": final.get("mixer", {}).get("measurement_time_s", 0.0),
                "mixer": final.get("mixer", {}),
                "history": [
                    {"step": r["step"], "proportions": r["proportions"]}
                    for r in train_records
                    if r.get("proportions")
                ],
            }
        if seeds:
            methods[method] = {"seeds": seeds}
    base = methods.get(spec.baseline, {}).get("seeds", {})
    for entry in methods.values():
        seeds = entry["seeds"]
        deltas = [seeds[s]["test_ppl"] - base[s]["test_ppl"] for s in seeds if s in base]
        entry["summary"] = {
            "seeds": sorted(seeds),
            "test_ppl": _mean_sd([v["test_ppl"] for v in seeds.values()]),
            "val_ppl": _mean_sd([v["val_ppl"] for v in seeds.values()]),
            "delta_test_ppl": _mean_sd(deltas),
            "better_than_baseline": sum(d < 0 for d in deltas),
            "paired_seeds": len(deltas),
            "test_domain_ppl": {
                d: _mean_sd([v["test_domain_ppl"][d] for v in seeds.values()]) for d in spec.domains
            },
            "proportions": {
                d: statistics.fmean(v["proportions"][d] for v in seeds.values()) for d in spec.domains
            },
            "wall_s": _mean_sd([v["wall_s"] for v in seeds.values() if v["wall_s"] is not None]),
            "tokens_per_s": _mean_sd([v["tokens_per_s"] for v in seeds.values()]),
            "measurement_time_s": _mean_sd([v["measurement_time_s"] for v in seeds.values()]),
        }
    graph_timing = out / "skills" / "timing.json"
    return {
        "spec": spec.name,
        "description": spec.description,
        "domains": spec.domains,
        "baseline": spec.baseline,
        "seeds": spec.seeds,
        "skills_graph_wall_s": (
            json.loads(graph_timing.read_text())["wall_s"] if graph_timing.is_file() else None
        ),
        "environment": environment(),
        "methods": methods,
    }


def environment() -> dict:
    versions = {"python": platform.python_version()}
    for dist in ("torch", "deepspeed", "triton", "numpy", "aioli_fast"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    import os

    import torch

    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions,
    }


def _pm(mean_sd: tuple[float, float], fmt: str = ".3f", signed: bool = False) -> str:
    mean, sd = mean_sd
    if math.isnan(mean):
        return "-"
    return f"{mean:{'+' if signed else ''}{fmt}} ± {sd:{fmt}}"


def format_tables(spec: SweepSpec, results: dict) -> str:
    """The Markdown tables of one setting: summary, per-domain test perplexity, final proportions."""
    methods = results["methods"]
    n = len(results["seeds"])
    lines = [
        f"### {spec.name}: {', '.join(spec.domains)}",
        "",
        f"Test perplexity averaged over the {len(spec.domains)} domains (mean ± sd over {n} seeds); "
        f"Δ is paired by seed against `{spec.baseline}` (negative is better); wall time is the whole "
        "run (start-up, training, measurements, evaluation) and tokens/s the training rate.",
        "",
        "| method | avg test ppl | Δ vs " + spec.baseline + " | better | avg val ppl | wall s | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, entry in methods.items():
        s = entry["summary"]
        better = f"{s['better_than_baseline']}/{s['paired_seeds']}" if method != spec.baseline else ""
        delta = _pm(s["delta_test_ppl"], signed=True) if method != spec.baseline else ""
        lines.append(
            f"| {method} | {_pm(s['test_ppl'])} | {delta} | {better} | {_pm(s['val_ppl'])} | "
            f"{s['wall_s'][0]:.0f} | {s['tokens_per_s'][0]:,.0f} |"
        )
    lines += [
        "",
        "Per-domain test perplexity (mean over seeds):",
        "",
        "| method | " + " | ".join(spec.domains) + " |",
        "|---|" + "---:|" * len(spec.domains),
    ]
    for method, entry in methods.items():
        per = entry["summary"]["test_domain_ppl"]
        lines.append(f"| {method} | " + " | ".join(f"{per[d][0]:.3f}" for d in spec.domains) + " |")
    lines += [
        "",
        "Final proportions (mean over seeds):",
        "",
        "| method | " + " | ".join(spec.domains) + " |",
        "|---|" + "---:|" * len(spec.domains),
    ]
    for method, entry in methods.items():
        p = entry["summary"]["proportions"]
        lines.append(f"| {method} | " + " | ".join(f"{p[d]:.3f}" for d in spec.domains) + " |")
    if results.get("skills_graph_wall_s") is not None:
        lines += ["", f"The skills graph for Skill-it took {results['skills_graph_wall_s']:.0f} s once."]
    return "\n".join(lines)


def plot_proportions(spec: SweepSpec, results: dict) -> bytes | None:
    """One panel per method whose proportions move: per domain the mean over seeds, their range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moving = []
    for method, entry in results["methods"].items():
        histories = [v["history"] for v in entry["seeds"].values() if v["history"]]
        values = [r["proportions"][d] for h in histories for r in h for d in spec.domains]
        if values and max(values) - min(values) > 1e-6:
            moving.append((method, histories))
    if not moving:
        return None
    cols = min(3, len(moving))
    rows = math.ceil(len(moving) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.2 * rows), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, (method, histories) in zip(axes.flat, moving):
        length = min(len(h) for h in histories)
        steps = [r["step"] for r in histories[0][:length]]
        for i, d in enumerate(spec.domains):
            per_seed = [[h[t]["proportions"][d] for t in range(length)] for h in histories]
            mean = [statistics.fmean(col) for col in zip(*per_seed)]
            ax.plot(steps, mean, color=colors(i % 10), label=d, linewidth=1.4)
            if len(per_seed) > 1:
                lo = [min(col) for col in zip(*per_seed)]
                hi = [max(col) for col in zip(*per_seed)]
                ax.fill_between(steps, lo, hi, color=colors(i % 10), alpha=0.18, linewidth=0)
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("proportion")
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(moving) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{spec.name}: proportions over training (mean over seeds, range shaded)", fontsize=10)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_results(spec: SweepSpec, out: Path, results: dict) -> None:
    atomic_write_json(out / "results.json", results)
    env = results["environment"]
    header = [
        f"# Sweep {spec.name}",
        "",
        spec.description.strip(),
        "",
        f"{env['date']}; {env['machine']}; torch threads {env['torch_threads']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + f"; spec {spec.source}.",
        "",
    ]
    body = format_tables(spec, results)
    png = plot_proportions(spec, results)
    if png is not None:
        atomic_write_bytes(out / "proportions.png", png)
        body += "\n\n![proportions over training](proportions.png)\n"
    atomic_write_bytes(out / "results.md", ("\n".join(header) + body + "\n").encode("utf-8"))
