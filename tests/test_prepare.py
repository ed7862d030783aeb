"""``prepare`` and the shard format: exact token round trips, deterministic splits, bad input, bad shards.

Every test builds a tiny real corpus under ``tmp_path`` (text files, ``.jsonl``, ``.jsonl.gz``, nested
folders, globs) and reads the tar shards back with an independent reader (``tarfile`` + ``np.load``) or
with WebDataset, so that the checks do not rely on the code under test to decode its own output.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import train_bpe_tokenizer

from aioli_fast.data.prepare import _split_by_hash, document_hash, pack, prepare
from aioli_fast.data.shards import load_manifest, read_shard, token_dtype, write_shard
from aioli_fast.errors import AioliError, DataError

BYTE_EOS = 256
HF_EOS_TOKEN = "<|endoftext|>"
HF_TRAINING_SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "def add(a, b): return a + b",
    "hello world, hello tokens, hello packing",
    "a sample never mixes domains or splits",
]


# ---------------------------------------------------------------------------------------------------------
# helpers


def split_of(text: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split a document's hash alone gives it (before any top-up of a short held-out split)."""
    return _split_by_hash(document_hash(text, seed), val_fraction, test_fraction)


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list, field: str = "text") -> Path:
    lines = [json.dumps({field: r, "id": i}) if isinstance(r, str) else r for i, r in enumerate(records)]
    return write_text(path, "\n".join(lines) + "\n")


def read_tar(path: Path) -> tuple[list[str], list[np.ndarray]]:
    """Independent shard reader: member keys and arrays with their stored dtype."""
    keys, arrays = [], []
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            assert member.name.endswith(".tokens.npy"), member.name
            keys.append(member.name[: -len(".tokens.npy")])
            arrays.append(np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False))
    return keys, arrays


def split_samples(out: Path, manifest: dict, domain: str, split: str) -> tuple[list[str], np.ndarray]:
    """Keys and samples [S, T+1] (stored dtype) of one domain's split, shards in manifest order."""
    entry = next(d for d in manifest["domains"] if d["name"] == domain)
    keys, arrays = [], []
    for shard in entry["splits"][split]["shards"]:
        k, a = read_tar(out / shard["path"])
        keys += k
        arrays += a
    return keys, np.stack(arrays)


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def docs_landing_in(
    split: str,
    n: int,
    *,
    seed: int = 0,
    val: float = 0.2,
    test: float = 0.2,
    stem: str = "document",
    words: int = 6,
) -> list[str]:
    """``n`` distinct documents that ``split_of`` assigns to ``split`` (so tests never rely on luck)."""
    found, i = [], 0
    while len(found) < n:
        text = f"{stem} {i}: " + " ".join(f"w{(i * 7 + j) % 13}" for j in range(words))
        if split_of(text, seed, val, test) == split:
            found.append(text)
        i += 1
    return found


def decode_byte_docs(samples_SL: np.ndarray) -> list[str]:
    """Complete documents of a byte-tokenized stream rebuilt from overlapping samples (tail dropped)."""
    stream = np.concatenate([samples_SL[0], samples_SL[1:, 1:].reshape(-1)]).tolist()
    docs, current = [], []
    for t in stream:
        if t == BYTE_EOS:
            docs.append(bytes(current).decode("utf-8"))
            current = []
        else:
            current.append(t)
    return docs


