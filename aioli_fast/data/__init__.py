"""Data: ``prepare`` (raw text -> tar shards + manifest), tokenizers, and the mixture stream.

The stream (which needs torch) is imported on first use, so that preparing a corpus, often on machines
without an accelerator, does not load torch.
"""

from .prepare import combine, prepare
from .shards import Manifest, corpus_changes, load_manifest, read_shard

_STREAM = ("Batch", "MixtureStream", "make_batch", "sequential_batches")

__all__ = [
    "Batch",
    "Manifest",
    "MixtureStream",
    "combine",
    "corpus_changes",
    "load_manifest",
    "make_batch",
    "prepare",
    "read_shard",
    "sequential_batches",
]


def __getattr__(name: str):
    if name in _STREAM:
        from . import stream

        return getattr(stream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
