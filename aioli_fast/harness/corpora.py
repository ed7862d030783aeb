"""Real multi-domain text corpora built from what a Python installation of this package carries.

No download is needed: every domain is collected from the Python standard library or from packages the
install puts in (torch, its dependencies sympy and networkx, matplotlib, numpy, deepspeed; the
``metadata`` domain also reads those of the ``dev`` extra). The same versions give the same bytes, so the
same command rebuilds the same corpus anywhere (``sources.json`` beside the corpus records the versions,
the files read and the sha256 of every domain's collected text, to compare two builds).

Domains (``DOMAINS``; each collected into one ``.jsonl`` of documents, then prepared with byte tokens).
The six of the default set (``CORPUS_SETS["six"]``, what the text2/text3/text6 sweeps read):

- ``python``: standard-library ``.py`` source, tests excluded (code).
- ``cpp``: C++ headers of torch (``torch/include/**/*.h``) (code in another language).
- ``licenses``: Python's ``LICENSE.txt`` and the license files of installed distributions (legal text).
- ``reference``: the Python language reference and library topics of ``pydoc_data`` (technical prose).
- ``docstrings``: docstrings of networkx and sympy modules, classes and functions (prose with mathematics).
- ``fontmetrics``: Adobe font metric files shipped with matplotlib (tabular numeric records).

The ``twelve`` set adds six more (the text12 sweep):

- ``stubs``: type stubs (``.pyi``) of torch, matplotlib and numpy (declarations: signatures, overloads).
- ``tests``: the unit tests of networkx and sympy (test code: assertions against expected values).
- ``cuda``: CUDA kernels and device headers (``.cu``, ``.cuh``) of deepspeed and torch (GPU code).
- ``yaml``: torch's YAML: torchgen's ATen operator schemas, dispatch tables and derivative formulas.
- ``csv``: numpy's CSV validation data: tables of hexadecimal floats and integers (numeric test vectors).
- ``metadata``: the long descriptions (READMEs, Markdown or reST) of the installed distributions this
  package and its ``dev`` extra need (documentation with markup).

The ``six_noise`` set adds to the six a domain a mixer should learn to down-weight:

- ``noise``: uniformly random lowercase letters (seeded; no file is read). Its loss cannot go below
  ln 26 = 3.26 nats per byte, and training on it helps no other domain.

A corpus is built from a domain set or from a list of domains (:func:`corpus_domains`); without one, from
the six, so that corpora built before the set of twelve existed are still what the same command builds.

The collectors are those of :mod:`aioli_fast.harness.sources`: every one walks its files in sorted order
(those of the twelve package by package, each package an equal share of the budget) and stops at a byte
budget, so what is taken is deterministic. Documents are cut at line breaks into
pieces of at most ``CHUNK_CHARS`` characters (:func:`chunk_text`) before the split, so val and test hold
many pieces of many files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

from ..errors import AioliError
from ..fileio import atomic_write_bytes, atomic_write_json, ensure_writable_dir
from .sources import (
    collect_cpp,
    collect_csv,
    collect_cuda,
    collect_docstrings,
    collect_fontmetrics,
    collect_licenses,
    collect_metadata,
    collect_noise,
    collect_python,
    collect_reference,
    collect_stubs,
    collect_tests,
    collect_yaml,
    dependency_closure,
)

DEFAULT_BUDGET_BYTES = 1_500_000
CHUNK_CHARS = 4096


def chunk_text(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut a document into pieces of at most ``size`` characters at line breaks (a longer line is cut
    where it reaches ``size``), so that the held-out splits, which take whole documents, are not a
    handful of long files."""
    pieces, current, length = [], [], 0
    for line in text.splitlines(keepends=True):
        while len(line) > size:
            if current:
                pieces.append("".join(current))
                current, length = [], 0
            pieces.append(line[:size])
            line = line[size:]
        if length + len(line) > size and current:
            pieces.append("".join(current))
            current, length = [], 0
        current.append(line)
        length += len(line)
    if current:
        pieces.append("".join(current))
    return [p for p in pieces if p.strip()]


DOMAINS: dict[str, tuple[str, Callable[[int], tuple[list[str], list[str]]]]] = {
    "python": ("standard-library Python source (no tests)", collect_python),
    "cpp": ("torch C++ headers", collect_cpp),
    "licenses": ("license texts of Python and the installed distributions", collect_licenses),
    "reference": ("Python language reference topics (pydoc_data)", collect_reference),
    "docstrings": ("docstrings of networkx and sympy", collect_docstrings),
    "fontmetrics": ("Adobe font metrics shipped with matplotlib", collect_fontmetrics),
    "stubs": ("Python type stubs (.pyi) of torch, matplotlib and numpy", collect_stubs),
    "tests": ("unit tests of networkx and sympy", collect_tests),
    "cuda": ("CUDA kernels and device headers (.cu, .cuh) of deepspeed and torch", collect_cuda),
    "yaml": ("torch's YAML: ATen operator schemas and derivative formulas (torchgen)", collect_yaml),
    "csv": ("numpy's CSV validation data (hexadecimal test vectors)", collect_csv),
    "metadata": ("package descriptions (Markdown, reST) of the installed dependencies", collect_metadata),
    "noise": ("uniformly random lowercase letters: a useless domain (seeded, no file read)", collect_noise),
}
# named sets of domains; a corpus built without naming its domains has the six
_SIX = ("python", "cpp", "licenses", "reference", "docstrings", "fontmetrics")
CORPUS_SETS: dict[str, tuple[str, ...]] = {
    "six": _SIX,
    "twelve": (*_SIX, "stubs", "tests", "cuda", "yaml", "csv", "metadata"),
    "six_noise": (*_SIX, "noise"),
}
DEFAULT_SET = "six"
DEFAULT_DOMAINS = CORPUS_SETS[DEFAULT_SET]
# the distributions whose versions decide the bytes collected (the licenses domain reads the dependency
# closure, recorded as "dependencies"; the metadata domain's file names carry the versions it read)
SOURCE_DISTRIBUTIONS = ("torch", "matplotlib", "networkx", "sympy", "numpy", "deepspeed")


