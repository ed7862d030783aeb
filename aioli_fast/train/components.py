"""The parts of a training run that do not depend on the engine: the model and mixer a config asks
for, the batch layout over processes, the learning-rate schedule, the reference model of DoReMi and
DoGE's per-domain gradient alignment.

The loop itself is :mod:`aioli_fast.train.trainer`.
"""

from __future__ import annotations

import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RunConfig
from ..data import Manifest
from ..device import resolve_device
from ..errors import AioliError, ConfigError, DataError
from ..mixing import MIXERS, Mixer, build_mixer
from ..mixing.doge import gradient_alignment
from ..model import GPT, preset_config
from .checkpoint import load_checkpoint
from .evaluate import same_tokenizer


class TrainingError(AioliError):
    """Training cannot go on (for example the loss became NaN)."""


@dataclass
class RunResult:
    run_dir: Path
    final: dict


def select_domains(cfg: RunConfig, manifest: Manifest) -> list[str]:
    if cfg.data.domains is None:
        return list(manifest.domains)
    unknown = [d for d in cfg.data.domains if d not in manifest.domains]
    if unknown:
        raise ConfigError(
            f"data.domains names {unknown}, not in the corpus (it has {list(manifest.domains)})"
        )
    if len(set(cfg.data.domains)) != len(cfg.data.domains) or not cfg.data.domains:
        raise ConfigError(f"data.domains must be a non-empty list without repeats, got {cfg.data.domains}")
    return list(cfg.data.domains)


def build_model(cfg: RunConfig, manifest: Manifest) -> GPT:
    """The model of ``cfg.model``; vocabulary and context default to the corpus'."""
    m = cfg.model
    vocab = m.vocab_size if m.vocab_size is not None else -(-manifest.vocab_size // 64) * 64
    if vocab < manifest.vocab_size:
        raise ConfigError(
            f"model.vocab_size={vocab} is smaller than the corpus vocabulary {manifest.vocab_size}"
        )
    max_seq_len = m.max_seq_len if m.max_seq_len is not None else manifest.seq_len
    if max_seq_len < manifest.seq_len:
        raise ConfigError(
            f"model.max_seq_len={max_seq_len} is shorter than the corpus seq_len {manifest.seq_len}"
        )
    try:
        gpt_cfg = preset_config(
            m.preset,
            vocab_size=vocab,
            max_seq_len=max_seq_len,
            d_model=m.d_model,
            n_layers=m.n_layers,
            n_heads=m.n_heads,
            d_ff=m.d_ff,
            rotary_fraction=m.rotary_fraction,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return GPT(gpt_cfg)


def batch_layout(cfg: RunConfig, world_size: int) -> tuple[int, int, int]:
    """(sequences per rank per step, micro-batch size, micro-batches per step), checked."""
    t = cfg.train
    if t.batch_size % world_size:
        raise ConfigError(
            f"train.batch_size={t.batch_size} (the global batch) must be divisible by the number of "
            f"processes, {world_size}"
        )
    per_rank = t.batch_size // world_size
    micro = t.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(
            f"train.micro_batch_size={micro} must divide the batch of each process, train.batch_size / "
            f"processes = {t.batch_size} / {world_size} = {per_rank}"
        )
    return per_rank, micro, per_rank // micro


def device_for(cfg: RunConfig, local_rank: int, world_size: int) -> torch.device:
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and world_size > 1 and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def cpu_threads(requested: int | None, local_processes: int = 1) -> int:
    """Threads for this process's CPU work: ``requested`` (``train.threads``), else ``OMP_NUM_THREADS``
    when set, else the cores this process may run on shared by the processes of this machine."""
    if requested is not None:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) >= 1:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_processes))


def set_cpu_threads(requested: int | None, local_processes: int = 1) -> int:
    """Set torch's intra-op threads (see :func:`cpu_threads`); returns the number set."""
    n = cpu_threads(requested, local_processes)
    torch.set_num_threads(n)
    return n


