"""The ``aioli-fast`` command: prepare, verify, train, eval, report, skills-graph, corpus, sweep, demo.

Every user error (bad config, missing data, unwritable folder) ends with one line naming the problem
and exit status 2; nothing half-written is left looking complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import AioliError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def parse_domains(specs: list[str]) -> dict[str, list[str]]:
    """``NAME=PATH[,PATH...]`` flags -> {name: [paths]}; a repeated NAME adds inputs to that domain.

    A value that names an existing file or folder as a whole is one path even if it holds commas.
    """
    domains: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, paths = spec.partition("=")
        if not sep or not name or not paths:
            raise AioliError(f"--domain {spec!r} is not of the form NAME=PATH[,PATH...]")
        parts = [paths] if Path(paths).exists() else [p for p in paths.split(",") if p]
        domains.setdefault(name, []).extend(parts)
    return domains


def _cmd_prepare(args: argparse.Namespace) -> None:
    from .data import prepare

    manifest = prepare(
        parse_domains(args.domain),
        args.out,
        seq_len=args.seq_len,
        tokenizer=args.tokenizer,
        eos_token=args.eos_token,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        shard_sequences=args.shard_sequences,
        shard_bytes=None if args.shard_mb is None else max(1, int(args.shard_mb * 2**20)),
        text_field=args.text_field,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.quiet,
        workers=args.workers,
    )
    for dom in manifest["domains"]:
        splits = ", ".join(f"{s}: {v['sequences']} seq / {v['tokens']} tok" for s, v in dom["splits"].items())
        print(f"{dom['name']}: {dom['documents']} documents; {splits}")
    print(f"wrote {Path(args.out) / 'manifest.json'}")


def _cmd_verify(args: argparse.Namespace) -> None:
    from .data import load_manifest

    count = load_manifest(args.corpus).verify_checksums(progress=not args.quiet)
    print(f"{args.corpus}: {count} shards match their checksums")


def _cmd_train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .train import train

    cfg = load_config(args.config, args.overrides)
    train(cfg)


def _cmd_eval(args: argparse.Namespace) -> None:
    from .fileio import atomic_write_json, ensure_writable_dir
    from .train import evaluate_checkpoint, format_table

    if args.out:
        ensure_writable_dir(Path(args.out).parent)  # fail before the evaluation, not after
    splits = ["val", "test"] if args.split == "both" else [args.split]
    results = evaluate_checkpoint(
        args.checkpoint,
        data=args.data,
        domains=args.domains.split(",") if args.domains else None,
        splits=splits,
        batch_size=args.batch_size,
        max_sequences=args.max_sequences,
        device=args.device,
    )
    print(format_table(results.get("val"), results.get("test")))
    if args.out:
        atomic_write_json(Path(args.out), results)


def _cmd_report(args: argparse.Namespace) -> None:
    from .report import write_report

    report = write_report(args.run_dirs, args.out)
    unfinished = [run.label for run in report.runs if not run.finished]
    if unfinished:
        print(f"unfinished (no final.json): {', '.join(unfinished)}")
    print(f"wrote {report.path} and {', '.join(f.name for f in report.figures)}")


def _cmd_skills_graph(args: argparse.Namespace) -> None:
    from .config import load_config
    from .train.skills import learn_skills_graph

    cfg = load_config(args.config, args.overrides)
    details = learn_skills_graph(cfg, args.steps, args.out)
    names = list(details["graph"])
    width = max(10, *(len(n) for n in names))
    print("skills graph S[i, j] (row i: how much training on column j lowers domain i's val loss)")
    print(f"{'':<{width}}" + "".join(f"  {n:>{width}}" for n in names))
    for i in names:
        print(f"{i:<{width}}" + "".join(f"  {details['graph'][i][j]:>{width}.4f}" for j in names))
    print(f"wrote {args.out}; use it with mixing.method=skillit mixing.skills_graph={args.out}")


def _cmd_corpus(args: argparse.Namespace) -> None:
    from .corpora import build_corpus

    domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
    manifest = build_corpus(
        args.out, domains, seq_len=args.seq_len, budget_bytes=args.budget_bytes, overwrite=args.overwrite
    )
    for entry in manifest["domains"]:
        splits = ", ".join(f"{k} {v['sequences']}" for k, v in entry["splits"].items())
        print(f"{entry['name']}: {entry['documents']} documents; sequences {splits}")
    print(f"corpus in {Path(args.out) / 'corpus'}; what was read: {Path(args.out) / 'raw' / 'sources.json'}")


def _cmd_sweep(args: argparse.Namespace) -> None:
    from .sweep import collect_results, format_tables, load_spec, run_sweep, write_results

    spec = load_spec(args.spec)
    split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    methods = split(args.methods) if args.methods else None
    try:
        seeds = [int(x) for x in split(args.seeds)] if args.seeds else None
    except ValueError:
        raise AioliError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    if args.tables_only:
        if methods or seeds:
            raise AioliError("--tables-only covers every method and seed of the spec: drop --methods/--seeds")
        out = Path(args.out or Path("runs/sweeps") / spec.name)
        if not out.is_dir():
            raise AioliError(f"--tables-only: no sweep output folder {out}")
        results = collect_results(spec, out)
        if not results["methods"]:
            raise AioliError(f"--tables-only: no finished run of this spec in {out}")
        write_results(spec, out, results)
        print(format_tables(spec, results))
        return
    run_sweep(spec, args.out, methods=methods, seeds=seeds)


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    run_demo(args.out, steps=args.steps, scale=args.scale, overrides=args.overrides, methods=methods)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aioli-fast", description="Online data mixing for LLM pretraining.")
    parser.add_argument("--version", action="version", version=f"aioli_fast {__version__}")
    # the deepspeed launcher passes --local_rank=N before the command; the rank comes from LOCAL_RANK
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize and pack per-domain text into WebDataset shards")
    p.add_argument(
        "--domain",
        action="append",
        required=True,
        metavar="NAME=PATH[,PATH...]",
        help="a domain and its inputs: files, folders or globs (.txt-like, .jsonl, .gz); repeat per domain "
        "(a repeated NAME adds inputs)",
    )
    p.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    p.add_argument(
        "--seq-len", type=_positive_int, default=512, help="tokens per training sequence (default 512)"
    )
    p.add_argument("--tokenizer", default="byte", help="'byte' (default) or the path of an HF tokenizer.json")
    p.add_argument("--eos-token", default=None, help="end-of-document token of an HF tokenizer")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents for val (0.05)")
    p.add_argument("--test-fraction", type=float, default=0.05, help="fraction of documents for test (0.05)")
    p.add_argument(
        "--shard-sequences", type=_positive_int, default=None, help="sequences per shard (default 1024)"
    )
    p.add_argument(
        "--shard-mb",
        type=_positive_float,
        default=None,
        help="largest shard size in MiB (instead of a count)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="tokenizer processes (default: 1 for inputs under 8 MiB, else one per CPU up to 8)",
    )
    p.add_argument("--text-field", default="text", help="JSON field holding the text in .jsonl inputs")
    p.add_argument("--seed", type=int, default=0, help="seed of the document split")
    p.add_argument("--overwrite", action="store_true", help="replace a corpus already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("verify", help="check every shard of a corpus against the manifest's sha256")
    p.add_argument("corpus", help="a corpus folder made by prepare")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("train", help="train a model on a prepared corpus")
    p.add_argument("--config", help="YAML config (configs/*.yaml); defaults for every key not set")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. train.steps=100")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="per-domain loss and perplexity of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="model.pt of a run (or the run directory)")
    p.add_argument("--data", help="prepared corpus (default: the one the run trained on)")
    p.add_argument("--split", choices=("val", "test", "both"), default="test")
    p.add_argument("--domains", help="comma-separated subset of the corpus' domains")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--max-sequences", type=_positive_int, default=None, help="per domain (default: all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="also write the results to this JSON file")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("report", help="compare runs: a Markdown table and loss / proportion figures")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (train.out_dir/name)")
    p.add_argument("--out", default="report", help="folder for report.md and the PNGs (default ./report)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "skills-graph", help="learn Skill-it's skills graph from short single-domain runs of a config"
    )
    p.add_argument("--config", help="YAML config of the run (model, data, optimizer)")
    p.add_argument(
        "--steps", type=_positive_int, required=True, help="training steps of each single-domain run"
    )
    p.add_argument("--out", required=True, help="JSON file for the graph (details beside it)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. train.batch_size=8")
    p.set_defaults(func=_cmd_skills_graph)

    p = sub.add_parser(
        "corpus", help="build the real-text corpus of the sweeps from this Python installation"
    )
    p.add_argument("--out", required=True, help="folder: raw/ (collected text) and corpus/ (prepared)")
    p.add_argument("--domains", help="comma-separated subset of python,cpp,licenses,reference,docstrings,"
                   "fontmetrics (default all)")  # fmt: skip
    p.add_argument("--seq-len", type=_positive_int, default=128)
    p.add_argument("--budget-bytes", type=_positive_int, default=1_500_000, help="per domain")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a corpus there with another seq_len or domains"
    )
    p.set_defaults(func=_cmd_corpus)

    p = sub.add_parser(
        "sweep", help="methods x seeds on a real-text corpus: tables and proportion plots (resumable)"
    )
    p.add_argument("spec", help="a sweep spec, e.g. configs/sweeps/text2.yaml (docs/benchmarks.md)")
    p.add_argument("--out", help="output folder (default runs/sweeps/<spec name>)")
    p.add_argument("--methods", help="comma-separated subset of the spec's methods (their references added)")
    p.add_argument("--seeds", help="comma-separated subset of the spec's seeds")
    p.add_argument(
        "--tables-only", action="store_true", help="only write the tables from the runs already finished"
    )
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser(
        "demo",
        help="build a corpus from this Python installation, train stratified and Aioli, compare (< 5 min)",
    )
    p.add_argument("--out", default="runs/demo", help="folder for the corpus and the runs (runs/demo)")
    p.add_argument("--steps", type=_positive_int, default=None, help="training steps (default 300)")
    p.add_argument("--scale", type=_positive_float, default=1.0, help="corpus size factor (default 1.0)")
    p.add_argument(
        "--methods",
        default="stratified,aioli",
        help="comma-separated runs to train and compare: stratified, aioli (default both)",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.batch_size=8"
    )
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except AioliError as exc:
        code = getattr(exc, "exit_code", 2)  # TrainingInterrupted (SIGTERM, checkpoint written): 143
        print(f"aioli-fast {args.command}: {'error: ' if code == 2 else ''}{exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(f"aioli-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
