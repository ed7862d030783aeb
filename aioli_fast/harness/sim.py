"""A linear-mixing-law simulator: per-domain losses that follow L_{t+1} = L_t - A_t p_t + noise.

It stands in for a training run when testing or benchmarking a mixer: each step it takes the mixer's
proportions, moves the losses by the planted law, and hands the mixer what a real loop would —
training-batch per-domain sums and counts (``train`` measurements) or a noisy evaluation of the current
losses (``probe`` / ``full_val``). ``A_t`` drifts: it decays as ``A_0 · decay^t`` (diminishing returns)
plus an optional random walk, so a mixer must keep re-estimating it.

Example::

    sim = LinearLawSimulator.random(num_domains=3, seed=0)
    mixer = build_mixer("aioli", ["a", "b", "c"], measurement="train", round_steps=100)
    history = run_mixer(mixer, sim, steps=1000)
    history["loss"][-1]   # average loss at the end
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..driver import MixingDriver
from ..mixing import Mixer


@dataclass
class LinearLawSimulator:
    """Planted dynamics. All tensors fp64 on the CPU.

    Args:
        A_kk: A_0, the effect of one step on each mixture component (row i: domain i's loss drop per unit
            of domain j).
        L_k: starting losses.
        noise: std of the per-step noise on the losses (the training process).
        measure_noise: std of a measurement of a domain's loss from one token-weighted unit; a measurement
            over ``n`` tokens of a domain has std ``measure_noise / sqrt(n)``. One value for every domain,
            or one per domain (a domain of uniform random text varies far less between sequences).
        decay: A_t = A_0 · decay^t.
        drift: std of a random walk added to A_t each step (relative to A_0's mean magnitude).
        tokens_per_step: tokens of a training batch (split over domains by the proportions).
        probe_tokens: tokens per domain in one probe measurement.
        seed: seeds every draw.
    """

    A_kk: torch.Tensor
    L_k: torch.Tensor
    noise: float = 0.0
    measure_noise: float | list[float] = 0.0
    decay: float = 1.0
    drift: float = 0.0
    tokens_per_step: int = 8192
    probe_tokens: int = 4096
    seed: int = 0
    step: int = 0
    gen: torch.Generator = field(init=False, repr=False)

    def __post_init__(self):
        self.A_kk = self.A_kk.to(torch.float64).clone()
        self.L_k = self.L_k.to(torch.float64).clone()
        self.A0_kk = self.A_kk.clone()
        if not isinstance(self.measure_noise, (int, float)):
            self.measure_noise = torch.as_tensor(self.measure_noise, dtype=torch.float64)
        self.gen = torch.Generator().manual_seed(self.seed)

    @classmethod
    def random(cls, num_domains: int, *, seed: int = 0, scale: float = 1e-3, **kwargs) -> LinearLawSimulator:
        """A_0 with a random non-negative structure (some domains help others), losses starting near 4."""
        gen = torch.Generator().manual_seed(seed)
        A = torch.rand(num_domains, num_domains, generator=gen, dtype=torch.float64) ** 3
        A += torch.eye(num_domains, dtype=torch.float64) * 0.5
        L = 4.0 + torch.rand(num_domains, generator=gen, dtype=torch.float64)
        return cls(A_kk=A * scale, L_k=L, seed=seed, **kwargs)

    @property
    def num_domains(self) -> int:
        return self.L_k.shape[0]

    def average_loss(self) -> float:
        return float(self.L_k.mean())

    def train_step(self, p_k: torch.Tensor) -> None:
        """One optimizer step on mixture ``p_k``."""
        p = p_k.detach().to("cpu", torch.float64)
        self.L_k = self.L_k - self.A_kk @ p
        if self.noise:
            self.L_k = self.L_k + self.noise * torch.randn(
                self.num_domains, generator=self.gen, dtype=torch.float64
            )
        self.step += 1
        self.A_kk = self.A0_kk * self.decay**self.step
        if self.drift:
            walk = torch.randn(self.A_kk.shape, generator=self.gen, dtype=torch.float64)
            self.A0_kk = (self.A0_kk + self.drift * self.A0_kk.mean() * walk).clamp_min(0)

    def _measure(self, tokens_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        std = self.measure_noise / tokens_k.clamp_min(1).sqrt()
        noisy = self.L_k + std * torch.randn(self.num_domains, generator=self.gen, dtype=torch.float64)
        return (noisy * tokens_k).float(), tokens_k.float()

    def train_batch_stats(self, p_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-domain loss sums and token counts of a batch drawn from ``p_k``, at the current losses."""
        p = p_k.detach().to("cpu", torch.float64)
        draws = torch.multinomial(p, self.tokens_per_step // 256 or 1, replacement=True, generator=self.gen)
        seqs = torch.bincount(draws, minlength=self.num_domains).to(torch.float64)
        return self._measure(seqs * 256)

    def probe_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A measurement of every domain's current loss over ``probe_tokens`` tokens each."""
        return self._measure(torch.full((self.num_domains,), float(self.probe_tokens), dtype=torch.float64))


def run_mixer(mixer: Mixer, sim: LinearLawSimulator, steps: int) -> dict[str, list]:
    """Drive ``mixer`` through ``steps`` steps of ``sim`` as the training loop would.

    Returns ``{"loss": average loss after each step, "proportions": host proportions of each step,
    "measurements": number of probe/full_val measurements taken}``.
    """
    history: dict[str, list] = {"loss": [], "proportions": [], "measurements": [0]}
    probe = lambda _model: tuple(x.to(mixer.device) for x in sim.probe_stats())  # noqa: E731
    driver = MixingDriver(mixer, None, measure=probe)  # the training loop's pre-step calls, without data
    for step in range(steps):
        driver.before_step(step)
        p_k = mixer.proportions(step)  # the tensor the driver just saw
        sums, counts = sim.train_batch_stats(p_k)
        driver.observe(step, sums.to(mixer.device), counts.to(mixer.device))
        sim.train_step(p_k)
        history["loss"].append(sim.average_loss())
        history["proportions"].append(list(driver.host_proportions))
    history["measurements"][0] = driver.measurements
    return history
