"""ODM: online data mixing as a multi-armed bandit (EXP3; Albalak et al., 2023).

Each domain is an arm whose reward is its training loss (a high loss means there is still much to learn).
The importance-weighted reward estimate is smoothed, ``R_i ← α·R_i + (1-α)·L_i / π_i`` for the domains
seen in the window, and the policy is ``π = (1 - D·ε_t)·softmax(ε_{t-1}·R) + ε_t`` with the
exploration rate ``ε_t = min(1/D, sqrt(ln D / (D·t)))`` (D domains, t: updates so far). In the LMO view
A_t is diagonal with the smoothed rewards.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .base import register_mixer
from .online import OnlineMixer


def exploration_rate(num_domains: int, t: int) -> float:
    """ε_t = min(1/D, sqrt(ln D / (D·t))); 1/D before the first update."""
    D = num_domains
    if t <= 0 or D < 2:
        return 1.0 / D
    return min(1.0 / D, math.sqrt(math.log(D) / (D * t)))


def exp3_policy(reward_D: torch.Tensor, eps_prev: float, eps: float) -> torch.Tensor:
    """π = (1 - D·ε)·softmax(ε_prev · R) + ε."""
    D = reward_D.shape[-1]
    return (1.0 - D * eps) * torch.softmax(eps_prev * reward_D, dim=-1) + eps


@register_mixer("odm")
class ODMMixer(OnlineMixer):
    """EXP3 on smoothed per-domain training losses; the exploration schedule sets the step (no ``eta``)."""

    OPTIONS = {"update_every": 1, "smoothing": 0.9, "min_proportion": 0.0}
    STATE = {**OnlineMixer.STATE, "reward": "reward_D"}

    def __init__(self, domains, device="cpu", proportions=None, **options):
        super().__init__(domains, device=device, proportions=proportions, **options)
        self.alpha = float(self.options["smoothing"])
        if not 0 <= self.alpha < 1:
            raise ConfigError(f"mixing.smoothing must be in [0, 1), got {self.alpha}")
        self.reward_D = torch.zeros(self.num_domains, device=self.device)

    def update(self, step: int, loss_D: torch.Tensor) -> torch.Tensor:
        seen = torch.isfinite(loss_D)
        estimate = torch.where(seen, loss_D / self._proportions_D.clamp_min(1e-12), self.reward_D)
        smoothed = self.alpha * self.reward_D + (1 - self.alpha) * estimate
        reward_D = torch.where(seen, smoothed, self.reward_D)
        t, D = self.num_updates, self.num_domains  # updates before this one
        policy_D = exp3_policy(reward_D, exploration_rate(D, t), exploration_rate(D, t + 1))
        ok = torch.isfinite(reward_D).all() & torch.isfinite(policy_D).all()
        self.reward_D = torch.where(ok, reward_D, self.reward_D)  # an overflowing window leaves no trace
        return policy_D  # the caller skips (and counts) a non-finite policy
