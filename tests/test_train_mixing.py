"""The online mixers inside the training loop: every method and measurement source trains end to end.

Each run uses the tiny preset on a 3-domain corpus for a few dozen steps and is checked through what it
writes: the proportions logged at every step follow the mixer's schedule (LearnParams blocks of smoothed
one-hot mixtures, then learned proportions), the number of probe / full-validation measurements matches
the schedule, and final.json records the mixer's results.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import prepare_three_domains, write_alphabet_domain

from aioli_fast.config import config_from_dict
from aioli_fast.data import prepare
from aioli_fast.errors import ConfigError
from aioli_fast.mixing import build_mixer
from aioli_fast.train import train

SEQ = 16
DOMAINS = ["ab", "cd", "xyz"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare_three_domains(tmp_path_factory.mktemp("mixcorpus"), seq_len=SEQ, shard_sequences=32)


def _train(corpus, name: str, mixing: dict, steps: int = 24, data: dict | None = None, **train_extra):
    cfg = config_from_dict(
        {
            "data": {"path": str(corpus / "corpus"), **(data or {})},
            "model": {"preset": "tiny"},
            "mixing": mixing,
            "optim": {"lr": 3e-3, "warmup_steps": 2},
            "train": {
                "steps": steps,
                "batch_size": 6,
                "log_every": 1,
                "progress": False,
                "device": "cpu",
                "out_dir": str(corpus / "runs"),
                "name": name,
                **train_extra,
            },
            "eval": {"batch_size": 8, "max_sequences": 8},
        }
    )
    result = train(cfg)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [r for r in records if "loss" in r]
    return result.final, steps_logged


AIOLI = {
    "method": "aioli",
    "sweeps": 1,
    "block_steps": 2,
    "round_steps": 10,
    "one_hot_factor": 0.8,
    "eta": 2.0,
    # the paper's procedure (whole batches on block mixtures, no uniform phase), scaled down
    "learn_fraction": 1.0,
    "prior_steps": 0,
    "max_learn_share": 1.0,
}


@pytest.mark.parametrize("measurement", ["train", "probe", "full_val"])
@pytest.mark.parametrize("update", ["ema", "cumulative"])
def test_aioli_trains_with_every_measurement_source(corpus, measurement, update):
    mixing = {**AIOLI, "measurement": measurement, "update": update, "probe_sequences": 2}
    final, records = _train(corpus, f"aioli-{measurement}-{update}", mixing)
    mixer = build_mixer(
        "aioli", DOMAINS, **{k: v for k, v in mixing.items() if k not in ("method", "probe_sequences")}
    )
    off = (1 - 0.8) / 2
    for r in records:
        step = r["step"] - 1  # record of step s is written after it: "step" counts steps done
        got = [r["proportions"][d] for d in DOMAINS]
        j = mixer._block_mixture(step)
        if j is not None:  # LearnParams: the smoothed one-hot row of the block's domain
            assert got == pytest.approx([0.8 if i == j else off for i in range(3)], abs=1e-6), step
        assert sum(got) == pytest.approx(1.0, abs=1e-5)
    learned = [r["proportions"] for r in records if r["step"] - 1 in (9, 19, 23)]
    assert learned[0] != learned[1] or learned[1] == learned[2]  # a round's update took effect
    # measurements: R*k + 1 = 4 per round of 10 steps at offsets 0, 2, 4, 6; steps 20-23 hold offsets 0, 2
    expected = 0 if measurement == "train" else 4 + 4 + 2
    assert final["mixer"]["measurements"] == expected
    if measurement != "train":  # the count the start-up line's cost comes from
        assert mixer.plan.measurements_in(24) == expected
    assert final["mixer"]["skipped_updates"] == 0
    assert final["mixer"]["method"] == "aioli"
    assert set(final["test"]["domains"]) == set(DOMAINS)


def test_aioli_defaults_fit_the_training_losses_with_no_measurement(corpus, capsys):
    final, records = _train(corpus, "aioli-defaults", {"method": "aioli"}, steps=40)
    mixer = build_mixer("aioli", DOMAINS, total_steps=40, warmup_steps=2)
    starts = {mixer.fit_end(r) for r in range(mixer.plan.rounds_in(40))}
    err = capsys.readouterr().err
    assert "measurements from every training batch's per-domain losses: no extra compute (0%)" in err
    assert final["mixer"]["measurements"] == 0 and final["mixer"]["skipped_updates"] == 0
    # an update moves nothing from less than a round of batches (the first, after a short uniform phase)
    first = 0 if mixer.fit_end(0) - mixer.fit_start() >= mixer.plan.round_steps else 1
    assert [r["round"] for r in final["mixer"]["rounds"]] == list(range(first, len(starts)))
    trained = [[r["proportions"][d] for d in DOMAINS] for r in records]  # record s: step s - 1
    changed = {r["step"] - 1 for r, prev in zip(records[1:], trained) if trained[records.index(r)] != prev}
    assert changed <= starts, (changed, starts)
    assert all(sum(p) == pytest.approx(1.0, abs=1e-5) for p in trained)


def test_aioli_exploit_phase_uses_the_learned_proportions(corpus):
    mixing = {**AIOLI, "measurement": "probe", "update": "cumulative", "probe_sequences": 2}
    final, records = _train(corpus, "aioli-exploit", mixing, steps=10)
    exploit = [[r["proportions"][d] for d in DOMAINS] for r in records if r["step"] - 1 >= 6]
    assert all(p == exploit[0] for p in exploit)  # one update per round: constant after it
    assert exploit[0] != pytest.approx([1 / 3] * 3, abs=1e-4)  # the update moved away from uniform
    assert [final["proportions"][d] for d in DOMAINS] == pytest.approx(exploit[0])


@pytest.mark.parametrize(("block_counts", "exact"), [("exact", True), ("drawn", False)])
def test_learnparams_block_batches_hold_exact_per_domain_counts(corpus, block_counts, exact):
    from aioli_fast.integrations.common import OnlineMixing

    options = {**{k: v for k, v in AIOLI.items() if k != "method"}, "measurement": "train"}
    options["block_counts"] = block_counts
    mixing = OnlineMixing(corpus / "corpus", step_rows=10, device="cpu", mixer="aioli", mixer_options=options)
    counts = []
    for step in range(6):  # 3 domains x 1 sweep x 2-step blocks: one-hot factor 0.8 of a batch of 10
        batch = mixing.draw(step, lambda ids: None)
        counts.append(sorted(np.bincount(batch.domain_ids.numpy(), minlength=3).tolist()))
    mixing.close()
    if exact:
        assert counts == [[1, 1, 8]] * 6
    else:  # the stream's categorical draws
        assert counts != [[1, 1, 8]] * 6


def test_a_run_ending_inside_learnparams_reports_learned_proportions(corpus, capsys):
    mixing = {**AIOLI, "measurement": "probe", "update": "cumulative", "probe_sequences": 2}
    # round 0 (steps 0-9) learns; round 1's LearnParams blocks are steps 10-15: the run ends in them
    final, records = _train(corpus, "aioli-ends-in-block", mixing, steps=13)
    block = [records[-1]["proportions"][d] for d in DOMAINS]
    learned = [records[9]["proportions"][d] for d in DOMAINS]  # step 10: round 0's exploit phase
    assert max(block) == pytest.approx(0.8) and block != pytest.approx(learned)  # a block mixture
    assert [final["proportions"][d] for d in DOMAINS] == pytest.approx(learned)
    assert any("ended inside LearnParams (step 13 of 13" in note for note in final["notes"])
    err = capsys.readouterr().err
    assert "warning: the run ended inside LearnParams" in err
    assert (  # said at start-up: what LearnParams will cost
        "aioli: 2 round(s) of 10 steps, each starting with LearnParams (1 sweep(s) x 3 domains x 2 steps); "
        "eta 2, one_hot_factor 0.8; LearnParams takes 9 of the run's 13 steps, 69% of its sequences"
    ) in err


def test_a_measure_budget_shrinks_the_probe_and_the_start_up_line_says_so(corpus, capsys):
    # 10 measurements of 3 domains against 24 steps of 6 sequences: each probe sequence per domain
    # costs 10 x 3 / (3 x 6 x 24) = 6.9% of the training compute, so a 15% budget pays for 2 of the 4
    mixing = {**AIOLI, "measurement": "probe", "probe_sequences": 4, "measure_budget": 0.15}
    final, _ = _train(corpus, "aioli-budget", mixing)
    assert final["mixer"]["measurements"] == 10
    err = capsys.readouterr().err
    assert (
        "; 10 probe measurement(s) of 3 x 2 sequences: 14% of the training compute "
        "(mixing.measure_budget 15%)"
    ) in err


@pytest.mark.parametrize(
    "mixing",
    [
        {"method": "odm"},
        {"method": "doremi", "update_every": 2},
        {"method": "skillit", "update_every": 4},
        {"method": "skillit", "update_every": 4, "measurement": "probe"},
        {"method": "doge", "update_every": 4},
    ],
    ids=["odm", "doremi-json", "skillit-train", "skillit-probe", "doge"],
)
def test_online_baselines_train_and_move_the_proportions(corpus, tmp_path, mixing):
    mixing = dict(mixing)
    if mixing["method"] == "doremi":
        ref = tmp_path / "ref.json"
        ref.write_text(json.dumps({"ab": 1.0, "cd": 2.0, "xyz": 9.0}))
        mixing["reference"] = str(ref)
    if mixing["method"] == "skillit":
        graph = tmp_path / "graph.json"
        graph.write_text(json.dumps([[1, 0, 0], [0, 1, 0.5], [0, 0, 1]]))
        mixing["skills_graph"] = str(graph)
    name = "-".join(str(v) for k, v in mixing.items() if k in ("method", "measurement"))
    final, records = _train(corpus, name, {**mixing, "probe_sequences": 2}, steps=12)
    first = [records[0]["proportions"][d] for d in DOMAINS]
    last = [records[-1]["proportions"][d] for d in DOMAINS]
    assert first == pytest.approx([1 / 3] * 3, abs=1e-6)
    assert last != pytest.approx(first, abs=1e-4)
    assert sum(last) == pytest.approx(1.0, abs=1e-5)
    assert final["mixer"]["skipped_updates"] == 0


def test_doremi_with_a_reference_checkpoint_and_its_time_average(corpus):
    _train(corpus, "reference", {"method": "stratified"}, steps=4)
    mixing = {"method": "doremi", "reference": str(corpus / "runs" / "reference"), "eta": 5.0}
    final, records = _train(corpus, "doremi-ckpt", mixing, steps=8)
    average = final["mixer"]["average_proportions"]
    assert set(average) == set(DOMAINS) and sum(average.values()) == pytest.approx(1.0, abs=1e-5)
    # the model being trained starts worse than the 4-step reference: some domain has excess loss
    last = [records[-1]["proportions"][d] for d in DOMAINS]
    assert last != pytest.approx([1 / 3] * 3, abs=1e-4)


@pytest.mark.parametrize(
    "mixing, message",
    [
        ({"method": "static", "eta": 0.1}, "mixing.method 'static' does not use mixing.eta"),
        (
            {"method": "aioli", "measurement": "probe", "round_steps": 5, "sweeps": 1, "block_steps": 2},
            "leaves no steps",
        ),
        ({"method": "aioli", "measurement": "val"}, "mixing.measurement must be one of"),
        ({"method": "aioli", "one_hot_factor": 1 / 3}, "(almost) 1/k"),
        ({"method": "doremi"}, "needs mixing.reference"),
        ({"method": "skillit"}, "needs mixing.skills_graph"),
        ({"method": "odm", "eta": 1.0}, "mixing.method 'odm' does not use mixing.eta"),
        ({"method": "aioli", "probe_sequences": 0}, "mixing.probe_sequences must be >= 1"),
    ],
    ids=[
        "static-eta",
        "short-round",
        "bad-measurement",
        "singular-W",
        "doremi-no-ref",
        "skillit-no-graph",
        "odm-eta",
        "probe-0",
    ],
)
def test_bad_mixing_configs_fail_before_training(corpus, mixing, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _train(corpus, "bad", mixing, steps=2)
    assert not (corpus / "runs" / "bad" / "metrics.jsonl").exists()


def test_probe_measurement_needs_a_val_split(tmp_path):
    write_alphabet_domain(tmp_path / "raw" / "a", "ab", 8, 0)
    write_alphabet_domain(tmp_path / "raw" / "b", "cd", 8, 1)
    prepare(
        {"a": [str(tmp_path / "raw" / "a")], "b": [str(tmp_path / "raw" / "b")]},
        tmp_path / "corpus",
        seq_len=SEQ,
        val_fraction=0.0,
        test_fraction=0.0,
        progress=False,
    )
    cfg = config_from_dict(
        {
            "data": {"path": str(tmp_path / "corpus")},
            "mixing": {"method": "aioli", "measurement": "probe"},
            "train": {"steps": 2, "device": "cpu", "progress": False, "out_dir": str(tmp_path / "runs")},
        }
    )
    with pytest.raises(ConfigError, match="needs a val split .* use mixing.measurement=round"):
        train(cfg)


def test_the_loop_reads_the_learned_proportions_once_per_round(corpus, monkeypatch):
    """Only new learned proportions are read from the device; the LearnParams rows are known on the host."""
    from aioli_fast.mixing.aioli import AioliMixer

    handed_out, reads = set(), []
    proportions, tolist = AioliMixer.proportions, torch.Tensor.tolist

    def spy_proportions(self, step):
        p_D = proportions(self, step)
        handed_out.add(id(p_D))
        return p_D

    def spy_tolist(self):
        if id(self) in handed_out:
            reads.append(self)
        return tolist(self)

    monkeypatch.setattr(AioliMixer, "proportions", spy_proportions)
    monkeypatch.setattr(torch.Tensor, "tolist", spy_tolist)
    mixing = {**AIOLI, "measurement": "probe", "probe_sequences": 2}
    _train(corpus, "aioli-reads", mixing, steps=20)
    # steps 0-5 and 10-15 are LearnParams (host-known rows); 6-9 and 16-19 use the p learned in each round
    assert len(reads) == 2


def test_skills_graph_from_single_domain_runs_feeds_skillit(corpus, capsys):
    from aioli_fast.cli import main

    out = corpus / "graph.json"
    code = main(
        [
            "skills-graph",
            "--steps",
            "6",
            "--out",
            str(out),
            f"data.path={corpus / 'corpus'}",
            "model.preset=tiny",
            "optim.lr=3e-3",
            "train.batch_size=6",
            "train.device=cpu",
            "train.progress=false",
            f"train.out_dir={corpus / 'runs'}",
            "eval.max_sequences=8",
        ]
    )
    assert code == 0
    graph = json.loads(out.read_text())
    assert list(graph) == DOMAINS and all(list(row) == DOMAINS for row in graph.values())
    values = [v for row in graph.values() for v in row.values()]
    assert all(v >= 0 for v in values) and max(values) > 0
    details = json.loads((corpus / "graph.details.json").read_text())
    for j in DOMAINS:  # training on a domain alone lowers its own validation loss
        assert details["after"][j][j] < details["before"][j]
        assert graph[j][j] > 0
    # the column sums are scaled so that the largest is 1
    assert max(sum(graph[i][j] for i in DOMAINS) for j in DOMAINS) == pytest.approx(1.0)
    assert "wrote" in capsys.readouterr().out
    final, _ = _train(
        corpus, "skillit-learned", {"method": "skillit", "skills_graph": str(out), "update_every": 4}
    )
    assert final["mixer"]["skipped_updates"] == 0


def test_aioli_batches_do_not_depend_on_the_loader_workers(corpus):
    """LearnParams blocks go to the stream as one schedule: workers read ahead, the batches stay exact."""
    mixing = {**AIOLI, "measurement": "train"}
    _, inline = _train(corpus, "aioli-w0", mixing, steps=20)
    _, workers = _train(corpus, "aioli-w1", mixing, steps=20, data={"num_workers": 1})
    assert [(r["step"], r["loss"], r["proportions"]) for r in inline] == [
        (r["step"], r["loss"], r["proportions"]) for r in workers
    ]
    # with the schedule, prefetch is dropped at most at 3 points a round (the closing measurement on the
    # old proportions, the learned proportions, the next round's schedule), not at every block change:
    # measured 10 here, 18 without the schedule
    assert workers[-1]["data_discarded_batches"] <= 2 * 3 * 2  # rounds x points x prefetch_factor


def test_progress_lines_show_the_current_proportions(corpus, capsys):
    mixing = {**AIOLI, "measurement": "train"}
    _train(corpus, "aioli-progress", mixing, steps=8, progress=True, log_every=4)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert len(lines) == 2  # stderr is not a terminal here: plain lines, one per log step
    # step 4 is in block 1 of round 0: a smoothed one-hot mixture with 0.80 on one domain
    assert "p [" in lines[0] and "0.80" in lines[0] and "0.10" in lines[0]
