"""The Hugging Face Trainer adapter (aioli_fast.integrations.hf.AioliTrainer) with real transformers.

Tiny GPT-2 and Llama causal LMs built from configs (nothing downloaded), on the CPU:

- Aioli moves the proportions away from uniform; logs carry proportions, per-domain training loss and
  per-domain validation perplexity at the evaluation points (train and probe measurements);
- a fresh Trainer resumed from a mid-run checkpoint (inside a measurement window, with gradient
  accumulation and dropout) reproduces the uninterrupted run bit for bit; a checkpoint without the
  mixer's state is refused;
- gradient accumulation 2 x 4 logs the loss of batch 8 (and the model's true mean token loss);
- ``evaluate()``, on the corpus or on an eval_dataset through compute_loss, never feeds the mixer;
- two DDP processes under torchrun read disjoint samples and agree on the proportions;
- the guide's example (docs/integrations/huggingface.md) runs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import prepare_three_domains, run_guide

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from aioli_fast.data import MixtureStream, load_manifest  # noqa: E402
from aioli_fast.errors import AioliError, ConfigError  # noqa: E402
from aioli_fast.integrations.hf import AioliTrainer, CorpusSplitDataset  # noqa: E402
from aioli_fast.train import evaluate  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:mixing.measurement=train:UserWarning")

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
DOMAINS = ["ab", "cd", "xyz"]
# 3 domains x 1 sweep x 2-step blocks = 6 LearnParams steps, + 1 closing measurement step
AIOLI = {"sweeps": 1, "block_steps": 2, "update": "cumulative", "eta": 2.0}
AIOLI.update(
    learn_fraction=1.0, prior_steps=0, max_learn_share=1.0, one_hot_factor=0.625
)  # the paper's procedure, scaled down


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return prepare_three_domains(tmp_path_factory.mktemp("hf-corpus")) / "corpus"


def tiny_model(corpus: Path, kind: str = "gpt2", dropout: bool = True):
    manifest = load_manifest(corpus)
    vocab = -(-manifest.vocab_size // 64) * 64
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=manifest.seq_len,
            bos_token_id=0,
            eos_token_id=0,
        )
        return transformers.LlamaForCausalLM(config)
    p = 0.1 if dropout else 0.0
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=manifest.seq_len,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_inner=64,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=p,
        embd_pdrop=p,
        attn_pdrop=p,
    )
    return transformers.GPT2LMHeadModel(config)


def training_args(out: Path, **overrides):
    options = {
        "output_dir": str(out),
        "max_steps": 12,
        "per_device_train_batch_size": 4,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        **overrides,
    }
    return transformers.TrainingArguments(**options)


def train_logs(trainer) -> dict[int, dict]:
    """Training log records by step, without the fields a resumed run counts differently (epoch,
    the final summary)."""
    return {
        r["step"]: {k: v for k, v in r.items() if k != "epoch"}
        for r in trainer.state.log_history
        if "loss" in r
    }


@pytest.mark.parametrize(("kind", "measurement"), [("gpt2", "train"), ("llama", "probe")])
def test_aioli_moves_the_proportions_and_logs_per_domain_losses(corpus, tmp_path, kind, measurement):
    options = {**AIOLI, "measurement": measurement, "round_steps": 10}
    trainer = AioliTrainer(
        model=tiny_model(corpus, kind),
        args=training_args(tmp_path, max_steps=30, eval_strategy="steps", eval_steps=15),
        corpus=corpus,
        mixer="aioli",
        mixer_options=options,
        eval_max_sequences=8,
        probe_sequences=4,
    )
    trainer.train()

    learned = trainer.mixer.state_dict()["proportions"]
    assert abs(float(learned.sum()) - 1) < 1e-5
    assert float((learned - 1 / 3).abs().max()) > 0.02  # three rounds moved them away from uniform
    logs = train_logs(trainer)
    assert sorted(logs) == list(range(1, 31))
    # rounds of 10 steps; LearnParams trains steps 0-5 of each on smoothed one-hot mixtures, then the
    # learned proportions (train mode: one closing measurement step first)
    first_exploit = 6 + (1 if measurement == "train" else 0)
    block = [logs[1][f"proportions/{d}"] for d in DOMAINS]
    assert sorted(block) == pytest.approx([0.1875, 0.1875, 0.625])
    logged = [logs[30][f"proportions/{d}"] for d in DOMAINS]  # step 29 trained on round 2's learned p
    assert logged == pytest.approx(learned.tolist(), abs=1e-6)
    assert [logs[first_exploit + 1][f"proportions/{d}"] for d in DOMAINS] != pytest.approx([1 / 3] * 3)
    domain_losses = [v for r in logs.values() for k, v in r.items() if k.startswith("domain_loss/")]
    assert len(domain_losses) > 60 and all(0 < v < 10 for v in domain_losses)

    evals = [r for r in trainer.state.log_history if "eval_domains_ppl" in r]
    assert [r["step"] for r in evals] == [15, 30]
    direct = evaluate(
        trainer.model, trainer.manifest, DOMAINS, "val", batch_size=8, device=CPU, max_sequences=8
    )
    for d in DOMAINS:
        assert evals[-1][f"eval_ppl/{d}"] == pytest.approx(math.exp(evals[-1][f"eval_loss/{d}"]))
        assert evals[-1][f"eval_loss/{d}"] == pytest.approx(direct["domains"][d]["loss"], rel=1e-5)
    assert evals[0]["eval_domains_loss"] > evals[-1]["eval_domains_loss"]  # it learned


def _resumable(corpus: Path, out: Path, workers: int = 0):
    return AioliTrainer(
        model=tiny_model(corpus),  # dropout on: the Trainer's RNG state must be restored as well
        args=training_args(
            out,
            max_steps=16,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            save_strategy="steps",
            save_steps=5,
            dataloader_num_workers=workers,  # the stream's reader processes
        ),
        corpus=corpus,
        mixer="aioli",
        mixer_options={**AIOLI, "measurement": "train", "round_steps": 8},
    )


@pytest.mark.parametrize("workers", [0, 1])
def test_a_resumed_trainer_reproduces_the_uninterrupted_run_exactly(corpus, tmp_path, workers):
    full = _resumable(corpus, tmp_path / "full", workers)
    full.train()
    # checkpoint-5: after step 4, which opened a train-mode measurement window still open at the save
    checkpoint = tmp_path / "full" / "checkpoint-5"
    assert (checkpoint / "aioli_state_rank0.pt").is_file()
    state = torch.load(checkpoint / "aioli_state_rank0.pt", weights_only=True)
    assert state["step"] == 5 and state["stream"]["step"] == 5  # the stream advanced with the steps
    assert state["mixer"]["window_end"] == 5 and float(state["mixer"]["window"][1].sum()) > 0

    resumed = _resumable(corpus, tmp_path / "full", workers)  # a fresh model, mixer and stream
    resumed.train(resume_from_checkpoint=str(checkpoint))

    want, got = train_logs(full), train_logs(resumed)
    assert sorted(got) == sorted(want) == list(range(1, 17))
    for step in range(6, 17):
        assert got[step] == want[step], f"step {step}"  # bit for bit: losses, proportions, domain losses
    assert any(want[s]["proportions/ab"] != 0.1875 and want[s]["proportions/ab"] != 0.625 for s in want)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(full.mixer.state_dict()["proportions"], resumed.mixer.state_dict()["proportions"])


def test_a_checkpoint_without_the_mixer_state_is_refused(corpus, tmp_path):
    trainer = _resumable(corpus, tmp_path / "run")
    trainer.args.max_steps = 5
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-5"
    (checkpoint / "aioli_state_rank0.pt").unlink()
    with pytest.raises(AioliError, match="no mixer and stream state for rank 0"):
        _resumable(corpus, tmp_path / "run").train(resume_from_checkpoint=str(checkpoint))


def test_gradient_accumulation_logs_the_loss_of_the_whole_batch(corpus, tmp_path):
    def run(name, micro, accumulation):
        trainer = AioliTrainer(
            model=tiny_model(corpus, dropout=False),
            args=training_args(
                tmp_path / name,
                max_steps=3,
                per_device_train_batch_size=micro,
                gradient_accumulation_steps=accumulation,
            ),
            corpus=corpus,
            mixer="stratified",
        )
        trainer.train()
        return train_logs(trainer)

    accumulated, whole = run("acc", 4, 2), run("whole", 8, 1)
    for step in (1, 2, 3):
        assert accumulated[step]["loss"] == pytest.approx(whole[step]["loss"], rel=1e-6, abs=1e-6)
        assert accumulated[step]["grad_norm"] == pytest.approx(whole[step]["grad_norm"], rel=1e-5)
    # and it is the model's mean token loss on the first batch (not twice it, not one micro-batch's)
    manifest = load_manifest(corpus)
    stream = MixtureStream(manifest, DOMAINS, 8, [1 / 3] * 3, seed=0)
    batch = next(stream)
    with torch.no_grad():
        logits = tiny_model(corpus, dropout=False)(input_ids=batch.input_ids).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten())
    assert accumulated[1]["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_evaluation_never_feeds_the_mixer(corpus, tmp_path):
    trainer = AioliTrainer(
        model=tiny_model(corpus),
        args=training_args(tmp_path, max_steps=4),
        corpus=corpus,
        mixer="aioli",
        mixer_options={**AIOLI, "measurement": "train", "round_steps": 10},
    )
    calls = []
    observe = trainer.mixer.observe
    trainer.mixer.observe = lambda step, loss_sum, count: (calls.append(step), observe(step, loss_sum, count))
    trainer.train()
    assert calls == [0, 1, 2, 3]
    # step 4 starts a LearnParams block: an observe now would open its measurement window
    before = trainer.mixer.state_dict()

    metrics = trainer.evaluate()
    # bounded by default: the first 64 sequences of each domain (MixingOptions.eval_max_sequences)
    direct = evaluate(
        trainer.model, trainer.manifest, DOMAINS, "val", batch_size=8, device=CPU, max_sequences=64
    )
    whole = evaluate(trainer.model, trainer.manifest, DOMAINS, "val", batch_size=8, device=CPU)
    assert any(direct["domains"][d]["tokens"] < whole["domains"][d]["tokens"] for d in DOMAINS)
    for d in DOMAINS:
        assert metrics[f"eval_loss/{d}"] == pytest.approx(direct["domains"][d]["loss"], rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(direct["average"]["loss"], rel=1e-5)

    # through the Trainer's own loop and compute_loss (remove_unused_columns is on: domain_ids kept)
    dataset = CorpusSplitDataset(corpus, "val")
    own = trainer.evaluate(eval_dataset=dataset)
    tokens = {d: whole["domains"][d]["tokens"] for d in DOMAINS}  # the Trainer's loop reads it whole
    token_mean = sum(whole["domains"][d]["loss"] * tokens[d] for d in DOMAINS) / sum(tokens.values())
    assert own["eval_loss"] == pytest.approx(token_mean, rel=1e-4)  # the stream's labels, not shifted again
    assert own["eval_domains_loss"] == pytest.approx(direct["average"]["loss"], rel=1e-5)

    assert calls == [0, 1, 2, 3]
    after = trainer.mixer.state_dict()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
        else:
            assert value == after[key], key


def test_what_the_adapter_cannot_do_is_refused(corpus, tmp_path):
    model = tiny_model(corpus)
    with pytest.raises(ConfigError, match="max_steps"):
        AioliTrainer(model=model, args=training_args(tmp_path, max_steps=-1), corpus=corpus)
    with pytest.raises(ConfigError, match="train_dataset"):
        AioliTrainer(model=model, args=training_args(tmp_path), corpus=corpus, train_dataset=[{"x": 1}])
    with pytest.raises(ConfigError, match="gradients or a reference model"):
        AioliTrainer(model=model, args=training_args(tmp_path), corpus=corpus, mixer="doge")
    args = training_args(tmp_path)
    assert not args.ignore_data_skip
    AioliTrainer(model=model, args=args, corpus=corpus, mixer="stratified")
    assert args.ignore_data_skip  # the Trainer must not skip batches on resume: the stream knows where


DDP_SCRIPT = """
import hashlib, json, os, sys
from pathlib import Path

