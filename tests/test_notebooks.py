"""The notebooks run offline on the fixtures, top to bottom (nbclient)."""

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert outputs  # it showed something
    if path.name.startswith("01-"):  # the postmortem shows its figures and the report itself
        assert any("image/png" in o.get("data", {}) for o in outputs)
        assert any("<section" in str(o.get("data", {}).get("text/html", "")) for o in outputs)


def test_there_are_two_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01-postmortem.ipynb", "02-write-a-detector.ipynb"]
