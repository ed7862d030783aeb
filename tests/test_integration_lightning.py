"""The PyTorch Lightning adapter (aioli_fast.integrations.lightning) with the real Lightning, on the CPU.

- Aioli moves the proportions; the logs carry proportions, per-domain training loss and per-domain
  validation perplexity at Lightning's validation points;
- a fresh Trainer resumed from a mid-run checkpoint (inside a LearnParams block, with gradient
  accumulation and dropout) reproduces the uninterrupted run's per-step losses and proportions bit for
  bit; a checkpoint without the mixing state is refused;
- validation (inside fit and ``trainer.validate``) never feeds the mixer;
- two DDP processes under torchrun read disjoint samples and agree on the proportions;
- the guide's example (docs/integrations/lightning.md) runs.
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
from helpers import prepare_three_domains, run_guide

pl = pytest.importorskip("lightning.pytorch")

from aioli_fast.data import load_manifest  # noqa: E402
from aioli_fast.errors import AioliError, ConfigError  # noqa: E402
from aioli_fast.integrations.lightning import AioliCallback, AioliDataModule  # noqa: E402
from aioli_fast.train import evaluate  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:mixing.measurement=train:UserWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ["ab", "cd", "xyz"]
# 3 domains x 1 sweep x 2-step blocks = 6 LearnParams steps, + 1 closing measurement step
AIOLI = {"sweeps": 1, "block_steps": 2, "update": "cumulative", "eta": 2.0, "round_steps": 9}
AIOLI.update(
    learn_fraction=1.0, prior_steps=0, max_learn_share=1.0, one_hot_factor=0.625
)  # the paper's procedure, scaled down

TINY_LM = '''
import torch
import lightning.pytorch as pl


class TinyLM(pl.LightningModule):
    """A small causal LM: embedding, a causal running mean mixed in, dropout, output layer."""

    def __init__(self, vocab_size, dim=32, dropout=0.1, lr=3e-3):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, dim)
        self.mix = torch.nn.Linear(dim, dim)
        self.drop = torch.nn.Dropout(dropout)
        self.out = torch.nn.Linear(dim, vocab_size)
        self.lr = lr

    def forward(self, input_ids):
        h = self.embed(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, device=h.device).view(1, -1, 1)
        h = h + torch.tanh(self.mix(h.cumsum(1) / steps))
        return self.out(self.drop(h))

    def training_step(self, batch, batch_idx):
        return self.trainer.datamodule.loss(self(batch["input_ids"]), batch)

    def validation_step(self, batch, batch_idx):
        return self.trainer.datamodule.loss(self(batch["input_ids"]), batch)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)
'''
exec(TINY_LM)  # noqa: S102 - one definition for the in-process tests and the DDP script below


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return prepare_three_domains(tmp_path_factory.mktemp("pl-corpus")) / "corpus"


def _vocab(corpus: Path) -> int:
    return -(-load_manifest(corpus).vocab_size // 64) * 64


class Recorder(TinyLM):  # noqa: F821 - defined by exec above
    """TinyLM that records, per micro-batch, the step, its loss and the proportions it was drawn with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.record: list[tuple[int, float, list[float]]] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        mixing = self.trainer.datamodule.mixing
        self.record.append((self.trainer.global_step, loss.item(), list(mixing.host_proportions)))
        return loss


