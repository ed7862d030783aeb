"""The harness's subcommands of ``aioli-fast``: corpus, sweep, demo.

:func:`add_commands` is the ``harness`` entry point of the ``aioli_fast.commands`` group (setup.py): the
core CLI calls it with its subparsers. Only the parsers are built here; a command imports its module
when it runs, so ``aioli-fast`` starts as quickly as without the harness.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import positive_float, positive_int
from ..errors import AioliError


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


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``corpus``, ``sweep`` and ``demo`` to the subparsers of ``aioli-fast``."""
    p = sub.add_parser(
        "corpus", help="build the real-text corpus of the sweeps from this Python installation"
    )
    p.add_argument("--out", required=True, help="folder: raw/ (collected text) and corpus/ (prepared)")
    p.add_argument("--domains", help="comma-separated domains or domain sets: six (python,cpp,licenses,"
                   "reference,docstrings,fontmetrics; the default), twelve (six plus stubs,tests,cuda,yaml,"
                   "csv,metadata), six_noise (six plus noise: random letters)")  # fmt: skip
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--budget-bytes", type=positive_int, default=1_500_000, help="per domain")
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
    p.add_argument("--steps", type=positive_int, default=None, help="training steps (default 300)")
    p.add_argument("--scale", type=positive_float, default=1.0, help="corpus size factor (default 1.0)")
    p.add_argument(
        "--methods",
        default="stratified,aioli",
        help="comma-separated runs to train and compare: stratified, aioli (default both)",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.batch_size=8"
    )
    p.set_defaults(func=_cmd_demo)
