"""Mixing at scale: assignment rules, proportions from a stated step, workers, exact resume, several ranks,
bad data on real tar shards, and a two-process gloo run.

The corpus has three domains with disjoint byte alphabets, so the domain of a sequence can be read off
its tokens; shards hold 16 sequences of 9 ids.
"""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import prepare_alphabet_corpus

from aioli_fast.data.shards import Manifest, load_manifest
from aioli_fast.data.stream import (
    MixtureStream,
    assign_largest_remainder,
    largest_remainder_counts,
)
from aioli_fast.errors import AioliError, DataError

ALPHABETS = {"letters": "abcdefgh", "digits": "0123456789", "symbols": "!#$%&*+=?@"}
DOMAINS = list(ALPHABETS)
RULES = ["categorical", "largest_remainder"]
EOS = 256


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_alphabet_corpus(tmp_path_factory.mktemp("mixture"), ALPHABETS, docs=40)


@pytest.fixture(scope="module")
def manifest(corpus: Path) -> Manifest:
    return load_manifest(corpus)


def rows_of(batch) -> list[tuple[int, ...]]:
    """The [T+1] samples of a batch as tuples (inputs plus the last label)."""
    return [tuple(r) for r in torch.cat([batch.input_ids, batch.labels[:, -1:]], dim=1).tolist()]


def domain_of(row: tuple[int, ...]) -> str:
    (name,) = [d for d, a in ALPHABETS.items() if set(row) <= set(a.encode()) | {EOS}]
    return name


def stored_rows(manifest: Manifest, domain: str) -> Counter:
    return Counter(
        tuple(r) for s in manifest.split_shards(domain, "train") for r in manifest.read(s)[1].tolist()
    )


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.input_ids, y.input_ids)
        and torch.equal(x.labels, y.labels)
        and torch.equal(x.domain_ids, y.domain_ids)
        for x, y in zip(a, b)
    )


# ---------------------------------------------------------------------------------------------------------
# assignment rules


def test_largest_remainder_counts_sum_and_respect_zero_domains() -> None:
    carry = np.zeros(4)
    for p in ([0.5, 0.25, 0.25, 0.0], [0.1, 0.0, 0.6, 0.3], [1, 0, 0, 0]):
        p = np.asarray(p, dtype=float)
        counts, carry = largest_remainder_counts(p, 7, carry)
        assert counts.sum() == 7 and np.all(counts >= 0)
        assert np.all(counts[p == 0] == 0) and np.all(carry[p == 0] == 0)
        assert np.all(np.abs(carry) < 1)
    counts, _ = largest_remainder_counts(np.array([0.75, 0.125, 0.125]), 8, np.zeros(3))
    assert counts.tolist() == [6, 1, 1]


def test_largest_remainder_tracks_targets_within_one_sample() -> None:
    rng = np.random.default_rng(0)
    slots, carry = 10, np.zeros(5)
    target, realised = np.zeros(5), np.zeros(5)
    for step in range(300):
        if step % 7 == 0:
            p = rng.dirichlet(np.ones(5))
        ids, carry = assign_largest_remainder(p, slots, 3, step, carry)
        target += slots * p
        realised += np.bincount(ids, minlength=5)
        assert np.max(np.abs(realised - target)) < 1 + 1e-9, step


@pytest.mark.parametrize("rule", RULES)
def test_realised_proportions_of_the_stream(manifest: Manifest, rule: str) -> None:
    target = np.array([0.6, 0.3, 0.1])
    batch_size, steps = 10, 60
    stream = MixtureStream(manifest, DOMAINS, batch_size, target, seed=2, assignment=rule)
    counts = np.zeros(3)
    for _ in range(steps):
        counts += np.bincount(next(stream).domain_ids.numpy(), minlength=3)
    n = batch_size * steps
    if rule == "largest_remainder":
        assert np.max(np.abs(counts - n * target)) < 1 + 1e-9
    else:
        np.testing.assert_array_less(np.abs(counts / n - target), 5 * np.sqrt(target * (1 - target) / n))


