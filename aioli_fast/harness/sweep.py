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
import hashlib
import json
import os
import platform
import shutil
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import RunConfig, config_from_dict, dump_config, merge_mappings, read_yaml_mapping
from ..data import load_manifest
from ..data.remote import is_url
from ..errors import AioliError, ConfigError, DataError
from ..fileio import atomic_write_bytes, atomic_write_json, ensure_writable_dir, say
from ..report import ProportionPanel, plot_proportions, read_metrics
from ..train import TrainingInterrupted, build_run_mixer

SPEC_KEYS = {
    "name", "description", "corpus", "domains", "seeds", "base", "methods", "baseline", "skills_graph_steps",
}  # fmt: skip
CORPUS_KEYS = {"path", "seq_len", "budget_bytes", "domains", "prepared"}
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


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec; every method's config is validated before anything runs."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep spec")
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
    domains = list(raw["domains"] or [])
    if "prepared" in corpus:  # a corpus the user prepared: used as it is, any subset of its domains
        if set(corpus) != {"prepared"}:
            raise ConfigError(f"{path}: corpus.prepared takes no other corpus key, got {sorted(corpus)}")
        try:  # a folder or a URL (s3://..., read through the cache)
            known = list(load_manifest(str(corpus["prepared"])).domains)
        except DataError as exc:
            raise ConfigError(f"{path}: corpus.prepared: {exc} (prepare the corpus first)") from None
    else:  # the built-in corpus: corpus.domains names its domains (a set of corpora.CORPUS_SETS, or a list)
        from .corpora import corpus_domains

        value = corpus.get("domains")
        if value is not None and not isinstance(value, (str, list)):
            raise ConfigError(f"{path}: corpus.domains must be a set name or a list of domains, got {value}")
        try:
            known = corpus_domains(value)
        except AioliError as exc:
            raise ConfigError(f"{path}: corpus.domains: {exc}") from exc
    if not domains or any(d not in known for d in domains) or len(set(domains)) != len(domains):
        raise ConfigError(f"{path}: domains must be distinct names from {known}, got {domains}")
    seeds = raw["seeds"]
    if (
        not isinstance(seeds, list)
        or not seeds
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ConfigError(f"{path}: seeds must be a non-empty list of distinct integers >= 0, got {seeds!r}")
    for key, low in (("seq_len", 2), ("budget_bytes", 10_000)):
        value = corpus.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ConfigError(f"{path}: corpus.{key} must be an integer >= {low}, got {value!r}")
    graph_steps = raw.get("skills_graph_steps", 40)
    if isinstance(graph_steps, bool) or not isinstance(graph_steps, int) or graph_steps < 1:
        raise ConfigError(f"{path}: skills_graph_steps must be an integer >= 1, got {graph_steps!r}")
    methods = raw["methods"]
    if not isinstance(methods, dict) or not methods:
        raise ConfigError(f"{path}: methods must be a mapping name -> config overrides")
    if not isinstance(raw["base"] or {}, dict):
        raise ConfigError(f"{path}: base must be a mapping (a training config)")
    for method, over in methods.items():
        if over is not None and not isinstance(over, dict):
            raise ConfigError(f"{path}: method {method!r}: expected a mapping of config overrides")
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
        skills_graph_steps=graph_steps,
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
            mixer = build_run_mixer(cfg, spec.domains, torch.device("cpu"))
        except ConfigError as exc:
            raise ConfigError(f"{path}: method {method!r}: {exc}") from exc
        if cfg.mixing.method == "aioli" and mixer.in_learn_params(cfg.train.steps - 1):
            raise ConfigError(
                f"{path}: method {method!r}: the last step ({cfg.train.steps}) falls inside LearnParams, "
                "so the run would end on a block mixture instead of the learned proportions; change "
                "train.steps or mixing.round_steps"
            )
    return spec


def corpus_dir(spec: SweepSpec, out: Path) -> Path:
    """Where the built-in corpus is built (its prepared corpus is ``corpus_dir / "corpus"``)."""
    return Path(spec.corpus.get("path") or out / "corpus")


def prepared_corpus(spec: SweepSpec, out: Path) -> Path | str:
    """The prepared corpus the runs train on: ``corpus.prepared`` (a folder, or a URL kept as a
    string), else the built-in one."""
    prepared = spec.corpus.get("prepared")
    if prepared and is_url(str(prepared)):
        return str(prepared)
    return Path(str(prepared)) if prepared else corpus_dir(spec, out) / "corpus"


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
    data = merge_mappings(spec.base, spec.methods[method])
    data = _resolve(data, seed, out, placeholders, spec.domains)
    data.setdefault("data", {})
    data["data"]["path"] = str(prepared_corpus(spec, out))
    data["data"]["domains"] = list(spec.domains)
    data.setdefault("train", {})
    data["train"].update(seed=seed, name=f"seed{seed}", out_dir=str(out / "runs" / method))
    data["train"].setdefault("progress", False)
    try:
        cfg = config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"sweep method {method!r}: {exc}") from exc
    return cfg


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def inputs_stamp(spec: SweepSpec, method: str, seed: int, out: Path) -> dict:
    """What a run's result depends on besides its config: the corpus domains it reads (their shards'
    hashes) and the files it refers to (another run's final.json, the skills graph)."""
    try:
        manifest = load_manifest(prepared_corpus(spec, out)).raw
    except DataError:
        manifest = {}
    entries = {e["name"]: e for e in manifest.get("domains", [])}
    shards = [
        [shard["sha256"] for split in entries[d]["splits"].values() for shard in split["shards"]]
        if d in entries
        else None
        for d in spec.domains
    ]
    corpus = json.dumps({"seq_len": manifest.get("seq_len"), "shards": shards}, sort_keys=True)
    references = {}
    for kind, target in _refs(spec.methods[method]):
        if kind == "skills_graph":
            path = out / "skills_graph.json"
        else:
            path = run_dir(out, target, seed) / "final.json"
        references[f"@{kind}" + (f":{target}" if target else "")] = (
            _sha256(path.read_bytes()) if path.is_file() else None
        )
    return {"corpus": _sha256(corpus.encode("utf-8")), "references": references}


