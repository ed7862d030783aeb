"""The run's metrics log: ``metrics.jsonl`` (always) and TensorBoard event files (when available).

Records are JSON objects with an integer ``step`` (the optimizer steps done); the loop writes two kinds:

- training records, one per ``train.log_every`` steps: ``{"step", "loss", "domain_loss": {domain:
  loss or null}, "domain_tokens": {domain: tokens}, "proportions": {domain: p}, "mixer_*", "data_*",
  "lr", "tokens", "tokens_per_s", "elapsed_s"}``;
- evaluation records, one per ``eval.every`` steps: ``{"step", "eval": {"val": {"domains": {domain:
  {"loss", "ppl", "tokens"}}, "average": {"loss", "ppl"}}}}``.

Every record becomes one line of ``RUN_DIR/metrics.jsonl``, flushed at once, so a crash loses at most
the line being written. With TensorBoard, every numeric leaf of a record is also a scalar at global step
``record["step"]``, its tag the record's keys joined by ``/`` (``loss``, ``domain_loss/code``,
``proportions/web``, ``eval/val/average/ppl``, ``eval/val/domains/code/loss``); ``None`` and
non-numeric values are left out. Event files go to ``RUN_DIR/tensorboard/``.

``tensorboard`` is ``"auto"`` (event files when ``torch.utils.tensorboard`` imports, which needs the
``tensorboard`` package; nothing and no message otherwise), ``"on"`` (a :class:`ConfigError` with the
install command when it does not import) or ``"off"``. The mode is checked, and ``"on"`` enforced, on
every rank (so that all ranks fail together); only the rank built with ``enabled=True`` writes.

With ``wandb`` options (``logging.wandb``, a ``project`` set), rank 0 also logs every such scalar to
Weights & Biases at step ``record["step"]``, with the same tags. The W&B run id is kept in
``RUN_DIR/wandb_run_id``, so a resumed run continues the same W&B run (``resume="allow"``); W&B keeps
its own history, so the steps a crashed run logged after its last checkpoint stay there and the resumed
run's first steps up to them are dropped by W&B with a warning.

Resuming from a checkpoint at step ``s``: :meth:`MetricsLog.truncate_after` rewrites ``metrics.jsonl``
atomically without the records after ``s`` (and without a last line a crash left half-written), and
the TensorBoard writer, opened lazily at the next write, purges the events after ``s`` (its
``purge_step``), so the curves of the resumed run continue without a doubled stretch.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..fileio import atomic_write_bytes, say

TENSORBOARD_MODES = ("auto", "on", "off")
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can be imported (the ``tensorboard`` package is installed)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def scalar_items(record: dict, prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(tag, value)`` for every numeric leaf of ``record``, tags joined by ``/``; skips the top ``step``.

    ``None``, strings, booleans and lists are not scalars and are left out; ints become floats.
    """
    for key, value in record.items():
        if not prefix and key == "step":
            continue
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from scalar_items(value, f"{tag}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield tag, float(value)


def _record_step(line: bytes) -> int | None:
    """The ``step`` of one metrics line, or None when the line is not a JSON object with an integer step."""
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    return step


class MetricsLog:
    """Appends metrics records to ``run_dir/metrics.jsonl`` and, optionally, to TensorBoard.

    ``enabled=False`` (ranks other than 0) makes every method a no-op; the ``tensorboard`` mode is
    still checked. Files are opened at the first :meth:`write`, so a log that never writes creates
    nothing. Usable as a context manager (closes on exit); writing after :meth:`close` opens the
    files again (appending).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        tensorboard: str = "auto",
        wandb: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        if tensorboard not in TENSORBOARD_MODES:
            raise ConfigError(
                f"train.tensorboard must be one of {', '.join(TENSORBOARD_MODES)}, got {tensorboard!r}"
            )
        available = tensorboard != "off" and tensorboard_available()
        if tensorboard == "on" and not available:
            raise ConfigError(
                "train.tensorboard=on needs the tensorboard package (torch.utils.tensorboard cannot import "
                "it): pip install tensorboard, or set train.tensorboard=auto or off"
            )
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / METRICS_FILE
        # where event files go, or None when this log writes none
        self.tensorboard_dir = self.run_dir / TENSORBOARD_DIR if enabled and available else None
        self._file = None
        self._writer = None
        self._purge_step: int | None = None
        # W&B: the init keywords (project, name, entity, mode, dir) when this log writes there, else None
        self.wandb = dict(wandb) if enabled and wandb and wandb.get("project") else None
        self._wandb_run = None
        self._config = config
        if self.wandb is not None:
            self._wandb()  # now, so that a login or network problem stops the run before it trains

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one JSON line (flushed), and its numeric leaves as TensorBoard scalars.

        ``record["step"]`` must be an integer: it orders the records and is TensorBoard's global step.
        """
        if not self.enabled:
            return
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"a metrics record needs an integer 'step', got {step!r}")
        line = json.dumps(record) + "\n"
        if self._file is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(line)
        self._file.flush()
        if self.tensorboard_dir is not None:
            writer = self._tensorboard_writer()
            for tag, value in scalar_items(record):
                writer.add_scalar(tag, value, global_step=step)
            writer.flush()
        if self.wandb is not None:
            try:
                self._wandb().log(dict(scalar_items(record)), step=step)
            except Exception as exc:  # noqa: BLE001 - W&B must not stop a training run
                say(f"warning: W&B logging failed ({type(exc).__name__}: {exc}); it is off for this run")
                self.wandb = None

    def truncate_after(self, step: int) -> None:
        """Keep only the records with ``step <= step`` (resuming from a checkpoint at ``step``).

        Rewrites ``metrics.jsonl`` atomically; a last line that is not a complete record (a crash in the
        middle of a write) is dropped too. A damaged line before the last raises :class:`DataError`
        naming the file and line, and leaves the file as it was. Nothing happens when the file does
        not exist. TensorBoard events after ``step`` are purged when its writer next opens.
        """
        if not self.enabled:
            return
        self._close_files()
        self._purge_step = step + 1
        if not self.path.exists():
            return
        lines = self.path.read_bytes().splitlines(keepends=True)
        kept = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            line_step = _record_step(line)
            last = number == len(lines)
            if line_step is None or (last and not line.endswith(b"\n")):
                if last:
                    break  # half-written by a crash: dropped
                raise DataError(
                    f"{self.path}:{number}: damaged metrics record (not a JSON object with an integer "
                    f"'step'); repair or remove the line to resume"
                )
            if line_step <= step:
                kept.append(line)
        atomic_write_bytes(self.path, b"".join(kept))

    def close(self) -> None:
        """Close ``metrics.jsonl``, the TensorBoard writer and the W&B run (each flushed); closing twice
        is fine."""
        self._close_files()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def _close_files(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _wandb(self):
        """The W&B run, started on the first write (resumed when the run directory names one)."""
        if self._wandb_run is None:
            import wandb

            id_file = self.run_dir / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id + "\n")
            options = {k: v for k, v in self.wandb.items() if v is not None}
            options.setdefault("dir", str(self.run_dir))
            Path(options["dir"]).mkdir(parents=True, exist_ok=True)
            try:
                self._wandb_run = wandb.init(id=run_id, resume="allow", config=self._config, **options)
            except Exception as exc:  # noqa: BLE001 - login, network, a bad entity: one line
                raise ConfigError(
                    f"W&B could not start ({type(exc).__name__}: {exc}); log in (wandb login), set "
                    "logging.wandb.mode=offline, or leave logging.wandb.project unset"
                ) from exc
        return self._wandb_run

    def _tensorboard_writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir), purge_step=self._purge_step)
            self._purge_step = None  # purged once, when the resumed run's writer opens
        return self._writer

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
