"""``aioli-fast demo``: the embedded default, from raw text to per-domain test perplexity.

It builds a small multi-domain corpus from material any Python installation carries, so nothing is
downloaded:

- ``python_code``: source files of the standard library (sorted, up to a byte budget);
- ``language_reference``: the language-reference and help topics Python ships (``pydoc_data``), or the
  module docstrings of the standard library where that module is missing;
- ``licenses``: license texts of Python and of the installed packages (deduplicated);
- ``noise``: synthetic, uniformly random lowercase letters. Its loss cannot drop below ln(26) = 3.26 nats
  per byte whatever the model learns, so training on it is wasted: a good mixer should down-weight it.

It then prepares the corpus (byte-level tokenizer), trains the same tiny model on the CPU twice, with the
same seed and steps: with stratified proportions and with Aioli's defaults, which learn them online from
the training batches (no extra forward passes), and prints the two side by side:
per-domain validation and test loss and perplexity, the difference, the proportions Aioli learned over
the run, and the time each run took.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

from ..config import config_from_dict
from ..data import prepare
from ..errors import AioliError
from ..fileio import atomic_write_bytes, ensure_writable_dir, say
from ..report import read_metrics
from .sources import license_files, noise_documents, python_code_files, reference_documents

DEMO_SEQ_LEN = 128

# The stratified run the demo trains; configs/demo.yaml holds the same settings for `aioli-fast train`.
DEMO_CONFIG = {
    "model": {"preset": "mini"},
    "data": {"path": "runs/demo/corpus"},
    "mixing": {"method": "stratified"},
    "optim": {"lr": 3.0e-3, "warmup_steps": 30, "min_lr_ratio": 0.1, "weight_decay": 0.1, "grad_clip": 1.0},
    "train": {
        "steps": 300,
        "batch_size": 16,
        "seed": 0,
        "log_every": 10,
        "out_dir": "runs/demo",
        "name": "stratified",
    },
    "eval": {"batch_size": 32, "max_sequences": 256},
}

# The Aioli run: DEMO_CONFIG with this mixing section and train.name "aioli" (configs/demo-aioli.yaml):
# Aioli with nothing set, as a user would start (its defaults: docs/mixing.md).
DEMO_AIOLI_MIXING = {"method": "aioli"}

DEMO_METHODS = ("stratified", "aioli")


def demo_config(method: str = "stratified") -> dict:
    """The config dict of the demo's run of ``method`` (a fresh copy)."""
    if method not in DEMO_METHODS:
        raise AioliError(f"demo method must be one of {', '.join(DEMO_METHODS)}, got {method!r}")
    cfg = json.loads(json.dumps(DEMO_CONFIG))
    if method == "aioli":
        cfg["mixing"] = dict(DEMO_AIOLI_MIXING)
    cfg["train"]["name"] = method
    return cfg


def _write_jsonl(path: Path, docs: list[str]) -> None:
    atomic_write_bytes(path, "".join(json.dumps({"text": d}) + "\n" for d in docs).encode("utf-8"))


