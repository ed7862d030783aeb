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

import errno
import glob
import gzip
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import AioliError, DataError
from ..fileio import atomic_write, atomic_write_json, ensure_writable_dir, progress_bar, say
from .shards import (
    DOMAIN_NAME_RE,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    token_dtype,
    write_shard,
)
from .tokenizers import get_tokenizer, replace_surrogates

STATE_NAME = ".prepare-state.json"
CHUNK_DOCUMENTS = 256  # documents per tokenization task
AUTO_PARALLEL_BYTES = 8 << 20  # inputs smaller than this are tokenized in this process by default
MAX_AUTO_WORKERS = 8

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")

# A top-up (see assign_splits) moves at most TOPUP_SHARE x the split's fraction of the domain's tokens,
# or TOPUP_MIN_SEQUENCES samples' worth when that is more (a small domain must still fill one sample).
TOPUP_SHARE = 2
TOPUP_MIN_SEQUENCES = 2


SKIPPED_DIRS = {"__pycache__"}
MAX_SKIPPED_LISTED = 20


def is_binary(path: Path) -> bool:
    """A file with a NUL byte in its first 8 KiB (compressed ``.gz`` inputs are not sniffed)."""
    if path.suffix == ".gz":
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
            matched = []
            for q in p.rglob("*"):
                rel = q.relative_to(p).parts
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


def _open_text(path: Path):
    # utf-8-sig drops a byte-order mark at the start of a file; undecodable bytes become U+FFFD
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace")
    return open(path, encoding="utf-8-sig", errors="replace")


def iter_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of one input file: the whole file, or one per JSON line (field ``text_field``)."""
    try:
        with _open_text(path) as f:
            if not path.name.endswith(JSONL_SUFFIXES):
                yield f.read()
                return
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{lineno}: no string field {text_field!r} in this record")
                # JSON may carry lone surrogates ("\\ud800"), which are not text: U+FFFD instead
                yield replace_surrogates(text)
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def document_hash(text: str, seed: int) -> float:
    """A uniform number in [0, 1) from the content of a document and the seed."""
    digest = hashlib.sha256(f"{seed}\0{text}".encode("utf-8", errors="replace")).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def split_of(text: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Split of a document by its hash alone (identical documents agree); see :func:`assign_splits`."""
    return _split_by_hash(document_hash(text, seed), val_fraction, test_fraction)


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
    hashes: list[float], lengths: list[int], seq_len: int, fractions: dict[str, float]
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
    text_field: str = "text",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> dict:
    """Prepare a corpus; returns the manifest written to ``out_dir/manifest.json``.

    Args:
        domains: domain name -> list of input paths, folders or globs. Domain ids follow this order.
        out_dir: output folder (created; must be new, empty, or hold a corpus). An existing corpus is
            replaced only with ``overwrite``, and only once the new one is complete.
        seq_len: tokens per training sequence (samples hold ``seq_len + 1`` ids).
        tokenizer: ``"byte"`` or the path of an HF ``tokenizer.json``.
        val_fraction, test_fraction: expected fraction of documents held out for each split.
        shard_sequences: samples per tar shard (default 1024 unless ``shard_bytes`` is given).
        shard_bytes: largest shard size in bytes instead (as many samples as fit, at least one).
        workers: tokenizer processes; default: 1 for inputs under 8 MiB, else up to 8 (one per CPU).
    """
    if not domains:
        raise AioliError("no domains given: pass at least one --domain NAME=PATH")
    for name in domains:
        if not isinstance(name, str) or not DOMAIN_NAME_RE.fullmatch(name):
            raise AioliError(f"domain name {name!r} may only contain letters, digits, '_' and '-'")
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
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise AioliError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) "
            "and sum to less than 1"
        )
    inputs = {name: expand_inputs(name, list(pats)) for name, pats in domains.items()}
    tok = get_tokenizer(tokenizer, eos_token=eos_token)
    if shard_sequences is None:
        shard_sequences = 1024 if shard_bytes is None else sequences_per_shard(shard_bytes, seq_len, tok)
    if workers is None:
        total = sum(f.stat().st_size for files, _ in inputs.values() for f in files)
        workers = 1 if total < AUTO_PARALLEL_BYTES else max(1, min(MAX_AUTO_WORKERS, os.cpu_count() or 1))

    final = Path(out_dir)
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
    }
    try:
        try:
            out.mkdir(exist_ok=True)
            manifest = _prepare_into(
                out,
                inputs,
                tok,
                (tokenizer, eos_token),
                seq_len,
                val_fraction,
                test_fraction,
                shard_sequences,
                text_field,
                seed,
                progress,
                workers,
                settings,
            )
            _replace_folder(out, final)
        except OSError as exc:  # a full disk, a file-size limit, a quota: one line, not a traceback
            raise DataError(_os_error_message(exc, out)) from exc
    except BaseException:
        if created and final.exists() and not any(final.iterdir()):
            final.rmdir()
        raise
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


