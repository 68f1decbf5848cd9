"""examples/quickstart.ipynb runs top to bottom on the embedded MiniLM (nbclient and ipykernel: the test extra)."""
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_runs_top_to_bottom():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    text = {i: "".join(o.get("text", "") for o in cell.get("outputs", [])) for i, cell in enumerate(notebook.cells)}
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    similarity = next(t for t in text.values() if "A man is playing a guitar." in t).splitlines()
    related, unrelated = (float(similarity[0].split()[-2]), float(similarity[0].split()[-1]))
    assert related > unrelated  # the guitar sentences are nearer each other than to the stock market
    metrics = next(t for t in text.values() if "'overall'" in t)
    assert "'sst_acc'" in metrics and "'sts_pearson'" in metrics
    assert len(images) == 2  # training losses and dev metrics
