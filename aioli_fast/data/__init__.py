"""Data: ``prepare`` (raw text -> tar shards + manifest), tokenizers, and the mixture stream."""

from .prepare import prepare
from .shards import Manifest, load_manifest, read_shard
from .stream import Batch, MixtureStream, make_batch, sequential_batches

__all__ = [
    "Batch",
    "Manifest",
    "MixtureStream",
    "load_manifest",
    "make_batch",
    "prepare",
    "read_shard",
    "sequential_batches",
]
