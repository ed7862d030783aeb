"""The layout of the package: the core never imports the research harness, the kernels import nothing of
aioli_fast, and the harness's commands reach the CLI through the ``aioli_fast.commands`` entry points.

The core is every module of ``aioli_fast/`` outside ``aioli_fast/harness/``, plus ``kernels/`` (installed
as ``aioli_fast.kernels``). Imports are read with :mod:`ast`, so an import inside a function counts too.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from aioli_fast.cli import COMMAND_GROUP, build_parser

ROOT = Path(__file__).resolve().parents[1]
HARNESS = "aioli_fast.harness"
HARNESS_COMMANDS = ["corpus", "sweep", "demo"]


def module_name(path: Path) -> str:
    """The dotted name ``path`` is imported as (``kernels/`` is installed as ``aioli_fast.kernels``)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":
        parts.insert(0, "aioli_fast")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute name) of everything ``source`` imports, at any level; ``from X import y`` gives
    both ``X`` and ``X.y`` (y may be a module). ``module`` is the dotted name of the file, to resolve
    relative imports; ``importlib.import_module`` and ``__import__`` of a literal name count too."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level > len(package):
                    continue  # beyond the top-level package: an ImportError, not an import of ours
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def harness_imports(source: str, module: str, is_package: bool = False) -> list[int]:
    return sorted(
        {line for line, name in imported_modules(source, module, is_package) if _within(name, HARNESS)}
    )


