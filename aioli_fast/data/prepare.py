"""``aioli-fast prepare``: raw text per domain -> packed token sequences in WebDataset shards.

For each domain: expand its inputs (files, folders, globs; ``.txt``-like files are one document each,
``.jsonl`` files one document per line from a text field; ``.gz`` is read transparently), assign every
document to train/val/test by a hash of its content (deterministic, independent of file order; a
held-out split too short for one sequence is topped up with the train documents nearest its hash
range), tokenize, append an end-of-document token, and pack the documents of one split of
one domain, in the order of their hashes, into fixed-length samples (a sample never mixes domains or
splits). The tail that does not fill a sample is dropped and counted in the manifest.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import AioliError, DataError
from ..fileio import atomic_write_json, ensure_writable_dir, progress_bar
from .shards import (
    DOMAIN_NAME_RE,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    token_dtype,
    write_shard,
)
from .tokenizers import get_tokenizer

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")


def expand_inputs(domain: str, patterns: list[str]) -> list[Path]:
    """Files named by paths, folders (every file below, recursively) and globs (``**`` allowed), sorted."""
    files: set[Path] = set()
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            matched = [q for q in p.rglob("*") if q.is_file()]
        elif p.is_file():
            matched = [p]
        else:
            matched = [Path(q) for q in glob.glob(pattern, recursive=True) if Path(q).is_file()]
        if not matched:
            raise AioliError(f"domain {domain!r}: no input file matches {pattern!r}")
        files.update(q.resolve() for q in matched)
    return sorted(files)


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


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
                yield text
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


def assign_splits(
    hashes: list[float], lengths: list[int], seq_len: int, fractions: dict[str, float]
) -> list[str]:
    """Split of each document: by hash, then topped up so every held-out split can fill one sequence.

    Documents go to test when their hash is below ``fractions["test"]``, to val below the sum of both.
    A domain with few, long documents can leave a held-out split too short for one sequence; such a split
    then also takes the train documents with the lowest hashes (the ones nearest its hash range) until
    it holds more than ``seq_len`` tokens. Still a function of the content and the seed only.
    """
    splits = [_split_by_hash(u, fractions["val"], fractions["test"]) for u in hashes]
    for split in ("test", "val"):
        if fractions[split] == 0:
            continue
        total = sum(n for n, s in zip(lengths, splits) if s == split)
        for i in sorted((i for i, s in enumerate(splits) if s == "train"), key=lambda i: hashes[i]):
            if total > seq_len:
                break
            splits[i] = split
            total += lengths[i]
    return splits


def pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut a token stream into samples [S, seq_len + 1] that overlap by one token; drop the tail."""
    n = (len(tokens) - 1) // seq_len if len(tokens) > seq_len else 0
    if n == 0:
        return np.empty((0, seq_len + 1), dtype=tokens.dtype)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return tokens[idx]


