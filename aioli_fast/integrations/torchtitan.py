"""Online data mixing inside torchtitan (the ``torchtitan`` package, 0.3): its documented extension
points for a data loader, a loss and a trainer.

torchtitan builds every component from a ``Config`` dataclass (``Trainer.Config.dataloader``,
``.loss``, ``.tokenizer``), and a training script is a function returning a ``Trainer.Config``
(``--module <package> --config <function>``). This module provides:

- :class:`AioliDataLoader` (a ``BaseDataLoader``): this rank's micro-batches of a prepared corpus
  (``aioli-fast prepare``), drawn by a :class:`~aioli_fast.data.MixtureStream` in the proportions the
  mixer learns; ``Config(dataset_path=<corpus>, mixer=..., mixer_options=...)``;
- :class:`AioliLoss` (a ``BaseLoss``): the per-domain cross-entropy
  (:func:`~aioli_fast.kernels.domain_cross_entropy`), scaled by torchtitan's ``global_valid_tokens``
  like its own cross-entropy;
- :class:`CorpusTokenizer` (a ``BaseTokenizer``): the corpus is already token ids; this reports its
  vocabulary and needs no tokenizer files;
- :class:`AioliTrainer` (a ``Trainer``): passes each micro-batch's domain ids to the loss, feeds the
  mixer, logs ``proportions/<domain>`` and ``domain_loss/<domain>`` at torchtitan's log steps, and
  every ``aioli_eval_every`` steps the per-domain validation loss and perplexity;
- :func:`aioli_config`: turns an existing ``Trainer.Config`` (a torchtitan model recipe) into one
  that trains with all of the above.

How it works, and why:

- **The stream advances with optimizer steps.** torchtitan fetches all micro-batches of step ``n``
  at the start of ``train_step``, after step ``n - 1`` finished (and fed the mixer); the data loader
  draws the stream batch of step ``n`` when the first of them is asked for, never earlier, so the
  state in a checkpoint written after step ``n`` is exactly where step ``n + 1`` starts.
- **One stream batch per optimizer step.** Each data-parallel rank draws ``local_batch_size x
  gradient_accumulation_steps`` sequences and yields them as the step's micro-batches.
- **Checkpoints.** The data loader's ``state_dict`` holds this rank's mixer and stream state under a
  key of its own (``dp_rank_<r>``, as torchtitan's own loader does, since DCP keeps one copy of a key
  every rank writes), so every rank resumes its own stream. Set
  ``checkpoint.last_save_model_only = False`` to resume from the final checkpoint too.
- **Evaluation never feeds the mixer:** only training micro-batches reach ``mixer.observe``.

Not supported: pipeline parallelism (the per-micro-batch domain ids are not threaded through the
pipeline schedule), context parallelism, DoGE and DoReMi with a reference checkpoint. The DP ranks
are the data-parallel ones (``dp_replicate x dp_shard``); tensor-parallel ranks share a stream.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.components.loss import BaseLoss
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import CompileConfig
from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer

from ..data import load_manifest
from ..errors import AioliError, ConfigError
from ..kernels import DomainLoss
from ..options import MixingOptions
from .common import OnlineMixing, logits_from

__all__ = [
    "AioliDataLoader",
    "AioliLoss",
    "AioliTrainer",
    "CorpusTokenizer",
    "aioli_config",
    "document_positions",
]


def _local(x: Any) -> Any:
    """The local shard of a DTensor (torchtitan's ``full_dtensor`` backend hands them to the loss)."""
    to_local = getattr(x, "to_local", None)
    return to_local() if callable(to_local) else x


def document_positions(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per-token positions ``[B, T]`` (int64) of packed sequences ``[B, T]``, restarting at 0 at each
    document: at a sequence's first token and after each end-of-document token, as torchtitan's own text
    loaders give them. torchtitan builds the document masks of FlexAttention / varlen attention from
    them, and the rotary embeddings read them."""
    T = input_ids.shape[1]
    index = torch.arange(T, device=input_ids.device).expand_as(input_ids)
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


class CorpusTokenizer(BaseTokenizer):
    """The tokenizer of a prepared corpus, for torchtitan: it reports the corpus vocabulary (the model's
    embedding must cover it); the data is already token ids, so it neither encodes nor decodes."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        corpus: str = ""

    def __init__(self, config: Config, *, tokenizer_path: str | None = None):
        super().__init__()
        if not config.corpus:
            raise ConfigError("CorpusTokenizer.Config needs corpus=<the folder aioli-fast prepare wrote>")
        self.vocab_size = load_manifest(config.corpus).vocab_size

    def encode(self, *args: Any, **kwargs: Any) -> list[int]:
        raise AioliError("a prepared corpus is already token ids: CorpusTokenizer does not encode")

    def decode(self, *args: Any, **kwargs: Any) -> str:
        raise AioliError("CorpusTokenizer does not decode: use the tokenizer the corpus was prepared with")

    def get_vocab_size(self) -> int:
        return self.vocab_size


class AioliDataLoader(BaseDataLoader):
    """This rank's micro-batches of a prepared corpus, mixed online (module docstring).

    ``Config.dataset_path`` is the corpus folder; the other fields are those of
    :class:`~aioli_fast.options.MixingOptions`. Yields ``({"input": [B, T], "domain_ids":
    [B]}, labels [B, T])`` with labels already the next tokens. Usable only inside
    :class:`AioliTrainer`, which attaches the trainer (optimizer step, accumulation, device).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseDataLoader.Config, MixingOptions):
        """torchtitan's data-loader config with the fields of :class:`~aioli_fast.options.MixingOptions`."""

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: BaseTokenizer | None = None,
        seq_len: int,
        local_batch_size: int,
        snapshot_every_n_steps: int | None = None,
        **kwargs: Any,
    ):
        if not config.dataset_path:
            raise ConfigError(
                "AioliDataLoader.Config needs dataset_path=<the folder aioli-fast prepare wrote>"
            )
        manifest = load_manifest(config.dataset_path)
        if seq_len != manifest.seq_len:
            raise ConfigError(
                f"training.seq_len is {seq_len} but the corpus was prepared with seq_len {manifest.seq_len}: "
                f"set training.seq_len={manifest.seq_len}"
            )
        self.config, self.manifest = config, manifest
        self.rank, self.world_size, self.local_batch_size = dp_rank, dp_world_size, local_batch_size
        self.mixing: OnlineMixing | None = None
        self.trainer: AioliTrainer | None = None

    def attach(self, trainer: AioliTrainer) -> OnlineMixing:
        """Build the mixing side for ``trainer`` (its accumulation, device and model)."""
        c = self.config
        self.trainer = trainer
        options = MixingOptions(**{name: getattr(c, name) for name in MixingOptions.names()})
        self.mixing = OnlineMixing(
            self.manifest,
            step_rows=self.local_batch_size * trainer.gradient_accumulation_steps,
            micro_rows=self.local_batch_size,
            device=trainer.device,
            options=options,
            total_steps=trainer.config.training.steps,
            warmup_steps=trainer.config.lr_scheduler.warmup_steps,
            rank=self.rank,
            world_size=self.world_size,
            lockstep=self.world_size > 1,
            framework="the torchtitan adapter",
        )
        return self.mixing

    def _ready(self) -> tuple[AioliTrainer, OnlineMixing]:
        if self.trainer is None or self.mixing is None:
            raise AioliError("AioliDataLoader runs inside AioliTrainer (set the config's trainer class)")
        return self.trainer, self.mixing

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        trainer, mixing = self._ready()
        while True:
            # torchtitan counts steps from 1 and has already advanced to the step being fetched
            batch = mixing.draw(trainer.step - 1, trainer.logits_of, trainer.model_parts[0])
            for micro in mixing.micro_batches(batch, self.local_batch_size):
                ids = micro["input_ids"]
                inputs = {"input": ids, "positions": document_positions(ids, self.manifest.eos_id)}
                yield {**inputs, "domain_ids": micro["domain_ids"]}, micro["labels"]

    def state_dict(self) -> dict[str, Any]:
        trainer, mixing = self._ready()
        buffer = io.BytesIO()
        torch.save(mixing.state_dict(trainer.step), buffer)
        return {f"dp_rank_{self.rank}": buffer.getvalue(), "world_size": self.world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _, mixing = self._ready()
        key = f"dp_rank_{self.rank}"
        if state_dict.get("world_size") != self.world_size or key not in state_dict:
            raise AioliError(
                f"the checkpoint holds the mixing state of {state_dict.get('world_size')} data-parallel "
                f"rank(s) (this run has {self.world_size}, rank {self.rank}): resume with the same "
                "data-parallel degree"
            )
        state = torch.load(io.BytesIO(state_dict[key]), map_location="cpu", weights_only=True)
        mixing.load_state_dict(state, source="the checkpoint")


class AioliLoss(BaseLoss):
    """The per-domain cross-entropy of a micro-batch, for torchtitan: ``(loss, {"domain_loss":
    DomainLoss})`` with ``loss`` the token-loss sum over ``global_valid_tokens`` (the tokens of the whole
    step over all data-parallel ranks, as torchtitan's own cross-entropy)."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        pass

    def __init__(self, config: Config, *, compile_config: CompileConfig | None = None):
        self.config = config
        self.mixing: OnlineMixing | None = None  # set by AioliTrainer

    def __call__(
        self,
        pred: torch.Tensor,
        labels: torch.Tensor,
        global_valid_tokens: torch.Tensor | None = None,
        *,
        domain_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.mixing is None or domain_ids is None:
            raise AioliError("AioliLoss runs inside AioliTrainer, which passes each micro-batch's domain ids")
        tokens = None if global_valid_tokens is None else _local(global_valid_tokens)
        # the gradient contract: backward sends loss_sum the scale 1 / tokens (1 without them)
        scale = 1.0 if tokens is None else torch.reciprocal(tokens.to(torch.float32))
        out = self.mixing.domain_loss(_local(pred), _local(labels), _local(domain_ids), train_scale=scale)
        total = out.loss_sum.sum()
        if tokens is not None:
            total = total / tokens
        return total, {"domain_loss": out}


class AioliTrainer(Trainer):
    """A torchtitan ``Trainer`` whose data are a prepared corpus mixed online (module docstring).

    ``Config`` adds ``aioli_eval_every``: evaluate per domain on the corpus's held-out split every this
    many steps (0: never), logged as ``val_loss/<domain>``, ``val_ppl/<domain>``, ``val_domains_loss``
    and ``val_domains_ppl``.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        aioli_eval_every: int = 0

    def __init__(self, config: Config):
        if not isinstance(config.dataloader, AioliDataLoader.Config):
            raise ConfigError("AioliTrainer needs dataloader=AioliDataLoader.Config(...) (see aioli_config)")
        if not isinstance(config.loss, AioliLoss.Config):
            raise ConfigError("AioliTrainer needs loss=AioliLoss.Config() (see aioli_config)")
        if not config.training.disable_cuda_graphs:
            raise ConfigError(
                "AioliTrainer needs training.disable_cuda_graphs=True: a CUDA graph would replay the "
                "captured step's domain ids and skip feeding the mixer"
            )
        super().__init__(config)
        if self.parallel_dims.pp_enabled or self.parallel_dims.cp_enabled:
            raise ConfigError("the torchtitan adapter does not support pipeline or context parallelism")
        self.mixing = self.dataloader.attach(self)
        self.mixing.check_vocab(self.tokenizer.get_vocab_size() if self.tokenizer is not None else None)
        self.loss_fn.mixing = self.mixing
        self.domains = self.mixing.domains
        self._domain_ids: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------- model

    def logits_of(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of ``input_ids`` through torchtitan's own input preparation (DTensor inputs under
        ``full_dtensor``), as a local tensor; for measurements and evaluation."""
        seen = self.ntokens_seen
        positions = document_positions(input_ids, self.mixing.manifest.eos_id).to(self.device)
        batch = {"input": input_ids.to(self.device), "positions": positions}
        inputs, _, extra = self.post_dataloading_process(batch, input_ids)
        self.ntokens_seen = seen  # not training tokens
        return _local(logits_from(self.model_parts[0](inputs, **extra)))

    # -------------------------------------------------------------------------------------- training

    def post_dataloading_process(self, input_dict, labels):
        self._domain_ids = input_dict.pop("domain_ids", None)  # not a model input
        return super().post_dataloading_process(input_dict, labels)

    def _forward_backward_body(self, inputs, labels, global_valid_tokens, extra_kwargs):
        with self.train_context():
            pred = self.model_parts[0](inputs, **extra_kwargs)
            loss, metrics = self.loss_fn(pred, labels, global_valid_tokens, domain_ids=self._domain_ids)
            del pred
            loss.backward()
        out: DomainLoss = metrics["domain_loss"]
        self.mixing.observe(self.step - 1, out)
        return loss

    def train_step(self, data_iterator):
        super().train_step(data_iterator)
        if self.metrics_processor.should_log(self.step):  # every rank: the reduction is collective
            logs = self.mixing.train_logs()
            self.metrics_processor.logger.log(logs, self.step)
            logger.info(f"step {self.step}: {self.mixing.console_line(logs)}")  # torchtitan's console
        every = self.config.aioli_eval_every
        if every and self.step % every == 0:
            model = self.model_parts[0]
            metrics = self.mixing.evaluate_domains(self.logits_of, model, prefix="val")
            self.metrics_processor.logger.log(metrics, self.step)
            self.last_eval = metrics

    def close(self) -> None:
        if getattr(self, "mixing", None) is not None:
            self.mixing.close()
        super().close()


def aioli_config(
    base: Trainer.Config,
    corpus: str,
    *,
    aioli_eval_every: int = 0,
    config_class: type[AioliTrainer.Config] | None = None,
    **dataloader: Any,
) -> AioliTrainer.Config:
    """``base`` (any torchtitan ``Trainer.Config``, e.g. a model recipe's) as an :class:`AioliTrainer`
    config training on ``corpus``: the data loader, loss and tokenizer replaced, ``training.seq_len``
    set to the corpus's, every other setting kept. ``dataloader`` are :class:`AioliDataLoader.Config`
    fields (``mixer``, ``mixer_options``, ``seed``, ...). ``config_class``: the ``Config`` of a
    subclass of :class:`AioliTrainer` (a subclass must declare its own ``Config``, or torchtitan
    builds the class the ``Config`` belongs to)."""
    kept = {f.name: getattr(base, f.name) for f in fields(Trainer.Config) if f.init}
    config = (config_class or AioliTrainer.Config)(**kept, aioli_eval_every=aioli_eval_every)
    config.dataloader = AioliDataLoader.Config(dataset_path=str(corpus), **dataloader)
    config.loss = AioliLoss.Config()
    config.tokenizer = CorpusTokenizer.Config(corpus=str(corpus))
    config.training.seq_len = load_manifest(corpus).seq_len
    # a CUDA graph replays the captured forward/backward: the per-micro-batch domain ids and the mixer's
    # observe() in it would be those of the capture
    config.training.disable_cuda_graphs = True
    return config
