"""Per-domain evaluation and measurement: token loss and perplexity of each domain's held-out split, and
the held-out batches of a mixer's probe / full-validation measurements.

Shared by the native trainer (:mod:`aioli_fast.train`) and the adapters (:mod:`aioli_fast.integrations`),
so it imports neither. The per-domain loss is mean token NLL (sum of token losses / tokens), its
perplexity is ``exp(loss)``, and the averages are the plain means over domains (the Aioli paper's metric
is the average of the per-domain perplexities).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .data import Manifest, sequential_batches
from .device import autocast_context
from .distributed import all_reduce_
from .errors import AioliError
from .kernels import DomainLoss, domain_cross_entropy, linear_domain_cross_entropy
from .mixing import DomainSums
from .model import GPT

Batches = Iterable[tuple[np.ndarray, np.ndarray]]


def domain_loss_of(model: Callable) -> Callable[..., DomainLoss]:
    """``(input_ids [B, T], labels [B, T], domain_ids [B], D) -> DomainLoss`` for a model of any kind.

    ``model(input_ids)`` may return logits ``[B, T, V]``, an object with ``.logits`` (a Hugging Face
    ``CausalLMOutput``), or ``(hidden [B, T, H], weight [V, H])`` for the fused linear loss (``weight``:
    the output projection, for example ``lm_head.weight``). The per-domain loss is computed by the
    package's kernels, so the statistics are those ``aioli-fast train`` reports.
    """

    def loss(input_ids, labels, domain_ids, num_domains: int) -> DomainLoss:
        out = model(input_ids)
        doms_N = domain_ids.to(torch.int32).repeat_interleave(labels.shape[1])
        labels_N = labels.reshape(-1)
        if isinstance(out, tuple) and len(out) == 2:
            hidden, weight = out
            return linear_domain_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]), weight, labels_N, doms_N, num_domains
            )
        logits = getattr(out, "logits", out)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            raise AioliError(
                "a model given to evaluate must return logits [B, T, V] (or an object with .logits), or "
                f"(hidden [B, T, H], weight [V, H]); got {type(out).__name__}"
            )
        return domain_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels_N, doms_N, num_domains)

    return loss


@torch.no_grad()
def measure_losses(
    model: GPT | Callable,
    batches: Batches,
    num_domains: int,
    *,
    device: torch.device,
    precision: str = "fp32",
    rank: int = 0,
    world_size: int = 1,
    lockstep: bool = False,
    all_reduce: bool = True,
) -> DomainSums:
    """Per-domain token-loss sums [D] and token counts [D] (fp32, on ``device``) over ``batches``
    (a :class:`~aioli_fast.mixing.DomainSums`, which unpacks as ``(loss_sum_D, count_D)``).

    ``batches`` yields ``(samples [b, T+1], domain_ids [b])`` arrays (or tensors, already on the
    device for a probe). One no-grad forward per batch
    through the per-domain loss; nothing is read back to the host.

    With ``world_size > 1`` every rank runs the same ``batches`` iterator but forwards only every
    ``world_size``-th batch (from ``rank``), and the sums are all-reduced: every rank returns the totals
    (``all_reduce=False``: this rank's share, for a mixer, which reduces its measurements itself).
    ``lockstep`` (DeepSpeed ZeRO-3, whose forward is a collective) makes every rank run the same number
    of forwards: a rank with one batch fewer repeats one and discards the result.
    """
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "__self__", None)
    was_training = module.training if isinstance(module, torch.nn.Module) else None
    if was_training is not None:
        module.eval()
    loss_of = model if isinstance(model, GPT) else domain_loss_of(model)
    sums = DomainSums.zeros(num_domains, device)
    done, seen, spare = 0, 0, None

    def forward(samples, domain_ids):
        tokens, ids = on_device(samples, domain_ids, device)  # a probe is there already
        with autocast_context(device, precision):
            return loss_of(tokens[:, :-1], tokens[:, 1:], ids, num_domains)

    try:
        for index, (samples, domain_ids) in enumerate(batches):
            seen = index + 1
            if spare is None:
                spare = (samples, domain_ids)
            if index % world_size != rank:
                continue
            out = forward(samples, domain_ids)
            sums.add(out.loss_sum, out.count)
            done += 1
        if lockstep and spare is not None:
            for _ in range(-(-seen // world_size) - done):
                forward(*spare)  # keeps the collective forwards of ZeRO-3 in step; result unused
    finally:
        if was_training is not None:
            module.train(was_training)
    if world_size > 1 and all_reduce:
        all_reduce_(sums.buffer)
    return sums


def on_device(samples, domain_ids, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch (``samples [b, T+1]``, ``domain_ids [b]``: arrays, or tensors) as int64 / int32 tensors
    on ``device`` (tensors already there are returned as they are)."""
    if isinstance(samples, torch.Tensor):
        return samples.to(device), domain_ids.to(device)
    tokens = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.int64)).to(device)
    return tokens, torch.from_numpy(np.asarray(domain_ids, dtype=np.int32)).to(device)


