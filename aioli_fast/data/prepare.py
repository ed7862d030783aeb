"""``aioli-fast prepare``: raw text per domain -> packed token sequences in WebDataset shards.

For each domain: expand its inputs (files, folders, globs; ``.txt``-like files are one document each,
``.jsonl`` files one document per line from a text field; ``.gz`` is read transparently), assign every
document to train/val/test by a hash of its content (deterministic, independent of file order; a
held-out split too short for one sequence is topped up with the train documents nearest its hash
range, passing over documents too large to move), tokenize, append an end-of-document token, and pack
the documents of one split of one domain, in the order of their hashes, into fixed-length samples (a
sample never mixes domains or splits). The tail that does not fill a sample is dropped and counted in
the manifest.

Scale: documents are read in this process and tokenized by a pool of worker processes in chunks (results
in order, so the corpus does not depend on the number of workers). The corpus is built in a hidden
staging folder beside the output (``.NAME.partial``) that survives a failure or an interrupt: a re-run
with the same settings reuses every finished domain without reading its inputs again, and within an
unfinished domain rewrites no shard that is already complete (shards are written under a temporary name
and renamed, so a file under a shard's final name is always complete). The staging folder is renamed
into place when every domain is done.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import AioliError, DataError
from ..fileio import (
    FolderLock,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    ensure_writable_dir,
    progress_bar,
    say,
)
from .blocks import (
    BLOCK_BYTES,
    Block,
    BlockJob,
    block_of_file,
    finished_shards,
    plan_blocks,
    prepare_block,
    progress_path,
    shard_on_disk,
)
from .readers import dataset_folder_files, is_readable_binary, unreadable_dataset_format
from .remote import ShardStore, is_url, local_path_of
from .shards import (
    DOMAIN_NAME_RE,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    token_dtype,
)
from .tokenizers import get_tokenizer

STATE_NAME = ".prepare-state.json"
AUTO_PARALLEL_BYTES = 8 << 20  # inputs smaller than this are tokenized in this process by default
MAX_AUTO_WORKERS = 8


# A top-up (see assign_splits) moves at most TOPUP_SHARE x the split's fraction of the domain's tokens,
# or TOPUP_MIN_SEQUENCES samples' worth when that is more (a small domain must still fill one sample).
TOPUP_SHARE = 2
TOPUP_MIN_SEQUENCES = 2


SKIPPED_DIRS = {"__pycache__"}
MAX_DOMAIN_NAME = 60  # + "-<split>-BBBBB.SSSSS-<index:09d>.tokens.npy" fits a tar header's 100 bytes
MAX_SKIPPED_LISTED = 20


def is_binary(path: Path) -> bool:
    """A file with a NUL byte in its first 8 KiB, other than the binary formats prepare reads
    (compressed, Parquet, Arrow: aioli_fast.data.readers), which are not sniffed."""
    if str(path).endswith(".gz"):  # a compressed file: sniff what it holds (a .tar.gz is not text)
        import gzip

        try:
            with gzip.open(path, "rb") as f:
                return b"\0" in f.read(8192)
        except (OSError, EOFError):
            return False  # damaged: reading it says so, naming the file
    if is_readable_binary(path):
        return False
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def expand_inputs(domain: str, patterns: list[str]) -> tuple[list[Path], list[Path]]:
    """Input files of a domain: (files to read, sorted; files skipped).

    A path names one file (an error if it is binary). A folder gives every file below it except hidden
    files and folders (a leading '.'), ``__pycache__`` and binary files. A glob (``**`` recursive; as
    usual, ``*`` does not match hidden names) gives its matches except binary files.
    """
    files: set[Path] = set()
    skipped: set[Path] = set()
    for pattern in patterns:
        p = Path(pattern)
        if p.is_file():
            if is_binary(p):
                raise AioliError(f"domain {domain!r}: input {pattern!r} is a binary file, not text")
            files.add(p.resolve())
            continue
        if p.is_dir():
            dataset = dataset_folder_files(p)
            if dataset is not None:  # a datasets save_to_disk folder: its Arrow files, not its metadata
                files.update(f.resolve() for f in dataset)
                continue
            unreadable = unreadable_dataset_format(p)
            if unreadable is not None:
                raise AioliError(
                    f"domain {domain!r}: {pattern} holds {unreadable}, which prepare does not read; give "
                    "text, JSON lines, Parquet or Arrow files"
                )
            matched = []
            datasets = []  # datasets folders below p: their Arrow files, not their metadata
            for q in sorted(d for d in p.rglob("*") if d.is_dir()):
                if any(q.is_relative_to(d) for d in datasets):
                    continue
                if any(part.startswith(".") or part in SKIPPED_DIRS for part in q.relative_to(p).parts):
                    continue  # skipped as a whole, as its files are
                found = dataset_folder_files(q)
                if found is not None:
                    datasets.append(q)
                    matched.extend(found)
                elif (unreadable := unreadable_dataset_format(q)) is not None:
                    raise AioliError(
                        f"domain {domain!r}: {q} holds {unreadable}, which prepare does not read; give "
                        "text, JSON lines, Parquet or Arrow files"
                    )
            for q in p.rglob("*"):
                rel = q.relative_to(p).parts
                if any(q.is_relative_to(d) for d in datasets):
                    continue
                if any(part.startswith(".") or part in SKIPPED_DIRS for part in rel):
                    if q.is_file():
                        skipped.add(q.resolve())
                elif q.is_file():
                    matched.append(q)
        else:
            matched = [Path(q) for q in glob.glob(pattern, recursive=True) if Path(q).is_file()]
        if not matched and not skipped:
            raise AioliError(f"domain {domain!r}: no input file matches {pattern!r}")
        for q in matched:
            (skipped if is_binary(q) else files).add(q.resolve())
    if not files:
        raise AioliError(
            f"domain {domain!r}: no text file among its inputs {patterns} "
            f"({len(skipped)} hidden or binary file(s) skipped)"
        )
    return sorted(files), sorted(skipped)


def document_hash(text: str, seed: int) -> float:
    """A uniform number in [0, 1) from the content of a document and the seed."""
    digest = hashlib.sha256(f"{seed}\0{text}".encode("utf-8", errors="replace")).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def _split_by_hash(u: float, val_fraction: float, test_fraction: float) -> str:
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


@dataclass
class TopUp:
    """What :func:`assign_splits` did for a held-out split that its hash range left too short.

    ``moved``: the train documents moved into it (none when ``filled`` is False: the documents that may
    be moved could not fill one sequence, and the split is left as its hash range made it).
    ``passed_over``: train documents nearer its range that were too large to move (more than ``limit``
    tokens in all).
    """

    split: str
    tokens: int  # what the split got from its hash range
    documents: int
    limit: int
    moved: list[int]
    moved_tokens: int
    passed_over: list[int]
    filled: bool


def topup_limit(fraction: float, domain_tokens: int, seq_len: int) -> int:
    """The most tokens a top-up may move into a held-out split of ``fraction``."""
    return max(int(TOPUP_SHARE * fraction * domain_tokens), TOPUP_MIN_SEQUENCES * (seq_len + 1))


def assign_splits(
    hashes: list[float], lengths: list[int], seq_len: int, fractions: dict[str, float], top_up: bool = True
) -> tuple[list[str], list[TopUp]]:
    """Split of each document: by hash, then topped up so every held-out split can fill one sequence.

    Documents go to test when their hash is below ``fractions["test"]``, to val below the sum of both.
    A domain with few, long documents can leave a held-out split too short for one sequence; such a split
    then also takes the train documents with the lowest hashes (the ones nearest its hash range) until
    it holds more than ``seq_len`` tokens, passing over a document that would make the top-up move more
    than :func:`topup_limit` tokens (one huge document must not take most of the domain out of train).
    When the documents that fit cannot fill one sequence nothing is moved. Still a function of the
    content and the seed only. Returns the splits and what each top-up did.
    """
    splits = [_split_by_hash(u, fractions["val"], fractions["test"]) for u in hashes]
    if not top_up:
        return splits, []
    domain_tokens = sum(lengths)
    topups = []
    for split in ("test", "val"):
        if fractions[split] == 0:
            continue
        total = sum(n for n, s in zip(lengths, splits) if s == split)
        if total > seq_len:
            continue
        topup = TopUp(
            split=split,
            tokens=total,
            documents=sum(s == split for s in splits),
            limit=topup_limit(fractions[split], domain_tokens, seq_len),
            moved=[],
            moved_tokens=0,
            passed_over=[],
            filled=False,
        )
        for i in sorted((i for i, s in enumerate(splits) if s == "train"), key=lambda i: hashes[i]):
            if total > seq_len:
                break
            if topup.moved_tokens + lengths[i] > topup.limit:
                topup.passed_over.append(i)
                continue
            topup.moved.append(i)
            topup.moved_tokens += lengths[i]
            total += lengths[i]
        topup.filled = total > seq_len
        if topup.filled:
            for i in topup.moved:
                splits[i] = split
        else:
            topup.moved, topup.moved_tokens = [], 0
        topups.append(topup)
    return splits, topups


def pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut a token stream into samples [S, seq_len + 1] that overlap by one token; drop the tail."""
    n = (len(tokens) - 1) // seq_len if len(tokens) > seq_len else 0
    if n == 0:
        return np.empty((0, seq_len + 1), dtype=tokens.dtype)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return tokens[idx]


