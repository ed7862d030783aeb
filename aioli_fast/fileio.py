"""Files that are either complete or absent (atomic writes, writability checks up front), and the
progress output of long commands (a tqdm bar on a terminal, lines otherwise)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from .errors import AioliError


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    A crash (or an exception in ``write``) leaves the previous ``path``, if any, untouched and no
    temporary file behind. The file gets the mode of any new file (0666 less the process umask, like
    ``open``), not ``mkstemp``'s 0600. An ``OSError`` without a file name (a ``write`` that failed on a
    full disk) is given ``path`` as its file name, so the message says which file.
    """
    path = Path(path)
    tmp = _create_temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)
        raise


def _create_temporary(path: Path) -> str:
    """Create a new, empty file beside ``path`` under a unique hidden name; returns its name.

    Like ``tempfile.mkstemp`` (``O_EXCL``, a random name) but created with mode 0666, so that the kernel
    applies the umask as it does to every other file the user creates.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp"
        try:
            os.close(os.open(tmp, flags, 0o666))
        except FileExistsError:
            continue
        return str(tmp)
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def atomic_write_json(path: str | Path, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def ensure_writable_dir(path: str | Path, what: str = "output directory") -> Path:
    """Create ``path`` if needed and check that files can be written in it; AioliError if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        # a name of this process's own: processes checking the same folder at once (the parts of a
        # prepare) must not remove each other's probe
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise AioliError(f"{what} {path} is not writable: {exc.strerror or exc}") from exc
    return path


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True):
    """A tqdm bar on stderr when it is a terminal (and ``enabled``), else None (callers log lines)."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(
        total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False, mininterval=0.5
    )


def torch_file_damage(path: str | Path, name: str | None = None) -> str | None:
    """Why a file ``torch.save`` wrote cannot be whole, or None: torch writes the zip directory last, so
    a truncated or overwritten file fails this check without its tensors being read. ``name`` is what
    the message calls the file (default: its path)."""
    try:
        with zipfile.ZipFile(path):
            return None
    except (OSError, zipfile.BadZipFile) as exc:
        return f"{name or path} is damaged or truncated ({type(exc).__name__}: {exc})"


def say(message: str, bar=None) -> None:
    """One line of progress or advice on stderr; through ``bar`` (a tqdm bar) when one is drawn."""
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from ``/proc``), or None where it cannot be
    read (not Linux, no such process): with the boot id, what tells a process from a later one that got
    the same id after a restart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except (OSError, IndexError):
        return None
    return f"{boot}:{fields[19]}"


class FolderLock:
    """One process at a time in a folder: a lock file (``LOCK_NAME``) created with ``O_EXCL`` that
    names its holder (process id, host, start time), removed by :meth:`release`.

    A lock left by a process that is gone (killed, its machine or container restarted) is stale: on the
    holder's host the process is looked up by its id and its start, and a stale lock is taken over with a
    line saying so. A lock held from another host cannot be checked from here: it is refused, naming the
    holder and the file to remove if that process is gone.
    """

    LOCK_NAME = ".lock"

    def __init__(self, folder: str | Path, what: str = "folder", name: str = LOCK_NAME, target=None):
        self.path = Path(folder) / name
        self.what = what
        self.target = Path(target) if target is not None else Path(folder)  # what the messages name
        self.held = False
        self._me: dict = {}

    def acquire(self) -> FolderLock:
        """Take the lock, or raise AioliError naming the process that holds it."""
        pid = os.getpid()
        me = {"pid": pid, "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        me["start"] = _process_start(pid)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None or not self._stale(holder):
                    raise AioliError(self._busy(holder)) from None
                if not self._take_over(holder):
                    continue  # another process took it over first: look again
                say(
                    f"note: {self.what} {self.target} was locked by process {holder['pid']} on "
                    f"{holder['host']} (since {holder.get('since', '?')}), which is gone: lock taken over"
                )
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held, self._me = True, me
            return self
        raise AioliError(self._busy(self._holder()))

    def _take_over(self, stale: dict) -> bool:
        """Remove the stale lock ``stale``; False when the file there is another one by now (a process
        that judged the same lock stale replaced it first), which is then left as it is."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = json.loads(aside.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            moved = None
        if moved != stale:  # a live lock moved aside by mistake: put it back where it was
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # being written, or vanished: treated as held
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False
        if holder["pid"] == os.getpid():
            return True  # this process did not take it: an earlier one with the same id (a restart)
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's
        started = holder.get("start")
        return started is not None and _process_start(holder["pid"]) not in (None, started)

    def _busy(self, holder: dict | None) -> str:
        who = (
            f"process {holder['pid']} on {holder['host']} (since {holder.get('since', '?')})"
            if holder
            else "another process"
        )
        return (
            f"{self.what} {self.target} is in use by {who}: two processes must not write it at once. "
            f"Wait for it, or choose another name; if that process is gone, remove {self.path}"
        )

    def release(self) -> None:
        """Remove the lock if it is still this process's (once; nothing if it is not held)."""
        if self.held:
            if self._holder() == self._me:
                self.path.unlink(missing_ok=True)
            self.held = False
