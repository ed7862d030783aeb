"""Skill-it, online (Chen et al., 2023): weight domains by how much training on them helps the others' loss.

A skills graph S [D, D] (S[i, j]: how much training on skill j helps skill i) is given; at each update
``A = diag(L) · S`` (row i scaled by domain i's current loss, so unlearned skills pull harder) and
``p ← p ⊙ exp(η · Σ_i A[i, :])``, normalised. Losses come from the training batches of the window
(``measurement: train``) or from a probe / the full validation split before the update step.

The graph comes from ``mixing.skills_graph`` (JSON: a D×D list of lists in domain order, or a mapping
``{domain_i: {domain_j: weight}}`` where a missing entry is 0), or is learned from short single-domain runs
with :func:`skills_graph_from_losses`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import ConfigError
from . import lmo
from .base import check_measurement, read_json_option, register_mixer
from .online import OnlineMixer
from .sums import DomainSums


def skills_graph_from_losses(before_D: torch.Tensor, after_jD: torch.Tensor) -> torch.Tensor:
    """S [D, D] from short single-domain runs: S[i, j] = relative drop of domain i's loss after training on j.

    Args:
        before_D: per-domain validation losses of the starting model.
        after_jD: row j: per-domain validation losses after a short run on domain j alone.

    Returns:
        S with S[i, j] = max(0, (before_i - after_{j,i}) / before_i), normalised so that each column sums
        to at most 1 relative to the largest column (the scale is absorbed by η).
    """
    drop_ij = ((before_D.unsqueeze(0) - after_jD) / before_D.unsqueeze(0)).clamp_min(0).T
    top = drop_ij.sum(dim=0).max()
    return torch.where(top > 0, drop_ij / top.clamp_min(torch.finfo(drop_ij.dtype).tiny), drop_ij)


def load_skills_graph(path: str | Path, domains: list[str]) -> list[list[float]]:
    """The D×D graph from a JSON file (see the module docstring), validated."""
    path, D = Path(path), len(domains)
    data = read_json_option("skills_graph", path)
    if isinstance(data, dict):
        unknown = sorted(set(data) | {j for row in data.values() if isinstance(row, dict) for j in row})
        unknown = [d for d in unknown if d not in domains]
        if unknown or not all(isinstance(row, dict) for row in data.values()):
            raise ConfigError(
                f"mixing.skills_graph: {path} names unknown domain(s) {unknown} or has a non-mapping row"
            )
        rows = [[data.get(i, {}).get(j, 0.0) for j in domains] for i in domains]
    elif isinstance(data, list) and len(data) == D and all(isinstance(r, list) and len(r) == D for r in data):
        rows = data
    else:
        raise ConfigError(
            f"mixing.skills_graph: {path} must be a {D}x{D} list of lists or a mapping of mappings"
        )
    flat = [v for row in rows for v in row]
    if not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in flat
    ):
        raise ConfigError(f"mixing.skills_graph: {path} must hold finite non-negative numbers")
    return [[float(v) for v in row] for row in rows]


@register_mixer("skillit")
class SkillItMixer(OnlineMixer):
    """Online Skill-it with a fixed skills graph."""

    OPTIONS = {
        "eta": 0.5,
        "update_every": 50,
        "min_proportion": 0.0,
        "skills_graph": None,
        "measurement": "train",
    }
    STATE = {**OnlineMixer.STATE, "measured": "_measured", "has_measured": "_has_measured"}

    def __init__(self, domains, device="cpu", proportions=None, **options):
        super().__init__(domains, device=device, proportions=proportions, **options)
        if not self.options["skills_graph"]:
            raise ConfigError(
                "mixing.method 'skillit' needs mixing.skills_graph (a JSON file; docs/mixing.md)"
            )
        self.S_DD = torch.tensor(
            load_skills_graph(self.options["skills_graph"], self.domains), device=self.device
        )
        self.measurement = check_measurement(self.options["measurement"])
        self._measured = DomainSums.zeros(self.num_domains, self.device)
        self._has_measured = False

    def measurement_due(self, step: int) -> bool:
        return self.measurement != "train" and self.update_due(step)

    def observe_measurement(self, step: int, loss_sum_D: torch.Tensor, count_D: torch.Tensor) -> None:
        if not self.measurement_due(step):
            raise ConfigError(f"no loss measurement is due at step {step}")
        self._measured = self.reduce(loss_sum_D, count_D)
        self._has_measured = True
        self._window_open = True  # an update is due now even without training observations

    def observe(self, step: int, loss_sum_D: torch.Tensor, count_D: torch.Tensor) -> None:
        if self.measurement == "train":
            super().observe(step, loss_sum_D, count_D)

    def update(self, step: int, loss_D: torch.Tensor) -> torch.Tensor:
        if self.measurement != "train":
            loss_D = self._measured.losses()
        loss_D = torch.where(torch.isfinite(loss_D), loss_D, torch.zeros_like(loss_D))  # absent: no pull
        A_DD = loss_D.unsqueeze(-1) * self.S_DD
        return lmo.exponentiated_gradient(self._proportions_D, A_DD, self.eta)
