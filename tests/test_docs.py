"""Every config key is documented, and the README's commands are the ones CI runs."""

import ast
import contextlib
import io
import re
from pathlib import Path

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
