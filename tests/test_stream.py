"""The mixture stream: batch layout, domain purity, determinism, proportions, epochs, resume, validation.

One small corpus is prepared per module: three domains whose documents use disjoint byte alphabets, so
the domain of any sequence can be read off its tokens.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import prepare_alphabet_corpus

from aioli_fast.data.shards import Manifest, load_manifest
from aioli_fast.data.stream import (
    MixtureStream,
    assign_categorical,
    check_proportions,
    make_batch,
    sequential_batches,
)
from aioli_fast.errors import AioliError, DataError

SEQ_LEN = 8
EOS = 256
ALPHABETS = {"letters": "abcdefgh", "digits": "0123456789", "symbols": "!#$%&*+=?@"}
DOMAINS = list(ALPHABETS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared corpus: 3 domains, 4-7 train shards of up to 16 sequences each, and a val split."""
    return prepare_alphabet_corpus(
        tmp_path_factory.mktemp("stream"), ALPHABETS, docs=30, seq_len=SEQ_LEN, val_fraction=0.15
    )


@pytest.fixture(scope="module")
def manifest(corpus: Path) -> Manifest:
    return load_manifest(corpus)


def read_tar(path: Path) -> np.ndarray:
    """Independent reader: samples [S, T+1] int64 of one shard, in stored order."""
    with tarfile.open(path, mode="r:") as tar:
        rows = [np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar]
    return np.stack(rows).astype(np.int64)


def split_samples(manifest: Manifest, domain: str, split: str = "train") -> np.ndarray:
    return np.concatenate([read_tar(s.path) for s in manifest.split_shards(domain, split)])


def allowed_tokens(domain: str) -> set[int]:
    return set(ALPHABETS[domain].encode()) | {EOS}


def take(stream: MixtureStream, n: int) -> list:
    return [next(stream) for _ in range(n)]


def full_rows(batch) -> np.ndarray:
    """The [B, T+1] samples of a batch (inputs plus the last label)."""
    return torch.cat([batch.input_ids, batch.labels[:, -1:]], dim=1).numpy()


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.input_ids, y.input_ids)
        assert torch.equal(x.labels, y.labels)
        assert torch.equal(x.domain_ids, y.domain_ids)


def test_corpus_layout(manifest: Manifest) -> None:
    assert manifest.domains == tuple(DOMAINS)
    for d in DOMAINS:
        shards = manifest.split_shards(d, "train")
        assert len(shards) >= 3 and all(1 <= s.sequences <= 16 for s in shards)
        assert manifest.num_sequences(d, "val") > 0


# ---------------------------------------------------------------------------------------------------------
# batches


def test_make_batch_layout() -> None:
    samples = np.arange(3 * (SEQ_LEN + 1), dtype=np.uint16).reshape(3, SEQ_LEN + 1)
    batch = make_batch(samples, np.array([2, 0, 1]))
    assert batch.input_ids.dtype == torch.int64 and batch.input_ids.shape == (3, SEQ_LEN)
    assert batch.labels.dtype == torch.int64 and batch.labels.shape == (3, SEQ_LEN)
    assert batch.domain_ids.dtype == torch.int32 and batch.domain_ids.tolist() == [2, 0, 1]
    assert batch.input_ids.tolist() == samples[:, :-1].tolist()
    assert batch.labels.tolist() == samples[:, 1:].tolist()
    assert batch.num_tokens == 3 * SEQ_LEN
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and torch.equal(moved.domain_ids, batch.domain_ids)


def test_batches_shapes_dtypes_and_domain_purity(manifest: Manifest) -> None:
    stream = MixtureStream(manifest, DOMAINS, batch_size=6, proportions=[0.5, 0.3, 0.2], seed=0)
    known = {d: {tuple(r) for r in split_samples(manifest, d).tolist()} for d in DOMAINS}
    seen_domains = set()
    for batch in take(stream, 20):
        assert batch.input_ids.shape == batch.labels.shape == (6, SEQ_LEN)
        assert batch.input_ids.dtype == batch.labels.dtype == torch.int64
        assert batch.domain_ids.shape == (6,) and batch.domain_ids.dtype == torch.int32
        assert torch.equal(batch.labels[:, :-1], batch.input_ids[:, 1:])
        for row, d in zip(full_rows(batch), batch.domain_ids.tolist(), strict=True):
            name = DOMAINS[d]
            assert set(row.tolist()) <= allowed_tokens(name)
            assert tuple(row.tolist()) in known[name]  # a real train sample of that domain
            seen_domains.add(d)
    assert seen_domains == {0, 1, 2}
    assert stream.step == 20


