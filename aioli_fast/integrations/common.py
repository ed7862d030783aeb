"""What every adapter shares: :class:`OnlineMixing`, a corpus, a mixer and this rank's stream.

An adapter owns the framework's side (when a step's batch is needed, where the loss is computed, how
checkpoints are written); ``OnlineMixing`` owns the mixing side, with no framework imported:

- :meth:`OnlineMixing.draw` runs the mixer's pre-step calls for optimizer step ``s`` (a probe or
  full-validation measurement when due, a LearnParams schedule, new proportions) and returns this
  rank's stream batch of ``s``. It must be called after step ``s - 1`` has been observed: the adapters
  draw lazily, when the framework asks for the first micro-batch of ``s``, never ahead.
- :meth:`OnlineMixing.loss` computes the per-domain loss of a micro-batch from logits
  (:func:`~aioli_fast.kernels.domain_cross_entropy`) and, for training batches, feeds the mixer.
- :meth:`OnlineMixing.train_logs` and :meth:`OnlineMixing.evaluate_domains` give the per-domain numbers
  an adapter adds to the framework's logs; both are collective (every rank calls them).
- :meth:`OnlineMixing.state_dict` / :meth:`OnlineMixing.load_state_dict` hold this rank's mixer and
  stream state, checked on load against the step, the domains and the number of processes.

Drawing a batch never touches the global RNG (the stream's reader processes start under a forked RNG),
so a framework that restores its RNG on resume gets the dropout of the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import Manifest, corpus_changes, load_manifest
from ..data.stream import Batch
from ..distributed import to_cpu
from ..driver import MixingDriver
from ..errors import AioliError, ConfigError
from ..evaluation import (
    domain_results,
    eval_mode,
    evaluate,
    split_batches,
)
from ..fileio import say
from ..kernels import DomainLoss, domain_cross_entropy
from ..mixing import DomainSums, Mixer, build_mixer
from ..options import MixingOptions

STATE_VERSION = 1

#: a function of token ids ``[B, T]`` returning logits ``[B, T, V]`` (or an output with ``.logits``)
LogitsFn = Callable[[torch.Tensor], Any]

__all__ = [
    "STATE_VERSION",
    "CorpusSplit",
    "can_overwrite",
    "OnlineMixing",
    "domain_metrics",
    "logits_from",
    "model_logits",
    "reduced_metrics",
]


def can_overwrite(logits: torch.Tensor) -> bool:
    """Whether the gradient may be written over ``logits``: they are not a leaf and the op that made
    them (through views) did not save them for its own backward, as ``exp`` or a fused soft-cap
    would. Reads autograd metadata only. An op downstream that saved them still fails loudly in
    backward (autograd's version check); ``keep_logits=True`` avoids that."""
    if logits.grad_fn is None or logits.dtype == torch.float16:
        return False  # fp16: see domain_loss
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return False  # saved-tensor hooks (activation checkpointing, offloading): unpacking runs them
    storage = logits.untyped_storage().data_ptr()
    nodes = [logits.grad_fn]
    base = logits._base
    if base is not None and base.grad_fn is not None:
        nodes.append(base.grad_fn)
    for node in nodes:
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            return False  # a custom autograd Function: what it saved is not inspectable
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                value = getattr(node, name)
            except RuntimeError:  # a saved value already freed
                continue
            values = value if isinstance(value, (tuple, list)) else (value,)
            for v in values:
                if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() == storage:
                    return False
    return True


def logits_from(out: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor, a mapping with ``"logits"`` or an object with ``.logits``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    raise AioliError(
        f"cannot find logits in a model output of type {type(out).__name__}: return a tensor [B, T, V], "
        "a mapping with 'logits' or an object with .logits, or pass a logits function"
    )


def model_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM: ``model(input_ids=..., use_cache=False)`` for a Hugging Face model (one
    whose ``config`` has ``use_cache``), ``model(input_ids)`` otherwise."""
    if hasattr(getattr(model, "config", None), "use_cache"):
        return logits_from(model(input_ids=input_ids, use_cache=False))
    return logits_from(model(input_ids))


def domain_metrics(res: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """:func:`~aioli_fast.train.evaluate`'s result as flat log keys: ``<prefix>_loss/<domain>``,
    ``<prefix>_ppl/<domain>``, ``<prefix>_domains_loss`` and ``<prefix>_domains_ppl``."""
    metrics: dict[str, float] = {}
    for name, r in res["domains"].items():
        metrics[f"{prefix}_loss/{name}"] = r["loss"]
        metrics[f"{prefix}_ppl/{name}"] = r["ppl"]
    metrics[f"{prefix}_domains_loss"] = res["average"]["loss"]
    metrics[f"{prefix}_domains_ppl"] = res["average"]["ppl"]
    return metrics


def reduced_metrics(domains: Sequence[str], sums: DomainSums, prefix: str) -> dict[str, float]:
    """Per-domain metrics of this rank's loss sums and token counts, summed over all ranks (collective);
    empty when no rank counted a token."""
    total = sums.reduced()
    if not bool(total.count.sum() > 0):
        return {}
    return domain_metrics(domain_results(domains, total), prefix)


def _manifest(corpus: str | Path | Manifest) -> Manifest:
    return corpus if isinstance(corpus, Manifest) else load_manifest(corpus)


class CorpusSplit:
    """A held-out split of a prepared corpus as tensors, in the stream's convention: ``input_ids``
    ``[S, T]``, ``labels`` ``[S, T]`` (already the next tokens, not to be shifted again) and
    ``domain_ids`` ``[S]`` indexing ``domains`` (default: all of the corpus, in its order)."""

    def __init__(
        self,
        corpus: str | Path | Manifest,
        split: str = "val",
        domains: Sequence[str] | None = None,
        max_sequences: int | None = None,
    ):
        manifest = _manifest(corpus)
        domains = list(domains) if domains is not None else list(manifest.domains)
        parts = list(split_batches(manifest, domains, split, 1024, max_sequences))
        if not parts:
            raise AioliError(f"the corpus has no {split} sequences for domains {domains}")
        samples = torch.from_numpy(np.concatenate([s for s, _ in parts]).astype(np.int64))
        self.input_ids = samples[:, :-1].contiguous()
        self.labels = samples[:, 1:].contiguous()
        self.domain_ids = torch.from_numpy(np.concatenate([d for _, d in parts]).astype(np.int32))

    def __len__(self) -> int:
        return len(self.domain_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], "domain_ids": self.domain_ids[i]}


class OnlineMixing:
    """A prepared corpus drawn by this rank's :class:`~aioli_fast.data.MixtureStream` in the proportions
    a mixer learns online; the framework-neutral part of every adapter (module docstring). The mixer is
    run around each step by a :class:`~aioli_fast.driver.MixingDriver`, as in the native trainer.

    Args:
        corpus: the folder written by ``aioli-fast prepare`` (or its loaded ``Manifest``).
        step_rows: sequences this rank trains on per optimizer step (micro-batch x accumulation).
        device: where the mixer's state and the per-domain losses live.
        options: the :class:`~aioli_fast.options.MixingOptions` (or give its fields as keywords).
        rank, world_size: this process among the data-parallel ranks.
        lockstep: every rank runs the same number of forward passes in evaluation (sharded models).
        framework: the adapter's name, for messages.
        total_steps, warmup_steps: the run's optimizer steps and learning-rate warm-up, when known: a
            mixer given by name sizes its schedule to them (Aioli's ``auto`` options, docs/mixing.md).
        micro_rows: sequences of a training micro-batch: a probe measurement runs in micro-batches
            of this size (default ``eval_batch_size``).
    """

    def __init__(
        self,
        corpus: str | Path | Manifest,
        *,
        step_rows: int,
        device: torch.device | str,
        options: MixingOptions | None = None,
        rank: int = 0,
        world_size: int = 1,
        lockstep: bool = False,
        framework: str = "this adapter",
        total_steps: int | None = None,
        warmup_steps: int = 0,
        micro_rows: int | None = None,
        **mixing: Any,
    ):
        if options is not None and mixing:
            raise ConfigError(
                f"give the mixing options as options= or as keywords, not both ({sorted(mixing)})"
            )
        o = options if options is not None else MixingOptions.from_keywords(mixing, framework)
        manifest = _manifest(corpus)
        domains = list(o.domains) if o.domains is not None else list(manifest.domains)
        unknown = [d for d in domains if d not in manifest.domains]
        if unknown:
            raise ConfigError(f"domains {unknown} are not in the corpus (it has {list(manifest.domains)})")
        if step_rows < 1:
            raise ConfigError(f"a step needs at least one sequence per rank, got {step_rows}")
        eval_split = o.eval_split
        if eval_split is not None and not all((d, eval_split) in manifest.shards for d in domains):
            eval_split = None  # the corpus has no such split: no per-domain evaluation
        self.options = o
        self.manifest, self.domains = manifest, domains
        self.device = torch.device(device)
        self.eval_split, self.eval_max_sequences = eval_split, o.eval_max_sequences
        self.eval_batch_size, self.probe_sequences = o.eval_batch_size, o.probe_sequences
        self.rank, self.world_size, self.lockstep = rank, world_size, lockstep
        self.step_rows = step_rows
        if isinstance(o.mixer, Mixer):
            if o.mixer.domains != domains:
                raise ConfigError(
                    f"the mixer is for domains {o.mixer.domains}, the corpus side has {domains}"
                )
            if o.mixer_options or o.proportions:
                raise ConfigError("mixer_options and proportions are for a mixer given by name")
            self.mixer = o.mixer
        else:
            if "method" in o.mixer_options:
                raise ConfigError("mixer_options must not hold 'method': the mixer argument names the method")
            self.mixer = build_mixer(
                o.mixer,
                domains,
                device=self.device,
                proportions=o.proportions,
                total_steps=total_steps,
                warmup_steps=warmup_steps,
                **o.mixer_options,
            )
        if self.mixer.needs_gradients or self.mixer.needs_reference_model:
            raise ConfigError(
                f"mixing method '{self.mixer.name}' needs per-domain gradients or a reference model, which "
                f"{framework} does not compute; use `aioli-fast train` (DoReMi works with a .json reference)"
            )
        kind = self.mixer.measurement
        if kind in ("probe", "full_val") and eval_split is None:
            raise ConfigError(
                f"mixing measurement '{kind}' needs a held-out split in the corpus; use measurement='round' "
                "(the default: the training batches)"
            )
        warning = self.mixer.train_measurement_warning(step_rows * world_size)
        if warning:
            warnings.warn(warning, stacklevel=3)
        #: the start-up line ``aioli-fast train`` prints (rounds, LearnParams steps and share, the cost
        #: of the measurements, and a warning when the run is too short for a round's proportions);
        #: None when the run length is
        #: unknown or the method has none
        if total_steps:  # the probe, sized to the mixer's compute budget when it has one
            self.probe_sequences = self.mixer.probe_size(
                total_steps, step_rows * world_size, o.probe_sequences
            )
        self.schedule_line = (
            self.mixer.describe(total_steps, step_rows * world_size, self.probe_sequences)
            if total_steps
            else None
        )
        if self.schedule_line and rank == 0:
            say(self.schedule_line)
        self.driver = MixingDriver.for_corpus(
            manifest,
            self.mixer,
            dataclasses.replace(o, eval_split=eval_split, probe_sequences=self.probe_sequences),
            step_rows=step_rows,
            rank=rank,
            world_size=world_size,
            lockstep=lockstep,
            device=self.device,
            micro_rows=micro_rows,
        )
        self.stream = self.driver.stream
        self.step_tokens = 0  # counted tokens of this rank's batch of the step drawn last

    @property
    def host_proportions(self) -> list[float]:
        """The proportions the batch of the last step drawn was drawn with."""
        return self.driver.drawn_proportions

    # ------------------------------------------------------------------------------------------- data

    def check_vocab(self, vocab_size: int | None) -> None:
        """Refuse a model whose vocabulary is smaller than the corpus tokenizer's."""
        if isinstance(vocab_size, int) and vocab_size < self.manifest.vocab_size:
            raise ConfigError(
                f"the model's vocabulary ({vocab_size}) is smaller than the corpus tokenizer's "
                f"({self.manifest.vocab_size})"
            )

    def draw(self, step: int, logits_fn: LogitsFn, model: torch.nn.Module | None = None) -> Batch:
        """The mixer's pre-step calls, then this rank's stream batch of optimizer step ``step``.

        ``logits_fn`` gives the logits of held-out batches for a measurement (run in eval mode of
        ``model`` when it is given, under ``torch.no_grad``)."""
        batch = self.driver.draw(step, logits_fn, model)
        self.step_tokens = int(batch.labels.ne(-100).sum())
        return batch

    def micro_batches(self, batch: Batch, rows: int) -> list[dict[str, torch.Tensor]]:
        """A step batch as micro-batches of ``rows`` sequences (dicts of ``input_ids``, ``labels``,
        ``domain_ids``)."""
        return [
            {
                "input_ids": batch.input_ids[start : start + rows],
                "labels": batch.labels[start : start + rows],
                "domain_ids": batch.domain_ids[start : start + rows],
            }
            for start in range(0, len(batch.domain_ids), rows)
        ]

    # ------------------------------------------------------------------------------------------- loss

    def domain_loss(
        self,
        logits: Any,
        labels: torch.Tensor,
        domain_ids: torch.Tensor,
        *,
        train_scale: float | torch.Tensor | None = None,
        keep_logits: bool = False,
    ) -> DomainLoss:
        """Per-domain loss of a micro-batch: ``logits`` ``[B, T, V]`` (or a model output holding them),
        ``labels`` ``[B, T]`` already the next tokens (``-100`` ignored), ``domain_ids`` ``[B]`` or
        ``[B, T]``.

        ``train_scale`` (a training micro-batch): the caller will backpropagate
        ``loss_sum.sum() * train_scale`` (:meth:`step_loss` does, with :attr:`step_scale`). The kernel
        then writes the final gradient in the forward pass (the gradient contract, docs/kernels.md),
        over the logits themselves unless ``keep_logits`` or the op that made them saved them for its
        own backward, so backward makes no pass over the logits and no second ``[N, V]`` buffer
        exists. Without it (evaluation, or a caller that scales otherwise) every upstream gradient is
        still correct.
        """
        logits = logits_from(logits)
        if logits.shape[-1] < self.manifest.vocab_size:  # a shape: no host read
            raise ConfigError(
                f"the model's logits have {logits.shape[-1]} entries, fewer than the corpus tokenizer's "
                f"vocabulary ({self.manifest.vocab_size}): give the model an output layer of at least "
                f"{self.manifest.vocab_size}"
            )
        doms_N = domain_ids.to(device=logits.device, dtype=torch.int32)
        doms_N = doms_N.reshape(-1) if doms_N.dim() == 2 else doms_N.repeat_interleave(labels.shape[1])
        logits_NV = logits.reshape(-1, logits.shape[-1])
        contract: dict[str, Any] = {}
        # fp16 logits keep the default: a gradient scaled by 1 / the step's tokens would underflow fp16
        # before a GradScaler's factor reaches it in backward
        fp16 = logits_NV.dtype == torch.float16
        if train_scale is not None and torch.is_grad_enabled() and logits_NV.requires_grad and not fp16:
            contract = dict(grad_on="loss_sum", grad_scale=train_scale)
            contract["inplace"] = not keep_logits and can_overwrite(logits_NV)
        return domain_cross_entropy(logits_NV, labels.reshape(-1), doms_N, len(self.domains), **contract)

    def observe(self, step: int, out: DomainLoss) -> None:
        """Feed a training micro-batch's per-domain loss to the mixer and the log window."""
        self.driver.observe(step, out.loss_sum, out.count)

    @property
    def step_scale(self) -> float:
        """1 / the counted tokens of this rank's batch of the step drawn last: the ``train_scale`` of
        :meth:`domain_loss` for a loss that :meth:`step_loss` makes."""
        return 1.0 / max(self.step_tokens, 1)

    def step_loss(self, out: DomainLoss) -> torch.Tensor:
        """A training micro-batch's token-loss sum over the tokens of this rank's whole step batch: the
        micro-batches of a step sum to the mean token loss of the step, with or without accumulation."""
        return out.loss_sum.sum() / max(self.step_tokens, 1)

    # ------------------------------------------------------------------------------------------- logs

    def train_logs(self) -> dict[str, float]:
        """``proportions/<domain>`` of the last step drawn, ``domain_loss/<domain>`` (mean token loss
        since the previous call, over all ranks; absent for a domain without tokens) and the mixer's
        ``mixer/<metric>``. Collective: every rank calls it."""
        sums, counts = self.driver.take_window().buffer.tolist()
        logs: dict[str, float] = {}
        for name, p, s, n in zip(self.domains, self.host_proportions, sums, counts):
            logs[f"proportions/{name}"] = p
            if n:
                logs[f"domain_loss/{name}"] = s / n
        for key, value in self.mixer.metrics().items():
            logs[f"mixer/{key}"] = float(value)
        return logs

    def console_line(self, logs: Mapping[str, float]) -> str:
        """The per-domain part of :meth:`train_logs` on one line, for a console: each domain's mean
        training loss since the previous log (``-`` without tokens) and its proportion."""
        cells = []
        for name in self.domains:
            loss = logs.get(f"domain_loss/{name}")
            shown = f"{loss:.3f}" if loss is not None else "-"
            cells.append(f"{name} {shown} p={logs.get(f'proportions/{name}', float('nan')):.3f}")
        return "per-domain loss and proportion: " + ", ".join(cells)

    def reset_window(self) -> None:
        """Forget the per-domain training losses gathered since the last :meth:`train_logs`."""
        self.driver.window.zero_()

    def evaluate_domains(
        self, logits_fn: LogitsFn, model: torch.nn.Module | None = None, prefix: str = "eval"
    ) -> dict[str, float]:
        """Per-domain loss and perplexity on ``eval_split`` (collective: the sums are all-reduced).
        Keys ``<prefix>_loss/<domain>``, ``<prefix>_ppl/<domain>`` and the averages over domains
        ``<prefix>_domains_loss``, ``<prefix>_domains_ppl`` (the paper's metric); empty without a
        held-out split."""
        if self.eval_split is None:
            return {}
        with eval_mode(model):
            res = evaluate(
                logits_fn,
                self.manifest,
                self.domains,
                self.eval_split,
                batch_size=self.eval_batch_size,
                device=self.device,
                max_sequences=self.eval_max_sequences,
                rank=self.rank,
                world_size=self.world_size,
                lockstep=self.lockstep,
            )
        return domain_metrics(res, prefix)

    # ------------------------------------------------------------------------------------- checkpoints

    def state_dict(self, step: int) -> dict[str, Any]:
        """This rank's mixer and stream state after optimizer step ``step - 1`` (on the CPU)."""
        if self.stream.step != step:
            raise AioliError(f"the stream is at step {self.stream.step}, training at step {step}")
        driver = self.driver.state_dict()
        return {
            "version": STATE_VERSION,
            "step": step,
            "rank": self.rank,
            "world_size": self.world_size,
            "domains": list(self.domains),
            "corpus": self.manifest.fingerprint(self.domains),
            "mixer": to_cpu(driver["mixer"]),
            "stream": driver["stream"],
            "scheduled_until": driver["scheduled_until"],
        }

    def load_state_dict(
        self, state: Mapping[str, Any], step: int | None = None, source: str = "the checkpoint"
    ) -> None:
        """Restore this rank's state written by :meth:`state_dict` on the same number of processes;
        refuses a state of another version, number of processes, rank, domain list or (when ``step`` is
        given) step. :meth:`load_rank_states` takes the states of a run on another number."""
        self._check_state(state, step, source)
        if state["world_size"] != self.world_size:
            raise AioliError(
                f"{source} was written by a run of {state['world_size']} process(es), this one has "
                f"{self.world_size}: load the states of every rank that wrote it (load_rank_states)"
            )
        if state["rank"] != self.rank:
            raise AioliError(f"{source} holds the state of rank {state['rank']}, this is rank {self.rank}")
        self.driver.load_state_dict(state)

    def load_rank_states(
        self, states: Sequence[Mapping[str, Any]], step: int | None = None, source: str = "the checkpoint"
    ) -> None:
        """Restore this rank's state from the :meth:`state_dict` of every rank of the run that wrote
        them (in rank order), on any number of processes: the stream continues the global sample order
        of the writing run (the samples of each step do not depend on the number of processes), and
        the mixer's per-rank windows are merged, so their totals are those the writing run would have
        reduced."""
        if not states:
            raise AioliError(f"{source} holds no mixing state")
        for r, state in enumerate(states):
            self._check_state(state, step, source)
            if state["rank"] != r or state["world_size"] != len(states):
                raise AioliError(
                    f"{source} holds the state of rank {state['rank']} of {state['world_size']} where rank "
                    f"{r} of {len(states)} was expected"
                )
        if len(states) == self.world_size:
            self.driver.load_state_dict(states[self.rank])
        else:
            self.driver.load_state_dict(self.driver.merge_states(list(states), self.rank))

    def _check_state(self, state: Mapping[str, Any], step: int | None, source: str) -> None:
        if state.get("version") != STATE_VERSION:
            raise AioliError(
                f"{source}: state version {state.get('version')!r}, this version reads {STATE_VERSION}"
            )
        if state["domains"] != self.domains:
            raise AioliError(f"{source} is for domains {state['domains']}, this run has {self.domains}")
        if step is not None and state["step"] != step:
            raise AioliError(
                f"{source} holds the mixing state of step {state['step']}, training resumes at {step}"
            )
        changes = corpus_changes(state.get("corpus"), self.manifest.fingerprint(self.domains))
        if changes:
            raise AioliError(
                f"{source} was written by a run on another corpus than {self.manifest.location} (changed: "
                f"{'; '.join(changes)}): its stream positions mean nothing here; resume on that corpus, "
                "or train on this one from the start (another output folder)"
            )

    def close(self) -> None:
        """Stop the stream's reader processes."""
        self.driver.close()
