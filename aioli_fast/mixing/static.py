"""Fixed mixtures: ``stratified`` (uniform over domains) and ``static`` (given proportions)."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .base import Mixer, register_mixer


@register_mixer("stratified")
class StratifiedMixer(Mixer):
    """Every domain equally often: p_i = 1/D for the whole run."""


@register_mixer("static")
class StaticMixer(Mixer):
    """Proportions given in the config (``mixing.proportions``: domain -> weight, normalised)."""

    def initial_proportions(self, proportions: dict[str, float] | None) -> torch.Tensor:
        if not proportions:
            raise ConfigError("mixing.method 'static' needs mixing.proportions (domain -> weight)")
        return proportions_tensor(proportions, self.domains, self.device)


def proportions_tensor(
    proportions: dict[str, float], domains: list[str], device: torch.device
) -> torch.Tensor:
    """[D] fp32 proportions from a mapping domain -> weight covering every domain, normalised."""
    unknown = sorted(set(proportions) - set(domains))
    if unknown:
        raise ConfigError(f"mixing.proportions names unknown domain(s) {unknown}; domains: {domains}")
    missing = [d for d in domains if d not in proportions]
    if missing:
        raise ConfigError(f"mixing.proportions gives no weight for domain(s) {missing}")
    weights = [proportions[d] for d in domains]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"mixing.proportions must be finite, >= 0 and not all 0; got {proportions}")
    p = torch.tensor(weights, dtype=torch.float64)
    return (p / p.sum()).to(device, torch.float32)
