"""The mixer interface and its registry.

A mixer owns the mixture proportions of a run. All state lives in tensors on the training device, and
nothing in ``observe`` or in an update reads device values on the host: the only read is the one the
data stream needs, :meth:`Mixer.host_proportions`, once per change of the proportions.

Every call the training loop makes is declared on :class:`Mixer` with a default that does nothing (or
refuses a measurement the method does not take), so a mixer overrides only what it uses. Per
optimizer step ``step`` (the global step), in this order:

    if mixer.measurement_due(step):                       # probe / full_val measurement sources only
        mixer.observe_measurement(step, *evaluate_probe())
    if (block := mixer.schedule(step)):                   # host-known proportions of a block of steps
        stream.set_schedule(block, start=step, exact=mixer.exact_schedule)
    p_D = mixer.proportions(step)                         # the same tensor until it changes
    stream.set_proportions(mixer.host_proportions(step))  # only when p_D is a new tensor
    for each micro-batch:
        if first micro-batch and mixer.needs_gradients and mixer.alignment_due(step):
            mixer.observe_alignment(step, scores_D)       # DoGE: per-domain gradient alignment
        ... forward, backward ...
        mixer.observe(step, loss_sum_D, count_D)          # this rank's per-domain sums
        if mixer.needs_reference_model:
            mixer.observe_reference(step, ref_loss_sum_D, ref_count_D)   # DoReMi: the reference's sums

and at log steps ``metrics()``, at checkpoints ``state_dict()``, at the end ``summary()``.
Per-domain statistics are all-reduced across data-parallel ranks by the mixer itself, once per
measurement, so every rank holds identical proportions.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from .sums import DomainSums

MEASUREMENTS = ("train", "probe", "full_val")


def check_measurement(measurement: str, allowed: tuple[str, ...] = MEASUREMENTS) -> str:
    """``mixing.measurement`` validated against ``allowed`` (default :data:`MEASUREMENTS`)."""
    if measurement not in allowed:
        raise ConfigError(f"mixing.measurement must be one of {', '.join(allowed)}; got {measurement!r}")
    return measurement


def read_json_option(key: str, path: str | Path):
    """The parsed JSON file that option ``mixing.<key>`` names; a ConfigError naming it if unreadable."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"mixing.{key}: cannot read {path}: {exc}") from exc


