"""The ``aioli-fast`` command: prepare, combine, verify, train, eval, report, skills-graph, and the
commands that packages add through the ``aioli_fast.commands`` entry points: corpus, sweep and demo come
from the harness (:mod:`aioli_fast.harness.commands`; docs/DECISIONS.md).

Every user error (bad config, missing data, unwritable folder) ends with one line naming the problem
and exit status 2; nothing half-written is left looking complete.
"""

from __future__ import annotations

import argparse
import atexit
import re
import sys
from pathlib import Path

from . import __version__
from .errors import AioliError

COMMAND_GROUP = "aioli_fast.commands"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


_FIELD_RE = re.compile(r"[A-Za-z_][\w.-]*")


def parse_domains(specs: list[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """``NAME=PATH[,PATH...][:FIELD]`` flags -> ({name: [paths]}, {name: text field}); a repeated NAME
    adds inputs to that domain.

    A value that names an existing file or folder as a whole is one path even if it holds commas or a
    colon. ``:FIELD`` names the JSON field or column holding the text of this domain's inputs.
    """
    domains: dict[str, list[str]] = {}
    fields: dict[str, str] = {}
    for spec in specs:
        name, sep, paths = spec.partition("=")
        if not sep or not name or not paths:
            raise AioliError(f"--domain {spec!r} is not of the form NAME=PATH[,PATH...][:FIELD]")
        head, colon, field = paths.rpartition(":")
        if colon and head and _FIELD_RE.fullmatch(field) and not Path(paths).exists():
            if fields.get(name, field) != field:
                raise AioliError(f"--domain {name}: two text fields, {fields[name]!r} and {field!r}")
            fields[name], paths = field, head
        parts = [paths] if Path(paths).exists() else [p for p in paths.split(",") if p]
        domains.setdefault(name, []).extend(parts)
    return domains, fields


def _cmd_prepare(args: argparse.Namespace) -> None:
    from .data import prepare

    domains, fields = parse_domains(args.domain)
    manifest = prepare(
        domains,
        args.out,
        seq_len=args.seq_len,
        tokenizer=args.tokenizer,
        eos_token=args.eos_token,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        shard_sequences=args.shard_sequences,
        shard_bytes=None if args.shard_mb is None else max(1, int(args.shard_mb * 2**20)),
        text_field={**dict.fromkeys(domains, args.text_field), **fields} if fields else args.text_field,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.quiet,
        workers=args.workers,
        block_bytes=max(1, int(args.block_mb * 2**20)),
        part=args.part or "env",  # under a launcher, one part per process
    )
    if manifest is None:  # a part of a corpus prepared in parts: the last part writes the corpus
        return
    _print_manifest(manifest, args.out)


def _print_manifest(manifest: dict, out: str) -> None:
    for dom in manifest["domains"]:
        splits = ", ".join(f"{s}: {v['sequences']} seq / {v['tokens']} tok" for s, v in dom["splits"].items())
        print(f"{dom['name']}: {dom['documents']} documents; {splits}")
    print(f"wrote {out.rstrip('/') + '/manifest.json' if '://' in out else Path(out) / 'manifest.json'}")


def _cmd_combine(args: argparse.Namespace) -> None:
    from .data.prepare import combine

    _print_manifest(combine(args.out, progress=not args.quiet), args.out)


def _cmd_verify(args: argparse.Namespace) -> None:
    from .data import load_manifest
    from .errors import DataError

    check = load_manifest(args.corpus).verify(progress=not args.quiet)
    for line in check.lines:
        print(f"aioli-fast verify: {line}", file=sys.stderr)
    if check.problems:
        n = check.problems
        raise DataError(
            f"{args.corpus}: {n} problem{'s' if n > 1 else ''} found in {check.shards} shards and the "
            "manifest (above); training would reject this corpus or read other data than it describes"
        )
    print(f"{args.corpus}: {check.shards} shards match their checksums and the manifest")


def _cmd_train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .distributed import shutdown
    from .train import train

    cfg = load_config(args.config, args.overrides)
    # at exit, not now: DeepSpeed caches its groups, so a process that trains again (tests, notebooks
    # calling main) must keep them; at exit every rank is past its last collective
    atexit.unregister(shutdown)  # (once, however often main runs in this process)
    atexit.register(shutdown)
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
        metavar="NAME=PATH[,PATH...][:FIELD]",
        help="a domain and its inputs: files, folders or globs (text, .jsonl, .gz, .zst, .parquet, .arrow, "
        "datasets folders); :FIELD names the text field or column; repeat per domain (a repeated NAME adds "
        "inputs)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder for shards and manifest.json, or an fsspec URL (s3://bucket/corpus, ...)",
    )
    p.add_argument(
        "--seq-len", type=positive_int, default=512, help="tokens per training sequence (default 512)"
    )
    p.add_argument("--tokenizer", default="byte", help="'byte' (default) or the path of an HF tokenizer.json")
    p.add_argument("--eos-token", default=None, help="end-of-document token of an HF tokenizer")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents for val (0.05)")
    p.add_argument("--test-fraction", type=float, default=0.05, help="fraction of documents for test (0.05)")
    p.add_argument(
        "--shard-sequences", type=positive_int, default=None, help="sequences per shard (default 1024)"
    )
    p.add_argument(
        "--shard-mb",
        type=positive_float,
        default=None,
        help="largest shard size in MiB (instead of a count)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="processes preparing blocks (default: 1 for inputs under 8 MiB, else one per CPU up to 8)",
    )
    p.add_argument(
        "--text-field", default="text", help="JSON field or column holding the text (every domain's default)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the document split")
    p.add_argument("--overwrite", action="store_true", help="replace a corpus already in --out")
    p.add_argument(
        "--block-mb",
        type=positive_float,
        default=32,
        help="input MiB per block, the unit of work, memory and resumption (default 32)",
    )
    p.add_argument(
        "--part",
        default=None,
        metavar="I/N",
        help="prepare only part I of N (I from 0) into a staging folder all parts share; default: from "
        "the launcher (Slurm job array, torchrun, mpirun), else the whole corpus. The last part to finish "
        "writes the corpus (or run `aioli-fast combine OUT`)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("combine", help="write the corpus of a preparation run as several parts (--part I/N)")
    p.add_argument("out", help="the --out folder (or URL) the parts were prepared for")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_combine)

    p = sub.add_parser(
        "verify", help="check every shard of a corpus against the manifest (sha256, samples, counts)"
    )
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
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-sequences", type=positive_int, default=None, help="per domain (default: all)")
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
        "--steps", type=positive_int, required=True, help="training steps of each single-domain run"
    )
    p.add_argument("--out", required=True, help="JSON file for the graph (details beside it)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. train.batch_size=8")
    p.set_defaults(func=_cmd_skills_graph)

    if not add_plugin_commands(sub):
        parser.epilog = NO_PLUGINS_HINT
    return parser


NO_PLUGINS_HINT = (
    f"no commands from the {COMMAND_GROUP} entry points are registered (aioli-fast corpus, sweep and demo "
    "come that way): install the package (python3 install.py, or pip install -e .) to add them"
)


def add_plugin_commands(sub: argparse._SubParsersAction) -> int:
    """The subcommands other packages add: each entry point of the ``aioli_fast.commands`` group names a
    function that takes ``sub`` and adds its subparser(s), each with its ``func`` (as above).

    Called in the order of the entry points' names, after the commands of the core. One that cannot be
    loaded is left out with a warning, so that it does not take the other commands down with it.
    """
    from importlib.metadata import entry_points

    found = sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name)
    for ep in found:
        try:
            ep.load()(sub)
        except Exception as exc:  # a broken plugin must not break training
            print(f"aioli-fast: warning: commands {ep.name} ({ep.value}) not added: {exc}", file=sys.stderr)
    return len(found)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # an unknown command may be one that installing the package would add
        if exc.code not in (0, None) and parser.epilog == NO_PLUGINS_HINT:
            print(f"aioli-fast: {NO_PLUGINS_HINT}", file=sys.stderr)
        raise
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
