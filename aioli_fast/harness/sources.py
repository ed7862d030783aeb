"""The text collectors of the harness: material any installation of this package carries, so nothing is
downloaded. The demo (:mod:`aioli_fast.harness.demo`) and the real-text corpora
(:mod:`aioli_fast.harness.corpora`) both collect through these.

Every collector walks its files in sorted order and stops at a byte budget, so the prefix taken is
deterministic: the same versions give the same bytes. The ``collect_*`` functions return
``(documents, names)``, a name per file read, relative to where it was found (no machine paths).
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")

SKIP_CODE_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def site_packages() -> list[Path]:
    """The folders installed distributions live in (purelib, then platlib when it differs)."""
    seen: list[Path] = []
    for key in ("purelib", "platlib"):
        path = Path(sysconfig.get_paths()[key])
        if path.is_dir() and path not in seen:
            seen.append(path)
    return seen


def package_dir(name: str) -> Path | None:
    """The folder of an importable package, without importing it (importing sympy takes seconds)."""
    for site in site_packages():
        if (site / name / "__init__.py").is_file():
            return site / name
    for entry in sys.path:
        if entry and (Path(entry) / name / "__init__.py").is_file():
            return Path(entry) / name
    return None


def take_files(paths: Iterable[Path], budget: int, max_file: int | None = None) -> list[Path]:
    """The non-empty files of ``paths``, in order, that fit in ``budget`` bytes (files over ``max_file``
    bytes skipped)."""
    out, total = [], 0
    for path in paths:
        size = path.stat().st_size
        if size == 0 or (max_file is not None and size > max_file) or total + size > budget:
            continue
        out.append(path)
        total += size
    return out


def distinct_within_budget(
    candidates: Iterable[tuple[Path, T]], read: Callable[[Path], str | bytes], budget: int
) -> list[tuple[T, str | bytes]]:
    """(key, content) of the candidate files, in order, whose content (``read(path)``) is not blank and
    not the same as one taken before, as long as they fit in ``budget`` (``len`` of the content);
    missing files are skipped."""
    out, hashes, total = [], set(), 0
    for path, key in candidates:
        if not path.is_file():
            continue
        content = read(path)
        data = content if isinstance(content, bytes) else content.encode("utf-8")
        digest = hashlib.sha256(data).hexdigest()
        if digest in hashes or not content.strip() or total + len(content) > budget:
            continue
        hashes.add(digest)
        out.append((key, content))
        total += len(content)
    return out


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------- standard library


def python_code_files(budget_bytes: int) -> list[Path]:
    """Standard-library ``.py`` files (no tests, no installed packages), sorted, within a byte budget."""
    paths = []
    for folder, subdirs, names in os.walk(stdlib_dir()):
        subdirs[:] = [d for d in subdirs if d not in SKIP_CODE_DIRS]  # prune: site-packages is large
        paths.extend(Path(folder, n) for n in names if n.endswith(".py"))
    return take_files(sorted(paths), budget_bytes)


def reference_documents(budget_bytes: int) -> list[str]:
    """Language-reference topics from ``pydoc_data``; module docstrings of the stdlib as a fallback."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    docs = [topics[k] for k in sorted(topics)]
    if not docs:
        for path in sorted(stdlib_dir().glob("*.py")):
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


def collect_python(budget: int) -> tuple[list[str], list[str]]:
    files = python_code_files(budget)
    root = stdlib_dir()
    return [read_text(p) for p in files], [f"stdlib/{p.relative_to(root)}" for p in files]


def collect_reference(budget: int) -> tuple[list[str], list[str]]:
    docs = reference_documents(budget)
    return docs, [f"pydoc_data.topics ({len(docs)} topics)"]


# ---------------------------------------------------------------------------------------------- licenses


def license_files(budget_bytes: int) -> list[Path]:
    """Python's LICENSE.txt and the license files of every installed distribution, deduplicated by
    content (the demo's licenses domain)."""
    candidates = [stdlib_dir() / "LICENSE.txt"]
    for site in site_packages():
        for dist in sorted(site.glob("*.dist-info")):
            for pattern in ("LICEN[CS]E*", "COPYING*", "licenses/**/*"):
                candidates.extend(sorted(p for p in dist.glob(pattern) if p.is_file()))
    taken = distinct_within_budget(((p, p) for p in candidates), Path.read_bytes, budget_bytes)
    return [path for path, _ in taken]


