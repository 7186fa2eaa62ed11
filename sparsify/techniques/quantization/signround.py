"""SignRound (Cheng et al. 2023, intel/auto-round): post-training rounding of int4 weights learned block by block.

For each encoder layer in turn (a "block": attention and feed-forward with their LayerNorms), every selected Linear
weight ``W`` (masked) gets two learned tensors:

- ``V`` (same shape as ``W``), the rounding offsets, in [-0.5, 0.5]: ``code = clamp(round(W / s + V), -q, q)``;
- ``alpha`` (one per output channel), the clipping, in [0.5, 1]: ``s = alpha * max|W_row| / q``;

so the block computes with ``W_q = code * s * mask`` (a pruned weight stays exactly 0). They are trained by
**signed gradient descent** (``p -= lr * sign(grad)``, lr decaying linearly from ``lr`` to 0, default ``1 / iters``)
to make the block's output match the float block's output on calibration batches (squared error over real tokens).
As in auto-round, the float output is computed from the float model's input to the block, and the quantized block
is fed the output of the blocks already quantized, so each block corrects what the earlier ones changed. The
parameters with the lowest loss seen are kept. Then the block's weights are replaced by ``W_q``: per-channel
symmetric int4 codes with a scale, the format the W4 export stores (``weight_bits: 4``), so the rounded model
exports and runs as any W4 model.

This is a weight-only method: activations are float during the search (quantize them afterwards, if wanted, with
the usual PTQ calibration).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import time
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.sparsity import canonical_name

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"(?:^|\.)(?:encoder|transformer)\.layer\.\d+$")
_DROP = ("labels", "idx")


class _Stop(Exception):
    pass


def encoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The encoder layers ``<base>.encoder.layer.N`` (or DistilBERT's ``transformer.layer.N``), in order."""
    return [(canonical_name(n), m) for n, m in model.named_modules() if _BLOCK.search(canonical_name(n))]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _block_inputs(model: nn.Module, block: nn.Module, batches: list[Mapping]) -> list[tuple[tuple, dict, torch.Tensor]]:
    """(args, kwargs, token mask) of ``block``'s call for each batch, from the float model (the forward is cut
    after the block's input is seen)."""
    seen = []

    def hook(mod, args, kwargs):
        seen.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    out = []
    try:
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k not in _DROP}
            try:
                model(**inputs)
            except _Stop:
                pass
            args, kwargs = seen.pop()
            mask = inputs.get("attention_mask")
            hidden = args[0]
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
            out.append((args, kwargs, mask))
    finally:
        handle.remove()
    return out