def prepare(
    domains: dict[str, list[str]],
    out_dir: str | Path,
    *,
    seq_len: int = 512,
    tokenizer: str = "byte",
    eos_token: str | None = None,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    shard_sequences: int = 1024,
    text_field: str = "text",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Prepare a corpus; returns the manifest written to ``out_dir/manifest.json``.

    Args:
        domains: domain name -> list of input paths, folders or globs. Domain ids follow this order.
        out_dir: output folder (created). An existing corpus there is replaced only with ``overwrite``.
        seq_len: tokens per training sequence (samples hold ``seq_len + 1`` ids).
        tokenizer: ``"byte"`` or the path of an HF ``tokenizer.json``.
        val_fraction, test_fraction: expected fraction of documents held out for each split.
        shard_sequences: samples per tar shard.
    """
    if not domains:
        raise AioliError("no domains given: pass at least one --domain NAME=PATH")
    for name in domains:
        if not isinstance(name, str) or not DOMAIN_NAME_RE.fullmatch(name):
            raise AioliError(f"domain name {name!r} may only contain letters, digits, '_' and '-'")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise AioliError(f"seq_len must be a positive integer, got {seq_len!r}")
    if shard_sequences < 1:
        raise AioliError(f"shard_sequences must be a positive integer, got {shard_sequences!r}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise AioliError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) "
            "and sum to less than 1"
        )
    files_by_domain = {name: expand_inputs(name, list(pats)) for name, pats in domains.items()}
    tok = get_tokenizer(tokenizer, eos_token=eos_token)
    dtype = token_dtype(tok.vocab_size)

    out = ensure_writable_dir(Path(out_dir))
    manifest_path = out / MANIFEST_NAME
    if manifest_path.exists():
        if not overwrite:
            raise AioliError(f"{out} already holds a prepared corpus; pass --overwrite to replace it")
        manifest_path.unlink()  # from here on the folder no longer looks complete
    fractions = {"val": val_fraction, "test": test_fraction}

    domain_entries = []
    for name, files in files_by_domain.items():
        hashes, docs_ids = [], []
        bar = progress_bar(len(files), f"tokenize {name}", "file", progress)
        for path in files:
            if bar is not None:
                bar.update(1)
            for text in iter_documents(path, text_field):
                if not text.strip():
                    continue
                hashes.append(document_hash(text, seed))
                docs_ids.append([*tok.encode(text), tok.eos_id])
        if bar is not None:
            bar.close()
        if not docs_ids:
            raise AioliError(f"domain {name!r}: its inputs hold no text ({len(files)} file(s) read)")
        assigned = assign_splits(hashes, [len(d) for d in docs_ids], seq_len, fractions)
        streams: dict[str, list[int]] = {s: [] for s in SPLITS}
        docs = dict.fromkeys(SPLITS, 0)
        # Documents of a split are packed in the order of their hashes: the shards depend on the
        # documents' content only, not on file names or read order.
        for i in sorted(range(len(docs_ids)), key=lambda i: hashes[i]):
            streams[assigned[i]].extend(docs_ids[i])
            docs[assigned[i]] += 1

        domain_dir = out / name
        if domain_dir.exists():
            shutil.rmtree(domain_dir)
        domain_dir.mkdir(parents=True)
        splits = {}
        for split in SPLITS:
            if split != "train" and fractions[split] == 0:
                continue
            tokens = np.asarray(streams[split], dtype=np.int64)
            samples = pack(tokens, seq_len)
            if len(samples) == 0:
                need = f"more than {seq_len} tokens"
                raise AioliError(
                    f"domain {name!r}: the {split} split has {len(tokens)} tokens from {docs[split]} "
                    f"document(s), {need} are needed for one sequence; add text, lower --seq-len"
                    + ("" if split == "train" else f" or change --{split}-fraction")
                )
            samples = samples.astype(dtype)
            shards = []
            for i, start in enumerate(range(0, len(samples), shard_sequences)):
                chunk = samples[start : start + shard_sequences]
                keys = [f"{name}-{split}-{start + j:09d}" for j in range(len(chunk))]
                rel = f"{name}/{split}-{i:05d}.tar"
                sha, size = write_shard(out / rel, keys, chunk)
                shards.append({"path": rel, "sequences": len(chunk), "sha256": sha, "bytes": size})
            splits[split] = {
                "documents": docs[split],
                "tokens": int(len(tokens)),
                "sequences": int(len(samples)),
                "dropped_tokens": int(len(tokens) - (len(samples) * seq_len + 1)),
                "shards": shards,
            }
        domain_entries.append(
            {"name": name, "inputs": [str(p) for p in files], "documents": len(docs_ids), "splits": splits}
        )
        if progress:
            summary = ", ".join(f"{s} {v['sequences']}" for s, v in splits.items())
            print(f"prepared {name}: {len(docs_ids)} documents -> sequences {summary}", file=sys.stderr)

    manifest = {
        "format_version": FORMAT_VERSION,
        "created_by": f"aioli_fast {__version__}",
        "seq_len": seq_len,
        "sample_len": seq_len + 1,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "tokenizer": tok.spec(),
        "split": {"unit": "document", "seed": seed, **{f"{k}_fraction": v for k, v in fractions.items()}},
        "domains": domain_entries,
    }
    atomic_write_json(manifest_path, manifest)
    return manifest
