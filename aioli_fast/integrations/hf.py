"""Online data mixing inside a Hugging Face ``Trainer``: :class:`AioliTrainer`.

``AioliTrainer`` is a ``transformers.Trainer`` whose training data is a prepared corpus (``aioli-fast
prepare``) drawn by a :class:`~aioli_fast.data.MixtureStream` in the proportions a mixer (Aioli or any
registered method) learns online. Replace ``Trainer(..., train_dataset=...)`` by
``AioliTrainer(..., corpus=..., mixer="aioli", mixer_options={...})``; everything else of a Trainer
script (``TrainingArguments``, callbacks, ``train(resume_from_checkpoint=...)``, ``evaluate()``, DDP under
``torchrun``/``accelerate launch``) stays. docs/integrations/huggingface.md is the guide.

How it works, and why (each point is a way a previous attempt went silently wrong or hung):

- **The stream advances with optimizer steps, not with a data loader.** The training "data loader" is
  not handed to accelerate: it draws the stream batch of step ``s`` lazily when the Trainer asks for the
  first micro-batch of ``s``, which is after step ``s - 1`` has fed the mixer (the Trainer fetches the
  micro-batches of one optimizer step together, after the previous step). Nothing reads ahead, so the
  proportions of step ``s`` are known when its batch is drawn and the stream state written with the
  checkpoint after step ``s`` is exactly the state at step ``s + 1``. Not going through accelerate's
  data loader also means ``dispatch_batches``/``split_batches`` do not apply: every rank draws its own
  slice of the global batch (``MixtureStream(rank=args.process_index, world_size=args.world_size)``), so
  no rank waits for rank 0 to read and the mixer's all-reduce never hangs.
- **One stream batch per optimizer step.** Each rank draws ``per_device_train_batch_size x
  gradient_accumulation_steps`` sequences per step and splits them into the micro-batches; the mixer's
  step is the Trainer's ``global_step``, and the proportions only change between optimizer steps.
- **Loss scale.** Each micro-batch's loss is its token-loss sum divided by the tokens of the whole step
  batch of this rank (``loss_is_scaled_for_ga = True``), so the summed micro-batch losses, the logged
  loss and the gradient are the mean over the step's tokens with or without gradient accumulation (DDP
  then averages the ranks' equal-sized means).
- **Columns.** Training batches never pass through the collator, so ``remove_unused_columns`` cannot
  drop ``domain_ids``; for an ``eval_dataset`` of your own, ``domain_ids`` is added to the columns kept.
- **Resume.** ``args.ignore_data_skip`` is forced on (the Trainer must not skip batches: the stream
  state already says where to continue), and the mixer and stream state of every rank is written into
  each checkpoint folder (``aioli_state_rank<r>.pt``, by a ``TrainerCallback.on_save``) and read back by
  ``train(resume_from_checkpoint=...)``; a checkpoint without it is refused rather than resumed wrongly.
  Drawing a batch never touches the global RNG (the stream's reader processes start under a forked
  RNG), so the Trainer's restored RNG gives the dropout of the uninterrupted run.
- **Evaluation never feeds the mixer.** Only :meth:`AioliTrainer.training_step` calls ``mixer.observe``;
  ``compute_loss`` on evaluation batches computes a loss and nothing else.
- **Logs.** Training logs get ``proportions/<domain>`` (of the last step) and ``domain_loss/<domain>``
  (mean token loss since the previous log, over all ranks; absent for a domain without tokens);
  ``evaluate()`` reports the per-domain loss and perplexity of the corpus's validation split
  (:func:`aioli_fast.evaluation.evaluate`).

The per-domain loss is computed by :func:`aioli_fast.kernels.domain_cross_entropy` from the model's
logits: ``model(input_ids=..., use_cache=False).logits`` (:meth:`AioliTrainer.logits_of`). The stream's
``labels`` are already the next tokens, so the model is never given labels and never shifts them again.
Works with any ``*ForCausalLM`` (and, by overriding ``logits_of``, any model returning logits).
Not supported: DoGE (``needs_gradients``) and DoReMi with a reference checkpoint (a ``.json`` of
reference losses works), ``nn.DataParallel`` (several GPUs in one process: use ``torchrun``),
``auto_find_batch_size``, label smoothing, and tensor/sequence parallelism.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..data import Manifest, load_manifest
from ..errors import AioliError, ConfigError
from ..fileio import torch_file_damage
from ..kernels import DomainLoss
from ..options import MixingOptions
from .common import CorpusSplit, OnlineMixing, model_logits

STATE_FILE = "aioli_state_rank{rank}.pt"

__all__ = ["STATE_FILE", "AioliTrainer", "CorpusEvaluation", "CorpusSplitDataset"]


class CorpusEvaluation:
    """Marks "evaluate on the corpus's held-out split, per domain" as the Trainer's eval dataset.

    :class:`AioliTrainer` passes it to ``Trainer`` when no ``eval_dataset`` is given, so that
    ``eval_strategy="steps"`` works without one; it is not a dataset and is never loaded.
    """

    def __init__(self, split: str):
        self.split = split

    def __repr__(self) -> str:
        return f"CorpusEvaluation({self.split!r})"


class CorpusSplitDataset(CorpusSplit, torch.utils.data.Dataset):
    """A held-out split of a prepared corpus as Trainer examples, in the stream's convention.

    Items are ``{"input_ids": [T], "labels": [T], "domain_ids": []}`` with ``labels`` already the next
    tokens (not to be shifted again). Pass it as ``eval_dataset`` to run the Trainer's own evaluation
    loop (``compute_metrics``, ``prediction_step``) on the corpus; :class:`AioliTrainer` evaluates
    per domain without it. ``domains`` (default: all of the corpus) must be the trainer's, in its order:
    ``domain_ids`` index them.
    """


class _StepBatches:
    """The training "data loader": per optimizer step, one stream batch of this rank, split into the
    step's micro-batches. Drawn lazily (see the module docstring); never ends (the Trainer stops at
    ``max_steps``)."""

    def __init__(self, trainer: AioliTrainer):
        self.trainer = trainer

    def __iter__(self):
        trainer = self.trainer
        while True:
            yield from trainer.mixing.micro_batches(
                trainer._draw_step_batch(), trainer.args.per_device_train_batch_size
            )


class _SaveAioliState(TrainerCallback):
    """Writes this rank's mixer and stream state into every checkpoint folder the Trainer saves."""

    def __init__(self, trainer: AioliTrainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self.trainer.save_aioli_state(folder)
        return control


class AioliTrainer(Trainer):
    """A ``transformers.Trainer`` that trains on a prepared corpus mixed online by a mixer.

    Args (keyword-only; every other argument is the Trainer's):
        corpus: the folder written by ``aioli-fast prepare`` (or its loaded ``Manifest``).
        **mixing: the fields of :class:`~aioli_fast.options.MixingOptions`: ``mixer`` (a method name,
            default ``"aioli"``, built on ``args.device``, or a built :class:`~aioli_fast.mixing.Mixer`),
            ``mixer_options`` (the method's options, docs/mixing.md, e.g. ``{"measurement": "train"}``),
            ``domains``, ``proportions``, ``seed`` (default: ``args.data_seed``, else ``args.seed``),
            ``assignment``, ``eval_split`` (the held-out split ``evaluate()`` reports per domain and
            probe / full-validation measurements read; ``None``: neither), ``eval_max_sequences``,
            ``probe_sequences``; ``eval_batch_size``, ``num_workers`` and ``prefetch_factor`` default to
            the ``TrainingArguments``' evaluation batch size and data-loader settings.

    ``args.max_steps`` must be set (the stream has no end). ``train_dataset`` must not be given.
    """

    #: compute_loss scales each micro-batch's loss by the tokens of the whole optimizer step itself
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, corpus: str | Path | Manifest, **kwargs: Any):
        mixing = {name: kwargs.pop(name) for name in MixingOptions.names() if name in kwargs}
        if mixing.get("seed") is None:
            mixing.pop("seed", None)  # the Trainer's data seed
        if kwargs.get("train_dataset") is not None or (len(args) > 3 and args[3] is not None):
            raise ConfigError(
                "AioliTrainer draws its training data from `corpus`; do not pass a train_dataset"
            )
        if kwargs.get("compute_loss_func") is not None:
            raise ConfigError(
                "AioliTrainer computes the per-domain loss itself; override AioliTrainer.logits_of to "
                "change how logits are obtained instead of passing compute_loss_func"
            )
        manifest = corpus if isinstance(corpus, Manifest) else load_manifest(corpus)
        eval_split, domains = mixing.get("eval_split", MixingOptions.eval_split), mixing.get("domains")
        if kwargs.get("eval_dataset") is None and eval_split is not None:
            names = list(domains) if domains is not None else list(manifest.domains)
            if all((d, eval_split) in manifest.shards for d in names):  # (else: no per-domain evaluation)
                kwargs["eval_dataset"] = CorpusEvaluation(eval_split)  # eval_strategy="steps" needs one
        super().__init__(*args, **kwargs)
        a = self.args
        if a.max_steps is None or a.max_steps <= 0:
            raise ConfigError("AioliTrainer needs TrainingArguments(max_steps=N > 0): the stream has no end")
        if not hasattr(Trainer, "loss_is_scaled_for_ga"):
            raise ConfigError(
                "this transformers version has no Trainer.loss_is_scaled_for_ga, so it would scale the loss "
                "for gradient accumulation a second time: upgrade transformers"
            )
        if a.n_gpu > 1:
            raise ConfigError(
                f"AioliTrainer does not support nn.DataParallel ({a.n_gpu} GPUs in one process); launch one "
                "process per GPU with torchrun or accelerate launch"
            )
        if a.auto_find_batch_size:
            raise ConfigError("AioliTrainer does not support auto_find_batch_size")
        if a.label_smoothing_factor:
            raise ConfigError("AioliTrainer computes the plain per-domain loss: set label_smoothing_factor=0")
        if not a.ignore_data_skip:
            # the stream state in the checkpoint says where to continue; skipping batches would draw
            # (and train on) other data than the uninterrupted run
            a.ignore_data_skip = True
        options = MixingOptions.from_keywords(
            mixing,
            "AioliTrainer",
            seed=a.data_seed if a.data_seed is not None else a.seed,
            eval_batch_size=a.per_device_eval_batch_size,
            num_workers=a.dataloader_num_workers,
            prefetch_factor=a.dataloader_prefetch_factor or 2,
        )
        self.mixing = OnlineMixing(
            manifest,
            step_rows=a.per_device_train_batch_size * a.gradient_accumulation_steps,
            micro_rows=a.per_device_train_batch_size,
            device=a.device,
            options=options,
            total_steps=a.max_steps,
            warmup_steps=a.get_warmup_steps(a.max_steps),
            rank=a.process_index,
            world_size=a.world_size,
            lockstep=self.is_deepspeed_enabled or self.is_fsdp_enabled,  # sharded: every rank forwards alike
            framework="AioliTrainer",
        )
        self.mixing.check_vocab(getattr(getattr(self.model, "config", None), "vocab_size", None))
        self.mixer, self.stream = self.mixing.mixer, self.mixing.stream
        self.manifest, self.domains = self.mixing.manifest, self.mixing.domains
        self.eval_split = self.mixing.eval_split
        self._capture: list[DomainLoss] | None = None  # set only inside training_step
        self._pending_eval: tuple[str, dict] | None = None
        self._eval_depth = 0
        self.add_callback(_SaveAioliState(self))

    # ------------------------------------------------------------------------------------------- data

    def get_train_dataloader(self):
        return _StepBatches(self)

    def _draw_step_batch(self):
        """The mixer's pre-step calls, then this rank's stream batch of the Trainer's current step."""
        model = self.model
        return self.mixing.draw(self.state.global_step, lambda ids: self.logits_of(model, ids), model)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "domain_ids" not in self._signature_columns:  # an eval_dataset's domain ids survive the collator
            self._signature_columns = [*self._signature_columns, "domain_ids"]

    # ------------------------------------------------------------------------------------------- loss

    def logits_of(self, model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` of ``input_ids`` ``[B, T]``; override for a model that is not a causal LM."""
        return model_logits(model, input_ids)

    def domain_loss(
        self, model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], train_scale: float | None = None
    ):
        """(DomainLoss, logits) of a batch in the stream's convention (labels already shifted);
        ``train_scale``: see :meth:`OnlineMixing.domain_loss`."""
        logits = self.logits_of(model, inputs["input_ids"])
        out = self.mixing.domain_loss(logits, inputs["labels"], inputs["domain_ids"], train_scale=train_scale)
        return out, logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training micro-batches: token-loss sum / tokens of the rank's whole step batch (the Trainer
        sums the micro-batches; the kernel writes that loss's gradient in its forward, over the
        logits). Evaluation batches with ``domain_ids``: their mean token loss (the mixer never sees
        them). Anything else: the Trainer's own loss."""
        if "domain_ids" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        training = self._capture is not None and not return_outputs
        out, logits = self.domain_loss(model, inputs, self.mixing.step_scale if training else None)
        if self._capture is not None:  # inside training_step: a training micro-batch
            self._capture.append(out)
            loss = self.mixing.step_loss(out)
        else:
            loss = out.loss
        return (loss, {"logits": logits}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._capture = []
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
            captured = self._capture
        finally:
            self._capture = None
        if len(captured) != 1:
            raise AioliError(
                f"AioliTrainer.compute_loss ran {len(captured)} times in a training step (expected once): "
                "an override of compute_loss or training_step must call AioliTrainer's"
            )
        self.mixing.observe(self.state.global_step, captured[0])
        return loss

    # ------------------------------------------------------------------------------------------- logs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log step (every rank logs it: the reduction is collective)
            logs.update(self.mixing.train_logs())
        pending = self._pending_eval
        if pending is not None and any(k.startswith(pending[0] + "_") for k in logs):
            logs.update(pending[1])  # the corpus evaluation joins the Trainer's evaluation record
            self._pending_eval = None
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------- evaluation

    def evaluate_domains(self, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Per-domain loss and perplexity of the model on the corpus's ``eval_split`` (every rank calls
        it: the sums are all-reduced). Keys ``<prefix>_loss/<domain>``, ``<prefix>_ppl/<domain>`` and
        the averages over domains ``<prefix>_domains_loss``, ``<prefix>_domains_ppl`` (the paper's
        metric)."""
        model = self.model
        return self.mixing.evaluate_domains(lambda ids: self.logits_of(model, ids), model, metric_key_prefix)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """The per-domain evaluation on the corpus (``evaluate_domains``), and the Trainer's own
        evaluation when there is an ``eval_dataset`` of your own. Never feeds the mixer."""
        target = eval_dataset if eval_dataset is not None else self.eval_dataset
        if self._eval_depth:  # one dataset of a dict: the Trainer's loop only
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        domain_metrics = self.evaluate_domains(metric_key_prefix)
        if target is None or isinstance(target, CorpusEvaluation):
            if not domain_metrics:
                raise ConfigError("nothing to evaluate: the corpus has no held-out split and no eval_dataset")
            average = domain_metrics[f"{metric_key_prefix}_domains_loss"]
            metrics = {**domain_metrics, f"{metric_key_prefix}_loss": average}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics
        self._pending_eval = (metric_key_prefix, domain_metrics) if domain_metrics else None
        self._eval_depth += 1
        try:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._eval_depth -= 1
            self._pending_eval = None
        metrics.update(domain_metrics)
        return metrics

    # ------------------------------------------------------------------------------------- checkpoints

    def save_aioli_state(self, folder: str | Path) -> Path:
        """Write this rank's mixer and stream state into a checkpoint folder (the callback calls it
        at every save); returns the file."""
        state = self.mixing.state_dict(self.state.global_step)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / STATE_FILE.format(rank=self.args.process_index)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

    def load_aioli_state(self, folder: str | Path) -> None:
        """Restore this rank's mixer and stream state from a checkpoint folder written by AioliTrainer,
        on any number of processes: written by another number, the states of all its ranks are read and
        merged (:meth:`OnlineMixing.load_rank_states`)."""
        folder = Path(folder)
        problem = _checkpoint_problem(folder)
        if problem is not None:
            raise AioliError(
                f"cannot resume from checkpoint {folder}: {problem}; resume from an earlier checkpoint"
            )
        trainer_state = folder / "trainer_state.json"
        saved_step = json.loads(trainer_state.read_text(encoding="utf-8")).get("global_step")
        first = _read_state(folder / STATE_FILE.format(rank=0))  # says how many processes wrote it
        written_by, rank = int(first["world_size"]), self.args.process_index
        if written_by == self.args.world_size:
            own = folder / STATE_FILE.format(rank=rank)
            self.mixing.load_state_dict(first if rank == 0 else _read_state(own), saved_step, source=str(own))
        else:
            rest = [_read_state(folder / STATE_FILE.format(rank=r)) for r in range(1, written_by)]
            self.mixing.load_rank_states([first, *rest], saved_step, source=str(folder))

    def last_complete_checkpoint(self) -> str | None:
        """The newest checkpoint folder of ``args.output_dir`` that holds the Trainer's state and every
        rank's mixer and stream state, complete; newer ones are passed over with a warning saying why
        (a save cut short, a damaged file). None when there is no checkpoint at all."""
        output = Path(self.args.output_dir)
        if get_last_checkpoint(str(output)) is None:
            return None
        pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
        found = [(int(m[1]), p) for p in output.iterdir() if (m := pattern.match(p.name)) and p.is_dir()]
        reasons = []
        for _, folder in sorted(found, reverse=True):
            problem = _checkpoint_problem(folder)
            if problem is None:
                for reason in reasons:
                    warnings.warn(f"{reason}; resuming from {folder} instead", stacklevel=3)
                return str(folder)
            reasons.append(f"passing over checkpoint {folder}: {problem}")
        raise AioliError(
            f"no checkpoint in {output} can be resumed: " + "; ".join(reasons) + ". Start afresh (another "
            "output_dir, or train() without resume_from_checkpoint)"
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self.last_complete_checkpoint()
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        elif resume_from_checkpoint is False:
            resume_from_checkpoint = None
        if resume_from_checkpoint is not None:
            self.load_aioli_state(resume_from_checkpoint)
        self.mixing.reset_window()  # domain_loss covers the same steps as the Trainer's logged loss
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        finally:
            self.mixing.close()


def _read_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AioliError(
            f"{path} is damaged or truncated ({first}); resume from an earlier checkpoint"
        ) from exc


def _state_world_size(folder: Path) -> int:
    """The number of processes that wrote a checkpoint's mixer and stream state (from rank 0's file)."""
    return int(_read_state(folder / STATE_FILE.format(rank=0))["world_size"])


def _checkpoint_problem(folder: Path) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed with its mixer and stream state, or None: the
    state file of every rank that wrote it (rank 0's says how many) must be there with a complete zip
    directory (torch writes it last, so a truncated file fails without its tensors being read), so that
    every rank decides alike, whatever number of processes resumes it."""
    if not (folder / "trainer_state.json").is_file():
        return "it has no trainer_state.json (its save was cut short)"
    rank, written_by = 0, 1
    while rank < written_by:
        path = folder / STATE_FILE.format(rank=rank)
        if not path.is_file():
            of = f" of the {written_by} processes that wrote it" if rank else ""
            other = "" if rank else ", or it was not written by AioliTrainer"
            return (
                f"it has no {path.name}, no mixer and stream state for rank {rank}{of} (its save was cut "
                f"short{other})"
            )
        damage = torch_file_damage(path, path.name)
        if damage is not None:
            return damage
        if rank == 0:
            try:
                written_by = _state_world_size(folder)
            except AioliError as exc:
                return str(exc)
        rank += 1
    return None
