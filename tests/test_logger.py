"""The metrics log: JSON lines as the loop writes them, truncation on resume, TensorBoard scalars.

Every check reads the files back from disk: the lines of metrics.jsonl, what survives a truncation
(including a line a crash cut short), and, when the tensorboard package is installed, the scalars in
the event files as TensorBoard itself reads them.
"""

from __future__ import annotations

import json

import pytest

from aioli_fast.errors import ConfigError, DataError
from aioli_fast.train.logger import MetricsLog, scalar_items, tensorboard_available

DOMAINS = ("code", "web")


def train_record(step: int, loss: float) -> dict:
    """A training record in the loop's format (aioli_fast/train/trainer.py)."""
    return {
        "step": step,
        "loss": loss,
        "domain_loss": {"code": loss - 0.5, "web": None},
        "proportions": {"code": 0.75, "web": 0.25},
        "mixer_updates": 3.0,
        "data_skipped_samples": 0,
        "lr": 1e-3,
        "tokens": step * 64,
        "tokens_per_s": 1234.5,
        "elapsed_s": step / 10,
    }


def eval_record(step: int, loss: float) -> dict:
    domains = {d: {"loss": loss + i, "ppl": 2.0 + i, "tokens": 32} for i, d in enumerate(DOMAINS)}
    return {"step": step, "eval": {"val": {"domains": domains, "average": {"loss": loss + 0.5, "ppl": 2.5}}}}


def read_steps(path) -> list[tuple[int, str]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["step"], "eval" if "eval" in r else "train") for r in records]


def test_records_are_json_lines_flushed_at_each_write(tmp_path):
    run = tmp_path / "run"
    with MetricsLog(run, tensorboard="off") as log:
        assert not (run / "metrics.jsonl").exists()  # nothing is created before the first write
        log.write(train_record(10, 2.5))
        # readable while the log is still open: every write is flushed
        assert [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] == [
            train_record(10, 2.5)
        ]
        log.write(eval_record(10, 2.0))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [train_record(10, 2.5), eval_record(10, 2.0)]
    assert json.loads(lines[0])["domain_loss"]["web"] is None  # null, as the loop writes it
    assert not (run / "tensorboard").exists()

    # a log opened again on the same run appends
    with MetricsLog(run, tensorboard="off") as log:
        log.write(train_record(20, 2.0))
    assert read_steps(run / "metrics.jsonl") == [(10, "train"), (10, "eval"), (20, "train")]


def test_a_record_needs_an_integer_step(tmp_path):
    with MetricsLog(tmp_path, tensorboard="off") as log:
        for bad in ({"loss": 1.0}, {"step": "3", "loss": 1.0}, {"step": True, "loss": 1.0}):
            with pytest.raises(ValueError, match="integer 'step'"):
                log.write(bad)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_disabled_log_touches_nothing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(train_record(10, 1.0)) + "\n")
    before = (tmp_path / "metrics.jsonl").read_bytes()
    log = MetricsLog(tmp_path, enabled=False, tensorboard="auto")
    log.write(train_record(20, 1.0))
    log.truncate_after(0)
    log.close()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert log.tensorboard_dir is None


def test_truncate_after_keeps_records_up_to_the_step(tmp_path):
    log = MetricsLog(tmp_path, tensorboard="off")
    for step in (10, 20, 30, 40):
        log.write(train_record(step, 3.0 - step / 100))
        if step % 20 == 0:
            log.write(eval_record(step, 2.0))
    log.truncate_after(20)
    assert read_steps(tmp_path / "metrics.jsonl") == [(10, "train"), (20, "train"), (20, "eval")]
    # the log goes on appending to the rewritten file (not to the replaced one it had open)
    log.write(train_record(30, 2.6))
    log.close()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 20, 30]
    assert records[-1]["loss"] == 2.6
    assert records[0] == train_record(10, 2.9)  # kept lines are unchanged
    # atomic rewrite: no temporary file left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]

    log.truncate_after(0)
    assert (tmp_path / "metrics.jsonl").read_bytes() == b""


@pytest.mark.parametrize(
    "tail",
    [b'{"step": 30, "loss": 2.', b'{"step": 30, "lo\n', b"\x00\x00\x00\x00", b'{"step": 25'],
    ids=["cut-short", "garbage-with-newline", "zero-bytes", "cut-before-the-step"],
)
def test_truncate_after_drops_a_damaged_last_line(tmp_path, tail):
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps(train_record(s, 2.0)) + "\n" for s in (10, 20)]
    path.write_bytes("".join(good).encode() + tail)
    MetricsLog(tmp_path, tensorboard="off").truncate_after(100)
    assert path.read_text() == "".join(good)


