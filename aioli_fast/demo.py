"""``aioli-fast demo``: the embedded default, from raw text to per-domain test perplexity.

It builds a small multi-domain corpus from material any Python installation carries, so nothing is
downloaded:

- ``python_code``: source files of the standard library (sorted, up to a byte budget);
- ``language_reference``: the language-reference and help topics Python ships (``pydoc_data``), or the
  module docstrings of the standard library where that module is missing;
- ``licenses``: license texts of Python and of the installed packages (deduplicated);
- ``noise``: synthetic, uniformly random printable ASCII. Its loss cannot drop below ln(95) = 4.55 nats
  per byte whatever the model learns, so training on it is wasted: a good mixer should down-weight it.

It then prepares the corpus (byte-level tokenizer), trains a tiny model with stratified proportions on
the CPU and prints per-domain validation and test loss and perplexity.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

from .config import config_from_dict
from .data import prepare
from .errors import AioliError
from .fileio import atomic_write_bytes, ensure_writable_dir

DEMO_SEQ_LEN = 128
NOISE_ALPHABET = bytes(range(32, 127))  # 95 printable ASCII characters

# The run the demo trains; configs/demo.yaml holds the same settings for `aioli-fast train`.
DEMO_CONFIG = {
    "model": {"preset": "mini"},
    "data": {"path": "runs/demo/corpus"},
    "mixing": {"method": "stratified"},
    "optim": {"lr": 3.0e-3, "warmup_steps": 30, "min_lr_ratio": 0.1, "weight_decay": 0.1, "grad_clip": 1.0},
    "train": {
        "steps": 300,
        "batch_size": 16,
        "seed": 0,
        "log_every": 10,
        "out_dir": "runs/demo",
        "name": "stratified",
    },
    "eval": {"batch_size": 32, "max_sequences": 256},
}


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


SKIP_CODE_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__"}


def python_code_files(budget_bytes: int) -> list[Path]:
    """Standard-library ``.py`` files (no tests, no installed packages), sorted, within a byte budget."""
    root = _stdlib_dir()
    paths = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in SKIP_CODE_DIRS]  # prune: site-packages is large
        paths.extend(Path(folder, n) for n in names if n.endswith(".py"))
    files, total = [], 0
    for path in sorted(paths):
        size = path.stat().st_size
        if size == 0 or total + size > budget_bytes:
            continue
        files.append(path)
        total += size
    return files


def reference_documents(budget_bytes: int) -> list[str]:
    """Language-reference topics from ``pydoc_data``; module docstrings of the stdlib as a fallback."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    docs = [topics[k] for k in sorted(topics)]
    if not docs:
        for path in sorted(_stdlib_dir().glob("*.py")):
            try:
                doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8", errors="replace")))
            except (SyntaxError, ValueError):
                continue
            if doc:
                docs.append(doc)
    out, total = [], 0
    for doc in docs:
        if total + len(doc) > budget_bytes:
            break
        out.append(doc)
        total += len(doc)
    return out


def license_files(budget_bytes: int) -> list[Path]:
    """Python's LICENSE.txt and the license files of installed packages, deduplicated by content."""
    candidates = [_stdlib_dir() / "LICENSE.txt"]
    seen_dirs = set()
    for key in ("purelib", "platlib"):
        site = Path(sysconfig.get_paths()[key])
        if site in seen_dirs or not site.is_dir():
            continue
        seen_dirs.add(site)
        for dist in sorted(site.glob("*.dist-info")):
            for pattern in ("LICEN[CS]E*", "COPYING*", "licenses/**/*"):
                candidates.extend(sorted(p for p in dist.glob(pattern) if p.is_file()))
    files, hashes, total = [], set(), 0
    for path in candidates:
        if not path.is_file():
            continue
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest in hashes or not data.strip() or total + len(data) > budget_bytes:
            continue
        hashes.add(digest)
        files.append(path)
        total += len(data)
    return files


def noise_documents(n_docs: int, doc_bytes: int, seed: int = 0) -> list[str]:
    """Uniformly random printable ASCII documents."""
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(NOISE_ALPHABET, dtype=np.uint8)
    return [
        alphabet[rng.integers(0, len(alphabet), doc_bytes)].tobytes().decode("ascii") for _ in range(n_docs)
    ]


def _write_jsonl(path: Path, docs: list[str]) -> None:
    atomic_write_bytes(path, "".join(json.dumps({"text": d}) + "\n" for d in docs).encode("utf-8"))


def build_demo_sources(raw_dir: Path, scale: float = 1.0) -> dict[str, list[str]]:
    """Collect the demo's four domains; returns domain -> input paths for :func:`prepare`."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    kb = int(1024 * scale)
    code = python_code_files(900 * kb)
    reference = reference_documents(450 * kb)
    licenses = license_files(450 * kb)
    noise = noise_documents(max(8, int(150 * scale)), 2000)
    missing = [
        name
        for name, found in (("python_code", code), ("language_reference", reference), ("licenses", licenses))
        if not found
    ]
    if missing:
        raise AioliError(f"demo: found no material on this machine for domain(s) {missing}")
    _write_jsonl(raw_dir / "language_reference.jsonl", reference)
    _write_jsonl(raw_dir / "noise.jsonl", noise)
    return {
        "python_code": [str(p) for p in code],
        "language_reference": [str(raw_dir / "language_reference.jsonl")],
        "licenses": [str(p) for p in licenses],
        "noise": [str(raw_dir / "noise.jsonl")],
    }


def run_demo(
    out_dir: str | Path = "runs/demo",
    *,
    steps: int | None = None,
    scale: float = 1.0,
    overrides: list[str] | None = None,
) -> dict:
    """Build, prepare, train and evaluate; prints the table and returns ``final.json``'s content."""
    from .train import train  # the demo sits above the training package

    if not scale > 0:
        raise AioliError(f"demo scale must be > 0, got {scale}")

    start = time.perf_counter()
    out = ensure_writable_dir(Path(out_dir), "demo output directory")
    print(f"[1/3] collecting the demo corpus under {out / 'raw'} ...", file=sys.stderr, flush=True)
    sources = build_demo_sources(out / "raw", scale=scale)
    print(
        f"[2/3] preparing {len(sources)} domains (byte-level tokens, seq_len {DEMO_SEQ_LEN}) ...",
        file=sys.stderr,
        flush=True,
    )
    prepare(
        sources,
        out / "corpus",
        seq_len=DEMO_SEQ_LEN,
        tokenizer="byte",
        val_fraction=0.1,
        test_fraction=0.1,
        overwrite=True,
    )
    cfg_dict = json.loads(json.dumps(DEMO_CONFIG))
    cfg_dict["data"]["path"] = str(out / "corpus")
    cfg_dict["train"]["out_dir"] = str(out)
    cfg_dict["train"]["overwrite"] = True
    if steps is not None:
        cfg_dict["train"]["steps"] = steps
    cfg = config_from_dict(cfg_dict, overrides)
    print("[3/3] training with stratified proportions ...", file=sys.stderr, flush=True)
    result = train(cfg)
    elapsed = time.perf_counter() - start
    print(f"demo finished in {elapsed:.0f} s; results in {result.run_dir / 'final.json'}", flush=True)
    return result.final
