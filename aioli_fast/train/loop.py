"""The training loop: a thin loop over the data stream, the model, the optimizer and the mixer.

Single process for now. The parts are separate so that the DeepSpeed engine (which owns the model,
optimizer and scheduler) and the online mixers slot in without changing the loop's shape:

    proportions = mixer.proportions(step)  -> stream.set_proportions (only when they change)
    batch = next(stream)                    -> micro-batches -> forward (per-domain loss) -> backward
    mixer.observe(step, loss_sum_D, count_D) for every micro-batch
    clip, optimizer step, LR schedule; metrics every ``log_every`` steps (the only host syncs)

Each run directory holds the resolved ``config.yaml``, ``metrics.jsonl`` (one JSON object per log
step, and one per evaluation), ``model.pt`` and ``final.json`` (per-domain val/test loss and
perplexity and their averages).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig, dump_config
from ..data import Manifest, MixtureStream, load_manifest
from ..errors import AioliError, ConfigError
from ..fileio import atomic_write_bytes, atomic_write_json, ensure_writable_dir, progress_bar
from ..mixing import MIXERS, Mixer, build_mixer
from ..mixing.doge import gradient_alignment
from ..model import GPT, preset_config
from .checkpoint import load_checkpoint, save_checkpoint
from .device import autocast_context, resolve_device, resolve_precision
from .evaluate import evaluate, format_table, measure_losses, probe_batches, same_tokenizer, split_batches


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


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, norms)."""
    o = cfg.optim
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


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
        cfg.mixing.method, domains, device=device, proportions=cfg.mixing.proportions, **options
    )


