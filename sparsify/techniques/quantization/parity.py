"""Does the converted int8 model compute what the fake-quant model was evaluated as?

At the end of a quantized run the trainer compares, on the eval split, the fake-quant model (float32 weights
and activations rounded to the int8 grid inside the forward pass) with its conversion (int8 weight codes, per
channel scales, the frozen activation parameters: what ``quantization.{json,safetensors}`` holds and the export
reads). The two differ only in arithmetic order, so their predicted labels should agree almost everywhere; the
result goes into ``metrics.json`` under ``conversion_parity``.
"""

from __future__ import annotations

import torch

from sparsify.evaluation import evaluate
from sparsify.techniques.quantization.convert import convert_activations, load_converted


def conversion_parity(quantizer, model, plain_model, dataloader, task: str, *, is_regression: bool = False,
                      accelerator=None) -> dict:
    """Evaluate ``model`` as fake-quant, then as its conversion, and compare the logits.

    ``plain_model`` is the unwrapped module the quantizer was prepared on (``model`` itself outside
    accelerate). The quantizer is removed from the model afterwards (the model runs plain float32 again), so
    call this once training is over."""
    fake_logits: list[torch.Tensor] = []
    fake = evaluate(model, dataloader, task, is_regression=is_regression, accelerator=accelerator,
                    logits_out=fake_logits)
    converted, activations = quantizer.convert(plain_model), convert_activations(quantizer)
    embeddings = quantizer.embedding_name
    quantizer.remove()
    undo = load_converted(plain_model, converted, activations, embeddings,
                          embedding_bits=quantizer.config.embedding_bits)
    try:
        conv_logits: list[torch.Tensor] = []
        conv = evaluate(model, dataloader, task, is_regression=is_regression, accelerator=accelerator,
                        logits_out=conv_logits)
    finally:
        undo()
    a, b = torch.cat(fake_logits), torch.cat(conv_logits)
    out = {
        "examples": int(a.shape[0]),
        "max_abs_logit_diff": float((a - b).abs().max()) if a.numel() else 0.0,
        "fake_quant": fake,
        "converted": conv,
    }
    if not is_regression:
        out["label_agreement"] = float((a.argmax(-1) == b.argmax(-1)).float().mean()) if a.numel() else 1.0
    return out
