"""The training pieces: LR schedule, optimizer groups, evaluation, the loop's logged numbers, checkpoints.

Evaluation is checked against an independent computation (full logits and ``F.cross_entropy``); the
loop is checked through what it writes (``metrics.jsonl``, ``final.json``, ``model.pt``) on a tiny
corpus and the tiny preset, a few steps per run.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import write_alphabet_domain

from aioli_fast.config import config_from_dict
from aioli_fast.data import load_manifest, prepare, read_shard
from aioli_fast.errors import AioliError
from aioli_fast.model import GPT, GPTConfig
from aioli_fast.train import evaluate, format_table, load_checkpoint, save_checkpoint, train
from aioli_fast.train.components import lr_at
from aioli_fast.train.engine import build_optimizer

SEQ = 16
CPU = torch.device("cpu")


def _config(**sections):
    """A RunConfig from section mappings; data.path is only read by ``train``."""
    data = {"data": {"path": "unused"}, **sections}
    return config_from_dict(data)


# ---------------------------------------------------------------------------------------------------
# learning-rate schedule


@pytest.mark.parametrize(
    "warmup, steps",
    [(4, 20), (1, 10), (3, 4), (10, 11), (5, 1000)],
    ids=["W4T20", "W1T10", "W3T4", "W10T11", "W5T1000"],
)
def test_lr_warmup_then_cosine_to_the_floor(warmup, steps):
    lr, ratio = 3e-3, 0.1
    cfg = _config(optim={"lr": lr, "warmup_steps": warmup, "min_lr_ratio": ratio}, train={"steps": steps})
    assert lr_at(0, cfg) == pytest.approx(lr / warmup)  # the first step already learns
    for s in range(warmup):
        assert lr_at(s, cfg) == pytest.approx(lr * (s + 1) / warmup)
    assert lr_at(warmup - 1, cfg) == pytest.approx(lr)
    assert lr_at(steps - 1, cfg) == lr * ratio  # exactly the floor on the last step
    after = [lr_at(s, cfg) for s in range(warmup - 1, steps)]
    assert all(a >= b for a, b in zip(after, after[1:])), after  # non-increasing after warm-up
    assert all(lr * ratio <= v <= lr * (1 + 1e-12) for v in after)  # lr * 3 / 3 may round up
    if steps - 1 - warmup >= 2 and (steps - 1 - warmup) % 2 == 0:  # the midpoint of the cosine
        mid = warmup + (steps - 1 - warmup) // 2
        assert lr_at(mid, cfg) == pytest.approx(lr * (ratio + (1 - ratio) * 0.5))


def test_lr_without_warmup_starts_at_the_peak():
    cfg = _config(optim={"lr": 1e-3, "warmup_steps": 0, "min_lr_ratio": 0.2}, train={"steps": 5})
    values = [lr_at(s, cfg) for s in range(5)]
    assert values[0] == pytest.approx(1e-3)
    assert values[-1] == 1e-3 * 0.2
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[2] == pytest.approx(1e-3 * (0.2 + 0.8 * 0.5))


def test_lr_single_step_run():
    cfg = _config(optim={"lr": 1e-3, "warmup_steps": 0, "min_lr_ratio": 0.1}, train={"steps": 1})
    value = lr_at(0, cfg)
    assert math.isfinite(value) and value == 1e-3 * 0.1  # the only step is the last one
    cfg = _config(optim={"lr": 1e-3, "warmup_steps": 0, "min_lr_ratio": 1.0}, train={"steps": 1})
    assert lr_at(0, cfg) == 1e-3


def test_lr_min_ratio_zero_ends_at_zero():
    cfg = _config(optim={"lr": 1e-3, "warmup_steps": 2, "min_lr_ratio": 0.0}, train={"steps": 10})
    assert lr_at(9, cfg) == 0.0 and lr_at(8, cfg) > 0


# ---------------------------------------------------------------------------------------------------
# optimizer


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig(vocab_size=64, max_seq_len=8, d_model=16, n_layers=2, n_heads=2, d_ff=32))
    cfg = _config(optim={"weight_decay": 0.05, "lr": 2e-3, "beta1": 0.8, "beta2": 0.9, "eps": 1e-7})
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    for group in opt.param_groups:
        assert group["lr"] == 2e-3 and group["betas"] == (0.8, 0.9) and group["eps"] == 1e-7

    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    # every parameter in exactly one group
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(names)
    assert decay_names | no_decay_names == set(names.values())

    norm_weights = {
        f"{mod_name}.weight" for mod_name, mod in model.named_modules() if isinstance(mod, torch.nn.LayerNorm)
    }
    biases = {n for n in names.values() if n.endswith(".bias")}
    assert norm_weights and biases
    assert no_decay_names == norm_weights | biases  # biases, LayerNorm weights and nothing else
    assert all(dict(model.named_parameters())[n].dim() >= 2 for n in decay_names)
    assert {"embed.weight", "lm_head.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.down.weight"} <= (
        decay_names
    )


# ---------------------------------------------------------------------------------------------------
# format_table


def _result(losses: dict[str, float]) -> dict:
    domains = {d: {"loss": v, "ppl": math.exp(v), "tokens": 160} for d, v in losses.items()}
    return {
        "domains": domains,
        "average": {
            "loss": sum(losses.values()) / len(losses),
            "ppl": sum(r["ppl"] for r in domains.values()) / len(domains),
        },
    }


def _table_rows(table: str) -> dict[str, list[str]]:
    lines = table.splitlines()
    return {line.split()[0]: line.split()[1:] for line in lines[2:] if line and not line.startswith("-")}


def test_format_table_val_and_test():
    val = _result({"code": 1.23456, "a-very-long-domain-name": 2.5})
    test = _result({"code": 1.5, "a-very-long-domain-name": 3.0})
    table = format_table(val, test)
    lines = table.splitlines()
    assert lines[0].split() == ["domain", "val", "loss", "val", "ppl", "test", "loss", "test", "ppl"]
    assert set(lines[1]) == {"-"} and len(lines[1]) == len(lines[0])
    rows = _table_rows(table)
    assert list(rows) == ["code", "a-very-long-domain-name", "average"]
    assert rows["code"] == ["1.2346", f"{math.exp(1.23456):.3f}", "1.5000", f"{math.exp(1.5):.3f}"]
    assert rows["average"] == [
        f"{val['average']['loss']:.4f}",
        f"{val['average']['ppl']:.3f}",
        f"{test['average']['loss']:.4f}",
        f"{test['average']['ppl']:.3f}",
    ]
    assert lines[-2] == lines[1]  # a rule above the average row
    # columns line up: every row as wide as the header
    assert {len(line) for line in lines} == {len(lines[0])}


@pytest.mark.parametrize("only", ["val", "test"])
def test_format_table_with_one_split(only):
    res = _result({"x": 0.5, "y": 1.0})
    table = format_table(res if only == "val" else None, res if only == "test" else None)
    header = table.splitlines()[0].split()
    assert header == ["domain", only, "loss", only, "ppl"]
    rows = _table_rows(table)
    assert rows["x"] == ["0.5000", f"{math.exp(0.5):.3f}"]
    assert rows["average"] == ["0.7500", f"{res['average']['ppl']:.3f}"]


# ---------------------------------------------------------------------------------------------------
# a tiny corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_alphabet_domain(root / "raw" / "ab", "ab", 20, 0)
    write_alphabet_domain(root / "raw" / "xyz", "xyz", 20, 1)
    prepare(
        {"ab": [str(root / "raw" / "ab")], "xyz": [str(root / "raw" / "xyz")]},
        root / "corpus",
        seq_len=SEQ,
        val_fraction=0.2,
        test_fraction=0.2,
        shard_sequences=32,  # several shards per split: evaluation crosses shard boundaries
        progress=False,
    )
    return root


def _split_samples(manifest, domain: str, split: str) -> np.ndarray:
    """Every sample [S, SEQ + 1] of one split, read shard by shard in manifest order."""
    parts = [
        read_shard(s.path, sample_len=manifest.sample_len, vocab_size=manifest.vocab_size)[1]
        for s in manifest.split_shards(domain, split)
    ]
    return np.concatenate(parts)


def _reference_nll(model: GPT, samples: np.ndarray) -> tuple[float, int]:
    """Mean next-token NLL over every target token of ``samples``, from the full logits."""
    tokens = torch.from_numpy(samples)
    with torch.no_grad():
        logits = model.logits(tokens[:, :-1]).double()
    targets = tokens[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return float(total) / targets.numel(), targets.numel()


@pytest.fixture(scope="module")
def eval_model():
    torch.manual_seed(0)
    # a large init std gives peaked, input-dependent predictions: the domains' losses differ clearly
    cfg = GPTConfig(vocab_size=320, max_seq_len=SEQ, d_model=32, n_layers=1, n_heads=2, d_ff=64, init_std=0.5)
    return GPT(cfg).eval()


@pytest.mark.parametrize("batch_size", [1, 7, 1000], ids=["b1", "b7", "b1000"])
def test_evaluate_matches_an_independent_computation(corpus, eval_model, batch_size):
    manifest = load_manifest(corpus / "corpus")
    assert len(manifest.split_shards("ab", "val")) > 1 or len(manifest.split_shards("xyz", "val")) > 1
    eval_model.train()
    res = evaluate(eval_model, manifest, ["ab", "xyz"], "val", batch_size=batch_size, device=CPU)
    assert eval_model.training  # the mode is restored
    losses, ppls = [], []
    for dom in ("ab", "xyz"):
        samples = _split_samples(manifest, dom, "val")
        eval_model.eval()
        loss, tokens = _reference_nll(eval_model, samples)
        got = res["domains"][dom]
        assert got["tokens"] == tokens == manifest.num_sequences(dom, "val") * SEQ
        assert got["loss"] == pytest.approx(loss, rel=1e-5)
        assert got["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
        losses.append(loss)
        ppls.append(math.exp(loss))
    assert abs(losses[0] - losses[1]) > 0.05  # the check below tells the two averages apart
    assert res["average"]["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)
    assert res["average"]["ppl"] == pytest.approx(sum(ppls) / 2, rel=1e-5)  # mean of perplexities
    assert res["average"]["ppl"] > math.exp(res["average"]["loss"]) * (1 + 1e-4)  # not exp(mean loss)


def test_evaluate_a_subset_of_domains_and_the_test_split(corpus, eval_model):
    manifest = load_manifest(corpus / "corpus")
    res = evaluate(eval_model, manifest, ["xyz"], "test", batch_size=4, device=CPU)
    assert list(res["domains"]) == ["xyz"]
    loss, tokens = _reference_nll(eval_model, _split_samples(manifest, "xyz", "test"))
    assert res["domains"]["xyz"]["tokens"] == tokens
    assert res["domains"]["xyz"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert res["average"]["loss"] == res["domains"]["xyz"]["loss"]


@pytest.mark.parametrize("max_sequences, batch_size", [(3, 2), (5, 8), (33, 4)], ids=["3b2", "5b8", "33b4"])
def test_evaluate_max_sequences_caps_the_tokens(corpus, eval_model, max_sequences, batch_size):
    manifest = load_manifest(corpus / "corpus")
    res = evaluate(
        eval_model,
        manifest,
        ["ab", "xyz"],
        "val",
        batch_size=batch_size,
        device=CPU,
        max_sequences=max_sequences,
    )
    for dom in ("ab", "xyz"):
        available = manifest.num_sequences(dom, "val")
        assert available > 5
        used = min(max_sequences, available)
        assert res["domains"][dom]["tokens"] == used * SEQ
        loss, _ = _reference_nll(eval_model, _split_samples(manifest, dom, "val")[:used])
        assert res["domains"][dom]["loss"] == pytest.approx(loss, rel=1e-5)


def test_evaluate_max_sequences_beyond_the_split_uses_all_of_it(corpus, eval_model):
    manifest = load_manifest(corpus / "corpus")
    res = evaluate(eval_model, manifest, ["ab"], "val", batch_size=16, device=CPU, max_sequences=10**6)
    assert res["domains"]["ab"]["tokens"] == manifest.num_sequences("ab", "val") * SEQ


# ---------------------------------------------------------------------------------------------------
# the loop


@pytest.fixture(scope="module")
def run(corpus):
    """run(name, **train_overrides) -> run directory; each distinct run trains once per module."""
    done = {}

    def _run(name: str, *, domains=None, **train_section):
        if name not in done:
            cfg = config_from_dict(
                {
                    "data": {"path": str(corpus / "corpus"), "domains": domains},
                    "model": {"preset": "tiny"},
                    "optim": {"lr": 3e-3, "warmup_steps": 2},
                    "train": {
                        "steps": 8,
                        "batch_size": 4,
                        "log_every": 4,
                        "progress": False,
                        "device": "cpu",
                        "out_dir": str(corpus / "runs"),
                        "name": name,
                        **train_section,
                    },
                    "eval": {"batch_size": 8, "max_sequences": 8},
                }
            )
            result = train(cfg)
            assert result.run_dir == corpus / "runs" / name
            done[name] = result.run_dir
        return done[name]

    return _run


def _records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def _final_numbers(run_dir) -> dict:
    final = json.loads((run_dir / "final.json").read_text())
    for timing in ("train_time_s", "tokens_per_s"):
        final.pop(timing)
    return final


def test_single_domain_loss_equals_its_domain_loss(run):
    records = _records(run("only-ab", domains=["ab"]))
    assert [r["step"] for r in records] == [4, 8]
    for r in records:
        assert list(r["domain_loss"]) == ["ab"] and r["proportions"] == {"ab": 1.0}
        assert r["loss"] == pytest.approx(r["domain_loss"]["ab"], rel=1e-5)


def test_logged_loss_does_not_depend_on_the_micro_batch_size(run):
    whole = _records(run("mb4"))
    split = _records(run("mb2", micro_batch_size=2))
    assert [r["step"] for r in whole] == [r["step"] for r in split] == [4, 8]
    for a, b in zip(whole, split):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        for dom in ("ab", "xyz"):
            assert b["domain_loss"][dom] == pytest.approx(a["domain_loss"][dom], rel=1e-5)
        # a token-weighted mean lies between the per-domain means
        lo, hi = min(a["domain_loss"].values()), max(a["domain_loss"].values())
        assert lo * (1 - 1e-6) <= a["loss"] <= hi * (1 + 1e-6)
    assert whole[-1]["loss"] < whole[0]["loss"]


def test_gradient_accumulation_gives_the_same_weights(run):
    whole = torch.load(run("mb4") / "model.pt", weights_only=True)["model"]
    split = torch.load(run("mb2", micro_batch_size=2) / "model.pt", weights_only=True)["model"]
    init = GPT(GPTConfig(**torch.load(run("mb4") / "model.pt", weights_only=True)["model_config"]))
    assert whole.keys() == split.keys()
    moved = 0
    for name, tensor in whole.items():
        torch.testing.assert_close(split[name], tensor, atol=1e-5, rtol=0, msg=name)
        moved += not torch.allclose(tensor, init.state_dict()[name])
    assert moved > len(whole) // 2  # training changed the weights: the comparison is not vacuous


def test_same_seed_same_results_other_seed_other_results(run):
    first = _final_numbers(run("mb4"))
    again = _final_numbers(run("mb4-again"))
    assert again == first
    assert _records(run("mb4-again")) != []
    for a, b in zip(_records(run("mb4")), _records(run("mb4-again"))):
        assert a["loss"] == b["loss"] and a["domain_loss"] == b["domain_loss"]
    other = _final_numbers(run("seed1", seed=1))
    assert other["val"]["average"]["loss"] != first["val"]["average"]["loss"]
    for dom in ("ab", "xyz"):
        assert other["test"]["domains"][dom]["loss"] != first["test"]["domains"][dom]["loss"]


# ---------------------------------------------------------------------------------------------------
# checkpoints


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(AioliError, match="checkpoint not found") as info:
        load_checkpoint(tmp_path / "nope.pt")
    assert str(tmp_path / "nope.pt") in str(info.value)
    with pytest.raises(AioliError) as info:  # a folder without model.pt
        load_checkpoint(tmp_path)
    assert str(tmp_path / "model.pt") in str(info.value)


def _check_one_line_error(path):
    with pytest.raises(AioliError) as info:
        load_checkpoint(path)
    text = str(info.value)
    assert str(path) in text
    assert "\n" not in text.strip(), text
    assert "weights_only" not in text, text


def test_load_checkpoint_empty_or_not_a_zip(tmp_path):
    for name, data in [("empty.pt", b""), ("zip.pt", b"PK\x03\x04" + b"\x00" * 40)]:
        (tmp_path / name).write_bytes(data)
        _check_one_line_error(tmp_path / name)


def test_load_checkpoint_garbage_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint\n" * 20)
    _check_one_line_error(path)


def test_load_checkpoint_truncated_file(run, tmp_path):
    data = (run("mb4") / "model.pt").read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    _check_one_line_error(path)


@pytest.mark.parametrize(
    "payload", [{"weights": torch.zeros(3)}, [1, 2, 3], {"format": 99}], ids=["dict", "list", "format-99"]
)
def test_load_checkpoint_of_a_foreign_torch_file(tmp_path, payload):
    path = tmp_path / "foreign.pt"
    torch.save(payload, path)
    with pytest.raises(AioliError, match="is not an aioli_fast checkpoint"):
        load_checkpoint(path)


def test_load_checkpoint_with_our_tag_but_missing_fields(tmp_path):
    path = tmp_path / "partial.pt"
    torch.save({"format": 1}, path)
    with pytest.raises(AioliError):
        load_checkpoint(path)


def test_checkpoint_round_trip_gives_the_same_logits(tmp_path):
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=64, max_seq_len=12, d_model=32, n_layers=2, n_heads=4, d_ff=48))
    with torch.no_grad():  # parameters away from their initial values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "ckpt" / "model.pt"
    path.parent.mkdir()
    save_checkpoint(path, model, step=7, domains=["a", "b"], config={"x": 1}, tokenizer={"kind": "byte"})
    loaded, meta = load_checkpoint(path.parent)  # a run directory is accepted too
    assert loaded.cfg == model.cfg
    assert meta["step"] == 7 and meta["domains"] == ["a", "b"]
    assert meta["config"] == {"x": 1} and meta["tokenizer"] == {"kind": "byte"}
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.logits(ids), model.logits(ids))


def test_trained_checkpoint_reproduces_the_final_evaluation(run, corpus):
    run_dir = run("mb4")
    model, meta = load_checkpoint(run_dir / "model.pt")
    final = json.loads((run_dir / "final.json").read_text())
    assert meta["step"] == 8 and meta["domains"] == ["ab", "xyz"] == final["domains"]
    assert meta["config"]["train"]["name"] == "mb4"
    manifest = load_manifest(corpus / "corpus")
    assert meta["tokenizer"] == manifest.tokenizer
    for split in ("val", "test"):
        res = evaluate(model, manifest, meta["domains"], split, batch_size=8, device=CPU, max_sequences=8)
        for dom in ("ab", "xyz"):
            assert res["domains"][dom]["loss"] == pytest.approx(
                final[split]["domains"][dom]["loss"], rel=1e-6
            )
        assert res["average"]["ppl"] == pytest.approx(final["average"][f"{split}_ppl"], rel=1e-6)