def _init_pool_worker(name: str, eos_token: str | None) -> None:
    # Ctrl-C sends SIGINT to every process of the terminal's process group. The parent handles it (it
    # stops the pool); a worker that took it would print a traceback, and could die holding the task
    # queue's lock, which hangs Pool.terminate(). SIGINT is blocked from before the fork (_start_pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _init_worker(name, eos_token)


def _start_pool(workers: int, tok_args: tuple):
    """A pool of ``workers`` tokenizer processes that ignore SIGINT (the parent stops them)."""
    ctx = multiprocessing.get_context("spawn" if sys.platform == "win32" else "fork")
    # blocked while the workers are forked, so that none takes a Ctrl-C before its initializer runs; a
    # Ctrl-C that arrives meanwhile is delivered to this process when the mask is restored
    mask = hasattr(signal, "pthread_sigmask")
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if mask else None
    try:
        return ctx.Pool(workers, initializer=_init_pool_worker, initargs=tok_args)
    finally:
        if mask:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _encode_chunk(task: tuple[list[str], int]) -> list[tuple[float, np.ndarray]]:
    """(content hash, token ids + end of document as int64 [n]) of each document of a chunk."""
    texts, seed = task
    tok = _WORKER_TOKENIZER
    return [
        (document_hash(text, seed), np.asarray([*tok.encode(text), tok.eos_id], dtype=np.int64))
        for text in texts
    ]


def _chunks(
    files: list[Path], text_field: str, seed: int, bar, origins: list[int]
) -> Iterator[tuple[list[str], int]]:
    """Tasks of documents to tokenize; appends the index of each document's file to ``origins``."""
    chunk: list[str] = []
    for f, path in enumerate(files):
        for text in iter_documents(path, text_field):
            if text.strip():
                chunk.append(text)
                origins.append(f)
            if len(chunk) == CHUNK_DOCUMENTS:
                yield chunk, seed
                chunk = []
        if bar is not None:
            bar.update(1)
    if chunk:
        yield chunk, seed


def _tokenize(files, text_field, seed, pool, bar) -> tuple[list[float], list[np.ndarray], list[int]]:
    """(content hash, token ids + end of document, index of its file) of every document, in read order."""
    hashes, ids, origins = [], [], []
    chunks = _chunks(files, text_field, seed, bar, origins)
    results = pool.imap(_encode_chunk, chunks) if pool is not None else map(_encode_chunk, chunks)
    for encoded in results:
        for h, doc in encoded:
            hashes.append(h)
            ids.append(doc)
    return hashes, ids, origins


