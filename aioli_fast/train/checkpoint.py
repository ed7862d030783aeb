"""Checkpoints: the final model (``model.pt``) and the run checkpoints that resume a whole run.

``model.pt`` holds the weights, the model shape, the domains, the config and the tokenizer: what
evaluation needs. A *run checkpoint* (``RUN_DIR/checkpoints/step_00000100/``) holds everything a run
needs to continue as if it had never stopped: the engine's model and optimizer state (DeepSpeed's own
files under ZeRO), and ``trainer.pt`` with the step, the data stream, the loop's counters, and for
every rank its mixer state, its loss window and its RNG state (the windows hold each rank's own
statistics until the next all-reduce, so every rank's copy is kept and restored).

A run checkpoint is written into a hidden ``.step_N.partial`` folder and renamed into place only when
every rank has finished writing; then ``latest`` is replaced atomically and checkpoints beyond the
last ``keep_last`` are deleted (never the one just written). A crash while saving therefore never
damages the last good checkpoint. All ranks must see the same checkpoint folder (a shared file system
on multi-node runs).
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..distributed import all_ok, gather_objects, on_rank0, to_cpu
from ..errors import AioliError
from ..fileio import atomic_write, atomic_write_bytes, torch_file_damage
from ..model import GPT, GPTConfig

CHECKPOINT_FORMAT = 1
RUN_CHECKPOINT_FORMAT = 1
_STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointWriteError(AioliError, OSError):
    """A checkpoint could not be written (the message says why and what is still intact); an OSError
    too, since that is what it reports."""


def save_checkpoint(
    path: Path,
    model: GPT,
    *,
    step: int,
    domains: list[str],
    config: dict,
    tokenizer: dict,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save weights, model shape, domains, step, run config and tokenizer spec to ``path`` atomically.

    ``state`` replaces ``model.state_dict()`` (the gathered weights of a ZeRO-3 run).
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict() if state is None else state,
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
    payload = _load_payload(path, "checkpoint", CHECKPOINT_FORMAT)
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


# --------------------------------------------------------------------------------------------------
# run checkpoints


def rng_state() -> dict:
    """This process' torch, CUDA, numpy and Python RNG states (tensors and plain values only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RunCheckpoints:
    """The run checkpoints of one run: save (every rank calls it), find the latest, prune, load."""

    def __init__(self, folder: str | Path, keep_last: int, rank: int):
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.rank = rank

    def step_dirs(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        found = []
        for child in self.folder.iterdir():
            match = _STEP_DIR.fullmatch(child.name)
            if match and (child / "trainer.pt").is_file():
                found.append((int(match.group(1)), child))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, or the newest complete one; None when there is none."""
        pointer = self.folder / "latest"
        if pointer.is_file():
            named = self.folder / pointer.read_text(encoding="utf-8").strip()
            if (named / "trainer.pt").is_file():
                return named
        dirs = self.step_dirs()
        return dirs[-1] if dirs else None

    def clear(self) -> None:
        """Delete every checkpoint, partial folder and ``latest`` (a run that starts afresh)."""
        if not self.folder.is_dir():
            return
        for child in self.folder.iterdir():
            if _STEP_DIR.fullmatch(child.name) or child.name.startswith(".step_"):
                shutil.rmtree(child, ignore_errors=True)
        (self.folder / "latest").unlink(missing_ok=True)

    def discard_after(self, step: int) -> None:
        """Delete the checkpoints of steps after ``step`` (a run resumed from an earlier checkpoint)."""
        for path in self.step_dirs():
            if int(_STEP_DIR.fullmatch(path.name).group(1)) > step:
                shutil.rmtree(path, ignore_errors=True)

    def save(self, step: int, engine, shared: dict, own: dict, device: torch.device) -> Path:
        """Write the checkpoint of ``step``; every rank calls it.

        ``shared`` (the same on every rank: step, config, stream) is written once; ``own`` (this rank's
        mixer and loop state) and the RNG state of every rank are gathered into ``trainer.pt``.
        """
        final = self.folder / f"step_{step:08d}"
        partial = self.folder / f".step_{step:08d}.partial"

        def start() -> None:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(".step_*.partial"):  # left by a crash while saving
                shutil.rmtree(stale, ignore_errors=True)
            partial.mkdir()

        on_rank0(start, self.rank)
        error = None
        try:
            engine.save(partial)
        except Exception as exc:  # noqa: BLE001 - reported to every rank below
            error = exc
        if not all_ok(error is None, device):
            on_rank0(lambda: shutil.rmtree(partial, ignore_errors=True), self.rank)
            if error is None:
                raise CheckpointWriteError(f"another rank failed to write its part of checkpoint {final}")
            if isinstance(error, (OSError, RuntimeError)):  # torch reports a failed write as RuntimeError
                raise self._write_error(final, error) from error
            raise error
        ranks = gather_objects(to_cpu({**own, "rng": rng_state()}))

        def finish() -> None:
            payload = {"format": RUN_CHECKPOINT_FORMAT, **shared, "ranks": ranks}
            atomic_write(partial / "trainer.pt", lambda tmp: torch.save(payload, tmp))
            _fsync_tree(partial)
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            atomic_write_bytes(self.folder / "latest", (final.name + "\n").encode("utf-8"))
            keep = set(self.step_dirs()[-self.keep_last :]) | {final}
            for old in self.step_dirs():
                if old not in keep:
                    shutil.rmtree(old, ignore_errors=True)

        def finish_or_clean_up() -> None:
            try:
                finish()
            except (OSError, RuntimeError) as exc:
                shutil.rmtree(partial, ignore_errors=True)
                raise self._write_error(final, exc) from exc

        on_rank0(finish_or_clean_up, self.rank)
        return final

    def _write_error(self, final: Path, exc: BaseException) -> CheckpointWriteError:
        """One line for a checkpoint that could not be written (a full disk, a file-size limit, ...)."""
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        try:
            free = f"; {shutil.disk_usage(self.folder).free / 2**20:,.0f} MiB free there"
        except OSError:
            free = ""
        previous = self.latest()
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        return CheckpointWriteError(f"could not write checkpoint {final} ({first}{free}); {kept}")

    def remove(self, path: Path) -> None:
        """Delete the checkpoint at ``path`` (rank 0); ``latest`` then names the newest one left."""
        shutil.rmtree(path, ignore_errors=True)
        pointer = self.folder / "latest"
        left = self.step_dirs()
        if left:
            atomic_write_bytes(pointer, (left[-1].name + "\n").encode("utf-8"))
        else:
            pointer.unlink(missing_ok=True)

    def candidates(self) -> list[Path]:
        """Complete checkpoints to resume from, the one ``latest`` names first, then newest first."""
        named = self.latest()
        return [*([named] if named else []), *(p for p in reversed(self.step_dirs()) if p != named)]

    @staticmethod
    def damage(path: Path) -> str | None:
        """Why the checkpoint at ``path`` cannot be loaded, or None when it looks complete.

        ``trainer.pt`` is read whole; every other ``.pt`` file (the engine's model and optimizer state)
        is checked for a complete zip directory, which torch writes last: a truncated or overwritten
        file fails that check without reading the tensors.
        """
        try:
            RunCheckpoints.load_trainer_state(path)
        except AioliError as exc:
            return str(exc)
        for file in sorted(Path(path).rglob("*.pt")):
            if file.name == "trainer.pt":
                continue
            damage = torch_file_damage(file, str(file.relative_to(path)))
            if damage is not None:
                return damage
        return None

    @staticmethod
    def load_trainer_state(path: str | Path) -> dict:
        """``trainer.pt`` of the checkpoint at ``path``, checked."""
        file = Path(path) / "trainer.pt"
        if not file.is_file():
            raise AioliError(f"{path} is not a run checkpoint (it has no trainer.pt)")
        return _load_payload(file, "run checkpoint", RUN_CHECKPOINT_FORMAT)


def _load_payload(file: Path, what: str, fmt: int) -> dict:
    """A checkpoint file's dict, with one clear error for a damaged file or another format."""
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a damaged file
        # torch's own message is long and suggests weights_only=False, which is unsafe advice here
        reason = type(exc).__name__
        raise AioliError(f"cannot read {what} {file}: damaged, or not a {what} ({reason})") from exc
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise AioliError(f"{file} is not an aioli_fast {what} (format {fmt})")
    return payload


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` to disk before it is renamed into place."""
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