def test_unknown_rule_and_bad_options(manifest: Manifest) -> None:
    with pytest.raises(AioliError, match="unknown assignment rule 'nearest'"):
        MixtureStream(manifest, DOMAINS, 4, [1, 1, 1], assignment="nearest")
    with pytest.raises(AioliError, match="on_error must be one of raise, skip"):
        MixtureStream(manifest, DOMAINS, 4, [1, 1, 1], on_error="ignore")
    with pytest.raises(AioliError, match="num_workers must be >= 0"):
        MixtureStream(manifest, DOMAINS, 4, [1, 1, 1], num_workers=-1)
    with pytest.raises(AioliError, match=r"rank 2 is not in \[0, world_size=2\)"):
        MixtureStream(manifest, DOMAINS, 4, [1, 1, 1], rank=2, world_size=2)


# ---------------------------------------------------------------------------------------------------------
# proportions from a stated step, with workers


def drive(stream: MixtureStream, steps: range, events: dict) -> list:
    """Batches of ``steps``, calling ``events[step](stream)`` before the batch of that step."""
    out = []
    for step in steps:
        if step in events:
            events[step](stream)
        out.append(next(stream))
    return out


EVENTS = {
    3: lambda s: s.set_proportions([0.1, 0.1, 0.8]),
    6: lambda s: s.set_schedule([[1, 0, 0], [0, 1, 0], [0.2, 0.2, 0.6], [0.6, 0.2, 0.2]], start=10),
    13: lambda s: s.set_proportions(torch.tensor([0.3, 0.3, 0.4]), step=15),
    17: lambda s: s.set_proportions([0.0, 1.0, 1.0], step=17),
}


@pytest.mark.parametrize("rule", RULES)
def test_batches_do_not_depend_on_the_number_of_workers(manifest: Manifest, rule: str) -> None:
    runs = []
    for workers in (0, 1, 2):
        stream = MixtureStream(
            manifest, DOMAINS, 5, [0.5, 0.3, 0.2], seed=3, assignment=rule, num_workers=workers
        )
        runs.append(drive(stream, range(22), EVENTS))
        if workers:
            assert stream.metrics()["discarded_batches"] > 0  # prefetched plans were made again
        stream.close()
    assert same(runs[0], runs[1]) and same(runs[0], runs[2])
    for batch in runs[0]:
        for row, d in zip(rows_of(batch), batch.domain_ids.tolist()):
            assert domain_of(row) == DOMAINS[d]


@pytest.mark.parametrize("workers", [0, 2], ids=lambda w: f"workers{w}")
def test_new_proportions_apply_from_the_stated_step(manifest: Manifest, workers: int) -> None:
    stream = MixtureStream(manifest, DOMAINS, 4, [1, 0, 0], seed=0, num_workers=workers)
    ids = [next(stream).domain_ids.tolist() for _ in range(3)]  # the workers have planned ahead
    stream.set_proportions([0, 0, 1], step=6)
    stream.set_schedule([[0, 1, 0], [1, 0, 0]], start=9)
    ids += [next(stream).domain_ids.tolist() for _ in range(9)]
    assert ids == [[0] * 4] * 6 + [[2] * 4] * 3 + [[1] * 4] + [[0] * 4] * 2
    with pytest.raises(AioliError, match="from step 5: the batch of step 11 has been returned"):
        stream.set_proportions([1, 1, 1], step=5)
    stream.close()


def test_learnparams_blocks_of_smoothed_one_hot_mixtures(manifest: Manifest) -> None:
    # Aioli's LearnParams: for each domain j of a permutation, S steps of f on j and (1-f)/(k-1) elsewhere
    f, block, order = 0.75, 3, [2, 0, 1]
    rows = []
    for j in order:
        row = np.full(3, (1 - f) / 2)
        row[j] = f
        rows += [row] * block
    stream = MixtureStream(
        manifest, DOMAINS, 8, [1, 1, 1], seed=1, assignment="largest_remainder", num_workers=1
    )
    next(stream)
    stream.set_schedule(np.stack(rows), start=2)
    batches = [next(stream) for _ in range(1 + len(rows))]
    for i, j in enumerate(order):
        for batch in batches[1 + i * block : 1 + (i + 1) * block]:
            counts = np.bincount(batch.domain_ids.numpy(), minlength=3)
            assert counts[j] == 6 and counts.sum() == 8 and sorted(counts) == [1, 1, 6]
    stream.close()


