"""The unit of work of ``prepare``: a *block* of a domain's inputs, prepared on its own.

A domain's input files (sorted) are cut into blocks from their sizes alone (no file is read to plan):
consecutive files up to ``block_bytes`` each are grouped until a block holds at least ``block_bytes``; a
larger file is a block of its own, cut into byte ranges of ``block_bytes`` when it is uncompressed JSON
lines (a range holds the lines that start in it). Each block is read, split (by document hash),
tokenized, packed and written by one process, into shards of its own, so that

- memory is bounded by the block, not the domain (a domain of any size prepares in the same memory). A
  large file that cannot be cut by offset (compressed, Parquet, Arrow) is read as a stream in *segments*
  of ``2 x block_bytes`` of text, each packed on its own;
- blocks are independent: the corpus is the same whether its blocks are prepared by one process, a
  pool of workers or N machines (``--part i/N``), and an interrupted run loses only the shards in flight;
- a domain that fits in one block is prepared exactly as a whole-domain pass would (its documents packed
  in the order of their hashes, held-out splits topped up when too short): small corpora do not change.

Within a block (segment), the documents of one split are packed in the order of their hashes and the
tail that does not fill a sample is dropped (counted in the manifest): at most ``seq_len`` tokens per
split and block, under 0.01% of a 32 MB block at ``seq_len`` 2048.

Block ``0`` of a domain writes ``<split>-<k:05d>.tar`` (the names of a one-block domain), block ``b > 0``
``<split>-<b:05d>-<k:05d>.tar``, segment ``s > 0`` of block ``b`` ``<split>-<b:05d>.<s:05d>-<k:05d>.tar``;
sample keys carry the same numbers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AioliError, DataError
from .readers import ZSTD_JSONL_SUFFIXES, iter_arrow, iter_parquet, iter_zstd_lines
from .shards import SPLITS, write_shard
from .tokenizers import replace_surrogates

BLOCK_BYTES = 32 << 20  # input bytes per block (the default; prepare(block_bytes=...))
CHUNK_DOCUMENTS = 256  # documents tokenized per call of the tokenizer's batch API

#: files read as JSON lines (one document per line, from a text field)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json.gz", *ZSTD_JSONL_SUFFIXES)


@dataclass(frozen=True)
class Block:
    """Block ``index`` of domain ``domain``: whole ``files``, or the byte range ``[start, end)`` of one
    uncompressed JSON-lines file (``end`` -1: whole files)."""

    domain: str
    index: int
    files: tuple[str, ...]
    start: int = 0
    end: int = -1

    @property
    def key(self) -> str:
        return f"{self.domain}/{self.index}"


#: files whose layout is read from their start (:func:`json_layout`): JSON lines, one JSON array of records,
#: or (``.json`` only) a file of any other JSON, read as text as before
JSON_SUFFIXES = (".json", ".json.gz")
#: how much of a ``.json`` file :func:`json_layout` reads
SNIFF_CHARS = 1 << 20


def json_layout(path: Path | str, text_field: str = "text") -> str:
    """How a ``.json`` / ``.json.gz`` file holds documents, from its start: ``array`` (one JSON array of
    records, read whole), ``lines`` (JSON lines: the first line is a JSON object with ``text_field``, as
    ``datasets``' ``to_json`` writes), else ``text`` for ``.json`` (any other JSON, such as a
    ``package.json`` or a tokenizer's ``vocab.json``: the whole file is one document) and ``lines`` for
    ``.json.gz`` (which was always read as JSON lines)."""
    path = Path(path)
    try:
        with _open_text(path) as f:
            head = f.read(SNIFF_CHARS)
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    start = head.lstrip()
    if start.startswith("["):
        return "array"
    fallback = "lines" if str(path).endswith(".gz") else "text"
    first, newline, _ = start.partition("\n")
    if not newline and len(head) == SNIFF_CHARS:  # a first line longer than the sniff: by its start
        return "lines" if first.startswith("{") and f'"{text_field}"' in first else fallback
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return fallback
    return "lines" if isinstance(record, dict) and text_field in record else fallback


def is_jsonl(path: Path | str, text_field: str = "text") -> bool:
    """Whether a file holds one document per JSON line (or per record of a JSON array)."""
    if str(path).endswith(JSON_SUFFIXES):
        return json_layout(path, text_field) != "text"
    return str(path).endswith(JSONL_SUFFIXES)


def _splittable(path: Path, text_field: str = "text") -> bool:
    """A file whose documents can be read from any byte offset: uncompressed JSON lines."""
    if str(path).endswith(".json"):
        return json_layout(path, text_field) == "lines"
    return is_jsonl(path) and not str(path).endswith((".gz", *ZSTD_JSONL_SUFFIXES))


def _json_array_texts(path: Path, text_field: str) -> Iterator[str]:
    """The documents of a file holding one JSON array of records (read whole)."""
    try:
        with _open_text(path) as f:
            records = json.load(f)
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON (line {exc.lineno}: {exc.msg})") from exc
    if not isinstance(records, list):
        raise DataError(f"{path}: expected one JSON array of records, got a {type(records).__name__}")
    for index, record in enumerate(records):
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}: record {index} of the array has no string field {text_field!r}")
        yield replace_surrogates(text)


def plan_blocks(
    domain: str, files: list[Path], block_bytes: int = BLOCK_BYTES, text_field: str = "text"
) -> list[Block]:
    """The blocks of a domain's (sorted) input files, from their sizes (and the start of a large
    ``.json``, whose layout decides whether it can be cut by offset)."""
    blocks: list[Block] = []
    group: list[str] = []
    size = 0

    def close_group() -> None:
        nonlocal group, size
        if group:
            blocks.append(Block(domain, len(blocks), tuple(group)))
        group, size = [], 0

    for path in files:
        n = path.stat().st_size
        if n > block_bytes:  # a block of its own: cut by offset, or read as a stream in segments
            close_group()
            if _splittable(path, text_field):
                for start in range(0, n, block_bytes):
                    blocks.append(
                        Block(domain, len(blocks), (str(path),), start, min(start + block_bytes, n))
                    )
            else:
                blocks.append(Block(domain, len(blocks), (str(path),)))
            continue
        group.append(str(path))
        size += n
        if size >= block_bytes:
            close_group()
    close_group()
    return blocks


# ------------------------------------------------------------------------------------------ reading


def _open_text(path: Path):
    import gzip

    # utf-8-sig drops a byte-order mark at the start of a file; undecodable bytes become U+FFFD
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace")
    return open(path, encoding="utf-8-sig", errors="replace")


def _json_text(line: str, path: Path, lineno: int, text_field: str, offset: bool = False) -> str:
    where = f"{path} (the line at byte {lineno})" if offset else f"{path}:{lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg})") from exc
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise DataError(f"{where}: no string field {text_field!r} in this record")
    # JSON may carry lone surrogates ("\\ud800"), which are not text: U+FFFD instead
    return replace_surrogates(text)


def iter_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of one input file: the whole file, one per JSON line, or one per row of a Parquet or
    Arrow file (field or column ``text_field``)."""
    if str(path).endswith(".parquet"):
        yield from iter_parquet(path, text_field)
        return
    if str(path).endswith(".arrow"):
        yield from iter_arrow(path, text_field)
        return
    if str(path).endswith(ZSTD_JSONL_SUFFIXES):
        for lineno, line in enumerate(iter_zstd_lines(path), 1):
            if line.strip():
                yield _json_text(line, path, lineno, text_field)
        return
    if str(path).endswith(JSON_SUFFIXES) and json_layout(path, text_field) == "array":
        yield from _json_array_texts(path, text_field)
        return
    try:
        with _open_text(path) as f:
            if not is_jsonl(path, text_field):
                yield f.read()
                return
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield _json_text(line, path, lineno, text_field)
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def iter_range_documents(path: Path, start: int, end: int, text_field: str = "text") -> Iterator[str]:
    """Documents of the JSON lines that start in bytes ``[start, end)`` of an uncompressed file."""
    try:
        with open(path, "rb") as f:
            if start > 0:
                f.seek(start - 1)
                if f.read(1) != b"\n":
                    f.readline()  # the line that started before belongs to the previous block
            while (offset := f.tell()) < end:
                raw = f.readline()
                if not raw:
                    break
                if raw.startswith(b"\xef\xbb\xbf") and f.tell() == len(raw):  # a byte-order mark
                    raw = raw[3:]
                line = raw.decode("utf-8", errors="replace")
                if line.strip():
                    yield _json_text(line, path, offset, text_field, offset=True)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def block_documents(block: Block, text_field: str) -> Iterator[tuple[str, int]]:
    """(text, index of its file in ``block.files``) of every non-blank document of a block, in order."""
    if block.end >= 0:
        for text in iter_range_documents(Path(block.files[0]), block.start, block.end, text_field):
            if text.strip():
                yield text, 0
        return
    for f, name in enumerate(block.files):
        for text in iter_documents(Path(name), text_field):
            if text.strip():
                yield text, f