def test_truncate_after_a_complete_last_line_without_newline_is_also_dropped(tmp_path):
    # the write of a line and its newline are one write; without the newline the line is not known
    # to be complete (a crash between the two parts of a split write), so it is not kept
    path = tmp_path / "metrics.jsonl"
    first = json.dumps(train_record(10, 2.0)) + "\n"
    path.write_text(first + json.dumps(train_record(20, 1.0)))
    MetricsLog(tmp_path, tensorboard="off").truncate_after(100)
    assert path.read_text() == first


def test_truncate_after_refuses_a_damaged_line_before_the_last(tmp_path):
    path = tmp_path / "metrics.jsonl"
    content = (
        json.dumps(train_record(10, 2.0)) + "\n" + "not json\n" + json.dumps(train_record(20, 1.0)) + "\n"
    ).encode()
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        MetricsLog(tmp_path, tensorboard="off").truncate_after(100)
    assert str(err.value).startswith(f"{path}:2: damaged metrics record")
    assert path.read_bytes() == content  # left as it was


def test_truncate_after_without_a_metrics_file(tmp_path):
    log = MetricsLog(tmp_path / "new", tensorboard="off")
    log.truncate_after(50)
    assert not (tmp_path / "new").exists()
    log.write(train_record(60, 1.0))
    log.close()
    assert read_steps(tmp_path / "new" / "metrics.jsonl") == [(60, "train")]


def test_scalar_tags_flatten_the_record():
    scalars = dict(scalar_items(train_record(10, 2.5)))
    assert scalars == {
        "loss": 2.5,
        "domain_loss/code": 2.0,  # domain_loss/web is None: left out
        "proportions/code": 0.75,
        "proportions/web": 0.25,
        "mixer_updates": 3.0,
        "data_skipped_samples": 0.0,
        "lr": 1e-3,
        "tokens": 640.0,
        "tokens_per_s": 1234.5,
        "elapsed_s": 1.0,
    }
    scalars = dict(scalar_items(eval_record(20, 1.0)))
    assert scalars["eval/val/average/ppl"] == 2.5 and scalars["eval/val/average/loss"] == 1.5
    assert scalars["eval/val/domains/web/loss"] == 2.0 and scalars["eval/val/domains/code/tokens"] == 32.0
    assert "step" not in scalars and len(scalars) == 8
    assert dict(
        scalar_items({"step": 1, "name": "x", "flag": True, "ids": [1, 2], "nested": {"step": 4}})
    ) == {"nested/step": 4.0}


def test_tensorboard_modes_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="train.tensorboard must be one of auto, on, off, got 'yes'"):
        MetricsLog(tmp_path, tensorboard="yes")
    with MetricsLog(tmp_path, tensorboard="off") as log:
        log.write(train_record(10, 1.0))
    assert log.tensorboard_dir is None and not (tmp_path / "tensorboard").exists()


@pytest.mark.skipif(tensorboard_available(), reason="the tensorboard package is installed")
def test_without_tensorboard_auto_is_silent_and_on_is_an_error(tmp_path, capsys):
    with MetricsLog(tmp_path, tensorboard="auto") as log:
        log.write(train_record(10, 1.0))
    assert log.tensorboard_dir is None and not (tmp_path / "tensorboard").exists()
    assert capsys.readouterr() == ("", "")
    for enabled in (True, False):  # every rank fails alike
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            MetricsLog(tmp_path / "on", enabled=enabled, tensorboard="on")
    assert not (tmp_path / "on").exists()


def _event_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, round(e.value, 5)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.skipif(not tensorboard_available(), reason="the tensorboard package is not installed")
@pytest.mark.parametrize("mode", ["auto", "on"])
def test_tensorboard_scalars_and_purge_on_resume(tmp_path, mode):
    with MetricsLog(tmp_path, tensorboard=mode) as log:
        assert log.tensorboard_dir == tmp_path / "tensorboard"
        for step in (10, 20, 30):
            log.write(train_record(step, 3.0 - step / 100))
        log.write(eval_record(20, 1.0))
    scalars = _event_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(10, 2.9), (20, 2.8), (30, 2.7)]
    assert scalars["domain_loss/code"] == [(10, 2.4), (20, 2.3), (30, 2.2)]
    assert scalars["proportions/web"] == [(10, 0.25), (20, 0.25), (30, 0.25)]
    assert scalars["eval/val/average/ppl"] == [(20, 2.5)]
    assert "domain_loss/web" not in scalars and "step" not in scalars

    # resume from a checkpoint at step 20: the events after it are purged, the new ones follow
    with MetricsLog(tmp_path, tensorboard=mode) as log:
        log.truncate_after(20)
        log.write(train_record(30, 1.0))
    scalars = _event_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(10, 2.9), (20, 2.8), (30, 1.0)]
    assert read_steps(tmp_path / "metrics.jsonl") == [
        (10, "train"),
        (20, "train"),
        (20, "eval"),
        (30, "train"),
    ]
