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
