"""The mixer interface and its registry.

A mixer owns the mixture proportions of a run. All state lives in tensors on the training device;
the data stream reads the proportions for each step, and the loop hands the mixer the per-domain loss
sums and token counts of every micro-batch through :meth:`Mixer.observe`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence

import torch

from ..errors import ConfigError


class Mixer:
    """Base class: fixed proportions, ``observe`` does nothing.

    Args:
        domains: domain names in domain-id order (D of them).
        device: where the state tensors live.
        proportions: optional mapping domain -> weight (method-specific meaning).
    """

    name = "base"

    def __init__(
        self,
        domains: Sequence[str],
        device: torch.device | str = "cpu",
        proportions: dict[str, float] | None = None,
    ):
        if not domains:
            raise ConfigError("a mixer needs at least one domain")
        self.domains = list(domains)
        self.device = torch.device(device)
        self._proportions_D = self.initial_proportions(proportions)

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    def initial_proportions(self, proportions: dict[str, float] | None) -> torch.Tensor:
        """[D] fp32 proportions at step 0."""
        if proportions is not None:
            raise ConfigError(f"mixing.method '{self.name}' takes no mixing.proportions")
        return torch.full((self.num_domains,), 1.0 / self.num_domains, device=self.device)

    def proportions(self, step: int) -> torch.Tensor:
        """[D] fp32 proportions for the batch of ``step`` (sums to 1), on the mixer's device.

        Contract: return the *same tensor object* for as long as the proportions do not change, and a
        new tensor when they do; never modify a returned tensor in place. The training loop copies the
        proportions to the host (for the data stream) only when it receives a new object, so an
        in-place update would go unseen.
        """
        return self._proportions_D

    def observe(self, step: int, loss_sum_D: torch.Tensor, count_D: torch.Tensor) -> None:
        """Per-domain loss sums [D] and token counts [D] of one micro-batch of ``step``."""

    def state_dict(self) -> dict:
        return {"proportions": self._proportions_D.clone()}

    def load_state_dict(self, state: dict) -> None:
        p = state["proportions"]
        if p.shape != (self.num_domains,):
            raise ConfigError(
                f"mixer state has {p.shape[0]} proportions, this run has {self.num_domains} domains"
            )
        self._proportions_D = p.to(self.device, torch.float32, copy=True)  # never alias the caller's tensor


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


def build_mixer(
    method: str,
    domains: Sequence[str],
    device: torch.device | str = "cpu",
    proportions: dict[str, float] | None = None,
) -> Mixer:
    """Look ``method`` up in the registry and build it."""
    cls = MIXERS.get(method)
    if cls is None:
        near = difflib.get_close_matches(method, list(MIXERS), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"unknown mixing.method '{method}'{hint} (available: {', '.join(sorted(MIXERS))})")
    return cls(domains, device=device, proportions=proportions)
