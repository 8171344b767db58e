"""The notebooks: the committed files run (at the reduced CI size), they carry the outputs of a
full-size run, and they are what ``notebooks/make_notebooks.py`` generates."""
import copy
import importlib.util
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from conftest import data_root  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
MAX_BYTES = 1_000_000


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", NB_DIR / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _generator()
NAMES = sorted(GENERATOR.NOTEBOOKS)


def _read(name):
    path = NB_DIR / name
    assert path.is_file(), f"{path} is missing: run notebooks/make_notebooks.py --execute"
    return nbformat.read(str(path), as_version=4)


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_there_are_three_notebooks():
    assert [n[:2] for n in NAMES] == ["01", "02", "03"]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_matches_its_generator(name):
    """Edit make_notebooks.py, not the .ipynb: the committed sources must be the generated."""
    committed = _read(name)
    generated = GENERATOR.build(GENERATOR.NOTEBOOKS[name])
    assert [(c.cell_type, c.source) for c in committed.cells] == \
        [(c.cell_type, c.source) for c in generated.cells]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_holds_full_size_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    assert (NB_DIR / name).stat().st_size < MAX_BYTES, f"{name} is too large; lower the dpi"
    cells = _code_cells(nb)
    assert all(c.execution_count is not None for c in cells), f"{name} was not fully executed"
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name} holds error outputs: {[e.ename for e in errors]}"
    first = "".join(o.get("text", "") for o in cells[0].outputs)
    assert "small run: False" in first, f"{name} was stored from a reduced-size run"
    gallery = [c for c in cells if "gallery" in c.metadata.get("tags", [])]
    assert gallery, f"{name} has no figure tagged for the docs gallery"
    for cell in gallery:
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), \
            f"{name}: the gallery cell has no stored figure"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_at_reduced_size(name, monkeypatch):
    """Execute the committed notebook (outputs cleared) with ``PYVARINF2_NB_SMALL=1``."""
    nb = copy.deepcopy(_read(name))
    for cell in _code_cells(nb):
        cell.outputs, cell.execution_count = [], None
    monkeypatch.setenv("PYVARINF2_NB_SMALL", "1")
    monkeypatch.setenv("PYVARINF2_DATA", str(data_root()))
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     record_timing=False,
                                     resources={"metadata": {"path": str(NB_DIR)}})
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    first = "".join(o.get("text", "") for o in _code_cells(nb)[0].outputs)
    assert "small run: True" in first
