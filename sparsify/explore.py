"""Exploring trade-offs: read runs, sweeps and benchmark records into tables, and plot them.

    df = collect_runs("runs/sst2/minilm-l6-4x1-90-sweep")      # a sweep root, a run directory or a list of them
    plot_accuracy_vs_sparsity(df, save="docs/plots/accuracy_vs_sparsity.png")
    plot_accuracy_vs_speedup(df)
    records = bench_kernel_grid(["4x1", "1x4", "4x4"], [0.8, 0.9], shapes=[(768, 768)], tokens=[128])
    plot_block_heatmap(records)
    plot_pareto("runs/sst2/minilm-l6-length-adaptive")      # the frontier written by 'sparsify search'

pandas and matplotlib are imported lazily (``pip install 'sparsify-encoders[explore]'``). Every plotting helper
returns the matplotlib Figure and, given ``save=PATH``, also writes it there (parent folders created).

What a run directory contributes to its row (:func:`collect_runs`):

- the recipe settings: ``name``, ``model``, ``techniques``, the sweep's grid keys and any ``settings`` key paths
  (dotted, as in ``--set``), read from the resolved ``recipe.yaml``;
- ``metrics.json``: ``eval_<metric>`` (the final model's), ``steps``, ``wall_time_s``;
- ``sparsity.json`` (measured from the saved weights): ``sparsity``, ``target_sparsity``, ``block``,
  ``follows_block``;
- ``RUN/artifact/sparsify.json`` (the export's manifest), when present: ``artifact_bytes`` (all files),
  ``weights_bytes``, ``dense_fp32_bytes``, ``size_ratio`` (weights / dense fp32);
- ``RUN/bench.json`` (``sparsify bench model --json``), when present, per scenario S: ``ms_S`` (our runtime's
  median ms per batch) and ``speedup_S`` (per-round median speedup over PyTorch fp32), and
  ``speedup_vs_deepsparse_S`` when DeepSparse was measured.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sparsify.errors import SparsifyError
from sparsify.sweep import ARTIFACT, BENCH, SWEEP_FILE


# -- runs into a table ------------------------------------------------------------------------------------


def run_summary(run_dir: str | Path) -> dict:
    """One run's recipe name, final metrics, optimizer steps, wall time and measured sparsity."""
    run = Path(run_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    row = {"run": run.name, **{f"eval_{k}": v for k, v in metrics["metrics"].items()},
           "steps": metrics["optimizer_steps"], "wall_time_s": metrics["wall_time_s"]}
    if (run / "sparsity.json").is_file():
        report = json.loads((run / "sparsity.json").read_text())
        row.update(sparsity=report["total"]["sparsity"], block=report["block"],
                   follows_block=report["total"]["follows_block"])
        if "target" in report:
            row["target_sparsity"] = report["target"]
    return row


def _lookup(data: Any, key: str) -> Any:
    """The value at a dotted key path (``techniques.0.final_sparsity``) of a recipe mapping; None when absent."""
    node = data
    for part in key.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def artifact_summary(artifact_dir: str | Path) -> dict:
    """Sizes of an exported artifact, from its manifest and its files."""
    artifact = Path(artifact_dir)
    manifest = json.loads((artifact / "sparsify.json").read_text())
    size = manifest.get("size", {})
    return {"artifact_bytes": sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file()),
            "weights_bytes": size.get("weights_bytes"), "dense_fp32_bytes": size.get("dense_fp32_bytes"),
            "size_ratio": size.get("ratio")}


def bench_summary(bench_json: str | Path, method: str = "sparsify") -> dict:
    """Measured speed of ``method`` per scenario from a ``sparsify bench model --json`` file: ``ms_S``,
    ``speedup_S`` (over PyTorch fp32) and ``speedup_vs_deepsparse_S`` (when DeepSparse was measured): the median
    of the per-round ratios, like the PyTorch one, when both methods carry their interleaved rounds
    (``per_round_ms``), else the ratio of the medians."""
    import numpy as np

    records = json.loads(Path(bench_json).read_text())["records"]
    by = {(r["scenario"], r["method"]): r for r in records}
    row = {}
    for (scenario, meth), r in by.items():
        if meth != method:
            continue
        row[f"ms_{scenario}"] = r["median_ms"]
        row[f"speedup_{scenario}"] = r["speedup_vs_torch_fp32"]
        ds = by.get((scenario, "deepsparse"))
        if ds is not None:
            a, b = ds.get("per_round_ms"), r.get("per_round_ms")
            row[f"speedup_vs_deepsparse_{scenario}"] = (
                float(np.median(np.asarray(a) / np.asarray(b))) if a and b and len(a) == len(b)
                else ds["median_ms"] / r["median_ms"])
    return row


