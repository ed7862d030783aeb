"""Model checkpoints: written atomically, loaded with a clear error when damaged."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..errors import AioliError
from ..fileio import atomic_write
from ..model import GPT, GPTConfig

CHECKPOINT_FORMAT = 1


def save_checkpoint(
    path: Path, model: GPT, *, step: int, domains: list[str], config: dict, tokenizer: dict
) -> None:
    """Save weights, model shape, domains, step, run config and tokenizer spec to ``path`` atomically."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(model.cfg),
        "step": step,
        "domains": list(domains),
        "config": config,
        "tokenizer": tokenizer,
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, dict]:
    """Rebuild the model of a checkpoint; returns (model on ``device``, checkpoint metadata)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise AioliError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a damaged file
        # torch's own message is long and suggests weights_only=False, which is unsafe advice here
        raise AioliError(
            f"cannot read checkpoint {path}: damaged, or not a checkpoint ({type(exc).__name__})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise AioliError(f"{path} is not an aioli_fast checkpoint (format {CHECKPOINT_FORMAT})")
    missing = [
        k for k in ("model", "model_config", "step", "domains", "config", "tokenizer") if k not in payload
    ]
    if missing:
        raise AioliError(f"checkpoint {path} is incomplete: it has no {', '.join(missing)}")
    try:
        model = GPT(GPTConfig(**payload["model_config"]))
        model.load_state_dict(payload.pop("model"))
    except (TypeError, ValueError, RuntimeError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AioliError(f"checkpoint {path} does not hold a valid model: {first_line}") from exc
    return model.to(device), payload
