"""DoReMi, online (Xie et al., 2023): raise the weight of domains whose loss exceeds a reference model's.

At each update the excess loss of domain i is ``λ_i = max(L_i - L_i^ref, 0)`` (0 for a domain absent from
the window); the weights follow exponentiated gradient ``α ← α ⊙ exp(η·λ)``, and the proportions are
``p = (1 - c)·α/Σα + c/D`` (``smoothing`` c). In the LMO view A_t = diag(λ). DoReMi's own output is the
time average of the proportions over the run, kept beside the online proportions (``summary()``).

Reference losses come from ``mixing.reference``:
    a ``.json`` file   {domain: mean token loss} of the reference model (fixed values);
    a checkpoint       (``model.pt`` or a run directory): the loop evaluates the reference model on the same
                       micro-batches and calls :meth:`DoReMiMixer.observe_reference`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import ConfigError
from .base import read_json_option, register_mixer
from .online import OnlineMixer
from .sums import DomainSums


def excess_loss(loss_D: torch.Tensor, reference_D: torch.Tensor) -> torch.Tensor:
    """λ = max(L - L_ref, 0), with 0 where either loss is missing (NaN)."""
    excess = (loss_D - reference_D).clamp_min(0)
    return torch.where(torch.isfinite(excess), excess, torch.zeros_like(excess))


def load_reference_losses(path: str | Path, domains: list[str]) -> list[float]:
    """Per-domain reference losses from a JSON mapping domain -> loss (every domain, finite values)."""
    path = Path(path)
    data = read_json_option("reference", path)
    if not isinstance(data, dict):
        raise ConfigError(f"mixing.reference: {path} must hold a mapping domain -> loss")
    missing = [d for d in domains if d not in data]
    if missing:
        raise ConfigError(f"mixing.reference: {path} has no loss for domain(s) {missing}")
    values = [data[d] for d in domains]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ConfigError(f"mixing.reference: {path} must give a finite number per domain, got {values}")
    return [float(v) for v in values]


@register_mixer("doremi")
class DoReMiMixer(OnlineMixer):
    """Online DoReMi. Defaults from the DoReMi paper: η = 1, smoothing c = 1e-3, an update every step."""

    OPTIONS = {"eta": 1.0, "update_every": 1, "smoothing": 1e-3, "min_proportion": 0.0, "reference": None}
    STATE = {
        **OnlineMixer.STATE,
        "log_weights": "log_alpha_D",
        "reference_window": "_ref_window",
        "proportions_sum": "proportions_sum_D",
        "averaged_updates": "averaged_updates",
    }
    RANK_SUMS = ("window", "reference_window")

    def __init__(self, domains, device="cpu", proportions=None, **options):
        super().__init__(domains, device=device, proportions=proportions, **options)
        self.c = float(self.options["smoothing"])
        if not 0 <= self.c <= 1:
            raise ConfigError(f"mixing.smoothing must be in [0, 1], got {self.c}")
        ref = self.options["reference"]
        if not ref:
            raise ConfigError(
                "mixing.method 'doremi' needs mixing.reference: a .json of per-domain reference losses "
                "or a reference checkpoint (model.pt or its run directory)"
            )
        self.reference_checkpoint: Path | None = None
        self.reference_D: torch.Tensor | None = None
        if str(ref).endswith(".json"):
            values = load_reference_losses(ref, self.domains)
            self.reference_D = torch.tensor(values, device=self.device)
        else:
            self.reference_checkpoint = Path(ref)
            if not (
                self.reference_checkpoint.is_file() or (self.reference_checkpoint / "model.pt").is_file()
            ):
                raise ConfigError(
                    f"mixing.reference: no checkpoint at {ref} (expected model.pt or a run directory)"
                )
        self.log_alpha_D = torch.log(self._proportions_D)
        self._ref_window = DomainSums.zeros(self.num_domains, self.device)
        self.proportions_sum_D = torch.zeros(self.num_domains, device=self.device)
        self.averaged_updates = torch.zeros((), dtype=torch.int64, device=self.device)

    @property
    def needs_reference_model(self) -> bool:
        return self.reference_checkpoint is not None

    def observe_reference(self, step: int, loss_sum_D: torch.Tensor, count_D: torch.Tensor) -> None:
        """The reference model's per-domain sums and counts on the same micro-batch as :meth:`observe`."""
        self._ref_window.add(loss_sum_D, count_D)

    def update(self, step: int, loss_D: torch.Tensor) -> torch.Tensor:
        if self.reference_D is not None:
            reference_D = self.reference_D
        else:
            sums, counts = self._ref_window.reduced()
            self._ref_window.zero_()
            reference_D = sums / counts.clamp_min(1)
            reference_D = torch.where(counts > 0, reference_D, torch.full_like(reference_D, float("nan")))
        lam_D = excess_loss(loss_D, reference_D)
        log_alpha = self.log_alpha_D + self.eta * lam_D
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-1)  # normalised, stays bounded
        p_D = (1 - self.c) * torch.exp(log_alpha) + self.c / self.num_domains
        ok = torch.isfinite(p_D).all()  # an overflowing window leaves no trace (and is counted by the caller)
        self.log_alpha_D = torch.where(ok, log_alpha, self.log_alpha_D)
        self.proportions_sum_D = torch.where(ok, self.proportions_sum_D + p_D, self.proportions_sum_D)
        self.averaged_updates = self.averaged_updates + ok.to(torch.int64)
        return p_D

    def average_proportions(self) -> torch.Tensor:
        """DoReMi's output: the mean of the proportions over the applied updates (the start if none)."""
        n = self.averaged_updates
        return torch.where(n > 0, self.proportions_sum_D / n.clamp_min(1), self._proportions_D)

    def summary(self) -> dict:
        return {"average_proportions": dict(zip(self.domains, self.average_proportions().tolist()))}
