"""The statistics the loop accumulates between log steps, as one named type.

Every field lives in one fp32 device tensor so that the ranks sum them with a single all-reduce, and
the host reads them with a single copy, at log steps and before checkpoints only:

    loss_sum_D    [D] per-domain sums of token losses
    count_D       [D] per-domain counts of non-ignored tokens
    loss_total    []  sum of the finite step losses (each the mean over the step's micro-batches)
    finite_steps  []  steps whose loss was finite
    steps         []  steps
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed import all_reduce_
from ..mixing import DomainSums


@dataclass(frozen=True)
class WindowTotals:
    """A :class:`LossWindow` read on the host."""

    loss_sum: list[float]
    count: list[float]
    loss_total: float
    finite_steps: int
    steps: int

    @property
    def loss(self) -> float:
        """Mean of the finite step losses (NaN when no step was finite)."""
        return self.loss_total / self.finite_steps if self.finite_steps else float("nan")

    @property
    def non_finite_steps(self) -> int:
        return self.steps - self.finite_steps


class LossWindow:
    """Per-domain loss sums and counts and the step losses since the last log step (this rank's)."""

    def __init__(self, num_domains: int, device: torch.device | str = "cpu"):
        self.num_domains = D = num_domains
        #: the packed buffer [2D + 3] (what a checkpoint stores; see the module docstring for the layout)
        self.buffer = torch.zeros(2 * D + 3, device=device)
        #: the per-domain part, a view of the buffer's first 2D values (micro-batches are added to it)
        self.sums = DomainSums(self.buffer[: 2 * D].view(2, D))
        self._loss_total, self._finite_steps, self._steps = (self.buffer[2 * D + i] for i in range(3))

    def add_step(self, step_loss: torch.Tensor) -> None:
        """Count one optimizer step and add its loss [] when finite (no host read)."""
        finite = torch.isfinite(step_loss)
        self._loss_total += torch.where(finite, step_loss, 0.0)
        self._finite_steps += finite.float()
        self._steps += 1

    def reduced(self) -> LossWindow:
        """A copy summed over the data-parallel ranks (one all-reduce; a copy when running alone)."""
        out = LossWindow(self.num_domains, self.buffer.device)
        out.buffer.copy_(self.buffer)
        all_reduce_(out.buffer)
        return out

    def totals(self) -> WindowTotals:
        """The window on the host (one device read)."""
        D, values = self.num_domains, self.buffer.tolist()
        return WindowTotals(
            loss_sum=values[:D],
            count=values[D : 2 * D],
            loss_total=values[2 * D],
            finite_steps=int(values[2 * D + 1]),
            steps=int(values[2 * D + 2]),
        )

    def zero_(self) -> None:
        self.buffer.zero_()

    def merged(self, buffers: list[torch.Tensor], rank: int, world_size: int) -> torch.Tensor:
        """This rank's buffer in a run resumed on ``world_size`` processes, from the buffers every rank
        of the run that wrote them saved: all on rank 0, zero on the others, so that the next all-reduce
        gives what the writing run would have: the per-domain sums in full, and the per-step fields
        (which every rank counts for every step) as ``world_size`` ranks would have counted them."""
        total = torch.stack([b.to(self.buffer.device) for b in buffers]).sum(0)
        total[2 * self.num_domains :] *= world_size / len(buffers)
        return total if rank == 0 else torch.zeros_like(total)

    def load_(self, buffer: torch.Tensor) -> None:
        """Restore a buffer saved from :attr:`buffer` (a checkpoint's)."""
        if buffer.shape != self.buffer.shape:
            raise ValueError(
                f"loss window of shape {tuple(buffer.shape)}, expected {tuple(self.buffer.shape)}"
            )
        self.buffer.copy_(buffer.to(self.buffer.device))