# ------------------------------------------------------------------------------------------ naming

_SHARD_RE = re.compile(
    r"(?P<split>train|val|test)-(?:(?P<block>\d{5})(?:\.(?P<segment>\d{5}))?-)?(?P<k>\d{5})\.tar"
)


def _unit(block: int, segment: int) -> str:
    """The part of a name that tells a shard's block and segment ("" for the first of a domain)."""
    if block == 0 and segment == 0:
        return ""
    return f"{block:05d}-" if segment == 0 else f"{block:05d}.{segment:05d}-"


def shard_name(split: str, block: int, k: int, segment: int = 0) -> str:
    return f"{split}-{_unit(block, segment)}{k:05d}.tar"


def sample_key(domain: str, split: str, block: int, index: int, segment: int = 0) -> str:
    return f"{domain}-{split}-{_unit(block, segment)}{index:09d}"


def block_of_file(name: str) -> int | None:
    """The block a shard file (or a temporary file of one) belongs to; None for another name."""
    m = _SHARD_RE.fullmatch(name.lstrip(".").split(".tar")[0] + ".tar")
    if m is None:
        return None
    return int(m["block"]) if m["block"] else 0


# --------------------------------------------------------------------------------------- preparing


def shard_on_disk(out: Path, record: dict | None) -> bool:
    """A shard record (``path`` relative to ``out``, ``bytes``) whose file is there with that size: shards
    are renamed into place whole, so this is a finished shard."""
    if record is None:
        return False
    try:
        return (out / record["path"]).stat().st_size == record["bytes"]
    except OSError:
        return False


