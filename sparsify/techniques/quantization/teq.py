"""TEQ (Cheng et al. 2023, Intel Neural Compressor's trainable equivalent transformation), where a post-LayerNorm
BERT layer allows folding it: the attention output projection and the value projection before it.

The context that the attention output projection ``O`` reads is, channel by channel, linear in the value
projection's output (each head's softmax weights times its values). So for any positive ``s`` (one per channel),

    O(context) = (W_o diag(s)) (context / s) + b_o,   and   context / s  is what a value projection with rows
                                                           W_v[c] / s_c and bias b_v[c] / s_c produces:

the float model computes the same function, and ``W_o diag(s)`` may round to int4 far better per output channel.
``s`` is learned per layer (``exp`` of a trained log-scale, Adam) to minimise the squared error between the float
projection's output and the weight-quantized, rescaled one's (round to nearest with a straight-through gradient) on
the calibration batches' real tokens; the best ``s`` seen is folded into both weights. Pruned weights stay exactly
zero (column and row scalings keep every zero block). The other Linear layers of a BERT layer do not fold
(docs/lowbit.md: the query / key / value and intermediate inputs also feed a residual, the output projection reads a
GELU), so they are left as they are.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from sparsify.sparsity import canonical_name

# (value projection, attention output projection) within one encoder layer: BERT / RoBERTa / ELECTRA, DistilBERT
FOLDS = (("attention.self.value", "attention.output.dense"), ("attention.v_lin", "attention.out_lin"))
_DROP = ("labels", "idx")


def foldable_pairs(model: nn.Module) -> list[tuple[str, nn.Linear, str, nn.Linear]]:
    """``(value name, value, output name, output)`` of every encoder layer, in order."""
    modules = {canonical_name(n): m for n, m in model.named_modules()}
    pairs = []
    for name, module in modules.items():
        for value_suffix, out_suffix in FOLDS:
            if name.endswith("." + out_suffix) and isinstance(module, nn.Linear):
                value_name = name[: -len(out_suffix)] + value_suffix
                value = modules.get(value_name)
                if isinstance(value, nn.Linear) and value.out_features == module.in_features:
                    pairs.append((value_name, value, name, module))
    return pairs


@torch.no_grad()
def fold(value: nn.Linear, out: nn.Linear, s: torch.Tensor) -> None:
    """``out``'s input channel c scaled by ``s[c]``, ``value``'s output channel c by ``1 / s[c]``: the same function."""
    out.weight.mul_(s.to(out.weight.dtype)[None, :])
    value.weight.div_(s.to(value.weight.dtype)[:, None])
    if value.bias is not None:
        value.bias.div_(s.to(value.bias.dtype))


def _quantize_ste(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel round to nearest, codes -q..q (q = 2^(bits-1) - 1), straight-through."""
    q = 2 ** (bits - 1) - 1
    scale = (w.detach().abs().amax(dim=1, keepdim=True) / q).clamp(min=1e-12)
    codes = torch.clamp(torch.round(w / scale), -q, q)
    return w + (codes * scale - w).detach()


@torch.no_grad()
def _inputs(model: nn.Module, module: nn.Module, batches: list[Mapping]) -> torch.Tensor:
    """``module``'s inputs over ``batches`` (the float model), real tokens only: ``(tokens, in_features)``."""
    seen = []
    handle = module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    rows = []
    try:
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k not in _DROP}
            model(**inputs)
            x = seen.pop()
            mask = inputs.get("attention_mask")
            rows.append(x.reshape(-1, x.shape[-1]) if mask is None else x[mask.bool()])
    finally:
        handle.remove()
    return torch.cat(rows).float()


def teq(model: nn.Module, batches: Iterable[Mapping], layers: Mapping[str, nn.Module], *, bits: int, iters: int = 300,
        lr: float = 1e-2, num_batches: int = 8) -> dict:
    """Learn and fold TEQ scales into every (value, attention output) pair whose output projection is in
    ``layers`` (name -> Linear). Returns statistics: per pair, the calibration error with round-to-nearest before
    and after, and the seconds spent."""
    started = time.monotonic()
    batches = [b for _, b in zip(range(num_batches), batches)]
    was_training = model.training
    model.eval()
    stats = {"pairs": [], "iters": iters, "bits": bits}
    try:
        for value_name, value, out_name, out in foldable_pairs(model):
            if out_name not in layers:
                continue
            x = _inputs(model, out, batches)
            w = out.weight.detach().float()
            target = x @ w.T
            log_s = torch.zeros(w.shape[1], requires_grad=True)
            optimizer = torch.optim.Adam([log_s], lr=lr)

            def error(log_scale):
                s = log_scale.exp()
                return ((x / s) @ _quantize_ste(w * s, bits).T - target).pow(2).mean()

            with torch.no_grad():
                before = float(error(torch.zeros_like(log_s)))
            best, best_s = before, torch.zeros_like(log_s)
            for _ in range(iters):
                loss = error(log_s)
                if float(loss.detach()) < best:  # the scales this loss belongs to, before the step
                    best, best_s = float(loss.detach()), log_s.detach().clone()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            fold(value, out, best_s.exp())
            stats["pairs"].append({"value": value_name, "output": out_name, "error_nearest": before,
                                   "error_teq": best})
    finally:
        model.train(was_training)
    stats["seconds"] = time.monotonic() - started
    return stats
