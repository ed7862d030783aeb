"""The training run: one loop for a single process and for DeepSpeed ZeRO over many.

One optimizer step (:meth:`_Run.train_step`; every rank does the same, in the same order):

    1. batch       driver.draw(step): the mixer's pre-step calls (a probe / full-validation measurement
                   when due, a LearnParams block or new proportions to the stream), then this rank's
                   share of the global batch (:class:`aioli_fast.driver.MixingDriver`)
    2. micro-batches   engine.forward -> (mixer.observe_alignment) -> engine.backward -> engine.step;
                   driver.observe (the mixer, the loss window; and mixer.observe_reference); the
                   optimizer steps on the last micro-batch
    3. bookkeeping the step loss, token counts
and after it (:meth:`_Run.after_step`): log, checkpoint, stop on SIGTERM, evaluate, each when due.
The mixer updates at its own step boundaries from statistics all-reduced over ranks, so every rank
holds the same proportions (the hooks it is driven by are declared on :class:`aioli_fast.mixing.Mixer`).

Host reads happen at log steps (metrics), at checkpoints, when the proportions change (one small read),
and once per step when asked to (``train.on_nan=skip`` in one process). Over several processes the
ranks agree every step on whether to stop (SIGTERM) through a CPU collective, which waits for the peers
but never for the device.

A run directory holds ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` (run checkpoints, the last
``checkpoint.keep_last``), ``model.pt`` and ``final.json``. Only rank 0 writes files, except the
engine's own checkpoint shards, which every rank writes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig
from ..data import corpus_changes
from ..device import resolve_precision
from ..distributed import (
    all_reduce_,
    any_rank,
    barrier,
    host_group,
    is_collective_failure,
    launch_info,
    on_rank0,
)
from ..driver import MixingDriver
from ..errors import AioliError, ConfigError
from ..evaluation import evaluate, format_table, probe_batches
from ..fileio import FolderLock, atomic_write_json, ensure_writable_dir, progress_bar, say
from ..mixing import MIXERS
from .checkpoint import CheckpointWriteError, RunCheckpoints, save_checkpoint, set_rng_state
from .components import (
    RunResult,
    TrainingError,
    batch_layout,
    build_model,
    build_run_mixer,
    check_held_out_shards,
    device_for,
    domain_alignment,
    held_out_splits,
    load_reference_model,
    lr_at,
    select_domains,
    set_cpu_threads,
)
from .engine import DeepSpeedEngine, TorchEngine, init_distributed, resolve_backend
from .logger import MetricsLog
from .resume import prepare_run_dir
from .stats import LossWindow, WindowTotals


class TrainingInterrupted(AioliError):
    """The run stopped on SIGTERM after writing a checkpoint; running it again resumes it."""

    exit_code = 143  # 128 + SIGTERM, as a shell reports a process ended by the signal

    def __init__(self, step: int, checkpoint: Path, *, evaluating: bool = False):
        if evaluating:
            message = (
                f"stopped by SIGTERM during the final evaluation; training is complete (step {step}) and "
                f"checkpoint {checkpoint} holds it. Run the same command again to evaluate."
            )
        else:
            message = (
                f"stopped by SIGTERM after step {step}; checkpoint {checkpoint} written. "
                "Run the same command again to resume."
            )
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class _Preempted(Exception):
    """Raised by the SIGTERM handler while the run cannot stop at a step boundary (the final evaluation)."""


class _SigtermFlag:
    """Set by SIGTERM; the loop reads it between steps (all ranks agree before stopping)."""

    def __init__(self, enabled: bool):
        self.raised = False
        self.interrupt = False  # raise _Preempted at once instead of waiting for the loop to look
        self._previous = None
        self.enabled = enabled and threading.current_thread() is threading.main_thread()

    def __enter__(self):
        if self.enabled:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = True
        if self.interrupt:
            raise _Preempted

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGTERM, self._previous)


def train(cfg: RunConfig) -> RunResult:
    """Run training and the final evaluation; returns the run directory and the final results.

    Launched by ``torchrun`` or ``deepspeed`` every process calls this with the same config. Raises
    :class:`TrainingInterrupted` after a SIGTERM (a checkpoint has been written).
    """
    cfg.validate()
    info = launch_info()
    backend = resolve_backend(cfg, info.world_size)
    device = device_for(cfg, info.local_rank, info.world_size)
    set_cpu_threads(cfg.train.threads, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    precision = resolve_precision(cfg.train.precision, device)
    if backend == "deepspeed":
        mixer_cls = MIXERS.get(cfg.mixing.method)
        if mixer_cls is not None and mixer_cls.needs_gradients:
            raise ConfigError(
                f"mixing.method={cfg.mixing.method} takes per-domain gradients, which the DeepSpeed engine "
                "does not expose; run it with engine.backend=torch (one process)"
            )
        # the process group lives as long as the process: DeepSpeed caches its groups, so a group that
        # was destroyed and made again would leave it holding stale ones
        init_distributed(cfg, info, device)
    try:
        return _Run(cfg, info, backend, device, precision).run()
    except RuntimeError as exc:
        if info.world_size > 1 and is_collective_failure(exc):
            raise PeerLostError(cfg, info, exc) from exc
        raise


def checkpoint_folder(cfg: RunConfig) -> Path:
    """Where the run of ``cfg`` keeps its run checkpoints."""
    if cfg.checkpoint.dir:
        return Path(cfg.checkpoint.dir)
    return Path(cfg.train.out_dir) / (cfg.train.name or "run") / "checkpoints"


class PeerLostError(AioliError):
    """A collective failed in a job of several processes: another process has died or cannot be reached."""

    def __init__(self, cfg: RunConfig, info, cause: BaseException):
        lines = str(cause).strip().splitlines() or [type(cause).__name__]
        # the first sentence, without the "[file.cc:line]" of the C++ source that raised it
        reason = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]).split(". ")[0]
        latest = RunCheckpoints(checkpoint_folder(cfg), cfg.checkpoint.keep_last, info.rank).latest()
        resume = f"from {latest}" if latest is not None else "afresh (there is no checkpoint yet)"
        super().__init__(
            f"rank {info.rank} of {info.world_size} lost contact with the other processes ({reason}); "
            "another process has probably died: see its log. Run the same launch command again to resume "
            + resume
        )


class _Run:
    """One run: its parts (built from the config), its loop state, and :meth:`run`."""

    def __init__(self, cfg: RunConfig, info, backend: str, device: torch.device, precision: str):
        self.cfg, self.info, self.device, self.precision = cfg, info, device, precision
        self.main = info.is_main
        t = cfg.train
        self.manifest = cfg.data.manifest()
        self.domains = select_domains(cfg, self.manifest)
        self.eval_splits, self.eval_notes = held_out_splits(self.manifest, self.domains)
        if cfg.eval.every and "val" not in self.eval_splits:
            raise ConfigError(f"eval.every={cfg.eval.every} needs a val split: {self.eval_notes[0]}")
        self.manifest.check_files(self.domains, ["train", *self.eval_splits])
        check_held_out_shards(self.manifest, self.domains, self.eval_splits)
        self.per_rank, self.micro, self.micro_steps = batch_layout(cfg, info.world_size)
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        model = build_model(cfg, self.manifest)
        if backend == "torch":
            self.engine = TorchEngine(model, cfg, device, precision, self.micro_steps)
        else:
            self.engine = DeepSpeedEngine(
                model, cfg, device, precision, self.micro, self.micro_steps, info.world_size
            )
        self.model = self.engine.module
        self.lockstep = backend == "deepspeed" and cfg.engine.zero_stage == 3
        self.mixer = build_run_mixer(cfg, self.domains, device)
        warning = self.mixer.train_measurement_warning(t.batch_size)
        if warning:
            self._say(f"warning: {warning}")
        # the probe, sized to mixing.measure_budget when one is set
        probe_sequences = self.mixer.probe_size(t.steps, t.batch_size, cfg.mixing.probe_sequences)
        plan = self.mixer.describe(t.steps, t.batch_size, probe_sequences)
        if plan:
            self._say(plan)
        self.reference = (
            load_reference_model(self.mixer, self.manifest, device)
            if self.mixer.needs_reference_model
            else None
        )
        self.gradient_probe = None
        if self.mixer.needs_gradients:
            probe = probe_batches(
                self.manifest, self.domains, "val", cfg.mixing.probe_sequences, cfg.eval.batch_size
            )
            self.gradient_probe = tuple(
                torch.from_numpy(np.concatenate(parts)).to(device) for parts in zip(*probe, strict=True)
            )
        D = len(self.domains)
        self.window = LossWindow(D, device)  # this rank's, until the next log step
        # the mixer around each step: measurements, LearnParams blocks, proportions to the stream
        if self.mixer.measurement in ("probe", "full_val") and "val" not in self.eval_splits:
            raise ConfigError(
                f"mixing.measurement={self.mixer.measurement} needs a val split in the corpus; use "
                "mixing.measurement=round (the default: the training batches)"
            )
        self.driver = MixingDriver.for_corpus(
            self.manifest,
            self.mixer,
            dataclasses.replace(cfg.mixing_options(), probe_sequences=probe_sequences),
            step_rows=self.per_rank,
            rank=info.rank,
            world_size=info.world_size,
            lockstep=self.lockstep,
            precision=precision,
            on_error=cfg.data.on_error,
            window=self.window.sums,
            micro_rows=self.micro,
        )
        self.stream = self.driver.stream
        if info.world_size > 1 and cfg.checkpoint.on_sigterm:
            host_group()  # made now, by every rank, for the per-step agreement on stopping
        self.run_dir = Path(t.out_dir) / (t.name or "run")
        self.checkpoints = RunCheckpoints(checkpoint_folder(cfg), cfg.checkpoint.keep_last, info.rank)
        # loop state (saved in checkpoints, with the driver's)
        self.step = 0
        self.total_tokens = 0
        self.window_tokens = 0  # this launch's tokens in the log window (throughput)
        self.last_saved: int | None = None  # step of the last checkpoint written
        self.train_start = self.window_start = 0.0
        self.skipped_before = 0
        self.launch_tokens = 0  # trained by this process launch (throughput after a resume)
        self.resumed_from = None
        self.resumed_checkpoint: Path | None = None
        self._lock: FolderLock | None = None  # rank 0's lock of the run directory

    # ---------------------------------------------------------------------------------------- setup

    def _prepare_run_dir(self) -> Path | None:
        return prepare_run_dir(
            self.cfg,
            self.run_dir,
            self.checkpoints,
            self.info,
            self.engine.kind,
            self.manifest.fingerprint(self.domains),
        )

    def _say(self, message: str, bar=None) -> None:
        """A line on stderr from rank 0 (through the progress bar when one is drawn)."""
        if self.main:
            say(message, bar)

    def _num_parameters(self) -> int:
        """Every weight, also those ZeRO-3 has partitioned (``ds_numel``)."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())

    def _shared_state(self) -> dict:
        """What is the same on every rank."""
        return {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "world_size": self.info.world_size,
            "engine": self.engine.kind,
            "domains": list(self.domains),
            "corpus": self.manifest.fingerprint(self.domains),
            "stream": self.stream.state_dict(),
            "loop": {
                "total_tokens": self.total_tokens,
                "measurements": self.driver.measurements,
                "measure_time": self.driver.measure_time,
                "scheduled_until": self.driver.scheduled_until,
                "skipped_steps": self.engine.skipped_steps + self.skipped_before,
            },
        }

    def _own_state(self) -> dict:
        """What each rank holds for itself until the next all-reduce: the mixer's and the loop's windows."""
        return {"mixer": self.mixer.state_dict(), "window": self.window.buffer}

    def _resume(self, checkpoint: Path) -> None:
        state = RunCheckpoints.load_trainer_state(checkpoint)
        own = self._own_saved_state(state["ranks"])
        try:
            self.engine.load(checkpoint, saved_world_size=len(state["ranks"]))
        except (OSError, RuntimeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise AioliError(
                f"cannot load the model and optimizer state of checkpoint {checkpoint} ({first}); name an "
                "earlier checkpoint with checkpoint.resume=PATH, or set checkpoint.resume=never"
            ) from exc
        self.mixer.load_state_dict(own["mixer"])
        loop = state["loop"]
        if corpus_changes(state.get("corpus"), self.manifest.fingerprint(self.domains)):
            # checkpoint.new_corpus (checked when the run directory was prepared): the saved positions
            # are of another corpus; a fresh stream of this one, from the resumed step
            self.stream.start_at(state["step"])
            loop = {**loop, "scheduled_until": 0}
        else:
            self.stream.load_state_dict(state["stream"])
        self.step = self.resumed_from = state["step"]
        self.resumed_checkpoint = checkpoint
        self.total_tokens = loop["total_tokens"]
        self.driver.measurements, self.driver.measure_time = loop["measurements"], loop["measure_time"]
        self.driver.scheduled_until = loop["scheduled_until"]
        self.window.load_(own["window"])
        self.skipped_before = loop["skipped_steps"] - self.engine.skipped_steps
        set_rng_state(own["rng"])
        if state["config"]["train"]["steps"] != self.cfg.train.steps:
            self._say(
                f"note: the checkpoint's run had train.steps={state['config']['train']['steps']}, this one "
                f"{self.cfg.train.steps}; the learning-rate schedule follows the new length"
            )

    def _own_saved_state(self, ranks: list[dict]) -> dict:
        """This rank's part of a checkpoint's ``ranks``; written by another number of processes, the
        per-rank windows are merged (their totals kept) and rank r takes the RNG state of rank r mod N."""
        rank, W = self.info.rank, self.info.world_size
        if len(ranks) == W:
            return ranks[rank]
        return {
            "mixer": self.mixer.merge_states([r["mixer"] for r in ranks], rank),
            "window": self.window.merged([r["window"] for r in ranks], rank, W),
            "rng": ranks[rank % len(ranks)]["rng"],
        }

    def _save(self, bar) -> Path:
        path = self.checkpoints.save(
            self.step, self.engine, self._shared_state(), self._own_state(), self.device
        )
        self._say(f"step {self.step}: checkpoint {path}", bar)
        return path

    # ---------------------------------------------------------------------------------------- loop

    def run(self) -> RunResult:
        on_rank0(self._lock_run_dir, self.info.rank)  # every rank stops if another run holds it
        try:
            return self._run()
        finally:
            if self._lock is not None:
                self._lock.release()

    def _lock_run_dir(self) -> None:
        """Rank 0 takes the run directory's lock (a second run into it exits naming the first)."""
        ensure_writable_dir(self.run_dir, "run directory")
        self._lock = FolderLock(self.run_dir, "run directory").acquire()

    def _run(self) -> RunResult:
        cfg, t = self.cfg, self.cfg.train
        checkpoint = self._prepare_run_dir()
        w = self.cfg.logging.wandb
        wandb = None
        if w.project is not None and w.mode != "disabled":
            wandb = dict(project=w.project, name=w.name or t.name, entity=w.entity, mode=w.mode, dir=w.dir)
        log = MetricsLog(
            self.run_dir,
            enabled=self.main,
            tensorboard=t.tensorboard,
            wandb=wandb,
            config=self.cfg.to_dict() if wandb else None,
        )
        if checkpoint is not None:
            self._resume(checkpoint)
            log.truncate_after(self.step)
            self._say(f"resuming from {checkpoint} at step {self.step}")
        bar = progress_bar(t.steps, "train", "step", t.progress and self.main)
        if bar is not None:
            bar.update(self.step)
        self._say(
            f"training {self._num_parameters() / 1e6:.2f}M parameters "
            f"on {self.device} ({self.precision}, {torch.get_num_threads()} CPU thread(s)), "
            f"engine {self.engine.kind}"
            + (f" ZeRO-{cfg.engine.zero_stage}" if self.engine.kind == "deepspeed" else "")
            + f", {self.info.world_size} process(es), {len(self.domains)} domains, {t.steps} steps x "
            f"{t.batch_size} x {self.manifest.seq_len} tokens ({self.micro_steps} micro-batch(es) of "
            f"{self.micro} per process), mixing={cfg.mixing.method}; run directory {self.run_dir}",
            bar,
        )
        start = time.perf_counter()
        with _SigtermFlag(cfg.checkpoint.on_sigterm) as sigterm:
            try:
                with log:
                    self._loop(log, bar, sigterm)
            finally:
                self.stream.close()
                if bar is not None:
                    bar.close()
            return self._finish(time.perf_counter() - start, sigterm)

    def _loop(self, log: MetricsLog, bar, sigterm: _SigtermFlag) -> None:
        self.train_start = self.window_start = time.perf_counter()
        self.driver.restart()
        self.last_saved = self.step if self.step else None
        self.engine.train()
        while self.step < self.cfg.train.steps:
            lr = self.train_step(self.step)
            self.step += 1
            if bar is not None:
                bar.update(1)
            self.after_step(log, bar, sigterm, lr)

    def train_step(self, step: int) -> float:
        """One optimizer step on the global batch of ``step``; returns its learning rate."""
        batch = self.driver.draw(step, self.model)  # after the mixer's pre-step calls
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        batch = batch.to(self.device)
        lr = lr_at(step, self.cfg)
        self.engine.set_lr(lr)
        step_loss = torch.zeros((), device=self.device)
        for i in range(self.micro_steps):
            rows = slice(i * self.micro, (i + 1) * self.micro)
            loss = self._train_micro_batch(
                step, i, batch.input_ids[rows], batch.labels[rows], batch.domain_ids[rows]
            )
            step_loss += loss.detach().float() / self.micro_steps
        self.window.add_step(step_loss)
        tokens = batch.num_tokens * self.info.world_size
        self.window_tokens += tokens
        self.total_tokens += tokens
        self.launch_tokens += tokens
        return lr

    def _train_micro_batch(
        self, step: int, index: int, ids: torch.Tensor, labels: torch.Tensor, doms: torch.Tensor
    ) -> torch.Tensor:
        """Forward, backward and (on the last micro-batch) the optimizer step; feeds the mixer."""
        mixer, D = self.mixer, len(self.domains)
        out = self.engine.forward(ids, labels, doms, D, grad_scale=self.engine.loss_grad_scale)
        if index == 0 and mixer.needs_gradients and mixer.alignment_due(step):
            scores_D = domain_alignment(self.model, ids, labels, doms, self.gradient_probe, D)
            mixer.observe_alignment(step, scores_D)
        self.engine.backward(out.loss)
        self.engine.step()
        self.driver.observe(step, out.loss_sum, out.count)  # the mixer and the log window
        if self.reference is not None:
            with torch.no_grad():
                ref = self.reference(ids, labels, doms, D)
            mixer.observe_reference(step, ref.loss_sum, ref.count)
        return out.loss

    def after_step(self, log: MetricsLog, bar, sigterm: _SigtermFlag, lr: float) -> None:
        """What is due after a step: a log record, a checkpoint, a stop on SIGTERM, an evaluation."""
        cfg, t, done = self.cfg, self.cfg.train, self.step
        if done % t.log_every == 0 or done == t.steps:
            self._log(log, bar, self.driver.host_proportions, lr, self.window_start)
            self.window_start = time.perf_counter()
            self.window_tokens = 0
        if cfg.checkpoint.every and (done % cfg.checkpoint.every == 0 or done == t.steps):
            self._check_finite(done)
            self._save(bar)
            self.last_saved = done
        stop = sigterm.raised
        if self.info.world_size > 1 and cfg.checkpoint.on_sigterm:
            stop = any_rank(stop)  # a CPU collective, no device sync: all ranks stop at the same step
        if stop:  # before any evaluation: launchers allow little time after the signal
            self._check_finite(done)
            path = self._save(bar) if self.last_saved != done else self.checkpoints.latest()
            raise TrainingInterrupted(done, path)
        if cfg.eval.every and done % cfg.eval.every == 0 and done != t.steps:
            val = self._evaluate("val")
            log.write({"step": done, "eval": {"val": val}})
            self._say(
                f"step {done}: val loss {val['average']['loss']:.4f}, ppl {val['average']['ppl']:.3f}", bar
            )

    def _check_finite(self, done: int, totals: WindowTotals | None = None) -> None:
        """Stop a run that diverged, before it is logged as fine or saved (every rank decides alike).

        ``train.on_nan=stop``: a step whose loss was not finite, or that DeepSpeed skipped because its
        gradients were not, stops the run. ``skip``: more skipped steps than
        ``train.max_skipped_fraction`` of the run's steps stop it. ``totals`` is the window all-reduced
        over ranks (reduced here when not given).
        """
        t = self.cfg.train
        skipped = self.engine.skipped_steps + self.skipped_before
        if t.on_nan == "skip":
            allowed = int(t.max_skipped_fraction * t.steps)
            if skipped > allowed:
                raise TrainingError(
                    f"train.on_nan=skip has skipped {skipped} of {done} steps, more than "
                    f"train.max_skipped_fraction={t.max_skipped_fraction} of the run's {t.steps} steps "
                    f"({allowed}): the run has diverged; lower optim.lr or check the data"
                )
            return
        if totals is None:
            totals = self.window.reduced().totals()
        # the window sums every rank's steps: a step counts once, however many ranks saw it not finite
        bad = -(-totals.non_finite_steps // self.info.world_size)
        if bad:
            raise TrainingError(
                f"the training loss was not finite (NaN or inf) on {bad} step(s) up to "
                f"step {done}; lower optim.lr, check the data, or set train.on_nan=skip"
            )
        if skipped and not self.engine.loss_scaling:
            raise TrainingError(
                f"the gradients were not finite on {skipped} step(s) up to step {done} (DeepSpeed skipped "
                "them); lower optim.lr, check the data, or set train.on_nan=skip"
            )

    def _check_ranks_agree(self, host_p: list[float]) -> None:
        """Every rank must hold the same proportions (the stream of each rank assumes it); checked at log
        steps with one small collective when there are several ranks."""
        W = self.info.world_size
        if W == 1:
            return
        p_D = torch.tensor(host_p, dtype=torch.float64, device=self.device)
        moments = all_reduce_(torch.stack([p_D, p_D * p_D])) / W
        spread = (moments[1] - moments[0] ** 2).clamp_min(0).sqrt().max().item()
        if spread > 1e-6:
            raise TrainingError(
                f"the ranks hold different mixture proportions at step {self.step} (spread {spread:.2e}); "
                "every rank must run the same config and code"
            )

    def _log(self, log: MetricsLog, bar, host_p: list[float], lr: float, window_start: float) -> None:
        t, done = self.cfg.train, self.step
        totals = self.window.reduced().totals()  # one collective per log step
        self._check_finite(done, totals)
        self._check_ranks_agree(host_p)
        loss = totals.loss
        elapsed = time.perf_counter() - window_start
        record = {
            "step": done,
            "loss": loss if math.isfinite(loss) else None,
            "domain_loss": {
                d: (s / c if c else None) for d, s, c in zip(self.domains, totals.loss_sum, totals.count)
            },
            "domain_tokens": {d: int(c) for d, c in zip(self.domains, totals.count)},
            "proportions": dict(zip(self.domains, host_p)),
            **{f"mixer_{k}": v.item() for k, v in self.mixer.metrics().items()},
            **{f"data_{k}": v for k, v in self.stream.metrics().items()},
            "skipped_steps": self.engine.skipped_steps + self.skipped_before,
            "lr": lr,
            "tokens": self.total_tokens,
            "tokens_per_s": self.window_tokens / elapsed if elapsed > 0 else None,
            "elapsed_s": time.perf_counter() - self.train_start,
        }
        log.write(record)
        shown_p = " ".join(f"{v:.2f}" for v in host_p)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s'] or 0:,.0f}", p=shown_p)
        elif t.progress:
            self._say(
                f"step {done}/{t.steps}  loss {loss:.4f}  lr {lr:.2e}  "
                f"{record['tokens_per_s'] or 0:,.0f} tokens/s  p [{shown_p}]  {record['elapsed_s']:.0f} s"
            )
        self.window.zero_()

    def _evaluate(self, split: str) -> dict:
        return evaluate(
            self.model,
            self.manifest,
            self.domains,
            split,
            batch_size=self.cfg.eval.batch_size,
            device=self.device,
            precision=self.precision,
            max_sequences=self.cfg.eval.max_sequences,
            rank=self.info.rank,
            world_size=self.info.world_size,
            lockstep=self.lockstep,
        )

    def _checkpoint_before_evaluation(self) -> Path | None:
        """A run checkpoint of the finished training, unless the last step's is already there, so that a
        run stopped during the final evaluation (or while writing model.pt) resumes straight into it.

        Written whatever ``checkpoint.every`` says; with ``every: 0`` it is deleted once ``final.json``
        is written. If it cannot be written (a full disk), the run goes on without it and says so.
        """
        if self.last_saved == self.cfg.train.steps:
            return None
        self._check_finite(self.step)
        try:
            path = self.checkpoints.save(
                self.step, self.engine, self._shared_state(), self._own_state(), self.device
            )
        except CheckpointWriteError as exc:
            self._say(f"warning: {exc}; going on to model.pt and the evaluation without it")
            return None
        self.last_saved = self.step
        self._say(f"training saved in {path}: stopped from here on, the same command only evaluates")
        return path

    def _write_model(self, state: dict, end_checkpoint: Path | None) -> None:
        """``model.pt`` (rank 0), or one line saying why not and what of the run is still on disk."""
        path = self.run_dir / "model.pt"
        try:
            save_checkpoint(
                path,
                self.model,
                step=self.cfg.train.steps,
                domains=self.domains,
                config=self.cfg.to_dict(),
                tokenizer=self.manifest.tokenizer,
                state=state,
            )
        except (OSError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            kept = end_checkpoint or self.checkpoints.latest()
            then = (
                f"checkpoint {kept} holds the run: free space and run the same command again to write "
                "model.pt and evaluate"
                if kept is not None and kept.name == f"step_{self.cfg.train.steps:08d}"
                else "nothing of the finished training could be saved"
            )
            raise TrainingError(f"could not write {path} ({first}); {then}") from exc

    def _finish(self, train_time: float, sigterm: _SigtermFlag) -> RunResult:
        cfg, t = self.cfg, self.cfg.train
        end_checkpoint = self._checkpoint_before_evaluation()
        state = self.engine.full_state_dict()
        on_rank0(lambda: self._write_model(state, end_checkpoint), self.info.rank)
        for note in self.eval_notes:
            self._say(note)
        results = {}
        sigterm.interrupt = True  # from here a SIGTERM stops at once: the training is on disk
        try:
            if sigterm.raised:
                raise _Preempted
            for split in self.eval_splits:
                if t.progress:
                    self._say(f"evaluating on {split} ...")
                results[split] = self._evaluate(split)
        except _Preempted:
            raise TrainingInterrupted(
                t.steps, end_checkpoint or self.checkpoints.latest(), evaluating=True
            ) from None
        finally:
            sigterm.interrupt = False
        diverged = [
            split
            for split, res in results.items()
            if not (math.isfinite(res["average"]["loss"]) and math.isfinite(res["average"]["ppl"]))
        ]
        if diverged:
            skipped = self.engine.skipped_steps + self.skipped_before
            raise TrainingError(
                f"the final {' and '.join(diverged)} perplexity is not finite: the model has diverged "
                f"({skipped} step(s) skipped by train.on_nan={t.on_nan}); {self.run_dir / 'model.pt'} is "
                "kept for inspection and no final.json is written, so the run does not count as finished"
            )
        host_p, proportions_note = self.mixer.final_proportions(t.steps)  # never a block mixture
        if proportions_note:
            self.eval_notes.append(proportions_note)
            if self.main:
                say(f"warning: {proportions_note}")
        final = {
            "steps": t.steps,
            "tokens": self.total_tokens,
            "train_time_s": train_time,
            "tokens_per_s": self.launch_tokens / train_time if train_time > 0 else None,
            "resumed_from_step": self.resumed_from,
            "world_size": self.info.world_size,
            "engine": self.engine.kind
            + (f" ZeRO-{cfg.engine.zero_stage}" if self.engine.kind == "deepspeed" else ""),
            "skipped_steps": self.engine.skipped_steps + self.skipped_before,
            "domains": self.domains,
            "proportions": dict(zip(self.domains, host_p)),
            "mixer": {
                "method": cfg.mixing.method,
                "measurements": self.driver.measurements,
                "measurement_time_s": self.driver.measure_time,
                **{k: v.item() for k, v in self.mixer.metrics().items()},
                **self.mixer.summary(),
            },
            **results,
            "notes": self.eval_notes,
            "average": {
                f"{split}_{k}": res["average"][k] for split, res in results.items() for k in ("loss", "ppl")
            },
        }
        if self.main:
            atomic_write_json(self.run_dir / "final.json", final)
            if results:
                print(format_table(results.get("val"), results.get("test")), flush=True)
            guard = end_checkpoint or (self.resumed_checkpoint if self.resumed_from == t.steps else None)
            ours = guard is not None and guard.resolve().parent == self.checkpoints.folder.resolve()
            if ours and not cfg.checkpoint.every:
                self.checkpoints.remove(guard)  # it only guarded the evaluation
        barrier()
        return RunResult(self.run_dir, final)
