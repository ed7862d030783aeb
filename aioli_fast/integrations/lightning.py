"""Online data mixing inside PyTorch Lightning: :class:`AioliDataModule` and :class:`AioliCallback`.

``AioliDataModule`` is a ``LightningDataModule`` whose training data is a prepared corpus (``aioli-fast
prepare``) drawn by a :class:`~aioli_fast.data.MixtureStream` in the proportions a mixer (Aioli or any
registered method) learns online; ``AioliCallback`` adds the per-domain numbers to the logs. A
LightningModule keeps its own ``training_step``; the loss comes from the data module::

    # fragment
    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"])
        return self.trainer.datamodule.loss(logits, batch)

    dm = AioliDataModule("corpus", batch_size=8, mixer="aioli", mixer_options={...})
    trainer = L.Trainer(max_steps=1000, callbacks=[AioliCallback()])
    trainer.fit(model, datamodule=dm)          # resume: trainer.fit(..., ckpt_path="last")

docs/integrations/lightning.md is the guide. How it works, and why:

- **The stream advances with optimizer steps.** The training data loader yields placeholders; the
  data module replaces each by a real micro-batch in ``on_before_batch_transfer``, which Lightning calls
  just before the batch's step, after the previous optimizer step. Lightning's fetcher reads one
  placeholder ahead, which costs nothing; the stream batch of step ``s`` is drawn after step ``s - 1``
  has fed the mixer, and the stream state saved in a checkpoint is exactly where training resumes.
- **One stream batch per optimizer step.** Each rank draws ``batch_size x accumulate_grad_batches``
  sequences per step and hands them out as the step's micro-batches; the mixer's step is
  ``trainer.global_step``.
- **Loss scale.** :meth:`AioliDataModule.loss` returns, for a training micro-batch, its token-loss sum
  over the tokens of the rank's whole step batch, times ``accumulate_grad_batches`` (Lightning divides
  by it): the step's gradient is the mean over its tokens with or without accumulation.
- **Every rank reads its own slice** of the global batch (``rank = trainer.global_rank``); no sampler is
  involved, so DDP needs nothing else.
- **Checkpoints.** The data module's ``state_dict`` (saved by Lightning in every checkpoint) holds the
  mixer and stream state of every rank (gathered; one collective per save) and the RNG state of each,
  restored just before the first resumed step, so dropout matches the uninterrupted run too. A
  checkpoint without it is refused at the first step rather than resumed on other data.
- **Evaluation never feeds the mixer.** ``loss`` feeds the mixer only while Lightning trains; in
  validation it adds to per-domain sums that :class:`AioliCallback` reports as ``val_loss/<domain>``,
  ``val_ppl/<domain>``, ``val_domains_loss`` and ``val_domains_ppl`` at Lightning's validation points.
  ``val_dataloader`` reads the corpus's held-out split, each rank its own sequences, none twice.

Not supported: DoGE (``needs_gradients``) and DoReMi with a reference checkpoint (a ``.json`` of
reference losses works), manual optimization, several optimizers, and model-sharded strategies
(FSDP, DeepSpeed ZeRO-3: the ranks' evaluation passes are not kept in lockstep).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from ..data import Manifest
from ..distributed import gather_objects
from ..errors import AioliError, ConfigError
from ..fileio import say
from ..mixing import DomainSums
from ..options import MixingOptions
from .common import CorpusSplit, OnlineMixing, model_logits, reduced_metrics

__all__ = ["AioliCallback", "AioliDataModule"]


class _StepPlaceholders(torch.utils.data.IterableDataset):
    """The training "dataset": an endless run of placeholders, replaced by real micro-batches in
    :meth:`AioliDataModule.on_before_batch_transfer`."""

    def __iter__(self):
        while True:
            yield 0


class _HeldOut(torch.utils.data.IterableDataset):
    """This rank's sequences of a held-out split, in batches. The sequences are interleaved over the
    domains (the first of each domain, then the second, ...) before every ``world_size``-th is taken,
    so that ``limit_val_batches`` still covers every domain."""

    def __init__(self, split: CorpusSplit, batch_size: int, rank: int, world_size: int):
        self.split, self.batch_size = split, batch_size
        doms = split.domain_ids.long()
        order = torch.argsort(doms, stable=True)  # rows grouped by domain, in file order within each
        first = torch.searchsorted(doms[order], doms[order])  # where each row's domain starts
        position = torch.arange(len(order)) - first  # the row's index within its domain
        interleaved = order[torch.argsort(position * (int(doms.max()) + 1) + doms[order], stable=True)]
        self.rows = interleaved[rank::world_size]

    def __iter__(self):
        s = self.split
        for start in range(0, len(self.rows), self.batch_size):
            rows = self.rows[start : start + self.batch_size]
            yield {"input_ids": s.input_ids[rows], "labels": s.labels[rows], "domain_ids": s.domain_ids[rows]}


class AioliDataModule(pl.LightningDataModule):
    """A ``LightningDataModule`` that trains on a prepared corpus mixed online by a mixer.

    Args:
        corpus: the folder written by ``aioli-fast prepare`` (or its loaded ``Manifest``).
        batch_size: sequences per micro-batch and rank (the step batch of a rank is this times
            ``accumulate_grad_batches``).
        logits_fn: ``(module, input_ids) -> logits`` for the mixer's probe / full-validation
            measurements (default: ``module(input_ids)``, or ``module(input_ids=..., use_cache=False)``
            for a Hugging Face model; an output with ``.logits`` is fine).
        **mixing: the fields of :class:`~aioli_fast.options.MixingOptions`: ``mixer`` (a method name,
            default ``"aioli"``, or a built :class:`~aioli_fast.mixing.Mixer`), ``mixer_options``,
            ``domains``, ``proportions``, ``seed``, ``assignment``, ``eval_split`` (the held-out split of
            validation and of probe / full-validation measurements; ``None``: neither),
            ``eval_batch_size`` (default ``batch_size``), ``eval_max_sequences``, ``probe_sequences``,
            ``num_workers``, ``prefetch_factor``.

    The batches are dicts of ``input_ids`` ``[B, T]``, ``labels`` ``[B, T]`` (already the next tokens:
    not to be shifted again) and ``domain_ids`` ``[B]``.
    """

    def __init__(
        self,
        corpus: str | Path | Manifest,
        *,
        batch_size: int,
        logits_fn: Callable[[torch.nn.Module, torch.Tensor], Any] | None = None,
        **mixing: Any,
    ):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.corpus, self.batch_size = corpus, batch_size
        if mixing.get("eval_batch_size") is None:
            mixing.pop("eval_batch_size", None)
        self.options = MixingOptions.from_keywords(mixing, "AioliDataModule", eval_batch_size=batch_size)
        self.logits_fn = logits_fn or model_logits
        self.mixing: OnlineMixing | None = None
        self._queue: list[dict[str, torch.Tensor]] = []  # micro-batches of the current step still to train
        self._resumed: dict[str, Any] | None = None  # this rank's state from a checkpoint, until step one
        self._val: DomainSums | None = None  # per-domain sums of the validation batches seen

    # -------------------------------------------------------------------------------------- lifecycle

    def setup(self, stage: str) -> None:
        if self.mixing is not None:
            return
        trainer = self.trainer
        if trainer is None:
            raise AioliError(
                "AioliDataModule.setup needs a Trainer: pass it as trainer.fit(..., datamodule=dm)"
            )
        if stage == "fit" and (trainer.max_steps is None or trainer.max_steps < 0):
            raise ConfigError("AioliDataModule needs Trainer(max_steps=N): the stream has no end")
        self.mixing = OnlineMixing(
            self.corpus,
            step_rows=self.batch_size * trainer.accumulate_grad_batches,
            micro_rows=self.batch_size,
            device=trainer.strategy.root_device,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            framework="AioliDataModule",
            total_steps=trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None,
            options=self.options,
        )
        self.domains = self.mixing.domains
        if stage == "fit":
            self.mixing.check_vocab(_model_vocab(trainer.lightning_module))
            self._check_validation_points(trainer)

    def _check_validation_points(self, trainer: pl.Trainer) -> None:
        """A validation in the middle of an optimizer step would save a checkpoint there, which cannot be
        resumed exactly: refuse at setup a validation interval that is not a whole number of steps."""
        accumulate, every = trainer.accumulate_grad_batches, trainer.val_check_interval
        validates = self.mixing.eval_split is not None and trainer.limit_val_batches != 0
        if accumulate > 1 and validates and trainer.checkpoint_callbacks and isinstance(every, int):
            if every % accumulate:
                raise ConfigError(
                    f"Trainer(val_check_interval={every}) is not a multiple of accumulate_grad_batches="
                    f"{accumulate}: the checkpoint after a validation would fall inside an optimizer step; "
                    f"set val_check_interval to a multiple of {accumulate} (micro-batches)"
                )

    def teardown(self, stage: str) -> None:
        if self.mixing is not None and stage == "fit":
            self.mixing.close()

    def train_dataloader(self):
        # a generator of its own: making the loader's iterator never draws from the global RNG
        return torch.utils.data.DataLoader(
            _StepPlaceholders(), batch_size=None, generator=torch.Generator().manual_seed(0)
        )

    def val_dataloader(self):
        mixing = self._ready()
        if mixing.eval_split is None:
            return []
        split = CorpusSplit(mixing.manifest, mixing.eval_split, mixing.domains, mixing.eval_max_sequences)
        held_out = _HeldOut(split, mixing.eval_batch_size, mixing.rank, mixing.world_size)
        return torch.utils.data.DataLoader(
            held_out, batch_size=None, generator=torch.Generator().manual_seed(0)
        )

    def _ready(self) -> OnlineMixing:
        if self.mixing is None:
            raise AioliError("AioliDataModule is not set up: pass it to the Trainer as datamodule=")
        return self.mixing

    # ------------------------------------------------------------------------------------------- data

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return batch  # validation batches are real already
        mixing = self._ready()
        if not self._queue:
            module = trainer.lightning_module
            if self._resumed is not None:
                done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
                if done % trainer.accumulate_grad_batches:
                    raise ConfigError(
                        f"the checkpoint was written after {done} micro-batches of this epoch, not a whole "
                        f"number of optimizer steps of accumulate_grad_batches="
                        f"{trainer.accumulate_grad_batches}: it was written with another "
                        "accumulate_grad_batches; keep that value (change batch_size to keep the global "
                        "batch on another number of processes)"
                    )
                self._restore_rng(self._resumed)
                self._resumed = None
            if trainer.optimizers and len(trainer.optimizers) > 1:
                raise ConfigError("AioliDataModule supports one optimizer")
            if not module.automatic_optimization:
                raise ConfigError("AioliDataModule supports automatic optimization only")
            step_batch = mixing.draw(trainer.global_step, lambda ids: self.logits_fn(module, ids), module)
            self._queue = mixing.micro_batches(step_batch, self.batch_size)
        return self._queue.pop(0)

    @property
    def step_finished(self) -> bool:
        """Whether the last micro-batch handed out was the last of its optimizer step."""
        return not self._queue

    # ------------------------------------------------------------------------------------------- loss

    def loss(
        self, logits: Any, batch: Mapping[str, torch.Tensor], *, keep_logits: bool = True
    ) -> torch.Tensor:
        """The loss of a batch from the model's logits ``[B, T, V]`` (or an output with ``.logits``).

        While Lightning trains: the micro-batch's per-domain losses feed the mixer, and the returned
        loss is scaled so that the step's gradient is the mean over the step's tokens. Its gradient is
        written in this forward pass (backward makes no pass over the logits); with
        ``keep_logits=False`` it is written over ``logits`` themselves, which saves a second
        ``[B, T, V]`` buffer but leaves them holding the gradient: only for a ``training_step`` that
        does not use the logits after this call. Otherwise (a validation batch): its mean token loss,
        and its per-domain sums join the validation report.
        """
        mixing, trainer = self._ready(), self.trainer
        training = trainer is not None and trainer.training
        out = mixing.domain_loss(
            logits,
            batch["labels"],
            batch["domain_ids"],
            train_scale=mixing.step_scale if training else None,
            keep_logits=keep_logits,
        )
        if training:
            mixing.observe(trainer.global_step, out)
            return mixing.step_loss(out) * trainer.accumulate_grad_batches
        if self._val is None:
            self._val = DomainSums.zeros(len(mixing.domains), out.loss_sum.device)
        self._val.add(out.loss_sum, out.count)
        return out.loss

    def validation_metrics(self, prefix: str = "val") -> dict[str, float]:
        """Per-domain loss and perplexity of the validation batches seen since the last call, summed
        over ranks (collective); empty when no validation batch went through :meth:`loss`."""
        mixing = self._ready()
        sums = self._val if self._val is not None else DomainSums.zeros(len(mixing.domains), mixing.device)
        self._val = None
        return reduced_metrics(mixing.domains, DomainSums(sums.buffer.to(mixing.device)), prefix)

    # ------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Every rank's mixer, stream and RNG state (collective: Lightning calls it on every rank)."""
        mixing = self._ready()
        if self._queue:
            raise AioliError("a checkpoint in the middle of an optimizer step cannot be resumed exactly")
        mine = mixing.state_dict(self.trainer.global_step)
        mine["rng"] = _rng_state(mixing.device)
        return {"ranks": gather_objects(mine)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state :meth:`state_dict` saved, on any number of processes (a run on another
        number continues the same global sample order, with the mixer's per-rank windows merged and
        rank r taking the RNG state of rank r mod N)."""
        mixing = self._ready()
        ranks = state_dict.get("ranks")
        if not isinstance(ranks, list) or not ranks:
            raise AioliError("the checkpoint holds no mixing state of its processes (no 'ranks')")
        mixing.load_rank_states(ranks, source="the checkpoint")
        self._queue = []
        self._resumed = ranks[mixing.rank % len(ranks)]

    @staticmethod
    def _restore_rng(state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["rng"]["cpu"])
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"])


def _model_vocab(module: torch.nn.Module | None) -> int | None:
    """The vocabulary a model takes: its ``config.vocab_size`` (a Hugging Face model, or a module holding
    one), else the size of its input embedding, else of its largest ``nn.Embedding``; None if none."""
    if module is None:
        return None
    for candidate in (module, *module.children()):
        vocab = getattr(getattr(candidate, "config", None), "vocab_size", None)
        if isinstance(vocab, int):
            return vocab
    get_embeddings = getattr(module, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embeddings, torch.nn.Embedding):
        return embeddings.num_embeddings
    sizes = [m.num_embeddings for m in module.modules() if isinstance(m, torch.nn.Embedding)]
    return max(sizes) if sizes else None


def _rng_state(device: torch.device) -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


class AioliCallback(pl.Callback):
    """Adds the per-domain numbers of an :class:`AioliDataModule` to the Lightning logs.

    Every ``log_every_n_steps`` optimizer steps: ``proportions/<domain>``, ``domain_loss/<domain>`` (the
    mean training token loss since the previous log, over all ranks) and ``mixer/<metric>``. At the end
    of each validation: ``val_loss/<domain>``, ``val_ppl/<domain>``, ``val_domains_loss`` and
    ``val_domains_ppl`` of the batches that went through ``datamodule.loss``.
    """

    @staticmethod
    def _datamodule(trainer: pl.Trainer) -> AioliDataModule:
        dm = trainer.datamodule
        if not isinstance(dm, AioliDataModule):
            raise ConfigError(
                "AioliCallback needs an AioliDataModule: trainer.fit(model, datamodule=AioliDataModule(...))"
            )
        return dm

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._datamodule(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._datamodule(trainer)._ready().reset_window()
        # ModelCheckpoint does not restore the step it saved last: after a resume it would save again at
        # the resumed step, on its first micro-batch, in the middle of an optimizer step (and over the
        # checkpoint resumed from). That step is saved already.
        for callback in trainer.checkpoint_callbacks:
            if hasattr(callback, "_last_global_step_saved"):
                callback._last_global_step_saved = max(callback._last_global_step_saved, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dm = self._datamodule(trainer)
        every = trainer.log_every_n_steps
        if dm.step_finished and every and trainer.global_step % every == 0:
            # every rank gets here at the same step: the reduction inside is collective
            mixing = dm._ready()
            logs = mixing.train_logs()
            pl_module.log_dict(logs, on_step=True, on_epoch=False)
            if trainer.is_global_zero:  # Lightning's console shows no logged metric: say them
                say(f"step {trainer.global_step}: {mixing.console_line(logs)}")

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._datamodule(trainer)._val = None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        metrics = self._datamodule(trainer).validation_metrics("val")
        if metrics and not trainer.sanity_checking:
            pl_module.log_dict(metrics, on_step=False, on_epoch=True)