def measurement_source(
    mixer: Mixer,
    cfg: RunConfig,
    manifest: Manifest,
    domains: list[str],
    eval_splits: list[str],
    device: torch.device,
    precision: str,
):
    """A function ``model -> (loss_sum_D, count_D)`` for the mixer's probe / full_val measurements, or None.

    ``probe`` loads its fixed batches once; ``full_val`` streams the validation split (at most
    ``eval.max_sequences`` per domain) each time, as the Aioli paper does.
    """
    kind = mixer.measurement
    if kind not in ("probe", "full_val"):
        return None
    if "val" not in eval_splits:
        raise ConfigError(
            f"mixing.measurement={kind} needs a val split in the corpus; use mixing.measurement=train instead"
        )
    n = len(domains)
    if kind == "probe":
        probe = probe_batches(manifest, domains, "val", cfg.mixing.probe_sequences, cfg.eval.batch_size)
        return lambda model: measure_losses(model, probe, n, device=device, precision=precision)

    def full_val(model):
        batches = split_batches(manifest, domains, "val", cfg.eval.batch_size, cfg.eval.max_sequences)
        return measure_losses(model, batches, n, device=device, precision=precision)

    return full_val


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


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create the run directory and check that it is writable.

    A directory holding a finished run (``final.json``) is reused only with ``train.overwrite``; the
    files of an unfinished run (one that failed or was stopped) are replaced.
    """
    run_dir = Path(cfg.train.out_dir) / (cfg.train.name or "run")
    if (run_dir / "final.json").exists() and not cfg.train.overwrite:
        raise AioliError(
            f"{run_dir} already holds a finished run; choose another train.name or pass train.overwrite=true"
        )
    ensure_writable_dir(run_dir, "run directory")
    for stale in ("final.json", "metrics.jsonl", "model.pt", "config.yaml"):
        (run_dir / stale).unlink(missing_ok=True)
    return run_dir


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


def _say(message: str, bar) -> None:
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


def train(cfg: RunConfig) -> RunResult:
    """Run training and the final evaluation; returns the run directory and the final results."""
    cfg.validate()
    manifest = load_manifest(cfg.data.path)
    domains = select_domains(cfg, manifest)
    eval_splits, eval_notes = held_out_splits(manifest, domains)
    if cfg.eval.every and "val" not in eval_splits:
        raise ConfigError(f"eval.every={cfg.eval.every} needs a val split: {eval_notes[0]}")
    manifest.check_files(domains, ["train", *eval_splits])  # a missing shard fails now, not after training
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, manifest).to(device)
    mixer = build_run_mixer(cfg, domains, device)
    measure = measurement_source(mixer, cfg, manifest, domains, eval_splits, device, precision)
    warning = mixer.train_measurement_warning(cfg.train.batch_size)
    if warning:
        _say(f"warning: {warning}", None)
    reference = load_reference_model(mixer, manifest, device) if mixer.needs_reference_model else None
    gradient_probe = None
    if mixer.needs_gradients:
        probe = probe_batches(manifest, domains, "val", cfg.mixing.probe_sequences, cfg.eval.batch_size)
        gradient_probe = tuple(
            torch.from_numpy(np.concatenate(parts)).to(device) for parts in zip(*probe, strict=True)
        )
    optimizer = build_optimizer(model, cfg)
    run_dir = prepare_run_dir(cfg)
    atomic_write_bytes(run_dir / "config.yaml", dump_config(cfg).encode("utf-8"))

    t = cfg.train
    micro = t.micro_batch_size or t.batch_size
    n_micro = t.batch_size // micro
    num_domains = len(domains)
    host_proportions = mixer.host_proportions(0)
    proportions_D = None  # set (with the stream's proportions) at the first step, after any measurement
    measurements, measure_time, scheduled_until = 0, 0.0, 0
    stream = MixtureStream(
        manifest,
        domains,
        t.batch_size,
        host_proportions,
        seed=t.seed,
        assignment=cfg.data.assignment,
        num_workers=cfg.data.num_workers,
        prefetch_factor=cfg.data.prefetch_factor,
        on_error=cfg.data.on_error,
    )

    bar = progress_bar(t.steps, "train", "step", t.progress)
    _say(
        f"training {model.num_parameters() / 1e6:.2f}M parameters on {device} ({precision}), "
        f"{num_domains} domains, {t.steps} steps x {t.batch_size} x {manifest.seq_len} tokens, "
        f"mixing={cfg.mixing.method}; run directory {run_dir}",
        bar,
    )
    window_sum_D = torch.zeros(num_domains, device=device)
    window_count_D = torch.zeros(num_domains, device=device)
    window_loss = torch.zeros((), device=device)
    window_steps, window_tokens, total_tokens = 0, 0, 0
    window_start = train_start = time.perf_counter()
    metrics_path = run_dir / "metrics.jsonl"
    model.train()
    with open(metrics_path, "a", encoding="utf-8") as metrics:
        for step in range(t.steps):
            if mixer.measurement_due(step):
                measure_start = time.perf_counter()
                mixer.observe_measurement(step, *measure(model))
                measurements += 1
                measure_time += time.perf_counter() - measure_start
            schedule = mixer.schedule(step)
            if schedule:  # host-known proportions of the coming steps: the stream can read ahead
                stream.set_schedule(schedule, start=step)
                scheduled_until = step + len(schedule)
            current = mixer.proportions(step)
            if current is not proportions_D:  # a new tensor means new proportions: one small read
                proportions_D = current
                host_proportions = mixer.host_proportions(step)
                if step >= scheduled_until:
                    stream.set_proportions(host_proportions, step=step)
            batch = next(stream)
            if device.type == "cuda":
                batch = batch.pin_memory()
            batch = batch.to(device)
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for i in range(n_micro):
                sl = slice(i * micro, (i + 1) * micro)
                with autocast_context(device, precision):
                    out = model(batch.input_ids[sl], batch.labels[sl], batch.domain_ids[sl], num_domains)
                if i == 0 and mixer.needs_gradients and mixer.alignment_due(step):
                    with autocast_context(device, precision):
                        scores_D = domain_alignment(
                            model,
                            batch.input_ids[sl],
                            batch.labels[sl],
                            batch.domain_ids[sl],
                            gradient_probe,
                            num_domains,
                        )
                    mixer.observe_alignment(step, scores_D)
                (out.loss / n_micro).backward()
                loss_sum_D, count_D = out.loss_sum.detach(), out.count
                mixer.observe(step, loss_sum_D, count_D)
                if reference is not None:
                    with torch.no_grad(), autocast_context(device, precision):
                        ref = reference(
                            batch.input_ids[sl], batch.labels[sl], batch.domain_ids[sl], num_domains
                        )
                    mixer.observe_reference(step, ref.loss_sum, ref.count)
                window_sum_D += loss_sum_D
                window_count_D += count_D
                window_loss += out.loss.detach() / n_micro
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            window_steps += 1
            window_tokens += batch.num_tokens
            total_tokens += batch.num_tokens
            if bar is not None:
                bar.update(1)

            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                loss = float(window_loss.item()) / window_steps
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"the training loss became {loss} by step {done}; lower optim.lr or check the data"
                    )
                elapsed = time.perf_counter() - window_start
                sums, counts = window_sum_D.tolist(), window_count_D.tolist()
                record = {
                    "step": done,
                    "loss": loss,
                    "domain_loss": {d: (s / c if c else None) for d, s, c in zip(domains, sums, counts)},
                    "proportions": dict(zip(domains, host_proportions)),
                    **{f"mixer_{k}": v.item() for k, v in mixer.metrics().items()},
                    **{f"data_{k}": v for k, v in stream.metrics().items()},
                    "lr": lr,
                    "tokens": total_tokens,
                    "tokens_per_s": window_tokens / elapsed if elapsed > 0 else None,
                    "elapsed_s": time.perf_counter() - train_start,
                }
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                shown_p = " ".join(f"{v:.2f}" for v in host_proportions)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s'] or 0:,.0f}", p=shown_p
                    )
                elif t.progress:
                    _say(
                        f"step {done}/{t.steps}  loss {loss:.4f}  lr {lr:.2e}  "
                        f"{record['tokens_per_s'] or 0:,.0f} tokens/s  p [{shown_p}]  "
                        f"{record['elapsed_s']:.0f} s",
                        None,
                    )
                window_sum_D.zero_()
                window_count_D.zero_()
                window_loss.zero_()
                window_steps, window_tokens, window_start = 0, 0, time.perf_counter()

            if cfg.eval.every and done % cfg.eval.every == 0 and done != t.steps:
                val = evaluate(
                    model,
                    manifest,
                    domains,
                    "val",
                    batch_size=cfg.eval.batch_size,
                    device=device,
                    precision=precision,
                    max_sequences=cfg.eval.max_sequences,
                )
                metrics.write(json.dumps({"step": done, "eval": {"val": val}}) + "\n")
                metrics.flush()
                _say(
                    f"step {done}: val loss {val['average']['loss']:.4f}, ppl {val['average']['ppl']:.3f}",
                    bar,
                )
    if bar is not None:
        bar.close()
    train_time = time.perf_counter() - train_start

    save_checkpoint(
        run_dir / "model.pt",
        model,
        step=t.steps,
        domains=domains,
        config=cfg.to_dict(),
        tokenizer=manifest.tokenizer,
    )
    results = {}
    for note in eval_notes:
        _say(note, None)
    for split in eval_splits:
        if t.progress:
            _say(f"evaluating on {split} ...", None)
        results[split] = evaluate(
            model,
            manifest,
            domains,
            split,
            batch_size=cfg.eval.batch_size,
            device=device,
            precision=precision,
            max_sequences=cfg.eval.max_sequences,
        )
    final = {
        "steps": t.steps,
        "tokens": total_tokens,
        "train_time_s": train_time,
        "tokens_per_s": total_tokens / train_time if train_time > 0 else None,
        "domains": domains,
        "proportions": dict(zip(domains, host_proportions)),
        "mixer": {
            "method": cfg.mixing.method,
            "measurements": measurements,
            "measurement_time_s": measure_time,
            **{k: v.item() for k, v in mixer.metrics().items()},
            **mixer.summary(),
        },
        **results,
        "notes": eval_notes,
        "average": {
            f"{split}_{k}": res["average"][k] for split, res in results.items() for k in ("loss", "ppl")
        },
    }
    atomic_write_json(run_dir / "final.json", final)
    if results:
        print(format_table(results.get("val"), results.get("test")), flush=True)
    return RunResult(run_dir, final)
