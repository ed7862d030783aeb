"""Atomic writes leave either the old file or the new one, never a partial file or a temporary."""

import pytest

from aioli_fast.errors import AioliError
from aioli_fast.fileio import atomic_write, atomic_write_json, ensure_writable_dir


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "final.json"
    atomic_write_json(target, {"v": 1})

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write('{"v": 2, "trunc')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, crash)
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.json"]


def test_ensure_writable_dir_creates_and_rejects(tmp_path):
    made = ensure_writable_dir(tmp_path / "a" / "b")
    assert made.is_dir() and list(made.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AioliError, match=f"run directory {blocker / 'sub'} is not writable"):
        ensure_writable_dir(blocker / "sub", "run directory")


def _check_many_times(folder: str) -> str:
    from aioli_fast.fileio import ensure_writable_dir

    try:
        for _ in range(300):
            ensure_writable_dir(folder)
    except Exception as exc:  # reported to the parent
        return repr(exc)
    return ""


def test_processes_checking_one_folder_at_once_do_not_trip_each_other(tmp_path):
    """The parts of a prepare check their shared output folder at the same moment."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(4) as pool:
        errors = pool.map(_check_many_times, [str(tmp_path / "out")] * 4)
    assert errors == ["", "", "", ""]
    assert list((tmp_path / "out").iterdir()) == []  # no probe left behind


def test_a_folder_lock_tells_a_live_holder_from_a_gone_one(tmp_path, capsys):
    """Real processes: a live holder is refused by name; a lock of this very process id that this
    process did not take (a restarted container), or of a live id that started at another time (an id
    reused), is taken over; release never removes a lock that is no longer this process's."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from aioli_fast.fileio import FolderLock, _process_start

    lock = tmp_path / ".lock"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = {
            "pid": other.pid,
            "host": socket.gethostname(),
            "since": "t",
            "start": _process_start(other.pid),
        }
        lock.write_text(json.dumps(live))
        with pytest.raises(AioliError, match=f"is in use by process {other.pid} on .*remove {lock}"):
            FolderLock(tmp_path, "run directory").acquire()
        reused = {**live, "start": "another boot:1"}  # the same id, another process
        lock.write_text(json.dumps(reused))
        taken = FolderLock(tmp_path, "run directory").acquire()
        assert f"locked by process {other.pid}" in capsys.readouterr().err
        lock.write_text(json.dumps(live))  # someone else's lock now: release leaves it
        taken.release()
        assert json.loads(lock.read_text()) == live
    finally:
        other.kill()
        other.wait()
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "since": "before a restart"}
    lock.write_text(json.dumps(mine))
    again = FolderLock(tmp_path, "run directory").acquire()
    assert json.loads(lock.read_text())["since"] != "before a restart"
    again.release()
    assert not lock.exists()
