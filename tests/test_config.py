"""Config loading: typed sections, unknown keys with suggestions, wrong types, overrides, presets."""

import os
import re
from pathlib import Path

import pytest
import yaml

from aioli_fast.config import ConfigError, RunConfig, config_from_dict, dump_config, load_config
from aioli_fast.harness.demo import DEMO_CONFIG, demo_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MIN = {"data": {"path": "corpus"}}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.train.name is not None


def test_demo_yaml_matches_embedded_demo_config():
    from_file = load_config(CONFIGS / "demo.yaml").to_dict()
    embedded = config_from_dict(DEMO_CONFIG).to_dict()
    assert from_file == embedded
    assert config_from_dict(demo_config("stratified")).to_dict() == embedded


def test_demo_aioli_yaml_matches_embedded_demo_config():
    from_file = load_config(CONFIGS / "demo-aioli.yaml").to_dict()
    embedded = config_from_dict(demo_config("aioli")).to_dict()
    assert from_file == embedded
    stratified = config_from_dict(DEMO_CONFIG).to_dict()
    # the same run as the stratified one but for the mixing and the run's name
    for section in ("model", "data", "optim", "eval"):
        assert from_file[section] == stratified[section], section
    assert {**from_file["train"], "name": "stratified"} == stratified["train"]
    # Aioli with nothing else set: its defaults
    assert from_file["mixing"]["method"] == "aioli" and from_file["mixing"].get("measurement") is None


def test_paper_preset_has_the_paper_settings():
    cfg = load_config(CONFIGS / "pythia160m-paper.yaml")
    assert (cfg.model.preset, cfg.train.batch_size, cfg.optim.lr, cfg.optim.warmup_steps) == (
        "pythia-160m",
        8,
        5e-4,
        500,
    )
    assert cfg.train.steps == 5000


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"train": {"stpes": 3}}, "unknown config key 'train.stpes'; did you mean 'train.steps'?"),
        ({"trian": {}}, "unknown config key 'trian'; did you mean 'train'?"),
        ({"optim": {"learning_rate": 1.0}}, "unknown config key 'optim.learning_rate'"),
    ],
    ids=["nested-typo", "section-typo", "no-near-match"],
)
def test_unknown_key_names_it_and_the_nearest(data, expected):
    with pytest.raises(ConfigError) as err:
        config_from_dict({**MIN, **data})
    assert expected in str(err.value)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"train": {"steps": "many"}}, "train.steps: expected int, got str 'many'"),
        ({"train": {"steps": 1.5}}, "train.steps: expected int, got float 1.5"),
        ({"train": {"overwrite": "yes please"}}, "train.overwrite: expected bool"),
        ({"optim": {"lr": [1]}}, "optim.lr: expected float, got list"),
        ({"data": {"path": "x", "domains": "a"}}, "data.domains: expected a list"),
        ({"mixing": {"proportions": {"a": "x"}}}, "mixing.proportions.a: expected float"),
        ({"train": 3}, "train: expected a mapping"),
        ({"mixing": {"method": ["aioli"], "eta": 0.1}}, "mixing.method: expected str, got list"),
        ({"mixing": {"method": "aioli", "eta": "fast"}}, "mixing.eta: expected float, got str 'fast'"),
    ],
    ids=[
        "str-for-int",
        "float-for-int",
        "str-for-bool",
        "list-for-float",
        "str-for-list",
        "bad-dict-value",
        "scalar-for-section",
        "list-for-method",
        "str-for-mixer-option",
    ],
)
def test_wrong_type_is_rejected(data, expected):
    with pytest.raises(ConfigError) as err:
        config_from_dict({**MIN, **data})
    assert expected in str(err.value)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"train": {"batch_size": 8, "micro_batch_size": 3}}, "must be positive and divide train.batch_size"),
        ({"train": {"steps": 0}}, "train.steps must be >= 1"),
        ({"optim": {"lr": 0.0}}, "optim.lr must be finite and > 0, got 0.0"),
        ({"optim": {"lr": float("nan")}}, "optim.lr must be finite and > 0, got nan"),
        ({"optim": {"lr": float("inf")}}, "optim.lr must be finite and > 0, got inf"),
        ({"optim": {"beta1": 1.5}}, "optim.beta1 must be in [0, 1), got 1.5"),
        ({"optim": {"eps": -1.0}}, "optim.eps must be finite and > 0"),
        ({"optim": {"weight_decay": -1.0}}, "optim.weight_decay must be finite and >= 0"),
        ({"train": {"seed": -1}}, "train.seed must be >= 0, got -1"),
        ({"eval": {"max_sequences": 0}}, "eval.max_sequences must be >= 1 (or null for all), got 0"),
        ({"train": {"precision": "fp8"}}, "train.precision must be one of"),
        ({"train": {"device": "mps"}}, "train.device must be auto, cpu, cuda or cuda:N; got 'mps'"),
        ({"train": {"name": "../escape"}}, "train.name must be a plain folder name"),
        ({"data": {"path": ""}}, "data.path is not set"),
    ],
    ids=[
        "micro-does-not-divide",
        "zero-steps",
        "zero-lr",
        "nan-lr",
        "inf-lr",
        "beta1",
        "eps",
        "weight-decay",
        "seed",
        "max-sequences",
        "bad-precision",
        "bad-device",
        "name-escapes",
        "no-data-path",
    ],
)
def test_conflicting_or_invalid_values(data, expected):
    with pytest.raises(ConfigError) as err:
        config_from_dict({**MIN, **data})
    assert expected in str(err.value)


