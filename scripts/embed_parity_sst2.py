"""Cosine of the runtime's sentence embeddings to sentence-transformers on every SST-2 validation sentence (a
measurement, not a test).

    python scripts/embed_parity_sst2.py [MODEL] [--artifact DIR] [--threads 1] [--out docs/measurements/X.json]

MODEL (default ``sentence-transformers/all-MiniLM-L6-v2``: a hub id from the cache, or a local sentence-transformers
directory) is exported dense to a temporary artifact unless ``--artifact`` names one already exported from it; both
sides embed the 872 sentences with the model's own settings (its pooling, normalisation and max_seq_length). Prints
and writes as JSON the min / mean / percentiles of the cosine, the largest element difference, the counts under
0.9999, and the timing of each side (one process, the same thread count for numba and torch).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--artifact", help="an artifact already exported from MODEL (default: export one now)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", help="write the result JSON here too")
    args = parser.parse_args(argv)

    import torch
    from datasets import load_dataset
    from sentence_transformers import SentenceTransformer

    from sparsify.export import _resolve, export
    from sparsify.runtime import SparseModel

    torch.set_num_threads(args.threads)
    texts = list(load_dataset("nyu-mll/glue", "sst2", split="validation")["sentence"])
    model_dir, _ = _resolve(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(args.artifact) if args.artifact else Path(tmp) / "artifact"
        if not args.artifact:
            export(model_dir, artifact)
        rt = SparseModel.from_pretrained(artifact, threads=args.threads)
        rt.embed(texts[:4])  # compile outside the timing
        t0 = time.perf_counter()
        got = rt.embed(texts, batch_size=args.batch_size)
        t_rt = time.perf_counter() - t0
    st = SentenceTransformer(str(model_dir), device="cpu")
    t0 = time.perf_counter()
    ref = st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
    t_st = time.perf_counter() - t0
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    result = {
        "what": "cosine(runtime embedding, sentence-transformers embedding), dense artifact, SST-2 validation",
        "command": "python scripts/embed_parity_sst2.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model, "sentences": len(texts), "dim": int(got.shape[1]),
        "pooling": rt.pooling, "max_length": rt.max_length, "threads": args.threads, "batch_size": args.batch_size,
        "cosine": {"min": float(cos.min()), "mean": float(cos.mean()), "p01": float(np.percentile(cos, 1)),
                   "median": float(np.median(cos)), "below_0.9999": int((cos < 0.9999).sum())},
        "max_abs_element_difference": float(np.abs(got - ref).max()),
        "seconds": {"runtime": round(t_rt, 2), "sentence_transformers": round(t_st, 2)},
        "versions": _versions(), "cpu": _cpu(),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0 if cos.min() >= 0.9999 else 1


def _versions() -> dict:
    from importlib.metadata import version

    out = {}
    for pkg in ("sparsify-encoders", "sentence-transformers", "transformers", "torch", "numba"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            out[pkg] = None
    out["python"] = platform.python_version()
    return out


def _cpu() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags"))
        return f"{name}; avx512_vnni: {'avx512_vnni' in flags}"
    except Exception:
        return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
