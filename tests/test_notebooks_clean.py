"""Every notebook in git: a `parameters` cell first (papermill), outputs stripped, and a test that runs it."""
from pathlib import Path

import nbformat
import pytest

from tests.conftest import ROOT

NOTEBOOKS = sorted([*ROOT.glob("_notebooks/*.ipynb"), *ROOT.glob("experiments/*.ipynb")])
KEEPS_FIGURES: set[str] = set()  # notebooks whose rendered figures are the point (committed with outputs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_parameters_cell_and_stripped_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and "parameters" in code[0].metadata.get("tags", []), "first code cell must be tagged 'parameters'"
    if path.name not in KEEPS_FIGURES:
        assert all(not c.outputs and c.execution_count is None for c in code), "outputs must be stripped in git"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_notebook_is_executed_by_a_test(path: Path):
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    assert path.name in tests, f"no test executes {path.name}"


def test_every_notebook_finds_the_repository_with_the_same_cell():
    """The cell after `parameters` finds the repository (`repo = None`: from the working directory or the
    notebook's folder); one text for all, so a fix reaches every notebook."""
    sources = set()
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code[1].get("id") == "find-repository", path.name
        assert "repo = None" in code[0].source, path.name
        sources.add(code[1].source)
    assert len(sources) == 1, "the find-repository cells differ"