def build_demo_sources(raw_dir: Path, scale: float = 1.0) -> dict[str, list[str]]:
    """Collect the demo's four domains; returns domain -> input paths for :func:`prepare`."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    kb = int(1024 * scale)
    code = python_code_files(900 * kb)
    reference = reference_documents(450 * kb)
    licenses = license_files(450 * kb)
    noise = noise_documents(max(8, int(150 * scale)), 2000)
    missing = [
        name
        for name, found in (("python_code", code), ("language_reference", reference), ("licenses", licenses))
        if not found
    ]
    if missing:
        raise AioliError(f"demo: found no material on this machine for domain(s) {missing}")
    _write_jsonl(raw_dir / "language_reference.jsonl", reference)
    _write_jsonl(raw_dir / "noise.jsonl", noise)
    return {
        "python_code": [str(p) for p in code],
        "language_reference": [str(raw_dir / "language_reference.jsonl")],
        "licenses": [str(p) for p in licenses],
        "noise": [str(raw_dir / "noise.jsonl")],
    }


def run_demo(
    out_dir: str | Path = "runs/demo",
    *,
    steps: int | None = None,
    scale: float = 1.0,
    overrides: list[str] | None = None,
    methods: list[str] | tuple[str, ...] = DEMO_METHODS,
) -> dict[str, dict]:
    """Build, prepare, train each method and evaluate; prints the comparison, returns method -> final.json.

    Every run has the same model, seed, batch and steps; ``overrides`` apply to every run.
    """
    import torch

    from ..train import build_run_mixer, train  # the demo sits above the training package

    if not scale > 0:
        raise AioliError(f"demo scale must be > 0, got {scale}")
    unknown = [m for m in methods if m not in DEMO_METHODS]
    if unknown or not methods:
        raise AioliError(f"demo methods must be some of {', '.join(DEMO_METHODS)}, got {list(methods)}")
    methods = [m for m in DEMO_METHODS if m in methods]  # stratified first: the baseline of the Δ
    configs = {}
    for method in methods:  # every config is checked before the corpus is built
        cfg_dict = demo_config(method)
        cfg_dict["data"]["path"] = str(Path(out_dir) / "corpus")
        cfg_dict["train"]["out_dir"] = str(out_dir)
        cfg_dict["train"]["overwrite"] = True
        if steps is not None:
            cfg_dict["train"]["steps"] = steps
        configs[method] = config_from_dict(cfg_dict, overrides)

    start = time.perf_counter()
    total = 2 + len(methods)
    out = ensure_writable_dir(Path(out_dir), "demo output directory")
    say(f"[1/{total}] collecting the demo corpus under {out / 'raw'} ...")
    sources = build_demo_sources(out / "raw", scale=scale)
    say(f"[2/{total}] preparing {len(sources)} domains (byte-level tokens, seq_len {DEMO_SEQ_LEN}) ...")
    prepare(
        sources,
        out / "corpus",
        seq_len=DEMO_SEQ_LEN,
        tokenizer="byte",
        val_fraction=0.1,
        test_fraction=0.1,
        overwrite=True,
    )
    finals, histories, run_dirs = {}, {}, {}
    for n, (method, cfg) in enumerate(configs.items(), start=3):
        t = cfg.train
        how = {
            "stratified": "stratified proportions",
            "aioli": f"Aioli (mixing.measurement={cfg.mixing.option('measurement') or 'round'})",
        }[method]
        size = f"{t.steps} steps x {t.batch_size} x {DEMO_SEQ_LEN} tokens"
        say(f"[{n}/{total}] training with {how}: {size} ...")
        with contextlib.redirect_stdout(sys.stderr):  # the run's own table: the comparison is printed below
            result = train(cfg)
        finals[method], run_dirs[method] = result.final, result.run_dir
        histories[method] = read_metrics(result.run_dir / "metrics.jsonl")[0]  # the training records
    print(format_comparison(finals))
    if "aioli" in finals:
        cfg, rounds = configs["aioli"], []
        if cfg.mixing.method == "aioli":  # overrides may change it
            mixer = build_run_mixer(cfg, finals["aioli"]["domains"], torch.device("cpu"))
            rounds = mixer.exploit_spans(cfg.train.steps)  # the steps on each round's learned proportions
        print()
        print(format_proportions(finals["aioli"], histories["aioli"], rounds))
    print()
    print(format_timing(finals, run_dirs))
    elapsed = time.perf_counter() - start
    where = ", ".join(str(run_dirs[m] / "final.json") for m in finals)
    print(f"demo finished in {elapsed:.0f} s; results in {where}", flush=True)
    return finals


def _delta() -> str:
    """The Greek capital delta where stdout can print it, else 'd'."""
    try:
        "\u0394".encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "d"
    return "\u0394"


def format_comparison(finals: dict[str, dict]) -> str:
    """Per-domain val/test loss and perplexity of each run side by side; the Δ of each against the first."""
    methods = list(finals)
    first = finals[methods[0]]
    domains = list(first["domains"])
    splits = [s for s in ("val", "test") if s in first]
    width = max(12, *(len(d) for d in domains))
    deltas, delta = methods[1:], _delta()
    groups = [(m, m) for m in methods] + [(f"{delta} {m}", m) for m in deltas]
    head1 = (f"{'':<{width}}  {'':<5}" + "".join(f"  {title:^17}" for title, _ in groups)).rstrip()
    head2 = f"{'domain':<{width}}  {'split':<5}" + "".join(f"  {'loss':>8} {'ppl':>8}" for _ in groups)
    rule = "-" * len(head2)
    lines = [head1, head2, rule]

    def row(final: dict, split: str, name: str) -> dict:
        res = final[split]
        return res["average"] if name == "average" else res["domains"][name]

    for name in [*domains, "average"]:
        if name == "average":
            lines.append(rule)
        for i, split in enumerate(splits):
            line = f"{(name if i == 0 else ''):<{width}}  {split:<5}"
            for m in methods:
                r = row(finals[m], split, name)
                line += f"  {r['loss']:>8.4f} {r['ppl']:>8.3f}"
            for m in deltas:
                r, b = row(finals[m], split, name), row(first, split, name)
                line += f"  {r['loss'] - b['loss']:>+8.4f} {r['ppl'] - b['ppl']:>+8.3f}"
            lines.append(line)
    lines.append("loss: mean nats per token; ppl: exp(loss); average: over the domains")
    for m in deltas:
        lines.append(f"{delta} {m} = {m} - {methods[0]} (negative: {m} is better)")
    return "\n".join(lines)


def format_proportions(final: dict, history: list[dict], rounds: list[tuple[int, int]]) -> str:
    """The proportions Aioli trained on at the end of each round (from metrics.jsonl) and at the end."""
    domains = list(final["domains"])
    widths = [max(6, len(d)) for d in domains]

    def row(label: str, p: dict) -> str:
        return f"{label:<11}" + "".join(f"  {p[d]:>{w}.3f}" for d, w in zip(domains, widths))

    lines = [
        f"proportions Aioli learned (stratified: {1 / len(domains):.3g} each)",
        f"{'steps':<11}" + "".join(f"  {d:>{w}}" for d, w in zip(domains, widths)),
    ]
    by_step = {r["step"]: r["proportions"] for r in history if "step" in r and "proportions" in r}
    for first, last in rounds:
        # a record at step s shows the proportions of step s - 1, the last it trained
        logged = [s for s in by_step if first <= s - 1 <= last]
        if not logged:
            continue
        lines.append(row(f"{first}-{last}", by_step[max(logged)]))
    lines.append(row("final", final["proportions"]))
    start = by_step[min(by_step)] if by_step else dict.fromkeys(domains, 1 / len(domains))
    lowered = [d for d in domains if final["proportions"][d] < 0.9 * start[d]]
    if lowered:
        moves = ", ".join(f"{d} from {start[d]:.3f} to {final['proportions'][d]:.3f}" for d in lowered)
        lines.append(
            f"Aioli lowered {moves}: its loss fell by much less per step of its data than the others'"
        )
    else:
        lines.append(
            "Aioli lowered no domain: every domain's loss fell at a comparable rate per step of its data"
        )
    mixer = final.get("mixer", {})
    if "missing_measurements" in mixer:
        lines.append(
            f"(exploit phase of each round; {mixer.get('measurements', 0)} extra evaluations, "
            f"{mixer['missing_measurements']:.0f} domain measurements missing, "
            f"{mixer.get('skipped_updates', 0):.0f} updates skipped)"
        )
    return "\n".join(lines)


def format_timing(finals: dict[str, dict], run_dirs: dict[str, Path]) -> str:
    """Training time and throughput of each run."""
    lines = [f"{'method':<12}  {'train time':>10}  {'tokens/s':>10}  {'tokens':>10}  run directory"]
    for m, final in finals.items():
        rate = final.get("tokens_per_s") or 0
        lines.append(
            f"{m:<12}  {final['train_time_s']:>8.0f} s  {rate:>10,.0f}  {final['tokens']:>10,}  {run_dirs[m]}"
        )
    return "\n".join(lines)