@pytest.mark.parametrize("workers", [0, 1], ids=lambda w: f"workers{w}")
def test_an_exact_schedule_gives_exact_counts_on_a_categorical_stream(
    manifest: Manifest, workers: int
) -> None:
    # the same LearnParams rows on a categorical stream: exact per-domain counts inside the schedule,
    # draws again after it, and a resume inside it gives the uninterrupted batches
    f, block, order = 0.75, 3, [2, 0, 1]
    rows = []
    for j in order:
        row = np.full(3, (1 - f) / 2)
        row[j] = f
        rows += [row] * block

    def run() -> list[list[int]]:
        stream = MixtureStream(manifest, DOMAINS, 8, [1, 1, 1], seed=1, num_workers=workers)
        next(stream)
        stream.set_schedule(np.stack(rows), start=2, exact=True)
        ids = [next(stream).domain_ids.tolist() for _ in range(1 + len(rows) + 6)]
        stream.close()
        return ids

    ids = run()
    for i, j in enumerate(order):
        for batch in ids[1 + i * block : 1 + (i + 1) * block]:
            counts = np.bincount(batch, minlength=3)
            assert counts[j] == 6 and sorted(counts) == [1, 1, 6]
    after = [np.bincount(b, minlength=3) for b in ids[1 + len(rows) :]]  # the last row, drawn again
    assert any(sorted(c) != [1, 1, 6] for c in after)
    stream = MixtureStream(manifest, DOMAINS, 8, [1, 1, 1], seed=1, num_workers=workers)
    next(stream)
    stream.set_schedule(np.stack(rows), start=2, exact=True)
    first = [next(stream).domain_ids.tolist() for _ in range(4)]  # stop inside the schedule
    state = stream.state_dict()
    stream.close()
    resumed = MixtureStream(manifest, DOMAINS, 8, [1, 1, 1], seed=1, num_workers=workers)
    resumed.load_state_dict(state)
    rest = [next(resumed).domain_ids.tolist() for _ in range(len(ids) - 4)]
    resumed.close()
    assert [*first, *rest] == ids


# ---------------------------------------------------------------------------------------------------------
# exact resume


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("workers", [0, 2], ids=lambda w: f"workers{w}")
def test_resume_yields_the_uninterrupted_batches(manifest: Manifest, rule: str, workers: int) -> None:
    kw = dict(seed=9, assignment=rule, num_workers=workers)
    full = MixtureStream(manifest, DOMAINS, 6, [0.5, 0.3, 0.2], **kw)
    expected = drive(full, range(24), EVENTS)
    full.close()

    first = MixtureStream(manifest, DOMAINS, 6, [0.5, 0.3, 0.2], **kw)
    drive(first, range(12), EVENTS)  # the schedule set at step 6 reaches past the checkpoint
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    assert state["step"] == 12
    first.close()

    resumed = MixtureStream(manifest, DOMAINS, 6, [0, 0, 1], **kw)
    next(resumed)  # whatever it did before is forgotten
    resumed.load_state_dict(state)
    later = {s: e for s, e in EVENTS.items() if s >= 12}
    assert same(drive(resumed, range(12, 24), later), expected[12:])
    resumed.close()


def test_load_state_dict_checks_what_it_is_given(manifest: Manifest) -> None:
    state = MixtureStream(manifest, DOMAINS, 2, [1, 1, 1], seed=1).state_dict()
    with pytest.raises(AioliError, match="seed=1, this stream 0"):
        MixtureStream(manifest, DOMAINS, 2, [1, 1, 1], seed=0).load_state_dict(state)
    with pytest.raises(AioliError, match="stream state version"):
        MixtureStream(manifest, DOMAINS, 2, [1, 1, 1], seed=1).load_state_dict({**state, "version": 1})


