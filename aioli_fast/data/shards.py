"""WebDataset tar shards of fixed-length token sequences, and the corpus manifest.

Layout of a prepared corpus::

    OUT/manifest.json
    OUT/<domain>/<split>-00000.tar     members "<domain>-<split>-<index:09d>.tokens.npy"

Each sample is one ``.npy`` array of ``seq_len + 1`` token ids (uint16 when the vocabulary fits, else
uint32): the model reads ``[:-1]`` as input and ``[1:]`` as labels, and consecutive samples of a split
overlap by one token so no token is lost as a target. Any WebDataset reader can open the shards.

Files are written under a temporary name and renamed when complete, so a crash never leaves a file that
looks finished; ``manifest.json`` is written last and marks the corpus as complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import DataError, ShardMissingError
from ..fileio import atomic_write_bytes, progress_bar
from .remote import ShardStore, is_url, local_path_of

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
SAMPLE_EXT = ".tokens.npy"
DOMAIN_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")  # use with fullmatch
PROBLEMS_PER_SHARD = 3  # verify lists this many problems of one shard, then counts the rest


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_shard(path: Path, keys: list[str], samples_SL: np.ndarray) -> tuple[str, int]:
    """Write one tar shard of samples [S, L] atomically; returns (its sha256, its size in bytes)."""
    data = shard_bytes(keys, samples_SL)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest(), len(data)


def _npy_header(sample: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(sample))
    return buf.getvalue()


def shard_bytes(keys: list[str], samples_SL: np.ndarray) -> bytes:
    """The tar archive of one shard, built at once with numpy: the bytes ``tarfile`` writes for the same
    members (USTAR headers, mode 0644, mtime 0; each member an ``.npy`` file), without its per-member
    Python work. Samples share one ``.npy`` header and, when their keys are equally long, one tar header
    up to the name and checksum."""
    S = len(keys)
    if S != len(samples_SL):
        raise ValueError(f"{S} keys for {len(samples_SL)} samples")
    names = [(key + SAMPLE_EXT).encode("utf-8") for key in keys]
    if S == 0 or len({len(n) for n in names}) != 1 or len(names[0]) > 100:
        return _shard_bytes_tarfile(keys, samples_SL)
    samples = np.ascontiguousarray(samples_SL)
    npy = np.frombuffer(_npy_header(samples[0]), dtype=np.uint8)
    data_len = len(npy) + samples[0].nbytes
    info = tarfile.TarInfo(name=names[0].decode())
    info.size, info.mtime, info.mode = data_len, 0, 0o644
    template = np.frombuffer(info.tobuf(format=tarfile.USTAR_FORMAT), dtype=np.uint8)
    member = 512 + -(-data_len // 512) * 512
    out = np.zeros((S, member), dtype=np.uint8)
    out[:, :512] = template
    n = len(names[0])
    out[:, :n] = np.frombuffer(b"".join(names), dtype=np.uint8).reshape(S, n)
    out[:, 148:156] = ord(" ")  # the checksum is taken with its own field as spaces
    chksum = out[:, :512].sum(axis=1, dtype=np.int64)
    digits = np.array([(chksum >> (3 * (5 - i))) & 7 for i in range(6)], dtype=np.uint8).T + ord("0")
    out[:, 148:154] = digits  # "%06o\0 "
    out[:, 154] = 0
    out[:, 512 : 512 + len(npy)] = npy
    out[:, 512 + len(npy) : 512 + data_len] = samples.view(np.uint8).reshape(S, -1)
    size = S * member + 2 * 512  # + the end-of-archive blocks, then padded to a record
    total = -(-size // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
    return out.tobytes() + bytes(total - S * member)


def _shard_bytes_tarfile(keys: list[str], samples_SL: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, sample in zip(keys, samples_SL, strict=True):
            arr = io.BytesIO()
            np.save(arr, np.ascontiguousarray(sample), allow_pickle=False)
            data = arr.getvalue()
            info = tarfile.TarInfo(name=key + SAMPLE_EXT)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class ShardContent:
    """What :func:`decode_shard` found in one shard.

    tokens:   [S, sample_len] in the stored dtype (uint16 or uint32); a bad row holds zeros.
    good:     [S] bool, False for a row that is missing, unreadable, or fails a check.
    keys:     [S] sample keys ("" for a row that could not be read).
    problems: one message per problem, each naming the file (and the sample).
    """

    tokens: np.ndarray
    good: np.ndarray
    keys: list[str]
    problems: list[str]


def decode_shard(
    path: Path, *, sample_len: int, vocab_size: int, expected: int | None = None, strict: bool = True
) -> ShardContent:
    """Read and check every sample of a shard.

    ``strict``: the first problem raises DataError naming the file (and the sample). Otherwise every
    problem is recorded and the rows it concerns are marked bad: a member that is not a valid sample, a
    sample of the wrong dtype or shape or with a token id >= ``vocab_size``, rows missing from a corrupt
    or truncated tar, or rows that the manifest (``expected``, when given) counts and the shard lacks.
    Rows beyond ``expected`` are dropped (and reported). A missing file is an error in both modes.
    """
    path = Path(path)
    if not path.is_file():
        raise ShardMissingError(f"shard not found: {path}")
    keys: list[str] = []
    rows: list[np.ndarray | None] = []
    problems: list[str] = []

    def problem(message: str) -> None:
        if strict:
            raise DataError(message)
        problems.append(message)

    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if not member.name.endswith(SAMPLE_EXT):
                    problem(f"{path}: unexpected member {member.name!r} (expected *{SAMPLE_EXT})")
                    continue
                key = member.name[: -len(SAMPLE_EXT)]
                raw = tar.extractfile(member).read()
                arr = None
                if len(raw) != member.size:
                    problem(f"{path}: sample {key} is truncated")
                else:
                    try:
                        arr = np.load(io.BytesIO(raw), allow_pickle=False)
                    except Exception as exc:  # noqa: BLE001 - numpy raises several types
                        problem(f"{path}: sample {key} is not a valid .npy array ({exc})")
                bad_type = arr is not None and arr.dtype not in (np.uint16, np.uint32)
                if arr is not None and (bad_type or arr.shape != (sample_len,)):
                    problem(
                        f"{path}: sample {key} has dtype {arr.dtype} and shape {arr.shape}; "
                        f"expected uint16/uint32 of shape ({sample_len},)"
                    )
                    arr = None
                if arr is not None and len(arr) and int(arr.max()) >= vocab_size:
                    problem(f"{path}: sample {key} has token id {int(arr.max())} >= vocab_size {vocab_size}")
                    arr = None
                keys.append(key)
                rows.append(arr)
    except (tarfile.TarError, EOFError, OSError) as exc:
        problem(f"corrupt or truncated shard {path}: {exc}")
    if not rows and expected is None:
        problem(f"shard {path} holds no samples")
    if expected is not None and len(rows) != expected:
        problem(f"{path}: holds {len(rows)} samples but the manifest says {expected} (truncated?)")
        del rows[expected:], keys[expected:]
        keys += [""] * (expected - len(rows))
        rows += [None] * (expected - len(rows))
    if not rows and strict:
        raise DataError(f"shard {path} holds no samples")
    dtype = np.uint32 if any(r is not None and r.dtype == np.uint32 for r in rows) else np.uint16
    tokens = np.zeros((len(rows), sample_len), dtype=dtype)
    good = np.zeros(len(rows), dtype=bool)
    for i, row in enumerate(rows):
        if row is not None:
            tokens[i], good[i] = row, True
    return ShardContent(tokens, good, keys, problems)


def read_shard(
    path: Path, *, sample_len: int, vocab_size: int, expected: int | None = None
) -> tuple[list[str], np.ndarray]:
    """Read every sample of a shard: (keys, tokens [S, sample_len] int64).

    Raises DataError naming the file (and the sample) when the shard is missing, corrupt or
    truncated, holds a sample of the wrong shape, dtype or with a token id >= vocab_size, or holds
    another number of samples than ``expected`` (the manifest's count: a tar cut at a member boundary
    reads as a complete, shorter archive, so only the count reveals it).
    """
    content = decode_shard(path, sample_len=sample_len, vocab_size=vocab_size, expected=expected)
    return content.keys, content.tokens.astype(np.int64)


@dataclass
class CorpusCheck:
    """What :meth:`Manifest.verify` found: one line per problem (each naming the file; past
    ``PROBLEMS_PER_SHARD`` problems of one shard, one line counts the rest), and the totals."""

    shards: int
    problems: int
    lines: list[str]


@dataclass(frozen=True)
class ShardInfo:
    path: Path  # where it is read from: the corpus folder, or the cache of a remote corpus
    sequences: int
    sha256: str
    size: int | None = None  # bytes; None in manifests that do not record it
    rel: str = ""  # its path relative to the corpus root, as the manifest writes it


@dataclass(frozen=True)
class Manifest:
    """A prepared corpus: its domains (in domain-id order), their splits and shards."""

    root: Path
    seq_len: int
    vocab_size: int
    eos_id: int
    tokenizer: dict
    domains: tuple[str, ...]
    shards: dict  # (domain, split) -> tuple[ShardInfo, ...]
    raw: dict
    store: ShardStore | None = None  # a corpus on object storage: its URL and local cache

    @property
    def sample_len(self) -> int:
        return self.seq_len + 1

    @property
    def location(self) -> str:
        """The corpus as the user named it: its URL, or its folder."""
        return self.store.url if self.store is not None else str(self.root)

    def local(self, shard: ShardInfo) -> Path:
        """A local file holding ``shard``: the shard itself, or for a remote corpus its cached copy
        (fetched now when absent, checked against the manifest's sha256)."""
        if self.store is None:
            return shard.path
        return self.store.fetch(shard.rel, shard.sha256, shard.size)

    def decode(self, shard: ShardInfo, **options) -> ShardContent:
        """:func:`decode_shard` of ``shard`` (``options``: its keyword arguments but ``path``); for a
        remote corpus a cached copy evicted (by another reader making room) between its fetch and its
        opening is fetched once more."""
        try:
            return decode_shard(self.local(shard), **options)
        except ShardMissingError:
            if self.store is None:
                raise
            return decode_shard(self.local(shard), **options)

    def prefetch(self, shards: Sequence[ShardInfo]) -> None:
        """Start fetching ``shards`` of a remote corpus in the background (nothing for a local one)."""
        if self.store is not None:
            self.store.prefetch((s.rel, s.sha256, s.size) for s in shards)

    def split_shards(self, domain: str, split: str) -> tuple[ShardInfo, ...]:
        if domain not in self.domains:
            raise DataError(
                f"domain {domain!r} is not in the corpus {self.location} (it has {list(self.domains)})"
            )
        found = self.shards.get((domain, split))
        if not found:
            raise DataError(f"corpus {self.location} has no {split!r} split for domain {domain!r}")
        return found

    def fingerprint(self, domains: Sequence[str] | None = None) -> dict:
        """What a run trained on, saved in its checkpoints and compared on resume
        (:func:`corpus_changes`): the tokenizer (by content), ``seq_len``, and per domain and split a
        digest of its shards' sha256 and sequence counts (their layout, order and seed). Equal for a
        corpus copied or moved; different for one prepared again with another tokenizer, ``seq_len``,
        shard size or seed, or from other text."""
        tokenizer = {k: self.tokenizer.get(k) for k in ("kind", "vocab_size", "eos_id", "sha256")}
        shards = {}
        for (domain, split), group in sorted(self.shards.items()):
            if domains is None or domain in domains:
                digest = hashlib.sha256(json.dumps([[s.sha256, s.sequences] for s in group]).encode())
                shards[f"{domain}/{split}"] = digest.hexdigest()[:16]
        return {"tokenizer": tokenizer, "seq_len": self.seq_len, "shards": shards}

    def read(self, shard: ShardInfo) -> tuple[list[str], np.ndarray]:
        """Read one of this corpus' shards, checked against the manifest: (keys, tokens [S, T+1])."""
        content = self.decode(
            shard, sample_len=self.sample_len, vocab_size=self.vocab_size, expected=shard.sequences
        )
        return content.keys, content.tokens.astype(np.int64)

    def check_files(self, domains: Sequence[str], splits: Sequence[str]) -> None:
        """Cheap start-up check (one ``stat`` per shard): every shard of these splits exists and has the
        size the manifest records. Raises DataError naming the first bad shard. For a remote corpus
        the sizes come from one listing of the store (or one request per shard where it cannot list)."""
        if self.store is not None:
            self._check_remote_files(domains, splits)
            return
        for domain in domains:
            for split in splits:
                for shard in self.split_shards(domain, split):
                    try:
                        size = shard.path.stat().st_size
                    except OSError:
                        raise ShardMissingError(f"shard not found: {shard.path}") from None
                    if shard.size is not None and size != shard.size:
                        raise DataError(
                            f"shard {shard.path} has {size} bytes, the manifest says {shard.size} "
                            "(truncated or replaced?)"
                        )

    def _check_remote_files(self, domains: Sequence[str], splits: Sequence[str]) -> None:
        listed = self.store.sizes()
        for domain in domains:
            for split in splits:
                for shard in self.split_shards(domain, split):
                    where = f"{self.store.url}/{shard.rel}"
                    size = listed.get(shard.rel)
                    if size is None:
                        try:
                            size = self.store.size(shard.rel)
                        except DataError as exc:
                            raise ShardMissingError(f"shard not found: {exc}") from None
                    if shard.size is not None and size != shard.size:
                        raise DataError(
                            f"shard {where} has {size} bytes, the manifest says {shard.size} "
                            "(truncated or replaced?)"
                        )

    def verify(self, progress: bool = True) -> CorpusCheck:
        """Check the whole corpus as training would, and more.

        The manifest must agree with itself (``sample_len`` = ``seq_len`` + 1, ``eos_id`` below
        ``vocab_size``, the tokenizer's vocabulary and end-of-document id, each split's counts with its
        shards', an HF ``tokenizer.json`` with its sha256) and every shard of every split with the
        manifest: it exists with the recorded size and sha256, and every sample is a ``.npy`` array of
        ``seq_len + 1`` ids below ``vocab_size``, as many as the manifest counts. Every problem is one line
        naming the file (at most ``PROBLEMS_PER_SHARD`` per shard, then a count of the rest).
        """
        lines = self._check_manifest()
        total = len(lines)
        shards = [s for group in self.shards.values() for s in group]
        decode = self.seq_len >= 1 and self.vocab_size >= 1  # else no sample can be checked
        bar = progress_bar(len(shards), "verify", "shard", progress)
        for shard in shards:
            found = self._check_shard(shard, decode)
            total += len(found)
            lines += found[:PROBLEMS_PER_SHARD]
            if len(found) > PROBLEMS_PER_SHARD:
                lines.append(
                    f"{shard.path}: and {len(found) - PROBLEMS_PER_SHARD} more problem(s) in this shard"
                )
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return CorpusCheck(len(shards), total, lines)

    def _check_manifest(self) -> list[str]:
        raw, where = self.raw, self.root / MANIFEST_NAME
        problems = []
        if self.seq_len < 1 or self.vocab_size < 1:
            problems.append(
                f"{where}: seq_len {self.seq_len} and vocab_size {self.vocab_size} must be positive"
            )
        if raw.get("sample_len", self.sample_len) != self.sample_len:
            problems.append(
                f"{where}: sample_len {raw['sample_len']} is not seq_len + 1 = {self.sample_len} "
                "(seq_len edited?)"
            )
        if not 0 <= self.eos_id < self.vocab_size:
            problems.append(f"{where}: eos_id {self.eos_id} is not below vocab_size {self.vocab_size}")
        for key in ("vocab_size", "eos_id"):
            if key in self.tokenizer and self.tokenizer[key] != getattr(self, key):
                problems.append(
                    f"{where}: the tokenizer's {key} is {self.tokenizer[key]}, the manifest's "
                    f"{getattr(self, key)}"
                )
        if self.tokenizer.get("kind") == "hf" and not Path(self.tokenizer.get("path", "")).is_absolute():
            file = self.root / self.tokenizer.get("path", "tokenizer.json")
            if not file.is_file():
                problems.append(f"{where}: the corpus' tokenizer {file} is missing")
            elif hashlib.sha256(file.read_bytes()).hexdigest() != self.tokenizer.get("sha256"):
                problems.append(f"{file} does not match the tokenizer's sha256 in the manifest (replaced?)")
        names = [d["name"] for d in raw["domains"]]
        for name in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"{where}: domain {name!r} is listed {names.count(name)} times")
        for dom in raw["domains"]:
            for split, info in dom["splits"].items():
                try:
                    problems += self._check_counts(dom["name"], split, info)
                except (KeyError, TypeError, ValueError) as exc:
                    problems.append(
                        f"{where}: domain {dom['name']!r}: the {split} split's counts are not valid "
                        f"({type(exc).__name__}: {exc})"
                    )
        return problems

    def _check_counts(self, name: str, split: str, info: dict) -> list[str]:
        """A split's counts in the manifest agree with its shards' and with seq_len."""
        problems = []
        label = f"{self.root / MANIFEST_NAME}: domain {name!r}: the {split} split's"
        counted = sum(int(s["sequences"]) for s in info["shards"])
        if "sequences" in info and int(info["sequences"]) != counted:
            problems.append(
                f"{label} sequences ({info['sequences']}) are not the sum over its shards ({counted})"
            )
        if counted and "tokens" in info and "dropped_tokens" in info:
            # each packed unit (a block, or a segment of one: the shard name up to its last "-") holds
            # its samples' tokens plus the one token the last sample's label shares with nothing after
            units = len({Path(str(s["path"])).name.rsplit("-", 1)[0] for s in info["shards"]})
            packed = int(info["tokens"]) - int(info["dropped_tokens"])
            if packed != counted * self.seq_len + units:
                problems.append(
                    f"{label} tokens - dropped_tokens ({packed}) are not sequences x seq_len + the packed "
                    f"units ({counted} x {self.seq_len} + {units})"
                )
        return problems

    def _check_shard(self, shard: ShardInfo, decode: bool = True) -> list[str]:
        if self.store is not None:  # a fresh download, checked here rather than by the cache
            try:
                shard = replace(shard, path=self.store.download_unchecked(shard.rel))
            except DataError as exc:
                return [str(exc)]
            try:
                return self._check_shard_file(shard, decode)
            finally:
                shard.path.unlink(missing_ok=True)
        return self._check_shard_file(shard, decode)

    def _check_shard_file(self, shard: ShardInfo, decode: bool) -> list[str]:
        try:
            size = shard.path.stat().st_size
        except OSError:
            return [f"shard not found: {shard.path}"]
        problems = []
        if shard.size is not None and size != shard.size:
            problems.append(
                f"shard {shard.path} has {size} bytes, the manifest says {shard.size} "
                "(truncated or replaced?)"
            )
        try:
            digest = hashlib.sha256()
            with open(shard.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            return [*problems, f"cannot read shard {shard.path}: {exc.strerror or exc}"]
        if digest.hexdigest() != shard.sha256:
            problems.append(f"shard {shard.path} does not match its sha256 in the manifest (damaged?)")
        if not decode:
            return problems
        content = decode_shard(
            shard.path,
            sample_len=self.sample_len,
            vocab_size=self.vocab_size,
            expected=shard.sequences,
            strict=False,
        )
        problems += content.problems
        dtype = self.raw.get("dtype")
        if dtype is not None and content.good.any() and content.tokens.dtype.name != dtype:
            problems.append(
                f"{shard.path}: samples of dtype {content.tokens.dtype.name}, the manifest says {dtype}"
            )
        return problems

    def num_sequences(self, domain: str, split: str) -> int:
        return sum(s.sequences for s in self.split_shards(domain, split))


def load_manifest(
    path: str | Path,
    *,
    cache_dir: str | Path | None = None,
    cache_gb: float | None = None,
    storage_options: dict | None = None,
) -> Manifest:
    """Load ``manifest.json`` (a corpus folder or the file itself) and check that it is complete.

    ``path`` may be an fsspec URL (``s3://``, ``gs://``, ``https://``, ``file://``): the manifest is
    read remotely and the shards are fetched when read, into ``cache_dir`` (at most ``cache_gb``;
    defaults: ``$AIOLI_CACHE_DIR`` or ``~/.cache/aioli_fast``, ``$AIOLI_CACHE_GB`` or 50), with
    ``storage_options`` for the filesystem (docs/data.md)."""
    if is_url(path):
        url = str(path)
        if url.rstrip("/").endswith("/" + MANIFEST_NAME):
            url = url.rstrip("/")[: -len(MANIFEST_NAME) - 1]
        store = ShardStore(url, cache_dir=cache_dir, cache_gb=cache_gb, storage_options=storage_options)
        try:
            text = store.read_bytes(MANIFEST_NAME).decode("utf-8")
        except DataError as exc:
            hint = " (was `aioli-fast prepare` interrupted?)" if "no such object" in str(exc) else ""
            raise DataError(f"no corpus manifest at {exc}{hint}") from None
        manifest = _parse_manifest(text, store.cache, f"{url}/{MANIFEST_NAME}", store)
        tok = manifest.tokenizer
        if tok.get("kind") == "hf" and not Path(tok.get("path", "")).is_absolute():
            store.fetch(tok.get("path", "tokenizer.json"), tok.get("sha256"))  # beside the cached shards
        return manifest
    path = local_path_of(path)
    file = path / MANIFEST_NAME if path.is_dir() else path
    if not file.is_file():
        hint = " (was `aioli-fast prepare` interrupted?)" if path.is_dir() else ""
        raise DataError(f"no corpus manifest at {file}{hint}")
    return _parse_manifest(file.read_text(encoding="utf-8"), file.parent, str(file), None)


def _parse_manifest(text: str, root: Path, file: str, store: ShardStore | None) -> Manifest:
    try:
        raw = json.loads(text)
        if raw.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{file}: format_version {raw.get('format_version')!r}, this version reads {FORMAT_VERSION}"
            )
        shards = {}
        for dom in raw["domains"]:
            for split, info in dom["splits"].items():
                shards[(dom["name"], split)] = tuple(
                    ShardInfo(root / s["path"], int(s["sequences"]), s["sha256"], s.get("bytes"), s["path"])
                    for s in info["shards"]
                )
        return Manifest(
            root=root,
            seq_len=int(raw["seq_len"]),
            vocab_size=int(raw["vocab_size"]),
            eos_id=int(raw["eos_id"]),
            tokenizer=dict(raw["tokenizer"]),
            domains=tuple(d["name"] for d in raw["domains"]),
            shards=shards,
            raw=raw,
            store=store,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{file} is not a valid corpus manifest ({type(exc).__name__}: {exc})") from exc


def corpus_changes(saved: dict | None, current: dict) -> list[str]:
    """What differs between a checkpoint's corpus fingerprint and this corpus's (``Manifest.fingerprint``
    of the run's domains), in words; empty when they agree or the checkpoint has none (an older one)."""
    if not saved:
        return []
    changes = []
    if saved.get("tokenizer") != current["tokenizer"]:
        changes.append(f"the tokenizer ({saved.get('tokenizer')} -> {current['tokenizer']})")
    if saved.get("seq_len") != current["seq_len"]:
        changes.append(f"seq_len ({saved.get('seq_len')} -> {current['seq_len']})")
    old, new = saved.get("shards", {}), current["shards"]
    differing = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    if differing:
        shown = ", ".join(differing[:6]) + (" ..." if len(differing) > 6 else "")
        changes.append(f"the shards of {shown} (prepared again: other text, shard size or seed)")
    return changes