def test_domain_subset_and_order(manifest: Manifest) -> None:
    stream = MixtureStream(manifest, ["symbols", "letters"], batch_size=8, proportions=[1, 1], seed=0)
    for batch in take(stream, 5):
        for row, d in zip(full_rows(batch), batch.domain_ids.tolist(), strict=True):
            assert set(row.tolist()) <= allowed_tokens(["symbols", "letters"][d])


def test_unknown_domain_or_split(manifest: Manifest) -> None:
    with pytest.raises(DataError, match="'nope' is not in the corpus"):
        MixtureStream(manifest, ["letters", "nope"], batch_size=2, proportions=[1, 1])
    with pytest.raises(DataError, match="no 'test' split for domain 'letters'"):
        MixtureStream(manifest, ["letters"], batch_size=2, proportions=[1], split="test")


def test_val_split_stream(manifest: Manifest) -> None:
    stream = MixtureStream(manifest, DOMAINS, batch_size=4, proportions=[1, 1, 1], split="val")
    val = {d: {tuple(r) for r in split_samples(manifest, d, "val").tolist()} for d in DOMAINS}
    for batch in take(stream, 5):
        for row, d in zip(full_rows(batch), batch.domain_ids.tolist(), strict=True):
            assert tuple(row.tolist()) in val[DOMAINS[d]]


# ---------------------------------------------------------------------------------------------------------
# determinism and proportions


def test_same_seed_same_batches_different_seed_different(manifest: Manifest) -> None:
    def run(seed: int) -> list:
        return take(MixtureStream(manifest, DOMAINS, 5, [0.4, 0.4, 0.2], seed=seed), 12)

    assert_same_batches(run(3), run(3))
    a, b = run(3), run(4)
    assert any(not torch.equal(x.domain_ids, y.domain_ids) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b, strict=True))


def test_realised_proportions_match_targets(manifest: Manifest) -> None:
    target = np.array([0.7, 0.2, 0.1])
    batch_size, steps = 64, 100
    stream = MixtureStream(manifest, DOMAINS, batch_size, target.tolist(), seed=1)
    counts = np.zeros(3)
    for batch in take(stream, steps):
        counts += np.bincount(batch.domain_ids.numpy(), minlength=3)
    n = batch_size * steps
    sigma = np.sqrt(target * (1 - target) / n)
    np.testing.assert_array_less(np.abs(counts / n - target), 5 * sigma)


def test_proportions_are_normalised(manifest: Manifest) -> None:
    stream = MixtureStream(manifest, DOMAINS, 4, [2, 1, 1])
    np.testing.assert_allclose(stream.proportions, [0.5, 0.25, 0.25])
    np.testing.assert_allclose(check_proportions([0, 3, 1], 3), [0, 0.75, 0.25])


def test_zero_proportion_never_yields_that_domain(manifest: Manifest) -> None:
    stream = MixtureStream(manifest, DOMAINS, 16, [0.5, 0.0, 0.5], seed=2)
    ids = torch.cat([b.domain_ids for b in take(stream, 40)])
    assert set(ids.tolist()) == {0, 2}
    lanes = stream.state_dict()["lanes"]
    assert [lanes[k][0][1] for k in ("epoch", "index", "row")] == [0, 0, 0]  # domain 1 never read


def test_set_proportions_applies_from_next_batch(manifest: Manifest) -> None:
    stream = MixtureStream(manifest, DOMAINS, 8, [1, 0, 0], seed=0)
    assert next(stream).domain_ids.tolist() == [0] * 8
    stream.set_proportions([0, 0, 1])
    batch = next(stream)
    assert batch.domain_ids.tolist() == [2] * 8
    assert all(set(r.tolist()) <= allowed_tokens("symbols") for r in full_rows(batch))
    stream.set_proportions([0, 3, 0])
    np.testing.assert_allclose(stream.proportions, [0, 1, 0])
    assert next(stream).domain_ids.tolist() == [1] * 8


def test_categorical_assignment_depends_only_on_seed_and_step() -> None:
    p, carry = np.array([0.3, 0.3, 0.4]), np.zeros(3)
    a, _ = assign_categorical(p, 32, 5, 7, carry)
    b, _ = assign_categorical(p, 32, 5, 7, carry)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, assign_categorical(p, 32, 5, 8, carry)[0])
    assert not np.array_equal(a, assign_categorical(p, 32, 6, 7, carry)[0])


