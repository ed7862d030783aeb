"""DoGE (Fan et al., 2023): weight domains by how well their training gradient aligns with the validation one.

In the LMO view ``A[i, j] = ⟨∇L_i^val, ∇L_j^train⟩``; the column sums are the alignment of domain j's
training gradient with the gradient of the summed validation loss, and ``p ← p ⊙ exp(η · Σ_i A[i, :])``.
This implementation uses the cosine of the two gradients instead of the raw inner product: the raw value
scales with the gradient norms (the DoGE paper folds the learning rate into the step), the cosine keeps
``eta`` meaningful across models and training phases.

Per-domain gradients cost one extra backward pass per domain (plus one forward and backward of the
validation probe), so they are computed only on update steps: the loop calls
:func:`gradient_alignment` on the first micro-batch of every step where :meth:`DoGEMixer.alignment_due`
and hands the scores to :meth:`DoGEMixer.observe_alignment`; the new proportions apply from the next step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..distributed import all_reduce_sum
from .base import register_mixer
from .online import OnlineMixer


def gradient_alignment(
    params: Sequence[torch.Tensor], train_loss_D: torch.Tensor, val_loss: torch.Tensor, eps: float = 1e-12
) -> torch.Tensor:
    """[D] cosine between each domain's training-loss gradient and the validation-loss gradient.

    Args:
        params: the parameters to differentiate (those that require grad).
        train_loss_D: [D] differentiable per-domain mean training losses (one graph; it is retained).
        val_loss: differentiable scalar validation objective (its graph is freed).

    A domain absent from the batch has a zero gradient and scores 0.
    """
    params = [p for p in params if p.requires_grad]
    g_val = torch.autograd.grad(val_loss, params, allow_unused=True)
    g_val = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_val, strict=True)]
    val_norm = torch.sqrt(sum((g.float() ** 2).sum() for g in g_val))
    scores = []
    for j in range(train_loss_D.shape[0]):
        g_j = torch.autograd.grad(train_loss_D[j], params, retain_graph=True, allow_unused=True)
        dot = sum((a.float() * b.float()).sum() for a, b in zip(g_j, g_val, strict=True) if a is not None)
        norm = torch.sqrt(sum((a.float() ** 2).sum() for a in g_j if a is not None))
        scores.append(dot / (norm * val_norm + eps))
    return torch.stack(scores)


@register_mixer("doge")
class DoGEMixer(OnlineMixer):
    """Online DoGE with cosine alignment scores; an update every ``update_every`` steps."""

    OPTIONS = {"eta": 1.0, "update_every": 10, "min_proportion": 0.0}
    STATE = {**OnlineMixer.STATE, "scores": "_scores_D"}
    measurement = "probe"  # the validation gradient comes from the probe
    needs_gradients = True

    def __init__(self, domains, device="cpu", proportions=None, **options):
        super().__init__(domains, device=device, proportions=proportions, **options)
        self._scores_D = torch.zeros(self.num_domains, device=self.device)

    def alignment_due(self, step: int) -> bool:
        """Whether the loop must compute :func:`gradient_alignment` during ``step``."""
        return (step + 1) % self.every == 0

    def observe(self, step: int, loss_sum_D: torch.Tensor, count_D: torch.Tensor) -> None:
        """Training losses are not DoGE's signal (see :meth:`observe_alignment`)."""

    def observe_alignment(self, step: int, scores_D: torch.Tensor) -> None:
        """This rank's alignment scores [D]; averaged over ranks."""
        scores_D = scores_D.detach().to(self.device, torch.float32)
        total = all_reduce_sum(torch.stack([scores_D, torch.ones_like(scores_D)]))  # [2, D]: sums, ranks
        self._scores_D = total[0] / total[1]
        self._window_open = True

    def update(self, step: int, loss_D: torch.Tensor) -> torch.Tensor:
        scores = torch.where(torch.isfinite(self._scores_D), self._scores_D, torch.zeros_like(self._scores_D))
        return torch.softmax(torch.log(self._proportions_D) + self.eta * scores, dim=-1)
