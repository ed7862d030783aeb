"""Training under failure: preemption during the final evaluation, full disks, damaged checkpoints and
diverged runs. Each ends in one clear line (or a warning and a finished run), never a traceback, and
never loses finished training or reports a diverged run as finished."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers import prepare_three_domains

from aioli_fast.config import config_from_dict
from aioli_fast.errors import ConfigError, DataError
from aioli_fast.train import TrainingError, train
from aioli_fast.train.checkpoint import RunCheckpoints

MiB = 2**20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare_three_domains(tmp_path_factory.mktemp("failures"))


def _config(root, name: str, **sections) -> dict:
    base = {
        "data": {"path": str(root / "corpus")},
        "model": {"preset": "tiny"},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {
            "steps": 12,
            "batch_size": 6,
            "log_every": 1,
            "out_dir": str(root / "runs"),
            "name": name,
            "progress": False,
        },
        "checkpoint": {"every": 0},
        "eval": {"batch_size": 8, "max_sequences": 6},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return base


def _command(tmp_path, cfg: dict, name: str = "run.json") -> list[str]:
    path = tmp_path / name
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return [sys.executable, "-m", "aioli_fast", "train", "--config", str(path)]


ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _limit_file_size(limit: int):
    """preexec_fn: files larger than ``limit`` bytes cannot be written (EFBIG, as a full disk would)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _records(run_dir) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


# ---- work lost ----------------------------------------------------------------------------------------


def test_sigterm_during_the_final_evaluation_keeps_the_training_and_the_same_command_evaluates(
    corpus, tmp_path
):
    # a slow evaluation (one sequence per forward, the whole held-out splits), checkpoint.every: 0
    cfg = _config(corpus, "eval-sigterm", eval={"batch_size": 1, "max_sequences": None})
    cmd = _command(tmp_path, cfg)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # the run says when its training is on disk; then it evaluates
        seen.append(line)
        if line.startswith("training saved in"):
            proc.send_signal(signal.SIGTERM)
            break
    _, rest = proc.communicate(timeout=300)
    err = "".join(seen) + rest
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM during the final evaluation; training is complete (step 12)" in err
    assert "Run the same command again to evaluate" in err and "Traceback" not in err
    run_dir = corpus / "runs" / "eval-sigterm"
    assert not (run_dir / "final.json").exists()
    weights = torch.load(run_dir / "model.pt", weights_only=True)["model"]

    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "at step 12" in again.stderr  # resumed at the end: no step trained again
    assert sorted(_records(run_dir)) == list(range(1, 13))
    final = json.loads((run_dir / "final.json").read_text())
    assert final["resumed_from_step"] == 12 and set(final) >= {"val", "test"}
    rewritten = torch.load(run_dir / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(weights[k], rewritten[k]) for k in weights)
    assert not RunCheckpoints(run_dir / "checkpoints", 2, 0).step_dirs()  # every: 0 keeps none after


def test_a_checkpoint_that_does_not_fit_before_the_evaluation_does_not_lose_the_run(corpus, tmp_path):
    # the engine state (weights and two AdamW moments, ~5.8 MB) cannot be written, model.pt (~1.9 MB) can
    cmd = _command(tmp_path, _config(corpus, "fsize-end"))
    out = subprocess.run(
        cmd, env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size(3 * MiB)
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "warning: could not write checkpoint" in out.stderr and "Traceback" not in out.stderr
    assert "going on to model.pt and the evaluation without it" in out.stderr
    run_dir = corpus / "runs" / "fsize-end"
    assert (run_dir / "final.json").is_file() and (run_dir / "model.pt").is_file()
    assert not list((run_dir / "checkpoints").glob(".step_*"))  # the partial folder is cleaned up


def test_a_model_pt_that_cannot_be_written_keeps_the_training_for_the_same_command(corpus, monkeypatch):
    import aioli_fast.train.trainer as trainer

    def full_disk(path, *args, **kwargs):  # a failing writer: the disk fills while model.pt is written
        raise OSError(28, "No space left on device", str(path))

    cfg = _config(corpus, "model-full")
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "save_checkpoint", full_disk)
        with pytest.raises(
            TrainingError, match=r"could not write .*model.pt \(\[Errno 28\] No space left"
        ) as err:
            train(config_from_dict(cfg))
    assert "step_00000012 holds the run: free space and run the same command again" in str(err.value)
    result = train(config_from_dict(cfg))  # the same command, with space again: evaluation only
    assert result.final["resumed_from_step"] == 12 and (result.run_dir / "model.pt").is_file()
    assert sorted(_records(result.run_dir)) == list(range(1, 13))


