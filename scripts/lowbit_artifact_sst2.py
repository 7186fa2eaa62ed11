"""Artifacts of one SST-2 model with int8, int4 and 2-bit word-embedding rows: size by part, runtime accuracy on
SST-2 validation and runtime speed (a measurement, not a test).

    python scripts/lowbit_artifact_sst2.py RUN_OR_MODEL_DIR [-o docs/measurements/lowbit-artifact-sst2.json]
        [--quantize int8-ptq|none] [--repeats 5] [--threads 1]

``--quantize int8-ptq`` (default) first calibrates the model's encoder Linear layers to int8 (PTQ on 8 batches of
32 shuffled training sentences, per-tensor uint8 inputs: the shipped minilm-l6-int8-ptq recipe's Linear inputs)
so that the artifacts are quantized ones; ``none`` exports the float Linear layers. Then one artifact per
``--embeddings int8 | int4 | int2`` (rows rounded after training: post-training rounding, not QAT). For each:
the export's size by part, the runtime's accuracy on the 872 validation sentences (full length, ``--max-length``),
and the runtime's time for the whole split at batch 32, the artifacts timed in turn ``--repeats`` times (median
and all times). Record: command, date, threads, CPU model and flags.

``--artifacts A B ...`` measures exported artifacts instead (e.g. QAT runs with int8 / int4 / 2-bit rows, exported
with ``sparsify export``), the first one the reference of the speed ratios; no PTQ, no export. Sizes by part come
from each artifact's manifest, as ``sparsify export`` reports them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sparsify.machine import cpu_info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="run directory or model directory (Hugging Face format)")
    parser.add_argument("--artifacts", nargs="+", default=None,
                        help="exported artifacts to measure instead of a model (the first is the speed reference)")
    parser.add_argument("-o", "--output", default=None)
    parser.add_argument("--quantize", choices=("int8-ptq", "none"), default="int8-ptq")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", default=None, help="directory to keep the artifacts in (default: a temporary one)")
    args = parser.parse_args(argv)
    if (args.model is None) == (args.artifacts is None):
        parser.error("give a model, or --artifacts (not both)")

    import torch

    torch.set_num_threads(args.threads)
    from datasets import load_dataset

    from sparsify.modeling import resolve_model_path
    from sparsify.runtime import SparseModel

    dev = load_dataset("nyu-mll/glue", "sst2", split="validation")
    texts, labels = list(dev["sentence"]), np.array(dev["label"])
    root = None
    try:
        if args.artifacts:
            dirs = {Path(a).name: Path(a) for a in args.artifacts}
            sizes = {name: _manifest_size(d) for name, d in dirs.items()}
        else:
            root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lowbit-artifacts-"))
            dirs, sizes = _ptq_artifacts(args, root)
        results, models = {}, {}
        for name, d in dirs.items():
            sm = SparseModel.from_pretrained(d, threads=args.threads, length_config=None)
            logits = sm.logits(texts, batch_size=32, max_length=args.max_length)
            models[name] = sm
            results[name] = {**sizes[name], "word_bits": int(sm.word_bits or 32),
                             "accuracy": float((logits.argmax(1) == labels).mean()), "seconds": []}
            print(f"{name}: {sizes[name]['artifact_bytes'] / 1e6:.2f} MB, accuracy "
                  f"{100 * results[name]['accuracy']:.2f}", flush=True)
        _time_in_turn(models, results, texts, args)
    finally:
        if root is not None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    record = {
        "what": "artifacts with int8 / int4 / 2-bit word-embedding rows ("
                + ("as exported" if args.artifacts else "post-training rounding")
                + "): size by part, runtime accuracy and speed on SST-2 validation",
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": str(resolve_model_path(args.model)) if args.model else None,
        "artifacts": args.artifacts,
        "linear_layers": "as exported" if args.artifacts else args.quantize,
        "examples": len(texts),
        "max_length": args.max_length,
        "batch_size": 32,
        "threads": args.threads,
        "cpu": cpu_info(),
        "results": results,
    }
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(record, indent=1))
        print(f"wrote {args.output}")
    return 0


def _manifest_size(artifact: Path) -> dict:
    """An exported artifact's size (its files) and size by part, as ``sparsify export`` reports them."""
    from sparsify.explore import artifact_summary
    from sparsify.export import size_by_part

    total = artifact_summary(artifact)["artifact_bytes"]
    manifest = json.loads((artifact / "sparsify.json").read_text())
    return {"artifact_bytes": total, "size_by_part": size_by_part(manifest, total)}


