"""The input formats of ``prepare`` beyond plain text and JSON lines.

- Parquet files (``.parquet``) and Arrow files (``.arrow``, stream or file format), one document per row
  from a text column: needs ``pyarrow``;
- Hugging Face ``datasets`` folders written by ``save_to_disk`` (``state.json`` + ``dataset_info.json``
  + Arrow files), read through their Arrow files: needs ``pyarrow`` only (not ``datasets``);
- zstandard-compressed JSON lines (``.jsonl.zst``, ``.json.zst``): needs ``zstandard``.

``pip install 'aioli_fast[data]'`` installs both readers. A folder that holds a dataset in a format
``prepare`` does not read (a ``DatasetDict`` folder, MosaicML MDS, Megatron ``.bin``/``.idx``, LMDB,
TFRecord) is an error naming the format, never read as text.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from pathlib import Path

from ..errors import AioliError, DataError
from .tokenizers import replace_surrogates

COLUMNAR_SUFFIXES = (".parquet", ".arrow")
ZSTD_JSONL_SUFFIXES = (".jsonl.zst", ".json.zst", ".jsonl.zstd")
#: binary files that are inputs, not files to skip
READABLE_BINARY = (*COLUMNAR_SUFFIXES, *ZSTD_JSONL_SUFFIXES, ".gz")


def need(module: str, what: str):
    """Import an optional reader, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        raise AioliError(
            f"reading {what} needs the '{package}' package: pip install 'aioli_fast[data]'"
        ) from exc


def is_readable_binary(path: Path | str) -> bool:
    return str(path).endswith(READABLE_BINARY)


def _column_texts(column, path: Path, field: str) -> Iterator[str]:
    for value in column.to_pylist():
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"{path}: column {field!r} holds {type(value).__name__} values, not text")
        yield replace_surrogates(value)


def _check_column(names: list[str], path: Path, field: str) -> None:
    if field not in names:
        raise DataError(
            f"{path}: no column {field!r} (columns: {', '.join(names)}); name the text column with "
            "--text-field or NAME=PATH:FIELD"
        )


def iter_parquet(path: Path, field: str) -> Iterator[str]:
    """The texts of column ``field`` of a Parquet file, read a batch of rows at a time."""
    pq = need("pyarrow.parquet", f"{path.name} (Parquet)")
    try:
        f = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own types
        raise DataError(f"cannot read {path} as Parquet: {exc}") from exc
    _check_column(f.schema_arrow.names, path, field)
    for batch in _read_batches(f.iter_batches(columns=[field], batch_size=1024), path, "Parquet"):
        yield from _column_texts(batch.column(0), path, field)


def _read_batches(batches, path: Path, kind: str):
    """The record batches of a reader; an error while reading one names the file."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - pyarrow raises its own types
            raise DataError(f"cannot read {path} as {kind}: {exc}") from exc
        yield batch


def iter_arrow(path: Path, field: str) -> Iterator[str]:
    """The texts of column ``field`` of an Arrow file (IPC stream, as ``datasets`` writes, or file)."""
    pa = need("pyarrow", f"{path.name} (Arrow)")
    ipc = importlib.import_module("pyarrow.ipc")
    with pa.memory_map(str(path)) as source:
        try:
            reader = ipc.open_stream(source)
            batches = iter(reader)
            names = reader.schema.names
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                reader = ipc.open_file(source)
            except pa.ArrowInvalid as exc:
                raise DataError(f"cannot read {path} as Arrow: {exc}") from exc
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            names = reader.schema.names
        _check_column(names, path, field)
        for batch in _read_batches(batches, path, "Arrow"):
            yield from _column_texts(batch.column(names.index(field)), path, field)


def iter_zstd_lines(path: Path, chunk_bytes: int = 1 << 20) -> Iterator[str]:
    """The lines of a zstandard-compressed text file (one frame or several), decoded as UTF-8
    (undecodable bytes become U+FFFD, a leading byte-order mark is dropped). A file that ends inside a
    frame is an error naming it: a truncated download must not pass for a shorter corpus."""
    zstandard = need("zstandard", f"{path.name} (zstandard)")
    pending = b""
    first = True
    try:
        with open(path, "rb") as f:
            dobj, data = zstandard.ZstdDecompressor().decompressobj(), f.read(chunk_bytes)
            while data:
                if dobj.eof:  # the previous frame ended: the next one starts here
                    dobj = zstandard.ZstdDecompressor().decompressobj()
                out = dobj.decompress(data)
                data = dobj.unused_data if dobj.eof and dobj.unused_data else f.read(chunk_bytes)
                pending += out
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    if first:
                        raw, first = raw.removeprefix(b"\xef\xbb\xbf"), False
                    yield raw.decode("utf-8", errors="replace") + "\n"
            if not dobj.eof:
                raise DataError(
                    f"cannot read {path}: the zstandard stream ends inside a frame (a truncated file)"
                )
    except zstandard.ZstdError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if pending:
        yield pending.decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------------- folders


def dataset_folder_files(folder: Path) -> list[Path] | None:
    """The Arrow files of a ``datasets`` ``save_to_disk`` folder, in order; None if it is not one."""
    state, info = folder / "state.json", folder / "dataset_info.json"
    if not (state.is_file() and info.is_file()):
        return None
    try:
        files = [folder / d["filename"] for d in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{folder} looks like a datasets folder but its state.json cannot be read: {exc}"
        ) from exc
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{folder}: the datasets folder lacks {missing[0].name} (listed in state.json)")
    return files


def unreadable_dataset_format(folder: Path) -> str | None:
    """The name of a dataset format ``folder`` holds that prepare does not read, or None."""
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        except (OSError, ValueError, AttributeError):
            splits = []
        example = folder / (splits[0] if splits else "train")
        return (
            f"a datasets DatasetDict (splits: {', '.join(splits) or '?'}); name the folder of one split, "
            f"e.g. {example}"
        )
    names = {p.name for p in folder.iterdir()}
    suffixes = {p.suffix for p in folder.iterdir() if p.is_file()}
    if "index.json" in names and ".mds" in suffixes:
        return "a MosaicML streaming (MDS) dataset"
    if ".idx" in suffixes and ".bin" in suffixes:
        return "a Megatron indexed dataset (.bin/.idx), already tokenized"
    if "data.mdb" in names:
        return "an LMDB database"
    if ".tfrecord" in suffixes:
        return "TFRecord files"
    return None
