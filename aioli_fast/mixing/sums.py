"""Per-domain token-loss sums and token counts: the statistic every mixer, the evaluator and the adapters
pass around, as one named type.

A :class:`DomainSums` is one fp32 ``[2, D]`` tensor on the device: row 0 the sums of token losses, row 1
the counts of non-ignored tokens. One tensor, so that the ranks sum it with a single all-reduce and a
checkpoint stores it as it is (the ``[2, D]`` layout is what mixer states have always held). Nothing here
reads the device on the host.

    sums = DomainSums.zeros(D, device)
    sums.add(out.loss_sum, out.count)      # a micro-batch (in place, no host read)
    total = sums.reduced()                 # summed over the data-parallel ranks (one collective)
    loss_D = total.losses()                # mean token loss per domain, NaN where a domain had no tokens
    loss_sum_D, count_D = total            # unpacks like the (sums, counts) pairs it replaces
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..distributed import all_reduce_sum
from .lmo import losses_from_sums


class DomainSums:
    """Per-domain token-loss sums ``loss_sum`` [D] and token counts ``count`` [D] in one ``[2, D]`` fp32
    device tensor (:attr:`buffer`; the two are views of its rows)."""

    __slots__ = ("buffer",)

    def __init__(self, buffer: torch.Tensor):
        if buffer.dim() != 2 or buffer.shape[0] != 2:
            raise ValueError(f"per-domain sums need a [2, D] tensor, got shape {tuple(buffer.shape)}")
        self.buffer = buffer

    @classmethod
    def zeros(cls, num_domains: int, device: torch.device | str = "cpu") -> DomainSums:
        return cls(torch.zeros(2, num_domains, device=device))

    @classmethod
    def of(cls, loss_sum_D: torch.Tensor, count_D: torch.Tensor, device=None) -> DomainSums:
        """A new value holding copies of ``loss_sum_D`` [D] and ``count_D`` [D] (fp32, on ``device``,
        default that of ``loss_sum_D``)."""
        device = loss_sum_D.device if device is None else device
        return cls(
            torch.stack([loss_sum_D.detach().to(device, torch.float32), count_D.to(device, torch.float32)])
        )

    @property
    def loss_sum(self) -> torch.Tensor:
        """[D] sums of token losses (a view)."""
        return self.buffer[0]

    @property
    def count(self) -> torch.Tensor:
        """[D] counts of non-ignored tokens (a view)."""
        return self.buffer[1]

    @property
    def num_domains(self) -> int:
        return self.buffer.shape[1]

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield self.loss_sum
        yield self.count

    def add(self, loss_sum_D: torch.Tensor, count_D: torch.Tensor) -> None:
        """Add one micro-batch's sums [D] and counts [D] (in place, no host read)."""
        self.buffer[0] += loss_sum_D.detach().to(self.buffer.dtype)
        self.buffer[1] += count_D.to(self.buffer.dtype)

    def reduced(self) -> DomainSums:
        """A new value summed over the data-parallel ranks (one all-reduce; a copy when running alone)."""
        return DomainSums(all_reduce_sum(self.buffer))

    def losses(self) -> torch.Tensor:
        """[D] mean token loss per domain; NaN where a domain has no tokens or a sum is not finite."""
        return losses_from_sums(self.loss_sum, self.count)

    def zero_(self) -> DomainSums:
        self.buffer.zero_()
        return self

    def copy_(self, buffer: torch.Tensor) -> None:
        """Restore a ``[2, D]`` tensor saved from :attr:`buffer` (a checkpoint's), on this value's device."""
        if buffer.shape != self.buffer.shape:
            raise ValueError(
                f"per-domain sums of shape {tuple(buffer.shape)}, expected {tuple(self.buffer.shape)}"
            )
        self.buffer.copy_(buffer.to(self.buffer.device))

    def __repr__(self) -> str:
        return f"DomainSums(D={self.num_domains}, device={self.buffer.device})"