def _ptq_artifacts(args, root: Path) -> tuple[dict, dict]:
    """int8 PTQ of the model's encoder Linear layers (``--quantize int8-ptq``), then one artifact per word-row
    format: ``({format: directory}, {format: sizes})``."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sparsify.export import export
    from sparsify.modeling import resolve_model_path
    from sparsify.techniques.quantization import QuantizationConfig, calibrate, convert_activations

    model_dir = resolve_model_path(args.model)
    quantized = activations = None
    if args.quantize == "int8-ptq":
        train = load_dataset("nyu-mll/glue", "sst2", split="train").shuffle(seed=0)
        tok = AutoTokenizer.from_pretrained(model_dir)
        calib_texts = list(train.select(range(256))["sentence"])
        calib = [dict(tok(calib_texts[i:i + 32], truncation=True, max_length=args.max_length, padding=True,
                          return_tensors="pt")) for i in range(0, 256, 32)]
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
        q = calibrate(model, calib, QuantizationConfig(mode="ptq", calibration_batches=8, embeddings=False))
        quantized, activations = q.convert(), convert_activations(q)
    dirs, sizes = {}, {}
    for emb in ("int8", "int4", "int2"):
        summary = export(model_dir, root / emb, quantized=quantized, activations=activations, embeddings=emb,
                         overwrite=True)
        dirs[emb] = root / emb
        sizes[emb] = {"artifact_bytes": summary["artifact_bytes"], "size_by_part": summary["size_by_part"]}
    return dirs, sizes


def _time_in_turn(models: dict, results: dict, texts: list[str], args) -> None:
    """Whole passes over ``texts``, the models in turn ``args.repeats`` times (a slower period of the machine hits
    all of them), and the decoding of low-bit word rows timed alone; speed ratios against the first model."""
    from sparsify.runtime import ops

    for _ in range(args.repeats):
        for name, sm in models.items():
            t0 = time.perf_counter()
            sm.logits(texts, batch_size=32, max_length=args.max_length)
            results[name]["seconds"].append(round(time.perf_counter() - t0, 3))
    # the only extra work of low-bit rows: decoding the looked-up rows. Timed alone (best of 20) for every token
    # of the split, against the best whole pass: a bound that the noise of a shared machine cannot blur
    first = next(iter(models))
    ids = np.concatenate([np.asarray(e.ids, np.int64) for e in models[first]._tokenize(texts, args.max_length)])
    for name, sm in models.items():
        if sm.word_bits not in (4, 2):
            continue
        best = float("inf")
        for _ in range(20):
            t0 = time.perf_counter()
            ops.decode_rows(ids, sm.word, sm.word_bits, sm.word_scales, sm.word_offsets, sm.word_width)
            best = min(best, time.perf_counter() - t0)
        results[name]["decode_seconds_best"] = round(best, 5)
        results[name]["decode_fraction_of_best_pass"] = round(best / min(results[name]["seconds"]), 5)
        results[name]["tokens_decoded"] = int(ids.size)
    for name, r in results.items():
        r["median_seconds"] = statistics.median(r["seconds"])
        r["min_seconds"] = min(r["seconds"])
        r["speed_vs_reference"] = round(results[first]["median_seconds"] / r["median_seconds"], 4)
        r["per_round_speed_vs_reference"] = [round(a / b, 4) for a, b in zip(results[first]["seconds"], r["seconds"])]
        print(f"{name}: median {r['median_seconds']:.2f} s for {len(texts)} sentences "
              f"({r['speed_vs_reference']:.3f}x {first}'s speed)"
              + (f"; decoding the rows of its {r['tokens_decoded']} tokens: {1000 * r['decode_seconds_best']:.2f} ms"
                 f" ({100 * r['decode_fraction_of_best_pass']:.3f}% of its best pass)"
                 if "decode_seconds_best" in r else ""), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
