"""Aioli: fit the mixing law's A online (LearnParams), then update the proportions by exponentiated gradient.

The run is a sequence of rounds of ``round_steps`` (U) steps, after ``prior_steps`` (P) steps on the prior
proportions (uniform without a prior; with one, the restricted setting). A round is:

    LearnParams   R·D blocks of S steps; block n trains on (1 - e)·p + e·W[order[n]], W[j] the smoothed
                  one-hot mixture of domain j, p the round's proportions, e = ``learn_fraction`` (1: the
                  paper's whole-batch blocks), order[n] the n-th domain of R permutations (random, or
                  mirrored pairs); per-domain losses are measured before the first block and after
                  every block (R·D + 1 measurements)
    update        G from the sequential loss drops, A = G·W⁻¹ (or the diagonal ablation; with e < 1,
                  G·W⁻¹·(I - (1 - e)·p·1ᵀ)/e), normalised; p updated by exponentiated gradient
                  (cumulative) or from the EMA of A (ema)
    exploit       the rest of the round trains on p

The schedule of a round (which domain each block trains on) is drawn on the host from ``(seed, round)``,
so the data stream knows every LearnParams mixture without a device read; the learned ``p`` is read once
per round. Unset options take defaults by domain count and run length (:meth:`AioliMixer.resolve_schedule`,
docs/mixing.md).

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

#: The paper's settings (arXiv 2411.05735) for 2, 3 and 7 domains: eta, one_hot_factor, ema (update ema),
#: sweeps R, block_steps S, round_steps U.
PAPER_SETTINGS: dict[int, dict[str, float | int]] = {
    2: {"eta": 0.2, "one_hot_factor": 0.625, "ema": 0.1, "sweeps": 4, "block_steps": 4, "round_steps": 250},
    3: {"eta": 0.1, "one_hot_factor": 0.5, "ema": 0.5, "sweeps": 4, "block_steps": 6, "round_steps": 250},
    7: {"eta": 1.0, "one_hot_factor": 0.75, "ema": 0.1, "sweeps": 2, "block_steps": 10, "round_steps": 200},
}
#: the fraction of each LearnParams batch on the block mixture when ``learn_fraction`` is not set
DEFAULT_LEARN_FRACTION = 0.25
#: at most this share of the run's training sequences on LearnParams block mixtures, unless configured
DEFAULT_MAX_LEARN_SHARE = 0.3
#: rounds after the uniform phase that ``round_steps: auto`` gives a run too short for that many paper rounds
AUTO_ROUNDS = 4
#: the shortest block ``block_steps: auto`` gives a run long enough for AUTO_ROUNDS paper-length rounds
AUTO_BLOCK_STEPS = 4


def paper_setting(num_domains: int) -> int:
    """The paper setting whose defaults a run of ``num_domains`` domains takes: the nearest domain count
    of the paper's three (2, 3, 7), ties to the smaller: 2 for k <= 2, 3 for k = 3..5, 7 for k >= 6."""
    return 2 if num_domains <= 2 else 3 if num_domains <= 5 else 7


def _auto(value: Any) -> bool:
    return isinstance(value, str) and value == "auto"


