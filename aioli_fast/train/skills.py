"""Skill-it's skills graph learned from short single-domain runs.

For every domain j, train the run's model from its initialisation for a few steps on domain j alone
(``static`` mixing with a one-hot mixture), then measure every domain's validation loss. The graph is
the relative loss drop, ``S[i, j] = max(0, (L_i^before - L_i^after_j) / L_i^before)``, scaled by the
largest column (:func:`aioli_fast.mixing.skillit.skills_graph_from_losses`). The result is the JSON file
``mixing.skills_graph`` reads.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from ..config import RunConfig
from ..device import resolve_device, resolve_precision
from ..errors import ConfigError
from ..fileio import atomic_write_json, ensure_writable_dir
from ..mixing.skillit import skills_graph_from_losses
from .components import build_model, held_out_splits, select_domains
from .evaluate import evaluate
from .trainer import train


def learn_skills_graph(cfg: RunConfig, steps: int, out: str | Path) -> dict:
    """Train one ``steps``-step run per domain from the same initialisation; write and return the graph.

    Returns ``{"graph": {domain_i: {domain_j: S_ij}}, "before": {...}, "after": {domain_j: {...}}}``;
    the file at ``out`` holds the same mapping (``mixing.skills_graph`` uses its ``graph`` entry or the
    whole file when it is a plain graph; this writes the plain graph there and the details beside it).
    """
    if steps < 1:
        raise ConfigError(f"skills-graph needs at least 1 step per run, got {steps}")
    cfg.validate()
    out = Path(out)
    ensure_writable_dir(out.parent, "output folder")
    manifest = cfg.data.manifest()
    domains = select_domains(cfg, manifest)
    if "val" not in held_out_splits(manifest, domains)[0]:
        raise ConfigError("learning a skills graph needs a val split for every domain")
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)  # the same initialisation train() builds
    start = build_model(cfg, manifest).to(device)
    kwargs = dict(batch_size=cfg.eval.batch_size, device=device, precision=precision)
    before = evaluate(start, manifest, domains, "val", max_sequences=cfg.eval.max_sequences, **kwargs)
    del start
    after = {}
    base_name = cfg.train.name or "skills"
    for j, name in enumerate(domains):
        print(f"skills graph: run {j + 1}/{len(domains)} trains on {name} only", file=sys.stderr, flush=True)
        run = copy.deepcopy(cfg)
        run.mixing = type(cfg.mixing)(method="static", proportions={d: float(d == name) for d in domains})
        run.train.steps = steps
        run.train.name = f"{base_name}-skills-{name}"
        run.train.overwrite = True
        run.optim.warmup_steps = min(cfg.optim.warmup_steps, max(steps // 10, 1))
        run.eval.every = 0
        final = train(run).final
        after[name] = {d: final["val"]["domains"][d]["loss"] for d in domains}
    before_D = torch.tensor([before["domains"][d]["loss"] for d in domains], dtype=torch.float64)
    after_jD = torch.tensor([[after[j][d] for d in domains] for j in domains], dtype=torch.float64)
    S = skills_graph_from_losses(before_D, after_jD).tolist()
    graph = {di: {dj: S[i][j] for j, dj in enumerate(domains)} for i, di in enumerate(domains)}
    atomic_write_json(out, graph)
    details = {
        "graph": graph,
        "before": {d: before["domains"][d]["loss"] for d in domains},
        "after": after,
        "steps": steps,
    }
    atomic_write_json(out.with_name(out.stem + ".details.json"), details)
    return details