@dataclass(frozen=True)
class BlockJob:
    """Everything one block's preparation needs (sent to a worker process)."""

    block: Block
    out: str  # the staging folder
    seq_len: int
    fractions: dict
    shard_sequences: int
    text_field: str
    seed: int
    dtype: str
    single: bool  # the domain's only block: checked and topped up as a whole domain
    segment_bytes: int  # text per segment of a block read as a stream (2 x block_bytes: see plan_blocks)
    fingerprint: str  # of the domain's settings and inputs: shards of an earlier attempt are reused
    progress: bool = True


def progress_path(out: Path, block: Block) -> Path:
    """The log of the shards a block has finished so far (read by a re-run of an interrupted block): a
    JSON line with the fingerprint, then one per finished shard (appended once the shard is on disk)."""
    return out / block.domain / f".block-{block.index:05d}.jsonl"


def finished_shards(out: Path, block: Block, fingerprint: str) -> dict:
    """The shards of an earlier attempt at ``block`` with the same fingerprint, by path ({} if none).
    A line cut short by a kill ends the log (its shard is written again)."""
    try:
        lines = progress_path(out, block).read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    if not records or not isinstance(records[0], dict) or records[0].get("fingerprint") != fingerprint:
        return {}
    return {r["path"]: r for r in records[1:] if isinstance(r, dict) and "path" in r}