def sequences_per_shard(shard_bytes: int, seq_len: int, tok) -> int:
    """The most samples whose tar shard stays within ``shard_bytes`` (at least one)."""
    npy_header = 128  # numpy's format 1.0 header of a 1-D array, padded
    data = npy_header + (seq_len + 1) * token_dtype(tok.vocab_size).itemsize
    member = 512 + -(-data // 512) * 512  # header block + data padded to blocks

    def size(n: int) -> int:  # + end-of-archive blocks, padded to tarfile's 10240-byte records
        return -(-(n * member + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE

    n = max(1, (shard_bytes - 1024) // member)
    while n > 1 and size(n) > shard_bytes:
        n -= 1
    return n


def prepare(
    domains: dict[str, list[str]],
    out_dir: str | Path,
    *,
    seq_len: int = 512,
    tokenizer: str = "byte",
    eos_token: str | None = None,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    shard_sequences: int | None = None,
    shard_bytes: int | None = None,
    text_field: str | dict[str, str] = "text",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
    block_bytes: int = BLOCK_BYTES,
    part: tuple[int, int] | str | None = None,
    storage_options: dict | None = None,
) -> dict | None:
    """Prepare a corpus; returns the manifest written to ``out_dir/manifest.json``.

    ``out_dir`` may be an fsspec URL (``s3://bucket/corpus``, ...; docs/data.md): the corpus is built in a
    local staging folder (under the cache folder), then uploaded, the manifest last, so a reader never
    sees half a corpus. Parts then need no shared disk: each uploads its shards and its state, and the
    last to finish (or ``combine(url)``) writes the manifest from the states in the store.

    With ``part=(i, N)`` (or ``"i/N"``, ``i`` from 0; ``"env"``: from the launcher's environment, see
    :func:`part_from_environment`, as the ``prepare`` command does) only every N-th block is prepared,
    into the staging folder beside ``out_dir`` (which all parts must share). The part that finishes last
    assembles the corpus and returns its manifest; the others return None (``combine(out_dir)`` also
    assembles it). The corpus is the same whatever N is.

    Args:
        domains: domain name -> list of input paths, folders or globs (text, JSON lines, Parquet, Arrow,
            ``datasets`` folders; see docs/data.md), or an iterable of document strings (any iterable
            that is not a list or tuple, e.g. a generator). Domain ids follow this order.
        out_dir: output folder (created; must be new, empty, or hold a corpus). An existing corpus is
            replaced only with ``overwrite``, and only once the new one is complete.
        seq_len: tokens per training sequence (samples hold ``seq_len + 1`` ids).
        tokenizer: ``"byte"`` or the path of an HF ``tokenizer.json``.
        val_fraction, test_fraction: expected fraction of documents held out for each split.
        shard_sequences: samples per tar shard (default 1024 unless ``shard_bytes`` is given).
        text_field: the JSON field or column holding the text: one name, or ``{domain: name}`` (a
            domain not in it reads ``"text"``).
        shard_bytes: largest shard size in bytes instead (as many samples as fit, at least one).
        workers: processes preparing blocks; default: 1 for inputs under 8 MiB, else up to 8 (one
            per CPU).
        block_bytes: input bytes per block, the unit of work and of memory (aioli_fast.data.blocks).
    """
    if not domains:
        raise AioliError("no domains given: pass at least one --domain NAME=PATH")
    for name in domains:
        if not isinstance(name, str) or not DOMAIN_NAME_RE.fullmatch(name):
            raise AioliError(f"domain name {name!r} may only contain letters, digits, '_' and '-'")
        if len(name) > MAX_DOMAIN_NAME:  # sample names must fit a tar header's 100 bytes
            raise AioliError(f"domain name {name!r} is longer than {MAX_DOMAIN_NAME} characters")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise AioliError(f"seq_len must be a positive integer, got {seq_len!r}")
    if shard_sequences is not None and shard_bytes is not None:
        raise AioliError(
            "give either shard_sequences (--shard-sequences) or shard_bytes (--shard-mb), not both"
        )
    if shard_sequences is not None and (not isinstance(shard_sequences, int) or shard_sequences < 1):
        raise AioliError(f"shard_sequences must be a positive integer, got {shard_sequences!r}")
    if shard_bytes is not None and (not isinstance(shard_bytes, int) or shard_bytes < 1):
        raise AioliError(f"shard_bytes must be a positive integer, got {shard_bytes!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise AioliError(f"workers must be a positive integer, got {workers!r}")
    if not isinstance(block_bytes, int) or block_bytes < 1:
        raise AioliError(f"block_bytes must be a positive integer, got {block_bytes!r}")
    part, source = _resolve_part(part)
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise AioliError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) "
            "and sum to less than 1"
        )
    if isinstance(text_field, dict):
        unknown = sorted(set(text_field) - set(domains))
        if unknown:
            raise AioliError(f"text_field names domains that are not given: {unknown}")
        fields = {name: text_field.get(name, "text") for name in domains}
    else:
        fields = dict.fromkeys(domains, text_field)
    remote = None
    if is_url(out_dir):
        remote = ShardStore(str(out_dir), storage_options=storage_options)
        if remote.exists(MANIFEST_NAME) and not overwrite:
            raise AioliError(f"{remote.url} already holds a prepared corpus; pass --overwrite to replace it")
        final = _remote_workdir(remote, part)  # this part's private local folder, built beside it
    else:
        final = local_path_of(out_dir)
    texts = [name for name, value in domains.items() if _is_documents(value)]
    if texts and part[1] > 1:
        raise AioliError(
            f"domain(s) {texts} are given as iterables of documents, which one process reads: prepare them "
            "without --part, or write them to files first"
        )
    domains = {
        name: _write_documents(name, value, _staging(final) / ".texts", block_bytes)
        if name in texts
        else value
        for name, value in domains.items()
    }
    fields.update(dict.fromkeys(texts, "text"))
    inputs = {
        name: expand_inputs(name, [pats] if isinstance(pats, (str, Path)) else [str(p) for p in pats])
        for name, pats in domains.items()
    }
    tok = get_tokenizer(tokenizer, eos_token=eos_token)
    if shard_sequences is None:
        shard_sequences = 1024 if shard_bytes is None else sequences_per_shard(shard_bytes, seq_len, tok)
    if workers is None:
        total = sum(f.stat().st_size for files, _ in inputs.values() for f in files)
        workers = 1 if total < AUTO_PARALLEL_BYTES else max(1, min(MAX_AUTO_WORKERS, os.cpu_count() or 1))

    if final.exists():
        if not final.is_dir():
            raise AioliError(f"output {final} exists and is not a folder")
        if (final / MANIFEST_NAME).exists():
            if not overwrite:
                raise AioliError(f"{final} already holds a prepared corpus; pass --overwrite to replace it")
        elif any(final.iterdir()):
            raise AioliError(f"{final} is not empty and holds no corpus; choose a new or empty folder")
    # Everything is built in a hidden sibling folder and renamed into place at the end: a failure
    # leaves the previous corpus (if any) untouched and nothing that looks complete. The staging folder
    # is kept after a failure so that a re-run resumes from it.
    created = not final.exists()
    ensure_writable_dir(final)
    out = final.parent / f".{final.name}.partial"
    settings = {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "tokenizer": tok.spec(),
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "shard_sequences": shard_sequences,
        "text_field": text_field,
        "seed": seed,
        "block_bytes": block_bytes,
    }
    index, parts = part
    if parts > 1 and progress:
        blocks = f"blocks {index}, {index + parts}, ... of the corpus"
        say(f"prepare: part {index}/{parts}{source}: {blocks}, into {out}")
    try:
        try:
            out.mkdir(exist_ok=True)
            state = _prepare_into(
                out,
                inputs,
                tok,
                (tokenizer, eos_token),
                seq_len,
                {"val": val_fraction, "test": test_fraction},
                shard_sequences,
                fields,
                seed,
                progress,
                workers,
                settings,
                block_bytes,
                part,
                overwrite,
            )
            if remote is not None:
                manifest = _publish(remote, out, state, tok, progress)
                shutil.rmtree(final.parent, ignore_errors=True)  # this machine's work is in the store
                return manifest
            if parts == 1:
                manifest = _assemble(out, [state], tok)
                _replace_folder(out, final)
                return manifest
            return _combine_if_last(final, out, progress)
        except OSError as exc:  # a full disk, a file-size limit, a quota: one line, not a traceback
            raise DataError(_os_error_message(exc, out)) from exc
    except BaseException:
        if created and final.exists() and not any(final.iterdir()):
            final.rmdir()
        raise


def _is_documents(value) -> bool:
    """Whether a domain is given as documents (an iterable that is not a path or a list of paths)."""
    return not isinstance(value, (str, Path, list, tuple)) and hasattr(value, "__iter__")


def _write_documents(name: str, documents, folder: Path, block_bytes: int) -> list[str]:
    """Documents given as an iterable, written as JSON-lines files of about ``block_bytes`` each in the
    staging folder (a file whose content is unchanged is not rewritten, so a re-run reuses its shards)."""
    folder = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    paths, lines, size = [], [], 0

    def flush() -> None:
        nonlocal lines, size
        path = folder / f"texts-{len(paths):05d}.jsonl"
        data = "".join(lines).encode("utf-8")
        if not (path.is_file() and path.read_bytes() == data):
            atomic_write_bytes(path, data)
        paths.append(str(path))
        lines, size = [], 0

    count = 0
    for text in documents:
        if not isinstance(text, str):
            raise AioliError(f"domain {name!r}: document {count} is a {type(text).__name__}, not a string")
        line = json.dumps({"text": text}) + "\n"
        if lines and size + len(line) > block_bytes:  # a file of at most one block: no tail block
            flush()
        lines.append(line)
        size += len(line)
        count += 1
    if lines or not paths:
        flush()
    for stale in sorted(folder.glob("texts-*.jsonl"))[len(paths) :]:
        stale.unlink()
    return paths


PART_VARIABLES = (
    # (rank, count, launcher); the first pair present in the environment gives the part
    ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "a Slurm job array"),
    ("RANK", "WORLD_SIZE", "torchrun"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "mpirun (Open MPI)"),
    ("PMI_RANK", "PMI_SIZE", "mpirun (MPICH)"),
    ("SLURM_PROCID", "SLURM_NTASKS", "srun"),
)


def part_from_environment(env: dict | None = None) -> tuple[int, int, str] | None:
    """(part, parts, launcher) from the variables launchers set, or None when none is set.

    A Slurm job array counts from ``SLURM_ARRAY_TASK_MIN`` in steps of ``SLURM_ARRAY_TASK_STEP``
    (``--array=1-8`` gives parts 0 to 7)."""
    env = os.environ if env is None else env
    for rank_key, count_key, launcher in PART_VARIABLES:
        if rank_key in env and count_key in env:
            try:
                rank, count = int(env[rank_key]), int(env[count_key])
                if rank_key == "SLURM_ARRAY_TASK_ID":
                    first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
                    rank = (rank - first) // int(env.get("SLURM_ARRAY_TASK_STEP", 1))
            except ValueError as exc:
                raise AioliError(
                    f"{rank_key}/{count_key} in the environment are not integers: {exc}"
                ) from exc
            if not 0 <= rank < count:
                raise AioliError(f"{rank_key}={env[rank_key]} does not name one of {count} parts")
            return rank, count, launcher
    return None


def _resolve_part(part) -> tuple[tuple[int, int], str]:
    if part is None:
        return (0, 1), ""
    if part == "env":
        found = part_from_environment()
        if found is None:
            return (0, 1), ""
        return (found[0], found[1]), f" (from {found[2]}'s environment)"
    if isinstance(part, str):
        try:
            i, n = (int(x) for x in part.split("/"))
        except ValueError:
            raise AioliError(f"part must look like I/N (e.g. 0/4), got {part!r}") from None
        part = (i, n)
    i, n = part
    if not (isinstance(i, int) and isinstance(n, int) and n >= 1 and 0 <= i < n):
        raise AioliError(f"part {i}/{n}: N must be at least 1 and I in 0..N-1")
    return (i, n), ""


def _staging(final: Path) -> Path:
    return final.parent / f".{final.name}.partial"


def _part_states(out: Path, strict: bool = True) -> list[dict]:
    """The states of the parts in the staging folder ``out``; a damaged one is an error when
    ``strict``, else left out (as a vanished one always is: another part may be combining)."""
    states = []
    for path in sorted(out.glob(".prepare-state-part*-of-*.json")):
        if not path.exists():
            continue
        state = _load_state(path)
        if not state:
            if strict and path.exists():
                raise AioliError(f"{path} is damaged: run that part again")
            continue
        states.append(state)
    return states


def _combine_if_last(final: Path, out: Path, progress: bool) -> dict | None:
    """After a part finished: assemble the corpus if every part is complete and no other part is
    assembling it; else say what is missing and return None."""
    states = _part_states(out, strict=False)
    if not states:
        return None  # another part has just combined the corpus
    parts = states[0]["parts"]
    done = {s["part"] for s in states if s.get("complete") and s["parts"] == parts}
    missing = [i for i in range(parts) if i not in done]
    if missing:
        if progress:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            say(
                f"prepare: this part is done; waiting for part(s) {shown} of {parts}. The last one to finish "
                f"writes the corpus (or run: aioli-fast combine {final})"
            )
        return None
    try:
        return combine(final, progress=progress)
    except CombineBusy:
        if progress:
            say(f"prepare: another process is writing the corpus (if it failed: aioli-fast combine {final})")
        return None  # another part finished at the same moment, or a hand-run combine, assembles it


class CombineBusy(AioliError):
    """Another process holds the corpus's combine lock."""


# ---------------------------------------------------------------------------------------------------
# A corpus written to object storage

REMOTE_PARTS = ".aioli-parts"  # beside the corpus in the store: each finished part's state


def _remote_workdir(store: ShardStore, part: tuple[int, int]) -> Path:
    """This part's local folder for building ``store``'s corpus (its staging folder is beside it): one
    per part, so parts that share a machine never touch each other's files."""
    work = store.cache.parent / f"prepare-{store.cache.name}-part{part[0]}-of-{part[1]}"
    work.mkdir(parents=True, exist_ok=True)
    return work / "corpus"


def _shard_records(state: dict) -> list[dict]:
    return [
        sh
        for record in state["blocks"].values()
        for split in record["entry"]["splits"].values()
        for sh in split["shards"]
    ]


def _publish(store: ShardStore, out: Path, state: dict, tok, progress: bool) -> dict | None:
    """Upload this part's shards (and, for a part, its state); with every part there, write the
    manifest last. Returns the manifest, or None while parts are missing."""
    records = _shard_records(state)
    if state.get("overwrite") and store.exists(MANIFEST_NAME):
        store.remove(MANIFEST_NAME)  # the old corpus goes first: no reader pairs it with new shards
    bar = progress_bar(len(records), "upload", "shard", progress)
    for sh in records:
        store.upload(out / sh["path"], sh["path"])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if progress:
        say(f"prepare: uploaded {len(records)} shard(s) to {store.url}")
    if state["parts"] == 1:
        states = [state]
    else:
        name = _state_name(state["part"], state["parts"])
        store.upload(out / name, f"{REMOTE_PARTS}/{name}")
        # states an earlier, abandoned splitting or other settings left are not this corpus's
        states = [
            s
            for s in _remote_states(store)
            if s["parts"] == state["parts"] and s["settings"] == state["settings"]
        ]
        done = {s["part"] for s in states if s.get("complete")}
        missing = [i for i in range(state["parts"]) if i not in done]
        if missing:
            if progress:
                shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
                say(
                    f"prepare: this part is uploaded; waiting for part(s) {shown} of {state['parts']}. "
                    f"The last one to finish writes the manifest (or run: aioli-fast combine {store.url})"
                )
            shutil.rmtree(out, ignore_errors=True)
            return None
    manifest = _write_remote_manifest(store, states, progress)
    shutil.rmtree(out, ignore_errors=True)
    return manifest


def _remote_states(store: ShardStore) -> list[dict]:
    states = []
    for rel in sorted(k for k in store.sizes() if k.startswith(REMOTE_PARTS + "/")):
        try:
            with _local_copy(store, rel) as path:
                state = _load_state(path)
        except DataError:  # removed meanwhile: another part has just written the manifest
            continue
        if not state:
            raise AioliError(f"{store.url}/{rel} is damaged: run that part again")
        states.append(state)
    return states


class _local_copy:
    """A temporary local copy of a small object of the store."""

    def __init__(self, store: ShardStore, rel: str):
        self.store, self.rel = store, rel

    def __enter__(self) -> Path:
        self.store.cache.mkdir(parents=True, exist_ok=True)
        self.path = self.store.cache / f".state-{os.getpid()}-{Path(self.rel).name}"
        self.path.write_bytes(self.store.read_bytes(self.rel))
        return self.path

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def _write_remote_manifest(store: ShardStore, states: list[dict], progress: bool) -> dict:
    """Check the parts' shards in the store, then write the tokenizer and, last, the manifest."""
    n = states[0]["parts"]
    found = {s["part"]: s for s in states if s["parts"] == n}
    incomplete = [i for i in range(n) if i not in found or not found[i].get("complete")]
    if incomplete:
        raise AioliError(
            f"part(s) {', '.join(map(str, incomplete))} of {n} are not in {store.url}: "
            f"run them (--part I/{n})"
        )
    for i in range(1, n):
        for what in ("settings", "domains"):
            if found[i][what] != found[0][what]:
                raise AioliError(
                    f"part {i} of {n} was prepared with other {what} than part 0: every part must be run "
                    "with the same command and inputs"
                )
    sizes = store.sizes()
    ordered = [found[i] for i in range(n)]
    for sh in (sh for s in ordered for sh in _shard_records(s)):
        size = sizes.get(sh["path"])
        if size is None:
            try:
                size = store.size(sh["path"])
            except DataError:
                size = None
        if size != sh["bytes"]:
            raise AioliError(
                f"{store.url}/{sh['path']} is missing or has another size: run the part that wrote it again"
            )
    from .tokenizers import load_tokenizer

    tok = load_tokenizer(ordered[0]["settings"]["tokenizer"])
    # the manifest is built as a local corpus's would be, in an empty local folder, then uploaded
    assemble = store.cache.parent / f"assemble-{store.cache.name}-{os.getpid()}"
    shutil.rmtree(assemble, ignore_errors=True)
    try:
        for name in ordered[0]["domains"]:
            (assemble / name).mkdir(parents=True)
        manifest = _assemble(assemble, ordered, tok)
        if (assemble / "tokenizer.json").is_file():
            store.upload(assemble / "tokenizer.json", "tokenizer.json")
        store.write_bytes(MANIFEST_NAME, (assemble / MANIFEST_NAME).read_bytes())  # last
    finally:
        shutil.rmtree(assemble, ignore_errors=True)
    if n > 1:
        store.remove(REMOTE_PARTS)
    if progress:
        say(f"prepare: wrote the corpus to {store.url}" + (f" from {n} parts" if n > 1 else ""))
    return manifest


def combine(out_dir: str | Path, progress: bool = True) -> dict:
    """Assemble a corpus prepared as N parts (``prepare(..., part=(i, N))``) into ``out_dir``.

    Reads no token data: checks that every part is there and complete, that all parts used the same
    settings, tokenizer and inputs, and that every shard they recorded is on disk with its recorded
    size; then writes the manifest (the one a single process would have written) and moves the corpus
    into place."""
    if is_url(out_dir):
        store = ShardStore(str(out_dir))
        states = _remote_states(store)
        splittings = {(s["parts"], json.dumps(s["settings"], sort_keys=True)) for s in states}
        if len(splittings) > 1:
            raise AioliError(
                f"{store.url}/{REMOTE_PARTS} holds the states of different preparations (other numbers of "
                "parts or settings): remove the stale ones, or prepare again"
            )
        if not states:
            if store.exists(MANIFEST_NAME):
                return json.loads(store.read_bytes(MANIFEST_NAME))
            raise AioliError(f"no parts to combine in {store.url}: prepare the parts with --part I/N first")
        return _write_remote_manifest(store, states, progress)
    final = Path(out_dir)
    out = _staging(final)
    # one combine at a time (the last part's own and a hand-run one may race): the lock lies beside the
    # staging folder, so it stays while the folder is renamed into place
    lock = FolderLock(final.parent, "corpus", name=f".{final.name}.combine.lock", target=final)
    try:
        lock.acquire()
    except AioliError as exc:
        raise CombineBusy(str(exc)) from None
    try:
        if not out.is_dir() and (final / MANIFEST_NAME).exists():
            if progress:
                say(f"prepare: {final} was combined already (by another process)")
            return json.loads((final / MANIFEST_NAME).read_text(encoding="utf-8"))
        return _combine(final, out, progress)
    finally:
        lock.release()


def _combine(final: Path, out: Path, progress: bool) -> dict:
    """:func:`combine` once it holds the lock."""
    if not out.is_dir():
        raise AioliError(
            f"no parts to combine: {out} does not exist (prepare the parts with --part I/N first)"
        )
    states = _part_states(out)
    if not states:
        raise AioliError(f"no parts to combine in {out}: prepare the parts with --part I/N first")
    parts = {s["parts"] for s in states}
    if len(parts) > 1:
        raise AioliError(f"{out} holds parts of different splittings ({sorted(parts)} parts): prepare again")
    n = parts.pop()
    found = {s["part"]: s for s in states}
    incomplete = [i for i in range(n) if i not in found or not found[i].get("complete")]
    if incomplete:
        raise AioliError(
            f"part(s) {', '.join(map(str, incomplete))} of {n} are not finished: run them (--part I/{n}), "
            "then combine"
        )
    first = found[0]
    for i in range(1, n):
        s = found[i]
        if list(s["domains"]) != list(first["domains"]):
            raise AioliError(
                f"part {i} of {n} has the domains in the order {', '.join(s['domains'])}, part 0 "
                f"{', '.join(first['domains'])}: every part must be run with the same command and inputs"
            )
        for what in ("settings", "domains"):
            if s[what] != first[what]:
                keys = sorted(
                    k for k in set(s[what]) | set(first[what]) if s[what].get(k) != first[what].get(k)
                )
                raise AioliError(
                    f"part {i} of {n} was prepared with other {what} than part 0 (differing: "
                    f"{', '.join(keys)}): every part must be run with the same command and inputs"
                )
    missing = [
        sh["path"]
        for s in states
        for record in s["blocks"].values()
        for split in record["entry"]["splits"].values()
        for sh in split["shards"]
        if not shard_on_disk(out, sh)
    ]
    if missing:
        raise AioliError(
            f"{len(missing)} shard(s) recorded by the parts are missing or have another size (the first: "
            f"{out / missing[0]}): run the part that wrote it again"
        )
    if final.exists() and (final / MANIFEST_NAME).exists() and not all(s.get("overwrite") for s in states):
        raise AioliError(
            f"{final} already holds a prepared corpus; prepare the parts with --overwrite to replace it"
        )
    from .tokenizers import load_tokenizer

    tok = load_tokenizer(first["settings"]["tokenizer"])
    manifest = _assemble(out, [found[i] for i in range(n)], tok)
    (out / ".combine.lock").unlink(missing_ok=True)  # of an earlier version, which kept it there
    ensure_writable_dir(final)
    _replace_folder(out, final)
    if progress:
        say(f"prepare: combined {n} parts into {final}")
    return manifest


OS_ERROR_ADVICE = {
    errno.ENOSPC: "free some disk space",
    errno.EDQUOT: "free some space within your disk quota",
    errno.EFBIG: "raise the file-size limit (ulimit -f)",
}


def _os_error_message(exc: OSError, staging: Path) -> str:
    """One line for an OSError while building the corpus: the file, what the errno means, what to do."""
    code = errno.errorcode.get(exc.errno or 0)
    what = f"{exc.strerror or exc}" + (f" ({code})" if code else "")
    where = f"{exc.filename}: " if exc.filename else ""
    advice = OS_ERROR_ADVICE.get(exc.errno, "fix the cause")
    kept = f"what is finished is kept in {staging}" if staging.is_dir() else "nothing was kept"
    return f"{where}{what}; {kept}: {advice} and run the same command again to continue"


def _replace_folder(new: Path, final: Path) -> None:
    """Rename ``new`` to ``final``, replacing an old ``final`` folder (which is deleted after)."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.rename(final, old)
    try:
        os.rename(new, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_WORKER_TOKENIZER = None


def _init_worker(name: str, eos_token: str | None) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = get_tokenizer(name, eos_token=eos_token)


def _exit_with_parent(parent: int) -> None:
    """End this pool worker, silently, when its parent dies (a kill -9 of ``prepare``): on Linux the
    kernel sends it SIGKILL then (``PR_SET_PDEATHSIG``). Otherwise it would tokenize on and print a
    BrokenPipeError traceback when it hands in its next result."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(0)


def _init_pool_worker(name: str, eos_token: str | None, parent: int) -> None:
    _exit_with_parent(parent)
    # Ctrl-C sends SIGINT to every process of the terminal's process group. The parent handles it (it
    # stops the pool); a worker that took it would print a traceback, and could die holding the task
    # queue's lock, which hangs Pool.terminate(). SIGINT is blocked from before the fork (_start_pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _init_worker(name, eos_token)


def _start_pool(workers: int, tok_args: tuple):
    """A pool of ``workers`` processes that ignore SIGINT (the parent stops them)."""
    ctx = multiprocessing.get_context("spawn" if sys.platform == "win32" else "fork")
    # blocked while the workers are forked, so that none takes a Ctrl-C before its initializer runs; a
    # Ctrl-C that arrives meanwhile is delivered to this process when the mask is restored
    mask = hasattr(signal, "pthread_sigmask")
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if mask else None
    try:
        return ctx.Pool(workers, initializer=_init_pool_worker, initargs=(*tok_args, os.getpid()))
    finally:
        if mask:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _run_block(job: BlockJob) -> tuple[str, dict]:
    """Prepare one block in this process (a pool worker or the parent); returns (its key, its entry)."""
    entry = prepare_block(job, _WORKER_TOKENIZER, document_hash, assign_splits, _check_splits, pack)
    return job.block.key, entry


def _fingerprint(settings: dict, name: str, files: list[Path], blocks: list[Block]) -> str:
    """What a domain's shards depend on: the settings, its inputs (path, size, modification time) and
    how they are cut into blocks."""
    stats = [(str(f), st.st_size, st.st_mtime_ns) for f in files for st in (f.stat(),)]
    cuts = [(b.files, b.start, b.end) for b in blocks]
    text = json.dumps({"settings": settings, "domain": name, "inputs": stats, "blocks": cuts}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _state_name(part: int, parts: int) -> str:
    return STATE_NAME if parts == 1 else f".prepare-state-part{part:05d}-of-{parts:05d}.json"


# A part's state is a log of JSON lines, so that recording a finished block costs one appended line
# however large the corpus: the header (settings, part, domains with their inputs), then one line per
# finished block ({"block": key, "fingerprint", "entry"}), then {"complete": true}. A line cut short by a
# kill ends the log (that block is prepared again, reusing its finished shards).


def _write_state(path: Path, state: dict) -> None:
    """Write a state log anew: its header and the blocks it holds (and the end mark when complete)."""
    header = {k: v for k, v in state.items() if k not in ("blocks", "complete")}
    lines = [json.dumps(header)]
    lines += [json.dumps({"block": key, **record}) for key, record in state["blocks"].items()]
    if state.get("complete"):
        lines.append(json.dumps({"complete": True}))
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))


def _append_state(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _load_state(path: Path) -> dict:
    """The state a log holds ({} if there is none or its header is damaged)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    try:
        state = json.loads(lines[0]) if lines else None
    except ValueError:
        return {}
    if not isinstance(state, dict) or "settings" not in state:
        return {}
    state["blocks"], state["complete"] = {}, False
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except ValueError:
            break
        if record.get("complete"):
            state["complete"] = True
        elif "block" in record:
            state["blocks"][record.pop("block")] = record
    return state


def _check_siblings(out: Path, own: Path, settings: dict, domains: dict, parts: int) -> None:
    """Refuse, before anything in ``out`` changes, a part that does not belong with the parts already
    there: another number of parts, other settings (seq_len, tokenizer, fractions, seed, ...), or other
    domains, inputs or domain order (the order gives the domain ids and numbers the blocks)."""
    for path in sorted(out.glob(".prepare-state-part*-of-*.json")):
        if path == own:
            continue
        other = _load_state(path)
        if not other:
            continue  # damaged or vanished: combine names a damaged one
        name = f"part {other['part']} of {other['parts']} ({path.name})"
        redo = f"run every part with the same command, or remove {out} to start over"
        if other["parts"] != parts:
            raise AioliError(
                f"{out} holds {name}, prepared as {other['parts']} parts; this part is of {parts}: {redo}"
            )
        differing = sorted(
            k for k in set(settings) | set(other["settings"]) if settings.get(k) != other["settings"].get(k)
        )
        if differing:
            raise AioliError(f"{name} was prepared with other settings ({', '.join(differing)}): {redo}")
        if list(other["domains"]) != list(domains):
            raise AioliError(
                f"{name} has the domains in the order {', '.join(other['domains'])}, this part "
                f"{', '.join(domains)}: give every part the --domain flags in the same order ({redo})"
            )
        changed = [d for d in domains if domains[d]["fingerprint"] != other["domains"][d]["fingerprint"]]
        if changed:
            raise AioliError(
                f"{name} was prepared from other inputs for domain(s) {', '.join(changed)}: {redo}"
            )


def _block_done(out: Path, state: dict, block: Block, fingerprint: str) -> bool:
    record = state.get("blocks", {}).get(block.key)
    if record is None or record.get("fingerprint") != fingerprint:
        return False
    return all(shard_on_disk(out, sh) for sp in record["entry"]["splits"].values() for sh in sp["shards"])


def _clear_block_files(out: Path, block: Block, temporary_only: bool = False) -> None:
    """Remove the shards, temporary files and progress record of one block (what an earlier attempt
    with other settings or inputs left), or only the temporary files an interrupted write left."""
    folder = out / block.domain
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if block_of_file(path.name) == block.index and (path.name.startswith(".") or not temporary_only):
            path.unlink()
    if not temporary_only:
        progress_path(out, block).unlink(missing_ok=True)


def _prepare_into(
    out: Path,
    inputs: dict,
    tok,
    tok_args: tuple,
    seq_len: int,
    fractions: dict,
    shard_sequences: int,
    fields: dict[str, str],
    seed: int,
    progress: bool,
    workers: int,
    settings: dict,
    block_bytes: int,
    part: tuple[int, int],
    overwrite: bool = False,
) -> dict:
    """Prepare this part's blocks into the staging folder ``out``; returns the part's state (complete)."""
    index, parts = part
    dtype = token_dtype(tok.vocab_size)
    domains = {}
    for name, (files, skipped) in inputs.items():
        blocks = plan_blocks(name, files, block_bytes, fields[name])
        domains[name] = {
            "fingerprint": _fingerprint(settings, name, files, blocks),
            "blocks": len(blocks),
            "inputs": [str(p) for p in files],
            "skipped_files": len(skipped),
            "skipped_examples": [str(p) for p in skipped[:MAX_SKIPPED_LISTED]],
            "_blocks": blocks,
        }
    state_path = out / _state_name(index, parts)
    header = {n: {k: v for k, v in d.items() if k != "_blocks"} for n, d in domains.items()}
    if parts > 1:
        _check_siblings(out, state_path, settings, header, parts)
    for stale in out.glob(".prepare-state*.json"):  # states of an attempt split into another number of parts
        if stale.name != STATE_NAME and not stale.name.endswith(f"-of-{parts:05d}.json"):
            stale.unlink(missing_ok=True)
        elif stale.name == STATE_NAME and parts > 1:
            stale.unlink(missing_ok=True)
    old = _load_state(state_path)
    state = {
        "settings": settings,
        "part": index,
        "parts": parts,
        "domains": header,
        "blocks": {},
        "complete": False,
        "overwrite": overwrite,
    }
    if parts == 1:
        for stale in [
            p for p in out.iterdir() if p.is_dir() and p.name not in domains and p.name != ".texts"
        ]:
            shutil.rmtree(stale)  # a domain of an earlier attempt that this run does not have
    every = [b for d in domains.values() for b in d["_blocks"]]
    mine = [b for g, b in enumerate(every) if g % parts == index]
    jobs = []
    for block in mine:
        fingerprint = domains[block.domain]["fingerprint"]
        if _block_done(out, old, block, fingerprint):
            state["blocks"][block.key] = old["blocks"][block.key]
            continue
        # the shards an interrupted attempt finished are kept (and reused) if it had the same settings
        _clear_block_files(out, block, temporary_only=bool(finished_shards(out, block, fingerprint)))
        jobs.append(
            BlockJob(
                block=block,
                out=str(out),
                seq_len=seq_len,
                fractions=fractions,
                shard_sequences=shard_sequences,
                text_field=fields[block.domain],
                seed=seed,
                dtype=dtype.name,
                single=domains[block.domain]["blocks"] == 1,
                segment_bytes=2 * block_bytes,
                fingerprint=fingerprint,
                progress=progress,
            )
        )
    _write_state(state_path, state)
    reused = len(mine) - len(jobs)
    if progress and reused:
        say(f"prepare: {reused} of {len(mine)} block(s) reused from the interrupted run")
    bar = progress_bar(len(jobs), "prepare", "block", progress) if jobs else None
    pool = _start_pool(min(workers, len(jobs)), tok_args) if workers > 1 and len(jobs) > 1 else None
    if pool is None:
        _init_worker(*tok_args)
    try:
        results = pool.imap_unordered(_run_block, jobs) if pool is not None else map(_run_block, jobs)
        left = {name: sum(b.domain == name for b in mine) for name in domains}
        for key in state["blocks"]:
            left[key.split("/")[0]] -= 1
        for key, entry in results:
            name = key.split("/")[0]
            state["blocks"][key] = {"fingerprint": domains[name]["fingerprint"], "entry": entry}
            _append_state(state_path, {"block": key, **state["blocks"][key]})  # survives an interrupt
            if bar is not None:
                bar.update(1)
            left[name] -= 1
            if progress and not left[name] and parts == 1:
                n = domains[name]["blocks"]
                blocks = [state["blocks"][f"{name}/{b}"]["entry"] for b in range(n)]
                entry = _domain_entry(name, domains[name], blocks, seq_len, fractions)
                summary = ", ".join(f"{split} {v['sequences']}" for split, v in entry["splits"].items())
                say(f"prepared {name}: {entry['documents']} documents in {n} block(s) -> sequences {summary}")
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    state["complete"] = True
    _append_state(state_path, {"complete": True})
    return state


def _domain_entry(name: str, domain: dict, blocks: list[dict], seq_len: int, fractions: dict) -> dict:
    """A domain's manifest entry from its blocks' entries (in block order)."""
    splits = {}
    for split in SPLITS:
        if split != "train" and fractions[split] == 0:
            continue
        parts = [b["splits"][split] for b in blocks]
        splits[split] = {
            "documents": sum(p["documents"] for p in parts),
            "tokens": sum(p["tokens"] for p in parts),
            "sequences": sum(p["sequences"] for p in parts),
            "dropped_tokens": sum(p["dropped_tokens"] for p in parts),
            "shards": [sh for p in parts for sh in p["shards"]],
        }
    # (a domain of one block read in one segment was checked as a whole before its shards were written)
    for split, v in splits.items():
        if v["sequences"] == 0:
            flag = "" if split == "train" else f", raise --{split}-fraction"
            raise AioliError(
                f"domain {name!r}: the {split} split has {v['tokens']} tokens over {len(blocks)} block(s) "
                f"and no block (or segment of one) holds more than {seq_len} of them, as one sequence "
                f"needs; lower --seq-len{flag} or prepare with larger blocks"
            )
    return {
        "name": name,
        "inputs": domain["inputs"],
        "skipped_files": domain["skipped_files"],
        "skipped_examples": domain["skipped_examples"],
        "documents": sum(b["documents"] for b in blocks),
        "splits": splits,
    }


def _share(tokens: int, domain_tokens: int) -> str:
    share = 100 * tokens / max(domain_tokens, 1)
    return f"{share:.0f}%" if share >= 10 else f"{share:.2g}%"


def _check_splits(
    name: str,
    assigned: list[str],
    lengths: list[int],
    topups: list[TopUp],
    seq_len: int,
    fractions: dict,
    doc_name,
    progress: bool,
) -> None:
    """Raise AioliError when a split cannot fill one sequence; say what top-ups did (a warning when one
    passed over documents too large to move, or a held-out split holds more than train)."""
    tokens = dict.fromkeys(SPLITS, 0)
    documents = dict.fromkeys(SPLITS, 0)
    for n, split in zip(lengths, assigned):
        tokens[split] += n
        documents[split] += 1
    domain_tokens = sum(lengths)
    wanted = [s for s in SPLITS if s == "train" or fractions[s] > 0]
    short = [s for s in wanted if tokens[s] <= seq_len]
    blocked = sorted(
        (t for t in topups if not t.filled and t.passed_over), key=lambda t: SPLITS.index(t.split)
    )
    if short and (short[0] == "train" or not blocked):
        split = short[0]
        advice = "add text, lower --seq-len" + ("" if split == "train" else f" or change --{split}-fraction")
        raise AioliError(
            f"domain {name!r}: the {split} split has {tokens[split]} tokens from {documents[split]} "
            f"document(s), more than {seq_len} tokens are needed for one sequence; {advice}"
        )
    if short:  # only documents too large to move could fill a held-out split
        nearest = min((t.passed_over[0] for t in blocked), key=lambda i: lengths[i])
        several = len(blocked) > 1
        names = " and ".join(t.split for t in blocked) + (" splits" if several else " split")
        held = " and ".join(str(t.tokens) for t in blocked)
        ranges = "their hash ranges hold" if several else "its hash range holds"
        flags = " ".join(f"--{t.split}-fraction 0" for t in blocked)
        limits = {f"{t.limit:,}" for t in blocked}
        limit = (
            f"{limits.pop()} tokens here"
            if len(limits) == 1
            else ", ".join(f"{t.limit:,} tokens for {t.split}" for t in blocked)
        )
        raise AioliError(
            f"domain {name!r}: the {names} cannot be filled: {ranges} {held} "
            f"tokens, more than {seq_len} are needed for one sequence, and the train documents that could "
            f"fill {'them' if several else 'it'} are too large to move (the nearest, {doc_name(nearest)}, "
            f"holds {lengths[nearest]:,} tokens, {_share(lengths[nearest], domain_tokens)} of the domain; "
            f"a top-up moves at most {TOPUP_SHARE} x the split's fraction of the domain's tokens or "
            f"{TOPUP_MIN_SEQUENCES} sequences: {limit}); split large inputs into several documents (a "
            f".jsonl file holds one per line) or pass {flags} (for every domain)"
        )
    for t in topups:
        moved = (
            f"domain {name!r}: the {t.split} split got {t.tokens} tokens from its hash range, too few for "
            f"one sequence; moved {len(t.moved)} train document(s) into it ({t.moved_tokens:,} tokens, "
            f"{_share(t.moved_tokens, domain_tokens)} of the domain)"
        )
        if t.passed_over:
            largest = max(t.passed_over, key=lambda i: lengths[i])
            say(
                f"warning: {moved}, passing over {len(t.passed_over)} nearer document(s) too large to move "
                f"(the largest, {doc_name(largest)}, holds {lengths[largest]:,} tokens, "
                f"{_share(lengths[largest], domain_tokens)} of the domain; a top-up moves at most "
                f"{t.limit:,} tokens); to hold out part of a large document, split it into several documents"
            )
        elif progress:
            say(moved)
    for split in wanted[1:]:
        if tokens[split] > tokens["train"]:  # the hash range took a large document
            largest = max((i for i, s in enumerate(assigned) if s == split), key=lambda i: lengths[i])
            say(
                f"warning: domain {name!r}: the {split} split holds {_share(tokens[split], domain_tokens)} "
                f"of the domain's tokens, more than train, as the hash of {doc_name(largest)} "
                f"({lengths[largest]:,} tokens) falls in its range; split large inputs into several documents"
            )


def _assemble(out: Path, states: list[dict], tok) -> dict:
    """The manifest of a corpus whose parts are all prepared in ``out`` (written there, states removed)."""
    settings = states[0]["settings"]
    seq_len = settings["seq_len"]
    fractions = {"val": settings["val_fraction"], "test": settings["test_fraction"]}
    blocks = {key: record["entry"] for state in states for key, record in state["blocks"].items()}
    entries = []
    for name, domain in states[0]["domains"].items():
        entries.append(
            _domain_entry(
                name, domain, [blocks[f"{name}/{b}"] for b in range(domain["blocks"])], seq_len, fractions
            )
        )
    tokenizer_spec = tok.spec()
    if tokenizer_spec["kind"] == "hf":  # the corpus carries its tokenizer: it can be moved as a whole
        source = tokenizer_spec["path"]
        atomic_write(out / "tokenizer.json", lambda tmp: shutil.copyfile(source, tmp))
        tokenizer_spec["path"] = "tokenizer.json"
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_by": f"aioli_fast {__version__}",
        "seq_len": seq_len,
        "sample_len": seq_len + 1,
        "dtype": token_dtype(tok.vocab_size).name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "tokenizer": tokenizer_spec,
        "split": {
            "unit": "document",
            "seed": settings["seed"],
            **{f"{k}_fraction": v for k, v in fractions.items()},
        },
        "domains": entries,
    }
    texts = (out / ".texts").resolve()
    for entry in entries:
        given = [p for p in entry["inputs"] if Path(p).resolve().is_relative_to(texts)]
        if given:
            entry["inputs"] = [f"(documents given to prepare: {len(given)} file(s) of JSON lines)"]
    # files an earlier attempt (other settings, another number of parts, larger blocks) left that this
    # corpus does not list: a reader globbing the folders must not find them
    listed = {sh["path"] for e in entries for sp in e["splits"].values() for sh in sp["shards"]}
    for name in states[0]["domains"]:
        for path in (out / name).iterdir():
            if (
                path.is_file()
                and block_of_file(path.name) is not None
                and f"{name}/{path.name}" not in listed
            ):
                path.unlink()
    atomic_write_json(out / MANIFEST_NAME, manifest)
    shutil.rmtree(texts, ignore_errors=True)
    # only now: a failure before this point (a full disk) leaves the states, so a re-run reuses every shard
    for name in states[0]["domains"]:
        for record in (out / name).glob(".block-*.jsonl"):
            record.unlink()
    for state in states:
        (out / _state_name(state["part"], state["parts"])).unlink(missing_ok=True)
    return manifest
