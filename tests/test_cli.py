"""End to end through the command line: prepare -> train -> eval, and the demo, on tiny corpora.

The checks read the outputs' content: metrics per step, the resolved config, final.json's numbers
against an independent evaluation, and each bad input's message and exit status.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml
from helpers import TINY_TRAIN_OVERRIDES, write_alphabet_domain

from aioli_fast.cli import main

SEQ = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_alphabet_domain(root / "raw" / "ab", "ab", 30, 0)
    write_alphabet_domain(root / "raw" / "xyz", "xyz", 30, 1)
    rc = main(
        [
            "prepare",
            "--domain",
            f"ab={root / 'raw' / 'ab'}",
            "--domain",
            f"xyz={root / 'raw' / 'xyz'}/*.txt",
            "--out",
            str(root / "corpus"),
            "--seq-len",
            str(SEQ),
            "--val-fraction",
            "0.2",
            "--test-fraction",
            "0.2",
            "--quiet",
        ]
    )
    assert rc == 0
    return root


def _train(corpus, name, *extra):
    args = [
        "train",
        f"data.path={corpus / 'corpus'}",
        f"train.out_dir={corpus / 'runs'}",
        f"train.name={name}",
        *TINY_TRAIN_OVERRIDES,
        *extra,
    ]
    return main(args)


def test_prepare_then_train_then_eval(corpus, capsys):
    assert _train(corpus, "strat", "train.micro_batch_size=2") == 0
    table = capsys.readouterr().out
    run = corpus / "runs" / "strat"
    manifest = json.loads((corpus / "corpus" / "manifest.json").read_text())
    assert [d["name"] for d in manifest["domains"]] == ["ab", "xyz"]

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 12 and resolved["train"]["micro_batch_size"] == 2
    assert resolved["data"]["path"] == str(corpus / "corpus")

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    assert [r["tokens"] for r in records] == [4 * 4 * SEQ, 8 * 4 * SEQ, 12 * 4 * SEQ]
    for r in records:
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
        assert r["proportions"] == pytest.approx({"ab": 0.5, "xyz": 0.5})
        assert set(r["domain_loss"]) == {"ab", "xyz"}
    assert records[-1]["loss"] < records[0]["loss"]  # it learns something in 12 steps
    # warm-up over 2 steps, then cosine from step index 2 to 11 down to 10%: the logged lr is that of
    # the window's last step (index 3, ..., 11)
    assert records[0]["lr"] == pytest.approx(3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 1 / 9))))
    assert records[-1]["lr"] == pytest.approx(3e-3 * 0.1)

    final = json.loads((run / "final.json").read_text())
    assert final["steps"] == 12 and final["tokens"] == 12 * 4 * SEQ
    for split in ("val", "test"):
        res = final[split]
        for dom in ("ab", "xyz"):
            r = res["domains"][dom]
            assert r["ppl"] == pytest.approx(math.exp(r["loss"]))
            n_seq = next(d for d in manifest["domains"] if d["name"] == dom)["splits"][split]["sequences"]
            assert r["tokens"] == n_seq * SEQ  # every sequence of the split, every target token
        losses = [res["domains"][d]["loss"] for d in ("ab", "xyz")]
        assert res["average"]["loss"] == pytest.approx(sum(losses) / 2)
        assert final["average"][f"{split}_ppl"] == pytest.approx(res["average"]["ppl"])
    # each domain is evaluated on its own data (tests/test_train.py checks the values independently)
    assert final["test"]["domains"]["ab"]["loss"] != final["test"]["domains"]["xyz"]["loss"]
    assert "average" in table and f"{final['test']['average']['ppl']:.3f}" in table

    out_json = corpus / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--split", "both", "--out", str(out_json)]) == 0
    evaluated = json.loads(out_json.read_text())
    assert evaluated["step"] == 12
    for split in ("val", "test"):
        for dom in ("ab", "xyz"):
            assert evaluated[split]["domains"][dom]["loss"] == pytest.approx(
                final[split]["domains"][dom]["loss"], rel=1e-5
            )


def test_progress_is_logged_as_lines_when_stderr_is_not_a_terminal(corpus, capsys):
    assert _train(corpus, "progress", "train.progress=true") == 0
    err = capsys.readouterr().err
    steps = [line.split()[1] for line in err.splitlines() if line.startswith("step ")]
    assert steps == ["4/12", "8/12", "12/12"]
    assert "\r" not in err  # no progress bar redraws in a log file


def test_static_mixture_trains_only_on_weighted_domains(corpus):
    assert _train(corpus, "only-ab", "mixing.method=static", "mixing.proportions={ab: 1, xyz: 0}") == 0
    records = [
        json.loads(line) for line in (corpus / "runs" / "only-ab" / "metrics.jsonl").read_text().splitlines()
    ]
    for r in records:
        assert r["proportions"] == {"ab": 1.0, "xyz": 0.0}
        assert r["domain_loss"]["xyz"] is None and r["domain_loss"]["ab"] is not None


def test_eval_every_writes_validation_records(corpus):
    assert _train(corpus, "evals", "eval.every=4", "eval.max_sequences=4") == 0
    lines = (corpus / "runs" / "evals" / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(line) for line in lines if "eval" in json.loads(line)]
    assert [e["step"] for e in evals] == [4, 8]
    assert evals[0]["eval"]["val"]["domains"]["ab"]["tokens"] == 4 * SEQ


@pytest.mark.parametrize(
    "extra, message",
    [
        (["train.stpes=3"], "unknown config key 'train.stpes'; did you mean 'train.steps'?"),
        (["train.batch_size=four"], "train.batch_size: expected int"),
        (["model.vocab_size=64"], "model.vocab_size=64 is smaller than the corpus vocabulary 257"),
        (["mixing.method=doremy"], "unknown mixing.method 'doremy'"),
        (["mixing.method=static", "mixing.proportions={ab: 1}"], "gives no weight for domain(s) ['xyz']"),
        (["data.domains=[ab, web]"], "data.domains names ['web'], not in the corpus"),
        (["model.preset=huge"], "unknown model preset 'huge'"),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "vocab-too-small",
        "unknown-mixer",
        "static-missing-domain",
        "unknown-domain",
        "unknown-preset",
    ],
)
def test_bad_train_input_exits_2_with_one_message(corpus, capsys, extra, message):
    assert _train(corpus, "bad", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("aioli-fast train: error:")
    assert not (corpus / "runs" / "bad" / "final.json").exists()


def test_existing_run_is_not_overwritten(corpus, capsys):
    assert _train(corpus, "twice") == 0
    before = (corpus / "runs" / "twice" / "final.json").read_bytes()
    assert _train(corpus, "twice") == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (corpus / "runs" / "twice" / "final.json").read_bytes() == before


def test_an_unfinished_run_is_replaced(corpus):
    run = corpus / "runs" / "unfinished"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("left over by a run that crashed\n")
    (run / "metrics.jsonl").write_text('{"step": 999}\n')
    assert _train(corpus, "unfinished") == 0
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [4, 8, 12]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["name"] == "unfinished"


def test_missing_held_out_shard_fails_before_training(corpus, tmp_path, capsys):
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(corpus / "corpus"), str(broken)], check=True)
    (broken / "ab" / "test-00000.tar").unlink()
    assert _train(corpus, "nostart", f"data.path={broken}") == 2
    assert f"shard not found: {broken / 'ab' / 'test-00000.tar'}" in capsys.readouterr().err
    assert not (corpus / "runs" / "nostart").exists()  # failed before the run directory was made


def test_missing_and_corrupt_data(corpus, tmp_path, capsys):
    assert main(["train", f"data.path={tmp_path / 'nowhere'}", "train.progress=false"]) == 2
    assert "no corpus manifest at" in capsys.readouterr().err

    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(corpus / "corpus"), str(broken)], check=True)
    shard = broken / "xyz" / "train-00000.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    assert (
        main(
            [
                "train",
                f"data.path={broken}",
                f"train.out_dir={tmp_path}",
                "train.steps=20",
                "train.batch_size=4",
                "train.progress=false",
                "model.preset=tiny",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert str(shard) in err and ("truncated" in err or "corrupt" in err)
    assert not (tmp_path / "run" / "final.json").exists()


def test_unwritable_output_directory(corpus, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert _train(corpus, "x", f"train.out_dir={blocker}") == 2
    assert "is not writable" in capsys.readouterr().err


def test_prepare_errors_through_the_cli(tmp_path, capsys):
    assert main(["prepare", "--domain", f"a={tmp_path}/nothing*.txt", "--out", str(tmp_path / "o")]) == 2
    assert "domain 'a': no input file matches" in capsys.readouterr().err
    assert main(["prepare", "--domain", "just-a-name", "--out", str(tmp_path / "o")]) == 2
    assert "is not of the form NAME=PATH" in capsys.readouterr().err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_module_entry_point_and_exit_status(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "aioli_fast", "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("aioli_fast ")
    bad = subprocess.run(
        [sys.executable, "-m", "aioli_fast", "train", "train.stpes=1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "aioli-fast train: error: unknown config key 'train.stpes'; did you mean 'train.steps'? "
        "(valid keys here: steps, batch_size, micro_batch_size, seed, device, precision, log_every, out_dir, "
        "name, overwrite, progress, on_nan, max_skipped_fraction, tensorboard, compile, threads)"
    ]


def test_demo_small_scale(tmp_path, capsys):
    assert (
        main(
            [
                "demo",
                "--out",
                str(tmp_path / "demo"),
                "--steps",
                "4",
                "--scale",
                "0.05",
                "eval.max_sequences=8",
                "train.progress=false",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    out = captured.out
    domains = ["python_code", "language_reference", "licenses", "noise"]
    runs = {m: tmp_path / "demo" / m for m in ("stratified", "aioli")}
    finals = {m: json.loads((run / "final.json").read_text()) for m, run in runs.items()}
    for method, final in finals.items():
        assert final["domains"] == domains
        assert final["mixer"]["method"] == method
        assert final["steps"] == 4
    assert finals["stratified"]["proportions"] == pytest.approx(dict.fromkeys(domains, 0.25))
    assert finals["aioli"]["mixer"]["measurements"] == 0  # the default: no extra forward passes
    assert [f"[{n}/4]" in captured.err for n in range(1, 5)] == [True] * 4
    lines = out.splitlines()
    # side by side: both methods and the delta in the header, then a val and a test row per domain
    header = next(i for i, line in enumerate(lines) if line.startswith("domain"))
    assert lines[header - 1].split()[:2] == ["stratified", "aioli"]
    assert lines[header - 1].split()[2] in ("\u0394", "d") and lines[header - 1].split()[3] == "aioli"
    body = lines[header + 2 :]
    rows = [line.split()[0] for line in body[: 2 * len(domains)] if not line.startswith(" ")]
    assert rows == domains
    average = next(line for line in body if line.startswith("average")).split()
    s_loss, s_ppl, a_loss, a_ppl, d_loss, d_ppl = map(float, average[2:8])
    assert average[1] == "val"
    assert d_loss == pytest.approx(a_loss - s_loss, abs=2e-4)
    assert d_ppl == pytest.approx(a_ppl - s_ppl, abs=2e-3)
    assert s_ppl == pytest.approx(finals["stratified"]["average"]["val_ppl"], abs=1e-3)
    assert a_ppl == pytest.approx(finals["aioli"]["average"]["val_ppl"], abs=1e-3)
    # the learned proportions (4 steps end inside the prior phase: still uniform) and the timing
    start = next(i for i, line in enumerate(lines) if line.startswith("proportions Aioli learned"))
    assert lines[start + 1].split() == ["steps", *domains]
    final_row = next(line for line in lines[start:] if line.startswith("final")).split()
    learned = finals["aioli"]["proportions"]
    assert [float(v) for v in final_row[1:]] == pytest.approx([learned[d] for d in domains], abs=1e-3)
    assert "Aioli lowered no domain" in out  # the run ended in the uniform phase
    timing = next(i for i, line in enumerate(lines) if line.startswith("method"))
    assert [line.split()[0] for line in lines[timing + 1 : timing + 3]] == ["stratified", "aioli"]
    assert "demo finished in" in out and str(tmp_path / "demo" / "aioli" / "final.json") in out


def test_demo_methods_flag(tmp_path, capsys):
    args = ["demo", "--out", str(tmp_path / "demo"), "--steps", "2", "--scale", "0.05"]
    assert main([*args, "--methods", "aioli", "eval.max_sequences=4", "train.progress=false"]) == 0
    captured = capsys.readouterr()
    assert (tmp_path / "demo" / "aioli" / "final.json").is_file()
    assert not (tmp_path / "demo" / "stratified").exists()
    assert "[3/3] training with Aioli" in captured.err and "proportions Aioli learned" in captured.out
    assert main([*args, "--methods", "stratified,doremi"]) == 2
    assert "demo methods must be some of stratified, aioli" in capsys.readouterr().err
