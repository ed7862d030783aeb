"""The real-text corpora and the sweep runner: specs, references, tables, resuming."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import statistics
from pathlib import Path

import pytest
import yaml

from aioli_fast.cli import main
from aioli_fast.errors import AioliError, ConfigError
from aioli_fast.harness import corpora
from aioli_fast.harness.corpora import (
    CORPUS_SETS,
    DEFAULT_DOMAINS,
    DOMAINS,
    chunk_text,
    collect,
    corpus_domains,
)
from aioli_fast.harness.sources import (
    collect_csv,
    collect_cuda,
    collect_metadata,
    collect_stubs,
    collect_tests,
    collect_yaml,
    dependency_closure,
)
from aioli_fast.harness.sweep import load_spec, plan, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def _diagnostics():
    spec = importlib.util.spec_from_file_location(
        "sweep_diagnostics", ROOT / "benchmarks" / "sweep_diagnostics.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chunks_cut_at_line_breaks_and_keep_the_text():
    text = "".join(f"line {i} " + "x" * (i % 50) + "\n" for i in range(300)) + "y" * 250 + "\n"
    pieces = chunk_text(text, size=100)
    assert all(len(p) <= 100 for p in pieces)
    assert "".join(pieces) == text
    assert all(p.endswith("\n") for p in pieces[:-3])  # cut at line breaks, except inside the long line
    assert chunk_text("\n\n  \n") == []


def test_the_noise_domain_is_seeded_random_lowercase_letters(tmp_path):
    a, b = (collect(tmp_path / x, "six_noise", budget_bytes=30_000)["noise"][0] for x in "ab")
    data = Path(a).read_bytes()
    assert data == Path(b).read_bytes()  # the same bytes on every build
    text = "".join(json.loads(line)["text"] for line in data.decode().splitlines())
    assert 0.5 * 30_000 < len(text) <= 30_000 and set(text) == set("abcdefghijklmnopqrstuvwxyz")
    counts = [text.count(c) for c in set(text)]
    assert max(counts) < 1.2 * min(counts)  # uniform: none favoured enough to learn
    entry = json.loads((tmp_path / "a" / "sources.json").read_text())["domains"]["noise"]
    assert entry["files"] == [] and "random" in entry["description"]


def test_every_domain_is_collected_from_this_installation_deterministically(tmp_path):
    first = collect(tmp_path / "a", "twelve", budget_bytes=30_000)
    second = collect(tmp_path / "b", list(CORPUS_SETS["twelve"]), budget_bytes=30_000)
    assert list(first) == list(CORPUS_SETS["twelve"]) and set(DOMAINS) == {*first, "noise"}
    sources = json.loads((tmp_path / "a" / "sources.json").read_text())
    assert sources["versions"]["torch"] != "not installed"
    for name in first:
        data = Path(first[name][0]).read_bytes()
        assert data == Path(second[name][0]).read_bytes()
        entry = sources["domains"][name]
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        docs = [json.loads(line)["text"] for line in data.decode().splitlines()]
        assert len(docs) == entry["documents"] >= 2
        assert all(0 < len(d) <= 4096 for d in docs)
        assert entry["characters"] == sum(len(d) for d in docs)
        assert 0.5 * 30_000 < entry["characters"] <= 30_000 * 1.05  # the budget counts bytes of files
        assert entry["files"] and not any(f.startswith("/") for f in entry["files"])  # no machine paths
    assert "import" in Path(first["python"][0]).read_text()
    assert "#include" in Path(first["cpp"][0]).read_text() or "#pragma" in Path(first["cpp"][0]).read_text()
    assert "StartCharMetrics" in Path(first["fontmetrics"][0]).read_text()
    text = {name: Path(first[name][0]).read_text() for name in CORPUS_SETS["twelve"][6:]}
    assert "def " in text["stubs"] and ": ..." in text["stubs"]
    assert "assert " in text["tests"] and "def test_" in text["tests"]
    assert "__device__" in text["cuda"] or "__global__" in text["cuda"]
    assert "- tag:" in text["yaml"] or "- func:" in text["yaml"]
    assert "0x" in text["csv"]
    files = sources["domains"]["metadata"]["files"]
    assert files and not any(f.startswith("aioli-fast ") for f in files)  # not this package's own README


@pytest.mark.parametrize(
    "collector",
    [collect_stubs, collect_tests, collect_cuda, collect_yaml, collect_csv, collect_metadata],
    ids=lambda f: f.__name__,
)
def test_the_collectors_of_the_twelve_keep_their_budget_and_order(collector):
    for budget in (12_000, 40_000):
        docs, names = collector(budget)
        assert docs and len(docs) == len(names) == len(set(names))
        assert sum(len(d) for d in docs) <= budget
        assert (docs, names) == collector(budget)
        assert not any(n.startswith("/") for n in names)
    # the files of a package (the distributions, for metadata) are taken in sorted order
    packages = [n.split("/")[0] if "/" in n else "" for n in names]
    for package in dict.fromkeys(packages):
        mine = [n for n in names if n.split("/")[0] == package]
        assert mine == sorted(mine), package


def test_corpus_domains_are_the_six_unless_asked():
    assert corpus_domains() == list(DEFAULT_DOMAINS) == list(CORPUS_SETS["six"])
    assert CORPUS_SETS["six"] == ("python", "cpp", "licenses", "reference", "docstrings", "fontmetrics")
    assert list(CORPUS_SETS["twelve"][:6]) == list(CORPUS_SETS["six"]) and len(CORPUS_SETS["twelve"]) == 12
    assert corpus_domains("twelve") == [d for d in DOMAINS if d != "noise"]
    assert corpus_domains("six_noise") == [*CORPUS_SETS["six"], "noise"]
    assert corpus_domains(["csv", "six", "python"]) == ["csv", *CORPUS_SETS["six"]]
    assert corpus_domains("stubs") == ["stubs"]
    assert not set(CORPUS_SETS) & set(DOMAINS)  # a set name never shadows a domain
    for bad in ("thirteen", ["python", "poetry"], [], 3, [3]):
        with pytest.raises(AioliError, match="corpus domain"):
            corpus_domains(bad)


def test_licenses_come_only_from_the_package_and_its_dependencies():
    closure = dependency_closure()
    assert {"torch", "numpy", "webdataset"} <= set(closure)
    assert "pytest" not in closure  # a dev tool, not a dependency: installing it must not change the corpus


def test_collect_refuses_unknown_domains_and_tiny_budgets(tmp_path):
    with pytest.raises(AioliError, match="unknown corpus domain"):
        collect(tmp_path, ["python", "poetry"])
    with pytest.raises(AioliError, match="budget_bytes"):
        collect(tmp_path, ["python"], budget_bytes=100)


def _spec(tmp_path: Path, **changes) -> Path:
    spec = {
        "name": "tiny",
        "corpus": {"path": str(tmp_path / "corpus"), "seq_len": 32, "budget_bytes": 40_000},
        "domains": ["python", "licenses"],
        "seeds": [0, 1],
        "skills_graph_steps": 2,
        "base": {
            "model": {"preset": "tiny"},
            "optim": {"lr": 3.0e-3, "warmup_steps": 2},
            "train": {"steps": 8, "batch_size": 4, "log_every": 2},
            "eval": {"batch_size": 8, "max_sequences": 4},
            "checkpoint": {"every": 4, "keep_last": 1},
        },
        "methods": {
            "stratified": {"mixing": {"method": "stratified"}},
            "aioli_probe": {
                "mixing": {
                    "method": "aioli",
                    "measurement": "probe",
                    "round_steps": 4,
                    "sweeps": 1,
                    "block_steps": 1,
                    "probe_sequences": 2,
                    "eta": 2.0,
                    "learn_fraction": 1.0,
                    "prior_steps": 0,
                    "max_learn_share": 1.0,
                }
            },
            "doremi": {"mixing": {"method": "doremi", "reference": "@run:stratified"}},
            "skillit": {"mixing": {"method": "skillit", "skills_graph": "@skills_graph", "update_every": 2}},
            "static_learned": {"mixing": {"method": "static", "proportions": "@proportions:aioli_probe"}},
        },
    }
    for key, value in changes.items():
        spec[key] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_spec_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        load_spec(_spec(tmp_path, colour="red"))
    with pytest.raises(ConfigError, match="domains must be distinct names"):
        load_spec(_spec(tmp_path, domains=["python", "poetry"]))
    with pytest.raises(ConfigError, match="baseline"):
        load_spec(_spec(tmp_path, baseline="uniform"))
    with pytest.raises(ConfigError, match="seeds"):
        load_spec(_spec(tmp_path, seeds=[]))
    with pytest.raises(ConfigError, match="must be a method listed before it"):
        load_spec(
            _spec(tmp_path, methods={"doremi": {"mixing": {"method": "doremi", "reference": "@run:x"}}})
        )
    with pytest.raises(ConfigError, match="train.seed is set by the sweep"):
        load_spec(_spec(tmp_path, methods={"s": {"mixing": {"method": "stratified"}, "train": {"seed": 3}}}))
    with pytest.raises(ConfigError, match="round_steps"):  # the mixer's own checks run at load time
        load_spec(
            _spec(
                tmp_path,
                methods={
                    "a": {
                        "mixing": {
                            "method": "aioli",
                            "measurement": "probe",
                            "round_steps": 4,
                            "block_steps": 4,
                        }
                    }
                },
            )
        )
    with pytest.raises(ConfigError, match="sweep method 'a'"):
        load_spec(_spec(tmp_path, methods={"a": {"optim": {"lr": -1}}}))
    with pytest.raises(ConfigError, match="not found"):
        load_spec(tmp_path / "missing.yaml")
    for seeds in ([0, 0], [True], [0, "1"]):
        with pytest.raises(ConfigError, match="distinct integers"):
            load_spec(_spec(tmp_path, seeds=seeds))
    with pytest.raises(ConfigError, match="skills_graph_steps"):
        load_spec(_spec(tmp_path, skills_graph_steps=0))
    with pytest.raises(ConfigError, match="corpus.seq_len"):
        load_spec(_spec(tmp_path, corpus={"seq_len": "long"}))
    # the built-in corpus has the six unless corpus.domains asks for another set or list
    with pytest.raises(ConfigError, match="domains must be distinct names"):
        load_spec(_spec(tmp_path, domains=["python", "stubs"]))
    for bad in ("thirteen", ["python", "poetry"], [], 12, {"set": "twelve"}):
        with pytest.raises(ConfigError, match="corpus.domains"):
            load_spec(_spec(tmp_path, corpus={"domains": bad}))
    with pytest.raises(ConfigError, match="domains must be distinct names"):
        load_spec(_spec(tmp_path, corpus={"domains": ["csv", "tests"]}, domains=["python", "csv"]))
    with pytest.raises(ConfigError, match="corpus.prepared takes no other corpus key"):
        load_spec(_spec(tmp_path, corpus={"prepared": str(tmp_path), "domains": "twelve"}))
    with pytest.raises(ConfigError, match="expected a mapping of config overrides"):
        load_spec(_spec(tmp_path, methods={"s": ["stratified"]}))
    aioli = {"method": "aioli", "measurement": "probe", "round_steps": 4, "sweeps": 1, "block_steps": 1}
    aioli["prior_steps"] = 0
    aioli.update(learn_fraction=1.0, max_learn_share=1.0)
    with pytest.raises(ConfigError, match="falls inside LearnParams"):  # step 9 of 9: round 2's first block
        load_spec(_spec(tmp_path, methods={"a": {"mixing": aioli, "train": {"steps": 9}}}))


def test_the_sweep_builds_the_corpus_domains_its_spec_names(tmp_path, monkeypatch):
    asked = []

    def build(out, domains=None, **options):
        asked.append((Path(out), domains))
        raise RuntimeError("stop before training")

    monkeypatch.setattr(corpora, "build_corpus", build)
    methods = {"stratified": {"mixing": {"method": "stratified"}}}
    corpus = {"path": str(tmp_path / "c12"), "domains": "twelve", "seq_len": 32, "budget_bytes": 40_000}
    spec = load_spec(_spec(tmp_path, corpus=corpus, domains=["python", "csv"], methods=methods))
    assert spec.corpus["domains"] == "twelve" and spec.domains == ["python", "csv"]
    with pytest.raises(RuntimeError, match="stop before training"):
        run_sweep(spec, tmp_path / "out")
    # no corpus.domains: the six, as the sweeps before text12 built
    spec = load_spec(_spec(tmp_path, methods=methods))
    with pytest.raises(RuntimeError, match="stop before training"):
        run_sweep(spec, tmp_path / "out6")
    assert asked == [(tmp_path / "c12", "twelve"), (tmp_path / "corpus", None)]


def test_methods_filter_adds_what_they_refer_to_and_the_baseline(tmp_path):
    spec = load_spec(_spec(tmp_path))
    assert plan(spec, ["static_learned"]) == ["stratified", "aioli_probe", "static_learned"]
    assert plan(spec, ["doremi"]) == ["stratified", "doremi"]
    with pytest.raises(ConfigError, match="unknown method"):
        plan(spec, ["doge"])


def _mtimes(out: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(out.glob("runs/*/seed*/final.json"))}


def test_sweep_runs_every_method_and_seed_writes_tables_and_resumes(tmp_path, capsys):
    spec_path = _spec(tmp_path)
    out = tmp_path / "out"
    results = run_sweep(load_spec(spec_path), out)
    printed = capsys.readouterr().out
    methods = results["methods"]
    assert list(methods) == ["stratified", "aioli_probe", "doremi", "skillit", "static_learned"]
    for method, entry in methods.items():
        assert sorted(entry["seeds"]) == [0, 1]
        finals = {
            s: json.loads((out / "runs" / method / f"seed{s}" / "final.json").read_text()) for s in (0, 1)
        }
        ppl = [finals[s]["average"]["test_ppl"] for s in (0, 1)]
        assert entry["summary"]["test_ppl"][0] == pytest.approx(statistics.fmean(ppl))
        base = [json.loads((out / "runs/stratified" / f"seed{s}/final.json").read_text()) for s in (0, 1)]
        deltas = [ppl[s] - base[s]["average"]["test_ppl"] for s in (0, 1)]
        assert entry["summary"]["delta_test_ppl"][0] == pytest.approx(statistics.fmean(deltas))
        assert entry["summary"]["better_than_baseline"] == sum(d < 0 for d in deltas)
        assert all(finals[s]["train_time_s"] > 0 for s in (0, 1))
        assert f"| {method} |" in printed
    # references resolved per seed: DoReMi's reference is the stratified run of its own seed, the static
    # run uses the proportions Aioli ended with in the same seed
    for s in (0, 1):
        cfg = yaml.safe_load((out / f"runs/doremi/seed{s}/config.yaml").read_text())
        assert cfg["mixing"]["reference"] == str(out / "runs" / "stratified" / f"seed{s}")
        learned = methods["aioli_probe"]["seeds"][s]["proportions"]
        used = methods["static_learned"]["seeds"][s]["proportions"]
        assert used == pytest.approx(learned, rel=1e-5)
    assert (out / "skills_graph.json").is_file()
    assert (out / "proportions.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "results.md").read_text()
    assert "avg test ppl" in md and "Per-domain test perplexity" in md and "torch" in md
    rounds = methods["aioli_probe"]["seeds"][0]["mixer"]["rounds"]
    assert len(rounds) == 2 and all(len(r["A"]) == 2 for r in rounds)
    # the diagnostics script reads the same results: one row per Aioli round, ratios within the EMA bound
    table = _diagnostics().analyse(out)
    rows = [line for line in table.splitlines() if line.startswith("| aioli_probe |")]
    assert len(rows) == 2
    ratio = float(rows[0].split("|")[5])
    p0 = rounds[0]["proportions"]
    first_rounds = [v["mixer"]["rounds"][0]["proportions"] for v in methods["aioli_probe"]["seeds"].values()]
    assert ratio == pytest.approx(statistics.fmean(max(p) / min(p) for p in first_rounds), abs=1e-3)
    assert max(p0) / min(p0) <= math.exp(2.0) * 1.0001 and float(rows[0].split("|")[3]) == pytest.approx(
        7.39, abs=0.01
    )

    # the same command again: nothing is trained, the tables are the same
    before = _mtimes(out)
    again = run_sweep(load_spec(spec_path), out)
    assert "done before, kept" in capsys.readouterr().err
    assert _mtimes(out) == before
    assert again["methods"]["aioli_probe"]["summary"] == results["methods"]["aioli_probe"]["summary"]

    # an unfinished run (its final.json lost) is run again, and only it
    (out / "runs/skillit/seed1/final.json").unlink()
    run_sweep(load_spec(spec_path), out)
    after = _mtimes(out)
    changed = [p for p in after if after[p] != before.get(p)]
    assert changed == [str(out / "runs/skillit/seed1/final.json")]

    # a changed method is run again, and only it (and nothing else refers to it)
    spec = yaml.safe_load(spec_path.read_text())
    spec["methods"]["skillit"]["mixing"]["update_every"] = 4
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    run_sweep(load_spec(spec_path), out)
    latest = _mtimes(out)
    changed = sorted(p for p in latest if latest[p] != after[p])
    assert changed == [str(out / f"runs/skillit/seed{s}/final.json") for s in (0, 1)]
    # ... and kept from then on
    run_sweep(load_spec(spec_path), out)
    assert _mtimes(out) == latest

    # a run that others refer to is run again: so are the runs made from it (DoReMi's reference), while
    # the runs that do not depend on it are kept
    spec["methods"]["stratified"]["optim"] = {"lr": 2.0e-3}
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    tables = run_sweep(load_spec(spec_path), out)
    final = _mtimes(out)
    changed = sorted(p for p in final if final[p] != latest[p])
    assert changed == [
        str(out / f"runs/{m}/seed{s}/final.json") for m in ("doremi", "stratified") for s in (0, 1)
    ]
    assert not tables["stale_runs"]


def test_a_failed_run_is_reported_and_the_others_tabulated(tmp_path):
    methods = {
        "stratified": {"mixing": {"method": "stratified"}},
        "on_gpu": {"mixing": {"method": "stratified"}, "train": {"device": "cuda"}},  # no GPU in CI
    }
    spec_path = _spec(tmp_path, methods=methods, seeds=[0])
    if __import__("torch").cuda.is_available():
        pytest.skip("needs a machine without CUDA for the run to fail")
    out = tmp_path / "out"
    with pytest.raises(AioliError, match=r"1 run\(s\) failed .*on_gpu seed 0"):
        run_sweep(load_spec(spec_path), out)
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["stratified"]
    assert "| stratified | 1 |" in (out / "results.md").read_text()
    assert "cuda" in (out / "runs" / "on_gpu" / "seed0.log").read_text().lower()


def test_a_sweep_runs_on_a_corpus_the_user_prepared(tmp_path):
    from helpers import prepare_three_domains

    corpus = prepare_three_domains(tmp_path / "mine") / "corpus"
    methods = {
        "stratified": {"mixing": {"method": "stratified"}},
        "aioli": {
            "mixing": {
                "method": "aioli",
                "measurement": "train",
                "round_steps": 4,
                "sweeps": 1,
                "block_steps": 1,
            }
        },
    }
    spec_path = _spec(
        tmp_path, corpus={"prepared": str(corpus)}, domains=["ab", "xyz"], seeds=[0], methods=methods
    )
    out = tmp_path / "out"
    results = run_sweep(load_spec(spec_path), out)
    assert list(results["methods"]) == ["stratified", "aioli"]
    assert not (out / "corpus").exists()  # nothing built: the prepared corpus is used as it is
    final = json.loads((out / "runs" / "aioli" / "seed0" / "final.json").read_text())
    assert set(final["val"]["domains"]) == {"ab", "xyz"}
    bad = _spec(tmp_path, corpus={"prepared": str(corpus)}, domains=["ab", "python"])
    with pytest.raises(ConfigError, match=r"domains must be distinct names from \['ab', 'cd', 'xyz'\]"):
        load_spec(bad)
    bad = _spec(tmp_path, corpus={"prepared": str(corpus), "seq_len": 16}, domains=["ab"])
    with pytest.raises(ConfigError, match="corpus.prepared takes no other corpus key"):
        load_spec(bad)
    bad = _spec(tmp_path, corpus={"prepared": str(tmp_path / "none")}, domains=["ab"])
    with pytest.raises(ConfigError, match="corpus.prepared: no corpus manifest at .*none"):
        load_spec(bad)


def test_cli_sweep_subset_and_tables_only(tmp_path, capsys):
    spec_path = _spec(tmp_path)
    out = tmp_path / "out"
    assert main(["sweep", str(spec_path), "--out", str(out), "--methods", "doremi", "--seeds", "1"]) == 0
    assert sorted(p.parent.name + "/" + p.name for p in out.glob("runs/*/seed*") if p.is_dir()) == [
        "doremi/seed1",
        "stratified/seed1",
    ]
    os.remove(out / "results.md")
    assert main(["sweep", str(spec_path), "--out", str(out), "--tables-only"]) == 0
    md = (out / "results.md").read_text()
    final = json.loads((out / "runs/doremi/seed1/final.json").read_text())
    assert f"| doremi | 1 | {final['average']['test_ppl']:.3f} |" in md
    # a spec changed without running it: the tables leave out the runs it no longer describes
    spec = yaml.safe_load(spec_path.read_text())
    spec["base"]["optim"]["lr"] = 1.0e-3
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["sweep", str(spec_path), "--out", str(out), "--tables-only"]) == 2
    assert "no finished run of this spec" in capsys.readouterr().err
    assert main(["sweep", str(spec_path), "--out", str(out), "--tables-only", "--seeds", "1"]) == 2
    assert main(["sweep", str(spec_path), "--out", str(tmp_path / "nowhere"), "--tables-only"]) == 2
    assert main(["sweep", str(spec_path), "--out", str(out), "--seeds", "7"]) == 2
    assert "not in the spec's seeds" in capsys.readouterr().err


def test_the_shipped_specs_are_valid():
    names = sorted(path.stem for path in (ROOT / "configs" / "sweeps").glob("*.yaml"))
    shipped = {"text2", "text3", "text6", "text12", "text2-diagnostics", "text2-long", "h200-text3"}
    assert shipped <= set(names)
    for name in names:  # every spec, the GPU one included, loads and validates on the CPU
        load_spec(ROOT / "configs" / "sweeps" / f"{name}.yaml")
    text6, text12 = (load_spec(ROOT / "configs" / "sweeps" / f"{n}.yaml") for n in ("text6", "text12"))
    assert text12.domains == corpus_domains(text12.corpus["domains"]) == list(CORPUS_SETS["twelve"])
    assert text12.domains[:6] == text6.domains and "domains" not in text6.corpus
    assert text12.corpus["path"] != text6.corpus["path"]  # the six-domain corpus is shared by text2/3/6
    assert text12.base == text6.base
    for path in sorted((ROOT / "configs" / "sweeps").glob("text?.yaml")):
        spec = load_spec(path)
        assert len(spec.seeds) >= 3 and spec.baseline == "stratified"
        kinds = {
            m["mixing"]["method"] + ":" + str(m["mixing"].get("measurement")) for m in spec.methods.values()
        }
        for needed in ("aioli:full_val", "aioli:probe", "aioli:train", "doremi:None", "skillit:None",
                       "doge:None", "odm:None", "stratified:None"):  # fmt: skip
            assert needed in kinds, (path.name, needed)


def test_cli_corpus_builds_the_domains_asked_for(tmp_path, capsys):
    args = ["corpus", "--out", str(tmp_path), "--domains", "reference,cpp", "--budget-bytes", "20000"]
    assert main([*args, "--seq-len", "32"]) == 0
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert [d["name"] for d in manifest["domains"]] == ["reference", "cpp"] and manifest["seq_len"] == 32
    assert "reference:" in capsys.readouterr().out
    assert main(["corpus", "--out", str(tmp_path), "--domains", "poetry"]) == 2
    assert "unknown corpus domain" in capsys.readouterr().err
    # a corpus with another seq_len or other domains is not replaced by accident
    assert main([*args, "--seq-len", "16"]) == 2
    assert "holds a corpus with seq_len 32" in capsys.readouterr().err
    assert json.loads((tmp_path / "corpus" / "manifest.json").read_text())["seq_len"] == 32
    assert main([*args, "--seq-len", "16", "--overwrite"]) == 0
    assert json.loads((tmp_path / "corpus" / "manifest.json").read_text())["seq_len"] == 16
