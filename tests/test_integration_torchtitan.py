"""The torchtitan adapter (aioli_fast.integrations.torchtitan) with the real torchtitan 0.3, on the CPU.

torchtitan's ``Trainer`` runs here after the CPU workarounds of tests/torchtitan_cpu (each named
there; none touches the adapter, the model, FSDP, DCP checkpointing or the training loop). Each run is
a subprocess (tests/torchtitan_cpu/run.py), so the workarounds never reach the rest of the suite:

- the llama3 debug model trains with Aioli, the proportions move, and the per-domain evaluation runs;
- a run resumed from torchtitan's own step-3 checkpoint (inside a LearnParams block, with gradient
  accumulation) reproduces the uninterrupted run's per-micro-batch losses, proportions and weights;
- two processes under torchrun (FSDP over gloo, full_dtensor) read disjoint samples and agree on
  the proportions, the weights and the evaluation;
- the guide's config (docs/integrations/torchtitan.md) builds an AioliTrainer config from a model recipe;
- misconfigurations are one clear error.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import guide_blocks, prepare_three_domains

pytest.importorskip("torchtitan")

from aioli_fast.errors import AioliError, ConfigError  # noqa: E402
from aioli_fast.integrations.torchtitan import (  # noqa: E402
    AioliDataLoader,
    AioliLoss,
    AioliTrainer,
    CorpusTokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "tests" / "torchtitan_cpu" / "run.py"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return prepare_three_domains(tmp_path_factory.mktemp("tt-corpus")) / "corpus"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(corpus: Path, cwd: Path, dump: str, out: str, steps: int, *extra: str, processes: int = 1):
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd = [*launcher, str(RUN), str(corpus), str(cwd / dump), str(cwd / out), str(steps), *extra]
    result = subprocess.run(cmd, env=_env(), cwd=cwd, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def whole_run(corpus, tmp_path_factory) -> tuple[Path, dict]:
    cwd = tmp_path_factory.mktemp("tt-whole")
    (cwd / "console.txt").write_text(_run(corpus, cwd, "dump", "whole.json", 12))
    return cwd, json.loads((cwd / "whole.json").read_text())


@pytest.mark.slow
def test_aioli_trains_the_llama3_debug_model_and_evaluates_per_domain(whole_run):
    cwd, run = whole_run
    assert len(run["record"]) == 24  # 12 steps x 2 micro-batches
    assert [r[0] for r in run["record"]] == [s for s in range(1, 13) for _ in range(2)]
    assert max(abs(p - 1 / 3) for p in run["learned"]) > 0.01
    assert max(run["record"][0][2]) > 0.5  # LearnParams: the first block favours one domain
    assert run["record"][-1][1] < run["record"][0][1]  # it learns
    ev = run["eval"]
    assert {k for k in ev if k.startswith("val_ppl/")} == {"val_ppl/ab", "val_ppl/cd", "val_ppl/xyz"}
    assert all(1 < ev[f"val_ppl/{d}"] < 2048 for d in ("ab", "cd", "xyz"))
    console = (cwd / "console.txt").read_text()
    assert "aioli: " in console and "round(s) of" in console  # the start-up line of `aioli-fast train`
    assert "per-domain loss and proportion: ab " in console  # on torchtitan's console at log steps
    assert sorted(p.name for p in (cwd / "dump" / "checkpoint").iterdir()) == [
        "step-12",
        "step-3",
        "step-6",
        "step-9",
    ]


@pytest.mark.slow
def test_a_resumed_run_reproduces_the_uninterrupted_run_exactly(corpus, whole_run, tmp_path):
    cwd, whole = whole_run
    (tmp_path / "dump" / "checkpoint").mkdir(parents=True)
    shutil.copytree(cwd / "dump" / "checkpoint" / "step-3", tmp_path / "dump" / "checkpoint" / "step-3")
    _run(corpus, tmp_path, "dump", "resumed.json", 12, "3")
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["record"] == [r for r in whole["record"] if r[0] > 3]
    assert resumed["learned"] == whole["learned"]
    assert resumed["weights"] == whole["weights"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_read_disjoint_samples_and_agree(corpus, tmp_path):
    _run(corpus, tmp_path, "dump", "ddp.json", 9, processes=2)
    ranks = [json.loads((tmp_path / f"ddp.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    seen0, seen1 = ranks[0]["seen"], ranks[1]["seen"]
    assert len(seen0) == len(seen1) == 9 * 2 * 2  # steps x micro-batches x sequences
    assert not set(seen0) & set(seen1)  # each rank read its own slice of the global batch
    assert ranks[0]["learned"] == ranks[1]["learned"]  # the mixer all-reduced the ranks' sums
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["eval"] == ranks[1]["eval"] and "val_ppl/ab" in ranks[0]["eval"]


def test_the_guide_config_builds_an_aioli_trainer_config(corpus, tmp_path, monkeypatch):
    page = ROOT / "docs" / "integrations" / "torchtitan.md"
    blocks = [b for b in guide_blocks(page) if not b.startswith("# fragment\n")]
    assert blocks
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "corpus").symlink_to(corpus)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "my_mixing"}
    for index, code in enumerate(blocks):
        exec(compile(code, f"torchtitan.md block {index}", "exec"), namespace)
    config = namespace["llama3_aioli"]()
    assert isinstance(config, AioliTrainer.Config)
    assert isinstance(config.dataloader, AioliDataLoader.Config) and config.dataloader.mixer == "aioli"
    assert isinstance(config.loss, AioliLoss.Config)
    assert isinstance(config.tokenizer, CorpusTokenizer.Config)
    assert config.training.seq_len == 16  # the corpus's
    assert config.training.disable_cuda_graphs  # a graph replay would not feed the mixer


def test_misconfigurations_are_one_clear_error(corpus):
    with pytest.raises(
        ConfigError, match="training.seq_len is 99 but the corpus was prepared with seq_len 16"
    ):
        AioliDataLoader(
            AioliDataLoader.Config(dataset_path=str(corpus)),
            dp_world_size=1,
            dp_rank=0,
            seq_len=99,
            local_batch_size=2,
        )
    with pytest.raises(ConfigError, match="needs dataset_path"):
        AioliDataLoader(AioliDataLoader.Config(), dp_world_size=1, dp_rank=0, seq_len=16, local_batch_size=2)
    loader = AioliDataLoader(
        AioliDataLoader.Config(dataset_path=str(corpus)),
        dp_world_size=1,
        dp_rank=0,
        seq_len=16,
        local_batch_size=2,
    )
    with pytest.raises(AioliError, match="runs inside AioliTrainer"):
        next(iter(loader))
    with pytest.raises(AioliError, match="runs inside AioliTrainer"):
        AioliLoss(AioliLoss.Config())(None, None)
    from torchtitan.trainer import Trainer

    with pytest.raises(ConfigError, match="needs dataloader=AioliDataLoader.Config"):
        AioliTrainer(AioliTrainer.Config(**{f: getattr(Trainer.Config(), f) for f in ("loss",)}))
    tokenizer = CorpusTokenizer(CorpusTokenizer.Config(corpus=str(corpus)))
    assert tokenizer.get_vocab_size() >= 256
    with pytest.raises(AioliError, match="already token ids"):
        tokenizer.encode("text")


@pytest.mark.slow
def test_the_recipe_with_its_own_flex_attention_gets_document_masks_and_runs_forward(corpus, tmp_path):
    """The llama3 debug recipe unchanged (FlexAttention): the loader gives `positions`, from which
    torchtitan builds the document BlockMask; a training micro-batch's loss and the per-domain evaluation
    run through it. FlexAttention has no backward on the CPU, so training with it is for a GPU."""
    cmd = [sys.executable, str(RUN), "--flex", str(corpus), str(tmp_path / "flex.json")]
    result = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads((tmp_path / "flex.json").read_text())
    assert found["is_block_mask"] and found["documents"] > 2  # sequence starts and document boundaries
    assert math.isfinite(found["loss"]) and found["loss"] > 0
    assert all(math.isfinite(found["eval"][f"val_loss/{d}"]) for d in ("ab", "cd", "xyz"))