class _Rounded:
    """The learned rounding of one Linear: ``W_q(V, alpha)``."""

    def __init__(self, module: nn.Linear, mask: torch.Tensor | None, bits: int):
        self.module = module
        w = module.weight.detach().float()
        self.mask = None if mask is None else mask.to(w.device, torch.bool)
        self.w = w if self.mask is None else w * self.mask
        self.qmax = 2 ** (bits - 1) - 1
        self.amax = self.w.abs().amax(dim=1, keepdim=True)
        self.v = torch.zeros_like(self.w, requires_grad=True)
        self.alpha = torch.ones_like(self.amax, requires_grad=True)
        self.best = (self.v.detach().clone(), self.alpha.detach().clone())

    def weight(self) -> torch.Tensor:
        scale = torch.where(self.amax > 0, self.alpha * self.amax / self.qmax, torch.ones_like(self.amax))
        z = self.w / scale + self.v
        code = torch.clamp(z + (torch.round(z) - z).detach(), -self.qmax, self.qmax)  # straight-through round
        q = code * scale
        return q if self.mask is None else q * self.mask

    def params(self):
        return [self.v, self.alpha]

    @torch.no_grad()
    def signed_step(self, lr: float) -> None:
        for p in self.params():
            if p.grad is not None:
                p -= lr * torch.sign(p.grad)
                p.grad = None
        self.v.clamp_(-0.5, 0.5)
        self.alpha.clamp_(0.5, 1.0)

    def keep_best(self) -> None:
        self.best = (self.v.detach().clone(), self.alpha.detach().clone())

    @torch.no_grad()
    def use(self, v: torch.Tensor, alpha: torch.Tensor) -> None:
        self.v.copy_(v)
        self.alpha.copy_(alpha)

    @torch.no_grad()
    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes (out, in), float32 scales (out,)) of the current parameters; masked codes are 0."""
        scale = torch.where(self.amax > 0, self.alpha * self.amax / self.qmax, torch.ones_like(self.amax))
        code = torch.clamp(torch.round(self.w / scale + self.v), -self.qmax, self.qmax)
        if self.mask is not None:
            code = code * self.mask
        return code.to(torch.int8), scale.squeeze(1).float()


def _masked_mse(y: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(y.dtype)
    return ((y - target).pow(2) * m).sum() / (m.sum() * y.shape[-1]).clamp(min=1)


def signround(model: nn.Module, batches: Iterable[Mapping], layers: Mapping[str, nn.Linear], *, bits: int = 4,
              iters: int = 200, lr: float | None = None, num_batches: int = 16,
              masks: Mapping[str, torch.Tensor] | None = None, seed: int = 0) -> tuple[dict, dict]:
    """Round the weights of ``layers`` (module name -> Linear, inside the encoder blocks) to ``bits``-bit
    per-channel codes with SignRound, block by block, in place: each weight becomes ``code * scale`` (masked).
    ``batches``: mappings of model inputs (the first ``num_batches`` are used, kept in memory). Returns
    ``(codes, stats)``: per layer (int8 codes, float32 scales per output channel), and per block the output
    error of round-to-nearest (the start) and of the result, and the seconds taken. A block whose learned
    rounding does worse on the calibration set than round-to-nearest keeps round-to-nearest."""
    lr = 1.0 / iters if lr is None else lr
    start_time = time.perf_counter()
    data = list(itertools.islice(iter(batches), num_batches))
    if not data:
        raise ValueError("signround: no calibration batch")
    was_training = model.training
    model.eval()
    masks = masks or {}
    blocks = encoder_blocks(model)
    stats = {"blocks": [], "iters": iters, "lr": lr, "batches": len(data), "bits": bits}
    result: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    g = torch.Generator().manual_seed(seed)
    try:
        inputs = _block_inputs(model, blocks[0][1], data) if blocks else []
        q_inputs = [args[0] for args, _, _ in inputs]
        for name, block in blocks:
            chosen = {n: m for n, m in layers.items() if n.startswith(name + ".")}
            with torch.no_grad():
                targets = [_first(block(*args, **kwargs)).detach() for args, kwargs, _ in inputs]
            if not chosen:
                with torch.no_grad():
                    q_inputs = [_first(block(x, *args[1:], **kwargs)).detach()
                                for x, (args, kwargs, _) in zip(q_inputs, inputs)]
                inputs = [((t,) + args[1:], kwargs, m) for t, (args, kwargs, m) in zip(targets, inputs)]
                continue
            rounded = {n: _Rounded(m, masks.get(n), bits) for n, m in chosen.items()}
            saved = {n: m.__dict__.get("forward") for n, m in chosen.items()}
            for n, m in chosen.items():
                r = rounded[n]
                m.forward = (lambda r, m: (lambda x: F.linear(x, r.weight().to(x.dtype), m.bias)))(r, m)
            for p in block.parameters():
                p.requires_grad_(False)

            def loss_on(i: int) -> torch.Tensor:
                args, kwargs, mask = inputs[i]
                return _masked_mse(_first(block(q_inputs[i], *args[1:], **kwargs)), targets[i], mask)

            with torch.no_grad():
                start = sum(float(loss_on(i)) for i in range(len(data))) / len(data)
            best = math.inf
            for it in range(iters):
                i = int(torch.randint(len(data), (1,), generator=g))
                loss = loss_on(i)
                loss.backward()
                value = float(loss.detach())
                if value < best:  # the parameters before this step gave this loss
                    best = value
                    for r in rounded.values():
                        r.keep_best()
                step_lr = lr * (1.0 - it / iters)
                for r in rounded.values():
                    r.signed_step(step_lr)
            for r in rounded.values():
                r.use(*r.best)
            with torch.no_grad():
                end = sum(float(loss_on(i)) for i in range(len(data))) / len(data)
            kept = "signround"
            if end > start:  # the best single-batch parameters lost on the whole set: keep round to nearest
                for r in rounded.values():
                    r.use(torch.zeros_like(r.v), torch.ones_like(r.alpha))
                end, kept = start, "nearest"
            with torch.no_grad():
                for n, m in chosen.items():
                    codes, scale = rounded[n].codes()
                    result[n] = (codes, scale)
                    m.weight.copy_((codes.float() * scale[:, None]).to(m.weight.dtype))
            for n, m in chosen.items():
                if saved[n] is None:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = saved[n]
            for p in block.parameters():
                p.requires_grad_(True)
            with torch.no_grad():
                q_inputs = [_first(block(x, *args[1:], **kwargs)).detach()
                            for x, (args, kwargs, _) in zip(q_inputs, inputs)]
            inputs = [((t,) + args[1:], kwargs, m) for t, (args, kwargs, m) in zip(targets, inputs)]
            stats["blocks"].append({"block": name, "layers": len(chosen), "rtn_loss": start, "signround_loss": end,
                                    "kept": kept})
            log.info("signround: %s: block output error %.4g (round to nearest) -> %.4g", name, start, end)
    finally:
        model.train(was_training)
    stats["seconds"] = time.perf_counter() - start_time
    missing = sorted(set(layers) - set(result))
    if missing:
        raise ValueError(f"signround: {missing[0]} is not inside an encoder layer (<base>.encoder.layer.N.)")
    return result, stats