def _run_done(directory: Path, cfg: RunConfig, stamp: dict) -> bool:
    """A finished run made from this config and these inputs (``sweep_run.json`` records both)."""
    record = directory / "sweep_run.json"
    if not ((directory / "final.json").is_file() and record.is_file()):
        return False
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return _same_config(saved.get("config"), cfg) and saved.get("inputs") == stamp


def _same_config(text: Any, cfg: RunConfig) -> bool:
    """Whether ``text`` (a dumped config) holds the same keys and values as ``cfg``, in any order."""
    try:
        return isinstance(text, str) and yaml.safe_load(text) == cfg.to_dict()
    except yaml.YAMLError:
        return False


def learn_graph(spec: SweepSpec, out: Path) -> Path:
    from ..train.skills import learn_skills_graph

    path = out / "skills_graph.json"
    cfg = run_config(_graph_spec(spec), "graph", spec.seeds[0], out)
    cfg.train.out_dir = str(out / "skills")
    cfg.train.name = "graph"
    record = out / "skills" / "graph_inputs.json"
    made_from = {
        "config": dump_config(cfg),
        "steps": spec.skills_graph_steps,
        "corpus": inputs_stamp(_graph_spec(spec), "graph", spec.seeds[0], out)["corpus"],
    }
    if path.is_file() and record.is_file() and json.loads(record.read_text(encoding="utf-8")) == made_from:
        return path
    start = time.perf_counter()
    say(f"sweep {spec.name}: learning the skills graph ({spec.skills_graph_steps} steps per domain) ...")
    with _quiet(out / "skills" / "skills_graph.log"):
        learn_skills_graph(cfg, spec.skills_graph_steps, path)
    atomic_write_json(out / "skills" / "timing.json", {"wall_s": time.perf_counter() - start})
    atomic_write_json(record, made_from)
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
    from ..train import train
    from .corpora import build_corpus

    out = ensure_writable_dir(Path(out or Path("runs/sweeps") / spec.name), "sweep output folder")
    full = spec  # the tables cover every seed of the spec, whatever subset this call runs
    if seeds is not None:
        bad = [s for s in seeds if s not in spec.seeds]
        if bad or not seeds:
            raise ConfigError(f"seed(s) {bad or seeds} are not in the spec's seeds {spec.seeds}")
        spec = copy.copy(spec)
        spec.seeds = [s for s in full.seeds if s in seeds]
    todo_methods = plan(spec, methods)
    corpus = prepared_corpus(spec, out)
    say(f"sweep {spec.name}: corpus {corpus} (domains {', '.join(spec.domains)})")
    if not spec.corpus.get("prepared"):
        build_corpus(
            corpus_dir(spec, out),
            spec.corpus.get("domains"),
            seq_len=int(spec.corpus.get("seq_len", 128)),
            budget_bytes=int(spec.corpus.get("budget_bytes", 1_500_000)),
            progress=False,
        )
    if any(k == "skills_graph" for m in todo_methods for k, _ in _refs(spec.methods[m])):
        learn_graph(full, out)
    runs = [(m, s) for s in spec.seeds for m in todo_methods]
    failures = []
    for n, (method, seed) in enumerate(runs, start=1):
        head = f"[{n}/{len(runs)}] {method} seed {seed}"
        directory = run_dir(out, method, seed)
        log = directory.parent / f"seed{seed}.log"
        try:
            cfg = run_config(spec, method, seed, out)
            stamp = inputs_stamp(spec, method, seed, out)
        except AioliError as exc:
            failures.append((method, seed, str(exc)))
            say(f"{head}: cannot start: {exc}")
            continue
        if _run_done(directory, cfg, stamp):
            say(f"{head}: done before, kept")
            continue
        saved = directory / "config.yaml"
        if (directory / "final.json").is_file() or (
            saved.is_file() and not _same_config(saved.read_text(encoding="utf-8"), cfg)
        ):
            # finished from another config or other inputs, or begun from another config: start afresh
            say(f"{head}: the spec or its inputs changed since it ran; running it again")
            shutil.rmtree(directory)
        say(f"{head}: training {cfg.train.steps} steps ...")
        start = time.perf_counter()
        try:
            with _quiet(log):
                result = train(cfg)
        except (KeyboardInterrupt, TrainingInterrupted):
            say("stopped; the same command continues the sweep (a run resumes from its last checkpoint)")
            raise
        except Exception as exc:  # one run's failure must not lose the others: record it, go on
            with open(log, "a", encoding="utf-8") as fh:
                traceback.print_exc(file=fh)
            failures.append((method, seed, f"{type(exc).__name__}: {exc}"))
            say(f"    failed: {type(exc).__name__}: {exc} (traceback in {log})")
            continue
        wall = time.perf_counter() - start
        record = {
            "config": dump_config(cfg),
            "inputs": stamp,
            "wall_s": wall,
            "resumed_from_step": result.final.get("resumed_from_step"),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        atomic_write_json(directory / "sweep_run.json", record)
        avg = result.final["average"]
        say(f"    test ppl {avg['test_ppl']:.3f}, {result.final['tokens_per_s']:,.0f} tokens/s, {wall:.0f} s")
    results = collect_results(full, out)
    write_results(full, out, results)
    print(format_tables(full, results))
    if failures:
        listed = "; ".join(f"{m} seed {s}: {e}" for m, s, e in failures)
        raise AioliError(f"{len(failures)} run(s) failed (the others are in the tables): {listed}")
    return results


# ----------------------------------------------------------------------------------------------- results


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation; None where there are too few values (JSON has no NaN)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def collect_results(spec: SweepSpec, out: Path) -> dict:
    """Read every finished run of the spec under ``out`` into one mapping (also written as results.json)."""
    methods: dict[str, dict] = {}
    stale = []
    for method in spec.methods:
        seeds = {}
        for seed in spec.seeds:
            directory = run_dir(out, method, seed)
            final_path = directory / "final.json"
            if not final_path.is_file():
                continue
            try:
                cfg = run_config(spec, method, seed, out)
                current = _run_done(directory, cfg, inputs_stamp(spec, method, seed, out))
            except AioliError:
                current = False
            if not current:  # made from another config or other inputs than the spec gives now
                stale.append(f"{method} seed {seed}")
                continue
            final = json.loads(final_path.read_text(encoding="utf-8"))
            timing = json.loads((directory / "sweep_run.json").read_text(encoding="utf-8"))
            train_records = read_metrics(directory / "metrics.jsonl", tolerate_partial_last_line=True)[0]
            # Aioli's LearnParams steps (block mixtures, the closing train measurement), from the mixer;
            # partial blocks (learn_fraction < 1) stay within that fraction of p and fill the rounds, so
            # they are kept: leaving them out would leave one point a round
            mixer = (
                build_run_mixer(cfg, spec.domains, torch.device("cpu"))
                if cfg.mixing.method == "aioli"
                else None
            )
            whole_blocks = mixer is not None and mixer.plan.learn_fraction == 1
            in_learn_params = mixer.in_learn_params if whole_blocks else lambda step: False
            seeds[seed] = {
                "test_ppl": final["average"]["test_ppl"],
                "val_ppl": final["average"]["val_ppl"],
                "test_domain_ppl": {d: v["ppl"] for d, v in final["test"]["domains"].items()},
                "proportions": final["proportions"],
                "tokens_per_s": final["tokens_per_s"],
                "train_time_s": final["train_time_s"],
                "wall_s": timing.get("wall_s"),
                "resumed_from_step": timing.get("resumed_from_step"),
                "tokens": final["tokens"],
                "measurement_time_s": final.get("mixer", {}).get("measurement_time_s", 0.0),
                "mixer": final.get("mixer", {}),
                # Aioli's proportions: records of LearnParams steps (block mixtures) left out
                "history": [
                    {"step": r["step"], "proportions": r["proportions"]}
                    for r in train_records
                    if r.get("proportions") and not in_learn_params(r["step"] - 1)
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
            "resumed": sorted(s for s, v in seeds.items() if v["resumed_from_step"] is not None),
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
            # times: the median over seeds, which one run slowed by another job does not move
            "wall_s": _median([v["wall_s"] for v in seeds.values() if v["wall_s"] is not None]),
            "tokens_per_s": _median([v["tokens_per_s"] for v in seeds.values()]),
            "measurement_time_s": _median([v["measurement_time_s"] for v in seeds.values()]),
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
        "environment": environment((spec.base.get("train") or {}).get("threads")),
        "stale_runs": stale,
        "methods": methods,
    }


def environment(threads: int | None = None) -> dict:
    """Date, machine, versions, and the CPU threads of each run (``train.threads`` of the spec's base, else
    what a run would take by default here)."""
    from ..train.components import cpu_threads
    from .corpora import installed_versions

    versions = installed_versions(("torch", "deepspeed", "triton", "numpy", "aioli_fast"))
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "torch_threads": cpu_threads(threads),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions,
    }


def _pm(mean_sd: tuple[float | None, float | None], fmt: str = ".3f", signed: bool = False) -> str:
    mean, sd = mean_sd
    if mean is None:
        return "–"
    text = f"{mean:{'+' if signed else ''}{fmt}}"
    return text if sd is None else f"{text} ± {sd:{fmt}}"


def _domain_table(title: str, domains: list[str], rows: dict[str, dict]) -> list[str]:
    """A method x domain table of values (``None`` printed as –)."""
    lines = ["", title, "", "| method | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    for method, values in rows.items():
        lines.append(f"| {method} | " + " | ".join(_pm((values[d], None)) for d in domains) + " |")
    return lines


def format_tables(spec: SweepSpec, results: dict) -> str:
    """The Markdown tables of one setting: summary, per-domain test perplexity, final proportions."""
    methods = results["methods"]
    n = len(results["seeds"])
    lines = [
        f"### {spec.name}: {', '.join(spec.domains)}",
        "",
        f"Test perplexity averaged over the {len(spec.domains)} domains (mean ± sd over the n seeds of "
        f"the spec's {n} that finished); Δ is paired by seed against `{spec.baseline}` (negative is "
        "better); wall time is the whole run (start-up, training, measurements, evaluation) and "
        "tokens/s the training rate, measurements included; meas. s is the time the mixer's loss "
        "measurements took (times are medians over seeds).",
        "",
        f"| method | n | avg test ppl | Δ vs {spec.baseline} | better | avg val ppl | wall s | meas. s | "
        "tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    resumed = False
    for method, entry in methods.items():
        s = entry["summary"]
        better = f"{s['better_than_baseline']}/{s['paired_seeds']}" if method != spec.baseline else ""
        delta = _pm(s["delta_test_ppl"], signed=True) if method != spec.baseline else ""
        wall = "–" if s["wall_s"] is None else f"{s['wall_s']:.0f}" + ("†" if s["resumed"] else "")
        resumed = resumed or bool(s["resumed"])
        lines.append(
            f"| {method} | {len(s['seeds'])} | {_pm(s['test_ppl'])} | {delta} | {better} | "
            f"{_pm(s['val_ppl'])} | {wall} | {s['measurement_time_s']:.1f} | {s['tokens_per_s']:,.0f} |"
        )
    if resumed:
        lines += ["", "† some runs were resumed: their wall time and tokens/s are those of the last launch."]
    if results.get("stale_runs"):
        lines += [
            "",
            "Left out (made from another config or other inputs than the spec gives now; the sweep runs "
            "them again): " + ", ".join(results["stale_runs"]) + ".",
        ]
    lines += _domain_table(
        "Per-domain test perplexity (mean over seeds):",
        spec.domains,
        {m: {d: v[0] for d, v in e["summary"]["test_domain_ppl"].items()} for m, e in methods.items()},
    )
    lines += _domain_table(
        "Final proportions (mean over seeds):",
        spec.domains,
        {m: e["summary"]["proportions"] for m, e in methods.items()},
    )
    if results.get("skills_graph_wall_s") is not None:
        lines += ["", f"The skills graph for Skill-it took {results['skills_graph_wall_s']:.0f} s once."]
    return "\n".join(lines)


def proportion_panels(spec: SweepSpec, results: dict) -> list[ProportionPanel]:
    """One panel per method whose proportions move: per domain the mean over seeds, their range as band."""
    panels = []
    for method, entry in results["methods"].items():
        histories = [v["history"] for v in entry["seeds"].values() if v["history"]]
        spans = [
            max(r["proportions"][d] for r in h) - min(r["proportions"][d] for r in h)
            for h in histories
            for d in spec.domains
        ]
        if not spans or max(spans) <= 1e-6:
            continue
        length = min(len(h) for h in histories)
        panel = ProportionPanel(method, [r["step"] for r in histories[0][:length]], {})
        for d in spec.domains:
            per_step = list(zip(*([h[t]["proportions"][d] for t in range(length)] for h in histories)))
            panel.values[d] = [statistics.fmean(col) for col in per_step]
            if len(histories) > 1:
                panel.band[d] = ([min(col) for col in per_step], [max(col) for col in per_step])
        panels.append(panel)
    return panels


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
    panels = proportion_panels(spec, results)
    if panels:
        title = (
            f"{spec.name}: proportions over training (mean over seeds, range shaded; Aioli: whole-batch "
            "LearnParams blocks left out)"
        )
        png = plot_proportions(panels, spec.domains, stacked=False, title=title)
        atomic_write_bytes(out / "proportions.png", png)
        body += "\n\n![proportions over training](proportions.png)\n"
    atomic_write_bytes(out / "results.md", ("\n".join(header) + body + "\n").encode("utf-8"))