def split_batches(
    manifest: Manifest,
    domains: Sequence[str],
    split: str,
    batch_size: int,
    max_sequences: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every domain's ``split`` (at most ``max_sequences`` each) as ``(samples, domain_ids)`` batches."""
    for index, name in enumerate(domains):
        for samples in sequential_batches(manifest, name, split, batch_size, max_sequences):
            yield samples, np.full(len(samples), index, dtype=np.int32)


def probe_batches(
    manifest: Manifest, domains: Sequence[str], split: str, sequences: int, batch_size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed probe: the first ``sequences`` samples of each domain's ``split``, mixed into batches.

    Loaded once and kept in host memory; measuring it costs ``ceil(D * sequences / batch_size)``
    no-grad forwards.
    """
    samples, ids = [], []
    for index, name in enumerate(domains):
        for chunk in sequential_batches(manifest, name, split, sequences, sequences):
            samples.append(chunk)
            ids.append(np.full(len(chunk), index, dtype=np.int32))
    all_samples, all_ids = np.concatenate(samples), np.concatenate(ids)
    return [
        (all_samples[i : i + batch_size], all_ids[i : i + batch_size])
        for i in range(0, len(all_samples), batch_size)
    ]


class Measurement:
    """A mixer's probe / full-validation measurement: its held-out batches, and this rank's share of
    running them through a model (:func:`measure_losses`, not all-reduced: the mixer reduces it).

    ``probe``: a fixed probe of ``probe_sequences`` per domain, read once (now) and kept on ``device``
    (``D x probe_sequences x (T + 1)`` int64 tokens), in micro-batches of at most ``micro_rows``
    sequences (the training micro-batch, so that a probe never needs more activation memory than a
    training step), shared out among the ranks: each forwards ``ceil(D x probe_sequences /
    world_size / micro_rows)`` of them at most.
    ``full_val``: the whole ``split`` (at most ``max_sequences`` per domain) in batches of ``batch_size``,
    read anew each time. The native trainer and the adapters build it alike.
    """

    def __init__(
        self,
        kind: str,
        manifest: Manifest,
        domains: Sequence[str],
        split: str,
        *,
        probe_sequences: int,
        batch_size: int,
        max_sequences: int | None,
        device: torch.device,
        precision: str = "fp32",
        rank: int = 0,
        world_size: int = 1,
        lockstep: bool = False,
        micro_rows: int | None = None,
    ):
        if kind not in ("probe", "full_val"):
            raise AioliError(f"no held-out measurement of kind {kind!r} (probe or full_val)")
        self.kind, self.num_domains = kind, len(domains)
        self.shard = {
            "device": device,
            "precision": precision,
            "rank": rank,
            "world_size": world_size,
            "lockstep": lockstep,
            "all_reduce": False,
        }
        if kind == "probe":
            per_process = -(-len(domains) * probe_sequences // world_size)
            rows = per_process if micro_rows is None else max(1, min(per_process, micro_rows))
            probe = [
                on_device(samples, ids, device)
                for samples, ids in probe_batches(manifest, domains, split, probe_sequences, rows)
            ]
            self.batches: Callable[[], Batches] = lambda: probe
        else:
            self.batches = lambda: split_batches(manifest, domains, split, batch_size, max_sequences)

    def __call__(self, model: GPT | Callable) -> DomainSums:
        """This rank's share of the per-domain sums and counts of ``model`` (see :func:`measure_losses`)."""
        return measure_losses(model, self.batches(), self.num_domains, **self.shard)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module | None):
    """``model.eval()`` inside, the previous mode restored after (nothing for None)."""
    if model is None:
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def perplexity(loss: float) -> float:
    """exp(loss), inf where that overflows (a diverged model), NaN for a NaN loss."""
    return math.exp(loss) if loss < 700 else (math.inf if loss == loss else loss)


def evaluate(
    model: GPT | Callable,
    manifest: Manifest,
    domains: Sequence[str],
    split: str,
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    max_sequences: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    lockstep: bool = False,
) -> dict:
    """Loss and perplexity of every domain on ``split``.

    ``model`` is the package's GPT, or any model as a callable of the input ids (see
    :func:`domain_loss_of`: logits, an output with ``.logits``, or hidden states and the output weight);
    an ``nn.Module`` (or a bound method of one) is put in eval mode for the evaluation.

    Returns:
        ``{"domains": {name: {"loss", "ppl", "tokens"}}, "average": {"loss", "ppl"}}``.
    """
    batches = split_batches(manifest, domains, split, batch_size, max_sequences)
    sums = measure_losses(
        model,
        batches,
        len(domains),
        device=device,
        precision=precision,
        rank=rank,
        world_size=world_size,
        lockstep=lockstep,
    )
    return domain_results(domains, sums)


def domain_results(domains: Sequence[str], sums: DomainSums) -> dict:
    """Per-domain token-loss sums and counts (already reduced over ranks) as :func:`evaluate`'s result:
    per domain the mean loss, its perplexity and the tokens; the average loss and perplexity over
    domains (a domain without tokens is NaN)."""
    results = {}
    loss_sums, counts = sums.buffer.tolist()  # one host read
    for name, total, n in zip(domains, loss_sums, counts):
        loss = total / n if n else float("nan")
        results[name] = {"loss": loss, "ppl": perplexity(loss) if n else float("nan"), "tokens": int(n)}
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
