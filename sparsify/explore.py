"""Helpers for notebooks: read run directories into tables and plot them (pandas and matplotlib, imported lazily)."""

from __future__ import annotations

import json
from pathlib import Path


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
    return row


def runs_table(run_dirs):
    """A pandas DataFrame with one :func:`run_summary` row per run directory."""
    import pandas as pd

    return pd.DataFrame([run_summary(r) for r in run_dirs])


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