BAD_PROPORTIONS = [
    ([0.5, 0.5], "expected 3 proportions"),
    ([0.2, 0.3, 0.4, 0.1], "expected 3 proportions"),
    ([[0.3, 0.3, 0.4]], "expected 3 proportions"),
    ([0.6, -0.1, 0.5], "non-negative"),
    ([0.0, 0.0, 0.0], "not all zero"),
    ([0.5, float("nan"), 0.5], "finite"),
    ([0.5, float("inf"), 0.5], "finite"),
]
BAD_IDS = ["too-few", "too-many", "2d", "negative", "all-zero", "nan", "inf"]


@pytest.mark.parametrize(("proportions", "message"), BAD_PROPORTIONS, ids=BAD_IDS)
def test_bad_proportions(manifest: Manifest, proportions: list, message: str) -> None:
    with pytest.raises(AioliError, match=message):
        MixtureStream(manifest, DOMAINS, 4, proportions)
    stream = MixtureStream(manifest, DOMAINS, 4, [1, 1, 2])
    with pytest.raises(AioliError, match=message):
        stream.set_proportions(proportions)
    np.testing.assert_allclose(stream.proportions, [0.25, 0.25, 0.5])  # unchanged after the error


def test_bad_batch_size(manifest: Manifest) -> None:
    with pytest.raises(AioliError, match="batch_size"):
        MixtureStream(manifest, DOMAINS, 0, [1, 1, 1])


# ---------------------------------------------------------------------------------------------------------
# epochs and resume


@pytest.mark.parametrize("batch_size", [1, 5, 16], ids=lambda b: f"B{b}")
def test_stream_is_infinite_and_covers_each_epoch(manifest: Manifest, batch_size: int) -> None:
    domain = "digits"
    all_rows = Counter(tuple(r) for r in split_samples(manifest, domain).tolist())
    n = sum(all_rows.values())
    stream = MixtureStream(manifest, [domain], batch_size, [1.0], seed=7)
    rows = []
    while len(rows) < 3 * n + 1:
        rows += [tuple(r) for r in full_rows(next(stream)).tolist()]
    epochs = [rows[i * n : (i + 1) * n] for i in range(3)]
    for epoch in epochs:
        assert Counter(epoch) == all_rows  # every sample exactly once per epoch
    assert epochs[0] != epochs[1]  # reshuffled between epochs
    assert len(rows) > n and stream.state_dict()["lanes"]["epoch"][0][0] == len(rows) // n


def test_state_dict_resumes_exactly(manifest: Manifest) -> None:
    kw = dict(batch_size=7, seed=11)
    stream = MixtureStream(manifest, DOMAINS, proportions=[0.5, 0.3, 0.2], **kw)
    take(stream, 9)  # mid-shard, and past the first epoch of the smallest domain
    stream.set_proportions([0.2, 0.2, 0.6])
    state = json.loads(json.dumps(stream.state_dict()))  # must survive a JSON checkpoint
    expected = take(stream, 15)

    resumed = MixtureStream(manifest, DOMAINS, proportions=[1, 0, 0], **kw)
    take(resumed, 2)  # whatever it did before is forgotten
    resumed.load_state_dict(state)
    assert resumed.step == 9
    np.testing.assert_allclose(resumed.proportions, [0.2, 0.2, 0.6])
    assert_same_batches(take(resumed, 15), expected)
    assert resumed.state_dict() == stream.state_dict()


def test_load_state_dict_with_wrong_domain_count(manifest: Manifest) -> None:
    state = MixtureStream(manifest, DOMAINS, 2, [1, 1, 1]).state_dict()
    with pytest.raises(AioliError, match="3 domains .* this stream 2"):
        MixtureStream(manifest, DOMAINS[:2], 2, [1, 1]).load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------
# sequential batches (evaluation)


