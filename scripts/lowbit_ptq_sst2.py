"""Post-training low-bit measurements on SST-2 validation (872 sentences): FP8 formats, W4 round-to-nearest
(per channel, group-wise), SignRound W4, and word-embedding rows at 8 / 4 / 2 bits. A measurement, not a test.

    python scripts/lowbit_ptq_sst2.py RUN_OR_MODEL_DIR [-o docs/measurements/lowbit-ptq-sst2.json]
        [--only fp8,w4,signround,teq,embeddings] [--calibration-batches 8] [--signround-iters 200] [--threads 1]

No training: each configuration starts from the float model, calibrates (PTQ) on the first
``--calibration-batches`` batches of 32 shuffled training sentences (seed 0) and evaluates the fake-quant model
(what the quantizer computes) on the validation split at ``--max-length`` tokens. Configurations:

- ``float``: the model as it is;
- ``fp8-<fmt>-<tensor|channel>``: FP8 weights and FP8 Linear inputs (the same format), a scale per tensor or per
  channel (output channel of a weight, feature of an activation); word embeddings float32. Everything else (the
  attention products, softmax, LayerNorm, GELU, residual sums, embeddings, the head) stays float32;
- ``w4-rtn-channel``, ``w4-rtn-g<size>-<sym|asym>``: weight-only int4 (Linear inputs float32, embeddings
  float32), one scale per output channel or per group of input features;
- ``w4-signround``: weight-only int4 per channel with SignRound's rounding (``--signround-iters`` per layer);
- ``w4-teq``, ``w4-teq-signround`` (``--only teq``): TEQ scales folded into the value -> attention output pairs
  first (300 Adam steps per layer), then round to nearest or SignRound;
- ``w8-rtn-channel``: weight-only int8 per channel, for reference;
- ``emb-int8`` / ``emb-int4`` / ``emb-int2``: only the word-embedding rows rounded (PTQ: no QAT), the rest float.

Writes a JSON record: per configuration the accuracy, its difference from float, seconds, and (SignRound) the
per-layer output errors; plus the command, date, torch version and the CPU's model name and flags.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sparsify.machine import cpu_info


def _configs(only: set[str], iters: int, calib: int) -> dict[str, dict | None]:
    from sparsify.techniques.quantization import QuantizationConfig

    base = {"mode": "ptq", "calibration_batches": calib, "embeddings": False}
    weight_only = {**base, "activations": {"linear_inputs": False}}
    out: dict[str, dict | None] = {"float": None}
    if "fp8" in only:
        for fmt in ("e4m3", "e5m2", "e3m4"):
            for gran in ("tensor", "channel"):
                out[f"fp8-{fmt}-{gran}"] = {**base, "weight_format": fmt, "activation_format": fmt,
                                            "fp8_granularity": gran}
    if "w4" in only:
        out["w8-rtn-channel"] = {**weight_only}
        out["w4-rtn-channel"] = {**weight_only, "weight_bits": 4}
        for size in (32, 64, 128):
            for scheme in ("symmetric", "asymmetric"):
                out[f"w4-rtn-g{size}-{scheme[:3] if scheme == 'symmetric' else 'asym'}"] = {
                    **weight_only, "weight_bits": 4, "weight_group_size": size, "weight_scheme": scheme}
    if "signround" in only:
        out["w4-signround"] = {**weight_only, "weight_bits": 4, "rounding": "signround", "signround_iters": iters}
    if "teq" in only:
        out["w4-rtn-channel"] = {**weight_only, "weight_bits": 4}
        out["w4-teq"] = {**weight_only, "weight_bits": 4, "teq": True}
        out["w4-teq-signround"] = {**weight_only, "weight_bits": 4, "teq": True, "rounding": "signround",
                                   "signround_iters": iters}
    for cfg in out.values():
        if cfg is not None:
            QuantizationConfig(**cfg)  # fail early on a bad configuration
    if "embeddings" in only:
        for bits in (8, 4, 2):
            out[f"emb-int{bits}"] = {"embedding_rows": bits}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="run directory or model directory (Hugging Face format)")
    parser.add_argument("-o", "--output", default=None, help="JSON record (default: print only)")
    parser.add_argument("--only", default="fp8,w4,signround,embeddings")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--signround-iters", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N sentences only (smoke)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sparsify.modeling import resolve_model_path
    from sparsify.techniques.quantization import QuantizationConfig, calibrate
    from sparsify.techniques.quantization.lowbit import rounded_rows

    model_dir = resolve_model_path(args.model)
    dev = load_dataset("nyu-mll/glue", "sst2", split="validation")
    train = load_dataset("nyu-mll/glue", "sst2", split="train").shuffle(seed=0)
    texts, labels = list(dev["sentence"]), np.array(dev["label"])
    if args.limit:
        texts, labels = texts[:args.limit], labels[:args.limit]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    float_model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()

    def encode(batch_texts):
        return dict(tokenizer(batch_texts, truncation=True, max_length=args.max_length, padding=True,
                              return_tensors="pt"))

    calib_texts = list(train.select(range(32 * args.calibration_batches))["sentence"])
    calib = [encode(calib_texts[i:i + 32]) for i in range(0, len(calib_texts), 32)]
    dev_batches = [encode(texts[i:i + args.batch_size]) for i in range(0, len(texts), args.batch_size)]

    def accuracy(model) -> float:
        preds = []
        with torch.no_grad():
            for enc in dev_batches:
                preds.append(model(**enc).logits.argmax(-1).numpy())
        return float((np.concatenate(preds) == labels).mean())

    only = set(args.only.split(","))
    results = {}
    for name, cfg in _configs(only, args.signround_iters, args.calibration_batches).items():
        model = copy.deepcopy(float_model)
        t0 = time.perf_counter()
        entry: dict = {"config": cfg}
        if cfg is not None and "embedding_rows" in cfg:
            table = model.get_input_embeddings().weight
            with torch.no_grad():
                table.copy_(rounded_rows(table.detach(), cfg["embedding_rows"]))
        elif cfg is not None:
            quantizer = calibrate(model, calib, QuantizationConfig(**cfg))
            if quantizer.signround_stats is not None:
                entry["signround"] = quantizer.signround_stats
            if quantizer.teq_stats is not None:
                entry["teq"] = quantizer.teq_stats
        t1 = time.perf_counter()
        entry["accuracy"] = accuracy(model)
        entry["prepare_seconds"] = round(t1 - t0, 2)
        entry["eval_seconds"] = round(time.perf_counter() - t1, 2)
        results[name] = entry
        print(f"{name:24s} accuracy {100 * entry['accuracy']:.2f}  (prepare {entry['prepare_seconds']:.1f} s, "
              f"eval {entry['eval_seconds']:.1f} s)", flush=True)
    ref = results["float"]["accuracy"]
    for entry in results.values():
        entry["delta_points"] = round(100 * (entry["accuracy"] - ref), 2)
    record = {
        "what": "post-training low-bit configurations of a SST-2 model, fake-quant accuracy on validation",
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": str(model_dir),
        "examples": len(texts),
        "max_length": args.max_length,
        "calibration": f"{args.calibration_batches} batches of 32 training sentences (shuffled, seed 0)",
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu": cpu_info(),
        "results": results,
    }
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(record, indent=1))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
