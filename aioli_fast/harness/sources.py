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


def _required_here(requirement: str) -> str | None:
    """The distribution a requirement names when it applies to this interpreter and platform without
    extras (its environment marker evaluated), else None."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:  # packaging is a dependency of torch's; without it, markers are read as true
        if "extra ==" in requirement:
            return None
        return re.split(r"[ ;<>=!~\[(]", requirement.strip(), maxsplit=1)[0]
    try:
        req = Requirement(requirement)
    except InvalidRequirement:
        return None
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        return None
    return req.name


def dependency_closure(root: str = "aioli_fast") -> list[str]:
    """The installed distributions ``root`` needs (its requirements without extras, recursively), sorted."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[key] = dist
        todo.extend(name for name in map(_required_here, dist.requires or []) if name)
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


def collect_fontmetrics(budget: int) -> tuple[list[str], list[str]]:
    """Adobe font metric files (``.afm``) shipped with matplotlib."""
    mpl = package_dir("matplotlib")
    if mpl is None:
        return [], []
    root = mpl / "mpl-data" / "fonts"
    files = take_files(sorted(root.rglob("*.afm")), budget, max_file=200_000)
    return [read_text(p) for p in files], [f"matplotlib/mpl-data/fonts/{p.relative_to(root)}" for p in files]
