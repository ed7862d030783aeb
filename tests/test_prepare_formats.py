"""The input formats of real pretraining data, end to end (prepare, then a few training steps).

The same documents given as JSON lines, Parquet (a column of another name), Arrow, a ``datasets``
``save_to_disk`` folder, ``.jsonl.zst``, ``.json.gz`` or a Python iterable make the same corpus byte for
byte; a corpus of them all trains; a folder holding a dataset format prepare does not read is one
clear error, never read as text.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from helpers import run_cli

from aioli_fast.config import config_from_dict
from aioli_fast.data import prepare
from aioli_fast.data.readers import need
from aioli_fast.errors import AioliError, DataError
from aioli_fast.train import train

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

ROOT = Path(__file__).resolve().parents[1]
WORDS = (ROOT / "README.md").read_text(encoding="utf-8").split()
TEXTS = [
    f"document {i}: " + " ".join(WORDS[(i * 31) % 500 : (i * 31) % 500 + 30 + i % 60]) for i in range(300)
]
KW = dict(seq_len=32, shard_sequences=32, progress=False, workers=1)


def jsonl(texts, field="text") -> str:
    return "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts))


def write_formats(root: Path) -> dict[str, Path]:
    """The same documents in every format prepare reads."""
    root.mkdir(parents=True, exist_ok=True)
    table = pa.table({"content": TEXTS, "id": list(range(len(TEXTS)))})
    paths = {
        "jsonl": root / "docs.jsonl",
        "parquet": root / "docs.parquet",
        "arrow": root / "docs.arrow",
        "zst": root / "docs.jsonl.zst",
        "gz": root / "docs.json.gz",
    }
    paths["jsonl"].write_text(jsonl(TEXTS), encoding="utf-8")
    pq.write_table(table, paths["parquet"], row_group_size=64)
    with pa.OSFile(str(paths["arrow"]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=50)
    paths["zst"].write_bytes(zstandard.ZstdCompressor().compress(jsonl(TEXTS).encode()))
    paths["gz"].write_bytes(gzip.compress(jsonl(TEXTS).encode()))
    # .json as datasets' to_json writes it (JSON lines), and as one JSON array of records
    paths["json_lines"] = root / "docs-lines.json"
    paths["json_lines"].write_text(jsonl(TEXTS), encoding="utf-8")
    array = json.dumps([{"text": t, "id": i} for i, t in enumerate(TEXTS)], indent=1)
    paths["json_array"] = root / "docs-array.json"
    paths["json_array"].write_text(array, encoding="utf-8")
    paths["json_array_gz"] = root / "docs-array.json.gz"
    paths["json_array_gz"].write_bytes(gzip.compress(array.encode()))
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"content": TEXTS}).save_to_disk(str(root / "hf"))
    paths["hf"] = root / "hf"
    return paths


def shards(corpus: Path) -> dict[str, bytes]:
    return {str(p.relative_to(corpus)): p.read_bytes() for p in sorted(corpus.rglob("*.tar"))}


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict[str, Path]:
    return write_formats(tmp_path_factory.mktemp("formats"))


@pytest.mark.parametrize(
    "kind", ["parquet", "arrow", "hf", "zst", "gz", "json_lines", "json_array", "json_array_gz", "iterable"]
)
def test_every_format_makes_the_corpus_of_the_same_json_lines(formats, tmp_path, kind):
    reference = prepare({"d": [str(formats["jsonl"])]}, tmp_path / "reference", **KW)
    if kind == "iterable":
        manifest = prepare({"d": (t for t in TEXTS)}, tmp_path / "corpus", **KW)
        assert manifest["domains"][0]["inputs"] == ["(documents given to prepare: 1 file(s) of JSON lines)"]
        on_disk = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
        assert on_disk["domains"][0]["inputs"] == manifest["domains"][0]["inputs"]
    else:
        field = "content" if kind in ("parquet", "arrow", "hf") else "text"
        manifest = prepare({"d": [str(formats[kind])]}, tmp_path / "corpus", text_field={"d": field}, **KW)
    assert manifest["domains"][0]["splits"] == reference["domains"][0]["splits"]
    assert shards(tmp_path / "corpus") == shards(tmp_path / "reference")
    assert not (tmp_path / ".corpus.partial").exists()


def test_a_corpus_of_every_format_trains(formats, tmp_path):
    args = ["prepare", "--out", str(tmp_path / "corpus"), "--seq-len", "32", "--quiet"]
    for kind in ("parquet", "arrow", "hf"):
        args += ["--domain", f"{kind}={formats[kind]}:content"]
    for kind in ("zst", "gz"):
        args += ["--domain", f"{kind}={formats[kind]}"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    cfg = {
        "data": {"path": str(tmp_path / "corpus")},
        "model": {"preset": "tiny"},
        "mixing": {
            "method": "aioli",
            "measurement": "train",
            "round_steps": 8,
            "sweeps": 1,
            "block_steps": 1,
        },
        "train": {
            "steps": 8,
            "batch_size": 10,
            "out_dir": str(tmp_path / "runs"),
            "name": "r",
            "progress": False,
        },
        "checkpoint": {"every": 0},
        "eval": {"batch_size": 8, "max_sequences": 4},
    }
    result = train(config_from_dict(cfg))
    final = json.loads((result.run_dir / "final.json").read_text())
    assert set(final["val"]["domains"]) == {"parquet", "arrow", "hf", "zst", "gz"}


def test_dataset_folders_prepare_cannot_read_are_named(formats, tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS[:10]})}).save_to_disk(str(dd))
    with pytest.raises(
        AioliError, match=r"holds a datasets DatasetDict \(splits: train\); name the folder of one"
    ):
        prepare({"d": [str(dd)]}, tmp_path / "c1", **KW)
    mds = tmp_path / "mds"
    mds.mkdir()
    (mds / "index.json").write_text('{"shards": []}')
    (mds / "shard.00000.mds").write_bytes(b"\0\1")
    result = run_cli("prepare", "--out", str(tmp_path / "c2"), "--domain", f"d={mds}")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"aioli-fast prepare: error: domain 'd': {mds} holds a MosaicML streaming (MDS) dataset, which "
        "prepare does not read; give text, JSON lines, Parquet or Arrow files"
    )
    nested = tmp_path / "nested"
    (nested / "web").mkdir(parents=True)
    (nested / "notes.txt").write_text("a note " * 40)
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(nested / "web"))
    manifest = prepare({"d": [str(nested)]}, tmp_path / "c3", **KW)  # its Arrow files, not its JSON metadata
    assert manifest["domains"][0]["documents"] == len(TEXTS) + 1
    assert not [p for p in manifest["domains"][0]["inputs"] if p.endswith(".json")]


def test_damaged_and_binary_inputs(formats, tmp_path):
    (tmp_path / "bad.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(TEXTS).encode())[:-40])
    with pytest.raises(DataError, match="cannot read .*bad.jsonl.zst"):
        prepare({"d": [str(tmp_path / "bad.jsonl.zst")]}, tmp_path / "c1", **KW)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text(" ".join(TEXTS))
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(formats["jsonl"], arcname="docs.jsonl")
    (folder / "backup.tar.gz").write_bytes(buf.getvalue())
    manifest = prepare({"d": [str(folder)]}, tmp_path / "c2", val_fraction=0, test_fraction=0, **KW)
    assert manifest["domains"][0]["skipped_files"] == 1  # the archive is binary, not a document
    with pytest.raises(AioliError, match="longer than 60 characters"):
        prepare({"d" * 61: [str(folder)]}, tmp_path / "c3", **KW)


def test_hidden_dataset_folders_are_skipped_and_documents_fill_whole_blocks(tmp_path):
    datasets = pytest.importorskip("datasets")
    root = tmp_path / "in"
    (root / ".cache").mkdir(parents=True)
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(root / ".cache" / "ds"))  # hidden: skipped
    (root / "notes.jsonl").write_text(jsonl(TEXTS), encoding="utf-8")
    manifest = prepare({"d": [str(root)]}, tmp_path / "c1", **KW)
    assert manifest["domains"][0]["documents"] == len(TEXTS)
    # documents from Python are written in files of at most one block: no tiny tail blocks
    from aioli_fast.data.blocks import plan_blocks
    from aioli_fast.data.prepare import _write_documents

    paths = _write_documents("d", iter(TEXTS), tmp_path / "texts", 20_000)
    assert len(paths) > 1 and all(Path(p).stat().st_size <= 20_000 for p in paths)
    assert all(b.end < 0 for b in plan_blocks("d", [Path(p) for p in paths], 20_000))  # none cut by offset


def test_a_missing_column_or_reader_is_one_line(formats, tmp_path):
    with pytest.raises(
        DataError, match=r"docs.parquet: no column 'text' \(columns: content, id\); name the text"
    ):
        prepare({"d": [str(formats["parquet"])]}, tmp_path / "c", **KW)
    with pytest.raises(
        AioliError, match=r"reading x.parquet \(Parquet\) needs the 'nosuchreader' package: pip "
    ):
        need("nosuchreader.parquet", "x.parquet (Parquet)")
    with pytest.raises(AioliError, match="document 1 is a int, not a string"):
        prepare({"d": iter(["text", 5])}, tmp_path / "c4", **KW)
    with pytest.raises(AioliError, match="are given as iterables of documents"):
        prepare({"d": iter(TEXTS)}, tmp_path / "c5", part=(0, 2), **KW)


def test_a_json_file_of_other_json_is_still_one_text_document(tmp_path):
    """A ``.json`` whose first line is not a JSON object (a pretty-printed ``package.json``) is read as
    text, as before; a large ``.json`` of JSON lines is cut into blocks by offset like a ``.jsonl``."""
    from aioli_fast.data.blocks import json_layout, plan_blocks

    config = tmp_path / "package.json"
    config.write_text(json.dumps({"name": "x", "scripts": {"test": "pytest"}}, indent=2))
    assert json_layout(config) == "text"
    vocab = tmp_path / "vocab.json"  # one object on one line, without the text field
    vocab.write_text(json.dumps({"a": 0, "b": 1}))
    assert json_layout(vocab) == "text" and json_layout(vocab, text_field="a") == "lines"
    lines = tmp_path / "big.json"
    lines.write_text(jsonl(TEXTS), encoding="utf-8")
    assert json_layout(lines) == "lines"
    blocks = plan_blocks("d", [lines], block_bytes=4096)
    assert len(blocks) > 1 and all(b.end >= 0 for b in blocks)
    inputs = [str(config), str(vocab), str(lines)]
    manifest = prepare({"d": inputs}, tmp_path / "corpus", val_fraction=0, **KW)
    assert manifest["domains"][0]["documents"] == len(TEXTS) + 2
