"""Mixture stream: per-domain shard streams mixed by proportions into training batches.

First version, single process: each domain's split is an infinite stream (shards in a seeded random
order each epoch, samples shuffled within a shard); every slot of a batch is given a domain by an i.i.d.
categorical draw from the current proportions, with a generator seeded by ``(seed, step)`` so the
assignment of a step is reproducible on its own. Proportions set with :meth:`MixtureStream.set_proportions`
apply from the next batch produced.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import AioliError
from .shards import Manifest

# Each random stream gets its own leading tag: numpy's SeedSequence ignores trailing zeros, so
# [seed, step] and [seed, domain, 0] would otherwise be the same generator.
_DOMAIN_DRAW, _SHARD_ORDER, _SAMPLE_ORDER = 1, 2, 3


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


class DomainStream:
    """Infinite, resampled stream of the samples of one domain's split."""

    def __init__(self, manifest: Manifest, domain: str, split: str, seed: int, domain_index: int):
        self.manifest, self.domain, self.split = manifest, domain, split
        self.shards = manifest.split_shards(domain, split)
        self._seed = (seed, domain_index)
        self.epoch, self.shard_pos, self.sample_pos = 0, 0, 0
        self._order: np.ndarray | None = None
        self._samples: np.ndarray | None = None

    def _shard_order(self) -> np.ndarray:
        return _rng(_SHARD_ORDER, *self._seed, self.epoch).permutation(len(self.shards))

    def _load(self) -> None:
        if self._order is None:
            self._order = self._shard_order()
        _, samples = self.manifest.read(self.shards[int(self._order[self.shard_pos])])
        perm = _rng(_SAMPLE_ORDER, *self._seed, self.epoch, self.shard_pos).permutation(len(samples))
        self._samples = samples[perm]

    def next(self) -> np.ndarray:
        """The next sample, [T+1] int64."""
        if self._samples is None:
            self._load()
        sample = self._samples[self.sample_pos]
        self.sample_pos += 1
        if self.sample_pos == len(self._samples):
            self.sample_pos, self._samples = 0, None
            self.shard_pos += 1
            if self.shard_pos == len(self.shards):
                self.shard_pos, self._order = 0, None
                self.epoch += 1
        return sample

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "sample_pos": self.sample_pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.shard_pos, self.sample_pos = state["epoch"], state["shard_pos"], state["sample_pos"]
        self._order, self._samples = None, None


def check_proportions(proportions: Sequence[float], num_domains: int) -> np.ndarray:
    """Validate proportions: D finite non-negative values with a positive sum; returns them normalised."""
    p = np.asarray(proportions, dtype=np.float64)
    if p.shape != (num_domains,):
        raise AioliError(
            f"expected {num_domains} proportions (one per domain), got {p.shape[0] if p.ndim else p}"
        )
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise AioliError(f"proportions must be finite, non-negative and not all zero, got {p.tolist()}")
    return p / p.sum()


class MixtureStream:
    """Batches of ``batch_size`` sequences whose domains are drawn from the current proportions.

    Args:
        manifest: the prepared corpus.
        domains: domain names, in domain-id order.
        batch_size: sequences per batch (B).
        proportions: [D] mixture weights (normalised here).
        seed: seeds the domain draws and every domain's shuffling.
        split: which split to stream (``"train"`` for training).
    """

    def __init__(
        self,
        manifest: Manifest,
        domains: Sequence[str],
        batch_size: int,
        proportions: Sequence[float],
        *,
        seed: int = 0,
        split: str = "train",
    ):
        if batch_size < 1:
            raise AioliError(f"batch_size must be positive, got {batch_size}")
        self.domains = list(domains)
        self.batch_size, self.seed = batch_size, seed
        self.streams = [DomainStream(manifest, d, split, seed, i) for i, d in enumerate(self.domains)]
        self.proportions = check_proportions(proportions, len(self.domains))
        self.step = 0

    def set_proportions(self, proportions: Sequence[float]) -> None:
        """Use these proportions from the next batch on."""
        self.proportions = check_proportions(proportions, len(self.domains))

    def assign_domains(self, step: int) -> np.ndarray:
        """Domain of each slot of the batch of ``step``: [B] int, i.i.d. from the proportions."""
        rng = _rng(_DOMAIN_DRAW, self.seed, step)
        return rng.choice(len(self.domains), size=self.batch_size, p=self.proportions)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        domain_ids = self.assign_domains(self.step)
        samples = np.stack([self.streams[d].next() for d in domain_ids])
        self.step += 1
        return make_batch(samples, domain_ids)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "proportions": self.proportions.tolist(),
            "streams": [s.state_dict() for s in self.streams],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["streams"]) != len(self.streams):
            raise AioliError(
                f"stream state has {len(state['streams'])} domains, this stream {len(self.streams)}"
            )
        self.step = state["step"]
        self.proportions = check_proportions(state["proportions"], len(self.domains))
        for stream, s in zip(self.streams, state["streams"], strict=True):
            stream.load_state_dict(s)


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
