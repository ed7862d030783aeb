"""Shared drivers for the mixer tests: a loop that calls a mixer exactly as the training loop does.

Kept apart from ``helpers.py`` (the data-pipeline builders) so that the mixing tests stay independent.
"""

from __future__ import annotations

import io
import math

import torch

from aioli_fast.harness.sim import LinearLawSimulator


def drive(mixer, sim: LinearLawSimulator, start: int, stop: int, record: list | None = None, micro: int = 1):
    """Steps ``start``..``stop-1`` of the loop contract in ``aioli_fast.mixing.base`` on ``sim``.

    ``record`` gets a clone of the proportions of every step; ``micro`` micro-batches per step (the
    batch statistics of the step are split evenly over them).
    """
    record = [] if record is None else record
    for step in range(start, stop):
        if mixer.measurement_due(step):
            sums, counts = sim.probe_stats()
            mixer.observe_measurement(step, sums, counts)
        p = mixer.proportions(step)
        mixer.host_proportions(step)
        sums, counts = sim.train_batch_stats(p)
        for _ in range(micro):
            mixer.observe(step, sums / micro, counts / micro)
        sim.train_step(p)
        record.append(p.detach().clone())
    return record


def planted_sim(k: int = 3, *, seed: int = 0, scale: float = 1e-2, **kwargs) -> LinearLawSimulator:
    """A simulator with a fixed, structured A (domain 0 helps every domain) and losses near 4."""
    A = torch.full((k, k), 0.1, dtype=torch.float64)
    A += torch.eye(k, dtype=torch.float64) * 0.5
    A[:, 0] += 0.6
    L = 4.0 + torch.arange(k, dtype=torch.float64) * 0.1
    return LinearLawSimulator(A_kk=A * scale, L_k=L, seed=seed, **kwargs)


def save_load(state: dict) -> dict:
    """A state dict through ``torch.save`` / ``torch.load(weights_only=True)``, as a checkpoint would."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_states_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        va, vb = a[key], b[key]
        if isinstance(va, torch.Tensor):
            assert isinstance(vb, torch.Tensor) and va.dtype == vb.dtype, key
            assert torch.equal(va.nan_to_num(-12345.0), vb.nan_to_num(-12345.0)), key
        else:
            assert va == vb, key


def loop_loss_drops(L: list[list[float]], order: list[int], k: int) -> list[list[float]]:
    """G by explicit loops: mean over the blocks on j of L_prev[i] - L_new[i] (finite drops only), else 0."""
    sums = [[0.0] * k for _ in range(k)]
    counts = [[0] * k for _ in range(k)]
    for n, j in enumerate(order):
        for i in range(k):
            drop = L[n][i] - L[n + 1][i]
            if math.isfinite(drop):
                sums[i][j] += drop
                counts[i][j] += 1
    return [[sums[i][j] / counts[i][j] if counts[i][j] else 0.0 for j in range(k)] for i in range(k)]


def expected_A(
    L: list[list[float]], order: list[int], k: int, f: float, diagonal: bool = False
) -> torch.Tensor:
    """Normalised A in float64, computed with loops and ``torch.linalg.inv`` (independent of ``lmo``)."""
    G = torch.tensor(loop_loss_drops(L, order, k), dtype=torch.float64)
    if diagonal:
        A = torch.diag(torch.diagonal(G) / f)
    else:
        W = torch.tensor(
            [[f if i == j else (1 - f) / (k - 1) for j in range(k)] for i in range(k)], dtype=torch.float64
        )
        A = G @ torch.linalg.inv(W)
    lo = min(A.min().item(), 0.0)
    A = A - lo
    total = A.sum().item()
    return A / total if total > 0 else torch.zeros_like(A)
