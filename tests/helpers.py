"""Small builders shared by the test modules."""

from __future__ import annotations

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
