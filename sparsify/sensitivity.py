"""``sparsify sensitivity MODEL``: one-shot pruning scans, to choose what to train before training it.

    sparsify sensitivity runs/sst2/minilm-l6-dense --task sst2 --block 4x1 --sparsities 0.5,0.7,0.9 \
        --score l2,taylor,obs --scope layer,global --layer-types --json scan.json --plot scan.png

For every score x scope x sparsity, the model is pruned once (no training) with the same
:class:`~sparsify.techniques.pruning.BlockPruner` a recipe uses (``start_step = end_step = 0``), then evaluated
on the task's dev split. ``--layer-types`` adds a row per layer type (attention q/k/v, attention output,
intermediate, output), pruning that type alone, to show where the accuracy goes. Taylor and OBS scores read
``--calibration-samples`` training examples (a fixed random sample): gradients of the task loss for taylor,
the Linear inputs for OBS. Seconds are wall time of the pruning step (scores + OBS update), not the evaluation.

A sentence-embedding model (``--task embedding``, texts of ``--config``'s split, default sst2) is scored by the
mean cosine of the pruned model's embeddings to the dense model's (``teacher_cosine``); taylor needs a task loss
and does not apply there.

    sparsify sensitivity sentence-transformers/all-MiniLM-L6-v2 --task embedding --config sst2 --score l2,obs \
        --sparsities 0.5,0.7,0.8,0.9 --max-length 128
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from sparsify.errors import SparsifyError
from sparsify.machine import cpu_info

SCORES = ("l1", "l2", "taylor", "obs")
SCOPES = ("layer", "global")
LAYER_TYPES = {  # name -> regex over module names (BERT-family encoders)
    "attention_qkv": r"attention\.self\.(query|key|value)$",
    "attention_output": r"attention\.output\.dense$",
    "intermediate": r"intermediate\.dense$",
    "output": r"layer\.\d+\.output\.dense$",
}


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SparsifyError(f"--{name}: expected comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not 0.0 < v < 1.0]
    if not values or bad:
        raise SparsifyError(f"--{name}: every value must be in (0, 1), got {text!r}")
    return values


def _choices(text: str, name: str, allowed: tuple[str, ...]) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise SparsifyError(f"--{name}: unknown {', '.join(bad) or 'empty'} (choose from {', '.join(allowed)})")
    return values


def sensitivity(model_path: str, *, task: str = "sst2", dataset: str = "nyu-mll/glue", max_length: int = 64,
                block: str = "4x1", sparsities=(0.5, 0.7, 0.9), scores=("l2", "taylor", "obs"),
                scopes=("layer", "global"), layer_types: bool = False, calibration_samples: int = 256,
                damping: float = 0.01, max_sparsity: float = 0.98, batch_size: int = 64,
                max_eval_samples: int | None = None, seed: int = 0, progress: bool = True,
                train_file: str | None = None, validation_file: str | None = None, config: str | None = None) -> dict:
    """The scan as a dict: the dense metrics and one record per (score, scope or layer type, sparsity).
    ``task="embedding"``: a sentence-embedding model on the texts of ``config`` (default sst2), scored by the
    cosine to the dense model's embeddings."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from sparsify.data import collator, load_task_data
    from sparsify.evaluation import evaluate
    from sparsify.metrics import main_metric
    from sparsify.modeling import load_classifier, load_tokenizer
    from sparsify.recipe import EMBEDDING, DataConfig
    from sparsify.sentence import embed_batches, embedding_metrics, load_embedder
    from sparsify.techniques.pruning import BlockPruner, PruningConfig
    from sparsify.train import calibration_batches

    embedding = task == EMBEDDING
    if embedding and "taylor" in scores:
        raise SparsifyError("--score taylor: taylor scores need the gradient of a task loss, and an embedding model "
                            f"has none; use {', '.join(s for s in SCORES if s != 'taylor')}")
    tokenizer = load_tokenizer(model_path)
    source = ({"train_file": train_file, "validation_file": validation_file} if train_file is not None
              else {"dataset": dataset, "config": (config or "sst2") if embedding else task})
    cfg = DataConfig(**source, task=task, max_length=max_length, max_eval_samples=max_eval_samples)
    data = load_task_data(cfg, tokenizer)
    if embedding:
        dense = load_embedder(model_path).eval()
    else:
        dense = load_classifier(model_path, num_labels=data.num_labels, label_names=data.label_names,
                                is_regression=data.is_regression).eval()
    collate = collator(tokenizer, task)
    eval_dl = DataLoader(data.eval, batch_size=batch_size, collate_fn=collate)
    calibration = calibration_batches(data.train, collate, calibration_samples, 32, seed=seed)
    metric = main_metric(task)
    reference = None
    if embedding:
        with torch.no_grad():
            reference = embed_batches(dense, eval_dl)

    def evaluate_model(model) -> dict:
        if embedding:
            return embedding_metrics(model, eval_dl, reference)
        return evaluate(model, eval_dl, task, is_regression=data.is_regression)

    def run(score: str, scope: str, sparsity: float, include: tuple[str, ...] | None) -> dict:
        model = copy.deepcopy(dense)
        kw = {"include": include} if include is not None else {}
        if scope == "global":
            kw["max_sparsity"] = max(max_sparsity, sparsity)
        config = PruningConfig(block=block, final_sparsity=sparsity, start_step=0, end_step=0, score=score,
                               scope=scope, calibration_samples=calibration_samples, obs={"damping": damping}, **kw)
        pruner = BlockPruner(config)
        started = time.perf_counter()
        pruner.prepare(model, total_steps=1, calibration=calibration)
        seconds = time.perf_counter() - started
        report = pruner.finalize()
        with torch.no_grad():
            metrics = evaluate_model(model)
        return {"score": score, "scope": scope, "target": sparsity, "sparsity": report["total"]["sparsity"],
                "follows_block": report["total"]["follows_block"], "prune_seconds": round(seconds, 2),
                "per_layer": {n: round(v["sparsity"], 4) for n, v in report["layers"].items()}, **metrics}

    plan = [(score, scope, s, None) for score in scores for scope in scopes for s in sparsities]
    if layer_types:
        plan += [(score, name, s, (pattern,)) for name, pattern in LAYER_TYPES.items() for score in scores
                 for s in sparsities]
    records = []
    with torch.no_grad():
        base = evaluate_model(dense)
    bar = tqdm(plan, desc="sensitivity", unit="scan", disable=not progress)
    for score, scope, s, include in bar:
        bar.set_postfix_str(f"{score} {scope} {s:g}")
        rec = run(score, "layer" if include is not None else scope, s, include)
        if include is not None:
            rec["scope"], rec["layer_type"] = "layer", scope
        records.append(rec)
    return {"model": str(model_path), "task": task, **({"config": cfg.config} if embedding else {}), "metric": metric, "block": block, "orientation": "(out x in)",
            "calibration_samples": calibration_samples, "damping": damping, "eval_examples": len(data.eval),
            "dense": base, "records": records, "cpu": cpu_info()}


