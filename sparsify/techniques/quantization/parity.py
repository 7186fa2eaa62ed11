"""Does the converted int8 model compute what the fake-quant model was evaluated as?

At the end of a quantized run the trainer compares, on the eval split, the fake-quant model (float32 weights
and activations rounded to the int8 grid inside the forward pass) with its conversion (int8 weight codes, per
channel scales, the frozen activation parameters: what ``quantization.{json,safetensors}`` holds and the export
reads). The two differ only in arithmetic order, so their predicted labels should agree almost everywhere; the
result goes into ``metrics.json`` under ``conversion_parity``.
"""

from __future__ import annotations

import torch

from sparsify.techniques.quantization.convert import convert_activations, load_converted


def conversion_parity(quantizer, plain_model, evaluate_fn, *, is_regression: bool = False,
                      embeddings: bool = False, spans: bool = False) -> dict:
    """Evaluate the model as fake-quant, then as its conversion, and compare the outputs.

    ``evaluate_fn(outputs)`` evaluates the model (the loop's evaluation: task metrics, or an embedding model's)
    and appends its outputs per batch (logits, or sentence embeddings) to the list ``outputs``. ``plain_model`` is
    the unwrapped module the quantizer was prepared on. The quantizer is removed from the model afterwards (the
    model runs plain float32 again), so call this once training is over. Classifiers get ``label_agreement``,
    embedding models ``min_cosine`` (the lowest cosine similarity of an example's two embeddings), extractive QA
    (``spans``: the outputs are each example's predicted start and end tokens) ``span_agreement``."""
    fake_logits: list[torch.Tensor] = []
    fake = evaluate_fn(fake_logits)
    converted, activations = quantizer.convert(plain_model), convert_activations(quantizer)
    embedding_name = quantizer.embedding_name
    quantizer.remove()
    undo = load_converted(plain_model, converted, activations, embedding_name,
                          embedding_bits=quantizer.config.embedding_bits)
    try:
        conv_logits: list[torch.Tensor] = []
        conv = evaluate_fn(conv_logits)
    finally:
        undo()
    a, b = torch.cat(fake_logits), torch.cat(conv_logits)
    out = {"examples": int(a.shape[0]), "fake_quant": fake, "converted": conv}
    if spans:
        out["span_agreement"] = float((a == b).all(-1).float().mean()) if a.numel() else 1.0
        return out
    out["max_abs_logit_diff"] = float((a - b).abs().max()) if a.numel() else 0.0
    if embeddings:
        cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
        out["min_cosine"] = float(cos.min()) if a.numel() else 1.0
    elif not is_regression:
        out["label_agreement"] = float((a.argmax(-1) == b.argmax(-1)).float().mean()) if a.numel() else 1.0
    return out