class Mixer:
    """Base class: fixed proportions; ``observe`` does nothing.

    Args:
        domains: domain names in domain-id order (D of them).
        device: where the state tensors live.
        proportions: optional mapping domain -> weight (method-specific meaning).
        total_steps: the run's length in optimizer steps when known (methods that size a schedule to the
            run use it, e.g. Aioli's ``auto`` options).
        warmup_steps: the run's learning-rate warm-up in steps.
        **options: the method's options (see ``OPTIONS``); an option the method does not take is an error.
    """

    name = "base"
    #: option name -> default; ``build_mixer`` rejects any other option.
    OPTIONS: ClassVar[dict[str, Any]] = {}
    #: where the loss measurements come from: "train", "probe", "full_val", or None (no measurements).
    measurement: str | None = None
    #: whether the loop computes per-domain gradient alignments (``alignment_due``, ``observe_alignment``)
    needs_gradients: ClassVar[bool] = False
    #: whether the loop must run a reference model on every micro-batch (``observe_reference``)
    needs_reference_model: bool = False
    #: the checkpoint of that reference model (a run directory or ``model.pt``)
    reference_checkpoint: Path | None = None
    #: option name -> type, for options whose default does not show it (a None default means ``str``)
    OPTION_TYPES: ClassVar[dict[str, type]] = {}
    #: state-dict key -> attribute saved under it (tensors are cloned, plain values copied, a
    #: :class:`DomainSums` is saved as its ``[2, D]`` tensor).
    STATE: ClassVar[dict[str, str]] = {"proportions": "_proportions_D"}
    #: keys of :attr:`STATE` that hold this rank's own sums, not yet all-reduced (every other key holds
    #: the same value on every rank); :meth:`merge_states` adds them up over the ranks
    RANK_SUMS: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        domains: Sequence[str],
        device: torch.device | str = "cpu",
        proportions: dict[str, float] | None = None,
        *,
        total_steps: int | None = None,
        warmup_steps: int = 0,
        **options: Any,
    ):
        if total_steps is not None and total_steps < 1:
            raise ConfigError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps, self.warmup_steps = total_steps, int(warmup_steps)
        if not domains:
            raise ConfigError("a mixer needs at least one domain")
        if len(set(domains)) != len(domains):
            raise ConfigError(f"domain names must be unique, got {list(domains)}")
        self.domains = list(domains)
        self.device = torch.device(device)
        self.options = self.resolve_options(options)
        self._proportions_D = self.initial_proportions(proportions)
        self._host_cache: tuple[torch.Tensor | None, list[float]] = (None, [])

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    @classmethod
    def option_type(cls, name: str) -> type:
        """The type a config value of option ``name`` must have."""
        if name in cls.OPTION_TYPES:
            return cls.OPTION_TYPES[name]
        default = cls.OPTIONS[name]
        return str if default is None else type(default)

    @classmethod
    def resolve_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The method's defaults updated by ``options`` (``None`` values mean "the default")."""
        given = {k: v for k, v in options.items() if v is not None}
        unknown = sorted(set(given) - set(cls.OPTIONS))
        if unknown:
            takes = ", ".join(f"mixing.{k}" for k in cls.OPTIONS) or "no options"
            raise ConfigError(
                f"mixing.method '{cls.name}' does not use {', '.join('mixing.' + k for k in unknown)} "
                f"(it takes: {takes})"
            )
        return {**cls.OPTIONS, **given}

    def initial_proportions(self, proportions: dict[str, float] | None) -> torch.Tensor:
        """[D] fp32 proportions at step 0."""
        if proportions is not None:
            raise ConfigError(f"mixing.method '{self.name}' takes no mixing.proportions")
        return self.uniform()

    def uniform(self) -> torch.Tensor:
        return torch.full((self.num_domains,), 1.0 / self.num_domains, device=self.device)

    def proportions(self, step: int) -> torch.Tensor:
        """[D] fp32 proportions for the batch of ``step`` (sums to 1), on the mixer's device.

        Contract: return the *same tensor object* for as long as the proportions do not change, and a
        new tensor when they do; never modify a returned tensor in place. The training loop copies the
        proportions to the host (for the data stream) only when it receives a new object, so an
        in-place update would go unseen.
        """
        return self._proportions_D

    def host_values(self, step: int) -> list[float] | None:
        """The proportions of ``step`` when the host knows them without reading the device, else None."""
        return None

    #: whether the batches of a :meth:`schedule` get exact per-domain counts (the loop passes it to
    #: ``MixtureStream.set_schedule``), whatever ``data.assignment`` says
    exact_schedule: bool = False

    def schedule(self, step: int) -> list[list[float]] | None:
        """Host-known proportions of steps ``step, step + 1, ...`` when a block of them starts here.

        The loop hands such a block to the data stream in one call (``MixtureStream.set_schedule``), so
        prefetching workers can read ahead across its changes of proportions. None: no such block.
        """
        return None

    def host_proportions(self, step: int) -> list[float]:
        """The proportions of ``step`` as Python floats, for the data stream.

        Reads the device at most once per new proportions tensor (the only host read a mixer makes).
        """
        p_D = self.proportions(step)
        if self._host_cache[0] is not p_D:
            known = self.host_values(step)
            self._host_cache = (p_D, known if known is not None else p_D.tolist())
        return list(self._host_cache[1])

    def train_measurement_warning(self, batch_size: int) -> str | None:
        """A message for the user when this mixer's measurements will be poor at ``batch_size``."""
        return None

    def measurement_due(self, step: int) -> bool:
        """Whether the loop must measure per-domain losses (probe or full validation) before ``step``."""
        return False

    def observe(self, step: int, loss_sum_D: torch.Tensor, count_D: torch.Tensor) -> None:
        """Per-domain loss sums [D] and token counts [D] of one micro-batch of ``step`` (this rank's)."""

    def observe_measurement(self, step: int, loss_sum_D: torch.Tensor, count_D: torch.Tensor) -> None:
        """The measurement asked for by :meth:`measurement_due` (this rank's sums and counts)."""
        raise ConfigError(f"mixing.method '{self.name}' takes no loss measurements")

    def alignment_due(self, step: int) -> bool:
        """Whether the loop must compute per-domain gradient alignments at ``step`` (with
        ``needs_gradients``; the loop asks on the first micro-batch of the step)."""
        return False

    def observe_alignment(self, step: int, scores_D: torch.Tensor) -> None:
        """[D] alignment of each domain's training gradient with the validation probe's gradient."""
        raise ConfigError(f"mixing.method '{self.name}' takes no gradient alignments")

    def observe_reference(self, step: int, loss_sum_D: torch.Tensor, count_D: torch.Tensor) -> None:
        """The reference model's per-domain sums [D] and counts [D] on the same micro-batch as
        :meth:`observe` (with ``needs_reference_model``; this rank's)."""
        raise ConfigError(f"mixing.method '{self.name}' takes no reference-model losses")

    def reduce(self, loss_sum_D: torch.Tensor, count_D: torch.Tensor) -> DomainSums:
        """This rank's sums [D] and counts [D] summed over the data-parallel ranks, on the mixer's device
        (one small collective; a copy alone). Unpacks as ``(loss_sum_D, count_D)``."""
        return DomainSums.of(loss_sum_D, count_D, self.device).reduced()

    def metrics(self) -> dict[str, torch.Tensor]:
        """Device tensors worth logging (read by the loop at log steps only)."""
        return {}

    def probe_size(self, total_steps: int, batch_sequences: int, probe_sequences: int) -> int:
        """The probe sequences per domain the run measures with (a method may size its probe to a
        compute budget: Aioli's ``measure_budget``); by default ``probe_sequences``."""
        return probe_sequences

    def describe(
        self, total_steps: int, batch_sequences: int | None = None, probe_sequences: int | None = None
    ) -> str | None:
        """One line on what the method will do over a run of ``total_steps`` of ``batch_sequences`` (the
        global batch) with a probe of ``probe_sequences`` per domain (printed at start-up)."""
        return None

    def final_proportions(self, total_steps: int) -> tuple[list[float], str | None]:
        """The proportions a run of ``total_steps`` reports as its result (final.json), and a note when
        they are not those of its last step. Default: the last step's."""
        return self.host_proportions(total_steps - 1), None

    def summary(self) -> dict:
        """Method-specific results for the run's final.json (read once at the end)."""
        return {}

    def state_dict(self) -> dict:
        state: dict[str, Any] = {"method": self.name, "domains": list(self.domains)}
        for key, attr in self.STATE.items():
            value = getattr(self, attr)
            if isinstance(value, DomainSums):
                value = value.buffer  # stored as its [2, D] tensor
            state[key] = value.detach().clone() if isinstance(value, torch.Tensor) else value
        return state

    def merge_states(self, states: list[dict], rank: int) -> dict:
        """The state of ``rank`` in a run resumed on another number of processes, from the
        :meth:`state_dict` of every rank of the run that wrote them: the sums of :attr:`RANK_SUMS`
        added up on rank 0 and zero on the others (their all-reduce then gives the total the writing
        ranks would have reduced), every other key as rank 0 wrote it (the same on every rank)."""
        if not states:
            raise ConfigError("no mixer state to merge")
        merged = dict(states[0])
        for key in self.RANK_SUMS:
            total = sum(s[key] for s in states)
            merged[key] = total if rank == 0 else torch.zeros_like(total)
        return merged

    def load_state_dict(self, state: dict) -> None:
        method = state.get("method", self.name)
        if method != self.name:
            raise ConfigError(f"mixer state is from mixing.method '{method}', this run uses '{self.name}'")
        domains = state.get("domains", self.domains)
        if list(domains) != self.domains:
            raise ConfigError(f"mixer state is for domains {list(domains)}, this run has {self.domains}")
        missing = [key for key in self.STATE if key not in state]
        if missing:
            raise ConfigError(f"mixer state lacks {missing}")
        for key, attr in self.STATE.items():
            value, current = state[key], getattr(self, attr)
            sums = isinstance(current, DomainSums)
            if sums:
                current = current.buffer
            if isinstance(current, torch.Tensor):
                if not isinstance(value, torch.Tensor) or value.shape != current.shape:
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ConfigError(
                        f"mixer state '{key}' has shape {got}, this run expects {tuple(current.shape)} "
                        f"({self.num_domains} domains)"
                    )
                value = value.to(current.device, current.dtype, copy=True)  # never alias the caller's tensor
            setattr(self, attr, DomainSums(value) if sums else value)
        self._host_cache = (None, [])


