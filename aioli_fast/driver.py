"""The one object that runs a mixer around the optimizer steps of a training loop: :class:`MixingDriver`.

Every loop that mixes online (the native trainer, :mod:`aioli_fast.train.trainer`, and every adapter,
through :class:`aioli_fast.integrations.common.OnlineMixing`) makes the same calls, in the same order,
on every data-parallel rank:

    batch = driver.draw(step, model)                 # the pre-step calls, then this rank's stream batch:
                                                     #   measure       mixer.measurement_due -> model
                                                     #   schedule      mixer.schedule -> stream.set_schedule
                                                     #   proportions   mixer.proportions -> the stream,
                                                     #                 read on the host only when they change
    for each micro-batch of the batch:
        ... forward, backward (the optimizer steps on the last micro-batch) ...
        driver.observe(step, loss_sum_D, count_D)    # the mixer, and the log window

``mixer.measurement_due`` and ``mixer.schedule`` are called here and nowhere else, so a change of the
mixer contract is made in this file. What a loop computes that no other loop does stays in that loop
(DoGE's gradient alignments and DoReMi's reference model, in the native trainer). A measurement runs
the model the loop passes to ``draw`` over held-out batches (:class:`aioli_fast.evaluation.Measurement`)
and gives this rank's share of the per-domain sums and counts, which the mixer all-reduces.

Drawing a batch never touches the global RNG (the stream's reader processes start under a forked RNG), so
a loop that restores its RNG on resume gets the randomness of the uninterrupted run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from .data import Manifest, MixtureStream
from .data.stream import Batch
from .errors import AioliError
from .evaluation import Measurement, eval_mode
from .mixing import DomainSums, Mixer
from .options import MixingOptions

#: this rank's share of a probe / full-validation measurement of a model: per-domain sums and counts
Measure = Callable[[Any], DomainSums | tuple[torch.Tensor, torch.Tensor]]


class MixingDriver:
    """A mixer, the data stream it steers, and the per-domain log window of a loop (module docstring).

    Args:
        mixer: the mixer (every rank holds an identical one).
        stream: this rank's :class:`~aioli_fast.data.MixtureStream`, made with the mixer's proportions of
            step 0 (:meth:`for_corpus` makes both, and the measurement, in one call); None for a loop
            without data (the simulator of :mod:`aioli_fast.harness.sim`), which only calls
            :meth:`before_step`.
        measure: ``model -> `` this rank's share of a probe / full-validation measurement of the model
            the loop passes to :meth:`draw` (:class:`~aioli_fast.evaluation.Measurement`); needed when
            the mixer asks for measurements (``mixer.measurement`` is ``probe`` or ``full_val``).
        window: where :meth:`observe` adds each micro-batch's sums and counts for the loop's logs
            (default: a window of its own, read by :meth:`take_window`).
    """

    def __init__(
        self,
        mixer: Mixer,
        stream: MixtureStream | None,
        *,
        measure: Measure | None = None,
        window: DomainSums | None = None,
    ):
        self.mixer, self.stream, self.measure = mixer, stream, measure
        self.window = window if window is not None else DomainSums.zeros(mixer.num_domains, mixer.device)
        #: the stream holds a block of host-known mixtures up to (not including) this step
        self.scheduled_until = 0
        #: probe / full-validation measurements made, and the seconds they took (this run, with resumes)
        self.measurements, self.measure_time = 0, 0.0
        self._proportions_D: torch.Tensor | None = None  # the mixer's tensor last handed to the stream
        start = stream.step if stream is not None else 0
        #: the mixer's proportions of the last step drawn, on the host
        self.host_proportions: list[float] = mixer.host_proportions(start)
        #: the stream's proportions of the last step drawn (what its batch was drawn with)
        self.drawn_proportions: list[float] = list(self.host_proportions)
        if stream is not None:
            self.drawn_proportions = [float(p) for p in stream.proportions]

    @classmethod
    def for_corpus(
        cls,
        manifest: Manifest,
        mixer: Mixer,
        options: MixingOptions,
        *,
        step_rows: int,
        rank: int = 0,
        world_size: int = 1,
        lockstep: bool = False,
        precision: str = "fp32",
        device: torch.device | str | None = None,
        on_error: str = "raise",
        window: DomainSums | None = None,
        micro_rows: int | None = None,
    ) -> MixingDriver:
        """A driver over a new stream of ``manifest`` for ``mixer`` (over ``mixer.domains``), as
        ``options`` say: ``step_rows`` sequences of this rank per step, and the held-out measurement the
        mixer asks for (on ``options.eval_split``, which the corpus must have), run on ``device`` (default
        the mixer's) with ``precision`` and, with ``lockstep``, the same number of forwards on every rank
        (sharded models); the log window lives on ``device`` too. A probe runs in micro-batches of
        ``micro_rows`` sequences (the training micro-batch; default ``options.eval_batch_size``)."""
        o = options
        device = torch.device(device) if device is not None else mixer.device
        if window is None:
            window = DomainSums.zeros(mixer.num_domains, device)
        measure = None
        if mixer.measurement in ("probe", "full_val"):
            measure = Measurement(
                mixer.measurement,
                manifest,
                mixer.domains,
                o.eval_split,
                probe_sequences=o.probe_sequences,
                batch_size=o.eval_batch_size,
                max_sequences=o.eval_max_sequences,
                device=device,
                precision=precision,
                rank=rank,
                world_size=world_size,
                lockstep=lockstep,
                micro_rows=micro_rows or o.eval_batch_size,
            )
        stream = MixtureStream(
            manifest,
            mixer.domains,
            step_rows,
            mixer.host_proportions(0),
            seed=o.seed,
            assignment=o.assignment,
            num_workers=o.num_workers,
            prefetch_factor=o.prefetch_factor,
            on_error=on_error,
            rank=rank,
            world_size=world_size,
        )
        return cls(mixer, stream, measure=measure, window=window)

    # ------------------------------------------------------------------------------------------- step

    def before_step(self, step: int, model: Any = None, module: torch.nn.Module | None = None) -> None:
        """The mixer's pre-step calls for optimizer step ``step``: a measurement of ``model`` when due
        (in eval mode of ``module`` when given), a block of host-known mixtures, new proportions (handed
        to the stream only when they change)."""
        mixer = self.mixer
        if mixer.measurement_due(step):
            if self.measure is None:
                raise AioliError(
                    f"mixing method '{mixer.name}' asks for a '{mixer.measurement}' measurement at step "
                    f"{step}, but this loop gave the driver no way to measure"
                )
            start = time.perf_counter()
            with eval_mode(module):
                measured = self.measure(model)
            mixer.observe_measurement(step, *measured)
            self.measurements += 1
            self.measure_time += time.perf_counter() - start
        schedule = mixer.schedule(step)
        if schedule:
            if self.stream is not None:
                self.stream.set_schedule(schedule, start=step, exact=mixer.exact_schedule)
            self.scheduled_until = step + len(schedule)
        current = mixer.proportions(step)
        if current is not self._proportions_D:
            self._proportions_D = current
            self.host_proportions = mixer.host_proportions(step)
            if step >= self.scheduled_until and self.stream is not None:
                self.stream.set_proportions(self.host_proportions, step=step)

    def draw(self, step: int, model: Any = None, module: torch.nn.Module | None = None) -> Batch:
        """:meth:`before_step`, then this rank's stream batch of optimizer step ``step``. Must be called
        after step ``step - 1`` has been observed, once per step. ``model`` is what a measurement runs
        (the package's GPT, or a function of the input ids returning logits; see
        :func:`~aioli_fast.evaluation.measure_losses`), in eval mode of ``module`` when given."""
        if self.stream is None:
            raise AioliError("this driver has no stream to draw from: call before_step")
        if self.stream.step != step:
            raise AioliError(
                f"the mixture stream is at step {self.stream.step} but training at step {step}: resume from "
                "a checkpoint that holds the mixer and stream state, and do not reuse a mixing loop that "
                "has trained"
            )
        self.before_step(step, model, module)
        self.drawn_proportions = [float(p) for p in self.stream.proportions]
        with torch.random.fork_rng(devices=[]):
            # starting the stream's reader processes draws from the global RNG, which would change the
            # model's randomness after a resume (the readers start at another step): keep it out
            return next(self.stream)

    def observe(self, step: int, loss_sum_D: torch.Tensor, count_D: torch.Tensor) -> None:
        """A training micro-batch's per-domain loss sums [D] and token counts [D] (this rank's): to the
        mixer and the log window (no host read)."""
        loss_sum_D = loss_sum_D.detach()
        self.mixer.observe(step, loss_sum_D, count_D)
        self.window.add(loss_sum_D, count_D)

    def take_window(self) -> DomainSums:
        """The log window summed over all ranks (collective: every rank calls it), then emptied."""
        total = self.window.reduced()
        self.window.zero_()
        return total

    # ------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """This rank's mixer state, the stream state and the schedule's end (tensors cloned)."""
        return {
            "mixer": self.mixer.state_dict(),
            "stream": self.stream.state_dict(),
            "scheduled_until": self.scheduled_until,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (``mixer``, ``stream``, ``scheduled_until``); the
        proportions are handed to the stream again at the next step."""
        self.mixer.load_state_dict(state["mixer"])
        self.stream.load_state_dict(state["stream"])
        self.scheduled_until = int(state["scheduled_until"])
        self.restart()

    def merge_states(self, states: list[dict[str, Any]], rank: int) -> dict[str, Any]:
        """The :meth:`state_dict` of ``rank`` in a run resumed on another number of processes, from the
        states every rank of the run that wrote them saved: the mixer's per-rank sums merged
        (:meth:`Mixer.merge_states`); the stream state and the schedule's end are the same on every
        rank."""
        return {**states[0], "mixer": self.mixer.merge_states([s["mixer"] for s in states], rank)}

    def restart(self) -> None:
        """Forget which proportions the stream was given (a loop (re)starting at the stream's step)."""
        self._proportions_D = None
        self.host_proportions = self.mixer.host_proportions(self.stream.step)

    def close(self) -> None:
        """Stop the stream's reader processes."""
        self.stream.close()
