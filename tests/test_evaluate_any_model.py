"""Per-domain evaluation of models that are not the package's GPT: a callable returning logits, one
returning hidden states and the output weight, and a real Hugging Face causal LM built from a config."""

from __future__ import annotations

import pytest
import torch
from helpers import prepare_three_domains

from aioli_fast.data import load_manifest
from aioli_fast.errors import AioliError
from aioli_fast.model import GPT, GPTConfig
from aioli_fast.train import evaluate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return load_manifest(prepare_three_domains(tmp_path_factory.mktemp("any-model")) / "corpus")


@pytest.fixture(scope="module")
def gpt(manifest):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=320, max_seq_len=manifest.seq_len, d_model=32, n_layers=2, n_heads=2, d_ff=64)
    return GPT(cfg)


def _evaluate(model, manifest):
    return evaluate(model, manifest, manifest.domains, "val", batch_size=5, device=CPU, max_sequences=12)


def test_a_callable_returning_logits_or_hidden_states_evaluates_like_the_gpt(gpt, manifest):
    reference = _evaluate(gpt, manifest)
    from_logits = _evaluate(gpt.logits, manifest)
    from_hidden = _evaluate(lambda ids: (gpt.hidden_states(ids), gpt.lm_head.weight), manifest)
    for got in (from_logits, from_hidden):
        assert set(got["domains"]) == set(manifest.domains)
        for name, want in reference["domains"].items():
            assert got["domains"][name]["tokens"] == want["tokens"] > 0
            assert got["domains"][name]["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["average"]["ppl"] == pytest.approx(reference["average"]["ppl"], rel=1e-5)
    assert gpt.training  # put back in training mode after evaluating through a bound method


def test_a_hugging_face_causal_lm_gets_per_domain_perplexity(manifest):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=320,
        n_positions=manifest.seq_len,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_inner=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    got = _evaluate(model, manifest)  # the model's output has .logits
    assert model.training  # evaluate restores the module's mode
    model.eval()  # the reference below, without dropout as evaluate runs it
    for name in manifest.domains:
        samples = next(iter(_val_samples(manifest, name)))
        with torch.no_grad():
            logits = model(torch.from_numpy(samples[:, :-1]).long()).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), torch.from_numpy(samples[:, 1:]).long().reshape(-1)
        )
        assert got["domains"][name]["loss"] == pytest.approx(loss.item(), rel=1e-5)


def _val_samples(manifest, name):
    from aioli_fast.data import sequential_batches

    return sequential_batches(manifest, name, "val", 12, 12)


def test_a_model_returning_something_else_is_a_clear_error(manifest):
    with pytest.raises(AioliError, match=r"must return logits \[B, T, V\] .* got str"):
        _evaluate(lambda ids: "not logits", manifest)
