"""Mixture stream: per-domain shard streams mixed by proportions that change at known steps.

Design, in the order a batch is made:

1. **Proportions of a step.** A schedule maps every global step to proportions: ``set_proportions(p,
   step=s)`` makes ``p`` hold from step ``s`` on (default: the next batch), ``set_schedule(rows, start=s)``
   gives one row per step from ``s`` on (Aioli's LearnParams blocks). The latest call wins from its step.
2. **Domain of every slot of the global batch** (``batch_size * world_size`` slots) by one of the rules
   in :data:`ASSIGNMENT_RULES`: ``categorical`` (i.i.d. draws, seeded by the step, as the paper) or
   ``largest_remainder`` (counts ``floor(G p + carried error)`` topped up by largest remainders, the
   error carried to the next step, so the realised proportions stay within one sample of the target
   sums per domain). Every rank computes the same global assignment and takes slots
   ``[rank * B, (rank + 1) * B)``.
3. **Which sample fills a slot.** The global batch is cut into ``lanes`` equal blocks of consecutive
   slots, and each domain's shards are dealt, every pass (epoch), in a seeded order to the lanes
   (``shard_order[lane::lanes]``; with fewer shards than lanes, every lane reads all shards and takes
   every ``lanes``-th sample of each). The domain-``d`` slots of block ``l`` take the next samples of
   lane ``l`` of domain ``d``, in slot order. A lane walks its shards with the samples of each shard in
   a seeded order and starts its next pass when its share is used up: lanes never wait for each other,
   so uneven shards never hang a job. ``lanes`` is the number of ranks the stream started with and is
   kept by its state: rank ``r`` takes slots ``[r * B, (r + 1) * B)``, which at the starting world size
   are exactly block ``r`` (each rank reads only its own shards) and on any other world size are read
   from whichever lanes they fall in. The samples of every step are therefore a function of the seed,
   the proportions and the global batch only, never of the number of ranks: a run resumed on another
   number of processes draws exactly the samples the uninterrupted run would have drawn. Every rank
   advances every lane (counts are known from the global assignment), so the stream state is the same
   on all ranks.
4. **Reading.** Steps 1-3 need only the manifest's sample counts and run in the calling process, which
   knows the step. The result is a *plan* (domain, shard, row per slot); a reader turns it into tokens.
   With ``num_workers > 0`` a torch DataLoader sends plans to worker processes, which only read and
   decode shards (each caches the shards it has open). Batches therefore do not depend on the number of
   workers. Plans are made ahead for prefetching; when proportions change for a step already planned,
   the plans from that step on are made again and the stale batches are dropped on arrival (counted in
   :meth:`MixtureStream.metrics`); a schedule set in advance avoids that.

State (:meth:`MixtureStream.state_dict`) is the next step, the schedule from that step on, the number
of lanes, every lane's position and the carried error: small, JSON-serialisable and identical on every
rank. It loads on any number of ranks whose global batch the lanes divide.
"""

from __future__ import annotations

import signal
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..distributed import group_info
from ..errors import AioliError, ConfigError, DataError, ShardMissingError
from .shards import Manifest, ShardContent, decode_shard

# Each random stream gets its own leading tag: numpy's SeedSequence ignores trailing zeros, so
# [seed, step] and [seed, domain, 0] would otherwise be the same generator.
_DOMAIN_DRAW, _SHARD_ORDER, _SAMPLE_ORDER, _SLOT_ORDER = 1, 2, 3, 4
STATE_VERSION = 2
ON_ERROR = ("raise", "skip")