def _fingerprint(settings: dict, name: str, files: list[Path]) -> str:
    """What a domain's shards depend on: the settings and its inputs (path, size, modification time)."""
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    text = json.dumps({"settings": settings, "domain": name, "inputs": stats}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _load_state(out: Path) -> dict:
    try:
        state = json.loads((out / STATE_NAME).read_text(encoding="utf-8"))
        return state if isinstance(state, dict) and "domains" in state and "shards" in state else {}
    except (OSError, ValueError):
        return {}


def _complete(out: Path, record: dict | None) -> bool:
    """A shard recorded in the staging state whose file is there with the recorded size."""
    if record is None:
        return False
    try:
        return (out / record["path"]).stat().st_size == record["bytes"]
    except OSError:
        return False


@dataclass(frozen=True)
class _PrepareRun:
    """What every domain of one prepare run shares (``state`` is the staging state, updated in place)."""

    out: Path
    seq_len: int
    fractions: dict
    shard_sequences: int
    text_field: str
    seed: int
    progress: bool
    dtype: object
    settings: dict
    state: dict
    pool: object


def _prepare_domain(run: _PrepareRun, name: str, files: list[Path], skipped: list[Path]) -> dict:
    """Tokenize, split, pack and write one domain (or reuse it from an earlier, interrupted run)."""
    fingerprint = _fingerprint(run.settings, name, files)
    done = run.state["domains"].get(name)
    if done is not None and done["fingerprint"] == fingerprint:
        shards = [sh for sp in done["entry"]["splits"].values() for sh in sp["shards"]]
        if all(_complete(run.out, sh) for sh in shards):
            if run.progress:
                print(f"prepared {name}: reused from the interrupted run", file=sys.stderr)
            return done["entry"]
    folder = run.out / name
    for tmp in folder.glob(".*") if folder.exists() else []:
        tmp.unlink()  # a shard whose write was interrupted
    if folder.exists() and any(
        run.state["shards"].get(f"{name}/{p.name}", {}).get("fingerprint") != fingerprint
        for p in folder.iterdir()
    ):
        shutil.rmtree(folder)  # shards of other settings or inputs
    folder.mkdir(exist_ok=True)

    bar = progress_bar(len(files), f"tokenize {name}", "file", run.progress)
    try:
        hashes, docs_ids, origins = _tokenize(files, run.text_field, run.seed, run.pool, bar)
    finally:
        if bar is not None:
            bar.close()
    if not docs_ids:
        raise AioliError(f"domain {name!r}: its inputs hold no text ({len(files)} file(s) read)")
    lengths = [len(d) for d in docs_ids]
    assigned, topups = assign_splits(hashes, lengths, run.seq_len, run.fractions)

    def doc_name(i: int) -> str:
        path = files[origins[i]]
        return f"a document of {path}" if path.name.endswith(JSONL_SUFFIXES) else str(path)

    # before any shard is written: every split can fill one sequence (else an error), and what a top-up
    # did or a lopsided split is said
    _check_splits(name, assigned, lengths, topups, run.seq_len, run.fractions, doc_name, run.progress)
    order = sorted(range(len(docs_ids)), key=lambda i: hashes[i])
    splits = {}
    for split in SPLITS:
        if split != "train" and run.fractions[split] == 0:
            continue
        # Documents of a split are packed in the order of their hashes: the shards depend on the
        # documents' content only, not on file names or read order.
        members = [docs_ids[i] for i in order if assigned[i] == split]
        tokens = np.concatenate(members) if members else np.empty(0, dtype=np.int64)
        samples = pack(tokens, run.seq_len).astype(run.dtype)
        shards = []
        for i, start in enumerate(range(0, len(samples), run.shard_sequences)):
            chunk = samples[start : start + run.shard_sequences]
            rel = f"{name}/{split}-{i:05d}.tar"
            record = run.state["shards"].get(rel)
            if not (
                _complete(run.out, record)
                and record["fingerprint"] == fingerprint
                and record["sequences"] == len(chunk)
            ):
                keys = [f"{name}-{split}-{start + j:09d}" for j in range(len(chunk))]
                sha, size = write_shard(run.out / rel, keys, chunk)
                record = {"path": rel, "sequences": len(chunk), "sha256": sha, "bytes": size}
                run.state["shards"][rel] = {**record, "fingerprint": fingerprint}
                atomic_write_json(run.out / STATE_NAME, run.state)
            shards.append({k: record[k] for k in ("path", "sequences", "sha256", "bytes")})
        splits[split] = {
            "documents": len(members),
            "tokens": int(len(tokens)),
            "sequences": int(len(samples)),
            "dropped_tokens": int(len(tokens) - (len(samples) * run.seq_len + 1)),
            "shards": shards,
        }
    entry = {
        "name": name,
        "inputs": [str(p) for p in files],
        "skipped_files": len(skipped),
        "skipped_examples": [str(p) for p in skipped[:MAX_SKIPPED_LISTED]],
        "documents": len(docs_ids),
        "splits": splits,
    }
    run.state["domains"][name] = {"fingerprint": fingerprint, "entry": entry}
    atomic_write_json(run.out / STATE_NAME, run.state)
    if run.progress:
        summary = ", ".join(f"{s} {v['sequences']}" for s, v in splits.items())
        print(f"prepared {name}: {len(docs_ids)} documents -> sequences {summary}", file=sys.stderr)
    return entry


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


def _prepare_into(
    out,
    inputs,
    tok,
    tok_args,
    seq_len,
    val_fraction,
    test_fraction,
    shard_sequences,
    text_field,
    seed,
    progress,
    workers,
    settings,
) -> dict:
    dtype = token_dtype(tok.vocab_size)
    manifest_path = out / MANIFEST_NAME
    fractions = {"val": val_fraction, "test": test_fraction}
    state = _load_state(out)
    state = {"domains": state.get("domains", {}), "shards": state.get("shards", {})}
    keep = set(inputs)
    for stale in [p for p in out.iterdir() if p.is_dir() and p.name not in keep]:
        shutil.rmtree(stale)  # a domain of an earlier attempt that this run does not have
    pool = _start_pool(workers, tok_args) if workers > 1 else None
    if pool is None:
        _init_worker(*tok_args)
    try:
        run = _PrepareRun(
            out=out,
            seq_len=seq_len,
            fractions=fractions,
            shard_sequences=shard_sequences,
            text_field=text_field,
            seed=seed,
            progress=progress,
            dtype=dtype,
            settings=settings,
            state=state,
            pool=pool,
        )
        domain_entries = [
            _prepare_domain(run, name, files, skipped) for name, (files, skipped) in inputs.items()
        ]
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

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
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "tokenizer": tokenizer_spec,
        "split": {"unit": "document", "seed": seed, **{f"{k}_fraction": v for k, v in fractions.items()}},
        "domains": domain_entries,
    }
    atomic_write_json(manifest_path, manifest)
    # only now: a failure before this point (a full disk) leaves the state, so a re-run reuses every shard
    (out / STATE_NAME).unlink(missing_ok=True)
    return manifest