def corpus_domains(domains: str | Iterable[str] | None = None) -> list[str]:
    """The domains a corpus is built from: ``None`` gives the default set (the six), a string or each
    entry of a list or tuple is a domain or the name of a set in ``CORPUS_SETS`` (expanded in place; a
    domain named twice is kept once)."""
    if domains is None or isinstance(domains, str):
        entries = [DEFAULT_SET if domains is None else domains]
    else:
        entries = list(domains) if isinstance(domains, (list, tuple)) else []
    if not entries or not all(isinstance(e, str) for e in entries):
        raise AioliError(
            f"corpus domains: expected a set name {sorted(CORPUS_SETS)} or a list of domains, got {domains!r}"
        )
    names: list[str] = []
    for entry in entries:
        names.extend(n for n in CORPUS_SETS.get(entry, (entry,)) if n not in names)
    unknown = [d for d in names if d not in DOMAINS]
    if unknown or not names:
        raise AioliError(
            f"unknown corpus domain(s) {unknown or names}; the domains are {list(DOMAINS)}, "
            f"the sets {sorted(CORPUS_SETS)}"
        )
    return names


def installed_versions(distributions: Iterable[str]) -> dict[str, str]:
    """Python's version and each distribution's ("not installed" when absent)."""
    out = {"python": sys.version.split()[0]}
    for dist in distributions:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def collect(
    raw_dir: str | Path,
    domains: str | Iterable[str] | None = None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> dict[str, list[str]]:
    """Write one ``<domain>.jsonl`` per domain under ``raw_dir`` and ``sources.json``; returns the inputs
    for :func:`aioli_fast.data.prepare` (domain -> [jsonl path]). ``domains``: as :func:`corpus_domains`
    reads them (default the six)."""
    names = corpus_domains(domains)
    if budget_bytes < 10_000:
        raise AioliError(f"budget_bytes must be at least 10000, got {budget_bytes}")
    raw = ensure_writable_dir(Path(raw_dir), "raw text folder")
    sources: dict = {
        "versions": installed_versions(SOURCE_DISTRIBUTIONS),
        # the license domain reads these distributions' files
        "dependencies": {key: metadata.version(key) for key in dependency_closure()},
        "budget_bytes": budget_bytes,
        "domains": {},
    }
    inputs = {}
    for name in names:
        description, collector = DOMAINS[name]
        docs, files = collector(budget_bytes)
        docs = [piece for doc in docs for piece in chunk_text(doc)]
        if not docs:
            raise AioliError(
                f"corpus domain {name!r} ({description}): found no material in this installation; "
                f"versions: {sources['versions']}"
            )
        data = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode("utf-8")
        path = raw / f"{name}.jsonl"
        # an unchanged file keeps its modification time, so prepare reuses its shards
        if not path.is_file() or path.read_bytes() != data:
            atomic_write_bytes(path, data)
        sources["domains"][name] = {
            "description": description,
            "documents": len(docs),
            "characters": sum(len(d) for d in docs),
            "sha256": hashlib.sha256(data).hexdigest(),
            "files": files,
        }
        inputs[name] = [str(path)]
    atomic_write_json(raw / "sources.json", sources)
    return inputs


def build_corpus(
    out: str | Path,
    domains: str | Iterable[str] | None = None,
    *,
    seq_len: int = 128,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Collect the domains into ``out/raw`` and prepare them (byte tokens) into ``out/corpus``;
    ``domains`` is a set name (``six``, ``twelve``) or a list of domains and sets, default the six.

    Returns the manifest. Resumable: domains whose collected text did not change are not prepared again.
    A corpus already at ``out`` with another seq_len or other domains is replaced only with ``overwrite``
    (sweeps that share it would otherwise change under each other).
    """
    from ..data import prepare

    out = Path(out)
    names = corpus_domains(domains)
    existing = out / "corpus" / "manifest.json"
    if existing.is_file() and not overwrite:
        old = json.loads(existing.read_text(encoding="utf-8"))
        old_names = [e["name"] for e in old.get("domains", [])]
        if old.get("seq_len") != seq_len or old_names != names:
            raise AioliError(
                f"{out / 'corpus'} holds a corpus with seq_len {old.get('seq_len')} and domains {old_names}; "
                f"this asks for seq_len {seq_len} and domains {names}. Use another folder, or overwrite it "
                "(aioli-fast corpus --overwrite)"
            )
    inputs = collect(out / "raw", names, budget_bytes)
    if progress:
        print(f"corpus: collected {', '.join(inputs)} under {out / 'raw'}; preparing ...", file=sys.stderr)
    return prepare(
        inputs,
        out / "corpus",
        seq_len=seq_len,
        tokenizer="byte",
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        overwrite=True,
        progress=progress,
        workers=min(os.cpu_count() or 1, 4),
    )
