"""Data-parallel agreement with two real gloo processes (CPU).

Each rank feeds its own per-domain loss sums and counts (different on every rank, a domain sometimes
absent on one rank only) to an Aioli mixer (train and probe measurement sources) and to an ODM and a
DoReMi mixer. Every rank must end with identical proportions at every step, equal to those of a
single-process mixer fed the statistics summed over the ranks. The sums and counts are small integers,
so every order of summation is exact in fp32 and the comparison is exact.
"""

from __future__ import annotations

import datetime
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aioli_fast.distributed import group_info
from aioli_fast.mixing import build_mixer

WORLD = 2
DOMAINS = ["a", "b", "c"]
STEPS = 40
MICRO = 2
CASES = {
    "aioli-train": (
        "aioli",
        dict(
            measurement="train",
            measure_steps=2,
            sweeps=1,
            block_steps=3,
            one_hot_factor=0.6,
            round_steps=12,
            eta=2.0,
        ),
    ),  # fmt: skip
    "aioli-probe": (
        "aioli",
        dict(
            measurement="probe",
            sweeps=2,
            block_steps=2,
            one_hot_factor=0.6,
            round_steps=14,
            eta=2.0,
            update="cumulative",
        ),
    ),  # fmt: skip
    "odm": ("odm", dict(update_every=2)),
    "doremi": ("doremi", dict(update_every=3, eta=0.5)),
}


def rank_stats(case: str, rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's integer loss sums and token counts of one micro-batch (or a measurement: micro=-1)."""
    seed = (
        ((list(CASES).index(case) * WORLD + rank) * 1000 + step) * 10 + micro + 1
    )  # no hash(): it is per process
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 40, (3,), generator=gen).float()
    # losses fall over the steps, faster for domain a, and differ per rank
    per_token = torch.tensor([60 - step, 50 - step // 2, 45.0]) + torch.randint(0, 5, (3,), generator=gen)
    if (step + rank) % 4 == 0:
        counts[2] = 0.0  # domain c absent from this rank's batch (present on the other rank)
    if step % 11 == 5:
        counts[1] = 0.0  # domain b absent on every rank
    return (per_token * counts).floor(), counts


def drive(mixer, case: str, stats) -> list[torch.Tensor]:
    out = []
    for step in range(STEPS):
        if mixer.measurement_due(step):
            mixer.observe_measurement(step, *stats(case, step, -1))
        p = mixer.proportions(step)
        mixer.host_proportions(step)
        out.append(p.clone())
        for micro in range(MICRO):
            mixer.observe(step, *stats(case, step, micro))
    return out


def build(case: str, reference: str):
    method, options = CASES[case]
    if method == "doremi":
        options = {**options, "reference": reference}
    return build_mixer(method, DOMAINS, **options)


def worker(rank: int, init_file: str, out_dir: str, reference: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=30),
    )  # fmt: skip
    try:
        histories = {}
        for case in CASES:
            histories[case] = drive(build(case, reference), case, lambda c, s, m: rank_stats(c, rank, s, m))
        torch.save(histories, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def summed_stats(case, step, micro):
    parts = [rank_stats(case, rank, step, micro) for rank in range(WORLD)]
    return sum(s for s, _ in parts), sum(c for _, c in parts)


@pytest.mark.multiprocess
def test_every_rank_holds_the_proportions_of_the_summed_statistics(tmp_path):
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps({"a": 30.0, "b": 40.0, "c": 45.0}))
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path), str(reference)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    assert group_info().world_size == 1  # the reference below runs alone: reduce() is the identity
    for case in CASES:
        single = drive(build(case, str(reference)), case, summed_stats)
        distinct = {tuple(p.tolist()) for p in single}
        assert len(distinct) > 2, case  # the proportions did move
        for rank in range(WORLD):
            assert len(ranks[rank][case]) == STEPS
            for step, (got, expected) in enumerate(zip(ranks[rank][case], single)):
                assert torch.equal(got, expected), (case, rank, step, got.tolist(), expected.tolist())
        # a single rank's own statistics would have given other proportions
        alone = drive(build(case, str(reference)), case, lambda c, s, m: rank_stats(c, 0, s, m))
        assert any(not torch.equal(a, b) for a, b in zip(alone, single)), case