def _required_here(requirement: str, extras: Iterable[str] = ()) -> str | None:
    """The distribution a requirement names when it applies to this interpreter and platform without
    extras or with one of ``extras`` (its environment marker evaluated), else None."""
    extras = ("", *extras)
    try:
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:  # packaging is a dependency of torch's; without it, markers are read as true
        if "extra ==" in requirement and not any(
            f"extra == {q}{e}{q}" in requirement for e in extras if e for q in "'\""
        ):
            return None
        return re.split(r"[ ;<>=!~\[(]", requirement.strip(), maxsplit=1)[0]
    try:
        req = Requirement(requirement)
    except InvalidRequirement:
        return None
    if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
        return None
    return req.name


def dependency_closure(root: str = "aioli_fast", extras: Iterable[str] = ()) -> list[str]:
    """The installed distributions ``root`` needs (its requirements without extras, or with ``extras``
    of ``root`` itself, recursively), sorted."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [(root, tuple(extras))]
    while todo:
        name, wanted = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[key] = dist
        required = (_required_here(r, wanted) for r in dist.requires or [])
        todo.extend((name, ()) for name in required if name)
    return sorted(seen)


def collect_licenses(budget: int) -> tuple[list[str], list[str]]:
    """Python's LICENSE.txt and the license files of this package's installed dependencies (only those,
    so that other packages installed beside it do not change the corpus), deduplicated by content."""
    candidates = [(stdlib_dir() / "LICENSE.txt", "stdlib/LICENSE.txt")]
    for key in dependency_closure():
        dist = metadata.distribution(key)
        for entry in sorted(dist.files or [], key=str):
            name = str(entry)
            if ".dist-info/" in name and re.search(r"(LICEN[CS]E|COPYING|/licenses/)", name):
                candidates.append((Path(entry.locate()), name))
    taken = distinct_within_budget(candidates, read_text, budget)
    return [text for _, text in taken], [name for name, _ in taken]


# -------------------------------------------------------------------------------- installed packages


def collect_cpp(budget: int) -> tuple[list[str], list[str]]:
    """C++ headers of torch (``torch/include/**/*.h``)."""
    torch_dir = package_dir("torch")
    if torch_dir is None or not (torch_dir / "include").is_dir():
        return [], []
    root = torch_dir / "include"
    paths = sorted(p for p in root.rglob("*.h") if p.is_file())
    files = take_files(paths, budget, max_file=64_000)
    return [read_text(p) for p in files], [f"torch/include/{p.relative_to(root)}" for p in files]


def _docstrings_of(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 200:  # one-line docstrings carry little text
                out.append(doc)
    return out


def collect_docstrings(budget: int) -> tuple[list[str], list[str]]:
    """Docstrings (200 characters or more) of networkx and sympy modules, classes and functions."""
    docs, names, total = [], [], 0
    for package in ("networkx", "sympy"):
        root = package_dir(package)
        if root is None:
            continue
        for path in sorted(root.rglob("*.py")):
            if "tests" in path.relative_to(root).parts:
                continue
            found = [d for d in _docstrings_of(path) if total + len(d) <= budget]
            if not found:
                if total >= budget * 0.99:
                    return docs, names
                continue
            docs.extend(found)
            total += sum(len(d) for d in found)
            names.append(f"{package}/{path.relative_to(root)}")
    return docs, names


NOISE_ALPHABET = b"abcdefghijklmnopqrstuvwxyz"  # 26 lowercase letters


def noise_documents(n_docs: int, doc_bytes: int, seed: int = 0) -> list[str]:
    """Uniformly random lowercase-letter documents."""
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(NOISE_ALPHABET, dtype=np.uint8)
    return [
        alphabet[rng.integers(0, len(alphabet), doc_bytes)].tobytes().decode("ascii") for _ in range(n_docs)
    ]


def collect_noise(budget: int) -> tuple[list[str], list[str]]:
    """A useless domain: uniformly random lowercase letters, seeded, in documents of 4,000 characters (its
    loss cannot go below ln 26 = 3.26 nats per byte, and training on it teaches nothing about the
    others). No file is read."""
    return noise_documents(max(1, budget // 4000), 4000), []


def collect_fontmetrics(budget: int) -> tuple[list[str], list[str]]:
    """Adobe font metric files (``.afm``) shipped with matplotlib."""
    mpl = package_dir("matplotlib")
    if mpl is None:
        return [], []
    root = mpl / "mpl-data" / "fonts"
    files = take_files(sorted(root.rglob("*.afm")), budget, max_file=200_000)
    return [read_text(p) for p in files], [f"matplotlib/mpl-data/fonts/{p.relative_to(root)}" for p in files]


# ------------------------------------------------------------- the domains the twelve-domain corpus adds


def package_files(
    packages: Iterable[str],
    suffixes: tuple[str, ...],
    budget: int,
    *,
    tests: bool | None = None,
    max_file: int | None = None,
) -> tuple[list[str], list[str]]:
    """The files of the importable ``packages`` whose names end in one of ``suffixes``, each package's in
    sorted order, deduplicated by content, within ``budget`` characters: every package gets an equal
    share of what the ones before it left, so no single package fills the budget. ``tests``: True takes
    only files inside a ``tests`` folder, False none, None both; files over ``max_file`` bytes are
    skipped. Returns (documents, names), a name being ``<package>/<path inside it>``."""
    packages = list(packages)
    docs: list[str] = []
    names: list[str] = []
    total = 0
    for i, package in enumerate(packages):
        root = package_dir(package)
        if root is None:
            continue
        candidates = []
        for path in sorted(p for p in root.rglob("*") if p.name.endswith(suffixes)):
            inside = path.relative_to(root)
            if tests is not None and ("tests" in inside.parts[:-1]) != tests:
                continue
            if "__pycache__" in inside.parts or not path.is_file():
                continue
            if max_file is not None and path.stat().st_size > max_file:
                continue
            candidates.append((path, f"{package}/{inside.as_posix()}"))
        share = (budget - total) // (len(packages) - i)
        for name, text in distinct_within_budget(candidates, read_text, share):
            docs.append(text)
            names.append(name)
            total += len(text)
    return docs, names


def collect_stubs(budget: int) -> tuple[list[str], list[str]]:
    """Python type stubs (``.pyi``: signatures and overloads, no bodies) of torch, matplotlib and numpy,
    the type checkers' test cases in ``tests`` folders excluded."""
    # numpy, which has the most, comes last and takes what the others leave
    return package_files(("torch", "matplotlib", "numpy"), (".pyi",), budget, tests=False, max_file=256_000)