def lr_at(step: int, cfg: RunConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to min_lr_ratio."""
    o, total = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = total - 1 - o.warmup_steps  # the last step (total - 1) ends exactly at min_lr_ratio * lr
    progress = min(1.0, (step - o.warmup_steps) / span) if span > 0 else 1.0
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_run_mixer(cfg: RunConfig, domains: list[str], device: torch.device) -> Mixer:
    """The mixer of ``cfg.mixing``; a method's ``seed`` defaults to ``train.seed``."""
    options = cfg.mixing.options()
    cls = MIXERS.get(cfg.mixing.method)
    if cls is not None and options.get("seed") is None and "seed" in cls.OPTIONS:
        options["seed"] = cfg.train.seed
    return build_mixer(
        cfg.mixing.method,
        domains,
        device=device,
        proportions=cfg.mixing.proportions,
        total_steps=cfg.train.steps,
        warmup_steps=cfg.optim.warmup_steps,
        **options,
    )


def load_reference_model(mixer: Mixer, manifest: Manifest, device: torch.device) -> GPT:
    """The reference model a mixer compares against (DoReMi), frozen, checked against the corpus."""
    model, meta = load_checkpoint(mixer.reference_checkpoint, device)
    if not same_tokenizer(manifest.tokenizer, meta["tokenizer"]):
        raise ConfigError(
            f"mixing.reference {mixer.reference_checkpoint} was trained with tokenizer {meta['tokenizer']}, "
            f"the corpus uses {manifest.tokenizer}"
        )
    model.requires_grad_(False)
    return model.eval()


def domain_alignment(
    model: GPT,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    domain_ids: torch.Tensor,
    probe: tuple[torch.Tensor, torch.Tensor],
    num_domains: int,
) -> torch.Tensor:
    """[D] alignment of each domain's training gradient on a micro-batch with the probe's gradient.

    Its own forward of the micro-batch through the reference loss, which allows the D backward passes
    through one graph (the Triton loss frees its saved state after one backward).
    """
    tokens, probe_ids = probe
    val = model(tokens[:, :-1], tokens[:, 1:], probe_ids.to(torch.int32), num_domains)
    val_loss = (val.loss_sum / val.count.clamp_min(1)).sum()
    out = model(input_ids, labels, domain_ids, num_domains, loss_backend="reference")
    train_loss_D = out.loss_sum / out.count.clamp_min(1)
    return gradient_alignment(list(model.parameters()), train_loss_D, val_loss)


def check_held_out_shards(manifest: Manifest, domains: list[str], splits: list[str]) -> None:
    """Read the first member header of every shard of the held-out ``splits`` (one small read each), so
    a damaged val/test shard stops the run at start-up rather than at the final evaluation. Sizes are
    checked by :meth:`Manifest.check_files`; ``aioli-fast verify`` checks every byte."""
    for domain in domains:
        for split in splits:
            for shard in manifest.split_shards(domain, split):
                try:
                    with tarfile.open(manifest.local(shard), mode="r:") as tar:
                        first = tar.next()
                except (OSError, tarfile.TarError) as exc:
                    first, reason = None, f"{type(exc).__name__}: {exc}"
                else:
                    reason = "it holds no member"
                if first is None:
                    raise DataError(
                        f"{split} shard {shard.path} of domain {domain!r} is damaged ({reason}); "
                        "run `aioli-fast verify` on the corpus, and prepare it again"
                    )


def held_out_splits(manifest: Manifest, domains: list[str]) -> tuple[list[str], list[str]]:
    """(splits every domain has, messages about held-out splits that cannot be evaluated)."""
    present, notes = [], []
    for split in ("val", "test"):
        missing = [d for d in domains if (d, split) not in manifest.shards]
        if not missing:
            present.append(split)
        else:
            notes.append(f"no {split} evaluation: the corpus has no {split} split for domain(s) {missing}")
    return present, notes
