"""Exploration helpers: runs and sweeps into a DataFrame, and the plots (checked on the plotted data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

pd = pytest.importorskip("pandas")
matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from sparsify import explore  # noqa: E402
from sparsify.errors import SparsifyError  # noqa: E402


def _write(path: Path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc) if not path.suffix == ".yaml" else yaml.safe_dump(doc))


def _fake_run(run: Path, *, sparsity: float | None, accuracy: float | None, lr: float = 1e-4,
              artifact: tuple[int, int] | None = None, bench: dict | None = None) -> Path:
    """A run directory with the files 'sparsify train', 'sparsify export' and 'sparsify bench model' write."""
    techniques = [{"kind": "pruning", "block": "4x1", "final_sparsity": sparsity}] if sparsity is not None else []
    _write(run / "recipe.yaml", {"name": "toy", "output_dir": str(run), "model": {"name_or_path": "tiny"},
                                 "training": {"learning_rate": lr}, "techniques": techniques})
    if accuracy is None:  # unfinished
        return run
    _write(run / "metrics.json", {"metrics": {"accuracy": accuracy, "loss": 0.5}, "optimizer_steps": 10,
                                  "wall_time_s": 1.5, "evals": [{"step": 5, "accuracy": accuracy - 0.1},
                                                                {"step": 10, "accuracy": accuracy}]})
    if sparsity is not None:
        _write(run / "sparsity.json", {"block": "4x1", "target": sparsity,
                                       "total": {"sparsity": sparsity - 0.001, "follows_block": True}})
    if artifact is not None:
        weights, dense = artifact
        (run / "artifact").mkdir(parents=True)
        (run / "artifact" / "model.safetensors").write_bytes(b"x" * weights)
        _write(run / "artifact" / "sparsify.json", {"size": {"weights_bytes": weights, "dense_fp32_bytes": dense,
                                                             "ratio": round(weights / dense, 4)}})
    if bench is not None:
        records = []
        for scenario, (ours, torch) in bench.items():
            records += [{"scenario": scenario, "method": "sparsify", "median_ms": ours, "speedup_vs_torch_fp32": torch / ours},
                        {"scenario": scenario, "method": "torch_fp32", "median_ms": torch, "speedup_vs_torch_fp32": 1.0},
                        {"scenario": scenario, "method": "deepsparse", "median_ms": ours * 1.5, "speedup_vs_torch_fp32": None}]
        _write(run / "bench.json", {"records": records})
    return run


@pytest.fixture
def sweep_root(tmp_path) -> Path:
    root = tmp_path / "sweep"
    points = [("techniques.0.final_sparsity=0.9", 0.9, 0.80, (100, 1000), {"throughput_b32_sst2": (10.0, 40.0)}),
              ("techniques.0.final_sparsity=0.5", 0.5, 0.88, (600, 1000), {"throughput_b32_sst2": (20.0, 40.0)}),
              ("techniques.0.final_sparsity=0.7", 0.7, None, None, None)]
    for name, sp, acc, art, bench in points:
        _fake_run(root / name, sparsity=sp, accuracy=acc, artifact=art, bench=bench)
    _write(root / "sweep.json", {"recipe": "r.yaml", "overrides": [],
                                 "grid": {"techniques.0.final_sparsity": ["0.9", "0.5", "0.7"]},
                                 "points": [{"name": n, "values": {}, "output_dir": f"elsewhere/{n}"}
                                            for n, *_ in points]})
    return root


def test_collect_runs_reads_a_sweep(sweep_root):
    df = explore.collect_runs(sweep_root, settings=["training.learning_rate"])
    assert list(df["run"]) == ["techniques.0.final_sparsity=0.9", "techniques.0.final_sparsity=0.5"]  # grid order
    assert list(df["techniques.0.final_sparsity"]) == [0.9, 0.5]  # from each run's recipe.yaml
    assert list(df["training.learning_rate"]) == [1e-4, 1e-4]
    assert list(df["techniques"]) == ["pruning", "pruning"] and list(df["model"]) == ["tiny", "tiny"]
    assert list(df["eval_accuracy"]) == [0.80, 0.88]
    assert list(df["sparsity"]) == pytest.approx([0.899, 0.499])
    assert list(df["target_sparsity"]) == [0.9, 0.5] and list(df["follows_block"]) == [True, True]
    assert list(df["size_ratio"]) == [0.1, 0.6] and list(df["weights_bytes"]) == [100, 600]
    assert df["artifact_bytes"].iloc[0] > 100  # the weights file and the manifest
    assert list(df["speedup_throughput_b32_sst2"]) == [4.0, 2.0]
    assert list(df["ms_throughput_b32_sst2"]) == [10.0, 20.0]
    assert list(df["speedup_vs_deepsparse_throughput_b32_sst2"]) == pytest.approx([1.5, 1.5])

    # with the interleaved rounds recorded, the DeepSparse ratio is their median (as the PyTorch one), not the
    # ratio of the two medians (here 1.5 against 11 / 6)
    bench = sweep_root / "techniques.0.final_sparsity=0.9" / "bench.json"
    data = json.loads(bench.read_text())
    rounds = {"sparsify": [4.0, 6.0, 10.0], "deepsparse": [12.0, 9.0, 11.0]}
    for r in data["records"]:
        if r["method"] in rounds:
            r["per_round_ms"] = rounds[r["method"]]
            r["median_ms"] = float(np.median(rounds[r["method"]]))
    bench.write_text(json.dumps(data))
    assert explore.bench_summary(bench)["speedup_vs_deepsparse_throughput_b32_sst2"] == pytest.approx(1.5)

    everything = explore.collect_runs(sweep_root, include_unfinished=True)
    assert list(everything["finished"]) == [True, True, False]
    assert np.isnan(everything["eval_accuracy"].iloc[2])


def test_collect_runs_reads_run_dirs_and_rejects_others(tmp_path):
    dense = _fake_run(tmp_path / "dense", sparsity=None, accuracy=0.9)
    df = explore.collect_runs([dense])
    assert df["techniques"].iloc[0] == "dense" and "sparsity" not in df.columns and "size_ratio" not in df.columns
    with pytest.raises(SparsifyError, match="neither a run directory"):
        explore.collect_runs(tmp_path / "nothing")


def test_plot_accuracy_vs_sparsity_plots_the_runs(sweep_root, tmp_path):
    df = explore.collect_runs(sweep_root)
    fig = explore.plot_accuracy_vs_sparsity(df, baseline=0.9, save=tmp_path / "plots" / "acc.png")
    ax = fig.axes[0]
    line = ax.lines[0]
    assert list(line.get_xdata()) == pytest.approx([49.9, 89.9])  # sorted by sparsity, in %
    assert list(line.get_ydata()) == pytest.approx([88.0, 80.0])
    assert list(ax.lines[1].get_ydata()) == [90.0, 90.0]  # the dense baseline
    assert (tmp_path / "plots" / "acc.png").stat().st_size > 1000
    by = explore.plot_accuracy_vs_sparsity(df.assign(block=["4x1", "1x4"]), by="block")
    assert sorted(len(l.get_xdata()) for l in by.axes[0].lines) == [1, 1]
    assert [t.get_text() for t in by.axes[0].get_legend().get_texts()] == ["block 1x4", "block 4x1"]
    with pytest.raises(SparsifyError, match="no column 'eval_f1'"):
        explore.plot_accuracy_vs_sparsity(df, metric="eval_f1")


def test_plot_accuracy_vs_speedup_plots_measured_speed(sweep_root):
    df = explore.collect_runs(sweep_root)
    ax = explore.plot_accuracy_vs_speedup(df).axes[0]
    assert list(ax.lines[0].get_xdata()) == [2.0, 4.0]
    assert list(ax.lines[0].get_ydata()) == pytest.approx([88.0, 80.0])
    assert [t.get_text() for t in ax.texts] == ["50%", "90%"]
    assert "throughput_b32_sst2" in ax.get_xlabel()


def _kernel_records():
    rows = []
    for block, base in (("4x1", 4.0), ("1x4", 2.0), ("4x4", 3.0), ("1x1", 1.0)):
        for sp, step in ((0.8, 0.0), (0.9, 1.0)):
            for (o, i), factor in (((64, 64), 1.0), ((128, 64), 3.0)):  # medians over the two shapes: base+step*2
                for method, speedup in (("ours_fp32", (base + step) * factor), ("torch_dense", 1.0)):
                    rows.append({"out_features": o, "in_features": i, "tokens": 16, "sparsity": sp, "block": block,
                                 "method": method, "median_ms": 1.0 / speedup, "speedup_vs_torch_dense": speedup})
    return pd.DataFrame(rows)


def test_block_heatmap_shows_the_median_over_shapes():
    records = _kernel_records()
    table = explore.block_table(records)
    assert list(table.index) == ["1x1", "1x4", "4x1", "4x4"]  # by block area, then rows
    assert list(table.columns) == [0.8, 0.9]
    fig = explore.plot_block_heatmap(records)
    ax = fig.axes[0]
    expected = np.array([[2.0, 4.0], [4.0, 6.0], [8.0, 10.0], [6.0, 8.0]])
    np.testing.assert_allclose(ax.images[0].get_array(), expected)
    assert [t.get_text() for t in ax.texts] == [f"{v:.2f}" for v in expected.ravel()]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1x1", "1x4", "4x1", "4x4"]
    assert "out x in" in ax.get_ylabel() and "(median)" in ax.get_title()
    one = explore.plot_block_heatmap(records, out_features=64, value="median_ms").axes[0]
    np.testing.assert_allclose(one.images[0].get_array()[2], [1 / 4.0, 1 / 5.0])  # 4x1 on 64x64 only
    assert "(median)" not in one.get_title()
    with pytest.raises(SparsifyError, match="no 'ours_int8' records"):
        explore.block_table(records, method="ours_int8")


def test_bench_kernel_grid_runs_one_benchmark_per_block_and_reuses_files(tmp_path, monkeypatch):
    import sparsify.kernels.bench

    calls = []

    def fake_main(argv):
        calls.append(argv)
        block = argv[argv.index("--block") + 1]
        if block == "3x3":
            return 2
        rows = [{"block": block, "sparsity": float(s), "method": "ours_fp32", "median_ms": 1.0,
                 "speedup_vs_torch_dense": 2.0, "out_features": 64, "in_features": 64, "tokens": 16}
                for s in argv[argv.index("--sparsities") + 1].split(",")]
        doc = {"threads": 2, "cpu": {"model_name": "test CPU"}, "records": rows}
        if block == "1x4":  # files of older versions: a bare list of records
            doc = rows
        Path(argv[argv.index("--json") + 1]).write_text(json.dumps(doc))
        return 0

    monkeypatch.setattr(sparsify.kernels.bench, "main", fake_main)
    records = explore.bench_kernel_grid(["4x1", "1x4"], [0.5, 0.9], shapes=[(64, 64), (128, 64)], tokens=[16],
                                        out_dir=tmp_path / "k", rounds=1)
    assert len(calls) == 2 and len(records) == 4 and sorted(set(records["block"])) == ["1x4", "4x1"]
    assert list(records[records["block"] == "4x1"]["cpu_model"]) == ["test CPU"] * 2  # the machine travels along
    (tmp_path / "bad.json").write_text(json.dumps({"threads": 2}))
    with pytest.raises(SparsifyError, match="bad.json: not a 'sparsify bench kernels --json' file"):
        explore.kernel_records(tmp_path / "bad.json")
    assert calls[0][calls[0].index("--shapes") + 1] == "64x64,128x64"
    assert calls[0][calls[0].index("--rounds") + 1] == "1" and "--threads" not in calls[0]
    explore.bench_kernel_grid(["4x1", "1x4"], [0.5, 0.9], shapes=[(64, 64)], tokens=[16], out_dir=tmp_path / "k")
    assert len(calls) == 2  # both files reused
    with pytest.raises(SparsifyError, match="failed for block 3x3"):
        explore.bench_kernel_grid(["3x3"], [0.5], shapes=[(64, 64)], tokens=[16], out_dir=tmp_path / "k")


def _frontier_doc(budget=0.5):
    def cand(cfg, acc, frac):
        return {"length_config": cfg, "accuracy": acc, "flops_fraction": frac, "flops_per_example": frac * 1e6}

    evaluated = [cand([1.0, 1.0], 0.90, 1.0), cand([0.8, 0.6], 0.89, 0.62), cand([0.6, 0.4], 0.88, 0.45),
                 cand([0.5, 0.5], 0.85, 0.5), cand([0.3, 0.2], 0.80, 0.25)]
    frontier = [evaluated[4], evaluated[2], evaluated[1], evaluated[0]]
    return {"task": "sst2", "metric": "accuracy", "budget": budget, "chosen": evaluated[2], "frontier": frontier,
            "evaluated": evaluated}


def test_plot_pareto_plots_frontier_chosen_and_budget(tmp_path):
    run = tmp_path / "la-run"
    _write(run / "search" / "frontier.json", _frontier_doc())
    assert explore.load_frontier(run)["budget"] == 0.5
    fig = explore.plot_pareto(run, save=tmp_path / "p.png")
    ax = fig.axes[0]
    frontier, chosen, budget = ax.lines
    assert list(frontier.get_xdata()) == [0.25, 0.45, 0.62, 1.0]
    assert list(frontier.get_ydata()) == pytest.approx([80.0, 88.0, 89.0, 90.0])
    assert (list(chosen.get_xdata()), list(chosen.get_ydata())) == ([0.45], pytest.approx([88.0]))
    assert list(budget.get_xdata()) == [0.5, 0.5]
    assert len(ax.collections[0].get_offsets()) == 5  # every evaluated configuration
    assert "la-run chosen (88.00% at 45%)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert (tmp_path / "p.png").is_file()
    two = explore.plot_pareto([_frontier_doc(), _frontier_doc(0.3)], labels=["a", "b"], evaluated=False).axes[0]
    assert len(two.lines) == 6 and not two.collections
    with pytest.raises(SparsifyError, match="run 'sparsify search"):
        explore.load_frontier(tmp_path / "nothing")


def test_plot_pareto_follows_a_latency_search():
    doc = _frontier_doc()
    doc["cost"] = "latency"
    for c in doc["evaluated"]:
        c["latency_fraction"] = c["flops_fraction"] / 2  # the same dicts as in frontier and chosen
    ax = explore.plot_pareto(doc).axes[0]
    assert list(ax.lines[0].get_xdata()) == [0.125, 0.225, 0.31, 0.5]
    assert list(ax.lines[1].get_xdata()) == [0.225] and "latency" in ax.get_xlabel()
    with pytest.raises(SparsifyError, match="different costs"):
        explore.plot_pareto([doc, _frontier_doc()])