def _run_dirs(runs) -> tuple[list[Path], list[str]]:
    """Run directories (and the sweep's grid keys) from a sweep root, a run directory or a list of either."""
    if isinstance(runs, (str, Path)):
        runs = [runs]
    dirs, keys = [], []
    for r in runs:
        r = Path(r)
        if (r / SWEEP_FILE).is_file():
            doc = json.loads((r / SWEEP_FILE).read_text())
            keys += [k for k in doc["grid"] if k not in keys]
            dirs += [r / p["name"] for p in doc["points"]]  # wherever the sweep root is now
        elif (r / "metrics.json").is_file() or (r / "recipe.yaml").is_file():
            dirs.append(r)
        else:
            raise SparsifyError(f"{r}: neither a run directory (metrics.json) nor a sweep root ({SWEEP_FILE})")
    return dirs, keys


def collect_runs(runs, *, settings: Sequence[str] = (), artifact: str = ARTIFACT, bench: str = BENCH,
                 include_unfinished: bool = False):
    """A pandas DataFrame with one row per finished run (``metrics.json`` present) of ``runs``: a sweep root
    (its points, in grid order), a run directory, or a list of them. Columns: see the module docstring;
    ``settings`` adds recipe values by dotted key path (e.g. ``training.learning_rate``). Unfinished runs are
    left out unless ``include_unfinished`` (then their metric columns are empty)."""
    import pandas as pd
    import yaml

    dirs, keys = _run_dirs(runs)
    keys += [k for k in settings if k not in keys]
    rows = []
    for run in dirs:
        finished = (run / "metrics.json").is_file()
        if not finished and not include_unfinished:
            continue
        row = {"run": run.name, "run_dir": str(run), "finished": finished}
        recipe = yaml.safe_load((run / "recipe.yaml").read_text()) if (run / "recipe.yaml").is_file() else {}
        row.update(name=recipe.get("name"), model=_lookup(recipe, "model.name_or_path"),
                   techniques="+".join(t["kind"] for t in recipe.get("techniques") or []) or "dense")
        row.update({k: _lookup(recipe, k) for k in keys})
        if finished:
            row.update(run_summary(run))
        if (run / artifact / "sparsify.json").is_file():
            row.update(artifact_summary(run / artifact))
        if (run / bench).is_file():
            row.update(bench_summary(run / bench))
        rows.append(row)
    return pd.DataFrame(rows)


# -- plots ------------------------------------------------------------------------------------------------


def _figure(ax=None, figsize=(6, 4)):
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax


def _finish(fig, save: str | Path | None):
    fig.tight_layout()
    if save is not None:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, dpi=120)
    return fig