def collect_tests(budget: int) -> tuple[list[str], list[str]]:
    """The unit tests of networkx and sympy (the ``.py`` files of their ``tests`` folders, which the
    docstrings domain leaves out)."""
    return package_files(("networkx", "sympy"), (".py",), budget, tests=True, max_file=100_000)


def collect_cuda(budget: int) -> tuple[list[str], list[str]]:
    """CUDA source (``.cu``, ``.cuh``: GPU kernels and device code) of deepspeed's ops and torch's
    headers, which the cpp domain (``*.h`` only) leaves out."""
    return package_files(("deepspeed", "torch"), (".cu", ".cuh"), budget, tests=False, max_file=128_000)


def collect_yaml(budget: int) -> tuple[list[str], list[str]]:
    """The YAML files torch ships: torchgen's declarations of the ATen operators
    (``native_functions.yaml``: schemas and dispatch tables; ``derivatives.yaml``: backward formulas;
    tags) and the export schema."""
    return package_files(("torch", "torchgen"), (".yaml", ".yml"), budget, tests=False)


def collect_csv(budget: int) -> tuple[list[str], list[str]]:
    """numpy's CSV validation data: inputs and expected outputs of its math functions and the streams of
    its random generators, as tables of hexadecimal numbers."""
    return package_files(("numpy",), (".csv",), budget)


def package_description(dist: metadata.Distribution) -> str:
    """A distribution's long description (its README, in Markdown or reST), from the body of its
    ``METADATA`` or, in older metadata, the ``Description`` field; empty when it has none."""
    message = dist.metadata
    body = message.get_payload() if hasattr(message, "get_payload") else None
    text = body if isinstance(body, str) else ""
    if not text.strip():
        lines = (message.get("Description") or "").splitlines()
        # folded lines of the field start with 8 spaces, or 7 and a '|'
        text = "\n".join(lines[:1] + [re.sub(r"^( {8}| {7}\|)", "", line) for line in lines[1:]])
    return "" if text.strip() in ("", "UNKNOWN") else text


def collect_metadata(budget: int) -> tuple[list[str], list[str]]:
    """The long descriptions (READMEs in Markdown or reST, some with changelogs) of the installed
    distributions this package and its ``dev`` extra need (this package's own excluded: its README
    changes with every edit), by distribution name, deduplicated; the names record the versions."""
    candidates = []
    for key in dependency_closure(extras=("dev",)):
        dist = metadata.distribution(key)
        if key == "aioli-fast":
            continue
        text = package_description(dist)
        if text:
            candidates.append((text, f"{key} {dist.version} (description)"))
    out, hashes, total = [], set(), 0
    for text, name in candidates:
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if digest in hashes or total + len(text) > budget:
            continue
        hashes.add(digest)
        out.append((text, name))
        total += len(text)
    return [text for text, _ in out], [name for _, name in out]
