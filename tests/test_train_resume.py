"""Run checkpoints in one process: resume equality, SIGTERM, keep-last-K, crash safety, NaN policies,
bad engine configs, and DeepSpeed in one process against the plain torch engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import prepare_three_domains

from aioli_fast.config import config_from_dict
from aioli_fast.distributed import launch_info
from aioli_fast.errors import AioliError, ConfigError
from aioli_fast.model import GPT, GPTConfig
from aioli_fast.train import TrainingError, train
from aioli_fast.train.checkpoint import RunCheckpoints
from aioli_fast.train.engine import DeepSpeedEngine, TorchEngine, init_distributed

DOMAINS = ["ab", "cd", "xyz"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare_three_domains(tmp_path_factory.mktemp("resume"))


def _config(root, name: str, **sections) -> dict:
    base = {
        "data": {"path": str(root / "corpus")},
        "model": {"preset": "tiny"},
        "mixing": {
            "method": "aioli",
            "measurement": "probe",
            "probe_sequences": 3,
            "round_steps": 6,
            "sweeps": 1,
            "block_steps": 1,
        },
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {
            "steps": 18,
            "batch_size": 6,
            "micro_batch_size": 3,
            "log_every": 1,
            "out_dir": str(root / "runs"),
            "name": name,
            "progress": False,
        },
        "checkpoint": {"every": 6},
        "eval": {"batch_size": 8, "max_sequences": 6},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return base


def records(run_dir) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


@pytest.fixture(scope="module")
def full_run(corpus):
    return train(config_from_dict(_config(corpus, "full"))).run_dir


def test_resume_from_a_checkpoint_is_exact(corpus, full_run):
    checkpoint = full_run / "checkpoints" / "step_00000012"
    result = train(config_from_dict(_config(corpus, "resumed", checkpoint={"resume": str(checkpoint)})))
    full, resumed = records(full_run), records(result.run_dir)
    assert sorted(resumed) == list(range(13, 19))
    for step in resumed:  # one process, the same kernels: bit for bit
        assert resumed[step]["loss"] == full[step]["loss"], step
        assert resumed[step]["proportions"] == full[step]["proportions"], step
        assert resumed[step]["domain_loss"] == full[step]["domain_loss"], step
    final = json.loads((full_run / "final.json").read_text())
    assert result.final["average"] == final["average"]
    assert result.final["mixer"]["measurements"] == final["mixer"]["measurements"]
    assert result.final["resumed_from_step"] == 12


def test_checkpoints_keep_the_last_k_and_latest(full_run):
    ck = full_run / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_00000012", "step_00000018"]
    state = RunCheckpoints.load_trainer_state(ck / "step_00000018")
    assert state["step"] == 18 and state["engine"] == "torch" and state["world_size"] == 1
    assert state["stream"]["step"] == 18 and len(state["ranks"]) == 1
    own = state["ranks"][0]
    assert own["mixer"]["method"] == "aioli" and isinstance(own["rng"]["torch"], torch.Tensor)


def test_resume_refuses_a_changed_config(corpus, full_run):
    checkpoint = full_run / "checkpoints" / "step_00000012"
    cfg = _config(corpus, "changed", checkpoint={"resume": str(checkpoint)}, train={"batch_size": 3})
    with pytest.raises(ConfigError, match=r"train.batch_size: 6 -> 3"):
        train(config_from_dict(cfg))
    with pytest.raises(ConfigError, match="not a run checkpoint"):
        train(config_from_dict(_config(corpus, "bad", checkpoint={"resume": str(full_run)})))


def test_a_finished_run_directory_is_not_resumed_or_overwritten_silently(corpus, full_run):
    with pytest.raises(AioliError, match="already holds a finished run"):
        train(config_from_dict(_config(corpus, "full")))


def test_a_fresh_start_removes_old_checkpoints_and_an_explicit_resume_is_honoured(corpus, full_run):
    import shutil

    run = corpus / "runs" / "restart"
    shutil.copytree(full_run, run)
    (run / "final.json").unlink()  # as if the run had crashed after its last checkpoint
    # a fresh start (resume: never) with fewer steps: the old step_12 / step_18 must not survive it,
    # and pruning must never delete what this run just wrote
    cfg = _config(corpus, "restart", checkpoint={"resume": "never", "every": 3}, train={"steps": 6})
    train(config_from_dict(cfg))
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_00000003", "step_00000006"]
    assert (ck / "latest").read_text().strip() == "step_00000006"
    assert sorted(records(run)) == list(range(1, 7))
    # overwrite=true with an explicit checkpoint: resumes from it (not afresh), drops newer checkpoints
    checkpoint = full_run / "checkpoints" / "step_00000012"
    cfg = _config(corpus, "restart", checkpoint={"resume": str(checkpoint)}, train={"overwrite": True})
    result = train(config_from_dict(cfg))
    assert result.final["resumed_from_step"] == 12
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_00000018"]
    with pytest.raises(ConfigError, match=r"it is at step 12, beyond train.steps=6"):
        train(
            config_from_dict(
                _config(corpus, "short", checkpoint={"resume": str(checkpoint)}, train={"steps": 6})
            )
        )


class _FailingEngine(TorchEngine):
    """A real engine whose save fails half-way, as a full disk would make it."""

    def save(self, folder):
        (folder / "engine.pt").write_bytes(b"half a file")
        raise OSError(28, "No space left on device")


def _tiny_engine(cls=TorchEngine, **train):
    cfg = config_from_dict({"data": {"path": "unused"}, "train": {"on_nan": "skip", **train}})
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, max_seq_len=8, d_model=16, n_layers=1, n_heads=2, d_ff=32))
    return cls(model, cfg, torch.device("cpu"), "fp32", micro_steps=1)


def test_a_crash_while_saving_never_damages_the_last_good_checkpoint(tmp_path):
    checkpoints = RunCheckpoints(tmp_path / "ck", keep_last=2, rank=0)
    engine = _tiny_engine()
    cpu = torch.device("cpu")
    for step in (1, 2, 3):
        checkpoints.save(step, engine, {"step": step}, {}, cpu)
    assert [p.name for p in checkpoints.step_dirs()] == ["step_00000002", "step_00000003"]
    failing = _tiny_engine(_FailingEngine)
    with pytest.raises(OSError, match="No space left"):
        checkpoints.save(4, failing, {"step": 4}, {}, cpu)
    assert checkpoints.latest().name == "step_00000003"  # untouched
    assert RunCheckpoints.load_trainer_state(checkpoints.latest())["step"] == 3
    assert not (tmp_path / "ck" / "step_00000004").exists()
    checkpoints.save(5, engine, {"step": 5}, {}, cpu)  # the next save clears the partial folder
    assert not list((tmp_path / "ck").glob(".step_*"))
    assert checkpoints.latest().name == "step_00000005"
    (tmp_path / "ck" / "step_00000005" / "trainer.pt").write_bytes(b"damaged")
    with pytest.raises(AioliError, match="damaged, or not a run checkpoint"):
        RunCheckpoints.load_trainer_state(tmp_path / "ck" / "step_00000005")


def _batch(vocab=64, n=4, t=8):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, t + 1), generator=g)
    return ids[:, :-1], ids[:, 1:], torch.zeros(n, dtype=torch.int32)


def _skip_check(engine):
    before = [p.detach().clone() for p in engine.module.parameters()]
    out = engine.forward(*_batch(), 1)
    engine.backward(out.loss * float("nan"))
    engine.step()
    assert engine.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    out = engine.forward(*_batch(), 1)
    engine.backward(out.loss)
    engine.step()
    assert engine.skipped_steps == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())


def test_torch_engine_skips_a_non_finite_step():
    _skip_check(_tiny_engine())


def test_deepspeed_zero1_skips_a_non_finite_step():
    cfg = config_from_dict(
        {
            "data": {"path": "unused"},
            "train": {"on_nan": "skip", "batch_size": 4},
            "engine": {"zero_stage": 1},
        }
    )
    init_distributed(cfg, launch_info(), torch.device("cpu"))  # a group of one, kept for the process
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, max_seq_len=8, d_model=16, n_layers=1, n_heads=2, d_ff=32))
    engine = DeepSpeedEngine(model, cfg, torch.device("cpu"), "fp32", 4, 1, 1)
    _skip_check(engine)


def test_a_non_finite_loss_stops_the_run_with_a_clear_message(corpus):
    cfg = _config(corpus, "nan", optim={"lr": 1e6, "grad_clip": 0.0}, checkpoint={"every": 0})
    with pytest.raises(TrainingError, match=r"loss was not finite .* set train.on_nan=skip"):
        train(config_from_dict(cfg))


def test_deepspeed_in_one_process_matches_the_torch_engine(corpus, full_run):
    result = train(config_from_dict(_config(corpus, "ds-zero1", engine={"zero_stage": 1})))
    assert result.final["engine"] == "deepspeed ZeRO-1"
    full, ds = records(full_run), records(result.run_dir)
    for step in full:
        assert ds[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-5), step
        got, want = ds[step]["proportions"], full[step]["proportions"]
        assert [got[d] for d in DOMAINS] == pytest.approx([want[d] for d in DOMAINS], abs=1e-5), step


@pytest.mark.parametrize(
    "section, message",
    [
        ({"engine": {"zero_stage": 4}}, "engine.zero_stage must be 0, 1, 2 or 3; got 4"),
        ({"engine": {"backend": "torch", "zero_stage": 2}}, "needs engine.backend=deepspeed"),
        ({"engine": {"backend": "tpu"}}, "engine.backend must be one of auto, torch, deepspeed"),
        ({"engine": {"offload_optimizer": True}}, "engine.offload_optimizer needs engine.zero_stage >= 1"),
        ({"checkpoint": {"keep_last": 0}}, "checkpoint.keep_last must be >= 1"),
        ({"train": {"on_nan": "ignore"}}, "train.on_nan must be stop or skip"),
    ],
)
def test_bad_engine_and_checkpoint_configs(corpus, section, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(_config(corpus, "bad", **section))


def test_doge_is_refused_under_deepspeed(corpus):
    cfg = _config(corpus, "doge-ds", mixing={"method": "doge"}, engine={"zero_stage": 1})
    cfg["mixing"] = {"method": "doge"}
    with pytest.raises(ConfigError, match="doge takes per-domain gradients"):
        train(config_from_dict(cfg))


def test_sigterm_writes_a_checkpoint_and_the_same_command_resumes(corpus, tmp_path):
    cfg_file = tmp_path / "run.json"  # JSON is YAML
    cfg = _config(corpus, "sigterm", checkpoint={"every": 0})
    cfg_file.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "aioli_fast", "train", "--config", str(cfg_file)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = corpus / "runs" / "sigterm" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be signalled"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM after step" in err and "Run the same command again to resume" in err
    assert "Traceback" not in err
    run_dir = corpus / "runs" / "sigterm"
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 2 <= stopped_at < 18 and not (run_dir / "final.json").exists()

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"at step {stopped_at}" in again.stderr
    # the uninterrupted run, launched the same way (the same threads: bit-for-bit comparable)
    ref_file = tmp_path / "ref.json"
    ref_file.write_text(json.dumps(_config(corpus, "sigterm-ref", checkpoint={"every": 0})))
    ref = subprocess.run([*cmd[:-1], str(ref_file)], env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    full, resumed = records(corpus / "runs" / "sigterm-ref"), records(run_dir)
    assert sorted(resumed) == list(range(1, 19))
    for step in resumed:
        assert resumed[step]["loss"] == full[step]["loss"], step
        assert resumed[step]["proportions"] == full[step]["proportions"], step
    final = json.loads((run_dir / "final.json").read_text())
    final_ref = json.loads((corpus / "runs" / "sigterm-ref" / "final.json").read_text())
    assert final["average"] == final_ref["average"]


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(seq_len=32), "seq_len (16 -> 32)"),
        (dict(shard_sequences=8), "the shards of ab/test, ab/train"),
        (dict(seed=7), "the shards of ab/test, ab/train"),
    ],
    ids=["seq_len", "shard_layout", "seed"],
)
def test_resume_refuses_a_corpus_prepared_again_under_the_same_names(tmp_path, change, expected):
    """The corpus's fingerprint is in every run checkpoint: a corpus prepared again (other seq_len, shard
    layout or seed) under the same domain names is named, not resumed on (it used to continue on it, or
    crash in the stream); a copy of the corpus elsewhere resumes."""
    from aioli_fast.data import prepare

    root = prepare_three_domains(tmp_path)
    run = config_from_dict(_config(root, "first", train={"steps": 6}, checkpoint={"every": 3}))
    train(run)
    checkpoint = root / "runs" / "first" / "checkpoints" / "step_00000003"
    moved = tmp_path / "moved"
    (root / "corpus").rename(moved)  # the same corpus in another place: resumes
    again = _config(root, "copy", checkpoint={"resume": str(checkpoint)}, data={"path": str(moved)})
    train(config_from_dict(again))
    sources = {name: [str(root / "raw" / name)] for name in DOMAINS}
    options = dict(seq_len=16, val_fraction=0.2, test_fraction=0.1, shard_sequences=16, progress=False)
    prepare(sources, root / "corpus", **{**options, **change})
    resumed = _config(root, "second", checkpoint={"resume": str(checkpoint)})
    with pytest.raises(ConfigError, match=r"is not the corpus it trained on \(changed: .*") as info:
        train(config_from_dict(resumed))
    assert expected in str(info.value) and "another train.name" in str(info.value)
    # on purpose: the model continues, the stream starts afresh on the new corpus at the resumed step
    resumed["checkpoint"]["new_corpus"] = True
    result = train(config_from_dict(resumed))
    assert result.final["resumed_from_step"] == 3 and result.final["steps"] == 18
