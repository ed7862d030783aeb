"""Per-domain evaluation: token loss and perplexity of each domain's held-out split.

The per-domain loss is exp-free mean token NLL (sum of token losses / tokens), its perplexity is
``exp(loss)``, and the averages are the plain means over domains (the Aioli paper's metric is the
average of the per-domain perplexities).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import numpy as np
import torch

from ..data import Manifest, sequential_batches
from ..model import GPT


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CUDA when ``precision`` is bf16; a no-op otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