# ---------------------------------------------------------------------------------------------------------
# several ranks (in one process: each rank's stream is given its rank)


def rank_streams(manifest: Manifest, world: int, batch_size: int, **kw) -> list[MixtureStream]:
    return [
        MixtureStream(manifest, DOMAINS, batch_size, rank=r, world_size=world, **kw) for r in range(world)
    ]


@pytest.mark.parametrize("rule", RULES)
def test_ranks_agree_and_read_disjoint_samples(manifest: Manifest, rule: str) -> None:
    streams = rank_streams(manifest, 2, 3, proportions=[0.4, 0.4, 0.2], seed=5, assignment=rule)
    seen: list[Counter] = [Counter(), Counter()]
    for _ in range(10):
        batches = [next(s) for s in streams]
        global_ids = [s.last_global_domain_ids for s in streams]
        np.testing.assert_array_equal(global_ids[0], global_ids[1])
        local = torch.cat([b.domain_ids for b in batches]).numpy()
        np.testing.assert_array_equal(local, global_ids[0])  # rank r holds slots [r*B, (r+1)*B)
        for r, b in enumerate(batches):
            seen[r].update(rows_of(b))
    assert not set(seen[0]) & set(seen[1])  # disjoint shards per rank
    assert max(seen[0].values()) == max(seen[1].values()) == 1
    assert streams[0].state_dict() == streams[1].state_dict()  # one checkpoint serves every rank


