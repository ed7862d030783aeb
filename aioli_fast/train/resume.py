"""The run directory, and what a run resumes from.

Rank 0 decides, for every rank, whether the run starts afresh or resumes (and from which checkpoint),
after checking that the checkpoint was written by a compatible run: the config keys in
:data:`RESUMABLE_CHANGES` may change between a checkpoint and the run resuming it, no other may.
Nothing is deleted before that check has passed.
"""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig, dump_config
from ..data import corpus_changes
from ..distributed import DistInfo, on_rank0
from ..errors import AioliError, ConfigError
from ..fileio import atomic_write_bytes, ensure_writable_dir, say
from .checkpoint import RunCheckpoints

# Config keys that may differ between a checkpoint and the run resuming it; every other key must match.
RESUMABLE_CHANGES = (
    "train.steps",
    "train.log_every",
    "train.progress",
    "train.overwrite",
    "train.out_dir",
    "train.name",
    "train.tensorboard",
    "train.on_nan",
    "train.max_skipped_fraction",
    "train.threads",
    "train.device",
    "data.path",
    "data.num_workers",
    "data.prefetch_factor",
    "data.on_error",
    "data.cache_dir",
    "data.cache_gb",
    "data.storage_options",
    "data.storage_options.",
    "engine.dist_backend",
    "engine.backend",  # auto or named: the engine kind itself is checked apart
    "eval.every",
    "checkpoint.",
    "logging.",
)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("proportions",):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """``key: checkpoint value -> this run's value`` for every key that may not change on resume."""
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES):
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def prepare_run_dir(
    cfg: RunConfig,
    run_dir: Path,
    checkpoints: RunCheckpoints,
    info: DistInfo,
    engine_kind: str,
    corpus: dict | None = None,
) -> Path | None:
    """Create the run directory and decide (on rank 0, for every rank) what to resume from.

    Nothing is deleted before the checkpoint to resume from has been checked against this run (its
    config, processes, engine and, with ``corpus`` (``Manifest.fingerprint``), the corpus it trained on).
    """

    def decide() -> str | None:
        finished = (run_dir / "final.json").exists()
        if finished and not cfg.train.overwrite:
            raise AioliError(
                f"{run_dir} already holds a finished run; "
                "choose another train.name or pass train.overwrite=true"
            )
        resume = cfg.checkpoint.resume
        if resume == "never" or (resume == "auto" and finished):
            checkpoint = None
        elif resume == "auto":
            checkpoint = newest_loadable(checkpoints)
        else:
            checkpoint = Path(resume)
            if not (checkpoint / "trainer.pt").is_file():
                raise ConfigError(f"checkpoint.resume={resume}: not a run checkpoint (no trainer.pt there)")
            reason = RunCheckpoints.damage(checkpoint)
            if reason is not None:
                raise ConfigError(f"checkpoint.resume={resume} cannot be loaded: {reason}")
        step = (
            None
            if checkpoint is None
            else check_resumable(checkpoint, cfg, info.world_size, engine_kind, corpus)
        )
        ensure_writable_dir(run_dir, "run directory")
        stale = ["final.json", "model.pt", "config.yaml"]
        if checkpoint is None:
            stale += ["metrics.jsonl", "wandb_run_id"]  # a fresh start is a new W&B run too
            checkpoints.clear()  # a fresh start: the old checkpoints must not be resumed later
        elif checkpoint.resolve().parent == checkpoints.folder.resolve():
            checkpoints.discard_after(step)  # an abandoned future, if resumed from an older one
        else:
            checkpoints.clear()  # resumed from another run's checkpoint: a new history starts
        for name in stale:
            (run_dir / name).unlink(missing_ok=True)
        atomic_write_bytes(run_dir / "config.yaml", dump_config(cfg).encode("utf-8"))
        return None if checkpoint is None else str(checkpoint)

    checkpoint = on_rank0(decide, info.rank)
    return None if checkpoint is None else Path(checkpoint)


def newest_loadable(checkpoints: RunCheckpoints) -> Path | None:
    """The newest checkpoint of the run that can be loaded; each damaged one passed over is named on
    stderr with the reason. None when the run has none; ConfigError when it has only damaged ones."""
    skipped = []
    for candidate in checkpoints.candidates():
        reason = RunCheckpoints.damage(candidate)
        if reason is None:
            if skipped:
                say(f"resuming from the previous complete checkpoint, {candidate}")
            return candidate
        skipped.append(candidate)
        say(f"warning: checkpoint {candidate} cannot be loaded, passed over: {reason}")
    if skipped:
        raise ConfigError(
            f"no checkpoint in {checkpoints.folder} can be loaded (see above); "
            "set checkpoint.resume=never to start afresh"
        )
    return None


def check_resumable(
    checkpoint: Path, cfg: RunConfig, world_size: int, engine_kind: str, corpus: dict | None = None
) -> int:
    """The step of ``checkpoint`` after checking that this run may continue from it."""
    state = RunCheckpoints.load_trainer_state(checkpoint)
    diffs = config_differences(state["config"], cfg.to_dict())
    if diffs:
        raise ConfigError(
            f"cannot resume from {checkpoint}: the config differs in keys that must not change: "
            + "; ".join(diffs)
            + " (set checkpoint.resume=never to start afresh)"
        )
    if state["engine"] != engine_kind:
        hint = (
            "set engine.backend=deepspeed (one process runs DeepSpeed too)"
            if state["engine"] == "deepspeed"
            else "resume it in one process with engine.backend=torch (a run that may have to move to "
            "more processes starts with engine.backend=deepspeed, which runs one process too)"
        )
        raise ConfigError(
            f"cannot resume from {checkpoint}: it was written by {state['world_size']} process(es) with "
            f"the {state['engine']} engine, this run has {world_size} with {engine_kind}; {hint}"
        )
    if state["world_size"] != world_size and engine_kind == "deepspeed" and cfg.engine.zero_stage == 3:
        raise ConfigError(
            f"cannot resume from {checkpoint} on {world_size} process(es): it was written by "
            f"{state['world_size']} under ZeRO-3, whose optimizer partitions DeepSpeed's universal "
            "checkpoint does not restore exactly; resume on "
            f"{state['world_size']} process(es) (ZeRO-1 and ZeRO-2 runs resume on any number)"
        )
    if state["world_size"] != world_size:
        say(
            f"note: {checkpoint} was written by {state['world_size']} process(es), this run has "
            f"{world_size}: the data stream continues the same global sample order and the mixer's "
            "per-rank windows are merged"
            + (
                "; DeepSpeed's checkpoint is loaded as a universal checkpoint"
                if engine_kind == "deepspeed"
                else ""
            )
        )
    if state["step"] > cfg.train.steps:
        raise ConfigError(
            f"cannot resume from {checkpoint}: it is at step {state['step']}, beyond "
            f"train.steps={cfg.train.steps}"
        )
    changes = corpus_changes(state.get("corpus"), corpus) if corpus is not None else []
    if changes and not cfg.checkpoint.new_corpus:
        raise ConfigError(
            f"cannot resume from {checkpoint}: data.path={cfg.data.path} is not the corpus it trained on "
            f"(changed: {'; '.join(changes)}); resume on that corpus, train on this one under another "
            "train.name (or with checkpoint.resume=never), or set checkpoint.new_corpus=true to continue "
            "the model on it with a fresh data stream"
        )
    if changes:
        say(
            f"note: resuming from {checkpoint} on another corpus ({'; '.join(changes)}): "
            "checkpoint.new_corpus=true, the data stream starts afresh on it"
        )
    return state["step"]
