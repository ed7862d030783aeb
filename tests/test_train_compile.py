"""``train.compile``: the model compiles as one graph with its per-domain loss, on both kernel backends,
and a compiled run trains like an eager one (in one process and under DeepSpeed ZeRO-1).

The Triton path is checked under Triton's interpreter (tests/conftest.py): there the loss is the
registered operator ``aioli_fast::linear_domain_ce`` (kernels/compiled.py), which dynamo keeps opaque;
``aot_eager`` runs the compiled graph without a C++ compiler so that the comparison is exact. The runs
use inductor, the default backend, as a user's would.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import prepare_three_domains

from aioli_fast.config import config_from_dict
from aioli_fast.errors import ConfigError
from aioli_fast.model import GPT, GPTConfig
from aioli_fast.train import train

CFG = GPTConfig(vocab_size=80, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_the_training_step_is_one_graph_and_matches_eager(backend):
    if backend == "triton":
        domain_ce = pytest.importorskip("aioli_fast.kernels.domain_ce", reason="needs triton")
        if not domain_ce.INTERPRETED:
            pytest.skip("the CPU check of the Triton path needs TRITON_INTERPRET=1")
    torch.manual_seed(0)
    model, eager = GPT(CFG), GPT(CFG)
    eager.load_state_dict(model.state_dict())
    ids, doms = torch.randint(0, 80, (3, 16)), torch.tensor([0, 1, 0])
    kwargs = dict(grad_scale=0.5, loss_backend=backend)
    explained = torch._dynamo.explain(model)(ids, ids, doms, 2, **kwargs)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(ids, ids, doms, 2, **kwargs)
    (out.loss * 0.5).backward()
    ref = eager(ids, ids, doms, 2, **kwargs)
    (ref.loss * 0.5).backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    torch.testing.assert_close(out.loss_sum, ref.loss_sum, rtol=0, atol=0)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8, msg=name)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare_three_domains(tmp_path_factory.mktemp("compile"))


def _run(corpus, out, name, **sections):
    cfg = {
        "data": {"path": str(corpus / "corpus")},
        "model": {"preset": "tiny"},
        "mixing": {
            "method": "aioli",
            "measurement": "train",
            "round_steps": 6,
            "sweeps": 1,
            "block_steps": 1,
        },
        "train": {
            "steps": 6,
            "batch_size": 4,
            "log_every": 2,
            "out_dir": str(out),
            "name": name,
            "progress": False,
        },
        "eval": {"max_sequences": 4},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    result = train(config_from_dict(cfg))
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r], result


@pytest.mark.slow
def test_a_compiled_run_trains_like_an_eager_one(corpus, tmp_path):
    eager, _ = _run(corpus, tmp_path, "eager")
    compiled, result = _run(corpus, tmp_path, "compiled", train={"compile": True})
    # inductor fuses and reorders fp32 arithmetic: the same run within rounding, not bit for bit
    assert compiled == pytest.approx(eager, rel=1e-4)
    ds, _ = _run(
        corpus, tmp_path, "ds", train={"compile": True}, engine={"backend": "deepspeed", "zero_stage": 1}
    )
    assert ds == pytest.approx(eager, rel=1e-4)
    assert result.final["average"]


def test_compile_with_zero3_is_refused(corpus, tmp_path):
    with pytest.raises(ConfigError, match="train.compile=true with engine.zero_stage=3 is not supported"):
        _run(corpus, tmp_path, "z3", train={"compile": True}, engine={"zero_stage": 3})