@pytest.mark.parametrize("max_sequences", [None, 0, 1, 5, 17, 10_000], ids=lambda m: f"max{m}")
@pytest.mark.parametrize("batch_size", [1, 4, 16], ids=lambda b: f"B{b}")
def test_sequential_batches_yield_each_sample_once_in_order(
    manifest: Manifest, batch_size: int, max_sequences: int | None
) -> None:
    for domain, split in [("letters", "train"), ("symbols", "val")]:
        stored = split_samples(manifest, domain, split)
        want = len(stored) if max_sequences is None else min(len(stored), max_sequences)
        batches = list(sequential_batches(manifest, domain, split, batch_size, max_sequences=max_sequences))
        assert all(b.dtype == np.int64 and b.shape[1] == SEQ_LEN + 1 for b in batches)
        assert [len(b) for b in batches] == [min(batch_size, want - i) for i in range(0, want, batch_size)]
        got = np.concatenate(batches) if batches else np.empty((0, SEQ_LEN + 1), dtype=np.int64)
        np.testing.assert_array_equal(got, stored[:want])


# ---------------------------------------------------------------------------------------------------------
# corpus damaged after prepare


@pytest.fixture
def corpus_copy(corpus: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(corpus, tmp_path / "corpus"))


def edit_manifest(root: Path, domain: str, shard_index: int, sequences: int) -> Path:
    """Make the manifest claim ``sequences`` for one train shard; returns that shard's path."""
    raw = json.loads((root / "manifest.json").read_text())
    entry = next(d for d in raw["domains"] if d["name"] == domain)
    shard = entry["splits"]["train"]["shards"][shard_index]
    shard["sequences"] = sequences
    (root / "manifest.json").write_text(json.dumps(raw))
    return root / shard["path"]


@pytest.mark.parametrize("delta", [1, -1], ids=["claims-more", "claims-fewer"])
def test_manifest_count_mismatch_names_the_shard(corpus_copy: Path, delta: int) -> None:
    manifest = load_manifest(corpus_copy)
    actual = manifest.split_shards("digits", "train")[1].sequences
    shard_path = edit_manifest(corpus_copy, "digits", 1, actual + delta)
    stream = MixtureStream(load_manifest(corpus_copy), ["digits"], 4, [1.0], seed=0)
    n = manifest.num_sequences("digits", "train")
    with pytest.raises(
        AioliError, match=f"holds {actual} samples but the manifest says {actual + delta}"
    ) as info:
        take(stream, n)  # one epoch loads every shard
    assert str(shard_path) in str(info.value)


def test_sequential_batches_checks_manifest_counts(corpus_copy: Path) -> None:
    actual = load_manifest(corpus_copy).split_shards("digits", "train")[0].sequences
    shard_path = edit_manifest(corpus_copy, "digits", 0, actual + 3)
    with pytest.raises(AioliError) as info:
        list(sequential_batches(load_manifest(corpus_copy), "digits", "train", 4))
    assert str(shard_path) in str(info.value)


def test_truncated_shard_is_caught_when_the_stream_starts(corpus_copy: Path) -> None:
    manifest = load_manifest(corpus_copy)
    shard = manifest.split_shards("letters", "train")[0]
    data = shard.path.read_bytes()
    shard.path.write_bytes(data[: 5 * 1024])  # five whole members: the tar itself looks complete
    with pytest.raises(DataError, match="has 5120 bytes, the manifest says") as info:
        MixtureStream(manifest, ["letters"], 4, [1.0], seed=0)
    assert str(shard.path) in str(info.value)


def test_missing_shard_is_a_data_error(corpus_copy: Path) -> None:
    manifest = load_manifest(corpus_copy)
    shard = manifest.split_shards("symbols", "train")[0]
    shard.path.unlink()
    with pytest.raises(DataError, match="shard not found") as info:
        list(sequential_batches(manifest, "symbols", "train", 4))
    assert str(shard.path) in str(info.value)
    with pytest.raises(DataError, match="shard not found") as info:
        MixtureStream(manifest, ["symbols"], 4, [1.0], seed=0)
    assert str(shard.path) in str(info.value)


def test_random_streams_are_independent(manifest: Manifest) -> None:
    # numpy's SeedSequence ignores trailing zeros: without distinct tags the domain draw of step i and
    # domain i's shard order (epoch 0) would come from one generator.
    from aioli_fast.data.stream import _DOMAIN_DRAW, _SAMPLE_ORDER, _SHARD_ORDER, _rng

    draws = {
        tag: _rng(tag, 0, 1, 0).random(8).tolist() for tag in (_DOMAIN_DRAW, _SHARD_ORDER, _SAMPLE_ORDER)
    }
    assert len({tuple(v) for v in draws.values()}) == 3
    assert _rng(_SHARD_ORDER, 0, 1).random(8).tolist() != _rng(_SAMPLE_ORDER, 0, 1, 0, 0).random(8).tolist()