# ---- tracebacks instead of one line -------------------------------------------------------------------


def test_a_checkpoint_that_cannot_be_written_during_training_is_one_line(corpus, tmp_path):
    cmd = _command(tmp_path, _config(corpus, "fsize-every", checkpoint={"every": 6}))
    out = subprocess.run(
        cmd, env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size(3 * MiB)
    )
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("aioli-fast train: error: could not write checkpoint "), lines[-1]
    assert "step_00000006" in lines[-1] and "MiB free there" in lines[-1]
    assert "no earlier checkpoint exists" in lines[-1] and "Traceback" not in out.stderr
    checkpoints = corpus / "runs" / "fsize-every" / "checkpoints"
    assert not list(checkpoints.glob(".step_*")) and not list(checkpoints.glob("step_*"))


def test_a_damaged_latest_checkpoint_is_passed_over_for_the_previous_one(corpus, capsys):
    cfg = _config(corpus, "damaged", checkpoint={"every": 4, "keep_last": 3})
    first = train(config_from_dict(cfg)).run_dir
    expected = _records(first)
    (first / "final.json").unlink()  # as if the run had stopped during its final evaluation
    engine_file = first / "checkpoints" / "step_00000012" / "engine.pt"
    engine_file.write_bytes(engine_file.read_bytes()[: engine_file.stat().st_size // 2])  # truncated
    capsys.readouterr()
    result = train(config_from_dict(cfg))
    err = capsys.readouterr().err
    assert "warning: checkpoint" in err and "step_00000012 cannot be loaded, passed over" in err
    assert "engine.pt is damaged or truncated" in err
    assert "resuming from the previous complete checkpoint" in err and "at step 8" in err
    assert result.final["resumed_from_step"] == 8
    resumed = _records(result.run_dir)
    for step in range(9, 13):  # one process: bit for bit
        assert resumed[step]["loss"] == expected[step]["loss"], step

    named = _config(corpus, "named", checkpoint={"resume": str(engine_file.parent)})
    engine_file.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(first / "checkpoints" / "step_00000008", engine_file.parent, dirs_exist_ok=True)
    engine_file.write_bytes(b"PK\x03\x04 not a whole file")
    with pytest.raises(ConfigError, match=r"cannot be loaded: engine.pt is damaged or truncated"):
        train(config_from_dict(named))


def test_deepspeed_checkpoints_pass_the_damage_check(corpus):
    cfg = _config(corpus, "ds-check", engine={"zero_stage": 1}, train={"steps": 4}, checkpoint={"every": 4})
    run_dir = train(config_from_dict(cfg)).run_dir
    (checkpoint,) = RunCheckpoints(run_dir / "checkpoints", 2, 0).step_dirs()
    assert list(checkpoint.rglob("*.pt")) and RunCheckpoints.damage(checkpoint) is None


# ---- silently wrong -----------------------------------------------------------------------------------


def test_a_diverged_run_under_on_nan_skip_fails_instead_of_finishing(corpus):
    diverging = {"optim": {"lr": 1e6, "grad_clip": 0.0, "warmup_steps": 1}}
    cfg = _config(corpus, "skip-bounded", train={"on_nan": "skip", "steps": 40}, **diverging)
    with pytest.raises(TrainingError, match=r"on_nan=skip has skipped 3 of \d+ steps, more than "):
        train(config_from_dict(cfg))  # 5% of 40 steps: the third skipped step stops it
    assert not (corpus / "runs" / "skip-bounded" / "final.json").exists()
    # allowed to skip everything, it trains to the end, but its evaluation shows the divergence
    cfg = _config(
        corpus, "skip-all", train={"on_nan": "skip", "max_skipped_fraction": 1.0, "steps": 6}, **diverging
    )
    with pytest.raises(TrainingError, match=r"final val and test perplexity is not finite: the model has"):
        train(config_from_dict(cfg))
    run_dir = corpus / "runs" / "skip-all"
    assert (run_dir / "model.pt").is_file() and not (run_dir / "final.json").exists()


def test_deepspeed_steps_skipped_for_non_finite_gradients_stop_an_on_nan_stop_run(corpus, monkeypatch):
    # The second step's gradients are made infinite while its loss stays finite (a huge learning rate
    # does this on some CPUs only; others reach a NaN loss first). DeepSpeed, real, skips that update.
    from aioli_fast.train.engine import DeepSpeedEngine

    steps = []
    backward, step = DeepSpeedEngine.backward, DeepSpeedEngine.step
    monkeypatch.setattr(
        DeepSpeedEngine,
        "backward",
        lambda self, loss: backward(self, loss * float("inf") if len(steps) == 1 else loss),
    )
    monkeypatch.setattr(DeepSpeedEngine, "step", lambda self: (step(self), steps.append(1)))
    cfg = _config(
        corpus,
        "ds-nan",
        engine={"zero_stage": 1},
        train={"micro_batch_size": 3},
        mixing={"method": "aioli", "measurement": "probe", "round_steps": 6, "sweeps": 1, "block_steps": 1},
    )
    with pytest.raises(TrainingError, match=r"gradients were not finite on 1 step\(s\) up to step \d+ "):
        train(config_from_dict(cfg))
    assert not (corpus / "runs" / "ds-nan" / "final.json").exists()


def test_max_skipped_fraction_is_checked():
    with pytest.raises(ConfigError, match=r"train.max_skipped_fraction must be in \[0, 1\], got 1.5"):
        config_from_dict({"data": {"path": "c"}, "train": {"max_skipped_fraction": 1.5}})


# ---- checks that come too late ------------------------------------------------------------------------


def test_a_damaged_held_out_shard_stops_the_run_at_start_up(corpus, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(corpus / "corpus", damaged / "corpus")
    val_shard = sorted((damaged / "corpus").rglob("*val*.tar"))[0]
    size = val_shard.stat().st_size
    with open(val_shard, "r+b") as f:  # the size the manifest records, but not a tar any more
        f.write(b"\x5a" * 1024)
    assert val_shard.stat().st_size == size
    cfg = _config(damaged, "damaged-val")
    with pytest.raises(
        DataError, match=r"val shard .* of domain '\w+' is damaged \(.*\); run `aioli-fast verify`"
    ):
        train(config_from_dict(cfg))
    assert not (damaged / "runs" / "damaged-val" / "metrics.jsonl").exists()  # before any training


def _train_cli(corpus_root, name, *overrides, **popen):
    from helpers import TINY_TRAIN_OVERRIDES

    args = [sys.executable, "-m", "aioli_fast", "train", f"data.path={corpus_root / 'corpus'}"]
    args += [*TINY_TRAIN_OVERRIDES, f"train.out_dir={corpus_root / 'runs'}", f"train.name={name}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def test_a_second_run_into_the_same_run_directory_exits_naming_the_first(corpus):
    """Two `aioli-fast train` of the same train.name at once: the second exits 2 naming the process that
    holds the run directory, before touching it; the first finishes with every step logged once."""
    import time

    first = _train_cli(corpus, "locked", "train.steps=300")
    lock = corpus / "runs" / "locked" / ".lock"
    deadline = time.time() + 120
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert lock.exists(), first.communicate()[1]
    second = _train_cli(corpus, "locked", "train.steps=300")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2
    assert f"run directory {corpus / 'runs' / 'locked'} is in use by process {first.pid} on" in err, err
    assert "Traceback" not in err
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    steps = [json.loads(line)["step"] for line in (corpus / "runs" / "locked" / "metrics.jsonl").open()]
    steps = [s for s in steps if isinstance(s, int)]
    assert len(steps) == len(set(steps)) and not lock.exists()


def test_a_lock_left_by_a_killed_run_is_taken_over_and_said(corpus):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = corpus / "runs" / "stale"
    folder.mkdir(parents=True)
    import socket

    (folder / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "x"}))
    run = _train_cli(corpus, "stale")
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert f"was locked by process {dead.pid} on {socket.gethostname()} (since x), which is gone" in err
    assert (folder / "final.json").exists() and not (folder / ".lock").exists()