def _trainer(out: Path, max_steps: int, **kwargs) -> pl.Trainer:
    options = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        accumulate_grad_batches=2,
        logger=pl.loggers.CSVLogger(str(out), name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[AioliCallback()],
        log_every_n_steps=5,
        val_check_interval=10,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        limit_val_batches=4,
        deterministic=True,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def _datamodule(corpus: Path, **kwargs) -> AioliDataModule:
    options = dict(batch_size=2, mixer="aioli", mixer_options={"measurement": "train", **AIOLI}, seed=3)
    options.update(kwargs)
    return AioliDataModule(corpus, **options)


def _metrics(out: Path) -> list[dict[str, str]]:
    import csv

    (path,) = (out / "logs").glob("version_*/metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


def test_aioli_moves_the_proportions_and_logs_per_domain_numbers(corpus, tmp_path, capsys):
    torch.manual_seed(0)
    model, dm = Recorder(_vocab(corpus)), _datamodule(corpus)
    _trainer(tmp_path, 20).fit(model, datamodule=dm)
    err = capsys.readouterr().err
    assert "aioli: 3 round(s) of 9 steps" in err  # the start-up line of `aioli-fast train`
    assert "step 5: per-domain loss and proportion: ab " in err  # the console at each log step
    learned = dm.mixing.mixer.state_dict()["proportions"].tolist()
    assert max(abs(p - 1 / 3) for p in learned) > 0.01
    assert len(model.record) == 40  # 20 steps x 2 micro-batches
    steps = [s for s, _, _ in model.record]
    assert steps == [s for s in range(20) for _ in range(2)]
    # LearnParams blocks: steps 0-5 draw from smoothed one-hot mixtures, two steps per domain
    assert max(model.record[0][2]) > 0.5 and model.record[0][2] != model.record[4][2]
    rows = _metrics(tmp_path)
    train = [r for r in rows if r.get("proportions/ab")]
    assert [int(r["step"]) for r in train] == [4, 9, 14, 19]  # every 5 optimizer steps (0-based)
    assert all(r["domain_loss/xyz"] for r in train)
    val = [r for r in rows if r.get("val_ppl/ab")]
    assert len(val) == 4  # val_check_interval counts micro-batches: every 10 of the 40
    for r in val:
        ppl = [float(r[f"val_ppl/{d}"]) for d in DOMAINS]
        assert all(1 < p < 1e4 for p in ppl)
        assert abs(float(r["val_domains_ppl"]) - sum(ppl) / 3) < 1e-3 * sum(ppl)


def test_a_resumed_fit_reproduces_the_uninterrupted_run_exactly(corpus, tmp_path):
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / "ck"), every_n_train_steps=3, save_top_k=-1, save_last=False
    )
    torch.manual_seed(0)
    whole, dm = Recorder(_vocab(corpus)), _datamodule(corpus)
    _trainer(tmp_path / "a", 12, callbacks=[AioliCallback(), checkpoints]).fit(whole, datamodule=dm)
    # step 3 is inside LearnParams (blocks at steps 0-5) and inside the measurement window
    ck = tmp_path / "ck" / "epoch=0-step=3.ckpt"
    assert ck.is_file()
    torch.manual_seed(123)  # the resumed run must not depend on the RNG at start-up
    resumed, dm2 = Recorder(_vocab(corpus)), _datamodule(corpus)
    again = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ck2"), every_n_train_steps=3, save_top_k=-1)
    _trainer(tmp_path / "b", 12, callbacks=[AioliCallback(), again]).fit(
        resumed, datamodule=dm2, ckpt_path=str(ck)
    )
    assert sorted(p.name for p in (tmp_path / "ck2").iterdir()) == [
        "epoch=0-step=12.ckpt",
        "epoch=0-step=6.ckpt",
        "epoch=0-step=9.ckpt",
    ]  # not step 3 again, in the middle of its first optimizer step
    assert resumed.record == [r for r in whole.record if r[0] >= 3]
    assert dm2.mixing.mixer.state_dict()["proportions"].tolist() == (
        dm.mixing.mixer.state_dict()["proportions"].tolist()
    )
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)

    # a checkpoint without the mixing state would train on other data: refused at the first step
    plain = torch.load(ck, weights_only=False)
    del plain["AioliDataModule"]
    torch.save(plain, tmp_path / "plain.ckpt")
    with pytest.raises(AioliError, match="stream is at step 0 but training at step 3"):
        _trainer(tmp_path / "c", 12).fit(
            Recorder(_vocab(corpus)), datamodule=_datamodule(corpus), ckpt_path=str(tmp_path / "plain.ckpt")
        )


def test_validation_never_feeds_the_mixer(corpus, tmp_path):
    torch.manual_seed(0)
    model, dm = Recorder(_vocab(corpus)), _datamodule(corpus, mixer_options={"measurement": "train"})
    trainer = _trainer(tmp_path, 3, limit_val_batches=1.0)
    trainer.fit(model, datamodule=dm)
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in dm.mixing.mixer.state_dict().items()}
    (metrics,) = trainer.validate(model, datamodule=dm, verbose=False)
    after = dm.mixing.mixer.state_dict()
    for key, value in before.items():  # (NaN marks a domain not measured yet: equal to itself here)
        if torch.is_tensor(value):
            torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True)
        else:
            assert after[key] == value, key
    assert set(DOMAINS) == {k.split("/")[1] for k in metrics if k.startswith("val_ppl/")}
    # each sequence of the bounded split (the first 64 of each domain, by default) once: the numbers of
    # aioli_fast.train.evaluate on the same model
    model.eval()
    reference = evaluate(
        model, load_manifest(corpus), DOMAINS, "val", batch_size=2, device="cpu", max_sequences=64
    )
    for d in DOMAINS:
        assert metrics[f"val_loss/{d}"] == pytest.approx(reference["domains"][d]["loss"], rel=1e-5)
    assert metrics["val_domains_ppl"] == pytest.approx(reference["average"]["ppl"], rel=1e-5)


