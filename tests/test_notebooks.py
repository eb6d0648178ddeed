"""Notebook conventions (README, Contributing): outputs stripped, one helper package, CI parameters.

The notebooks themselves are executed by nbval as part of the same pytest run."""

import glob
import os

import nbformat
import pytest

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "notebooks", "*.ipynb")))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_conventions(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), \
        "commit notebooks with outputs stripped"
    assert "import workbench as wb" in code[0].source
    assert "wb.FULL_RUN" in code[0].source and "wb.set_seed" in code[0].source
    for c in code:  # notebooks call the library; they do not define it
        assert "\ndef " not in "\n" + c.source and "\nclass " not in "\n" + c.source, c.source[:80]