def _require(df, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SparsifyError(f"{what}: the table has no column {', '.join(map(repr, missing))} "
                            f"(columns: {', '.join(map(str, df.columns))})")


def plot_accuracy_vs_sparsity(df, *, metric: str = "eval_accuracy", sparsity: str = "sparsity", by: str | None = None,
                              baseline: float | None = None, ax=None, save: str | Path | None = None):
    """Validation ``metric`` against measured ``sparsity``, one line per value of ``by`` (e.g. ``block``), points
    in order of sparsity; ``baseline`` (e.g. the dense model's accuracy) as a dashed line. Returns the Figure."""
    _require(df, [metric, sparsity] + ([by] if by else []), "plot_accuracy_vs_sparsity")
    data = df.dropna(subset=[metric, sparsity]).sort_values(sparsity)
    fig, ax = _figure(ax)
    groups = data.groupby(by, sort=True) if by else [(None, data)]
    for label, g in groups:
        ax.plot(g[sparsity] * 100, g[metric] * 100, marker="o", label=None if by is None else f"{by} {label}")
    if baseline is not None:
        ax.axhline(baseline * 100, color="0.4", ls="--", lw=1, label=f"dense {baseline:.2%}")
    ax.set_xlabel("sparsity of the pruned layers, % (measured from the weights)")
    ax.set_ylabel(f"validation {metric.removeprefix('eval_')}, %")
    ax.grid(alpha=0.3)
    if by is not None or baseline is not None:
        ax.legend(fontsize=8)
    return _finish(fig, save)


def plot_accuracy_vs_speedup(df, *, metric: str = "eval_accuracy", speedup: str = "speedup_throughput_b32_sst2",
                             label: str | None = "sparsity", ax=None, save: str | Path | None = None):
    """Validation ``metric`` against the measured ``speedup`` over PyTorch fp32 (a column of :func:`collect_runs`
    from ``bench.json``), each point annotated with its ``label`` column. Returns the Figure."""
    _require(df, [metric, speedup] + ([label] if label else []), "plot_accuracy_vs_speedup")
    data = df.dropna(subset=[metric, speedup]).sort_values(speedup)
    fig, ax = _figure(ax)
    ax.plot(data[speedup], data[metric] * 100, "o")
    if label is not None:
        for _, row in data.iterrows():
            value = row[label]
            text = f"{value:.0%}" if label.endswith("sparsity") and isinstance(value, float) else str(value)
            ax.annotate(text, (row[speedup], row[metric] * 100), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(1.0, color="0.4", ls="--", lw=1)
    scenario = speedup.removeprefix("speedup_")
    ax.set_xlabel(f"measured speedup over PyTorch fp32 ({scenario}), x")
    ax.set_ylabel(f"validation {metric.removeprefix('eval_')}, %")
    ax.grid(alpha=0.3)
    return _finish(fig, save)


# -- kernels: block shape x sparsity ----------------------------------------------------------------------


def kernel_records(paths):
    """A DataFrame of the records of ``sparsify bench kernels --json`` files (one path or a list): the
    ``records`` of each file, each row with the file's ``cpu_model`` and ``threads`` (older files, a bare list of
    records, have neither)."""
    import pandas as pd

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    records = []
    for p in paths:
        doc = json.loads(Path(p).read_text())
        if isinstance(doc, list):
            records += doc
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
            raise SparsifyError(f"{p}: not a 'sparsify bench kernels --json' file (no list of records)")
        machine = {"cpu_model": doc.get("cpu", {}).get("model_name"), "threads": doc.get("threads")}
        records += [{**machine, **r} for r in doc["records"]]
    return pd.DataFrame(records)


def bench_kernel_grid(blocks: Sequence[str], sparsities: Sequence[float], *, shapes: Sequence[tuple[int, int]],
                      tokens: Sequence[int], methods: Sequence[str] = ("ours_fp32",), out_dir: str | Path,
                      rounds: int | None = None, min_time: float | None = None, threads: int | None = None,
                      reuse: bool = True):
    """Run the kernel benchmark (``sparsify bench kernels``) once per block shape over ``sparsities`` x
    ``shapes`` (``(out_features, in_features)``) x ``tokens``, each writing ``out_dir/kernels-BLOCK.json``; a file
    that exists already is reused when ``reuse``. torch dense is always measured (the speedup baseline).
    Returns the records as a DataFrame (:func:`kernel_records`)."""
    from sparsify.kernels.bench import main as bench_kernels

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for block in blocks:
        path = out_dir / f"kernels-{block}.json"
        if not (reuse and path.is_file()):
            argv = ["--block", block, "--json", str(path),
                    "--shapes", ",".join(f"{o}x{i}" for o, i in shapes), "--tokens", ",".join(map(str, tokens)),
                    "--sparsities", ",".join(map(str, sparsities)), "--methods", ",".join(methods)]
            for flag, value in (("--rounds", rounds), ("--min-time", min_time), ("--threads", threads)):
                if value is not None:
                    argv += [flag, str(value)]
            status = bench_kernels(argv)
            if status != 0 or not path.is_file():
                raise SparsifyError(f"the kernel benchmark failed for block {block} (out x in), exit status {status}; "
                                    "its error is printed above")
        paths.append(path)
    return kernel_records(paths)


def _select(records, method: str, out_features: int | None, in_features: int | None, tokens: int | None):
    """The records of ``method``, optionally of one weight shape dimension and token count."""
    data = records[records["method"] == method]
    for column, want in (("out_features", out_features), ("in_features", in_features), ("tokens", tokens)):
        if want is not None:
            data = data[data[column] == want]
    if data.empty:
        raise SparsifyError(f"no {method!r} records left after the filters (methods: "
                            f"{', '.join(sorted(records['method'].unique()))})")
    return data


def block_table(records, *, value: str = "speedup_vs_torch_dense", method: str = "ours_fp32",
                out_features: int | None = None, in_features: int | None = None, tokens: int | None = None):
    """Block shape (rows) x sparsity (columns) table of ``value`` for ``method``, the median over the shapes and
    token counts left after the optional filters. Blocks are ordered by their area, then rows."""
    _require(records, ["block", "sparsity", "method", value], "block_table")
    data = _select(records, method, out_features, in_features, tokens)
    table = data.pivot_table(index="block", columns="sparsity", values=value, aggfunc="median")

    def order(b: str):
        r, c = (int(x) for x in b.split("x"))
        return (r * c, r, c)

    return table.loc[sorted(table.index, key=order)]


def plot_block_heatmap(records, *, value: str = "speedup_vs_torch_dense", method: str = "ours_fp32",
                       out_features: int | None = None, in_features: int | None = None, tokens: int | None = None,
                       ax=None, save: str | Path | None = None):
    """Heatmap of :func:`block_table`: block shape (out x in) against sparsity, each cell annotated with its value
    (``speedup_vs_torch_dense`` or ``median_ms``). Returns the Figure."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    table = block_table(records, value=value, method=method, out_features=out_features, in_features=in_features,
                        tokens=tokens)
    data = _select(records, method, out_features, in_features, tokens)
    shapes = sorted({(int(o), int(i)) for o, i in zip(data["out_features"], data["in_features"])})
    token_counts = sorted({int(t) for t in data["tokens"]})
    fig, ax = _figure(ax, figsize=(1.2 * len(table.columns) + 2.5, 0.5 * len(table.index) + 1.8))
    values = table.to_numpy(dtype=float)
    norm = None
    if value.startswith("speedup") and np.nanmin(values) < 1.0 < np.nanmax(values):
        norm = TwoSlopeNorm(vcenter=1.0)  # slower than torch dense: red; faster: green
    image = ax.imshow(values, cmap="RdYlGn" if value.startswith("speedup") else "viridis_r", norm=norm, aspect="auto")
    ax.set_xticks(range(len(table.columns)), [f"{s:.0%}" for s in table.columns])
    ax.set_yticks(range(len(table.index)), list(table.index))
    ax.set_xlabel("sparsity")
    ax.set_ylabel("block (out x in)")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8)
    unit = "x over torch dense fp32" if value.startswith("speedup") else "ms"
    where = ", ".join(f"{o}x{i}" for o, i in shapes) + f"; tokens {', '.join(map(str, token_counts))}"
    median = " (median)" if len(shapes) * len(token_counts) > 1 else ""
    ax.set_title(f"{method} {value} [{unit}]{median}\nshapes (out x in) {where}", fontsize=9)
    fig.colorbar(image, ax=ax)
    return _finish(fig, save)


# -- length-adaptive: Pareto frontier ----------------------------------------------------------------------


def load_frontier(path: str | Path) -> dict:
    """The document written by ``sparsify search``: a run directory (its ``search/frontier.json``) or the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "search" / "frontier.json"
    if not path.is_file():
        raise SparsifyError(f"{path}: no frontier; run 'sparsify search RUN_DIR --budget 0.5' first")
    return json.loads(path.read_text())


def plot_pareto(frontiers, *, labels: Sequence[str] | None = None, evaluated: bool = True, ax=None,
                save: str | Path | None = None):
    """Length-adaptive Pareto curves: validation metric against the search's cost per example (its ``cost``:
    FLOPs, or measured latency, as a fraction of the full-length model's) for each ``sparsify search`` result (a
    run directory, a frontier.json, a loaded document, or a list of them): the frontier as a line, every evaluated
    configuration in grey, the chosen one as a star and the budget as a dashed line. Returns the Figure."""
    if isinstance(frontiers, (str, Path, dict)):
        frontiers = [frontiers]
    docs = [f if isinstance(f, dict) else load_frontier(f) for f in frontiers]
    labels = list(labels) if labels is not None else [
        (Path(f).name if not isinstance(f, dict) else f"search {i}") for i, f in enumerate(frontiers)]
    costs = {d.get("cost", "flops") for d in docs}
    if len(costs) > 1:
        raise SparsifyError(f"plot_pareto: the searches used different costs ({', '.join(sorted(costs))}); plot them apart")
    cost = costs.pop()
    x = f"{cost}_fraction"
    fig, ax = _figure(ax)
    metrics = {d["metric"] for d in docs}
    for doc, label in zip(docs, labels):
        metric = doc["metric"]
        if evaluated:
            ax.scatter([c[x] for c in doc["evaluated"]], [c[metric] * 100 for c in doc["evaluated"]],
                       s=10, color="0.75", zorder=1)
        line, = ax.plot([c[x] for c in doc["frontier"]], [c[metric] * 100 for c in doc["frontier"]],
                        "o-", ms=4, label=f"{label} frontier", zorder=2)
        chosen = doc["chosen"]
        ax.plot([chosen[x]], [chosen[metric] * 100], "*", ms=13, color=line.get_color(), markeredgecolor="k",
                zorder=3, label=f"{label} chosen ({chosen[metric]:.2%} at {chosen[x]:.0%})")
        ax.axvline(doc["budget"], color=line.get_color(), ls="--", lw=1)
    ax.set_xlabel("FLOPs per example / full-length FLOPs (FLOPs = 2 x MACs)" if cost == "flops"
                  else f"{cost} per example / full-length {cost} (measured)")
    ax.set_ylabel(f"validation {'/'.join(sorted(metrics))}, %")
    ax.set_title("length configurations (dashed: budget; grey: evaluated)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _finish(fig, save)


def plot_evals(run_dir: str | Path, metric: str = "accuracy", ax=None):
    """The evaluation curve of a run (metric against optimizer step); returns the matplotlib Axes."""
    import matplotlib.pyplot as plt

    evals = json.loads((Path(run_dir) / "metrics.json").read_text())["evals"]
    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    ax.plot([e["step"] for e in evals], [e[metric] for e in evals], marker="o", label=Path(run_dir).name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"validation {metric}")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax
