"""Per-domain evaluation of a saved checkpoint (``aioli-fast eval``).

The evaluation itself (:func:`evaluate`, :func:`measure_losses`, ...) lives in :mod:`aioli_fast.evaluation`,
which the adapters share; it is re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..data import load_manifest
from ..device import resolve_device, resolve_precision
from ..errors import AioliError
from ..evaluation import (
    domain_loss_of,
    domain_results,
    evaluate,
    format_table,
    measure_losses,
    perplexity,
    probe_batches,
    same_tokenizer,
    split_batches,
)
from .checkpoint import load_checkpoint

__all__ = [
    "domain_loss_of",
    "domain_results",
    "evaluate",
    "evaluate_checkpoint",
    "format_table",
    "measure_losses",
    "perplexity",
    "probe_batches",
    "same_tokenizer",
    "split_batches",
]


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data: str | Path | None = None,
    domains: Sequence[str] | None = None,
    splits: Sequence[str] = ("test",),
    batch_size: int = 16,
    max_sequences: int | None = None,
    device: str = "auto",
) -> dict:
    """Per-domain loss and perplexity of a checkpoint on a prepared corpus.

    Args:
        checkpoint: ``model.pt`` or the run directory holding it.
        data: corpus folder; default the one the run trained on.
        domains: subset of the corpus' domains; default all.
        splits: which held-out splits to evaluate.

    Returns:
        ``{"checkpoint", "step", "data", <split>: evaluate(...) for each split}``.
    """
    if batch_size < 1 or (max_sequences is not None and max_sequences < 1):
        raise AioliError(f"batch size ({batch_size}) and max sequences ({max_sequences}) must be >= 1")
    dev = resolve_device(device, key="--device")
    data = data or None
    model, meta = load_checkpoint(checkpoint, dev)
    saved = meta["config"]["data"]
    data = str(data if data is not None else saved["path"])
    cache = {k: saved.get(k) for k in ("cache_dir", "cache_gb", "storage_options")}
    manifest = load_manifest(data, **cache)
    if not same_tokenizer(manifest.tokenizer, meta["tokenizer"]):
        raise AioliError(
            f"the corpus {data} was tokenized with {manifest.tokenizer}, "
            f"the checkpoint's training corpus with {meta['tokenizer']}"
        )
    if manifest.seq_len > model.cfg.max_seq_len:
        raise AioliError(
            f"the corpus {data} has seq_len {manifest.seq_len}, "
            f"longer than the checkpoint's context {model.cfg.max_seq_len}"
        )
    domains = list(domains) if domains else list(manifest.domains)
    manifest.check_files(domains, splits)
    precision = resolve_precision("auto", dev)
    results = {"checkpoint": str(checkpoint), "step": meta["step"], "data": str(data)}
    for split in splits:
        results[split] = evaluate(
            model,
            manifest,
            domains,
            split,
            batch_size=batch_size,
            device=dev,
            precision=precision,
            max_sequences=max_sequences,
        )
    return results