def build_hf_tokenizer(path: Path) -> Path:
    return train_bpe_tokenizer(path, HF_TRAINING_SENTENCES, HF_EOS_TOKEN)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mixed_corpus(root: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Two domains over every input kind; returns (domains for ``prepare``, documents in read order).

    The read order is the order ``prepare`` reads documents in: files sorted by path, lines in order.
    """
    prose = [
        "Alpha beta gamma delta epsilon zeta.",
        "A second document of plain prose, a little longer than the first one.",
        "Nested documents are found recursively in folders.",
        "Unicode survives the byte tokenizer: naïve café 😀.",
        "gzip text files are one document each.",
    ]
    write_text(root / "prose" / "a.txt", prose[0])
    write_text(root / "prose" / "b.txt", prose[1])
    write_text(root / "prose" / "empty.txt", "")
    write_text(root / "prose" / "nested" / "deeper" / "c.txt", prose[2])
    write_text(root / "prose" / "space.txt", "  \n\t \n")
    write_text(root / "prose" / "u.txt", prose[3])
    write_text(root / "prose" / "z.txt.gz", prose[4])
    prose += docs_landing_in("train", 3, stem="prose train") + docs_landing_in("val", 3, stem="prose val")
    prose += docs_landing_in("test", 3, stem="prose test")
    write_jsonl(root / "prose" / "zz.jsonl", prose[5:])

    code_a = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(6)]
    code_a += docs_landing_in("val", 2, stem="code val") + docs_landing_in("test", 2, stem="code test")
    code_b = docs_landing_in("train", 2, stem="code gz") + ["print('hello from gz')"]
    # a blank line inside a .jsonl file is skipped, not an error
    write_text(
        root / "code" / "a.jsonl",
        "\n".join(json.dumps({"text": t}) for t in code_a[:4])
        + "\n\n"
        + "\n".join(json.dumps({"text": t}) for t in code_a[4:])
        + "\n",
    )
    write_jsonl(root / "code" / "sub" / "b.jsonl.gz", code_b)
    write_text(root / "code" / "ignored.md", "not matched by the globs")
    domains = {
        "prose": [str(root / "prose")],
        "code": [str(root / "code" / "*.jsonl"), str(root / "code" / "**" / "*.jsonl.gz")],
    }
    return domains, {"prose": prose, "code": code_a + code_b}


# ---------------------------------------------------------------------------------------------------------
# round trip and manifest


@pytest.mark.parametrize("tokenizer_kind", ["byte", "hf-bpe"], ids=["byte", "hf-bpe"])
def test_prepare_round_trips_tokens_exactly(tmp_path: Path, tokenizer_kind: str) -> None:
    seq_len, seed, val, test = 8, 0, 0.2, 0.2
    domains, docs = mixed_corpus(tmp_path / "raw")
    if tokenizer_kind == "byte":
        tokenizer, encode, eos_id, vocab_size = "byte", byte_ids, BYTE_EOS, 257
    else:
        tok_path = build_hf_tokenizer(tmp_path / "tokenizer.json")
        from tokenizers import Tokenizer

        reference = Tokenizer.from_file(str(tok_path))
        tokenizer, eos_id = str(tok_path), reference.token_to_id(HF_EOS_TOKEN)
        vocab_size = reference.get_vocab_size(with_added_tokens=True)

        def encode(text: str) -> list[int]:
            return reference.encode(text, add_special_tokens=False).ids

    out = tmp_path / "corpus"
    manifest = prepare(
        domains,
        out,
        seq_len=seq_len,
        tokenizer=tokenizer,
        val_fraction=val,
        test_fraction=test,
        shard_sequences=5,
        seed=seed,
        progress=False,
    )

    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["seq_len"] == seq_len and manifest["sample_len"] == seq_len + 1
    assert manifest["dtype"] == "uint16"
    assert manifest["vocab_size"] == vocab_size and manifest["eos_id"] == eos_id
    assert manifest["tokenizer"]["kind"] == ("byte" if tokenizer_kind == "byte" else "hf")
    assert manifest["split"] == {"unit": "document", "seed": seed, "val_fraction": val, "test_fraction": test}
    assert [d["name"] for d in manifest["domains"]] == ["prose", "code"]

    for entry in manifest["domains"]:
        name = entry["name"]
        assert entry["documents"] == len(docs[name])
        assert set(entry["splits"]) == {"train", "val", "test"}
        for split, info in entry["splits"].items():
            split_docs = [d for d in docs[name] if split_of(d, seed, val, test) == split]
            split_docs.sort(key=lambda d: document_hash(d, seed))  # packed in the order of their hashes
            expected = [t for d in split_docs for t in [*encode(d), eos_id]]
            n_seq = (len(expected) - 1) // seq_len
            assert info["documents"] == len(split_docs)
            assert info["tokens"] == len(expected)
            assert info["sequences"] == n_seq > 0
            assert info["dropped_tokens"] == len(expected) - (n_seq * seq_len + 1)
            assert 0 <= info["dropped_tokens"] < seq_len

            keys, samples = split_samples(out, manifest, name, split)
            assert samples.dtype == np.uint16 and samples.shape == (n_seq, seq_len + 1)
            assert keys == [f"{name}-{split}-{i:09d}" for i in range(n_seq)]
            for i, sample in enumerate(samples):
                assert sample.tolist() == expected[i * seq_len : i * seq_len + seq_len + 1], (name, split, i)
            rebuilt = np.concatenate([samples[0], samples[1:, 1:].reshape(-1)]).tolist()
            assert rebuilt == expected[: len(expected) - info["dropped_tokens"]]

            assert [s["sequences"] for s in info["shards"]] == [
                min(5, n_seq - start) for start in range(0, n_seq, 5)
            ]
            for i, shard in enumerate(info["shards"]):
                assert shard["path"] == f"{name}/{split}-{i:05d}.tar"
                assert shard["sha256"] == sha256_of(out / shard["path"])


def test_manifest_lists_inputs_and_loads(tmp_path: Path) -> None:
    domains, _ = mixed_corpus(tmp_path / "raw")
    out = tmp_path / "corpus"
    manifest = prepare(domains, out, seq_len=8, val_fraction=0.2, test_fraction=0.2, progress=False)
    raw = (tmp_path / "raw").resolve()
    inputs = {d["name"]: d["inputs"] for d in manifest["domains"]}
    assert inputs["code"] == [str(raw / "code" / "a.jsonl"), str(raw / "code" / "sub" / "b.jsonl.gz")]
    assert inputs["prose"] == sorted(str(p.resolve()) for p in (raw / "prose").rglob("*") if p.is_file())

    loaded = load_manifest(out)
    assert loaded.domains == ("prose", "code") and loaded.seq_len == 8 and loaded.sample_len == 9
    assert loaded.vocab_size == 257 and loaded.eos_id == BYTE_EOS
    for entry in manifest["domains"]:
        for split, info in entry["splits"].items():
            shards = loaded.split_shards(entry["name"], split)
            assert [s.path for s in shards] == [out / s["path"] for s in info["shards"]]
            assert loaded.num_sequences(entry["name"], split) == info["sequences"]
            keys, tokens = [], []
            for shard in shards:
                k, t = read_shard(shard.path, sample_len=9, vocab_size=257)
                keys += k
                tokens.append(t)
            ref_keys, ref = split_samples(out, manifest, entry["name"], split)
            assert keys == ref_keys
            assert np.concatenate(tokens).dtype == np.int64
            np.testing.assert_array_equal(np.concatenate(tokens), ref.astype(np.int64))
    assert load_manifest(out / "manifest.json").raw == manifest


def test_zero_fraction_split_is_not_written(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", docs_landing_in("train", 4, val=0.0, test=0.0))
    manifest = prepare(
        {"d": [str(tmp_path / "d.jsonl")]},
        tmp_path / "out",
        seq_len=8,
        val_fraction=0.0,
        test_fraction=0.0,
        progress=False,
    )
    assert set(manifest["domains"][0]["splits"]) == {"train"}
    assert manifest["domains"][0]["splits"]["train"]["documents"] == 4
    with pytest.raises(DataError, match="no 'val' split"):
        load_manifest(tmp_path / "out").split_shards("d", "val")


@pytest.mark.parametrize("seq_len", [1, 3, 8], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("n_tokens", [0, 1, 8, 9, 17, 20], ids=lambda n: f"n{n}")
def test_pack_layout(seq_len: int, n_tokens: int) -> None:
    tokens = np.arange(n_tokens, dtype=np.int64) + 100
    samples = pack(tokens, seq_len)
    n = max(0, (n_tokens - 1) // seq_len)
    assert samples.shape == (n, seq_len + 1) and samples.dtype == np.int64
    for i in range(n):
        np.testing.assert_array_equal(samples[i], tokens[i * seq_len : i * seq_len + seq_len + 1])


def test_token_dtype_widens_for_large_vocabularies() -> None:
    assert token_dtype(257) == np.uint16 and token_dtype(2**16) == np.uint16
    assert token_dtype(2**16 + 1) == np.uint32


# ---------------------------------------------------------------------------------------------------------
# deterministic splits


def split_docs_of(out: Path, manifest: dict) -> dict[tuple[str, str], list[str]]:
    """(domain, split) -> complete documents decoded from the shards (byte tokenizer, seq_len 1: no tail)."""
    assert manifest["seq_len"] == 1
    return {
        (d["name"], split): decode_byte_docs(split_samples(out, manifest, d["name"], split)[1])
        for d in manifest["domains"]
        for split in d["splits"]
    }


def test_split_of_depends_only_on_content_and_seed() -> None:
    texts = [f"doc {i} " + "x" * i for i in range(200)]
    first = [split_of(t, 0, 0.2, 0.2) for t in texts]
    assert first == [split_of(t, 0, 0.2, 0.2) for t in texts]
    assert set(first) == {"train", "val", "test"}
    # roughly the requested fractions (200 draws: 5 binomial standard deviations)
    for split, frac in [("val", 0.2), ("test", 0.2), ("train", 0.6)]:
        assert abs(first.count(split) / 200 - frac) < 5 * math.sqrt(frac * (1 - frac) / 200)
    other_seed = [split_of(t, 1, 0.2, 0.2) for t in texts]
    assert other_seed != first
    assert sum(a != b for a, b in zip(first, other_seed, strict=True)) > 20
    assert all(split_of(t, 0, 0.0, 0.0) == "train" for t in texts)


def test_split_assignment_is_independent_of_other_documents(tmp_path: Path) -> None:
    shared = [f"shared document {i}, some words to tokenize" for i in range(24)]
    only_a = [f"only in corpus a {i}" for i in range(10)]
    only_b = [f"corpus b has this one {i} instead" for i in range(30)]
    write_jsonl(tmp_path / "a" / "docs.jsonl", shared + only_a)
    write_jsonl(tmp_path / "b" / "first.jsonl", only_b[:15])
    write_jsonl(tmp_path / "b" / "second.jsonl", list(reversed(shared)) + only_b[15:])
    kw = dict(seq_len=1, val_fraction=0.25, test_fraction=0.25, seed=3, progress=False)
    ma = prepare({"d": [str(tmp_path / "a")]}, tmp_path / "out_a", **kw)
    mb = prepare({"d": [str(tmp_path / "b")]}, tmp_path / "out_b", **kw)
    docs_a, docs_b = split_docs_of(tmp_path / "out_a", ma), split_docs_of(tmp_path / "out_b", mb)
    for split in ("train", "val", "test"):
        in_a = {d for d in docs_a[("d", split)] if d in shared}
        in_b = {d for d in docs_b[("d", split)] if d in shared}
        assert in_a == in_b == {d for d in shared if split_of(d, 3, 0.25, 0.25) == split}
    assert sorted(d for docs in docs_a.values() for d in docs) == sorted(shared + only_a)


def test_changing_the_seed_changes_the_split(tmp_path: Path) -> None:
    docs = [f"document {i} with a few words" for i in range(40)]
    write_jsonl(tmp_path / "d.jsonl", docs)
    kw = dict(seq_len=1, val_fraction=0.25, test_fraction=0.25, progress=False)
    m0 = prepare({"d": [str(tmp_path / "d.jsonl")]}, tmp_path / "s0", seed=0, **kw)
    m1 = prepare({"d": [str(tmp_path / "d.jsonl")]}, tmp_path / "s1", seed=1, **kw)
    assert m0["split"]["seed"] == 0 and m1["split"]["seed"] == 1
    d0, d1 = split_docs_of(tmp_path / "s0", m0), split_docs_of(tmp_path / "s1", m1)
    assert d0 != d1
    for seed, found in [(0, d0), (1, d1)]:
        for split in ("train", "val", "test"):
            assert set(found[("d", split)]) == {d for d in docs if split_of(d, seed, 0.25, 0.25) == split}


def test_input_pattern_order_does_not_change_the_corpus(tmp_path: Path) -> None:
    for i in range(6):
        write_text(tmp_path / "raw" / f"f{i}.txt", f"file number {i}: " + "lorem ipsum " * (i + 2))
    files = [str(tmp_path / "raw" / f"f{i}.txt") for i in range(6)]
    kw = dict(seq_len=8, val_fraction=0.2, test_fraction=0.0, shard_sequences=4, seed=0, progress=False)
    m1 = prepare({"d": files}, tmp_path / "one", **kw)
    m2 = prepare({"d": [*reversed(files[3:]), str(tmp_path / "raw" / "f[0-2].txt")]}, tmp_path / "two", **kw)
    assert m1 == m2
    for shard in m1["domains"][0]["splits"]["train"]["shards"]:
        assert (tmp_path / "one" / shard["path"]).read_bytes() == (
            tmp_path / "two" / shard["path"]
        ).read_bytes()


def test_same_documents_under_other_file_names_give_identical_shards(tmp_path: Path) -> None:
    docs = [f"document {i}: " + "some shared words " * (1 + i % 3) for i in range(12)]
    for i, doc in enumerate(docs):
        write_text(tmp_path / "one" / f"{i:02d}.txt", doc)
        write_text(tmp_path / "two" / f"renamed-{11 - i:02d}.txt", doc)  # reversed read order
    kw = dict(seq_len=8, val_fraction=0.25, test_fraction=0.0, shard_sequences=4, seed=0, progress=False)
    m1 = prepare({"d": [str(tmp_path / "one")]}, tmp_path / "c1", **kw)
    m2 = prepare({"d": [str(tmp_path / "two")]}, tmp_path / "c2", **kw)
    for split in ("train", "val"):
        s1, s2 = m1["domains"][0]["splits"][split], m2["domains"][0]["splits"][split]
        assert s1["documents"] == s2["documents"] and s1["tokens"] == s2["tokens"]
        assert [s["sha256"] for s in s1["shards"]] == [s["sha256"] for s in s2["shards"]]


# ---------------------------------------------------------------------------------------------------------
# domains, shards and keys

ALPHABETS = {"letters": "abcdefgh", "digits": "0123456789", "symbols": "!#$%&*+=?@"}


def alphabet_corpus(root: Path, docs_per_domain: int = 12) -> dict[str, list[str]]:
    """Three domains with disjoint byte alphabets (no shared space or newline)."""
    rng = np.random.default_rng(0)
    domains = {}
    for name, alphabet in ALPHABETS.items():
        for i in range(docs_per_domain):
            doc = "".join(rng.choice(list(alphabet), size=int(rng.integers(5, 40))))
            write_text(root / name / f"{i:03d}.txt", doc)
        domains[name] = [str(root / name / "*.txt")]
    return domains


def test_sequences_never_mix_domains_and_keys_are_unique(tmp_path: Path) -> None:
    domains = alphabet_corpus(tmp_path / "raw")
    out = tmp_path / "corpus"
    manifest = prepare(
        domains, out, seq_len=8, val_fraction=0.2, test_fraction=0.0, shard_sequences=7, progress=False
    )
    all_keys = []
    for entry in manifest["domains"]:
        allowed = set(byte_ids(ALPHABETS[entry["name"]])) | {BYTE_EOS}
        for split in entry["splits"]:
            keys, samples = split_samples(out, manifest, entry["name"], split)
            assert set(np.unique(samples).tolist()) <= allowed, (entry["name"], split)
            assert all(k.startswith(f"{entry['name']}-{split}-") for k in keys)
            all_keys += keys
    assert len(all_keys) == len(set(all_keys))


@pytest.mark.parametrize("shard_sequences", [1, 3, 7, 1000], ids=lambda n: f"per_shard{n}")
def test_shard_sequences_splits_shards(tmp_path: Path, shard_sequences: int) -> None:
    write_text(tmp_path / "d.txt", "".join(chr(97 + i % 26) for i in range(8 * 20)))
    out = tmp_path / "corpus"
    manifest = prepare(
        {"d": [str(tmp_path / "d.txt")]},
        out,
        seq_len=8,
        val_fraction=0.0,
        test_fraction=0.0,
        shard_sequences=shard_sequences,
        progress=False,
    )
    info = manifest["domains"][0]["splits"]["train"]
    n = (8 * 20 + 1 - 1) // 8  # 160 bytes + EOS
    assert info["sequences"] == n == 20
    shards = info["shards"]
    assert len(shards) == math.ceil(n / shard_sequences)
    assert [s["sequences"] for s in shards] == [
        min(shard_sequences, n - i) for i in range(0, n, shard_sequences)
    ]
    assert sorted(p.name for p in (out / "d").iterdir()) == [f"train-{i:05d}.tar" for i in range(len(shards))]
    keys = []
    for i, shard in enumerate(shards):
        k, arrays = read_tar(out / shard["path"])
        assert len(k) == shard["sequences"] and shard["sha256"] == sha256_of(out / shard["path"])
        start = i * shard_sequences
        assert k == [f"d-train-{start + j:09d}" for j in range(len(k))]
        assert arrays[0][0] == ord("a") + (start * 8) % 26
        keys += k
    assert len(set(keys)) == n


def test_shards_are_readable_by_webdataset(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    domains = alphabet_corpus(tmp_path / "raw")
    out = tmp_path / "corpus"
    manifest = prepare(
        domains, out, seq_len=8, val_fraction=0.2, test_fraction=0.0, shard_sequences=5, progress=False
    )
    for entry in manifest["domains"]:
        for split, info in entry["splits"].items():
            urls = [str(out / s["path"]) for s in info["shards"]]
            got = list(wds.WebDataset(urls, shardshuffle=False).decode())
            keys, samples = split_samples(out, manifest, entry["name"], split)
            assert [s["__key__"] for s in got] == keys
            for sample, ref in zip(got, samples, strict=True):
                arr = sample["tokens.npy"]
                assert isinstance(arr, np.ndarray) and arr.dtype == np.uint16
                np.testing.assert_array_equal(arr, ref)


# ---------------------------------------------------------------------------------------------------------
# bad input to prepare


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    return write_text(tmp_path / "good" / "doc.txt", "plenty of good text for one sequence " * 3)


@pytest.mark.parametrize(
    "pattern",
    ["missing.txt", "nothing-here/*.txt", "**/*.nomatch"],
    ids=["missing-file", "glob-no-match", "recursive-glob-no-match"],
)
def test_missing_input_names_domain_and_pattern(tmp_path: Path, good_file: Path, pattern: str) -> None:
    bad = str(tmp_path / pattern)
    with pytest.raises(AioliError, match="no input file matches") as info:
        prepare(
            {"good": [str(good_file)], "webtext": [bad]},
            tmp_path / "out",
            seq_len=8,
            val_fraction=0,
            test_fraction=0,
            progress=False,
        )
    assert "'webtext'" in str(info.value) and bad in str(info.value)
    assert not (tmp_path / "out").exists()


def test_domain_with_only_empty_files(tmp_path: Path, good_file: Path) -> None:
    write_text(tmp_path / "blank" / "a.txt", "")
    write_text(tmp_path / "blank" / "b.txt", "   \n\n\t")
    write_text(tmp_path / "blank" / "c.jsonl", json.dumps({"text": " \n "}) + "\n\n")
    with pytest.raises(AioliError, match="hold no text") as info:
        prepare(
            {"good": [str(good_file)], "blank": [str(tmp_path / "blank")]},
            tmp_path / "out",
            seq_len=8,
            val_fraction=0,
            test_fraction=0,
            progress=False,
        )
    assert "'blank'" in str(info.value) and "3 file(s)" in str(info.value)


@pytest.mark.parametrize(
    ("lines", "bad_line", "message"),
    [
        (['{"text": "ok"}', '{"text": broken'], 2, "invalid JSON"),
        (['{"text": "ok"}', "", '{"body": "no text field"}'], 3, "no string field 'text'"),
        (['{"text": 42}'], 1, "no string field 'text'"),
        (['["a", "list"]'], 1, "no string field 'text'"),
    ],
    ids=["invalid-json", "missing-field", "non-string-field", "not-an-object"],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, lines: list[str], bad_line: int, message: str) -> None:
    path = write_text(tmp_path / "data" / "bad.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message) as info:
        prepare(
            {"d": [str(path)]}, tmp_path / "out", seq_len=1, val_fraction=0, test_fraction=0, progress=False
        )
    assert f"{path.resolve()}:{bad_line}:" in str(info.value)


def test_text_field_option(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", ["body one is long enough", "body two as well"], field="body")
    manifest = prepare(
        {"d": [str(tmp_path / "d.jsonl")]},
        tmp_path / "out",
        seq_len=4,
        val_fraction=0,
        test_fraction=0,
        text_field="body",
        progress=False,
    )
    expected = [*byte_ids("body one is long enough"), BYTE_EOS, *byte_ids("body two as well"), BYTE_EOS]
    assert manifest["domains"][0]["splits"]["train"]["tokens"] == len(expected)
    _, samples = split_samples(tmp_path / "out", manifest, "d", "train")
    assert samples[0].tolist() == expected[:5]
    with pytest.raises(DataError, match="no string field 'text'"):
        prepare(
            {"d": [str(tmp_path / "d.jsonl")]},
            tmp_path / "out2",
            seq_len=4,
            val_fraction=0,
            test_fraction=0,
            progress=False,
        )


def test_truncated_gzip_input_is_a_data_error(tmp_path: Path) -> None:
    data = gzip.compress(("\n".join(json.dumps({"text": f"line {i}"}) for i in range(500))).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.jsonl.gz"):
        prepare(
            {"d": [str(tmp_path / "cut.jsonl.gz")]},
            tmp_path / "out",
            seq_len=4,
            val_fraction=0,
            test_fraction=0,
            progress=False,
        )


@pytest.mark.parametrize(
    "name",
    [
        "has space",
        "a/b",
        "",
        "dot.name",
        "../escape",
        "ünïcode",
        "trailing-newline\n",
    ],
    ids=["space", "slash", "empty", "dot", "parent", "non-ascii", "trailing-newline"],
)
def test_invalid_domain_name(tmp_path: Path, good_file: Path, name: str) -> None:
    with pytest.raises(AioliError, match="may only contain") as info:
        prepare(
            {name: [str(good_file)]},
            tmp_path / "out",
            seq_len=8,
            val_fraction=0,
            test_fraction=0,
            progress=False,
        )
    assert repr(name) in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("val", "test"),
    [(0.5, 0.5), (0.7, 0.4), (1.0, 0.0), (0.0, 1.0), (-0.1, 0.1), (float("nan"), 0.1)],
    ids=["sum-one", "sum-above-one", "val-one", "test-one", "negative", "nan"],
)
def test_bad_split_fractions(tmp_path: Path, good_file: Path, val: float, test: float) -> None:
    with pytest.raises(AioliError, match="must be in \\[0, 1\\) and sum to less than 1"):
        prepare(
            {"d": [str(good_file)]},
            tmp_path / "out",
            seq_len=8,
            val_fraction=val,
            test_fraction=test,
            progress=False,
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"seq_len": 0}, "seq_len"), ({"seq_len": 2.5}, "seq_len"), ({"shard_sequences": 0}, "shard_sequences")],
    ids=["seq-len-zero", "seq-len-float", "shard-sequences-zero"],
)
def test_bad_sizes(tmp_path: Path, good_file: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(AioliError, match=message):
        prepare(
            {"d": [str(good_file)]},
            tmp_path / "out",
            **{"val_fraction": 0, "test_fraction": 0, **kwargs},
            progress=False,
        )


def test_no_domains(tmp_path: Path) -> None:
    with pytest.raises(AioliError, match="no domains"):
        prepare({}, tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    ("fractions", "split_re"),
    [((0.0, 0.0), "train"), ((0.2, 0.2), "(train|val|test)")],
    ids=["train-only", "with-held-out-splits"],
)
def test_too_little_text_names_domain_and_split(tmp_path: Path, fractions: tuple, split_re: str) -> None:
    write_jsonl(tmp_path / "d.jsonl", ["tiny", "text", "only"])  # 3 x 5 tokens < seq_len 32
    with pytest.raises(AioliError, match=f"the {split_re} split has \\d+ tokens from \\d+ document") as info:
        prepare(
            {"smalldomain": [str(tmp_path / "d.jsonl")]},
            tmp_path / "out",
            seq_len=32,
            val_fraction=fractions[0],
            test_fraction=fractions[1],
            progress=False,
        )
    assert "'smalldomain'" in str(info.value) and "more than 32 tokens" in str(info.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_short_held_out_split_is_topped_up_from_train(tmp_path: Path) -> None:
    train = docs_landing_in("train", 6, val=0.2, test=0.0, words=12)
    short_val = docs_landing_in("val", 1, val=0.2, test=0.0, words=1)
    assert len(short_val[0]) < 32
    write_jsonl(tmp_path / "d.jsonl", train + short_val)
    out = tmp_path / "out"
    manifest = prepare(
        {"d": [str(tmp_path / "d.jsonl")]},
        out,
        seq_len=32,
        val_fraction=0.2,
        test_fraction=0.0,
        progress=False,
    )
    # val takes the train documents with the lowest hashes until it can fill one sequence
    moved, total = [], len(short_val[0]) + 1
    for doc in sorted(train, key=lambda d: document_hash(d, 0)):
        if total > 32:
            break
        moved.append(doc)
        total += len(doc) + 1
    splits = manifest["domains"][0]["splits"]
    assert splits["val"]["documents"] == 1 + len(moved) and splits["val"]["tokens"] == total
    assert splits["train"]["documents"] == len(train) - len(moved)
    for split, docs in [
        ("val", [d for d in train + short_val if d in moved or d in short_val]),
        ("train", [d for d in train if d not in moved]),
    ]:
        docs.sort(key=lambda d: document_hash(d, 0))  # packed in the order of their hashes
        expected = [t for d in docs for t in [*byte_ids(d), BYTE_EOS]]
        _, samples = split_samples(out, manifest, "d", split)
        rebuilt = np.concatenate([samples[0], samples[1:, 1:].reshape(-1)]).tolist()
        assert rebuilt == expected[: len(expected) - splits[split]["dropped_tokens"]]


def assert_unwritable(good_file: Path, out: Path) -> None:
    """prepare into ``out`` fails with a message naming it as not writable."""
    with pytest.raises(AioliError, match="not writable") as info:
        prepare({"d": [str(good_file)]}, out, seq_len=8, val_fraction=0, test_fraction=0, progress=False)
    assert str(out) in str(info.value)


def test_unwritable_output_directory(tmp_path: Path, good_file: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        try:
            (locked / "probe").write_bytes(b"")
        except PermissionError:
            pass
        else:
            pytest.skip("chmod does not restrict this user (running as root?)")
        assert_unwritable(good_file, locked / "corpus")
    finally:
        locked.chmod(0o700)


def test_output_directory_below_a_file(tmp_path: Path, good_file: Path) -> None:
    # works as root too: a regular file cannot hold a folder
    blocker = write_text(tmp_path / "blocker", "a file, not a folder")
    assert_unwritable(good_file, blocker / "corpus")


def test_existing_corpus_needs_overwrite(tmp_path: Path, good_file: Path) -> None:
    out = tmp_path / "corpus"
    kw = dict(seq_len=8, val_fraction=0, test_fraction=0, progress=False)
    prepare({"d": [str(good_file)]}, out, **kw)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = write_text(tmp_path / "other.txt", "different text that would replace the corpus " * 2)
    with pytest.raises(AioliError, match="overwrite") as info:
        prepare({"e": [str(other)]}, out, **kw)
    assert str(out) in str(info.value)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_overwrite_replaces_an_existing_corpus(tmp_path: Path, good_file: Path) -> None:
    out = tmp_path / "corpus"
    prepare(
        {"d": [str(good_file)]},
        out,
        seq_len=4,
        val_fraction=0,
        test_fraction=0,
        shard_sequences=2,
        progress=False,
    )
    old_shards = sorted(p.name for p in (out / "d").iterdir())
    assert len(old_shards) > 1
    text = "new text for the replacement corpus"
    new = write_text(tmp_path / "new.txt", text)
    manifest = prepare(
        {"d": [str(new)]},
        out,
        seq_len=8,
        val_fraction=0,
        test_fraction=0,
        shard_sequences=100,
        overwrite=True,
        progress=False,
    )
    assert manifest["seq_len"] == 8
    assert load_manifest(out).raw == manifest
    assert sorted(p.name for p in (out / "d").iterdir()) == ["train-00000.tar"]  # stale shards removed
    _, samples = split_samples(out, manifest, "d", "train")
    expected = [*byte_ids(text), BYTE_EOS]
    assert np.concatenate([samples[0], samples[1:, 1:].reshape(-1)]).tolist() == expected[: 4 * 8 + 1]


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "overwrite-existing"])
@pytest.mark.parametrize(
    "failure", ["invalid-json", "too-little-text"], ids=["invalid-json", "too-little-text"]
)
def test_failure_mid_prepare_leaves_no_manifest(
    tmp_path: Path, good_file: Path, failure: str, existing: bool
) -> None:
    out = tmp_path / "corpus"
    kw = dict(seq_len=8, val_fraction=0, test_fraction=0, progress=False)
    before = {}
    if existing:
        prepare({"good": [str(good_file)]}, out, **kw)
        before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert Path("manifest.json") in before
    if failure == "invalid-json":
        bad, error = write_text(tmp_path / "bad.jsonl", '{"text": "fine"}\n{oops\n'), DataError
    else:
        bad, error = write_text(tmp_path / "bad.txt", "tiny"), AioliError
    with pytest.raises(error):
        prepare({"good": [str(good_file)], "bad": [str(bad)]}, out, overwrite=existing, **kw)
    # the new corpus was built aside and thrown away: an old corpus is untouched, a new one never appears
    after = (
        {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else {}
    )
    assert after == before
    # the staging folder stays hidden beside the output for a re-run to resume from
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".corpus")] == [".corpus.partial"]
    if not existing:
        with pytest.raises(DataError, match="no corpus manifest"):
            load_manifest(out)
    prepare({"good": [str(good_file)]}, out, overwrite=True, **kw)  # the re-run resumes and finishes
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".corpus")]
    assert load_manifest(out).domains == ("good",)


# ---------------------------------------------------------------------------------------------------------
# shard reader

SAMPLE_LEN = 9


def good_sample(value: int = 1) -> np.ndarray:
    return np.full(SAMPLE_LEN, value, dtype=np.uint16)


def write_tar_by_hand(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def test_write_and_read_shard_round_trip(tmp_path: Path) -> None:
    samples = np.arange(5 * SAMPLE_LEN, dtype=np.uint16).reshape(5, SAMPLE_LEN) * 7
    keys = [f"d-train-{i:09d}" for i in range(5)]
    sha, size = write_shard(tmp_path / "s.tar", keys, samples)
    assert sha == sha256_of(tmp_path / "s.tar") and size == (tmp_path / "s.tar").stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["s.tar"]  # no temporary file left behind
    got_keys, tokens = read_shard(
        tmp_path / "s.tar", sample_len=SAMPLE_LEN, vocab_size=int(samples.max()) + 1
    )
    assert got_keys == keys and tokens.dtype == np.int64
    np.testing.assert_array_equal(tokens, samples)
    # uint32 samples (large vocabularies) read the same way
    big = samples.astype(np.uint32) + 70_000
    write_shard(tmp_path / "big.tar", keys, big)
    np.testing.assert_array_equal(
        read_shard(tmp_path / "big.tar", sample_len=SAMPLE_LEN, vocab_size=10**6)[1], big
    )


def test_corrupt_shard(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.tar"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="corrupt or truncated") as info:
        read_shard(path, sample_len=SAMPLE_LEN, vocab_size=257)
    assert str(path) in str(info.value)


def real_shard(path: Path, n: int = 8) -> bytes:
    samples = (np.arange(n * SAMPLE_LEN) % 250).astype(np.uint16).reshape(n, SAMPLE_LEN)
    write_shard(path, [f"d-train-{i:09d}" for i in range(n)], samples)
    return path.read_bytes()


def test_shard_truncated_inside_a_sample(tmp_path: Path) -> None:
    data = real_shard(tmp_path / "full.tar")
    path = tmp_path / "cut.tar"
    path.write_bytes(data[: 3 * 1024 + 512 + 40])  # fourth member: header complete, data cut
    with pytest.raises(DataError, match="truncated") as info:
        read_shard(path, sample_len=SAMPLE_LEN, vocab_size=257)
    assert str(path) in str(info.value)


def test_shard_cut_in_half(tmp_path: Path) -> None:
    # A cut at a member boundary reads as a complete, shorter tar: the manifest's count catches it.
    data = real_shard(tmp_path / "full.tar")
    path = tmp_path / "half.tar"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"holds \d samples but the manifest says 8") as info:
        read_shard(path, sample_len=SAMPLE_LEN, vocab_size=257, expected=8)
    assert str(path) in str(info.value)


def test_missing_shard(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="shard not found") as info:
        read_shard(tmp_path / "nope.tar", sample_len=SAMPLE_LEN, vocab_size=257)
    assert str(tmp_path / "nope.tar") in str(info.value)


def test_empty_shard(tmp_path: Path) -> None:
    path = write_tar_by_hand(tmp_path / "empty.tar", [])
    with pytest.raises(DataError, match="holds no samples") as info:
        read_shard(path, sample_len=SAMPLE_LEN, vocab_size=257)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("bad_member", "message"),
    [
        (("k-1.tokens.npy", npy_bytes(np.ones(SAMPLE_LEN, dtype=np.float32))), "dtype float32"),
        (("k-1.tokens.npy", npy_bytes(np.ones(SAMPLE_LEN, dtype=np.int64))), "dtype int64"),
        (("k-1.tokens.npy", npy_bytes(np.ones(SAMPLE_LEN - 1, dtype=np.uint16))), r"shape \(8,\)"),
        (("k-1.tokens.npy", npy_bytes(np.ones((1, SAMPLE_LEN), dtype=np.uint16))), r"shape \(1, 9\)"),
        (
            ("k-1.tokens.npy", npy_bytes(np.r_[good_sample()[:-1], np.uint16(300)])),
            "token id 300 >= vocab_size 257",
        ),
        (("k-1.tokens.npy", b"definitely not numpy"), "not a valid .npy"),
    ],
    ids=["float32", "int64", "too-short", "two-dims", "id-above-vocab", "garbage-npy"],
)
def test_bad_sample_names_file_and_sample(
    tmp_path: Path, bad_member: tuple[str, bytes], message: str
) -> None:
    path = write_tar_by_hand(
        tmp_path / "bad.tar",
        [
            ("k-0.tokens.npy", npy_bytes(good_sample())),
            bad_member,
            ("k-2.tokens.npy", npy_bytes(good_sample())),
        ],
    )
    with pytest.raises(DataError, match=message) as info:
        read_shard(path, sample_len=SAMPLE_LEN, vocab_size=257)
    assert str(path) in str(info.value) and "sample k-1 " in str(info.value)


def test_non_npy_member(tmp_path: Path) -> None:
    path = write_tar_by_hand(
        tmp_path / "extra.tar", [("k-0.tokens.npy", npy_bytes(good_sample())), ("k-0.txt", b"hello")]
    )
    with pytest.raises(DataError, match="unexpected member 'k-0.txt'") as info:
        read_shard(path, sample_len=SAMPLE_LEN, vocab_size=257)
    assert str(path) in str(info.value)


def test_load_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no corpus manifest") as info:
        load_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(info.value)
    with pytest.raises(DataError, match="no corpus manifest"):
        load_manifest(tmp_path / "missing.json")

    cases = {
        "malformed": "{not json",
        "not-an-object": "[1, 2]",
        "missing-keys": json.dumps({"format_version": 1, "domains": []}),
        "bad-domain": json.dumps({"format_version": 1, "domains": [{"name": "d"}]}),
    }
    for case, text in cases.items():
        folder = tmp_path / case
        folder.mkdir()
        (folder / "manifest.json").write_text(text)
        with pytest.raises(DataError, match="not a valid corpus manifest") as info:
            load_manifest(folder)
        assert str(folder / "manifest.json") in str(info.value), case
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(DataError, match="format_version 99") as info:
        load_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(info.value)


def test_errors_are_value_errors() -> None:
    assert issubclass(DataError, AioliError) and issubclass(AioliError, ValueError)
