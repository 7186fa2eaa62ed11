"""The baseline a length configuration has to beat: the same model on truncated inputs, at equal FLOPs.

Dropping tokens inside the encoder (a length configuration) and cutting the input short both save compute;
the length-adaptive model is only worth having if it is more accurate than plain truncation at the same FLOPs.
For a FLOPs fraction ``f`` this finds the keep ratio ``t`` (each example keeps its first ``max(2, ceil(t * n))``
of its ``n`` real tokens, the final [SEP] kept in place of the last one cut, as a tokenizer truncates) whose
FLOPs over the evaluation set are the largest within ``f`` of the full-length FLOPs, and evaluates the model on
those inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from sparsify.techniques.length_adaptive.flops import EncoderDims, dataset_flops

_SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def kept_tokens(n: int, ratio: float) -> int:
    """Tokens an example of ``n`` real tokens keeps when truncated to ``ratio`` of its length (at least 2:
    [CLS] and [SEP])."""
    return min(n, max(2, math.ceil(ratio * n - 1e-9)))


def truncate_row(row: dict, keep: int) -> dict:
    """``row`` (a tokenized example) cut to its first ``keep - 1`` tokens plus its last one ([SEP])."""
    n = len(row["input_ids"])
    if keep >= n:
        return dict(row)
    out = dict(row)
    for key in _SEQUENCE_KEYS:
        if key in row:
            values = list(row[key])
            out[key] = values[:keep - 1] + values[-1:]
    return out


def truncation_ratio(dims: EncoderDims, lengths: Sequence[int], fraction: float, *, tol: float = 1e-4) -> tuple[float, float]:
    """The largest keep ratio whose truncated inputs cost at most ``fraction`` of the full-length FLOPs, and the
    FLOPs fraction it reaches (a step function of the ratio, so usually a little under ``fraction``)."""
    def cost(ratio: float) -> float:
        truncated = [kept_tokens(n, ratio) for n in lengths]
        return dataset_flops(dims, None, truncated)["flops_per_example"] / full

    full = dataset_flops(dims, None, lengths)["flops_per_example"]
    if fraction >= 1.0:
        return 1.0, 1.0
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if cost(mid) <= fraction:
            lo = mid
        else:
            hi = mid
    return lo, cost(lo)


def truncation_baseline(evaluate_rows, dims: EncoderDims, rows: Sequence[dict], fractions: Sequence[float]) -> list[dict]:
    """For each FLOPs fraction: the keep ratio, the FLOPs fraction reached and ``evaluate_rows(truncated_rows)``
    (the metric of the model on the truncated examples)."""
    lengths = [len(r["input_ids"]) for r in rows]
    out = []
    for fraction in fractions:
        ratio, reached = truncation_ratio(dims, lengths, fraction)
        truncated = [truncate_row(r, kept_tokens(len(r["input_ids"]), ratio)) for r in rows]
        out.append({"target_flops_fraction": fraction, "keep_ratio": round(ratio, 6),
                    "flops_fraction": round(reached, 6), "metric": evaluate_rows(truncated)})
    return out
