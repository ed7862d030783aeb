"""Resuming on another number of processes, as users launch it (torchrun, real gloo processes).

- the native trainer under DeepSpeed ZeRO-1 goes 1 -> 2 -> 4 processes and ZeRO-2 2 -> 1 (inside a
  train-mode measurement window); ZeRO-3 is refused in one line; every
  resumed step has the uninterrupted run's per-domain token counts exactly (the same samples) and its
  proportions, loss and per-domain losses up to the order of floating-point sums;
- the HF Trainer adapter (2 -> 1, 1 -> 2) and the Lightning adapter (2 -> 1, 1 -> 2) draw, slot by slot,
  the samples the uninterrupted run drew at every resumed step.

(The stream's guarantees themselves, sample by sample on 1-4 ranks, are in tests/test_mixture.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import prepare_three_domains, tiny_zero_overrides

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "zero-cpu.yaml"
STEPS = 16


def _env() -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def launch(processes: int, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``args`` (a module or script and its arguments) under torchrun with ``processes`` processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    result = subprocess.run([*cmd, *args], env=_env(), capture_output=True, text=True, timeout=600, cwd=cwd)
    assert result.returncode == 0, f"{processes} process(es) failed:\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return prepare_three_domains(tmp_path_factory.mktemp("elastic"))


# --------------------------------------------------------------------------------------------------
# the native trainer under DeepSpeed


def overrides(root: Path, name: str, *extra: str) -> list[str]:
    return [*tiny_zero_overrides(root, name, STEPS, checkpoint_every=4), "checkpoint.keep_last=10", *extra]


def train(root: Path, processes: int, name: str, *extra: str) -> subprocess.CompletedProcess:
    args = overrides(root, name, *extra)
    return launch(processes, "-m", "aioli_fast", "train", "--config", str(CONFIG), *args)


def records(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def assert_continues(resumed: Path, full: Path, first: int) -> None:
    """Steps ``first``..STEPS of ``resumed`` are those of the uninterrupted run ``full``: the same
    per-domain token counts (the same samples), proportions, loss and per-domain losses up to the order
    of floating-point sums over another number of processes."""
    got, want = records(resumed), records(full)
    assert sorted(got) == list(range(first, STEPS + 1))
    for step in range(first, STEPS + 1):
        a, b = got[step], want[step]
        assert a["domain_tokens"] == b["domain_tokens"], f"step {step}"
        assert a["tokens"] == b["tokens"]
        for d, p in b["proportions"].items():
            assert a["proportions"][d] == pytest.approx(p, abs=1e-6), f"step {step} {d}"
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), f"step {step}"
        for d, loss in b["domain_loss"].items():
            assert (a["domain_loss"][d] is None) == (loss is None)
            if loss is not None:
                assert a["domain_loss"][d] == pytest.approx(loss, rel=1e-4), f"step {step} {d}"
    assert max(abs(p - 1 / 3) for p in want[STEPS]["proportions"].values()) > 1e-3  # the mixer moved


def checkpoint(root: Path, name: str, step: int) -> str:
    return f"checkpoint.resume={root / 'runs' / name / 'checkpoints' / f'step_{step:08d}'}"


def test_zero1_goes_from_one_process_to_two_then_four(root):
    """Steps 5-8 of the ZeRO-1 run resumed on 2 processes, then steps 9-16 on 4, continue the
    one-process run: weights, Adam moments, stream and mixer (Aioli's probe measurements, inside a
    LearnParams round at step 4) carried over."""
    train(root, 1, "z1-full", "engine.zero_stage=1")
    two = train(root, 2, "z1-two", "engine.zero_stage=1", checkpoint(root, "z1-full", 4))
    assert "was written by 1 process(es), this run has 2" in two.stderr
    assert "converting" in two.stderr  # DeepSpeed's universal checkpoint, once
    universal = root / "runs" / "z1-full" / "checkpoints" / "step_00000004" / "universal"
    assert (universal / "engine").is_dir()
    assert_continues(root / "runs" / "z1-two", root / "runs" / "z1-full", 5)
    four = train(root, 4, "z1-four", "engine.zero_stage=1", checkpoint(root, "z1-two", 8))
    assert "was written by 2 process(es), this run has 4" in four.stderr
    assert_continues(root / "runs" / "z1-four", root / "runs" / "z1-full", 9)
    final = json.loads((root / "runs" / "z1-four" / "final.json").read_text())
    assert final["world_size"] == 4


def test_zero2_goes_from_two_processes_to_one_inside_a_measurement_window(root):
    """Train-mode measurements: the per-rank window open at the step-8 checkpoint is merged onto the
    one process."""
    train_mode = ("mixing.measurement=train", "mixing.round_steps=6")
    train(root, 2, "z2-full", "engine.zero_stage=2", *train_mode)
    saved = root / "runs" / "z2-full" / "checkpoints" / "step_00000008"
    ranks = torch.load(saved / "trainer.pt", weights_only=True)["ranks"]
    assert all(float(r["mixer"]["window"][1].sum()) > 0 for r in ranks)  # open on both ranks
    one = train(root, 1, "z2-one", "engine.zero_stage=2", *train_mode, checkpoint(root, "z2-full", 8))
    assert "was written by 2 process(es), this run has 1" in one.stderr
    assert_continues(root / "runs" / "z2-one", root / "runs" / "z2-full", 9)


def test_zero3_on_another_number_of_processes_is_refused_in_one_line(root):
    train(root, 2, "z3-full", "engine.zero_stage=3", "train.steps=4")
    cmd = [sys.executable, "-m", "aioli_fast", "train", "--config", str(CONFIG)]
    cmd += overrides(root, "z3-one", "engine.zero_stage=3", "train.steps=4", checkpoint(root, "z3-full", 4))
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    (line,) = [x for x in result.stderr.splitlines() if "error:" in x]
    assert "written by 2 under ZeRO-3" in line and "resume on 2 process(es)" in line
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------------
# the adapters: the samples of every resumed step, slot by slot

HF_SCRIPT = """
import hashlib, json, sys
from pathlib import Path

