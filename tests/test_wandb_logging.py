"""``logging.wandb``: the native trainer logs to Weights & Biases what TensorBoard gets, checked with the
real ``wandb`` package in offline mode by reading back the records it wrote (its ``.wandb`` file: a
log of length-prefixed protobuf records in 32 KiB blocks, parsed with wandb's own protobuf classes)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from helpers import prepare_three_domains

from aioli_fast.config import config_from_dict
from aioli_fast.errors import ConfigError
from aioli_fast.train import train

wandb = pytest.importorskip("wandb")
pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

BLOCK = 32768


def history(run_folder: Path) -> list[dict]:
    """The history rows (``{key: value}``) an offline W&B run wrote."""
    rows = []
    for file in sorted(run_folder.glob("*.wandb")):
        rows += _records(file.read_bytes())
    return rows


def _records(data: bytes) -> list[dict]:
    pos, pending, payloads = 7, b"", []  # 7: the file header (":W&B", magic, version)
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            payloads.append(pending)
    rows = []
    for payload in payloads:
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare_three_domains(tmp_path_factory.mktemp("wandb"))


def _config(root: Path, out: Path, **extra) -> dict:
    cfg = {
        "data": {"path": str(root / "corpus")},
        "model": {"preset": "tiny"},
        "mixing": {
            "method": "aioli",
            "measurement": "train",
            "round_steps": 6,
            "sweeps": 1,
            "block_steps": 1,
        },
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {
            "steps": 8,
            "batch_size": 4,
            "log_every": 2,
            "out_dir": str(out),
            "name": "wb",
            "progress": False,
        },
        "eval": {"every": 4, "max_sequences": 4},
        "checkpoint": {"every": 4},
        "logging": {"wandb": {"project": "aioli-tests", "mode": "offline", "dir": str(out / "wandb-files")}},
    }
    for section, values in extra.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def test_offline_wandb_gets_what_tensorboard_gets_and_a_resume_continues_the_run(
    corpus, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = train(config_from_dict(_config(corpus, tmp_path)))
    run_id = (result.run_dir / "wandb_run_id").read_text().strip()
    (folder,) = (tmp_path / "wandb-files" / "wandb").glob(f"offline-run-*-{run_id}*")
    rows = history(folder)
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in metrics if "loss" in r]
    logged = {row["_step"]: row for row in rows}
    assert sorted(logged) == sorted({r["step"] for r in metrics})
    for record in (r for r in metrics if "loss" in r):
        row = logged[record["step"]]
        assert row["loss"] == pytest.approx(record["loss"])
        for domain in ("ab", "cd", "xyz"):
            assert row[f"proportions/{domain}"] == pytest.approx(record["proportions"][domain])
            assert row[f"domain_loss/{domain}"] == pytest.approx(record["domain_loss"][domain])
    evals = [r for r in metrics if "eval" in r]
    assert evals and all(
        logged[r["step"]]["eval/val/average/ppl"] == pytest.approx(r["eval"]["val"]["average"]["ppl"])
        for r in evals
    )
    assert train_steps == [2, 4, 6, 8]

    # a run stopped after its step-4 checkpoint (no final.json), resumed by the same command with more
    # steps: the same W&B run id, its history continues
    short = _config(corpus, tmp_path, train={"steps": 4, "name": "wb2"})
    first = train(config_from_dict(short))
    (first.run_dir / "final.json").unlink()
    resumed = train(config_from_dict(_config(corpus, tmp_path, train={"steps": 6, "name": "wb2"})))
    assert resumed.final["resumed_from_step"] == 4
    run_id = (first.run_dir / "wandb_run_id").read_text().strip()
    folders = sorted((tmp_path / "wandb-files" / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert folders  # offline folders are named by start time and run id: one or two here
    assert {row["_step"] for f in folders for row in history(f)} >= {2, 4, 6}


def test_bad_wandb_options_are_refused(corpus, tmp_path):
    cfg = _config(corpus, tmp_path)
    cfg["logging"]["wandb"]["mode"] = "sometimes"
    with pytest.raises(ConfigError, match="logging.wandb.mode must be one of online, offline, disabled"):
        config_from_dict(cfg)
    cfg["logging"]["wandb"] = {"projekt": "x"}
    with pytest.raises(ConfigError, match="did you mean 'logging.wandb.project'"):
        config_from_dict(cfg)