def encode_documents(tok, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    """Token ids of each text followed by the end-of-document id, in ``dtype``."""
    eos = np.asarray([tok.eos_id], dtype=dtype)
    return [np.concatenate([ids.astype(dtype, copy=False), eos]) for ids in tok.encode_batch(texts)]


def prepare_block(job: BlockJob, tok, document_hash, assign_splits, check_splits, pack) -> dict:
    """Read, split, tokenize, pack and write one block; returns its manifest entry.

    The block is read as a stream and handled in *segments* of at least ``job.segment_bytes`` of text
    (whole documents; a block planned from file sizes is one segment unless it is one large file that
    cannot be cut by offset, such as a compressed or columnar one): memory is bounded by the segment.
    The split, check and pack functions are prepare's (passed in to keep one definition of each)."""
    block = job.block
    out = Path(job.out)
    (out / block.domain).mkdir(exist_ok=True)
    earlier = finished_shards(out, block, job.fingerprint)
    splits: dict[str, dict] = {}
    documents = 0
    with progress_path(out, block).open("w", encoding="utf-8") as log:
        log.write(json.dumps({"fingerprint": job.fingerprint}) + "\n")
        for record in earlier.values():  # still finished if this attempt is cut short too
            log.write(json.dumps(record) + "\n")
        log.flush()
        segments = _segments(block_documents(block, job.text_field), job.segment_bytes)
        for segment, (texts, origins, last) in enumerate(segments):
            single = job.single and segment == 0 and last  # the domain's only text: a whole-domain pass
            hashes = [document_hash(text, job.seed) for text in texts]
            docs = []
            for start in range(0, len(texts), CHUNK_DOCUMENTS):
                docs.extend(
                    encode_documents(tok, texts[start : start + CHUNK_DOCUMENTS], np.dtype(job.dtype))
                )
            texts.clear()  # (the list is shared with the segment reader: clearing frees the strings)
            if not docs and single:
                raise AioliError(
                    f"domain {block.domain!r}: its inputs hold no text ({len(block.files)} file(s) read)"
                )
            lengths = [len(d) for d in docs]
            # top-ups only in a whole-domain pass: in a domain of many blocks they would move documents
            # into held-out splits block by block, and the same text could land in train and val
            assigned, topups = assign_splits(hashes, lengths, job.seq_len, job.fractions, top_up=single)
            if single:

                def doc_name(i: int, origins=origins) -> str:
                    path = block.files[origins[i]]
                    return f"a document of {path}" if is_jsonl(path, job.text_field) else str(path)

                check_splits(
                    block.domain,
                    assigned,
                    lengths,
                    topups,
                    job.seq_len,
                    job.fractions,
                    doc_name,
                    job.progress,
                )
            part = _pack_and_write(job, out, segment, docs, hashes, assigned, pack, earlier, log)
            documents += len(docs)
            for split, entry in part.items():
                if split not in splits:
                    splits[split] = entry
                    continue
                total = splits[split]
                for key in ("documents", "tokens", "sequences", "dropped_tokens"):
                    total[key] += entry[key]
                total["shards"] += entry["shards"]
    return {"documents": documents, "splits": splits}


def _segments(documents: Iterator[tuple[str, int]], segment_bytes: int):
    """(texts, origins, is_last) of consecutive documents holding at least ``segment_bytes`` of text
    each (the last: what is left; at least one segment, maybe empty)."""
    texts: list[str] = []
    origins: list[int] = []
    size = 0
    pending = None
    for text, origin in documents:
        if pending is not None:
            yield (*pending, False)
            pending = None
        texts.append(text)
        origins.append(origin)
        size += len(text)
        if size >= segment_bytes:
            pending = (texts, origins)
            texts, origins, size = [], [], 0
    if pending is not None:
        if texts:
            yield (*pending, False)
        else:
            yield (*pending, True)
            return
    yield texts, origins, True


def _pack_and_write(
    job: BlockJob, out: Path, segment: int, docs, hashes, assigned, pack, earlier, log
) -> dict:
    """Pack each split of a segment (documents in the order of their hashes) and write its shards; a
    shard an earlier attempt finished (``earlier``) is kept. Returns the splits' manifest entries."""
    block, dtype = job.block, np.dtype(job.dtype)
    order = sorted(range(len(docs)), key=lambda i: hashes[i])
    splits = {}
    for split in SPLITS:
        if split != "train" and job.fractions[split] == 0:
            continue
        members = [i for i in order if assigned[i] == split]
        tokens = np.concatenate([docs[i] for i in members]) if members else np.empty(0, dtype=dtype)
        for i in members:
            docs[i] = None  # (memory: a document's ids live on in ``tokens`` only)
        L = job.seq_len
        n = (len(tokens) - 1) // L if len(tokens) > L else 0  # the samples pack() cuts
        shards = []
        for k, start in enumerate(range(0, n, job.shard_sequences)):
            stop = min(start + job.shard_sequences, n)
            chunk = pack(tokens[start * L : stop * L + 1], L)  # samples start..stop, and only these
            rel = f"{block.domain}/{shard_name(split, block.index, k, segment)}"
            record = earlier.get(rel)
            if not (record and record["sequences"] == len(chunk) and shard_on_disk(out, record)):
                keys = [
                    sample_key(block.domain, split, block.index, start + j, segment)
                    for j in range(len(chunk))
                ]
                sha, size = write_shard(out / rel, keys, chunk)
                record = {"path": rel, "sequences": len(chunk), "sha256": sha, "bytes": size}
                log.write(json.dumps(record) + "\n")
                log.flush()  # (not fsynced: after a power loss the shard is only written again)
            shards.append(record)
        splits[split] = {
            "documents": len(members),
            "tokens": int(len(tokens)),
            "sequences": int(n),
            "dropped_tokens": int(len(tokens) - (n * L + 1 if n else 0)),
            "shards": shards,
        }
        del tokens
    return splits
