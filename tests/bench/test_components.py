"""The README's "Registered components" table is what the registries say."""

import os

import pytest

from bench import components
from bench.errors import BenchError
from bench.registry import METHODS, TASKS

README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "README.md")


def test_readme_components_table_is_current():
    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    assert components.render_readme(text) == text, \
        "README.md's components table is stale: run `python -m bench.components --write README.md`"


def test_table_lists_every_registered_method_and_task_with_its_own_docstring():
    table = components.components_markdown()
    assert METHODS.names() and TASKS.names()
    for name in METHODS.names() + TASKS.names():
        assert f"| `{name}` |" in table
    assert "| `linseg` | `miou` ↑ | Linear segmentation probe" in table
    assert "Base class" not in table  # no row inherits the base class's docstring


def test_render_replaces_only_the_block_and_bad_markers_fail(tmp_path):
    text = f"intro\n{components.BEGIN}\nold table\n{components.END}\noutro\n"
    new = components.render_readme(text)
    assert new.startswith(f"intro\n{components.BEGIN}\n| method |") and new.endswith(f"{components.END}\noutro\n")
    assert "old table" not in new and components.render_readme(new) == new
    with pytest.raises(BenchError, match="expected one"):
        components.render_readme("no markers here")
    path = tmp_path / "R.md"
    path.write_text(text)
    assert components.main(["--write", str(path)]) == 0 and path.read_text() == new
