"""Aioli: fit the mixing law's A online (LearnParams), then update the proportions by exponentiated gradient.

The run is a sequence of rounds of ``round_steps`` (U) steps, after ``prior_steps`` (P) steps on the prior
proportions (the restricted setting; P = 0 is unrestricted). A round is:

    LearnParams   R·D blocks of S steps; block n trains on W[order[n]], the smoothed one-hot mixture of the
                  n-th domain of R random permutations; per-domain losses are measured before the first
                  block and after every block (R·D + 1 measurements)
    update        G from the sequential loss drops, A = G·W⁻¹ (or the diagonal ablation), normalised;
                  p updated by exponentiated gradient (cumulative) or from the EMA of A (ema)
    exploit       the rest of the round trains on p

The schedule of a round (which domain each block trains on) is drawn on the host from ``(seed, round)``,
so the data stream knows every LearnParams mixture without a device read; the learned ``p`` is read once
per round.

Measurement sources (``measurement``):
    full_val  the whole validation split, as the paper (the loop evaluates it before the step)
    probe     a small fixed per-domain validation probe, one batched no-grad forward
    train     the per-domain losses of the training batches of the first ``measure_steps`` steps of each
              block (zero extra passes); the model of a block's first batch is the model before the block,
              so with ``measure_steps=1`` the sequential differences are exact in expectation. The closing
              measurement of a round uses ``measure_steps`` steps trained on the previous proportions; the
              new proportions apply after them.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from . import lmo
from .base import Mixer, accumulate, check_measurement, register_mixer
from .static import proportions_tensor


@register_mixer("aioli")
class AioliMixer(Mixer):
    """Aioli (Chen et al., ICLR 2025). Defaults are the paper's 2-domain setting."""

    OPTIONS = {
        "eta": 0.2,
        "round_steps": 250,
        "sweeps": 4,
        "block_steps": 4,
        "one_hot_factor": 0.625,
        "update": "ema",
        "ema": 0.1,
        "diagonal": False,
        "measurement": "probe",
        "measure_steps": 1,
        "prior_steps": 0,
        "min_proportion": 0.0,
        "block_counts": "exact",
        "seed": 0,
    }
    STATE = {
        "proportions": "_p_D",
        "A_bar": "_A_bar_DD",
        "has_A_bar": "_has_A_bar",
        "losses": "_L_nD",
        "window": "_acc_2D",
        "window_end": "_pending",
        "round_done": "_round_done",
        "skipped_updates": "skipped_updates",
        "missing_measurements": "missing_measurements",
        "last_A": "last_A_DD",
    }

    def __init__(self, domains, device="cpu", proportions=None, **options: Any):
        super().__init__(domains, device=device, proportions=proportions, **options)
        o = self.options
        D = self.num_domains
        self.eta, self.f = float(o["eta"]), float(o["one_hot_factor"])
        self.U, self.R, self.S = int(o["round_steps"]), int(o["sweeps"]), int(o["block_steps"])
        self.P, self.m = int(o["prior_steps"]), int(o["measure_steps"])
        self.measurement = o["measurement"]
        self.use_ema, self.ema = o["update"] == "ema", float(o["ema"])
        self.diagonal, self.floor, self.seed = bool(o["diagonal"]), float(o["min_proportion"]), int(o["seed"])
        # LearnParams block batches with exact per-domain counts, as the reference code draws them
        self.exact_schedule = o["block_counts"] == "exact"
        self.learn_steps = self.R * D * self.S  # LearnParams: R sweeps x D blocks x S steps
        self._check_options()
        self.W_DD = lmo.smoothed_one_hot(D, self.f, device=self.device)
        self.W_inv_DD = lmo.smoothed_one_hot_inverse(D, self.f, device=self.device)
        # one tensor per mixture, so that proportions() returns the same object within a block
        self._rows = [self.W_DD[j].clone() for j in range(D)]
        self._host_rows = [[self.f if i == j else (1 - self.f) / (D - 1) for i in range(D)] for j in range(D)]
        self._orders: dict[int, list[int]] = {}
        self._p_D = lmo.apply_floor(self._proportions_D, self.floor)
        self._A_bar_DD = torch.zeros(D, D, device=self.device)
        self._has_A_bar = torch.zeros((), dtype=torch.bool, device=self.device)
        self._L_nD = torch.full((self.R * D + 1, D), float("nan"), device=self.device)
        self._acc_2D = torch.zeros(2, D, device=self.device)
        self._pending: int | None = None  # global step at which the open train-mode window ends
        self._round_done = -1  # index of the last round whose update has been applied
        self.skipped_updates = torch.zeros((), dtype=torch.int64, device=self.device)
        self.missing_measurements = torch.zeros((), dtype=torch.int64, device=self.device)
        self.last_A_DD = torch.zeros(D, D, device=self.device)
        self._rounds: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def _check_options(self) -> None:
        D = self.num_domains
        if D < 2:
            raise ConfigError("mixing.method 'aioli' needs at least 2 domains")
        lmo.check_one_hot_factor(self.f, D)
        bad = [
            ("eta", self.eta, self.eta >= 0, ">= 0"),
            ("round_steps", self.U, self.U >= 1, ">= 1"),
            ("sweeps", self.R, self.R >= 1, ">= 1"),
            ("block_steps", self.S, self.S >= 1, ">= 1"),
            ("measure_steps", self.m, 1 <= self.m <= self.S, f"in [1, block_steps={self.S}]"),
            ("prior_steps", self.P, self.P >= 0, ">= 0"),
            ("ema", self.ema, 0 <= self.ema <= 1, "in [0, 1]"),
            ("min_proportion", self.floor, 0 <= self.floor * D <= 1, f"in [0, 1/k = {1 / D:.4g}]"),
        ]
        for key, value, ok, rule in bad:
            if not ok:
                raise ConfigError(f"mixing.{key} must be {rule}, got {value}")
        if self.options["block_counts"] not in ("exact", "drawn"):
            raise ConfigError(
                f"mixing.block_counts must be 'exact' or 'drawn', got {self.options['block_counts']!r}"
            )
        if self.options["update"] not in ("ema", "cumulative"):
            raise ConfigError(f"mixing.update must be 'ema' or 'cumulative', got {self.options['update']!r}")
        check_measurement(self.measurement)
        learn = self.R * D * self.S
        need = self.learned_offset + 1  # at least one step of a round trains on the learned proportions
        if self.U < need:
            raise ConfigError(
                f"mixing.round_steps={self.U} leaves no steps to train on the learned proportions: "
                "LearnParams "
                f"takes sweeps x domains x block_steps = {self.R} x {D} x {self.S} = {learn} steps"
                + (f" plus measure_steps={self.m}" if self.measurement == "train" else "")
                + f"; use round_steps >= {need}"
            )

    def initial_proportions(self, proportions):
        if proportions is None:
            return self.uniform()
        return proportions_tensor(proportions, self.domains, self.device)

    # ---- the schedule (host only) -------------------------------------------------------------------
    #
    # Offsets in a round: [0, learn_steps) LearnParams blocks; in train mode [learn_steps, learned_offset)
    # the closing measurement, still on the previous proportions; [learned_offset, U) the learned ones.

    @property
    def learned_offset(self) -> int:
        """Offset in a round of the first step that trains on the proportions learned in that round."""
        return self.learn_steps + (self.m if self.measurement == "train" else 0)

    def in_learn_params(self, step: int) -> bool:
        """Whether ``step`` belongs to LearnParams (a block mixture, or the closing train measurement)."""
        where = self.locate(step)
        return where is not None and where[1] < self.learned_offset

    def describe(self, total_steps: int) -> str | None:
        """The schedule in numbers: rounds, LearnParams length and its share of the run's steps."""
        D = self.num_domains
        learn = sum(
            min(self.learned_offset, max(0, total_steps - start))
            for start in range(self.P, total_steps, self.U)
        )
        rounds = len(range(self.P, total_steps, self.U))
        extra = f" + {self.m} measurement step(s)" if self.measurement == "train" else ""
        prior = f"after {self.P} step(s) on the prior, " if self.P else ""
        return (
            f"aioli: {prior}{rounds} round(s) of {self.U} steps, each starting with LearnParams "
            f"({self.R} sweep(s) x {D} domains x {self.S} steps{extra}); LearnParams takes {learn} of the "
            f"run's {total_steps} steps ({100 * learn / max(total_steps, 1):.0f}%)"
        )

    def final_proportions(self, total_steps: int) -> tuple[list[float], str | None]:
        """The learned proportions, never a LearnParams block mixture: a run that ends inside
        LearnParams reports those learned last (uniform before the first round), with a note."""
        last = total_steps - 1
        if not self.in_learn_params(last):
            return self.host_proportions(last), None
        learned = [float(p) for p in self._p_D.tolist()]
        return learned, (
            f"the run ended inside LearnParams (step {last + 1} of {total_steps} trained on a block "
            "mixture); the proportions reported are the last learned ones. Make train.steps end in a "
            "round's exploit phase (see mixing.round_steps) to train on learned proportions to the end"
        )

    def exploit_spans(self, total_steps: int) -> list[tuple[int, int]]:
        """(first, last) step trained on each round's learned proportions, for a run of ``total_steps``."""
        spans, begin = [], self.P
        while begin + self.learned_offset < total_steps:
            spans.append((begin + self.learned_offset, min(begin + self.U, total_steps) - 1))
            begin += self.U
        return spans

    def order(self, round_index: int) -> list[int]:
        """Domain of each LearnParams block of round ``round_index`` (R permutations, drawn on the host)."""
        if round_index not in self._orders:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + round_index)
            self._orders = {round_index: lmo.learn_params_order(self.num_domains, self.R, gen).tolist()}
        return self._orders[round_index]

    def locate(self, step: int) -> tuple[int, int] | None:
        """(round, offset in the round) of ``step``, or None during the prior phase."""
        if step < self.P:
            return None
        return divmod(step - self.P, self.U)

    def _block_mixture(self, step: int) -> int | None:
        """The domain whose smoothed one-hot mixture ``step`` trains on, or None outside LearnParams."""
        where = self.locate(step)
        if where is None or where[1] >= self.learn_steps:
            return None
        round_index, offset = where
        return self.order(round_index)[offset // self.S]

    def _boundary(self, step: int) -> tuple[int, int] | None:
        """(round, n) when ``step`` starts the measurement of block boundary n (0..R·D), else None."""
        where = self.locate(step)
        if where is None:
            return None
        round_index, offset = where
        if offset % self.S or offset > self.learn_steps:
            return None
        return round_index, offset // self.S

    # ---- the loop interface -------------------------------------------------------------------------

    def proportions(self, step: int) -> torch.Tensor:
        self._finish_window(step)
        j = self._block_mixture(step)
        return self._rows[j] if j is not None else self._p_D

    def host_values(self, step: int) -> list[float] | None:
        j = self._block_mixture(step)
        return list(self._host_rows[j]) if j is not None else None

    def schedule(self, step: int) -> list[list[float]] | None:
        """At the first step of a round's LearnParams: the smoothed one-hot mixture of each of its steps."""
        where = self.locate(step)
        if where is None or where[1] != 0:
            return None
        per_step = lmo.learn_params_schedule(torch.tensor(self.order(where[0])), self.S)
        return [list(self._host_rows[j]) for j in per_step.tolist()]

    def measurement_due(self, step: int) -> bool:
        return self.measurement != "train" and self._boundary(step) is not None

    def observe_measurement(self, step: int, loss_sum_D: torch.Tensor, count_D: torch.Tensor) -> None:
        if self.measurement == "train":
            raise ConfigError("mixing.measurement is 'train': losses come from observe(), not measurements")
        at = self._boundary(step)
        if at is None:
            raise ConfigError(f"no loss measurement is due at step {step}")
        self._record(at, *self.reduce(loss_sum_D, count_D))

    def observe(self, step: int, loss_sum_D: torch.Tensor, count_D: torch.Tensor) -> None:
        if self.measurement != "train":
            return
        self._finish_window(step)
        where = self.locate(step)
        if where is None:
            return
        round_index, offset = where
        n, into = divmod(offset, self.S)
        if n > self.R * self.num_domains or into >= self.m:
            return
        accumulate(self._acc_2D, loss_sum_D, count_D)
        self._pending = step - into + self.m

    # ---- internals ----------------------------------------------------------------------------------

    def _finish_window(self, step: int) -> None:
        """Close the open train-mode measurement window once ``step`` is past it."""
        if self._pending is None or step < self._pending:
            return
        start = self._pending - self.m
        self._pending = None
        sums, counts = self.reduce(self._acc_2D[0], self._acc_2D[1])
        self._acc_2D.zero_()
        at = self._boundary(start)
        if at is not None:
            self._record(at, sums, counts)

    def _record(self, at: tuple[int, int], loss_sum_D: torch.Tensor, count_D: torch.Tensor) -> None:
        round_index, n = at
        if round_index <= self._round_done:
            return  # already applied (a resumed run replaying a step)
        if n == 0:
            self._L_nD.fill_(float("nan"))
        L_D = lmo.losses_from_sums(loss_sum_D, count_D)
        self.missing_measurements += (~torch.isfinite(L_D)).sum()
        self._L_nD[n] = L_D
        if n == self.R * self.num_domains:
            self._update(round_index)

    def _order_tensor(self, round_index: int) -> torch.Tensor:
        """The round's block order on the device; a pinned, non-blocking copy (no host wait on CUDA)."""
        order = torch.tensor(self.order(round_index))
        if self.device.type == "cuda":
            return order.pin_memory().to(self.device, non_blocking=True)
        return order.to(self.device)

    def train_measurement_warning(self, batch_size: int) -> str | None:
        """A message when ``train`` measurements will often miss domains at this global batch size."""
        if self.measurement != "train":
            return None
        D = self.num_domains
        expected = batch_size * self.m * (1 - self.f) / (D - 1)
        if expected >= 2:
            return None
        return (
            f"mixing.measurement=train: a measurement sees about {expected:.2f} sequences of each "
            f"domain other than the block's (batch {batch_size} x measure_steps {self.m} x "
            f"(1 - one_hot_factor) / (k - 1)); many measurements will miss domains. Raise "
            "mixing.measure_steps or the batch size, or use mixing.measurement=probe"
        )

    def _update(self, round_index: int) -> None:
        order = self._order_tensor(round_index)
        G_DD = lmo.accumulate_loss_drops(self._L_nD, order, self.num_domains)
        A_DD = (
            lmo.diagonal_ablation(G_DD, self.f)
            if self.diagonal
            else lmo.solve_mixing_law(G_DD, self.W_inv_DD)
        )
        ok = torch.isfinite(A_DD).all()  # before normalising, which would map a non-finite A to zeros
        A_DD = lmo.normalize_mixing_matrix(A_DD)
        if self.use_ema:
            A_bar = torch.where(self._has_A_bar, lmo.ema_matrix(A_DD, self._A_bar_DD, self.ema), A_DD)
            p_new = lmo.ema_proportions(A_bar, self.eta)
            self._A_bar_DD = torch.where(ok, A_bar, self._A_bar_DD)
            self._has_A_bar = self._has_A_bar | ok
        else:
            # the first round starts from uniform, not from the prior (as the reference implementation):
            # a prior of 0 for a domain would otherwise keep it at 0 for the whole run
            base_D = self.uniform() if round_index == 0 else self._p_D
            p_new = lmo.exponentiated_gradient(base_D, A_DD, self.eta)
        p_new = lmo.apply_floor(p_new, self.floor)
        self._p_D = torch.where(ok, p_new, self._p_D)  # a new tensor: the loop sees the change
        self.last_A_DD = torch.where(ok, A_DD, self.last_A_DD)
        # device tensors, read once at the end (summary): what each round estimated and chose
        self._rounds.append((round_index, A_DD.detach().clone(), self._p_D.detach().clone(), ok))
        self.skipped_updates += (~ok).to(torch.int64)
        self._round_done = round_index

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"skipped_updates": self.skipped_updates, "missing_measurements": self.missing_measurements}

    def summary(self) -> dict:
        """Per round updated in this process (not carried over a resume): the normalised A and the new p."""
        return {
            "rounds": [
                {"round": r, "A": A.tolist(), "proportions": p.tolist(), "applied": bool(ok)}
                for r, A, p, ok in self._rounds
            ]
        }
