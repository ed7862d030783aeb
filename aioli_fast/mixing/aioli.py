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
per round. Unset options take defaults by domain count and run length (:func:`resolve_options`,
docs/mixing.md); the resolved round structure is an :class:`AioliSchedule` (readable names; the paper's
letters U, R, S, P, e, m appear only in comments and in ``lmo``).

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

from dataclasses import dataclass
from typing import Any

import torch

from ..distributed import all_reduce_sum
from ..errors import ConfigError
from . import lmo
from .base import MEASUREMENTS, Mixer, check_measurement, register_mixer
from .static import proportions_tensor
from .sums import DomainSums

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
#: Aioli's measurement sources: the base ones and ``round`` (every training batch's loss trend, fitted)
AIOLI_MEASUREMENTS = (*MEASUREMENTS, "round")
#: ``update: gated`` defaults (measurement: round): the step per unit-free difference of loss drops, the
#: standard errors a difference must clear to move p, and the most one update may multiply or divide a
#: proportion by
GATED_ETA = 4.0
GATED_SIGNIFICANCE = 3.0
GATED_MAX_CHANGE = 4.0
#: the weight in a round's fit of a training batch one round older (each step older: memory^(1/round_steps))
GATED_MEMORY = 0.5
#: the least a gated update leaves a domain, as a fraction of the uniform share 1/k
GATED_LOWEST_SHARE = 0.25
#: a domain is lowered when its loss drop per step on it is significantly below this fraction of the
#: average domain's
GATED_USEFUL = 0.75
#: the options whose value may be ``auto`` (sized to the domain count and the run length)
SCHEDULE_OPTIONS = ("round_steps", "sweeps", "block_steps", "prior_steps")


def paper_setting(num_domains: int) -> int:
    """The paper setting whose defaults a run of ``num_domains`` domains takes: the nearest domain count
    of the paper's three (2, 3, 7), ties to the smaller: 2 for D <= 2, 3 for D = 3..5, 7 for D >= 6."""
    return 2 if num_domains <= 2 else 3 if num_domains <= 5 else 7


def learn_params_steps(sweeps: int, num_domains: int, block_steps: int, closing_steps: int = 0) -> int:
    """Steps of one round's LearnParams: ``sweeps x num_domains`` blocks of ``block_steps`` steps (the
    paper's R·k·S), plus ``closing_steps`` (the closing measurement of ``measurement: train``)."""
    return sweeps * num_domains * block_steps + closing_steps


def percent(fraction: float) -> str:
    """A fraction as a percentage with two significant digits (``0.39%``, ``2.9%``, ``47%``, ``130%``)."""
    value = 100 * fraction
    return f"{value:.0f}%" if value >= 10 else f"{value:.2g}%"


def _auto(value: Any) -> bool:
    return isinstance(value, str) and value == "auto"