def _rng(tag: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([tag, *key])


@dataclass
class Batch:
    """A training batch.

    input_ids:  [B, T] int64 token ids.
    labels:     [B, T] int64 next-token targets.
    domain_ids: [B] int32 domain of each sequence.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    domain_ids: torch.Tensor

    def pin_memory(self) -> Batch:
        """The batch in page-locked host memory (so a copy to CUDA can overlap with compute)."""
        return Batch(*(t.pin_memory() for t in (self.input_ids, self.labels, self.domain_ids)))

    def to(self, device, non_blocking: bool = True) -> Batch:
        return Batch(
            *(t.to(device, non_blocking=non_blocking) for t in (self.input_ids, self.labels, self.domain_ids))
        )

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def make_batch(samples_BL: np.ndarray, domain_ids_B: np.ndarray) -> Batch:
    """Split samples [B, T+1] into inputs [:, :-1] and labels [:, 1:]."""
    tokens = torch.from_numpy(np.ascontiguousarray(samples_BL, dtype=np.int64))
    return Batch(
        input_ids=tokens[:, :-1].contiguous(),
        labels=tokens[:, 1:].contiguous(),
        domain_ids=torch.from_numpy(np.asarray(domain_ids_B, dtype=np.int32)),
    )


def check_proportions(proportions, num_domains: int) -> np.ndarray:
    """Validate proportions: D finite non-negative values with a positive sum; returns them normalised.

    Accepts a sequence, a numpy array or a torch tensor (on any device).
    """
    if isinstance(proportions, torch.Tensor):
        proportions = proportions.detach().to("cpu", torch.float64).numpy()
    p = np.asarray(proportions, dtype=np.float64)
    if p.shape != (num_domains,):
        raise AioliError(
            f"expected {num_domains} proportions (one per domain), got {p.shape[0] if p.ndim else p}"
        )
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise AioliError(f"proportions must be finite, non-negative and not all zero, got {p.tolist()}")
    return p / p.sum()


# ---------------------------------------------------------------------------------------------------------
# assignment rules: (proportions [D], slots G, seed, step, carried error [D]) -> (domains [G], carry [D])


def assign_categorical(
    p_D: np.ndarray, num_slots: int, seed: int, step: int, carry_D: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """i.i.d. categorical draws from ``p_D`` with a generator seeded by ``(seed, step)``; no carried error."""
    return _rng(_DOMAIN_DRAW, seed, step).choice(len(p_D), size=num_slots, p=p_D), carry_D


def largest_remainder_counts(
    p_D: np.ndarray, num_slots: int, carry_D: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Integer counts [D] summing to ``num_slots`` that track ``num_slots * p_D`` over time.

    The target of a step is ``num_slots * p + carry``; counts are its floors, topped up by the largest
    remainders (ties: lower domain id); the new carry is target - counts (|carry| < 1 while the set of
    domains with p > 0 does not change). A domain with p = 0 gets no slot and its carry is reset.
    """
    eligible = p_D > 0
    carry = np.where(eligible, carry_D, 0.0)
    carry[eligible] -= carry[eligible].sum() / eligible.sum()  # targets sum to num_slots exactly
    target = num_slots * p_D + carry
    counts = np.where(eligible, np.floor(np.maximum(target, 0.0)), 0.0).astype(np.int64)
    short = num_slots - int(counts.sum())
    if short > 0:
        order = np.argsort(-np.where(eligible, target - counts, -np.inf), kind="stable")
        counts[order[:short]] += 1
    while short < 0:  # only when a negative carry was clipped at zero
        i = int(np.argmax(np.where(counts > 0, counts - target, -np.inf)))
        counts[i] -= 1
        short += 1
    return counts, np.where(eligible, target - counts, 0.0)


def assign_largest_remainder(
    p_D: np.ndarray, num_slots: int, seed: int, step: int, carry_D: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic counts (:func:`largest_remainder_counts`) laid out in a seeded order of the slots."""
    counts, carry = largest_remainder_counts(p_D, num_slots, carry_D)
    slots = np.repeat(np.arange(len(p_D)), counts)
    return slots[_rng(_SLOT_ORDER, seed, step).permutation(num_slots)], carry


ASSIGNMENT_RULES: dict[str, Callable] = {
    "categorical": assign_categorical,
    "largest_remainder": assign_largest_remainder,
}


# ---------------------------------------------------------------------------------------------------------
# lanes: which samples of a domain each rank reads
#
# A *piece* (shard, epoch, offset, stride) is the rows perm[offset::stride] of a shard, where perm is the
# seeded order of that shard's rows in that epoch.


class _DomainLayout:
    """The pieces of one domain's split, per lane and epoch."""

    def __init__(self, sizes: np.ndarray, seed: int, domain: int, lanes: int):
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.seed, self.domain, self.lanes = seed, domain, lanes
        self.shared = int(self.sizes.sum()) < lanes  # too few samples: every lane reads them all
        self._regular: OrderedDict = OrderedDict()
        self._perms: OrderedDict = OrderedDict()

    def length(self, piece) -> int:
        s, _, o, k = piece
        return max(0, -(-(int(self.sizes[s]) - o) // k))

    def regular(self, lane: int, epoch: int) -> tuple[list[tuple[int, int, int, int]], list[int]]:
        """Pieces of ``lane`` in pass ``epoch`` (all non-empty) and their lengths."""
        key = (lane, epoch)
        if key not in self._regular:
            order = _rng(_SHARD_ORDER, self.seed, self.domain, epoch).permutation(len(self.sizes))
            if self.shared:
                pieces = [(int(s), epoch, 0, 1) for s in order]
            elif len(order) >= self.lanes:
                pieces = [(int(s), epoch, 0, 1) for s in order[lane :: self.lanes]]
            else:
                pieces = [(int(s), epoch, lane, self.lanes) for s in order]
            pieces = [p for p in pieces if self.length(p) > 0]
            self._regular[key] = (pieces, [self.length(p) for p in pieces])
            if len(self._regular) > 4 * self.lanes + 8:
                self._regular.popitem(last=False)
        return self._regular[key]

    def rows(self, piece, start: int, count: int) -> np.ndarray:
        """Rows ``start .. start + count`` of a piece, as row indices of its shard."""
        s, e, o, k = piece
        key = (e, s)
        perm = self._perms.get(key)
        if perm is None:
            perm = _rng(_SAMPLE_ORDER, self.seed, self.domain, e, s).permutation(int(self.sizes[s]))
            self._perms[key] = perm
            if len(self._perms) > 16:
                self._perms.popitem(last=False)
        return perm[o + (start + np.arange(count)) * k]


class _Lanes:
    """Positions of every (lane, domain): pass, piece index in that pass and row in that piece."""

    def __init__(self, layouts: list[_DomainLayout], lanes: int):
        self.layouts = layouts
        shape = (lanes, len(layouts))
        self.epoch = np.zeros(shape, dtype=np.int64)
        self.index = np.zeros(shape, dtype=np.int64)
        self.row = np.zeros(shape, dtype=np.int64)

    def snapshot(self) -> tuple:
        return (self.epoch.copy(), self.index.copy(), self.row.copy())

    def restore(self, snap: tuple) -> None:
        self.epoch, self.index, self.row = (a.copy() for a in snap)

    def advance(self, lane: int, d: int, count: int, want_rows: bool):
        """Take ``count`` samples from lane ``lane`` of domain ``d``; (shards, rows) if ``want_rows``."""
        layout = self.layouts[d]
        shards, rows = [], []
        while count > 0:
            pieces, lengths = layout.regular(lane, int(self.epoch[lane, d]))
            piece, length = pieces[self.index[lane, d]], lengths[self.index[lane, d]]
            j = int(self.row[lane, d])
            take = min(count, length - j)
            if want_rows:
                rows.append(layout.rows(piece, j, take))
                shards.append(np.full(take, piece[0], dtype=np.int64))
            count -= take
            j += take
            if j == length:
                j = 0
                self.index[lane, d] += 1
                if self.index[lane, d] == len(pieces):
                    self.index[lane, d] = 0
                    self.epoch[lane, d] += 1
            self.row[lane, d] = j
        if want_rows:
            return np.concatenate(shards), np.concatenate(rows)
        return None


# ---------------------------------------------------------------------------------------------------------
# reading


@dataclass
class _Plan:
    """What one rank reads for one step: domain, shard index and row of each of its B slots."""

    plan_id: int
    step: int
    domain_B: np.ndarray
    shard_B: np.ndarray
    row_B: np.ndarray


class ShardReader(torch.utils.data.Dataset):
    """Turns plans into token arrays; the only part that runs in DataLoader workers.

    Keeps the most recently used shards decoded (in their stored dtype). With ``on_error="skip"`` a bad
    sample is replaced by the next good sample of its shard in stored order (or of the next readable
    shard of its domain) and reported with the batch; with ``"raise"`` it is a DataError naming the file.
    """

    def __init__(self, manifest: Manifest, domains: Sequence[str], split: str, on_error: str):
        self.paths = [[str(s.path) for s in manifest.split_shards(d, split)] for d in domains]
        # a remote corpus: shards are fetched into its cache when first read, the next one prefetched
        self.remote = manifest if manifest.store is not None else None
        self.infos = [manifest.split_shards(d, split) for d in domains]
        self.counts = [[s.sequences for s in manifest.split_shards(d, split)] for d in domains]
        self.domains = list(domains)
        self.sample_len, self.vocab_size = manifest.sample_len, manifest.vocab_size
        self.strict = on_error == "raise"
        self.capacity = len(domains) + 4
        self._cache: OrderedDict = OrderedDict()

    def _shard(self, d: int, s: int):
        key = (d, s)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            options = dict(
                sample_len=self.sample_len,
                vocab_size=self.vocab_size,
                expected=self.counts[d][s],
                strict=self.strict,
            )
            if self.remote is not None:
                content = self.remote.decode(self.infos[d][s], **options)
                self.remote.prefetch([self.infos[d][(s + 1) % len(self.infos[d])]])  # the next, meanwhile
            else:
                content = decode_shard(self.paths[d][s], **options)
        except ShardMissingError as exc:
            if self.strict:
                raise
            n = self.counts[d][s]  # a shard deleted since start-up: all of its samples are bad
            content = ShardContent(
                np.zeros((n, self.sample_len), np.uint16), np.zeros(n, bool), [""] * n, [str(exc)]
            )
        self._cache[key] = content
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return content

    def _replacement(self, d: int, s: int, row: int) -> tuple[int, int]:
        """The next good sample after (shard s, row) in stored order, over the domain's shards."""
        n_shards = len(self.paths[d])
        for step in range(n_shards + 1):
            shard = (s + step) % n_shards
            good = self._shard(d, shard).good
            start = row + 1 if step == 0 else 0
            idx = np.flatnonzero(good[start:])
            if len(idx):
                return shard, start + int(idx[0])
            if step == 0 and good[:start].any():
                return shard, int(np.flatnonzero(good)[0])
        raise DataError(f"domain {self.domains[d]!r}: no readable sample in any of its shards")

    def read(self, plan: _Plan) -> tuple[np.ndarray, list[tuple[int, str]]]:
        """Samples [B, T+1] int64 of a plan, and (domain, problem) for every sample replaced."""
        out = np.empty((len(plan.domain_B), self.sample_len), dtype=np.int64)
        replaced: list[tuple[int, str]] = []
        slots = zip(plan.domain_B.tolist(), plan.shard_B.tolist(), plan.row_B.tolist())
        for i, (d, s, row) in enumerate(slots):
            content = self._shard(d, s)
            if not content.good[row]:
                problem = content.problems[0] if content.problems else f"{self.paths[d][s]}: bad sample"
                replaced.append((d, problem))
                s, row = self._replacement(d, s, row)
                content = self._shard(d, s)
            out[i] = content.tokens[row]
        return out, replaced

    def __getitem__(self, plan: _Plan):
        samples, replaced = self.read(plan)
        batch = make_batch(samples, plan.domain_B)
        return plan.plan_id, plan.step, batch.input_ids, batch.labels, batch.domain_ids, replaced

    def __len__(self) -> int:  # plans are the indices; there is no fixed length
        raise TypeError("ShardReader is indexed by plans and has no length")


class _PlanSampler(torch.utils.data.Sampler):
    """Endless plans, made in the process that owns the stream when the DataLoader asks for them."""

    def __init__(self, stream: MixtureStream):
        self.stream = stream

    def __iter__(self) -> Iterator[_Plan]:
        while True:
            yield self.stream._plan_next()


# ---------------------------------------------------------------------------------------------------------
# the stream


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM and SIGINT: launchers and schedulers signal a whole process
    group, and the training process, which handles them (a checkpoint, then a clean exit), still needs
    its workers until it stops them itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class MixtureStream:
    """Batches of ``batch_size`` sequences per rank whose domains follow a proportions schedule.

    Args:
        manifest: the prepared corpus.
        domains: domain names, in domain-id order.
        batch_size: sequences per batch on this rank (B); the global batch is ``B * world_size``.
        proportions: [D] mixture weights from step 0 (normalised here).
        seed: seeds the domain draws and every domain's shuffling.
        split: which split to stream (``"train"`` for training).
        assignment: a rule of :data:`ASSIGNMENT_RULES` (``categorical`` or ``largest_remainder``).
        rank, world_size: this rank and the number of ranks; default from ``torch.distributed`` when it
            is initialised, else 0 and 1.
        lanes: the number of blocks the global batch is read in (module docstring), default
            ``world_size``; a loaded state brings its own. It must divide the global batch.
        num_workers: DataLoader worker processes that read shards (0: read in this process).
        prefetch_factor: batches each worker prepares ahead (with ``num_workers > 0``).
        on_error: ``"raise"`` (bad data is a DataError naming the file) or ``"skip"`` (a bad sample is
            replaced by a good one of the same domain, counted in :meth:`metrics` and warned about).
    """

    def __init__(
        self,
        manifest: Manifest,
        domains: Sequence[str],
        batch_size: int,
        proportions,
        *,
        seed: int = 0,
        split: str = "train",
        assignment: str = "categorical",
        rank: int | None = None,
        world_size: int | None = None,
        lanes: int | None = None,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        on_error: str = "raise",
    ):
        if batch_size < 1:
            raise AioliError(f"batch_size must be positive, got {batch_size}")
        if assignment not in ASSIGNMENT_RULES:
            raise ConfigError(
                f"unknown assignment rule {assignment!r} (available: {', '.join(ASSIGNMENT_RULES)})"
            )
        if on_error not in ON_ERROR:
            raise ConfigError(f"on_error must be one of {', '.join(ON_ERROR)}; got {on_error!r}")
        if num_workers < 0 or prefetch_factor < 1:
            raise ConfigError(
                f"num_workers must be >= 0 and prefetch_factor >= 1, got {num_workers} and {prefetch_factor}"
            )
        group = group_info()
        dist_rank, dist_world = group.rank, group.world_size
        self.rank = dist_rank if rank is None else rank
        self.world_size = dist_world if world_size is None else world_size
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise AioliError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        self.domains = list(domains)
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise AioliError(f"domains must be a non-empty list without repeats, got {self.domains}")
        self.manifest, self.split = manifest, split
        manifest.check_files(self.domains, [split])  # every shard exists with its recorded size
        self.batch_size, self.seed = batch_size, seed
        self.assignment, self.on_error = assignment, on_error
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self._rule = ASSIGNMENT_RULES[assignment]
        self._exact: list[tuple[int, int]] = []  # [start, end) step ranges planned with exact counts
        self._sizes = [
            np.array([s.sequences for s in manifest.split_shards(d, split)], dtype=np.int64)
            for d in self.domains
        ]
        self._set_layout(self.world_size if lanes is None else lanes)
        for d, layout in enumerate(self._layouts):
            if layout.shared:
                warnings.warn(
                    f"domain {self.domains[d]!r} has {int(layout.sizes.sum())} {split} samples for "
                    f"{self.lanes} lanes (ranks): every lane reads all of them (samples repeat across ranks)",
                    stacklevel=2,
                )
        self._changes: list[tuple[int, np.ndarray]] = [(0, check_proportions(proportions, len(self.domains)))]
        self._carry = np.zeros(len(self.domains))
        self.step = 0  # the step of the next batch returned
        self._next_plan_step = 0
        self._snapshots: dict[int, tuple] = {}
        self._expected: dict[int, int] = {}
        self._plan_counter = 0
        self.last_global_domain_ids: np.ndarray | None = None
        self._global_ids: dict[int, np.ndarray] = {}
        self._reader = ShardReader(manifest, self.domains, split, on_error)
        self._loader_iter = None
        self._skipped = np.zeros(len(self.domains), dtype=np.int64)
        self._discarded = 0
        self._warned: set[str] = set()

    def _set_layout(self, lanes: int) -> None:
        G = self.batch_size * self.world_size
        if lanes < 1 or G % lanes:
            raise AioliError(
                f"the stream reads its global batch of {G} sequences ({self.world_size} rank(s) x "
                f"{self.batch_size}) in {lanes} lanes, the number of ranks it started with; the lanes must "
                f"divide the global batch: keep the global batch, on a number of ranks that divides it"
            )
        self.lanes = lanes
        self._layouts = [_DomainLayout(sz, self.seed, d, lanes) for d, sz in enumerate(self._sizes)]
        self._lanes = _Lanes(self._layouts, lanes)

    # -- proportions ------------------------------------------------------------------------------------

    def proportions_at(self, step: int) -> np.ndarray:
        """[D] float64 proportions of the batch of ``step`` under the current schedule."""
        current = self._changes[0][1]
        for start, p in self._changes:
            if start > step:
                break
            current = p
        return current

    @property
    def proportions(self) -> np.ndarray:
        """[D] proportions of the next batch."""
        return self.proportions_at(self.step)

    def _schedule_from(self, start: int | None, rows: list[np.ndarray], exact: bool = False) -> None:
        start = self.step if start is None else int(start)
        if start < self.step:
            raise AioliError(
                f"cannot change the proportions from step {start}: the batch of step {self.step - 1} "
                "has been returned already"
            )
        # steps from ``start`` on follow the new rows: earlier exact-count ranges end there
        self._exact = [(a, min(b, start)) for a, b in self._exact if a < start]
        if exact:
            self._exact.append((start, start + len(rows)))
        changes = [c for c in self._changes if c[0] < start]
        for i, p in enumerate(rows):
            previous = changes[-1][1] if changes else None
            if previous is None or not np.array_equal(previous, p):
                changes.append((start + i, p))
        self._changes = changes
        if start < self._next_plan_step:  # planned ahead with other proportions: plan again
            self._rewind(start)

    def set_proportions(self, proportions, step: int | None = None) -> None:
        """Use ``proportions`` ([D], normalised here) from global step ``step`` on (default: the next
        batch); replaces whatever was scheduled from that step on."""
        self._schedule_from(step, [check_proportions(proportions, len(self.domains))])

    def set_schedule(self, proportions_SD, start: int | None = None, exact: bool = False) -> None:
        """Row ``i`` of ``proportions_SD`` ([S, D]) for step ``start + i``; the last row holds after the
        schedule until the next change (default start: the next batch). With ``exact`` the batches of
        the schedule's steps get exact per-domain counts (``largest_remainder``) whatever the stream's
        assignment rule, as Aioli's LearnParams blocks need."""
        if isinstance(proportions_SD, torch.Tensor):
            proportions_SD = proportions_SD.detach().cpu().double().numpy()
        rows = [check_proportions(p, len(self.domains)) for p in proportions_SD]
        if not rows:
            raise AioliError("set_schedule needs at least one row of proportions")
        self._schedule_from(start, rows, exact)

    def _rule_at(self, step: int):
        if any(a <= step < b for a, b in self._exact):
            return assign_largest_remainder
        return self._rule

    # -- planning ---------------------------------------------------------------------------------------

    def _rewind(self, step: int) -> None:
        snap = self._snapshots[step]
        self._lanes.restore(snap[0])
        self._carry = snap[1].copy()
        self._next_plan_step = step
        for s in [s for s in self._snapshots if s > step]:
            del self._snapshots[s]
        for s in [s for s in self._expected if s >= step]:
            del self._expected[s]

    def _plan_next(self) -> _Plan:
        step = self._next_plan_step
        self._snapshots[step] = (self._lanes.snapshot(), self._carry.copy())
        B, W, D, L = self.batch_size, self.world_size, len(self.domains), self.lanes
        global_ids, self._carry = self._rule_at(step)(
            self.proportions_at(step), B * W, self.seed, step, self._carry.copy()
        )
        block = B * W // L  # slots per lane
        counts_LD = np.bincount(np.arange(B * W) // block * D + global_ids, minlength=L * D).reshape(L, D)
        lo, hi = self.rank * B, (self.rank + 1) * B
        local = global_ids[lo:hi]
        shard_B = np.empty(B, dtype=np.int64)
        row_B = np.empty(B, dtype=np.int64)
        for lane, d in zip(*np.nonzero(counts_LD)):
            start = int(lane) * block
            mine = start < hi and start + block > lo  # this rank reads some slots of the lane's block
            taken = self._lanes.advance(int(lane), int(d), int(counts_LD[lane, d]), mine)
            if mine:
                slots = start + np.flatnonzero(global_ids[start : start + block] == d)
                keep = (slots >= lo) & (slots < hi)
                shard_B[slots[keep] - lo], row_B[slots[keep] - lo] = taken[0][keep], taken[1][keep]
        self._plan_counter += 1
        self._expected[step] = self._plan_counter
        self._global_ids[step] = global_ids
        self._next_plan_step = step + 1
        return _Plan(self._plan_counter, step, local.astype(np.int32), shard_B, row_B)

    # -- iteration --------------------------------------------------------------------------------------

    def _loader(self):
        if self._loader_iter is None:
            loader = torch.utils.data.DataLoader(
                self._reader,
                batch_size=None,
                sampler=_PlanSampler(self),
                num_workers=self.num_workers,
                prefetch_factor=self.prefetch_factor,
                worker_init_fn=_ignore_stop_signals if self.num_workers else None,
            )
            self._loader_iter = iter(loader)
        return self._loader_iter

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.num_workers == 0:
            plan = self._plan_next()
            samples, replaced = self._reader.read(plan)
            batch = make_batch(samples, plan.domain_B)
        else:
            while True:
                plan_id, step, input_ids, labels, domain_ids, replaced = next(self._loader())
                if step == self.step and self._expected.get(step) == plan_id:
                    break
                self._discarded += 1
            batch = Batch(input_ids, labels, domain_ids)
        for d, problem in replaced:
            self._skipped[d] += 1
            if problem not in self._warned:
                self._warned.add(problem)
                warnings.warn(f"skipping bad data (on_error=skip): {problem}", stacklevel=2)
        self.last_global_domain_ids = self._global_ids[self.step]
        self.step += 1
        self._snapshots.pop(self.step - 1, None)
        self._expected.pop(self.step - 1, None)
        for s in [s for s in self._global_ids if s < self.step - 64]:
            del self._global_ids[s]
        while len(self._changes) > 1 and self._changes[1][0] <= self.step:
            self._changes.pop(0)
        return batch

    def close(self) -> None:
        """Stop the worker processes (a later ``next`` starts new ones)."""
        it, self._loader_iter = self._loader_iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        if self._next_plan_step > self.step:  # the batches in flight are gone: plan them again
            self._rewind(self.step)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def metrics(self) -> dict:
        """Counters: samples replaced per domain (``on_error: skip``), stale batches dropped."""
        return {
            "skipped_samples": dict(zip(self.domains, self._skipped.tolist())),
            "discarded_batches": self._discarded,
        }

    # -- checkpoints ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-serialisable state at the next batch; identical on every rank."""
        if self.step in self._snapshots:
            lanes, carry = self._snapshots[self.step]
        else:
            lanes, carry = self._lanes.snapshot(), self._carry
        epoch, index, row = lanes
        changes = [c for c in self._changes if c[0] > self.step]
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "seed": self.seed,
            "split": self.split,
            "domains": list(self.domains),
            "assignment": self.assignment,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_lanes": self.lanes,
            "proportions": self.proportions.tolist(),
            "schedule": [[s, p.tolist()] for s, p in changes],
            "exact": [[a, b] for a, b in self._exact if b > self.step],
            "carry": carry.tolist(),
            "lanes": {
                "epoch": epoch.tolist(),
                "index": index.tolist(),
                "row": row.tolist(),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``, on this stream's number of ranks, which may differ from the one that
        wrote it: the samples of every step are those the writing ranks would have read (module
        docstring)."""
        if state.get("version") != STATE_VERSION:
            raise AioliError(
                f"stream state version {state.get('version')!r}, this version reads {STATE_VERSION}"
            )
        if state["domains"] != self.domains:
            raise AioliError(
                f"stream state has {len(state['domains'])} domains {state['domains']}, "
                f"this stream {len(self.domains)} {self.domains}"
            )
        for key in ("seed", "split"):
            if state[key] != getattr(self, key):
                raise AioliError(f"stream state has {key}={state[key]!r}, this stream {getattr(self, key)!r}")
        G = self.batch_size * self.world_size
        saved_G = state.get("batch_size", G // state["world_size"]) * state["world_size"]
        if saved_G != G:
            raise AioliError(
                f"stream state of a global batch of {saved_G} sequences, this stream has {G} "
                f"({self.world_size} rank(s) x {self.batch_size}): keep the global batch to continue its "
                "sample order"
            )
        self.close()
        D = len(self.domains)
        step = int(state["step"])
        self._changes = [(step, check_proportions(state["proportions"], D))]
        self._changes += [(int(s), check_proportions(p, D)) for s, p in state["schedule"]]
        self._exact = [(int(a), int(b)) for a, b in state.get("exact", [])]
        positions = state["lanes"]
        if positions.get("residual"):
            raise AioliError(
                "stream state written by an older version after a change of the number of ranks; it "
                "cannot be continued exactly: resume it on the number of ranks that wrote it"
            )
        num_lanes = int(state.get("num_lanes", state["world_size"]))  # older states: one lane per rank
        self._set_layout(num_lanes)
        for key in ("epoch", "index", "row"):
            setattr(self._lanes, key, np.array(positions[key], dtype=np.int64).reshape(num_lanes, D))
        self._carry = np.array(state["carry"], dtype=np.float64)
        self.step = self._next_plan_step = step
        self._snapshots, self._expected, self._global_ids = {}, {}, {}

    def start_at(self, step: int) -> None:
        """Begin a fresh stream (every domain from the start of its first pass, as the seed orders it) at
        global step ``step``, with the current proportions: for a run that resumes on another corpus on
        purpose, where the saved positions would mean nothing. Before any batch is drawn."""
        state = self.state_dict()
        state.update(step=int(step), schedule=[], exact=[])
        self.load_state_dict(state)


def sequential_batches(
    manifest: Manifest, domain: str, split: str, batch_size: int, max_sequences: int | None = None
) -> Iterator[np.ndarray]:
    """Every sample of one domain's split in stored order (at most ``max_sequences``), as [b, T+1] arrays."""
    remaining = max_sequences if max_sequences is not None else float("inf")
    pending: list[np.ndarray] = []
    for shard in manifest.split_shards(domain, split):
        if remaining <= 0:
            break
        _, samples = manifest.read(shard)
        samples = samples[: int(min(len(samples), remaining))]
        remaining -= len(samples)
        pending.append(samples)
        merged = np.concatenate(pending)
        full = len(merged) // batch_size * batch_size
        for start in range(0, full, batch_size):
            yield merged[start : start + batch_size]
        pending = [merged[full:]] if full < len(merged) else []
    if pending:
        yield np.concatenate(pending)


__all__ = [
    "ASSIGNMENT_RULES",
    "Batch",
    "MixtureStream",
    "ShardReader",
    "assign_categorical",
    "assign_largest_remainder",
    "check_proportions",
    "largest_remainder_counts",
    "make_batch",
    "sequential_batches",
]
