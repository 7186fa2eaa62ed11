"""Every notebook runs top to bottom in smoke mode (SPARSIFY_NOTEBOOK_SMOKE=1: few steps, few examples, tiny
shapes) and leaves the files it promises; none saves a plot into docs/ in smoke mode."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
PLOTS = REPO / "docs" / "plots"

# what each notebook must leave in SPARSIFY_NOTEBOOK_OUT; a new notebook needs a row here
EXPECTED = {
    "quickstart.ipynb": ["metrics.json"],
    "sparsity_vs_accuracy.ipynb": ["sweep.json"] + [f"techniques.0.final_sparsity={s}/{f}" for s in (0.5, 0.9)
                                                   for f in ("metrics.json", "artifact/sparsify.json", "bench.json")],
    "kernel_block_shapes.ipynb": ["kernels-4x1.json", "kernels-1x4.json"],
    "length_adaptive_pareto.ipynb": ["metrics.json", "search/frontier.json", "model/length_config.json"],
}


def test_every_notebook_has_expected_outputs():
    assert sorted(p.name for p in NOTEBOOKS) == sorted(EXPECTED)


def _plots_state() -> dict:
    return {p.name: p.stat().st_mtime_ns for p in PLOTS.glob("*")} if PLOTS.is_dir() else {}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch, tiny_model_dir):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if not os.environ.get("HF_HUB_OFFLINE") and not os.environ.get("HF_HUB_CACHE"):
        pytest.skip("the notebooks load GLUE data (quickstart also the real model): source ../shared/offline-env.sh "
                    "(or have Hub access)")
    monkeypatch.setenv("SPARSIFY_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("SPARSIFY_ROOT", str(REPO))
    monkeypatch.setenv("SPARSIFY_NOTEBOOK_OUT", str(tmp_path / "run"))
    monkeypatch.setenv("SPARSIFY_NOTEBOOK_MODEL", str(tiny_model_dir))  # notebooks that train use it in smoke mode
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"), \
        "store notebooks without outputs"
    plots_before = _plots_state()
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    for name in EXPECTED[path.name]:
        assert (tmp_path / "run" / name).is_file(), f"{path.name} did not write {name}"
    assert _plots_state() == plots_before, "smoke mode must not save plots into docs/plots"
    if path.name == "sparsity_vs_accuracy.ipynb":  # the measured sparsity of each point follows its grid value
        for s in (0.5, 0.9):
            report = json.loads((tmp_path / "run" / f"techniques.0.final_sparsity={s}" / "sparsity.json").read_text())
            assert report["total"]["sparsity"] == pytest.approx(s, abs=0.01)
