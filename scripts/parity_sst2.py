"""Parity of an exported artifact with the trained model on SST-2 validation (a measurement, not a test).

    python scripts/parity_sst2.py RUN_OR_MODEL_DIR ARTIFACT [--max-length 64] [--length-config default]

The reference is the trained model in PyTorch; when the model directory holds a quantization conversion
(quantization.json), the reference runs that conversion (int8 or int4 weights, the frozen activation quantization
of Linear inputs, residual sums and LayerNorm outputs, and the word embeddings as int8 / int4 / 2-bit rows when the
run trained them so: what the fake-quant model computes). When the artifact stores rounded word embeddings that the
run did not train (``export --embeddings int8|int4|int2``), a second reference gets the artifact's word embeddings
(the rows as the runtime decodes them): it isolates the runtime from the embedding rounding, and the first one
measures that rounding's effect. Prints, per reference, the agreement of the predicted labels, the largest,
99th-percentile and mean logit differences, both accuracies and each sentence whose label differs (with both
logit margins), as JSON.
The runtime runs at full length (the reference's computation) unless ``--length-config default`` asks for the
artifact's length configuration (then the agreement measures token dropping, not the runtime).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="run directory or model directory (Hugging Face format)")
    parser.add_argument("artifact", help="the directory written by 'sparsify export'")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--length-config", choices=("none", "default"), default="none",
                        help="runtime length configuration: none (full length, default) or the artifact's")
    args = parser.parse_args(argv)

    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sparsify.modeling import resolve_model_path
    from sparsify.runtime import SparseModel
    from sparsify.techniques.quantization.convert import (load_run_conversion, trained_embedding_bits,
                                                          trained_embeddings)

    model_dir = resolve_model_path(args.model)
    data = load_dataset("nyu-mll/glue", "sst2", split="validation")
    texts, labels = list(data["sentence"]), np.array(data["label"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    quantized = Path(model_dir, "quantization.json").is_file()
    trained_rows = trained_embeddings(model_dir) if quantized else None
    if quantized:
        load_run_conversion(model, model_dir)

    def reference() -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), args.batch_size):
                enc = tokenizer(texts[i:i + args.batch_size], truncation=True, max_length=args.max_length,
                                padding=True, return_tensors="pt")
                out.append(model(**enc).logits.float().numpy())
        return np.concatenate(out)

    runtime = SparseModel.from_pretrained(args.artifact, length_config=None if args.length_config == "none"
                                          else "default")
    ours = runtime.logits(texts, batch_size=args.batch_size, max_length=args.max_length)

    def compare(ref: np.ndarray, embeddings: str) -> dict:
        diff = np.abs(ref - ours)
        return {
            "reference": ("int8 conversion in PyTorch" if quantized else "PyTorch fp32") + f", {embeddings}",
            "label_agreement": float((ref.argmax(1) == ours.argmax(1)).mean()),
            "max_abs_logit_diff": float(diff.max()),
            "p99_abs_logit_diff": float(np.quantile(diff.max(1), 0.99)),
            "median_abs_logit_diff": float(np.median(diff.max(1))),
            "mean_abs_logit_diff": float(diff.mean()),
            "reference_accuracy": float((ref.argmax(1) == labels).mean()),
            # each sentence whose label differs, with both margins (top logit minus the runner-up): a flip within
            # the logit differences above is a sentence on the decision boundary
            "disagreements": [{"index": int(i), "reference_margin": float(_margin(ref[i])),
                               "runtime_margin": float(_margin(ours[i]))}
                              for i in np.flatnonzero(ref.argmax(1) != ours.argmax(1))],
        }

    results = [compare(reference(), f"the word embeddings as trained (int{trained_embedding_bits(model_dir)} rows)"
                       if trained_rows else "the model's float32 word embeddings")]
    if runtime.word_scales is not None and not trained_rows:  # rows rounded by the export, not by training
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(torch.from_numpy(runtime.word_table()))
        results.append(compare(reference(), f"the artifact's int{runtime.word_bits} word embeddings"))
    out = {"examples": len(texts), "runtime_length_config": runtime.length_config,
           "runtime_accuracy": float((ours.argmax(1) == labels).mean()),
           "references": results}
    print(json.dumps(out, indent=1))
    return 0


def _margin(logits: np.ndarray) -> float:
    top = np.sort(logits)
    return top[-1] - top[-2]


if __name__ == "__main__":
    sys.exit(main())