def core_modules() -> list[Path]:
    paths = sorted((ROOT / "aioli_fast").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    return [p for p in paths if "harness" not in p.relative_to(ROOT).parts]


def _read(path: Path) -> tuple[str, str, bool]:
    return path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py"


def test_the_core_never_imports_the_harness():
    modules = core_modules()
    assert ROOT / "aioli_fast" / "cli.py" in modules and ROOT / "kernels" / "__init__.py" in modules
    offences = [
        f"{path.relative_to(ROOT)}:{line}" for path in modules for line in harness_imports(*_read(path))
    ]
    assert not offences, f"the core imports {HARNESS} (it may only be imported the other way): {offences}"


def test_the_kernels_import_nothing_of_aioli_fast():
    offences = []
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        for line, name in imported_modules(*_read(path)):
            if _within(name, "aioli_fast") and not _within(name, "aioli_fast.kernels"):
                offences.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert not offences, f"kernels/ must stand alone: {offences}"


@pytest.mark.parametrize(
    "source, module",
    [
        ("import aioli_fast.harness", "aioli_fast.cli"),
        ("import aioli_fast.harness.sweep as sweep", "aioli_fast.cli"),
        ("from aioli_fast.harness.sweep import load_spec", "aioli_fast.report"),
        ("from aioli_fast import harness", "aioli_fast.report"),
        ("from .harness import demo", "aioli_fast.cli"),
        ("from . import harness", "aioli_fast.cli"),
        ("from ..harness.sim import run_mixer", "aioli_fast.mixing.aioli"),
        ("from .. import harness", "aioli_fast.train.loop"),
        ("from ..harness import corpora", "aioli_fast.kernels.domain_ce"),
        ("def f():\n    if True:\n        from .harness.commands import add_commands", "aioli_fast.cli"),
        ("import importlib\nimportlib.import_module('aioli_fast.harness.demo')", "aioli_fast.cli"),
    ],
)
def test_the_check_finds_every_form_of_import(source, module):
    assert harness_imports(source, module) == [source.count("\n") + 1]


@pytest.mark.parametrize(
    "source, module, is_package",
    [
        ("from .report import read_metrics", "aioli_fast.cli", False),
        ("from ..mixing import Mixer\nx = 'aioli_fast.harness'", "aioli_fast.train.loop", False),
        ("from .harness_notes import x\nimport aioli_fast.harnesses", "aioli_fast.cli", False),
        ("from .harness import x", "aioli_fast.mixing", True),  # aioli_fast.mixing.harness
    ],
)
def test_the_check_lets_other_imports_pass(source, module, is_package):
    assert harness_imports(source, module, is_package) == []


def test_the_harness_commands_are_registered():
    assert "harness" in {ep.name for ep in entry_points(group=COMMAND_GROUP)}, (
        "no aioli_fast.commands entry points: reinstall the package (pip install -e .)"
    )
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    names = list(sub.choices)
    core = ["prepare", "combine", "verify", "train", "eval", "report", "skills-graph"]
    assert names[: len(core)] == core  # the core's commands first, then the plugins'
    assert [n for n in names if n in HARNESS_COMMANDS] == HARNESS_COMMANDS
    # the command as users run it, from another folder
    out = subprocess.run(
        [sys.executable, "-m", "aioli_fast", "--help"], capture_output=True, text=True, cwd=ROOT / "tests"
    )
    assert out.returncode == 0 and not out.stderr, out.stderr
    # a command's line is indented by 4 spaces, the continuation of its help by more
    lines = out.stdout.splitlines()
    listed = [line.split()[0] for line in lines if line.startswith("    ") and line[4:5] not in ("", " ")]
    assert [n for n in listed if n in HARNESS_COMMANDS] == HARNESS_COMMANDS, out.stdout
    # building the parser loads the commands' parsers only: not the harness's modules, not torch
    probe = (
        "import sys; from aioli_fast.cli import build_parser; build_parser(); "
        "print(sorted(m for m in sys.modules if m.startswith(('aioli_fast', 'torch'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT / "tests")
    loaded = ast.literal_eval(out.stdout)
    assert "aioli_fast.harness.commands" in loaded
    assert not [m for m in loaded if m.startswith("torch") or m.endswith((".sweep", ".demo", ".corpora"))]


def test_without_registered_entry_points_an_unknown_command_says_how_to_get_them(monkeypatch, capsys):
    import pytest

    from aioli_fast import cli

    monkeypatch.setattr(cli, "COMMAND_GROUP", "aioli_fast.commands_of_no_installed_package")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'demo'" in err
    assert "install the package (python3 install.py, or pip install -e .) to add them" in err
    with pytest.raises(SystemExit) as exit_info:  # the core's commands are all there
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0 and "install the package" not in capsys.readouterr().err


NEUTRAL = ["aioli_fast/driver.py", "aioli_fast/evaluation.py", "aioli_fast/options.py"]


def test_the_adapters_and_the_shared_loop_modules_never_import_the_trainer():
    """The adapters share the driver, the evaluation and the options with the native trainer, never the
    trainer itself (an HF user must not load the DeepSpeed trainer package)."""
    adapters = sorted((ROOT / "aioli_fast" / "integrations").rglob("*.py"))
    upward = {path: ("aioli_fast.train",) for path in adapters}
    upward.update({ROOT / p: ("aioli_fast.train", "aioli_fast.integrations") for p in NEUTRAL})
    offences = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path, banned in upward.items()
        for line, name in imported_modules(*_read(path))
        if any(_within(name, package) for package in banned)
    ]
    assert not offences, f"these import the native trainer: {offences}"
    # and at run time: what importing the shared part of the adapters loads
    probe = (
        "import sys, aioli_fast.integrations.common; "
        "print(sorted(m for m in sys.modules if m.startswith('aioli_fast.train')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT / "tests")
    assert out.returncode == 0, out.stderr
    assert ast.literal_eval(out.stdout) == []


def test_one_file_runs_a_mixer_around_a_step():
    """``mixer.schedule(`` and ``mixer.measurement_due(`` are called in aioli_fast/driver.py only (the
    mixers themselves aside): a change of the mixer contract is made there."""
    pattern = re.compile(r"\.(schedule|measurement_due)\(")
    paths = [*core_modules(), *sorted((ROOT / "aioli_fast" / "harness").rglob("*.py"))]
    paths += sorted((ROOT / "benchmarks").glob("*.py"))
    callers = {
        str(path.relative_to(ROOT))
        for path in paths
        if "mixing" not in path.relative_to(ROOT).parts and pattern.search(path.read_text(encoding="utf-8"))
    }
    assert callers == {"aioli_fast/driver.py"}
