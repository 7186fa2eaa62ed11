"""FLOPs of a length configuration. Everything here counts **FLOPs = 2 x MACs** (one multiply-accumulate is two
floating-point operations); every printed number says "FLOPs".

For one example of ``n`` real tokens (padding is not counted), hidden size ``H``, feed-forward size ``I`` and
``C`` labels, with ``n_in`` tokens entering layer ``i`` (``n`` for the first layer) and ``n_out`` leaving it
(:func:`sparsify.techniques.length_adaptive.config.kept_lengths`), tokens being dropped after self-attention:

    MACs(layer i) = 4 * n_in * H^2        Q, K, V and output projections
                  + 2 * n_in^2 * H        Q K^T and attention x V, all heads together
                  + 2 * n_out * H * I     feed-forward (H -> I -> H) on the kept tokens
    MACs(head)    = H^2 + H * C           pooler / pre-classifier (H -> H) and classifier (H -> C), on [CLS]
    FLOPs         = 2 * (sum over layers of MACs(layer i) + MACs(head))

Not counted (small next to the matrix products): embeddings (lookups), biases, LayerNorm, softmax, GELU,
residual additions, and the significance scores (at inference they reuse the attention probabilities).
A skipped layer (LayerDrop) counts 0. Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sparsify.techniques.length_adaptive.config import check_length_config, kept_lengths

UNIT = "FLOPs (2 x MACs)"


@dataclass(frozen=True)
class EncoderDims:
    """What the FLOPs count needs of a model: hidden size, feed-forward size, layers, labels."""

    hidden: int
    intermediate: int
    layers: int
    num_labels: int

    @classmethod
    def from_config(cls, config) -> "EncoderDims":
        """From a Hugging Face config (BERT/RoBERTa names, or DistilBERT's dim / hidden_dim / n_layers)."""
        get = lambda *names: next(getattr(config, n) for n in names if getattr(config, n, None) is not None)  # noqa: E731
        return cls(hidden=int(get("hidden_size", "dim")), intermediate=int(get("intermediate_size", "hidden_dim")),
                   layers=int(get("num_hidden_layers", "n_layers")), num_labels=int(getattr(config, "num_labels", 2)))


def layer_macs(dims: EncoderDims, n_in: int, n_out: int) -> int:
    h, i = dims.hidden, dims.intermediate
    return 4 * n_in * h * h + 2 * n_in * n_in * h + 2 * n_out * h * i


def head_macs(dims: EncoderDims) -> int:
    return dims.hidden * dims.hidden + dims.hidden * dims.num_labels


def example_flops(dims: EncoderDims, length_config, n: int, *, skip_layers=()) -> int:
    """FLOPs of one example of ``n`` real tokens; ``length_config=None`` is the full length."""
    if length_config is None:
        kept = [n] * dims.layers
    else:
        kept = kept_lengths(check_length_config(length_config, dims.layers), n, skip_layers)
    macs, n_in = head_macs(dims), n
    for i, n_out in enumerate(kept):
        if i not in skip_layers:
            macs += layer_macs(dims, n_in, n_out)
        n_in = n_out
    return 2 * macs


def dataset_flops(dims: EncoderDims, length_config, lengths: Iterable[int]) -> dict:
    """FLOPs over examples of the given real lengths: mean per example, full-length mean, and their ratio."""
    lengths = list(lengths)
    if not lengths:
        raise ValueError("no examples: give the real (unpadded) token count of each example")
    cache: dict[int, tuple[int, int]] = {}
    total = full = 0
    for n in lengths:
        if n not in cache:
            cache[n] = (example_flops(dims, length_config, n), example_flops(dims, None, n))
        total += cache[n][0]
        full += cache[n][1]
    return {"unit": UNIT, "flops_per_example": total / len(lengths), "full_flops_per_example": full / len(lengths),
            "fraction": total / full, "examples": len(lengths)}


def format_flops(flops: float) -> str:
    """``1.23e9`` -> ``"1.23 GFLOPs"`` (FLOPs, not MACs)."""
    for unit, scale in (("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOPs"
