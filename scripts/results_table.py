"""The results table of docs/results.md from finished runs: accuracy, measured sparsity, artifact size, and the
speed of the CPU runtime against PyTorch fp32 and DeepSparse measured in one interleaved run per model.

    python scripts/results_table.py RUN [RUN ...] [--threads 2] [--rounds 7] [--json OUT.json]

For each run directory (or model directory) it exports ``RUN/artifact`` (``sparsify export``, default options)
and benchmarks it into ``RUN/bench.json`` (``sparsify bench model``, methods: our runtime with its length
configuration, the same without token dropping when there is one, PyTorch fp32 on the dense-equivalent weights,
DeepSparse 1.8 on the same sparse weights in ONNX when installed), skipping either step when its file exists
(``--rebench`` measures again).
A directory without ``metrics.json`` is evaluated on its task's validation split (``sparsify eval``). Prints a
markdown table built with :func:`sparsify.explore.collect_runs` columns; ``--json`` saves the rows; ``--plot PNG``
draws accuracy against the measured speedup (:func:`sparsify.explore.plot_accuracy_vs_speedup`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = ("latency_b1_s128", "throughput_b32_sst2", "throughput_b32_s128")
METHODS = ("sparsify", "sparsify_full", "torch_fp32", "deepsparse")


def row_for(run: Path, *, threads: int, rounds: int, task: str, log, rebench: bool = False) -> dict:
    import yaml

    from sparsify.bench_model import run_benchmark
    from sparsify.evaluation import evaluate_model_dir
    from sparsify.explore import artifact_summary, bench_summary, run_summary
    from sparsify.export import export

    if (run / "metrics.json").is_file():
        row = run_summary(run)
    else:
        recipe = yaml.safe_load((run / "recipe.yaml").read_text()) if (run / "recipe.yaml").is_file() else {}
        max_length = (recipe.get("data") or {}).get("max_length", 128)
        log(f"{run}: no metrics.json, evaluating on {task} validation (max length {max_length})")
        metrics = evaluate_model_dir(str(run), task=task, max_length=max_length)
        row = {"run": run.name, **{f"eval_{k}": v for k, v in metrics.items() if isinstance(v, float)}}
    artifact = run / "artifact"
    if not (artifact / "sparsify.json").is_file():
        summary = export(run, artifact, overwrite=True)
        log(f"{run}: exported, {summary['artifact_bytes'] / 1e6:.1f} MB ({100 * summary['ratio']:.1f}% of dense fp32)"
            + "".join(f"; note: {n}" for n in summary["notes"]))
    manifest = json.loads((artifact / "sparsify.json").read_text())
    row.update(artifact_summary(artifact))
    row["embeddings"] = manifest["embeddings"]["word"].split(",")[0]
    if row.get("sparsity") is None:  # no sparsity.json: the encoder Linear layers' zeros, as stored in the artifact
        sizes = {n: m["shape"][0] * m["shape"][1] for n, m in manifest["layers"].items()}
        row["sparsity"] = sum(manifest["layers"][n]["sparsity"] * k for n, k in sizes.items()) / sum(sizes.values())
    row["length_config"] = (manifest.get("length_config") or {}).get("lengths")
    bench = run / "bench.json"
    if rebench or not bench.is_file():
        log(f"{run}: benchmarking ({threads} threads, {rounds} rounds)")
        result = run_benchmark(str(artifact), threads=threads, rounds=rounds, methods=METHODS, cold_start=False,
                               log=lambda s: None)
        bench.write_text(json.dumps(result, indent=1))
    row.update(bench_summary(bench))
    records = json.loads(bench.read_text())["records"]
    full = {r["scenario"]: r for r in records if r["method"] == "sparsify_full"}
    for s, r in full.items():  # the same artifact without token dropping
        row[f"speedup_full_length_{s}"] = r["speedup_vs_torch_fp32"]
    row["spread"] = {f"{r['scenario']}/{r['method']}": [r["min_ms"], r["median_ms"], r["max_ms"]] for r in records}
    return row


def markdown(rows: list[dict]) -> str:
    def x(v):
        return "" if v is None else f"{v:.2f}x"

    head = ("| run | accuracy | sparsity | artifact (% of dense fp32) | vs PyTorch fp32: b1 / b32 SST-2 / b32 s128 "
            "| vs DeepSparse: b1 / b32 SST-2 / b32 s128 |\n|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        acc, sparsity = r.get("eval_accuracy"), r.get("sparsity")
        size = f"{r['artifact_bytes'] / 1e6:.1f} MB ({100 * r['artifact_bytes'] / r['dense_fp32_bytes']:.1f}%)"
        cells = [r["run"], "" if acc is None else f"{100 * acc:.2f}%", "" if sparsity is None else f"{100 * sparsity:.2f}%",
                 size, " / ".join(x(r.get(f"speedup_{s}")) for s in COLUMNS),
                 " / ".join(x(r.get(f"speedup_vs_deepsparse_{s}")) for s in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (or model directories)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every method (default 2)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved benchmark rounds (default 7)")
    parser.add_argument("--task", default="sst2", help="task of directories without metrics.json (default sst2)")
    parser.add_argument("--rebench", action="store_true",
                        help="benchmark again even where RUN/bench.json exists (after a runtime change)")
    parser.add_argument("--json", dest="json_path", help="write the rows here")
    parser.add_argument("--plot", help="save accuracy vs speedup (batch 32, SST-2 lengths) to this PNG")
    args = parser.parse_args(argv)

    def log(s):
        print(s, file=sys.stderr, flush=True)

    rows = [row_for(Path(r), threads=args.threads, rounds=args.rounds, task=args.task, log=log, rebench=args.rebench)
            for r in args.runs]
    print(markdown(rows))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=1, default=str) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import pandas as pd

        from sparsify.explore import plot_accuracy_vs_speedup

        plot_accuracy_vs_speedup(pd.DataFrame(rows), speedup="speedup_throughput_b32_sst2", label="run", save=args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
