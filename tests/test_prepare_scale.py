"""prepare at scale: parallel tokenization gives the same corpus, shard sizes in bytes, and a prepare that
was interrupted resumes (finished domains and shards are reused, never rewritten)."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import write_alphabet_domain

from aioli_fast.data.prepare import prepare
from aioli_fast.data.shards import load_manifest
from aioli_fast.errors import AioliError

blocks_module = importlib.import_module("aioli_fast.data.blocks")  # where shards are written
KW = dict(seq_len=16, val_fraction=0.1, test_fraction=0.0, progress=False)


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, list[str]]:
    return {
        "alpha": [str(write_alphabet_domain(tmp_path / "raw" / "alpha", "abcdef", 40, seed=0))],
        "digit": [str(write_alphabet_domain(tmp_path / "raw" / "digit", "0123456789", 30, seed=1))],
        "punct": [str(write_alphabet_domain(tmp_path / "raw" / "punct", "!?#%&*", 30, seed=2))],
    }


def corpus_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.tar"))}


def test_parallel_tokenization_gives_the_same_corpus(tmp_path: Path, sources) -> None:
    one = prepare(sources, tmp_path / "one", workers=1, shard_sequences=20, **KW)
    two = prepare(sources, tmp_path / "two", workers=2, shard_sequences=20, **KW)
    assert corpus_bytes(tmp_path / "one") == corpus_bytes(tmp_path / "two")
    assert [d["splits"] for d in one["domains"]] == [d["splits"] for d in two["domains"]]


def test_shard_bytes_bounds_the_shard_size(tmp_path: Path, sources) -> None:
    manifest = prepare(sources, tmp_path / "c", shard_bytes=20_000, **KW)
    sizes = [s["bytes"] for d in manifest["domains"] for sp in d["splits"].values() for s in sp["shards"]]
    assert max(sizes) <= 20_000 and len(sizes) > len(manifest["domains"]) * 2
    with pytest.raises(AioliError, match="either shard_sequences .* or shard_bytes"):
        prepare(sources, tmp_path / "d", shard_bytes=20_000, shard_sequences=4, **KW)
    with pytest.raises(AioliError, match="shard_bytes must be a positive integer"):
        prepare(sources, tmp_path / "d", shard_bytes=0, **KW)
    with pytest.raises(AioliError, match="workers must be a positive integer"):
        prepare(sources, tmp_path / "d", workers=0, **KW)


def test_an_interrupted_prepare_resumes(tmp_path: Path, sources, monkeypatch) -> None:
    reference = prepare(sources, tmp_path / "reference", shard_sequences=32, **KW)
    out = tmp_path / "corpus"
    real_write = blocks_module.write_shard
    written: list[str] = []

    def write_then_stop(path, keys, samples):
        if sum(w.startswith("digit/") for w in written) == 3:  # a crash part-way through the second domain
            raise KeyboardInterrupt
        written.append(str(Path(path).relative_to(out.parent / ".corpus.partial")))
        return real_write(path, keys, samples)

    monkeypatch.setattr(blocks_module, "write_shard", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        prepare(sources, out, shard_sequences=32, **KW)
    assert not out.exists() and (tmp_path / ".corpus.partial").is_dir()
    first_domain = [w for w in written if w.startswith("alpha/")]
    assert first_domain and any(w.startswith("digit/") for w in written)
    mtimes = {w: os.stat(tmp_path / ".corpus.partial" / w).st_mtime_ns for w in written}

    rewritten: list[str] = []

    def record(path, keys, samples):
        rewritten.append(str(Path(path).relative_to(out.parent / ".corpus.partial")))
        return real_write(path, keys, samples)

    monkeypatch.setattr(blocks_module, "write_shard", record)
    manifest = prepare(sources, out, shard_sequences=32, **KW)
    assert not set(rewritten) & set(written)  # finished shards were not written again
    assert all(os.stat(out / w).st_mtime_ns == mtimes[w] for w in written)
    assert corpus_bytes(out) == corpus_bytes(tmp_path / "reference")
    strip = lambda m: json.dumps(m["domains"], sort_keys=True)  # noqa: E731 - same shards and counts
    assert strip(manifest) == strip(reference)
    assert not (tmp_path / ".corpus.partial").exists() and not (out / ".prepare-state.json").exists()
    check = load_manifest(out).verify(progress=False)
    assert check.shards > 0 and check.problems == 0, check.lines


def test_changed_inputs_are_not_reused(tmp_path: Path, sources, monkeypatch) -> None:
    out = tmp_path / "corpus"
    real_write = blocks_module.write_shard
    calls = []

    def stop_in_second_domain(path, keys, samples):
        calls.append(path)
        if "digit" in str(path):
            raise KeyboardInterrupt
        return real_write(path, keys, samples)

    monkeypatch.setattr(blocks_module, "write_shard", stop_in_second_domain)
    with pytest.raises(KeyboardInterrupt):
        prepare(sources, out, shard_sequences=32, **KW)
    monkeypatch.setattr(blocks_module, "write_shard", real_write)
    doc = Path(sources["alpha"][0]) / "doc0.txt"
    doc.write_text("zzzz " * 50)  # the first domain's input changed since the interrupted run
    prepare(sources, out, shard_sequences=32, **KW)
    rows = np.concatenate(
        [load_manifest(out).read(s)[1] for s in load_manifest(out).split_shards("alpha", "train")]
    )
    assert ord("z") in rows  # the new text is in the corpus