import torch
import transformers

from aioli_fast.integrations.hf import AioliTrainer

corpus, out = sys.argv[1], Path(sys.argv[2])


class Recording(AioliTrainer):
    seen = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._capture is not None:  # training micro-batches only
            for d, row in zip(inputs["domain_ids"].tolist(), inputs["input_ids"].tolist()):
                self.seen.append(hashlib.sha1(json.dumps([d, row]).encode()).hexdigest())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


torch.manual_seed(0)
config = transformers.GPT2Config(vocab_size=320, n_positions=16, n_embd=32, n_layer=2, n_head=2, n_inner=64,
                                 bos_token_id=0, eos_token_id=0)
args = transformers.TrainingArguments(
    output_dir=str(out), max_steps=12, per_device_train_batch_size=2, gradient_accumulation_steps=2,
    learning_rate=3e-3, logging_steps=4, save_strategy="no", eval_strategy="steps", eval_steps=6,
    report_to=[], use_cpu=True, disable_tqdm=True,
)
trainer = Recording(
    model=transformers.GPT2LMHeadModel(config), args=args, corpus=corpus, mixer="aioli",
    mixer_options={"measurement": "train", "round_steps": 8, "sweeps": 1, "block_steps": 2,
                   "update": "cumulative", "eta": 2.0},
    eval_max_sequences=8,
)
trainer.train()
(out / f"rank{args.process_index}.json").write_text(json.dumps({
    "world_size": args.world_size,
    "seen": trainer.seen,
    "learned": trainer.mixer.state_dict()["proportions"].tolist(),
    "weights": float(sum(p.double().sum() for p in trainer.model.parameters())),
    "logs": [r for r in trainer.state.log_history if "loss" in r or "eval_domains_ppl" in r],
}))
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
# Gloo worker threads can still hold tensors when the interpreter finalizes, and the process then aborts
# (SIGABRT, "terminate called without an active exception") after every result is written: a known
# torch teardown problem (pytorch/pytorch#190489), not this test's subject. Skip finalization.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ddp_processes_read_disjoint_samples_and_agree(corpus, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    try:
        result = subprocess.run(
            [*cmd, str(script), str(corpus), str(tmp_path / "out")],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,  # a rank waiting forever in a collective fails the test
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the 2-process run hung: {(exc.stderr or b'')[-3000:]!r}")
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    seen0, seen1 = (r["seen"] for r in ranks)
    assert len(seen0) == len(seen1) == 12 * 4  # per rank: 12 steps x 2 micro-batches x 2 sequences
    assert len(set(seen0)) == len(seen0) and len(set(seen1)) == len(seen1)
    assert not set(seen0) & set(seen1)  # each rank read its own slice of the global batch
    assert ranks[0]["learned"] == ranks[1]["learned"]  # the mixer all-reduced the ranks' measurements
    assert max(abs(p - 1 / 3) for p in ranks[0]["learned"]) > 0.01
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the replicas equal
    assert ranks[0]["logs"] == ranks[1]["logs"]  # per-domain losses and evaluations reduced over ranks
    assert sum("eval_ppl/ab" in r for r in ranks[0]["logs"]) == 2


def test_every_python_block_of_the_guide_runs_or_is_marked_a_fragment(corpus, tmp_path, monkeypatch):
    page = ROOT / "docs" / "integrations" / "huggingface.md"
    for printed in run_guide(page, [str(corpus)], monkeypatch, tmp_path):
        proportions = json.loads(printed.strip().splitlines()[-1])
        assert set(proportions) == set(DOMAINS) and abs(sum(proportions.values()) - 1) < 1e-5
        assert max(abs(p - 1 / 3) for p in proportions.values()) > 0.01


def test_aioli_with_no_option_is_sized_to_the_trainer_run(corpus, tmp_path):
    """The defaults see the run's length and warm-up (``max_steps``, ``warmup_steps``): the uniform phase
    covers a quarter of the run, and the rounds end with it."""
    trainer = AioliTrainer(
        model=tiny_model(corpus, "gpt2"),
        args=training_args(tmp_path, max_steps=200, warmup_steps=60),
        corpus=corpus,
        mixer="aioli",
    )
    mixer = trainer.mixer
    assert (mixer.total_steps, mixer.warmup_steps) == (200, 60)
    plan = mixer.plan
    assert plan.uniform_steps >= 60 and (200 - plan.uniform_steps) % plan.round_steps == 0
    assert plan.learn_fraction == 0.25
    assert not mixer.in_learn_params(199)


def test_a_damaged_or_cut_short_newest_checkpoint_is_passed_over_with_its_reason(corpus, tmp_path):
    trainer = _resumable(corpus, tmp_path / "run")
    trainer.args.max_steps = 10
    trainer.train()
    newest = tmp_path / "run" / "checkpoint-10"
    state = newest / "aioli_state_rank0.pt"
    state.write_bytes(state.read_bytes()[:200])  # a kill during the save
    with pytest.raises(
        AioliError, match=r"aioli_state_rank0.pt is damaged or truncated .*earlier checkpoint"
    ):
        _resumable(corpus, tmp_path / "run").load_aioli_state(newest)
    resumed = _resumable(corpus, tmp_path / "run")
    resumed.args.max_steps = 12
    with pytest.warns(
        UserWarning, match=r"passing over checkpoint .*checkpoint-10: aioli_state_rank0.pt is dam"
    ):
        resumed.train(resume_from_checkpoint=True)
    # it trained steps 6-12 again from checkpoint-5: step 10 was saved anew, with its state complete
    assert zipfile.is_zipfile(state) and max(train_logs(resumed)) == 12
    (tmp_path / "run" / "checkpoint-12" / "aioli_state_rank0.pt").unlink()  # a save cut short before it
    with pytest.warns(
        UserWarning,
        match=r"checkpoint-12: it has no aioli_state_rank0.pt, no mixer and stream state for rank 0",
    ):
        assert _resumable(corpus, tmp_path / "run").last_complete_checkpoint().endswith("checkpoint-10")


def test_resume_refuses_a_corpus_prepared_again_under_the_same_names(tmp_path):
    """The adapters' mixer and stream state holds the corpus fingerprint (HF, Lightning and torchtitan
    share OnlineMixing): stream positions of another corpus are refused in one line, not read."""
    from aioli_fast.data import prepare

    root = prepare_three_domains(tmp_path)
    corpus = root / "corpus"
    trainer = _resumable(corpus, tmp_path / "run")
    trainer.args.max_steps = 5
    trainer.train()
    sources = {name: [str(root / "raw" / name)] for name in ("ab", "cd", "xyz")}
    prepare(
        sources,
        corpus,
        seq_len=16,
        val_fraction=0.2,
        test_fraction=0.1,
        seed=9,
        progress=False,
        overwrite=True,
    )
    with pytest.raises(
        AioliError, match=r"was written by a run on another corpus than .*changed: the shards of"
    ):
        _resumable(corpus, tmp_path / "run").train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-5")
        )
