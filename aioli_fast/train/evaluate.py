"""Per-domain evaluation: token loss and perplexity of each domain's held-out split.

The per-domain loss is exp-free mean token NLL (sum of token losses / tokens), its perplexity is
``exp(loss)``, and the averages are the plain means over domains (the Aioli paper's metric is the
average of the per-domain perplexities).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..data import Manifest, load_manifest, sequential_batches
from ..errors import AioliError
from ..model import GPT
from .checkpoint import load_checkpoint
from .device import autocast_context, resolve_device, resolve_precision


@torch.no_grad()
def evaluate(
    model: GPT,
    manifest: Manifest,
    domains: Sequence[str],
    split: str,
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    max_sequences: int | None = None,
) -> dict:
    """Loss and perplexity of every domain on ``split``.

    Returns:
        ``{"domains": {name: {"loss", "ppl", "tokens"}}, "average": {"loss", "ppl"}}``.
    """
    was_training = model.training
    model.eval()
    results = {}
    try:
        for name in domains:
            loss_sum = torch.zeros(1, device=device)
            count = torch.zeros(1, device=device)
            for samples in sequential_batches(manifest, name, split, batch_size, max_sequences):
                tokens = torch.from_numpy(np.ascontiguousarray(samples)).to(device)
                zeros = torch.zeros(tokens.shape[0], dtype=torch.int32, device=device)
                with autocast_context(device, precision):
                    out = model(tokens[:, :-1], tokens[:, 1:], zeros, 1)
                loss_sum += out.loss_sum
                count += out.count
            n = float(count.item())
            loss = float(loss_sum.item()) / n if n else float("nan")
            results[name] = {"loss": loss, "ppl": math.exp(loss) if n else float("nan"), "tokens": int(n)}
    finally:
        model.train(was_training)
    losses = [r["loss"] for r in results.values()]
    ppls = [r["ppl"] for r in results.values()]
    return {
        "domains": results,
        "average": {"loss": sum(losses) / len(losses), "ppl": sum(ppls) / len(ppls)},
    }


def format_table(val: dict | None, test: dict | None) -> str:
    """A plain-text table of per-domain val/test loss and perplexity, and their averages."""
    source = val or test
    names = list(source["domains"])
    width = max(12, *(len(n) for n in names), len("average"))
    cols = [("val", val), ("test", test)]
    cols = [(label, res) for label, res in cols if res is not None]
    header = f"{'domain':<{width}}" + "".join(
        f"  {label + ' loss':>10}  {label + ' ppl':>10}" for label, _ in cols
    )
    lines = [header, "-" * len(header)]
    for name in [*names, "average"]:
        row = f"{name:<{width}}"
        for _, res in cols:
            r = res["average"] if name == "average" else res["domains"][name]
            row += f"  {r['loss']:>10.4f}  {r['ppl']:>10.3f}"
        if name == "average":
            lines.append("-" * len(header))
        lines.append(row)
    return "\n".join(lines)


def same_tokenizer(a: dict, b: dict) -> bool:
    """Whether two tokenizer specs (from manifests or checkpoints) give the same ids: by content, not path."""
    keys = ("kind", "vocab_size", "eos_id", "sha256")
    return all(a.get(k) == b.get(k) for k in keys)


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
    data = Path(data if data is not None else meta["config"]["data"]["path"])
    manifest = load_manifest(data)
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
