"""Device and precision choices shared by training and evaluation."""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``, ``cuda``, ``cuda:N`` as given (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"{key}: {name!r} is not a device ({exc})") from exc
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{key} must be auto, cpu, cuda or cuda:N; got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key} is {name!r} but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{key} is {name!r} but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 autocast on CUDA, fp32 elsewhere; bf16 is refused off CUDA."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type != "cuda":
        raise ConfigError("train.precision=bf16 needs a CUDA device (the CPU path trains in fp32)")
    return precision


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast when ``precision`` is bf16; a no-op otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
