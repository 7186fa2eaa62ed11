"""Every notebook runs top to bottom in smoke mode (SPARSIFY_NOTEBOOK_SMOKE=1: few steps, few examples)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if not os.environ.get("HF_HUB_OFFLINE") and not os.environ.get("HF_HUB_CACHE"):
        pytest.skip("the notebooks load the real model: source ../shared/offline-env.sh (or have Hub access)")
    monkeypatch.setenv("SPARSIFY_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("SPARSIFY_ROOT", str(REPO))
    monkeypatch.setenv("SPARSIFY_NOTEBOOK_OUT", str(tmp_path / "run"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "store notebooks without outputs"
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (tmp_path / "run" / "metrics.json").is_file()