MIXERS: dict[str, type[Mixer]] = {}


def register_mixer(name: str) -> Callable[[type[Mixer]], type[Mixer]]:
    """Class decorator: make a mixer available as ``mixing.method: <name>``."""

    def wrap(cls: type[Mixer]) -> type[Mixer]:
        if name in MIXERS:
            raise ValueError(f"mixer {name!r} is registered twice")
        cls.name = name
        MIXERS[name] = cls
        return cls

    return wrap


def option_types(method: str | None = None) -> dict[str, type]:
    """Option name -> value type over every registered mixer, in registration order.

    The type is the mixer's ``OPTION_TYPES`` entry, else that of the option's default (``str`` when the
    default is None). Where two mixers disagree, ``method``'s own type wins.
    """
    out: dict[str, type] = {}
    chosen = MIXERS.get(method) if method else None
    for cls in (*MIXERS.values(), *([chosen] if chosen else [])):
        for name in cls.OPTIONS:
            out[name] = cls.option_type(name)
    return out


def build_mixer(
    method: str,
    domains: Sequence[str],
    device: torch.device | str = "cpu",
    proportions: dict[str, float] | None = None,
    *,
    total_steps: int | None = None,
    warmup_steps: int = 0,
    **options: Any,
) -> Mixer:
    """Look ``method`` up in the registry and build it with ``options`` (``None`` means the default).

    ``total_steps`` and ``warmup_steps`` describe the run, for methods that size their schedule to it."""
    cls = MIXERS.get(method)
    if cls is None:
        near = difflib.get_close_matches(method, list(MIXERS), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"unknown mixing.method '{method}'{hint} (available: {', '.join(sorted(MIXERS))})")
    return cls(
        domains,
        device=device,
        proportions=proportions,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        **options,
    )