def format_table(result: dict) -> str:
    metric = result["metric"]
    dense = result["dense"][metric]
    lines = [f"one-shot pruning, {result['block']} {result['orientation']} blocks, no retraining; {metric} on "
             f"{result['eval_examples']} dev examples (dense: {dense:.4f})",
             f"{'score':8s} {'scope / layers':18s} {'target':>7s} {'measured':>9s} {metric:>9s} {'delta':>8s} {'s':>7s}"]
    for r in result["records"]:
        where = r.get("layer_type", r["scope"])
        lines.append(f"{r['score']:8s} {where:18s} {r['target']:7.2f} {r['sparsity']:9.4f} {r[metric]:9.4f} "
                     f"{r[metric] - dense:+8.4f} {r['prune_seconds']:7.1f}")
    return "\n".join(lines)


def plot(result: dict, path: str | Path):
    """Accuracy against sparsity, a line per score x scope (the layer-type rows are left to the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result["metric"]
    fig, ax = plt.subplots(figsize=(6, 4))
    lines: dict[tuple, list] = {}
    for r in result["records"]:
        if "layer_type" not in r:
            lines.setdefault((r["score"], r["scope"]), []).append((r["sparsity"], r[metric]))
    for (score, scope), pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{score}, {scope}")
    ax.axhline(result["dense"][metric], color="grey", linestyle="--", label="dense")
    ax.set_xlabel(f"sparsity of the pruned layers ({result['block']} blocks, out x in)")
    ax.set_ylabel(f"dev {metric}, one-shot (no retraining)")
    ax.set_title(Path(str(result["model"])).name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsify sensitivity", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("model", help="model directory, run directory (uses RUN/model) or hub id")
    parser.add_argument("--task", default="sst2", help="GLUE task whose dev split scores each scan (default sst2), "
                        "or 'embedding': a sentence-embedding model scored by the cosine to the dense model's "
                        "embeddings")
    parser.add_argument("--config", default=None, help="with --task embedding: the dataset config whose texts it "
                        "embeds (default sst2)")
    parser.add_argument("--dataset", default="nyu-mll/glue", help="dataset hub id or directory (default nyu-mll/glue)")
    parser.add_argument("--train-file", help="instead of --dataset: a local csv/tsv/json/jsonl/parquet file (calibration)")
    parser.add_argument("--validation-file", help="with --train-file: the file to evaluate on")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example (default 64)")
    parser.add_argument("--block", default="4x1", help="block shape, rows x cols of the stored weight (out x in)")
    parser.add_argument("--sparsities", default="0.5,0.7,0.9", help="comma-separated targets in (0, 1)")
    parser.add_argument("--score", default="l2,taylor,obs", help=f"comma-separated subset of {','.join(SCORES)}")
    parser.add_argument("--scope", default="layer,global", help="comma-separated subset of layer,global")
    parser.add_argument("--layer-types", action="store_true",
                        help="also prune each layer type alone (attention q/k/v, attention output, intermediate, "
                             "output)")
    parser.add_argument("--calibration-samples", type=int, default=256,
                        help="training examples for taylor gradients and OBS Hessians (default 256)")
    parser.add_argument("--damping", type=float, default=0.01, help="OBS damping, a fraction of mean(diag H)")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="evaluate on the first N dev examples")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", dest="json_path", help="write the scan to this JSON file")
    parser.add_argument("--plot", dest="plot_path", help="save accuracy against sparsity to this image (matplotlib)")
    args = parser.parse_args(argv)
    try:
        sparsities = _floats(args.sparsities, "sparsities")
        scores = _choices(args.score, "score", SCORES)
        scopes = _choices(args.scope, "scope", SCOPES)
        if args.config is not None and args.task != "embedding":
            raise SparsifyError(f"--config names the texts of --task embedding; --task {args.task} is its own config")
        if (args.train_file is None) != (args.validation_file is None):
            raise SparsifyError("--train-file and --validation-file go together")
        if args.calibration_samples < 1:
            raise SparsifyError(f"--calibration-samples must be >= 1, got {args.calibration_samples}")
        if not 0.0 < args.damping <= 1.0:
            raise SparsifyError(f"--damping must be in (0, 1], got {args.damping}")
        if args.threads is not None:
            if args.threads < 1:
                raise SparsifyError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        from sparsify.techniques.pruning.config import parse_block

        try:
            parse_block(args.block)
        except ValueError as e:
            raise SparsifyError(f"--block: {e}") from None
        model = args.model
        if (Path(model) / "model" / "config.json").is_file():
            model = str(Path(model) / "model")
        result = sensitivity(model, task=args.task, dataset=args.dataset, max_length=args.max_length,
                             block=args.block, sparsities=sparsities, scores=scores, scopes=scopes,
                             layer_types=args.layer_types, calibration_samples=args.calibration_samples,
                             damping=args.damping, max_eval_samples=args.max_eval_samples,
                             train_file=args.train_file, validation_file=args.validation_file, config=args.config)
    except SparsifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=1))
    if args.plot_path:
        plot(result, args.plot_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
