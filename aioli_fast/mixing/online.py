"""The shared machinery of the step-interval online mixers (DoReMi, DoGE, Skill-it, ODM).

Each collects the per-domain loss sums and counts of every micro-batch into a window on the device;
at the start of every ``update_every``-th step it all-reduces the window (one collective) and hands the
per-domain mean losses to :meth:`OnlineMixer.update`, which returns the new proportions. A domain with no
tokens in the window has loss NaN; ``update`` must treat it explicitly. A non-finite update is skipped
(the proportions stay) and counted in ``skipped_updates``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from . import lmo
from .base import Mixer
from .sums import DomainSums


class OnlineMixer(Mixer):
    OPTIONS = {"eta": 1.0, "update_every": 1, "min_proportion": 0.0}
    STATE = {
        "proportions": "_proportions_D",
        "window": "_window",
        "window_open": "_window_open",
        "last_update": "_last_update",
        "num_updates": "num_updates",
        "skipped_updates": "skipped_updates",
    }
    RANK_SUMS = ("window",)

    def __init__(self, domains, device="cpu", proportions=None, **options: Any):
        super().__init__(domains, device=device, proportions=proportions, **options)
        o = self.options
        self.eta, self.every, self.floor = (
            float(o.get("eta", 0.0)),
            int(o["update_every"]),
            float(o["min_proportion"]),
        )
        if self.eta < 0:
            raise ConfigError(f"mixing.eta must be >= 0, got {self.eta}")
        if self.every < 1:
            raise ConfigError(f"mixing.update_every must be >= 1, got {self.every}")
        if not 0 <= self.floor * self.num_domains <= 1:
            raise ConfigError(f"mixing.min_proportion must be in [0, 1/k], got {self.floor}")
        self._window = DomainSums.zeros(self.num_domains, self.device)
        self._window_open = False
        self._last_update = -1
        self.num_updates = 0  # host counter: a function of the step schedule, never read from the device
        self.skipped_updates = torch.zeros((), dtype=torch.int64, device=self.device)

    def observe(self, step: int, loss_sum_D: torch.Tensor, count_D: torch.Tensor) -> None:
        self._window.add(loss_sum_D, count_D)
        self._window_open = True

    def update_due(self, step: int) -> bool:
        return step > 0 and step % self.every == 0 and step != self._last_update

    def proportions(self, step: int) -> torch.Tensor:
        if self.update_due(step) and self._window_open:
            self._last_update = step
            window = self._window.reduced()
            self._window.zero_()
            self._window_open = False
            self._apply(self.update(step, window.losses()))
        return self._proportions_D

    def _apply(self, p_new: torch.Tensor) -> None:
        p_new = lmo.apply_floor(p_new, self.floor)
        ok = torch.isfinite(p_new).all()
        self._proportions_D = torch.where(ok, p_new, self._proportions_D)
        self.num_updates += 1
        self.skipped_updates += (~ok).to(torch.int64)

    def update(self, step: int, loss_D: torch.Tensor) -> torch.Tensor:
        """New proportions [D] from the window's per-domain mean losses (NaN: domain absent)."""
        raise NotImplementedError

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"skipped_updates": self.skipped_updates}
