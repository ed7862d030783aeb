"""Small builders shared by the test modules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def write_alphabet_domain(folder: Path, alphabet: str, n_docs: int, seed: int) -> Path:
    """``n_docs`` text files of random words over ``alphabet`` (so each domain is recognisable)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n_docs):
        words = ["".join(rng.choice(list(alphabet), size=rng.integers(2, 6))) for _ in range(60)]
        (folder / f"doc{i}.txt").write_text(" ".join(words))
    return folder


def prepare_alphabet_corpus(
    root: Path,
    alphabets: dict[str, str],
    docs: int,
    *,
    seq_len: int = 8,
    shard_sequences: int = 16,
    val_fraction: float = 0.0,
) -> Path:
    """A prepared corpus (train split, and val when asked) whose domains use disjoint alphabets; domain
    d has ``docs + 10·d`` documents. Returns its folder."""
    from aioli_fast.data.prepare import prepare

    rng = np.random.default_rng(0)
    domains = {}
    for d, (name, alphabet) in enumerate(alphabets.items()):
        folder = root / "raw" / name
        folder.mkdir(parents=True)
        for i in range(docs + 10 * d):
            doc = "".join(rng.choice(list(alphabet), size=int(rng.integers(10, 40))))
            (folder / f"{i:03d}.txt").write_text(doc)
        domains[name] = [str(folder)]
    prepare(
        domains,
        root / "corpus",
        seq_len=seq_len,
        val_fraction=val_fraction,
        test_fraction=0.0,
        shard_sequences=shard_sequences,
        progress=False,
    )
    return root / "corpus"


# a few seconds of training on the tiny model, for CLI tests: `aioli-fast train` overrides
TINY_TRAIN_OVERRIDES = [
    "train.steps=12",
    "train.batch_size=4",
    "train.log_every=4",
    "train.progress=false",
    "optim.warmup_steps=2",
    "optim.lr=3e-3",
    "model.preset=tiny",
]

ALPHABET_DOMAINS = {"ab": "ab", "cd": "cdc", "xyz": "xyz"}


def prepare_three_domains(root: Path, *, seq_len: int = 16, shard_sequences: int = 16) -> Path:
    """Three recognisable domains (``ab``, ``cd``, ``xyz``) with train/val/test splits under ``root``;
    returns ``root`` (the corpus is ``root / "corpus"``)."""
    from aioli_fast.data.prepare import prepare

    for i, (name, alphabet) in enumerate(ALPHABET_DOMAINS.items()):
        write_alphabet_domain(root / "raw" / name, alphabet, 16, i)
    prepare(
        {name: [str(root / "raw" / name)] for name in ALPHABET_DOMAINS},
        root / "corpus",
        seq_len=seq_len,
        val_fraction=0.2,
        test_fraction=0.1,
        shard_sequences=shard_sequences,
        progress=False,
    )
    return root


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """``python -m aioli_fast ARGS`` in a new process (one thread), its output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "aioli_fast", *args], capture_output=True, text=True, env=env, **kwargs
    )


def train_bpe_tokenizer(path: Path, sentences: list[str], eos_token: str) -> Path:
    """A small byte-level BPE ``tokenizer.json`` (vocabulary 300) trained on ``sentences``."""
    import pytest

    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sentences, trainer)
    tok.save(str(path))
    return path


def guide_blocks(page: Path) -> list[str]:
    """The Python code blocks of a documentation page, in order."""
    text = page.read_text(encoding="utf-8")
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


def run_guide(page: Path, args: list[str], monkeypatch, cwd: Path) -> list[str]:
    """Run every Python block of a guide not marked ``# fragment`` as a script with ``args`` in ``cwd``
    (its ``runs/`` cleared after each); returns what each printed. The page must have such blocks."""
    import contextlib
    import io
    import shutil

    blocks = guide_blocks(page)
    runnable = [b for b in blocks if not b.startswith("# fragment\n")]
    assert blocks and runnable, f"{page} has no runnable Python block"
    monkeypatch.chdir(cwd)
    printed = []
    for index, code in enumerate(runnable):
        monkeypatch.setattr(sys, "argv", ["example.py", *args])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"{page.name} block {index}", "exec"), {"__name__": "__main__"})
        printed.append(out.getvalue())
        shutil.rmtree(cwd / "runs", ignore_errors=True)
    return printed


def tiny_zero_overrides(root: Path, name: str, steps: int, checkpoint_every: int) -> list[str]:
    """Overrides of ``configs/zero-cpu.yaml`` for a tiny Aioli run (probe measurements, 8-step rounds,
    a global batch of 8 in micro-batches of 2) on the corpus of :func:`prepare_three_domains` under
    ``root``, into ``root/runs/name``, logging every step."""
    return [
        f"data.path={root / 'corpus'}",
        "model.preset=tiny",
        f"train.out_dir={root / 'runs'}",
        f"train.name={name}",
        f"train.steps={steps}",
        "train.batch_size=8",
        "train.micro_batch_size=2",
        "train.log_every=1",
        "train.progress=false",
        "mixing.round_steps=8",
        "mixing.sweeps=1",
        "mixing.block_steps=1",
        "mixing.probe_sequences=3",
        "optim.warmup_steps=2",
        f"checkpoint.every={checkpoint_every}",
        "eval.batch_size=8",
        "eval.max_sequences=6",
    ]