@register_mixer("aioli")
class AioliMixer(Mixer):
    """Aioli (Chen et al., ICLR 2025). Unset options take the paper's settings for the nearest domain count
    (:func:`paper_setting`); the schedule sizes default to ``auto`` (docs/mixing.md)."""

    OPTIONS = {
        "eta": None,
        "round_steps": "auto",
        "sweeps": "auto",
        "block_steps": "auto",
        "one_hot_factor": None,
        "learn_fraction": DEFAULT_LEARN_FRACTION,
        "block_order": "auto",
        "max_learn_share": DEFAULT_MAX_LEARN_SHARE,
        "update": "ema",
        "ema": None,
        "diagonal": False,
        "measurement": "probe",
        "measure_steps": 1,
        "prior_steps": "auto",
        "min_proportion": 0.0,
        "block_counts": "exact",
        "seed": 0,
    }
    OPTION_TYPES = {
        "eta": float,
        "one_hot_factor": float,
        "ema": float,
        "round_steps": int | str,
        "sweeps": int | str,
        "block_steps": int | str,
        "prior_steps": int | str,
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
        o = self.options = self.resolve_schedule(
            self.options, len(self.domains), self.total_steps, self.warmup_steps
        )
        D = self.num_domains
        self.eta, self.f = float(o["eta"]), float(o["one_hot_factor"])
        self.U, self.R, self.S = int(o["round_steps"]), int(o["sweeps"]), int(o["block_steps"])
        self.P, self.m = int(o["prior_steps"]), int(o["measure_steps"])
        self.e = float(o["learn_fraction"])
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
        # learn_fraction < 1: a round's block mixtures (1 - e)·p + e·W[j] around that round's p, built once
        # per round (one host read of p); (round, base p [D], device rows, host rows)
        self._partial: tuple[int, torch.Tensor, list[torch.Tensor], list[list[float]] | None] | None = None
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

    @staticmethod
    def resolve_schedule(
        options: dict[str, Any], num_domains: int, total_steps: int | None, warmup_steps: int = 0
    ) -> dict[str, Any]:
        """Options with every unset (None) or ``auto`` value resolved for ``num_domains`` domains and a run
        of ``total_steps`` steps (None: unknown) with ``warmup_steps`` of learning-rate warm-up.

        - eta, one_hot_factor, ema: the paper's setting for the nearest domain count (:func:`paper_setting`).
        - prior_steps: a uniform (or prior) phase that covers the warm-up and the first quarter of the run:
          ``max(warmup_steps, total_steps // 4)`` (``warmup_steps`` when the run length is unknown).
        - sweeps: 2 (one mirrored pair) with ``learn_fraction < 1``; the paper's R with 1.
        - round_steps: the paper's U (or longer, for blocks of at least :data:`AUTO_BLOCK_STEPS` steps with
          many domains); in a run too short for :data:`AUTO_ROUNDS` such rounds after the prior phase, that
          many equal rounds (the remainder lengthens the prior phase), never shorter than LearnParams
          needs (one step per block plus a step on the learned proportions).
        - block_steps: with ``learn_fraction < 1`` the blocks fill the round but for its last step
          (``(U - 1 - closing measurement) // (R·k)``); with 1 the paper's S, shortened to fit the round.
        - block_order: ``mirrored`` with ``learn_fraction < 1`` and an even R, else ``random``.
        """
        for key in ("round_steps", "sweeps", "block_steps", "prior_steps"):
            value = options[key]
            if not (_auto(value) or (isinstance(value, int) and not isinstance(value, bool))):
                raise ConfigError(f"mixing.{key} must be an integer or 'auto', got {value!r}")
        o = dict(options)
        k = num_domains
        paper = PAPER_SETTINGS[paper_setting(k)]
        for key in ("eta", "one_hot_factor", "ema"):
            if o.get(key) is None:
                o[key] = paper[key]
        e = float(o["learn_fraction"])
        partial = e < 1
        closing = int(o["measure_steps"]) if o["measurement"] == "train" else 0
        if _auto(o["prior_steps"]):
            o["prior_steps"] = max(int(warmup_steps), (total_steps or 0) // 4)
        if _auto(o["sweeps"]):
            o["sweeps"] = 2 if partial else paper["sweeps"]
        R = o["sweeps"]
        auto_prior = _auto(options["prior_steps"])
        if _auto(o["round_steps"]):
            block = 1 if _auto(o["block_steps"]) else o["block_steps"]
            shortest = R * k * block + closing + 1
            # a long run gets blocks of at least AUTO_BLOCK_STEPS steps (many domains: longer rounds)
            U = max(int(paper["round_steps"]), R * k * max(block, AUTO_BLOCK_STEPS) + closing + 1)
            if total_steps is not None:
                if total_steps - o["prior_steps"] < shortest and auto_prior:
                    # too short for one round after a quarter of the run: a shorter uniform phase
                    o["prior_steps"] = max(int(warmup_steps), total_steps - shortest)
                    if total_steps - o["prior_steps"] < shortest:  # no round fits: uniform throughout
                        o["prior_steps"] = total_steps
                U = min(U, max(1, (total_steps - o["prior_steps"]) // AUTO_ROUNDS))
            o["round_steps"] = max(U, shortest)
        if total_steps is not None and auto_prior and total_steps > o["prior_steps"] + o["round_steps"]:
            # whole rounds: what they leave over lengthens the uniform phase, so the run ends on p
            o["prior_steps"] += (total_steps - o["prior_steps"]) % o["round_steps"]
        if _auto(o["block_steps"]):
            U = o["round_steps"]
            fit = max(1, (U - 1 - closing) // (R * k))
            o["block_steps"] = fit if partial else min(int(paper["block_steps"]), fit)
        if o["block_order"] == "auto":
            o["block_order"] = "mirrored" if partial and R % 2 == 0 else "random"
        return o

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
        if not 0 < self.e <= 1:
            raise ConfigError(f"mixing.learn_fraction must be in (0, 1], got {self.e}")
        if self.e < 1 and self.diagonal:
            raise ConfigError("mixing.diagonal (the paper's ablation) needs mixing.learn_fraction=1")
        cap = float(self.options["max_learn_share"])
        if not 0 < cap <= 1:
            raise ConfigError(f"mixing.max_learn_share must be in (0, 1], got {cap}")
        if self.options["block_order"] not in ("random", "mirrored"):
            raise ConfigError(
                "mixing.block_order must be 'random', 'mirrored' or 'auto', "
                f"got {self.options['block_order']!r}"
            )
        if self.options["block_order"] == "mirrored" and self.R % 2:
            raise ConfigError(f"mixing.block_order 'mirrored' needs an even mixing.sweeps, got {self.R}")
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
        share = self.learn_share(self.total_steps)
        if share > cap + 1e-9:
            over = (
                f"the run's {self.total_steps} steps" if self.total_steps else f"each round of {self.U} steps"
            )
            raise ConfigError(
                f"mixing: LearnParams would train {100 * share:.0f}% of {over} on block mixtures "
                "(sweeps x domains x block_steps x learn_fraction = "
                f"{self.R} x {D} x {self.S} x {self.e:g} per round of {self.U}), above "
                f"mixing.max_learn_share={cap:g}. Block mixtures cost quality "
                "(docs/mixing.md); lower sweeps, block_steps or learn_fraction, raise round_steps, or set "
                "mixing.max_learn_share to allow it (the paper's 7-domain settings need 0.7)"
            )

    def initial_proportions(self, proportions):
        self.has_prior = proportions is not None
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

    def _steps_per_round(self, total_steps: int, length: int) -> int:
        """The first ``length`` steps of every round of a run of ``total_steps``, counted."""
        return sum(min(length, max(0, total_steps - start)) for start in range(self.P, total_steps, self.U))

    def learn_steps_in(self, total_steps: int) -> int:
        """Steps of a run of ``total_steps`` in LearnParams (block mixtures, closing train measurement)."""
        return self._steps_per_round(total_steps, self.learned_offset)

    def learn_share(self, total_steps: int | None) -> float:
        """The share of the training sequences that LearnParams draws from block mixtures, over a run of
        ``total_steps`` (None: over one round): block steps x ``learn_fraction`` / steps."""
        if total_steps is None:
            return self.learn_steps * self.e / self.U
        return self._steps_per_round(total_steps, self.learn_steps) * self.e / total_steps

    def describe(self, total_steps: int) -> str | None:
        """The schedule in numbers: rounds, LearnParams length and its share of the run's steps."""
        D = self.num_domains
        learn = self.learn_steps_in(total_steps)
        rounds = len(range(self.P, total_steps, self.U))
        extra = f" + {self.m} measurement step(s)" if self.measurement == "train" else ""
        start_mixture = "prior" if self.has_prior else "uniform mixture"
        prior = f"after {self.P} step(s) on the {start_mixture}, "
        fraction = (
            "" if self.e == 1 else f" on {self.e:g} of each batch ({self.options['block_order']} sweeps)"
        )
        short = ""
        if not self.exploit_spans(total_steps):
            short = (
                f"; the run is too short to apply a round's proportions: it trains on the {start_mixture} "
                "throughout"
            )
        return (
            f"aioli: {prior if self.P else ''}{rounds} round(s) of {self.U} steps, each starting with "
            f"LearnParams ({self.R} sweep(s) x {D} domains x {self.S} steps{extra}){fraction}; eta "
            f"{self.eta:g}, one_hot_factor {self.f:g}; LearnParams takes {learn} of the run's {total_steps} "
            f"steps, {100 * self.learn_share(total_steps):.0f}% of its sequences{short}"
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
            draw = lmo.mirrored_order if self.options["block_order"] == "mirrored" else lmo.learn_params_order
            self._orders = {round_index: draw(self.num_domains, self.R, gen).tolist()}
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

    def _block_rows(
        self, step: int, host: bool = False
    ) -> tuple[list[torch.Tensor], list[list[float]] | None]:
        """The block mixtures of ``step``'s round, on the device and (``host``) as floats: W's rows, or
        (1 - e)·p + e·W[j] around the round's p (its update comes after its last block)."""
        if self.e == 1:
            return self._rows, self._host_rows
        round_index = self.locate(step)[0]
        if self._partial is None or self._partial[0] != round_index:
            base_D, e = self._p_D, self.e
            rows = [(1 - e) * base_D + e * self.W_DD[j] for j in range(self.num_domains)]
            self._partial = (round_index, base_D, rows, None)
        if host and self._partial[3] is None:
            # the one host read of a round's proportions (the data stream needs them anyway)
            p = self._partial[1].tolist()
            rows_host = [[(1 - self.e) * a + self.e * w for a, w in zip(p, row)] for row in self._host_rows]
            self._partial = (*self._partial[:3], rows_host)
        return self._partial[2], self._partial[3]

    def proportions(self, step: int) -> torch.Tensor:
        self._finish_window(step)
        j = self._block_mixture(step)
        return self._block_rows(step)[0][j] if j is not None else self._p_D

    def host_values(self, step: int) -> list[float] | None:
        j = self._block_mixture(step)
        return list(self._block_rows(step, host=True)[1][j]) if j is not None else None

    def schedule(self, step: int) -> list[list[float]] | None:
        """At the first step of a round's LearnParams: the block mixture of each of its steps."""
        where = self.locate(step)
        if where is None or where[1] != 0:
            return None
        per_step = lmo.learn_params_schedule(torch.tensor(self.order(where[0])), self.S)
        host_rows = self._block_rows(step, host=True)[1]
        return [list(host_rows[j]) for j in per_step.tolist()]

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
        expected = batch_size * self.m * ((1 - self.e) / D + self.e * (1 - self.f) / (D - 1))
        if expected >= 2:
            return None
        return (
            f"mixing.measurement=train: a measurement sees about {expected:.2f} sequences of each "
            f"domain other than the block's (batch {batch_size} x measure_steps {self.m} x the block "
            "mixture's share of it); many measurements will miss domains. Raise "
            "mixing.measure_steps or the batch size, or use mixing.measurement=probe"
        )

    def _update(self, round_index: int) -> None:
        order = self._order_tensor(round_index)
        G_DD = lmo.accumulate_loss_drops(self._L_nD, order, self.num_domains)
        if self.e < 1:
            # the blocks were built around the round's p (built at its first block; never None here,
            # since the blocks run before the update, a resumed run rebuilds them from the same p)
            base_D = self._partial[1] if self._partial and self._partial[0] == round_index else self._p_D
            A_DD = lmo.solve_partial_mixing_law(G_DD, self.W_inv_DD, base_D, self.e)
        elif self.diagonal:
            A_DD = lmo.diagonal_ablation(G_DD, self.f)
        else:
            A_DD = lmo.solve_mixing_law(G_DD, self.W_inv_DD)
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

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._partial = None  # rebuilt from the loaded proportions

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