import torch
import transformers

from aioli_fast.integrations.hf import AioliTrainer

corpus, out, processes, resume = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
accumulation = 4 // processes  # a global batch of 2 x accumulation x processes = 8


class Recording(AioliTrainer):
    seen = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._capture is not None:  # training micro-batches only
            for row in inputs["input_ids"].tolist():
                self.seen.append([self.state.global_step, hashlib.sha1(json.dumps(row).encode()).hexdigest()])
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


torch.manual_seed(0)
config = transformers.GPT2Config(vocab_size=320, n_positions=16, n_embd=32, n_layer=2, n_head=2, n_inner=64,
                                 bos_token_id=0, eos_token_id=0,
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
args = transformers.TrainingArguments(
    output_dir=str(out), max_steps=12, per_device_train_batch_size=2,
    gradient_accumulation_steps=accumulation,
    learning_rate=3e-3, logging_steps=1, save_strategy="steps", save_steps=5, report_to=[], use_cpu=True,
    disable_tqdm=True,
)
trainer = Recording(
    model=transformers.GPT2LMHeadModel(config), args=args, corpus=corpus, mixer="aioli",
    mixer_options={"measurement": "train", "round_steps": 8, "sweeps": 1, "block_steps": 2,
                   "update": "cumulative", "eta": 2.0},
)
trainer.train(resume_from_checkpoint=resume or None)
(out / f"rank{args.process_index}.json").write_text(json.dumps({
    "seen": trainer.seen,
    "logs": {r["step"]: r for r in trainer.state.log_history if "loss" in r},
}))
if torch.distributed.is_initialized():  # a clean exit: gloo threads left at exit can abort it
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""

LIGHTNING_SCRIPT = """
import hashlib, json, sys

import lightning.pytorch as pl
import torch

from aioli_fast.integrations.lightning import AioliCallback, AioliDataModule

corpus, out, devices, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
# a global batch of 8 kept as Lightning needs it: the same accumulate_grad_batches (2), a micro-batch of
# 4 // processes
batch_size = 4 // devices


class TinyLM(pl.LightningModule):
    def __init__(self, vocab_size=320, dim=32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, dim)
        self.mix = torch.nn.Linear(dim, dim)
        self.out = torch.nn.Linear(dim, vocab_size)
        self.seen = []

    def forward(self, input_ids):
        h = self.embed(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, device=h.device).view(1, -1, 1)
        return self.out(h + torch.tanh(self.mix(h.cumsum(1) / steps)))

    def training_step(self, batch, batch_idx):
        for row in batch["input_ids"].tolist():
            self.seen.append([self.trainer.global_step, hashlib.sha1(json.dumps(row).encode()).hexdigest()])
        return self.trainer.datamodule.loss(self(batch["input_ids"]), batch)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


torch.manual_seed(0)
model = TinyLM()
dm = AioliDataModule(corpus, batch_size=batch_size, mixer="aioli", seed=3,
                     mixer_options={"measurement": "train", "sweeps": 1, "block_steps": 2,
                                    "update": "cumulative", "eta": 2.0, "round_steps": 9})
saves = pl.callbacks.ModelCheckpoint(dirpath=f"{out}/ck", every_n_train_steps=5, save_top_k=-1)
trainer = pl.Trainer(max_steps=12, accelerator="cpu", devices=devices,
                     strategy="ddp" if devices > 1 else "auto",
                     accumulate_grad_batches=2, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[AioliCallback(), saves], limit_val_batches=0,
                     num_sanity_val_steps=0)
trainer.fit(model, datamodule=dm, ckpt_path=resume or None)
with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
    json.dump({"seen": model.seen, "learned": dm.mixing.mixer.state_dict()["proportions"].tolist()}, f)
"""


def global_order(out: Path, processes: int) -> dict[int, list[str]]:
    """Per step, the samples of the global batch slot by slot (rank 0's slots first)."""
    order: dict[int, list[str]] = {}
    for rank in range(processes):
        for step, sample in json.loads((out / f"rank{rank}.json").read_text())["seen"]:
            order.setdefault(step, [[] for _ in range(processes)])[rank].append(sample)
    return {step: [s for part in parts for s in part] for step, parts in order.items()}


def assert_same_samples(resumed: dict, full: dict, first: int) -> None:
    assert sorted(resumed) == list(range(first, 12))
    for step in resumed:
        assert len(resumed[step]) == 8  # the global batch: 8 sequences
        assert resumed[step] == full[step], f"step {step}"


def before_and_after(root: Path, tmp_path: Path, script: str, before: int, after: int, checkpoint) -> tuple:
    """The script's run on ``before`` processes, then on ``after`` from ``checkpoint(first run's
    folder)``; checks that every resumed step drew the uninterrupted run's samples, slot by slot, and
    returns both runs' rank-0 records."""
    path = tmp_path / "elastic.py"
    path.write_text(textwrap.dedent(script))
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    for out in (full, resumed):
        out.mkdir()
    launch(before, str(path), str(root / "corpus"), str(full), str(before), "", cwd=tmp_path)
    launch(
        after, str(path), str(root / "corpus"), str(resumed), str(after), str(checkpoint(full)), cwd=tmp_path
    )
    assert_same_samples(global_order(resumed, after), global_order(full, before), 5)
    return tuple(json.loads((out / "rank0.json").read_text()) for out in (full, resumed))


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_the_hf_trainer_resumes_on_another_number_of_processes(root, tmp_path, before, after):
    pytest.importorskip("transformers")
    want, got = before_and_after(root, tmp_path, HF_SCRIPT, before, after, lambda full: full / "checkpoint-5")
    want, got = want["logs"], got["logs"]
    for step in range(6, 13):
        a, b = got[str(step)], want[str(step)]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), f"step {step}"
        for key, value in b.items():
            if key.startswith("proportions/"):
                assert a[key] == pytest.approx(value, abs=1e-5), f"step {step} {key}"
            if key.startswith("domain_loss/"):
                assert a[key] == pytest.approx(value, rel=1e-4), f"step {step} {key}"


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_lightning_resumes_on_another_number_of_processes(root, tmp_path, before, after):
    pytest.importorskip("lightning")
    want, got = before_and_after(
        root, tmp_path, LIGHTNING_SCRIPT, before, after, lambda full: next((full / "ck").glob("*step=5.ckpt"))
    )
    assert got["learned"] == pytest.approx(want["learned"], abs=1e-6)
    assert max(abs(p - 1 / 3) for p in want["learned"]) > 0.01  # the mixer moved
