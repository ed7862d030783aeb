"""Every config key is documented, and the README's commands are the ones CI runs."""

import dataclasses
import re
from pathlib import Path

from aioli_fast.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_key_is_in_the_configuration_reference():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for section in dataclasses.fields(RunConfig):
        assert f"## `{section.name}`" in doc, section.name
        body = doc.split(f"## `{section.name}`", 1)[1].split("\n## ", 1)[0]
        for f in dataclasses.fields(section.default_factory):
            assert re.search(rf"`{f.name}`", body), f"{section.name}.{f.name} is not documented"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "python3 install.py --dev && python3 -m pytest"
    assert command in readme and command in ci