def test_overrides_parse_yaml_values_and_create_sections():
    cfg = config_from_dict(
        MIN,
        [
            "train.steps=7",
            "optim.lr=1e-3",
            "mixing.method=static",
            "mixing.proportions={a: 2, b: 1}",
            "data.domains=[a, b]",
            "train.micro_batch_size=null",
        ],
    )
    assert cfg.train.steps == 7
    assert cfg.optim.lr == pytest.approx(1e-3)  # YAML 1.1 reads "1e-3" as a string; accepted as float
    assert cfg.mixing.proportions == {"a": 2.0, "b": 1.0}
    assert cfg.data.domains == ["a", "b"]
    assert cfg.train.micro_batch_size is None


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.steps", "is not of the form key=value"),
        ("=3", "has an empty key"),
        ("train.steps.x=3", "'steps' is not a section"),
        ("train.steps=[1", "value is not valid YAML"),
    ],
    ids=["no-equals", "empty-key", "into-scalar", "bad-yaml"],
)
def test_bad_overrides(override, expected):
    with pytest.raises(ConfigError) as err:
        config_from_dict({**MIN, "train": {"steps": 3}}, [override])
    assert expected in str(err.value)


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(listy)


def test_dump_round_trips(tmp_path):
    cfg = config_from_dict(MIN, ["train.steps=11", "mixing.proportions={a: 1}"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert yaml.safe_load(path.read_text())["train"]["steps"] == 11
    assert load_config(path).to_dict() == {
        **cfg.to_dict(),
        "train": {**cfg.to_dict()["train"], "name": "resolved"},
    }


@pytest.mark.parametrize(
    "k, eta, U, R, S, f, ema, steps",
    [
        (2, 0.2, 250, 4, 4, 0.625, 0.1, 5000),
        (3, 0.1, 250, 4, 6, 0.5, 0.5, 5000),
        (7, 1.0, 200, 2, 10, 0.75, 0.1, 40000),
    ],
    ids=["2-domains", "3-domains", "7-domains"],
)
def test_aioli_paper_presets_build_their_mixer(k, eta, U, R, S, f, ema, steps):
    from aioli_fast.mixing import build_mixer

    cfg = load_config(CONFIGS / f"paper_{k}domains.yaml")
    assert cfg.train.steps == steps and cfg.model.preset == "pythia-160m"
    mixer = build_mixer("aioli", [f"d{i}" for i in range(k)], **cfg.mixing.options())
    plan = mixer.plan
    assert (plan.round_steps, plan.sweeps, plan.block_steps) == (U, R, S)
    assert (mixer.eta, mixer.one_hot_factor, mixer.ema) == (eta, f, ema)
    assert mixer.use_ema and mixer.measurement == "full_val"
    assert mixer.plan.learn_steps == R * k * S < U


def test_a_mixer_registered_outside_the_package_takes_its_options_from_yaml(tmp_path):
    import torch

    from aioli_fast.mixing import MIXERS, Mixer, register_mixer
    from aioli_fast.train import build_run_mixer

    @register_mixer("test_tilted")
    class TiltedMixer(Mixer):
        """Fixed proportions tilted towards the first domain by ``tilt``."""

        OPTIONS = {"tilt": 1.0, "label": None, "seed": 0}

        def initial_proportions(self, proportions):
            weights = torch.ones(self.num_domains, device=self.device)
            weights[0] = self.options["tilt"]
            return weights / weights.sum()

    try:
        path = tmp_path / "run.yaml"
        path.write_text("data: {path: corpus}\nmixing: {method: test_tilted, tilt: 3, label: x}\n")
        cfg = load_config(path)
        assert cfg.mixing.options() == {"tilt": 3.0, "label": "x"}  # an int given for a float option
        mixer = build_run_mixer(cfg, ["a", "b"], torch.device("cpu"))
        assert mixer.proportions(0).tolist() == [0.75, 0.25]
        assert mixer.options["seed"] == cfg.train.seed  # "seed" defaults to train.seed, as for built-ins
        resolved = yaml.safe_load(dump_config(cfg))["mixing"]
        assert (resolved["tilt"], resolved["label"], resolved["eta"]) == (3.0, "x", None)
        assert load_config(path).to_dict() == cfg.to_dict()
        with pytest.raises(ConfigError, match=r"mixing.tilt: expected float, got str 'steep'"):
            config_from_dict({"data": {"path": "c"}, "mixing": {"method": "test_tilted", "tilt": "steep"}})
        with pytest.raises(
            ConfigError, match=r"unknown config key 'mixing.tlit'; did you mean 'mixing.tilt'\?"
        ):
            config_from_dict({"data": {"path": "c"}, "mixing": {"method": "test_tilted", "tlit": 2}})
        cfg = config_from_dict({"data": {"path": "c"}, "mixing": {"method": "stratified", "tilt": 2.0}})
        with pytest.raises(ConfigError, match="mixing.method 'stratified' does not use mixing.tilt"):
            build_run_mixer(cfg, ["a", "b"], torch.device("cpu"))
        written = dump_config(config_from_dict({"data": {"path": "c"}}))
        assert "  tilt: null\n" in written  # every registered mixer's options are listed, unset: null
    finally:
        del MIXERS["test_tilted"]
    # a config written while the mixer was registered still loads without it
    assert (
        config_from_dict(yaml.safe_load(written)).to_dict()
        == config_from_dict({"data": {"path": "c"}}).to_dict()
    )


NOT_UTF8 = b"train:\n  steps: 3\n# caf\xe9 latin-1\n"  # byte 23 (0xe9) is not UTF-8


def test_a_config_file_that_is_not_utf8_is_one_line_from_the_command(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_bytes(NOT_UTF8)
    proc = subprocess.run(
        [sys.executable, "-m", "aioli_fast", "train", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"aioli-fast train: error: {bad} is not UTF-8 text")
    assert "byte 23" in proc.stderr


@pytest.mark.parametrize("reader", ["config file", "sweep spec"])
@pytest.mark.parametrize(
    "data", [NOT_UTF8, "train: {steps: 3}\n".encode("utf-16")], ids=["latin-1", "utf-16"]
)
def test_every_yaml_reader_says_a_file_is_not_utf8(tmp_path, reader, data):
    from aioli_fast.harness.sweep import load_spec

    bad = tmp_path / "bad.yaml"
    bad.write_bytes(data)
    load = load_config if reader == "config file" else load_spec
    with pytest.raises(ConfigError, match="is not UTF-8 text") as err:
        load(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_config_file_is_a_config_error(tmp_path):
    locked = tmp_path / "locked.yaml"
    locked.write_text("train: {steps: 3}\n")
    locked.chmod(0)
    try:
        with pytest.raises(ConfigError, match=f"cannot read config file {re.escape(str(locked))}"):
            load_config(locked)
    finally:
        locked.chmod(0o600)


def test_a_folder_given_as_the_config_file_is_named_as_such(tmp_path):
    with pytest.raises(ConfigError, match=f"config file {re.escape(str(tmp_path))} is not a file"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train: [1, 2\n", "line 2, column 1: while parsing a flow sequence, expected ',' or ']'"),
        ("train:\n  steps: 3: 4\n", "line 2, column 11: mapping values are not allowed here"),
        ("train: {steps: 3}\n\x07\n", "unacceptable character #x0007"),
    ],
    ids=["unclosed", "colon", "control-character"],
)
def test_invalid_yaml_is_one_line_naming_where(tmp_path, text, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value).startswith(f"{bad} is not valid YAML: ") and expected in str(err.value)
    assert "\n" not in str(err.value)


def test_tensorboard_off_and_on_unquoted_are_the_words(tmp_path):
    """YAML 1.1 reads `off` / `on` as booleans; for train.tensorboard (documented as auto | on | off) a
    boolean means the word, in a file and in an override. Elsewhere a boolean for a string stays an error."""
    path = tmp_path / "run.yaml"
    path.write_text("data: {path: corpus}\ntrain:\n  tensorboard: off\n")
    assert load_config(path).train.tensorboard == "off"
    assert load_config(path, ["train.tensorboard=on"]).train.tensorboard == "on"
    with pytest.raises(ConfigError, match="train.precision: expected str, got bool False"):
        load_config(path, ["train.precision=off"])
