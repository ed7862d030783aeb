"""``aioli-fast report``: run directories from real training runs -> report.md and PNG figures.

Two tiny runs are trained through the command line (stratified with validation every 4 steps, and a
static 3:1 mixture); the checks read the report's tables back and compare every figure with the runs'
final.json and metrics.jsonl, check that the figures are real PNGs and that the links resolve, and
check the one-line errors for inputs that are not run directories or are damaged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct

import pytest
import yaml
from helpers import TINY_TRAIN_OVERRIDES, write_alphabet_domain

from aioli_fast.cli import main
from aioli_fast.errors import AioliError
from aioli_fast.report import load_run, read_metrics, validation_points, write_report
from aioli_fast.train.logger import MetricsLog

SEQ = 16
DOMAINS = ["ab", "xyz"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    write_alphabet_domain(root / "raw" / "ab", "ab", 30, 0)
    write_alphabet_domain(root / "raw" / "xyz", "xyz", 30, 1)
    prepare = ["prepare", "--domain", f"ab={root / 'raw' / 'ab'}", "--domain", f"xyz={root / 'raw' / 'xyz'}"]
    prepare += ["--out", str(root / "corpus"), "--seq-len", str(SEQ), "--val-fraction", "0.2"]
    assert main([*prepare, "--test-fraction", "0.2", "--quiet"]) == 0
    common = [
        "train",
        f"data.path={root / 'corpus'}",
        f"train.out_dir={root / 'runs'}",
        *TINY_TRAIN_OVERRIDES,
        "eval.max_sequences=4",
    ]
    assert main([*common, "train.name=strat", "eval.every=4"]) == 0
    assert (
        main([*common, "train.name=static", "mixing.method=static", "mixing.proportions={ab: 3, xyz: 1}"])
        == 0
    )
    return root / "runs"


def parse_tables(markdown: str) -> dict[str, dict[str, dict[str, str]]]:
    """{section title: {first cell of a row: {column: cell}}} for every table of a Markdown page."""
    tables, section, header = {}, None, None
    for line in markdown.splitlines():
        if line.startswith("## "):
            section, header = line[3:], None
        elif line.startswith("|") and section is not None:
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            if header is None:
                header = cells
            elif not set(line) <= set("|-: "):
                tables.setdefault(section, {})[cells[0]] = dict(zip(header, cells))
    return tables


def png_size(path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature and that it holds image data."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR" and b"IDAT" in data and data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", data[16:24])


def test_report_tables_match_final_json(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["report", str(runs / "strat"), str(runs / "static"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'report.md'} and train_loss.png, proportions.png, val_loss.png" in printed
    text = (out / "report.md").read_text()
    tables = parse_tables(text)

    for name in ("strat", "static"):
        final = json.loads((runs / name / "final.json").read_text())
        row = tables["Summary"][name]
        assert row["method"] == {"strat": "stratified", "static": "static"}[name]
        assert row["steps"] == "12" == str(final["steps"])
        assert row["tokens"] == f"{12 * 4 * SEQ:,}" == f"{final['tokens']:,}"
        assert row["tokens/s"] == f"{final['tokens_per_s']:,.0f}"
        assert row["val loss"] == f"{final['average']['val_loss']:.4f}"
        assert row["val ppl"] == f"{final['average']['val_ppl']:.3f}"
        assert row["test loss"] == f"{final['average']['test_loss']:.4f}"
        assert row["test ppl"] == f"{final['average']['test_ppl']:.3f}"
        for d in DOMAINS:
            test_ppl = tables["Per-domain test perplexity"][name][d]
            assert test_ppl == f"{final['test']['domains'][d]['ppl']:.3f}"
            assert (
                tables["Per-domain validation perplexity"][name][d]
                == f"{final['val']['domains'][d]['ppl']:.3f}"
            )
            assert tables["Final proportions"][name][d] == f"{final['proportions'][d]:.3f}"
    assert tables["Final proportions"]["static"] == {"run": "static", "ab": "0.750", "xyz": "0.250"}
    assert tables["Final proportions"]["strat"] == {"run": "strat", "ab": "0.500", "xyz": "0.500"}

    # every link is relative and resolves from the report's folder
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert images == ["train_loss.png", "proportions.png", "val_loss.png"]
    for image in images:
        width, height = png_size(out / image)
        assert width >= 400 and height >= 250
        assert (out / image).stat().st_size > 15_000  # drawn curves, not an empty canvas
    run_links = re.findall(r"^- \*\*(\w+)\*\*: \[`([^`]+)`\]\(([^)]+)\), finished$", text, re.M)
    assert [(label, target) for label, _, target in run_links] == [
        ("strat", os.path.relpath(runs / "strat", out)),
        ("static", os.path.relpath(runs / "static", out)),
    ]
    for _, _, target in run_links:
        assert not os.path.isabs(target) and (out / target / "final.json").exists()


def test_figures_depend_on_the_runs(runs, tmp_path):
    """More domains panels draw more pixels; a run with different curves draws a different figure."""
    one = write_report([runs / "static"], tmp_path / "one")
    two = write_report([runs / "static", runs / "strat"], tmp_path / "two")
    for name in ("train_loss.png", "val_loss.png"):
        assert (tmp_path / "one" / name).read_bytes() != (tmp_path / "two" / name).read_bytes()
    w1, h1 = png_size(tmp_path / "one" / "proportions.png")
    w2, h2 = png_size(tmp_path / "two" / "proportions.png")
    assert w2 > w1 and h2 == h1  # one proportion panel per run, side by side
    assert [r.label for r in one.runs] == ["static"] and [r.label for r in two.runs] == ["static", "strat"]
    assert two.figures == [
        tmp_path / "two" / n for n in ("train_loss.png", "proportions.png", "val_loss.png")
    ]


def test_validation_curve_points_come_from_the_eval_records_and_final_json(runs):
    run = load_run(runs / "strat")
    assert [r["step"] for r in run.evals] == [4, 8]
    assert [r["step"] for r in run.train] == [4, 8, 12]
    points = validation_points(run)
    assert [s for s, _ in points] == [4, 8, 12]
    assert points[-1][1] == run.final["val"]
    assert points[0][1] == run.evals[0]["eval"]["val"]


def make_unfinished_run(source, target, keep_step: int, partial: bytes = b"") -> None:
    """A copy of a finished run as it looked at ``keep_step`` (without final.json), plus a partial line."""
    shutil.copytree(source, target)
    (target / "final.json").unlink()
    (target / "model.pt").unlink()
    MetricsLog(target, tensorboard="off").truncate_after(keep_step)
    with open(target / "metrics.jsonl", "ab") as f:
        f.write(partial)


def test_unfinished_run_is_reported_from_its_metrics(runs, tmp_path, capsys):
    live = tmp_path / "live"
    make_unfinished_run(runs / "strat", live, 8, partial=b'{"step": 12, "loss": 2.')
    records = [json.loads(line) for line in (live / "metrics.jsonl").read_text().splitlines()[:-1]]
    last_train = [r for r in records if "loss" in r][-1]
    assert last_train["step"] == 8

    out = tmp_path / "out"
    assert main(["report", str(runs / "static"), str(live), "--out", str(out)]) == 0
    assert "unfinished (no final.json): live" in capsys.readouterr().out
    text = (out / "report.md").read_text()
    assert "- **live**: " in text and ", unfinished (8 of 12 steps)" in text
    row = parse_tables(text)["Summary"]["live (unfinished)"]
    assert row["steps"] == "8" and row["tokens"] == f"{8 * 4 * SEQ:,}"
    windows = [r for r in records if "loss" in r]  # steps 4 and 8: 4 x 4 x SEQ tokens each
    seconds = sum(4 * 4 * SEQ / r["tokens_per_s"] for r in windows)
    assert row["tokens/s"] == f"{8 * 4 * SEQ / seconds:,.0f}"
    assert row["val loss"] == row["test ppl"] == "–"
    assert parse_tables(text)["Per-domain test perplexity"]["live"] == {"run": "live", "ab": "–", "xyz": "–"}
    assert parse_tables(text)["Final proportions"]["live"]["ab"] == f"{last_train['proportions']['ab']:.3f}"
    assert (out / "val_loss.png").exists()  # eval records at steps 4 and 8 survive the truncation


def test_run_written_by_the_metrics_log_without_evaluations(runs, tmp_path):
    """A run directory whose metrics come from MetricsLog; no validation: no val_loss.png, and a
    val_loss.png of an earlier report in the same folder is removed."""
    out = tmp_path / "out"
    write_report([runs / "strat"], out)
    assert (out / "val_loss.png").exists()

    run = tmp_path / "fresh"
    run.mkdir()
    config = yaml.safe_load((runs / "static" / "config.yaml").read_text())
    config["train"]["steps"] = 20
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with MetricsLog(run, tensorboard="off") as log:
        for step in (5, 10, 15):
            p = step / 20
            log.write(
                {
                    "step": step,
                    "loss": 3.0 - step / 10,
                    "domain_loss": {"ab": 2.0, "xyz": None},
                    "proportions": {"ab": p, "xyz": 1 - p},
                    "lr": 1e-3,
                    "tokens": step * 100,
                    "tokens_per_s": 50.0,
                    "elapsed_s": step * 2.0,
                }
            )
    report = write_report([run], out)
    assert [f.name for f in report.figures] == ["train_loss.png", "proportions.png"]
    assert not (out / "val_loss.png").exists()
    text = report.path.read_text()
    assert "val_loss.png" not in text and "## Validation loss" not in text
    assert "Per-domain test perplexity" not in text  # no run has a test result
    tables = parse_tables(text)
    assert tables["Summary"]["fresh (unfinished)"]["tokens"] == "1,500"
    assert tables["Summary"]["fresh (unfinished)"]["tokens/s"] == "50"
    assert tables["Final proportions"]["fresh"] == {"run": "fresh", "ab": "0.750", "xyz": "0.250"}
    assert "- **fresh**: " in text and ", unfinished (15 of 20 steps)" in text


def test_runs_with_the_same_directory_name_get_distinct_labels(runs, tmp_path):
    shutil.copytree(runs / "strat", tmp_path / "a" / "strat")
    shutil.copytree(runs / "strat", tmp_path / "b" / "strat")
    report = write_report([tmp_path / "a" / "strat", tmp_path / "b" / "strat"], tmp_path / "out")
    assert [r.label for r in report.runs] == ["a/strat", "b/strat"]
    assert set(parse_tables(report.path.read_text())["Summary"]) == {"a/strat", "b/strat"}


def test_a_step_logged_twice_keeps_the_later_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 4, "loss": 3.0},
        {"step": 8, "loss": 2.0},
        {"step": 4, "loss": 2.5},
        {"step": 6, "x": 1},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    train, evals = read_metrics(path)
    assert train == [{"step": 4, "loss": 2.5}, {"step": 8, "loss": 2.0}] and evals == []


def _report_error(capsys, *args) -> str:
    assert main(["report", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aioli-fast report: error: ") and err.count("\n") == 1
    return err.strip()


def test_bad_inputs_end_with_one_line(runs, tmp_path, capsys):
    out = tmp_path / "out"
    err = _report_error(capsys, tmp_path / "nowhere", "--out", out)
    assert f"{tmp_path / 'nowhere'} does not exist; expected a run directory" in err

    (tmp_path / "corpusish").mkdir()
    (tmp_path / "corpusish" / "manifest.json").write_text("{}")
    err = _report_error(capsys, runs / "strat", tmp_path / "corpusish", "--out", out)
    assert f"{tmp_path / 'corpusish'} is not a run directory: it has no config.yaml" in err

    err = _report_error(capsys, runs / "strat" / "final.json", "--out", out)
    assert "final.json is not a directory" in err

    damaged = tmp_path / "damaged"
    shutil.copytree(runs / "static", damaged)
    lines = (damaged / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1][: len(lines[1]) // 2] + "\n"
    (damaged / "metrics.jsonl").write_text("".join(lines))
    err = _report_error(capsys, damaged, "--out", out)
    assert f"{damaged / 'metrics.jsonl'}:2: damaged metrics record: not valid JSON" in err

    # a finished run's last line must be complete too (nothing is still writing it)
    lines = (runs / "static" / "metrics.jsonl").read_text().splitlines(keepends=True)
    (damaged / "metrics.jsonl").write_text("".join(lines[:-1]) + lines[-1][:20])
    err = _report_error(capsys, damaged, "--out", out)
    assert f"metrics.jsonl:{len(lines)}: damaged metrics record" in err

    (damaged / "metrics.jsonl").write_text('{"step": 4, "loss": 2.0}\n{"step": -1, "loss": 1.0}\n')
    err = _report_error(capsys, damaged, "--out", out)
    assert "metrics.jsonl:2: damaged metrics record: 'step' must be a non-negative integer, got -1" in err

    (damaged / "metrics.jsonl").write_text('{"step": 4, "loss": 2.0, "proportions": [0.5, 0.5]}\n')
    err = _report_error(capsys, damaged, "--out", out)
    assert "metrics.jsonl:1: damaged metrics record: 'proportions' must map domains to numbers" in err

    (damaged / "metrics.jsonl").write_text('{"step": 4, "loss": 2.0}\n')
    (damaged / "final.json").write_text('{"steps": 12, "tok')
    err = _report_error(capsys, damaged, "--out", out)
    assert f"{damaged / 'final.json'} is damaged: not valid JSON" in err

    (damaged / "final.json").unlink()
    (damaged / "config.yaml").write_text("- just\n- a list\n")
    err = _report_error(capsys, damaged, "--out", out)
    assert f"{damaged / 'config.yaml'} is damaged: expected a mapping" in err
    assert not out.exists()  # nothing was written for any of these

    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    err = _report_error(capsys, runs / "strat", "--out", blocker)
    assert f"report directory {blocker} is not writable" in err


def test_report_api_errors(tmp_path):
    with pytest.raises(AioliError, match="no run directory given"):
        write_report([], tmp_path)


def test_config_of_the_run_is_read(runs):
    run = load_run(runs / "static")
    assert run.config == yaml.safe_load((runs / "static" / "config.yaml").read_text())
    assert run.method == "static" and run.domains == DOMAINS and run.finished and run.status() == "finished"


@pytest.fixture(scope="module")
def previous_report(runs, tmp_path_factory):
    """A complete report of the static run, to be copied into --out before a report that fails."""
    out = tmp_path_factory.mktemp("previous") / "report"
    write_report([runs / "static"], out)
    return out


def folder_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _set(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        tree = tree[key]
    tree[last] = value


DAMAGED_FIELDS = [
    # (file, dotted field, wrong value, what the message says)
    ("final.json", "average", "oops", "'average' must be a mapping, got str"),
    ("final.json", "tokens_per_s", [1, 2], "'tokens_per_s' must be a number or null, got list"),
    ("final.json", "steps", None, "'steps' must be a non-negative integer, got null"),
    ("final.json", "tokens", "12", "'tokens' must be a non-negative integer, got str"),
    ("final.json", "domains", "ab", "'domains' must be a list of names, got str"),
    ("final.json", "proportions", {"ab": "half", "xyz": 0.5}, "'proportions.ab' must be a number or null"),
    ("final.json", "mixer", [], "'mixer' must be a mapping, got list"),
    ("final.json", "mixer.method", None, "'mixer.method' must be a string, got null"),
    ("final.json", "test", None, "'test' must be a mapping, got null"),
    ("final.json", "val.domains.ab", "x", "'val.domains.ab' must be a mapping, got str"),
    ("final.json", "val.domains", [], "'val.domains' must be a mapping, got list"),
    ("final.json", "val.average.loss", [2.0], "'val.average.loss' must be a number or null, got list"),
    ("final.json", "test.domains.xyz.ppl", "1.5", "'test.domains.xyz.ppl' must be a number or null"),
    # metrics.jsonl: eval.* in the first evaluation record, anything else in the first training record
    ("metrics.jsonl", "tokens", "many", "'tokens' must be a number or null, got str"),
    ("metrics.jsonl", "tokens_per_s", {}, "'tokens_per_s' must be a number or null, got dict"),
    ("metrics.jsonl", "eval.val.domains", "x", "'eval.val.domains' must be a mapping, got str"),
    ("metrics.jsonl", "eval.val", None, "'eval.val' must be a mapping, got null"),
    ("metrics.jsonl", "eval.val.average", [1], "'eval.val.average' must be a mapping, got list"),
    ("config.yaml", "data", "corpus", "'data' must be a mapping or null, got str"),
    ("config.yaml", "mixing", ["static"], "'mixing' must be a mapping or null, got list"),
    ("config.yaml", "train.steps", [12], "'train.steps' must be an integer, got list"),
    ("config.yaml", "data.domains", "ab", "'data.domains' must be a list of names or null, got str"),
    ("config.yaml", "mixing.method", None, "'mixing.method' must be a string, got null"),
]


@pytest.mark.parametrize(
    "name, field, value, expected", DAMAGED_FIELDS, ids=[f"{n}:{f}={v!r}" for n, f, v, _ in DAMAGED_FIELDS]
)
def test_a_wrong_type_in_a_run_file_is_one_line_and_leaves_the_report_as_it_was(
    runs, previous_report, tmp_path, capsys, name, field, value, expected
):
    damaged = tmp_path / "damaged"
    shutil.copytree(runs / "strat", damaged)
    path = damaged / name
    where = f"{path} is damaged: "
    if name == "final.json":
        final = json.loads(path.read_text())
        _set(final, field, value)
        path.write_text(json.dumps(final))
    elif name == "config.yaml":
        config = yaml.safe_load(path.read_text())
        _set(config, field, value)
        path.write_text(yaml.safe_dump(config))
    else:
        records = [json.loads(line) for line in path.read_text().splitlines()]
        kind = "eval" if field.startswith("eval.") else "loss"
        number = next(i for i, r in enumerate(records) if kind in r)
        _set(records[number], field, value)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        where = f"{path}:{number + 1}: damaged metrics record: "
    out = tmp_path / "out"
    shutil.copytree(previous_report, out)
    before = folder_bytes(out)

    err = _report_error(capsys, runs / "static", damaged, "--out", out)
    assert where + expected in err
    assert folder_bytes(out) == before  # no figure replaced, report.md as it was
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temporary file left

    fresh = tmp_path / "fresh"
    _report_error(capsys, damaged, "--out", fresh)
    assert not fresh.exists()


@pytest.mark.parametrize("blocked", ["report.md", "proportions.png", "val_loss.png"])
def test_a_report_that_cannot_be_written_whole_leaves_the_previous_one(
    runs, previous_report, tmp_path, capsys, blocked
):
    """A name of the report taken by a folder: one line, and nothing of the previous report replaced."""
    out = tmp_path / "out"
    shutil.copytree(previous_report, out)
    (out / blocked).unlink(missing_ok=True)
    (out / blocked).mkdir()
    (out / blocked / "keep").write_text("mine")
    before = folder_bytes(out)

    err = _report_error(capsys, runs / "strat", "--out", out)
    assert f"{out / blocked} is in the way" in err
    assert folder_bytes(out) == before and (out / blocked / "keep").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, blocked])


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"train: [1, 2\n", "is damaged: not valid YAML (line 2, column 1: while parsing a flow sequence"),
        (b"train:\n  steps: 12 # caf\xe9\n", "is damaged: not UTF-8 text (byte 24)"),
    ],
    ids=["yaml", "latin-1"],
)
def test_a_config_yaml_that_cannot_be_parsed_is_one_line(runs, tmp_path, capsys, content, expected):
    damaged = tmp_path / "damaged"
    shutil.copytree(runs / "static", damaged)
    (damaged / "config.yaml").write_bytes(content)
    err = _report_error(capsys, damaged, "--out", tmp_path / "out")
    assert f"{damaged / 'config.yaml'} {expected}" in err
    assert not (tmp_path / "out").exists()


def test_nulls_the_trainer_may_write_are_reported_as_missing(runs, tmp_path):
    """tokens_per_s null (no time measured), a null config section (the defaults), a null per-domain
    loss: no error, a dash in the table."""
    run = tmp_path / "nulls"
    shutil.copytree(runs / "static", run)
    final = json.loads((run / "final.json").read_text())
    final["tokens_per_s"] = None
    final["test"]["domains"]["ab"]["ppl"] = None
    (run / "final.json").write_text(json.dumps(final))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"] = None
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    tables = parse_tables(write_report([run], tmp_path / "out").path.read_text())
    assert tables["Summary"]["nulls"]["tokens/s"] == "–"
    assert tables["Per-domain test perplexity"]["nulls"]["ab"] == "–"
    assert (
        tables["Per-domain test perplexity"]["nulls"]["xyz"]
        == f"{final['test']['domains']['xyz']['ppl']:.3f}"
    )