@dataclass(frozen=True)
class AioliSchedule:
    """Aioli's round structure for a run, resolved once (:func:`resolve_options`). Host-only arithmetic.

    The run trains ``uniform_steps`` steps on the uniform mixture (or the prior), then rounds of
    ``round_steps``. A round's first :attr:`learn_steps` steps are LearnParams: ``sweeps`` permutations of
    the D domains, a block of ``block_steps`` steps per domain, each on ``learn_fraction`` of the block's
    smoothed one-hot mixture (the rest on the round's proportions); in ``measurement: train`` the next
    ``closing_steps`` steps measure the round's last losses on the previous proportions. The rest of the
    round, from :attr:`learned_offset`, trains on the proportions learned in it.
    """

    num_domains: int  # D
    round_steps: int  # U
    sweeps: int  # R
    block_steps: int  # S
    uniform_steps: int  # P (mixing.prior_steps)
    measure_steps: int  # m: the first steps of a block whose training losses measure it (measurement: train)
    learn_fraction: float  # e
    closing_steps: int  # m in measurement: train, else 0

    @property
    def blocks(self) -> int:
        """LearnParams blocks in a round (R·D)."""
        return self.sweeps * self.num_domains

    @property
    def learn_steps(self) -> int:
        """Steps of a round's LearnParams blocks."""
        return learn_params_steps(self.sweeps, self.num_domains, self.block_steps)

    @property
    def learned_offset(self) -> int:
        """Offset in a round of the first step that trains on the proportions learned in that round."""
        return self.learn_steps + self.closing_steps

    def locate(self, step: int) -> tuple[int, int] | None:
        """(round, offset in the round) of ``step``, or None during the uniform phase."""
        if step < self.uniform_steps:
            return None
        return divmod(step - self.uniform_steps, self.round_steps)

    def in_learn_params(self, step: int) -> bool:
        """Whether ``step`` belongs to LearnParams (a block mixture, or the closing train measurement)."""
        where = self.locate(step)
        return where is not None and where[1] < self.learned_offset

    def block_at(self, step: int) -> tuple[int, int] | None:
        """(round, block index in the round) of a step that trains on a block mixture, else None."""
        where = self.locate(step)
        if where is None or where[1] >= self.learn_steps:
            return None
        return where[0], where[1] // self.block_steps

    def boundary(self, step: int) -> tuple[int, int] | None:
        """(round, n) when ``step`` starts the measurement of block boundary n (0..R·D), else None."""
        where = self.locate(step)
        if where is None:
            return None
        round_index, offset = where
        if offset % self.block_steps or offset > self.learn_steps:
            return None
        return round_index, offset // self.block_steps

    def steps_per_round(self, total_steps: int, length: int) -> int:
        """The first ``length`` steps of every round of a run of ``total_steps``, counted."""
        return sum(
            min(length, max(0, total_steps - start))
            for start in range(self.uniform_steps, total_steps, self.round_steps)
        )

    def rounds_in(self, total_steps: int) -> int:
        """Rounds that start within a run of ``total_steps``."""
        return len(range(self.uniform_steps, total_steps, self.round_steps))

    def measurements_in(self, total_steps: int) -> int:
        """Loss measurements in a run of ``total_steps``: the block boundaries 0..R·D of every round
        that fall before its end (boundary n of a round starting at s is at step s + n·S)."""
        return sum(
            min(self.blocks + 1, -(-(total_steps - start) // self.block_steps))
            for start in range(self.uniform_steps, total_steps, self.round_steps)
        )

    def learn_steps_in(self, total_steps: int) -> int:
        """Steps of a run of ``total_steps`` in LearnParams (block mixtures, closing train measurement)."""
        return self.steps_per_round(total_steps, self.learned_offset)

    def learn_share(self, total_steps: int | None) -> float:
        """The share of the training sequences that LearnParams draws from block mixtures, over a run of
        ``total_steps`` (None: over one round): block steps x ``learn_fraction`` / steps."""
        if total_steps is None:
            return self.learn_steps * self.learn_fraction / self.round_steps
        return self.steps_per_round(total_steps, self.learn_steps) * self.learn_fraction / total_steps

    def exploit_spans(self, total_steps: int) -> list[tuple[int, int]]:
        """(first, last) step trained on each round's learned proportions, for a run of ``total_steps``."""
        spans, begin = [], self.uniform_steps
        while begin + self.learned_offset < total_steps:
            spans.append((begin + self.learned_offset, min(begin + self.round_steps, total_steps) - 1))
            begin += self.round_steps
        return spans


def resolve_options(
    options: dict[str, Any], num_domains: int, total_steps: int | None, warmup_steps: int = 0
) -> dict[str, Any]:
    """Options with every unset (None) or ``auto`` value resolved for ``num_domains`` domains and a run
    of ``total_steps`` steps (None: unknown) with ``warmup_steps`` of learning-rate warm-up.

    - eta, one_hot_factor, ema: the paper's setting for the nearest domain count (:func:`paper_setting`).
    - prior_steps: a uniform (or prior) phase that covers the warm-up and the first quarter of the run:
      ``max(warmup_steps, total_steps // 4)`` (``warmup_steps`` when the run length is unknown).
    - sweeps: 2 (one mirrored pair) with ``learn_fraction < 1``; the paper's with 1.
    - round_steps: the paper's (or longer, for blocks of at least :data:`AUTO_BLOCK_STEPS` steps with
      many domains); in a run too short for :data:`AUTO_ROUNDS` such rounds after the prior phase, that
      many equal rounds (the remainder lengthens the prior phase), never shorter than LearnParams
      needs (one step per block plus a step on the learned proportions).
    - block_steps: with ``learn_fraction < 1`` the blocks fill the round but for its last step and the
      closing measurement; with 1 the paper's, shortened to fit the round.
    - block_order: ``mirrored`` with ``learn_fraction < 1`` and an even number of sweeps, else ``random``.
    """
    for key in SCHEDULE_OPTIONS:
        value = options[key]
        if not (_auto(value) or (isinstance(value, int) and not isinstance(value, bool))):
            raise ConfigError(f"mixing.{key} must be an integer or 'auto', got {value!r}")
    o = dict(options)
    D = num_domains
    paper = PAPER_SETTINGS[paper_setting(D)]
    if o.get("update", "auto") == "auto":
        o["update"] = "gated" if o.get("measurement") == "round" else "ema"
    if o.get("eta") is None and o["update"] == "gated":
        o["eta"] = GATED_ETA
    for key in ("eta", "one_hot_factor", "ema"):
        if o.get(key) is None:
            o[key] = paper[key]
    partial = float(o["learn_fraction"]) < 1
    closing = int(o["measure_steps"]) if o["measurement"] == "train" else 0
    auto_prior = _auto(o["prior_steps"])
    if auto_prior:
        o["prior_steps"] = max(int(warmup_steps), (total_steps or 0) // 4)
    if _auto(o["sweeps"]):
        # measurement: round fits the loss trends of the training batches: no block mixtures
        o["sweeps"] = 0 if o.get("measurement") == "round" else 2 if partial else paper["sweeps"]
    sweeps = o["sweeps"]
    if _auto(o["round_steps"]):
        block = 1 if _auto(o["block_steps"]) else o["block_steps"]
        shortest = learn_params_steps(sweeps, D, block, closing) + 1
        # a long run gets blocks of at least AUTO_BLOCK_STEPS steps (many domains: longer rounds)
        round_steps = max(
            int(paper["round_steps"]),
            learn_params_steps(sweeps, D, max(block, AUTO_BLOCK_STEPS), closing) + 1,
        )
        if total_steps is not None:
            if total_steps - o["prior_steps"] < shortest and auto_prior:
                # too short for one round after a quarter of the run: a shorter uniform phase
                o["prior_steps"] = max(int(warmup_steps), total_steps - shortest)
                if total_steps - o["prior_steps"] < shortest:  # no round fits: uniform throughout
                    o["prior_steps"] = total_steps
            round_steps = min(round_steps, max(1, (total_steps - o["prior_steps"]) // AUTO_ROUNDS))
        o["round_steps"] = max(round_steps, shortest)
    if total_steps is not None and auto_prior and total_steps > o["prior_steps"] + o["round_steps"]:
        # whole rounds: what they leave over lengthens the uniform phase, so the run ends on p
        o["prior_steps"] += (total_steps - o["prior_steps"]) % o["round_steps"]
    if _auto(o["block_steps"]):
        # the longest blocks that leave the closing measurement and one learned step in the round
        fit = max(1, (o["round_steps"] - 1 - closing) // max(1, learn_params_steps(sweeps, D, 1)))
        o["block_steps"] = fit if partial else min(int(paper["block_steps"]), fit)
    if o["block_order"] == "auto":
        o["block_order"] = "mirrored" if partial and sweeps and sweeps % 2 == 0 else "random"
    return o


def schedule_of(options: dict[str, Any], num_domains: int) -> AioliSchedule:
    """The :class:`AioliSchedule` of options resolved by :func:`resolve_options`."""
    measure_steps = int(options["measure_steps"])
    return AioliSchedule(
        num_domains=num_domains,
        round_steps=int(options["round_steps"]),
        sweeps=int(options["sweeps"]),
        block_steps=int(options["block_steps"]),
        uniform_steps=int(options["prior_steps"]),
        measure_steps=measure_steps,
        learn_fraction=float(options["learn_fraction"]),
        closing_steps=measure_steps if options["measurement"] == "train" else 0,
    )


@register_mixer("aioli")
class AioliMixer(Mixer):
    """Aioli (Chen et al., ICLR 2025). Unset options take the paper's settings for the nearest domain count
    (:func:`paper_setting`); the schedule sizes default to ``auto`` (docs/mixing.md). The resolved round
    structure is :attr:`plan` (an :class:`AioliSchedule`)."""

    OPTIONS = {
        "eta": None,
        "round_steps": "auto",
        "sweeps": "auto",
        "block_steps": "auto",
        "one_hot_factor": None,
        "learn_fraction": DEFAULT_LEARN_FRACTION,
        "block_order": "auto",
        "max_learn_share": DEFAULT_MAX_LEARN_SHARE,
        "update": "auto",
        "ema": None,
        "diagonal": False,
        "measurement": "round",
        "significance": GATED_SIGNIFICANCE,
        "max_change": GATED_MAX_CHANGE,
        "memory": GATED_MEMORY,
        "lowest_share": GATED_LOWEST_SHARE,
        "useful": GATED_USEFUL,
        "measure_steps": 1,
        "prior_steps": "auto",
        "min_proportion": 0.0,
        "block_counts": "exact",
        "measure_budget": None,
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
        "measure_budget": float,
        "significance": float,
        "max_change": float,
        "memory": float,
        "lowest_share": float,
        "useful": float,
    }
    STATE = {
        "proportions": "_p_D",
        "A_bar": "_A_bar_DD",
        "has_A_bar": "_has_A_bar",
        "losses": "_L_nD",
        "window": "_window",
        "window_end": "_pending",
        "round_done": "_round_done",
        "skipped_updates": "skipped_updates",
        "missing_measurements": "missing_measurements",
        "last_A": "last_A_DD",
        "fit": "_fit_F",
        "fit_observations": "_fit_obs",
        "fit_squared": "_fit_F2",
        "fit_exposure": "_fit_X",
        "fit_step": "_fit_step",
    }
    #: the open train-mode measurement and the round fit's sums (the probe's sums are reduced at once)
    RANK_SUMS = ("window", "fit", "fit_observations", "fit_squared")

    def __init__(self, domains, device="cpu", proportions=None, **options: Any):
        super().__init__(domains, device=device, proportions=proportions, **options)
        o = self.options = resolve_options(
            self.options, len(self.domains), self.total_steps, self.warmup_steps
        )
        D = self.num_domains
        self.eta, self.one_hot_factor = float(o["eta"]), float(o["one_hot_factor"])
        self.measurement = o["measurement"]
        self.use_ema, self.ema = o["update"] == "ema", float(o["ema"])
        self.diagonal, self.min_proportion = bool(o["diagonal"]), float(o["min_proportion"])
        self.seed = int(o["seed"])
        # LearnParams block batches with exact per-domain counts, as the reference code draws them
        self.exact_schedule = o["block_counts"] == "exact"
        self._check_options()
        #: the round structure of this run
        self.plan = plan = schedule_of(o, D)
        self._check_plan()
        f = self.one_hot_factor
        self.W_DD = lmo.smoothed_one_hot(D, f, device=self.device)
        self.W_inv_DD = lmo.smoothed_one_hot_inverse(D, f, device=self.device)
        # one tensor per mixture, so that proportions() returns the same object within a block
        self._rows = [self.W_DD[j].clone() for j in range(D)]
        self._host_rows = [[f if i == j else (1 - f) / (D - 1) for i in range(D)] for j in range(D)]
        # learn_fraction < 1: a round's block mixtures (1 - e)·p + e·W[j] around that round's p, built once
        # per round (one host read of p); (round, base p [D], device rows, host rows)
        self._partial: tuple[int, torch.Tensor, list[torch.Tensor], list[list[float]] | None] | None = None
        self._orders: dict[int, list[int]] = {}
        self._p_D = lmo.apply_floor(self._proportions_D, self.min_proportion)
        self._A_bar_DD = torch.zeros(D, D, device=self.device)
        self._has_A_bar = torch.zeros((), dtype=torch.bool, device=self.device)
        self._L_nD = torch.full((plan.blocks + 1, D), float("nan"), device=self.device)
        self._window = DomainSums.zeros(D, self.device)  # the open train-mode measurement
        self._pending: int | None = None  # global step at which the open train-mode window ends
        self._round_done = -1  # index of the last round whose update has been applied
        self.skipped_updates = torch.zeros((), dtype=torch.int64, device=self.device)
        self.missing_measurements = torch.zeros((), dtype=torch.int64, device=self.device)
        self.last_A_DD = torch.zeros(D, D, device=self.device)
        # measurement: round: each domain's trend statistics (this rank's share, older batches
        # down-weighted), and the exposure X before step _fit_step (None: before the fit starts)
        self._fit_F = torch.zeros(D, 3, 3, dtype=torch.float64, device=self.device)
        self._fit_F2 = torch.zeros(D, 3, 3, dtype=torch.float64, device=self.device)  # weights squared
        self._fit_obs = torch.zeros(D, dtype=torch.float64, device=self.device)
        self._fit_X = torch.zeros(D, dtype=torch.float64, device=self.device)
        self._fit_step: int | None = None
        self._rounds: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def _check_options(self) -> None:
        """The options that do not depend on the round structure."""
        D, o = self.num_domains, self.options
        if D < 2:
            raise ConfigError("mixing.method 'aioli' needs at least 2 domains")
        lmo.check_one_hot_factor(self.one_hot_factor, D)
        bad = [
            ("eta", self.eta, self.eta >= 0, ">= 0"),
            ("round_steps", o["round_steps"], o["round_steps"] >= 1, ">= 1"),
            (
                "sweeps",
                o["sweeps"],
                o["sweeps"] == 0 if self.measurement == "round" else o["sweeps"] >= 1,
                "0 with mixing.measurement=round (its fit uses no block mixtures)"
                if self.measurement == "round"
                else ">= 1",
            ),
            ("block_steps", o["block_steps"], o["block_steps"] >= 1, ">= 1"),
            (
                "measure_steps",
                o["measure_steps"],
                1 <= o["measure_steps"] <= o["block_steps"],
                f"in [1, block_steps={o['block_steps']}]",
            ),
            ("prior_steps", o["prior_steps"], o["prior_steps"] >= 0, ">= 0"),
            ("ema", self.ema, 0 <= self.ema <= 1, "in [0, 1]"),
            (
                "measure_budget",
                o["measure_budget"],
                o["measure_budget"] is None or 0 < o["measure_budget"] <= 1,
                "in (0, 1] (a share of the training compute) or unset",
            ),
            (
                "min_proportion",
                self.min_proportion,
                0 <= self.min_proportion * D <= 1,
                f"in [0, 1/k = {1 / D:.4g}]",
            ),
        ]
        bad += [  # update: gated and measurement: round
            ("significance", o["significance"], o["significance"] >= 0, ">= 0"),
            ("max_change", o["max_change"], o["max_change"] > 1, "> 1"),
            ("memory", o["memory"], 0 < o["memory"] <= 1, "in (0, 1]"),
            ("lowest_share", o["lowest_share"], 0 <= o["lowest_share"] <= 1, "in [0, 1]"),
            ("useful", o["useful"], 0 < o["useful"] <= 1, "in (0, 1]"),
        ]
        for key, value, ok, rule in bad:
            if not ok:
                raise ConfigError(f"mixing.{key} must be {rule}, got {value}")
        e = float(o["learn_fraction"])
        if not 0 < e <= 1:
            raise ConfigError(f"mixing.learn_fraction must be in (0, 1], got {e}")
        if e < 1 and self.diagonal:
            raise ConfigError("mixing.diagonal (the paper's ablation) needs mixing.learn_fraction=1")
        cap = float(o["max_learn_share"])
        if not 0 < cap <= 1:
            raise ConfigError(f"mixing.max_learn_share must be in (0, 1], got {cap}")
        if o["block_order"] not in ("random", "mirrored"):
            raise ConfigError(
                f"mixing.block_order must be 'random', 'mirrored' or 'auto', got {o['block_order']!r}"
            )
        if o["block_order"] == "mirrored" and o["sweeps"] % 2:
            raise ConfigError(f"mixing.block_order 'mirrored' needs an even mixing.sweeps, got {o['sweeps']}")
        if o["block_counts"] not in ("exact", "drawn"):
            raise ConfigError(f"mixing.block_counts must be 'exact' or 'drawn', got {o['block_counts']!r}")
        if o["update"] not in ("ema", "cumulative", "gated"):
            raise ConfigError(
                f"mixing.update must be 'ema', 'cumulative', 'gated' or 'auto', got {o['update']!r}"
            )
        check_measurement(self.measurement, AIOLI_MEASUREMENTS)
        if (o["update"] == "gated") != (self.measurement == "round"):
            raise ConfigError(
                "mixing.update 'gated' and mixing.measurement 'round' go together (the gate needs the "
                f"regression's standard errors); got update {o['update']!r} with measurement "
                f"{self.measurement!r}. Leave mixing.update unset (auto) to take the matching one"
            )

    def _check_plan(self) -> None:
        """A round must fit LearnParams and a learned step; LearnParams must stay within its share."""
        plan, D, cap = self.plan, self.num_domains, float(self.options["max_learn_share"])
        need = plan.learned_offset + 1  # at least one step of a round trains on the learned proportions
        if plan.round_steps < need:
            raise ConfigError(
                f"mixing.round_steps={plan.round_steps} leaves no steps to train on the learned proportions: "
                "LearnParams "
                f"takes sweeps x domains x block_steps = {plan.sweeps} x {D} x {plan.block_steps} = "
                f"{plan.learn_steps} steps"
                + (f" plus measure_steps={plan.measure_steps}" if plan.closing_steps else "")
                + f"; use round_steps >= {need}"
            )
        share = plan.learn_share(self.total_steps)
        if share > cap + 1e-9:
            over = (
                f"the run's {self.total_steps} steps"
                if self.total_steps
                else f"each round of {plan.round_steps} steps"
            )
            raise ConfigError(
                f"mixing: LearnParams would train {100 * share:.0f}% of {over} on block mixtures "
                "(sweeps x domains x block_steps x learn_fraction = "
                f"{plan.sweeps} x {D} x {plan.block_steps} x {plan.learn_fraction:g} per round of "
                f"{plan.round_steps}), above "
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

    def in_learn_params(self, step: int) -> bool:
        """Whether ``step`` belongs to LearnParams (a block mixture, or the closing train measurement)."""
        return self.plan.in_learn_params(step)

    def learn_share(self, total_steps: int | None) -> float:
        """The share of the training sequences on block mixtures (:meth:`AioliSchedule.learn_share`)."""
        return self.plan.learn_share(total_steps)

    def exploit_spans(self, total_steps: int) -> list[tuple[int, int]]:
        """(first, last) step trained on each round's learned proportions, for a run of ``total_steps``."""
        return self.plan.exploit_spans(total_steps)

    def measurement_cost(self, total_steps: int, batch_sequences: int, probe_sequences: int) -> float | None:
        """The compute the loss measurements add to a run of ``total_steps`` steps of ``batch_sequences``
        (the global batch), as a fraction of its training compute (a training step costs about three
        forwards of its batch: forward, and a backward of about two):

            probe     measurements x D x probe_sequences / (3 x batch_sequences x total_steps)
            train     0 (the training batches' own per-domain losses)
            round     0 (the same, every batch of the round)
            full_val  None (the validation split's size decides; every measurement reads all of it)
        """
        if self.measurement in ("train", "round"):
            return 0.0
        if self.measurement != "probe" or total_steps < 1 or batch_sequences < 1:
            return None
        forwards = self.plan.measurements_in(total_steps) * self.num_domains * probe_sequences
        return forwards / (3 * batch_sequences * total_steps)

    def probe_size(self, total_steps: int, batch_sequences: int, probe_sequences: int) -> int:
        """The probe sequences per domain a run measures with: ``probe_sequences``, or with
        ``measure_budget`` set and probe measurements the most that keep :meth:`measurement_cost` within
        the budget (at most ``probe_sequences``). A budget that cannot pay for one sequence per domain
        per measurement is a ConfigError with the numbers."""
        budget = self.options["measure_budget"]
        if budget is None or self.measurement != "probe" or total_steps < 1:
            return probe_sequences
        n = self.plan.measurements_in(total_steps)
        if n == 0:
            return probe_sequences
        affordable = int(budget * 3 * batch_sequences * total_steps // (n * self.num_domains))
        if affordable < 1:
            one = self.measurement_cost(total_steps, batch_sequences, 1)
            raise ConfigError(
                f"mixing.measure_budget={budget:g}: the run's {n} probe measurements cost {percent(one)} of "
                f"its training compute with one sequence per domain ({self.num_domains} domains, a global "
                f"batch of {batch_sequences}, {total_steps} steps); raise the budget, use "
                "mixing.measurement=round (the default: no extra compute), or a larger batch"
            )
        return min(probe_sequences, affordable)

    def describe(
        self, total_steps: int, batch_sequences: int | None = None, probe_sequences: int | None = None
    ) -> str | None:
        """The schedule in numbers: rounds, LearnParams length and its share of the run's steps; with
        the global batch and the probe size, what the measurements cost (:meth:`measurement_cost`)."""
        plan, D = self.plan, self.num_domains
        learn = plan.learn_steps_in(total_steps)
        extra = f" + {plan.closing_steps} measurement step(s)" if plan.closing_steps else ""
        start_mixture = "prior" if self.has_prior else "uniform mixture"
        prior = f"after {plan.uniform_steps} step(s) on the {start_mixture}, "
        fraction = (
            ""
            if plan.learn_fraction == 1
            else f" on {plan.learn_fraction:g} of each batch ({self.options['block_order']} sweeps)"
        )
        short = ""
        if not plan.exploit_spans(total_steps):
            short = (
                f"; warning: the run is too short to apply a round's proportions: it trains on the "
                f"{start_mixture} throughout"
            )
            if learn:  # LearnParams starts but its round never ends
                short = (
                    f"; warning: the run is too short to apply a round's proportions: it ends inside "
                    f"LearnParams, on block mixtures, before any update (a round takes {plan.round_steps} "
                    "steps): lower mixing.round_steps or train longer"
                )
        if self.measurement == "round":
            o = self.options
            return (
                f"aioli: {prior if plan.uniform_steps else ''}{plan.rounds_in(total_steps)} round(s) of "
                f"{plan.round_steps} steps; at the start of each, every domain's training loss is fitted "
                f"against its exposure (each round older weighted {o['memory']:g}) and a domain whose loss "
                f"falls by significantly less ({o['significance']:g} standard errors) than {o['useful']:g} "
                f"of the average domain's is lowered (eta {self.eta:g}), at most {o['max_change']:g}x per "
                f"round and to no less than {o['lowest_share']:g} of 1/{D}"
                f"{self._cost_clause(total_steps, batch_sequences, probe_sequences)}{short}"
            )
        return (
            f"aioli: {prior if plan.uniform_steps else ''}{plan.rounds_in(total_steps)} round(s) of "
            f"{plan.round_steps} steps, each starting with LearnParams ({plan.sweeps} sweep(s) x {D} domains "
            f"x {plan.block_steps} steps{extra}){fraction}; eta {self.eta:g}, one_hot_factor "
            f"{self.one_hot_factor:g}; LearnParams takes {learn} of the run's {total_steps} steps, "
            f"{100 * plan.learn_share(total_steps):.0f}% of its sequences"
            f"{self._cost_clause(total_steps, batch_sequences, probe_sequences)}{short}"
        )

    def _cost_clause(self, total_steps: int, batch_sequences: int | None, probe_sequences: int | None) -> str:
        if self.measurement == "train":
            return "; measurements from the training batches' losses: no extra compute"
        if self.measurement == "round":
            return "; measurements from every training batch's per-domain losses: no extra compute (0%)"
        if self.measurement == "full_val":
            n = self.plan.measurements_in(total_steps)
            return f"; {n} measurement(s) on the whole validation split"
        if batch_sequences is None or probe_sequences is None:
            return ""
        n = self.plan.measurements_in(total_steps)
        cost = self.measurement_cost(total_steps, batch_sequences, probe_sequences)
        budget = self.options["measure_budget"]
        within = "" if budget is None else f" (mixing.measure_budget {percent(budget)})"
        return (
            f"; {n} probe measurement(s) of {self.num_domains} x {probe_sequences} sequences: "
            f"{percent(cost)} of the training compute{within}"
        )

    def final_proportions(self, total_steps: int) -> tuple[list[float], str | None]:
        """The learned proportions, never a LearnParams block mixture: a run that ends inside
        LearnParams reports those learned last (uniform before the first round), with a note."""
        last = total_steps - 1
        if not self.plan.in_learn_params(last):
            return self.host_proportions(last), None
        learned = [float(p) for p in self._p_D.tolist()]
        return learned, (
            f"the run ended inside LearnParams (step {last + 1} of {total_steps} trained on a block "
            "mixture); the proportions reported are the last learned ones. Make train.steps end in a "
            "round's exploit phase (see mixing.round_steps) to train on learned proportions to the end"
        )

    def order(self, round_index: int) -> list[int]:
        """Domain of each LearnParams block of round ``round_index`` (the sweeps' permutations, drawn on
        the host)."""
        if round_index not in self._orders:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + round_index)
            draw = lmo.mirrored_order if self.options["block_order"] == "mirrored" else lmo.learn_params_order
            self._orders = {round_index: draw(self.num_domains, self.plan.sweeps, gen).tolist()}
        return self._orders[round_index]

    def _block_mixture(self, step: int) -> int | None:
        """The domain whose smoothed one-hot mixture ``step`` trains on, or None outside LearnParams."""
        at = self.plan.block_at(step)
        return None if at is None else self.order(at[0])[at[1]]

    # ---- the loop interface -------------------------------------------------------------------------

    def _block_rows(
        self, step: int, host: bool = False
    ) -> tuple[list[torch.Tensor], list[list[float]] | None]:
        """The block mixtures of ``step``'s round, on the device and (``host``) as floats: W's rows, or
        (1 - e)·p + e·W[j] around the round's p (its update comes after its last block)."""
        e = self.plan.learn_fraction
        if e == 1:
            return self._rows, self._host_rows
        round_index = self.plan.locate(step)[0]
        if self._partial is None or self._partial[0] != round_index:
            base_D = self._p_D
            rows = [(1 - e) * base_D + e * self.W_DD[j] for j in range(self.num_domains)]
            self._partial = (round_index, base_D, rows, None)
        if host and self._partial[3] is None:
            # the one host read of a round's proportions (the data stream needs them anyway)
            p = self._partial[1].tolist()
            rows_host = [[(1 - e) * a + e * w for a, w in zip(p, row)] for row in self._host_rows]
            self._partial = (*self._partial[:3], rows_host)
        return self._partial[2], self._partial[3]

    def proportions(self, step: int) -> torch.Tensor:
        self._finish_window(step)
        self._finish_fit(step)
        j = self._block_mixture(step)
        return self._block_rows(step)[0][j] if j is not None else self._p_D

    def host_values(self, step: int) -> list[float] | None:
        j = self._block_mixture(step)
        return list(self._block_rows(step, host=True)[1][j]) if j is not None else None

    def schedule(self, step: int) -> list[list[float]] | None:
        """At the first step of a round's LearnParams: the block mixture of each of its steps."""
        where = self.plan.locate(step)
        if where is None or where[1] != 0 or not self.plan.learn_steps:
            return None
        per_step = lmo.learn_params_schedule(torch.tensor(self.order(where[0])), self.plan.block_steps)
        host_rows = self._block_rows(step, host=True)[1]
        return [list(host_rows[j]) for j in per_step.tolist()]

    def measurement_due(self, step: int) -> bool:
        return self.measurement in ("probe", "full_val") and self.plan.boundary(step) is not None

    def observe_measurement(self, step: int, loss_sum_D: torch.Tensor, count_D: torch.Tensor) -> None:
        if self.measurement in ("train", "round"):
            raise ConfigError(
                f"mixing.measurement is {self.measurement!r}: losses come from observe(), not measurements"
            )
        at = self.plan.boundary(step)
        if at is None:
            raise ConfigError(f"no loss measurement is due at step {step}")
        self._record(at, self.reduce(loss_sum_D, count_D))

    def observe(self, step: int, loss_sum_D: torch.Tensor, count_D: torch.Tensor) -> None:
        if self.measurement == "round":
            self._observe_fit(step, loss_sum_D, count_D)
            return
        if self.measurement != "train":
            return
        self._finish_window(step)
        plan = self.plan
        where = plan.locate(step)
        if where is None:
            return
        n, into = divmod(where[1], plan.block_steps)
        if n > plan.blocks or into >= plan.measure_steps:
            return
        self._window.add(loss_sum_D, count_D)
        self._pending = step - into + plan.measure_steps

    # ---- internals ----------------------------------------------------------------------------------

    def _finish_window(self, step: int) -> None:
        """Close the open train-mode measurement window once ``step`` is past it."""
        if self._pending is None or step < self._pending:
            return
        start = self._pending - self.plan.measure_steps
        self._pending = None
        measured = self._window.reduced()
        self._window.zero_()
        at = self.plan.boundary(start)
        if at is not None:
            self._record(at, measured)

    # ---- measurement: round ------------------------------------------------------------------------

    def fit_end(self, round_index: int) -> int:
        """The step from which round ``round_index``'s update applies (measurement: round): its start.
        The fit holds every training batch before it from :meth:`fit_start` on, each batch weighted
        by ``memory`` per round of age."""
        return self.plan.uniform_steps + round_index * self.plan.round_steps

    def fit_start(self) -> int:
        """The first step whose training batch enters the fit: a round before the first update, but not
        in the first half of the uniform phase or the learning-rate warm-up (where every domain's loss,
        a useless one's included, falls fast). An update whose fit holds less than a round of steps
        (the first, when the uniform phase is short) moves nothing."""
        first = self.fit_end(0)
        return min(first, max(first - self.plan.round_steps, first // 2, self.warmup_steps))

    def _advance_fit(self, step: int) -> None:
        """The exposure before ``step``: each step since the last observed one trained on p (the update
        that changes p runs at a round's first step, after this), and older batches weigh less."""
        if self._fit_step is None:
            if step < self.fit_start():
                return
            self._fit_step = self.fit_start()
        decay = float(self.options["memory"]) ** (1 / self.plan.round_steps)
        while self._fit_step < step:
            self._fit_X += self._p_D.to(self._fit_X.dtype)
            self._fit_F *= decay
            self._fit_F2 *= decay * decay
            self._fit_obs *= decay
            self._fit_step += 1

    def _observe_fit(self, step: int, loss_sum_D: torch.Tensor, count_D: torch.Tensor) -> None:
        self._finish_fit(step)
        if step < self.fit_start():
            return
        self._advance_fit(step)
        term = lmo.trend_increment(self._fit_X, loss_sum_D.detach(), count_D, self._fit_F.dtype)
        self._fit_F += term  # the same observation in both: F2 only decays faster
        self._fit_F2 += term
        self._fit_obs += (count_D > 0).to(self._fit_obs.dtype)

    def _finish_fit(self, step: int) -> None:
        """Apply the next round's update once ``step`` reaches it (every rank: one all-reduce)."""
        if self.measurement != "round":
            return
        r = self._round_done + 1
        if step < self.fit_end(r):
            return
        self._advance_fit(self.fit_end(r))  # the steps before the update trained on the old p
        if self.fit_end(r) - self.fit_start() < self.plan.round_steps:
            # less than a round of batches: the first trends are too short to act on; nothing moves
            self._round_done = r
            return
        n = self._fit_F.numel()
        stats = all_reduce_sum(torch.cat([self._fit_F.flatten(), self._fit_F2.flatten(), self._fit_obs]))
        F, F2, obs = stats[:n].view_as(self._fit_F), stats[n : 2 * n].view_as(self._fit_F), stats[2 * n :]
        gain_D, var_D = lmo.fit_trends(F, obs, F2)
        self.missing_measurements += (obs < 3).sum()
        gain_D, var_D = gain_D.float(), var_D.float()
        ok = torch.isfinite(gain_D).all() & torch.isfinite(var_D).all()
        o = self.options
        p_new = lmo.gated_update(
            self._p_D,
            gain_D,
            var_D,
            self.eta,
            float(o["significance"]),
            float(o["max_change"]),
            float(o["lowest_share"]) / self.num_domains,
            float(o["useful"]),
        )
        self._apply(r, p_new, torch.diag_embed(gain_D), ok)

    def _record(self, at: tuple[int, int], measured: DomainSums) -> None:
        round_index, n = at
        if round_index <= self._round_done:
            return  # already applied (a resumed run replaying a step)
        if n == 0:
            self._L_nD.fill_(float("nan"))
        L_D = measured.losses()
        self.missing_measurements += (~torch.isfinite(L_D)).sum()
        self._L_nD[n] = L_D
        if n == self.plan.blocks:
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
        m, e, f = self.plan.measure_steps, self.plan.learn_fraction, self.one_hot_factor
        expected = batch_size * m * ((1 - e) / D + e * (1 - f) / (D - 1))
        if expected >= 2:
            return None
        return (
            f"mixing.measurement=train: a measurement sees about {expected:.2f} sequences of each "
            f"domain other than the block's (batch {batch_size} x measure_steps {m} x the block "
            "mixture's share of it); many measurements will miss domains. Raise "
            "mixing.measure_steps or the batch size, or use mixing.measurement=probe"
        )

    def _update(self, round_index: int) -> None:
        order = self._order_tensor(round_index)
        G_DD = lmo.accumulate_loss_drops(self._L_nD, order, self.num_domains)
        e = self.plan.learn_fraction
        if e < 1:
            # the blocks were built around the round's p (built at its first block; never None here,
            # since the blocks run before the update, a resumed run rebuilds them from the same p)
            base_D = self._partial[1] if self._partial and self._partial[0] == round_index else self._p_D
            A_DD = lmo.solve_partial_mixing_law(G_DD, self.W_inv_DD, base_D, e)
        elif self.diagonal:
            A_DD = lmo.diagonal_ablation(G_DD, self.one_hot_factor)
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
        self._apply(round_index, p_new, A_DD, ok)

    def _apply(self, round_index: int, p_new: torch.Tensor, A_DD: torch.Tensor, ok: torch.Tensor) -> None:
        """New proportions (floored) and the round's A, where ``ok`` (a device bool: no host read)."""
        p_new = lmo.apply_floor(p_new, self.min_proportion)
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
