"""Every config key is documented, and the README's commands are the ones CI runs."""

import ast
import contextlib
import io
import re
from pathlib import Path

import pytest

from aioli_fast.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_key_is_in_the_configuration_reference():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for section, keys in RunConfig().to_dict().items():  # the keys as YAML has them (mixer options too)
        assert f"## `{section}`" in doc, section
        body = doc.split(f"## `{section}`", 1)[1].split("\n## ", 1)[0]
        for key in keys:
            assert re.search(rf"`{key}`", body), f"{section}.{key} is not documented"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "python3 install.py --dev && python3 -m pytest"
    assert command in readme and command in ci


def test_the_own_loop_example_in_the_mixing_docs_runs():
    text = (ROOT / "docs" / "mixing.md").read_text()
    code = (
        text.split("## A mixer inside your own training loop", 1)[1]
        .split("```python\n", 1)[1]
        .split("```", 1)[0]
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/mixing.md", "exec"), {"__name__": "docs_example"})
    proportions = ast.literal_eval(out.getvalue().strip())
    assert set(proportions) == {"code", "law", "web"}
    assert abs(sum(proportions.values()) - 1) < 1e-5
    assert proportions != {d: 1 / 3 for d in proportions}  # two rounds moved them away from uniform


def test_the_new_method_example_in_the_mixing_docs_runs():
    from aioli_fast.mixing import MIXERS

    text = (ROOT / "docs" / "mixing.md").read_text()
    code = text.split("## Adding a method", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "docs/mixing.md", "exec"), {"__name__": "docs_example"})
    finally:
        MIXERS.pop("greedy", None)
    proportions = ast.literal_eval(out.getvalue().strip())
    assert abs(sum(proportions) - 1) < 1e-3 and proportions[0] > 0.6  # towards the higher-loss domain


def _python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line, code) of every ```python block of a markdown file."""
    blocks, lines = [], path.read_text().splitlines()
    start = None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == "```python":
            start = number
        elif start is not None and line.strip() == "```":
            blocks.append((start + 1, "\n".join(lines[start : number - 1]) + "\n"))
            start = None
    return blocks


def _runnable(page: Path) -> list[tuple[int, str]]:
    """The blocks that are not marked ``# fragment`` (on their first line)."""
    return [(line, code) for line, code in _python_blocks(page) if not code.startswith("# fragment")]


DOC_PAGES = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if _runnable(p)]


def test_the_docs_have_runnable_python_blocks():
    assert {p.name for p in DOC_PAGES} >= {"mixing.md", "using-the-pieces.md"}


@pytest.mark.parametrize("page", DOC_PAGES, ids=[p.name for p in DOC_PAGES])
def test_every_python_block_of_a_page_runs_or_is_marked_a_fragment(page, tmp_path, monkeypatch):
    """The blocks of a page run top to bottom in one namespace, in an empty folder, as a reader would
    paste them; a block whose first line is ``# fragment`` shows an API and is not run."""
    from aioli_fast.mixing import MIXERS

    runnable = _runnable(page)
    monkeypatch.chdir(tmp_path)
    registered = dict(MIXERS)  # a page may register a mixer: the registry is restored afterwards
    namespace = {"__name__": "docs_example"}
    for line, code in runnable:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
        finally:
            MIXERS.clear()
            MIXERS.update(registered)


def test_the_architecture_page_names_real_files_and_the_readme_links_it():
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:aioli_fast|kernels|tests|docs)/[\w./]*)`", text))
    assert len(named) >= 20, named
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
    assert "(docs/architecture.md)" in (ROOT / "README.md").read_text()