def test_a_domain_with_fewer_shards_than_ranks_is_split_by_sample(tmp_path: Path) -> None:
    corpus = prepare_alphabet_corpus(tmp_path, {"tiny": "abc"}, docs=20, shard_sequences=1000)
    manifest = load_manifest(corpus)
    assert len(manifest.split_shards("tiny", "train")) == 1
    streams = [MixtureStream(manifest, ["tiny"], 2, [1.0], rank=r, world_size=3) for r in range(3)]
    n = manifest.num_sequences("tiny", "train")
    per_rank = [[row for _ in range(n // 3 // 2) for row in rows_of(next(s))] for s in streams]
    everything = Counter(row for rows in per_rank for row in rows)
    assert max(everything.values()) == 1  # nothing read twice across ranks within the pass


def global_rows(streams: list[MixtureStream]) -> list[tuple[int, ...]]:
    """The samples of one global batch, slot by slot (rank 0's slots first)."""
    return [row for s in streams for row in rows_of(next(s))]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(("old", "new"), [(2, 1), (1, 2), (2, 4), (4, 2), (2, 3)])
def test_resume_on_another_number_of_ranks_draws_the_uninterrupted_samples(
    manifest: Manifest, rule: str, old: int, new: int
) -> None:
    """The samples of every step, slot by slot, are those of the run that never stopped: the stream
    keeps the lanes it started with, so the global order does not depend on the number of ranks."""
    G, before, after = 12, 7, 9  # 12 sequences a step: divisible by 1, 2, 3 and 4 ranks
    kw = {"proportions": [0.5, 0.3, 0.2], "seed": 3, "assignment": rule}
    uninterrupted = rank_streams(manifest, old, G // old, **kw)
    expected = [global_rows(uninterrupted) for _ in range(before + after)]
    first = rank_streams(manifest, old, G // old, **kw)
    assert [global_rows(first) for _ in range(before)] == expected[:before]
    state = first[0].state_dict()
    resumed = rank_streams(manifest, new, G // new, **kw)
    for s in resumed:
        s.load_state_dict(state)
    got = []
    for _ in range(after):
        got.append(global_rows(resumed))
        ids = [s.last_global_domain_ids for s in resumed]
        assert all(np.array_equal(i, ids[0]) for i in ids)  # the ranks agree on the global batch
    assert got == expected[before:]
    assert all(s.state_dict()["num_lanes"] == old for s in resumed)  # kept for the next resume
    states = [s.state_dict() for s in resumed]
    assert all(st == states[0] for st in states)  # one checkpoint still serves every rank


def test_a_pass_over_a_domain_is_completed_across_a_change_of_ranks(tmp_path: Path) -> None:
    """Within a pass, nothing read before the change is read again and nothing is skipped: each lane
    (here slots 0-2 and 3-5 of the global batch of 6) reads its share of the pass exactly once."""
    corpus = prepare_alphabet_corpus(tmp_path, {"one": "xyz"}, docs=60, shard_sequences=7)
    manifest = load_manifest(corpus)
    all_rows = Counter(
        tuple(r) for s in manifest.split_shards("one", "train") for r in manifest.read(s)[1].tolist()
    )
    n = sum(all_rows.values())
    old = [MixtureStream(manifest, ["one"], 3, [1.0], rank=r, world_size=2, seed=4) for r in range(2)]
    before = [global_rows(old) for _ in range(n // 6 // 2)]
    new = [MixtureStream(manifest, ["one"], 2, [1.0], rank=r, world_size=3, seed=4) for r in range(3)]
    for s in new:
        s.load_state_dict(old[0].state_dict())
    after = [global_rows(new) for _ in range(n // 6 + 2)]
    share = [sum(old[0]._layouts[0].regular(lane, 0)[1]) for lane in range(2)]
    assert sum(share) == n and min(share) > 0
    first_pass = Counter()
    for lane in range(2):
        read = [row for step in before + after for row in step[3 * lane : 3 * lane + 3]]
        assert len(read) > share[lane]
        mine = Counter(read[: share[lane]])
        assert max(mine.values()) == 1  # nothing twice within the lane's pass
        first_pass += mine
    assert first_pass == all_rows  # the two lanes' passes cover the domain exactly once


def _rank_main(rank: int, world: int, init_file: str, corpus: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for rule in RULES:
            stream = MixtureStream(
                load_manifest(corpus), DOMAINS, 3, [0.5, 0.3, 0.2], seed=8, assignment=rule
            )
            record = {"global": [], "gathered": [], "rows": []}
            for step in range(12):
                if step == 5:
                    stream.set_proportions([0.1, 0.1, 0.8], step=7)
                batch = next(stream)
                gathered = [torch.zeros_like(batch.domain_ids) for _ in range(world)]
                dist.all_gather(gathered, batch.domain_ids)
                record["global"].append(stream.last_global_domain_ids.tolist())
                record["gathered"].append(torch.cat(gathered).tolist())
                record["rows"] += rows_of(batch)
            record["state"] = stream.state_dict()
            Path(out_dir, f"{rule}-rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_gloo_processes_agree_on_assignments_and_read_disjoint_samples(
    corpus: Path, tmp_path: Path
) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(
        _rank_main,
        args=(2, str(tmp_path / "init"), str(corpus), str(tmp_path)),
        nprocs=2,
        start_method="spawn",
    )
    for rule in RULES:
        ranks = [json.loads((tmp_path / f"{rule}-rank{r}.json").read_text()) for r in range(2)]
        assert ranks[0]["global"] == ranks[1]["global"] == ranks[0]["gathered"] == ranks[1]["gathered"]
        assert ranks[0]["state"] == ranks[1]["state"]
        rows = [Counter(tuple(r) for r in rank["rows"]) for rank in ranks]
        assert not set(rows[0]) & set(rows[1]) and max(rows[0].values()) == max(rows[1].values()) == 1
        after_switch = [ids for step in ranks[0]["global"][7:] for ids in step]
        assert Counter(after_switch)[2] > Counter(after_switch)[0]


# ---------------------------------------------------------------------------------------------------------
# bad data on real tar files


@pytest.fixture
def corpus_copy(corpus: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(corpus, tmp_path / "corpus"))


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def replace_shard(root: Path, domain: str, index: int, data: bytes) -> Path:
    """Write ``data`` as a train shard and record its new size in the manifest (its count is kept)."""
    raw = json.loads((root / "manifest.json").read_text())
    entry = next(d for d in raw["domains"] if d["name"] == domain)["splits"]["train"]["shards"][index]
    (root / entry["path"]).write_bytes(data)
    entry["bytes"] = len(data)
    (root / "manifest.json").write_text(json.dumps(raw))
    return root / entry["path"]


def shard_with_bad_member(path: Path, bad: bytes) -> bytes:
    """The shard's bytes with its third member's content replaced by ``bad``."""
    out = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for i, member in enumerate(src):
            data = bad if i == 2 else src.extractfile(member).read()
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    return out.getvalue()


SAMPLE_LEN = 9
BAD_DATA = {
    "float32-sample": (
        lambda p: shard_with_bad_member(p, npy(np.ones(SAMPLE_LEN, np.float32))),
        "dtype float32",
        1,
    ),
    "short-sample": (
        lambda p: shard_with_bad_member(p, npy(np.ones(SAMPLE_LEN - 2, np.uint16))),
        r"shape \(7,\)",
        1,
    ),
    "not-npy": (lambda p: shard_with_bad_member(p, b"garbage"), "not a valid .npy", 1),
    "corrupt-tar": (
        lambda p: np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes(),
        "corrupt",
        16,
    ),
    "cut-tar": (lambda p: p.read_bytes()[: 5 * 1024], "holds 5 samples but the manifest says 16", 11),
}


def one_pass(stream: MixtureStream, n: int) -> list:
    rows = []
    while len(rows) < n:
        rows += rows_of(next(stream))
    return rows[:n]


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_raises_naming_the_file(corpus_copy: Path, case: str) -> None:
    make, message, _ = BAD_DATA[case]
    manifest = load_manifest(corpus_copy)
    path = replace_shard(corpus_copy, "digits", 0, make(manifest.split_shards("digits", "train")[0].path))
    manifest = load_manifest(corpus_copy)
    n = manifest.num_sequences("digits", "train")
    for workers in (0, 1):
        stream = MixtureStream(manifest, ["digits"], 4, [1.0], num_workers=workers)
        with pytest.raises(DataError, match=message) as info:
            one_pass(stream, n)
        assert str(path) in str(info.value)
        stream.close()


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_on_error_skip_replaces_counts_and_warns(corpus_copy: Path, case: str) -> None:
    make, message, bad_count = BAD_DATA[case]
    manifest = load_manifest(corpus_copy)
    good = stored_rows(manifest, "digits")
    path = replace_shard(corpus_copy, "digits", 0, make(manifest.split_shards("digits", "train")[0].path))
    manifest = load_manifest(corpus_copy)
    n = manifest.num_sequences("digits", "train")
    stream = MixtureStream(manifest, DOMAINS, 4, [0, 1, 0], on_error="skip", num_workers=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = one_pass(stream, n)  # one pass reads every sample of the domain once
    assert stream.metrics()["skipped_samples"] == {"letters": 0, "digits": bad_count, "symbols": 0}
    assert any(str(path) in str(w.message) and "on_error=skip" in str(w.message) for w in caught)
    assert all(row in good for row in rows)  # only real, good samples of the domain
    stream.close()


def test_missing_domain_is_a_clear_error(manifest: Manifest) -> None:
    with pytest.raises(DataError, match="domain 'code' is not in the corpus"):
        MixtureStream(manifest, ["letters", "code"], 2, [1, 1])


def test_a_domain_without_one_readable_sample_stops_even_with_skip(corpus_copy: Path) -> None:
    manifest = load_manifest(corpus_copy)
    for i in range(len(manifest.split_shards("letters", "train"))):
        replace_shard(corpus_copy, "letters", i, b"\0" * 1024)
    stream = MixtureStream(load_manifest(corpus_copy), ["letters"], 2, [1.0], on_error="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="domain 'letters': no readable sample"):
            next(stream)


def test_a_state_of_another_global_batch_is_refused(manifest: Manifest) -> None:
    state = rank_streams(manifest, 2, 3, proportions=[1, 1, 1])[0].state_dict()
    with pytest.raises(AioliError, match="global batch of 6 sequences, this stream has 8 .*keep the"):
        MixtureStream(manifest, DOMAINS, 8, [1, 1, 1]).load_state_dict(state)
    with pytest.raises(AioliError, match="in 2 lanes, the number of ranks it started with"):
        MixtureStream(manifest, DOMAINS, 1, [1, 1, 1], rank=0, world_size=3, lanes=2)