def test_what_the_adapter_cannot_do_is_refused(corpus, tmp_path):
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        AioliDataModule(corpus, batch_size=0)
    with pytest.raises(ConfigError, match="needs Trainer\\(max_steps=N\\)"):
        _trainer(tmp_path, -1, max_epochs=1).fit(Recorder(_vocab(corpus)), datamodule=_datamodule(corpus))
    with pytest.raises(ConfigError, match="needs an AioliDataModule"):
        loader = torch.utils.data.DataLoader([{"input_ids": torch.zeros(4, dtype=torch.long)}])
        _trainer(tmp_path, 2).fit(Recorder(_vocab(corpus)), train_dataloaders=loader)
    with pytest.raises(ConfigError, match="per-domain gradients or a reference model"):
        _trainer(tmp_path, 2).fit(
            Recorder(_vocab(corpus)), datamodule=_datamodule(corpus, mixer="doge", mixer_options={})
        )


DDP_SCRIPT = (
    TINY_LM
    + """
import json
import sys

from aioli_fast.integrations.lightning import AioliCallback, AioliDataModule


class Seen(TinyLM):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen += [hash(tuple(row.tolist())) for row in batch["input_ids"]]
        return super().training_step(batch, batch_idx)


corpus, out, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = Seen(vocab)
dm = AioliDataModule(corpus, batch_size=2, mixer="aioli", seed=3,
                     mixer_options={"measurement": "train", "sweeps": 1, "block_steps": 2,
                                    "update": "cumulative", "eta": 2.0, "round_steps": 9})
trainer = pl.Trainer(max_steps=12, accelerator="cpu", devices=2, strategy="ddp",
                     accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=[AioliCallback()],
                     val_check_interval=6, check_val_every_n_epoch=None, num_sanity_val_steps=0)
trainer.fit(model, datamodule=dm)
rank = trainer.global_rank
record = {
    "world_size": trainer.world_size,
    "seen": model.seen,
    "learned": dm.mixing.mixer.state_dict()["proportions"].tolist(),
    "weights": [float(p.double().sum()) for p in model.parameters()],
    "val": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")},
}
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(record, f)
"""
)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ddp_processes_read_disjoint_samples_and_agree(corpus, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
    ]
    result = subprocess.run(
        [*cmd, str(corpus), str(tmp_path), str(_vocab(corpus))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    seen0, seen1 = (r["seen"] for r in ranks)
    assert len(seen0) == len(seen1) == 12 * 4  # per rank: 12 steps x 2 micro-batches x 2 sequences
    assert not set(seen0) & set(seen1)  # each rank read its own slice of the global batch
    assert ranks[0]["learned"] == ranks[1]["learned"]  # the mixer all-reduced the ranks' measurements
    assert max(abs(p - 1 / 3) for p in ranks[0]["learned"]) > 0.01
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the replicas equal
    assert ranks[0]["val"] == ranks[1]["val"] and "val_ppl/ab" in ranks[0]["val"]


def test_every_python_block_of_the_guide_runs_or_is_marked_a_fragment(corpus, tmp_path, monkeypatch):
    page = ROOT / "docs" / "integrations" / "lightning.md"
    for printed in run_guide(page, [str(corpus)], monkeypatch, tmp_path):
        proportions = json.loads(printed.strip().splitlines()[-1])
        assert set(proportions) == set(DOMAINS) and abs(sum(proportions.values()) - 1) < 1e-5
        assert max(abs(p - 1 / 3) for p in proportions.values()) > 0.01


def test_a_model_too_small_for_the_vocabulary_and_a_mid_step_validation_are_refused_at_setup(
    corpus, tmp_path
):
    """Both used to fail deep in a run (an IndexError in the embedding; a checkpoint save inside an
    optimizer step at the first validation): now one line at setup, with the remedy."""
    vocab = load_manifest(corpus).vocab_size
    small = TinyLM(vocab - 1)  # noqa: F821 - defined by exec above
    with pytest.raises(
        ConfigError, match=rf"the model's vocabulary \({vocab - 1}\) is smaller than the corpus"
    ):
        _trainer(tmp_path / "a", 4).fit(small, datamodule=_datamodule(corpus))
    with pytest.raises(
        ConfigError, match=r"val_check_interval=5\) is not a multiple of accumulate_grad_batches=2"
    ):
        _trainer(tmp_path / "b", 4, val_check_interval=5).fit(
            TinyLM(_vocab(corpus)),  # noqa: F821
            datamodule=_datamodule(corpus),
        )
    # an output layer smaller than the vocabulary (with a large enough embedding) is named at the loss
    head = TinyLM(_vocab(corpus))  # noqa: F821
    head.out = torch.nn.Linear(32, vocab - 3)
    with pytest.raises(ConfigError, match=rf"the model's logits have {vocab - 3} entries, fewer than"):
        _trainer(tmp_path / "c", 4).fit(head, datamodule=_datamodule(corpus))
