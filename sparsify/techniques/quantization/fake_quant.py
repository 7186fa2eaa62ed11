"""Fake quantization with straight-through gradients, and the activation range observer.

Number formats (see :mod:`sparsify.techniques.quantization.config`):

- weights: int8 codes in [-127, 127], symmetric, one scale per output channel: ``scale = max|w_row| / 127``;
  a zero weight is exactly code 0, so a pruned weight stays exactly 0;
- activations: uint8 codes in [0, 255] with a zero point, ``x ~ (code - zero_point) * scale``, one
  (scale, zero point) per tensor or per group of the last dimension (PEG).

``fake_quantize`` rounds half to even (``torch.round``), like the export must.
"""

from __future__ import annotations

import torch

WEIGHT_QMIN, WEIGHT_QMAX = -127, 127
ACT_QMIN, ACT_QMAX = 0, 255
SYMMETRIC_ZERO_POINT = 128
_TINY = 1e-8  # smallest activation scale (an all-zero range)


# -- the fake-quant functions --------------------------------------------------------------------------------


class _FakeQuantize(torch.autograd.Function):
    """round(x / s) + z, clamped to [qmin, qmax], back to floats; gradient: straight through inside the range,
    zero where the value was clamped (the clipped straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        code = torch.round(x / scale) + zero_point
        inside = (code >= qmin) & (code <= qmax)
        ctx.save_for_backward(inside)
        return (code.clamp(qmin, qmax) - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None, None, None


def fake_quantize(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale`` with the clipped
    straight-through gradient for ``x`` (no gradient for scale and zero point). ``scale``/``zero_point`` are
    floats or tensors broadcastable to ``x``."""
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    zero_point = torch.as_tensor(zero_point, dtype=x.dtype, device=x.device)
    return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax)


def quantize(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes (as floats) ``clamp(round(x / scale) + zero_point, qmin, qmax)``."""
    return (torch.round(x / scale) + zero_point).clamp(qmin, qmax)


def _grad_scale(t: torch.Tensor, factor: float) -> torch.Tensor:
    """Value of ``t``, gradient multiplied by ``factor``."""
    return (t - t * factor).detach() + t * factor


def _round_ste(t: torch.Tensor) -> torch.Tensor:
    return (torch.round(t) - t).detach() + t


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                      grad_factor: float | None = None) -> torch.Tensor:
    """Learned step size quantization (Esser et al. 2020): the same values as :func:`fake_quantize`, with the
    LSQ gradient for ``scale`` (``round(v) - v`` inside the range, ``qmin - z`` / ``qmax - z`` outside, scaled by
    ``grad_factor``, default ``1 / sqrt(numel * qmax)``) and the clipped straight-through gradient for ``x``. The
    zero point is not learned."""
    if grad_factor is None:
        grad_factor = 1.0 / ((x.numel() / max(scale.numel(), 1)) * qmax) ** 0.5
    s = _grad_scale(scale, grad_factor)
    z = zero_point.detach().to(x.dtype)
    v = torch.clamp(x / s + z, qmin, qmax)
    return (_round_ste(v) - z) * s


# -- weights ---------------------------------------------------------------------------------------------------


def weight_qmax(bits: int = 8) -> int:
    """Largest symmetric weight code: 127 at 8 bits, 7 at 4 bits (codes in [-qmax, qmax]: int4 codes are int8
    codes, so the kernels take them as they are)."""
    return 2 ** (bits - 1) - 1


def weight_scale(weight: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-output-channel symmetric scale ``max|w_row| / qmax`` (1 for an all-zero row), float32 ``(out,)``."""
    amax = weight.detach().abs().amax(dim=1).float()
    return torch.where(amax > 0, amax / weight_qmax(bits), torch.ones_like(amax))


def fake_quantize_weight(weight: torch.Tensor, mask: torch.Tensor | None = None, bits: int = 8) -> torch.Tensor:
    """Masked, symmetric-per-channel fake-quantized weight (int8, or int4 codes in [-7, 7]), straight-through
    gradient (times the mask). A masked weight is exactly 0, before and after quantization."""
    if mask is not None:
        weight = weight * mask.to(weight.dtype)
    qmax = weight_qmax(bits)
    scale = weight_scale(weight, bits).to(weight.dtype).unsqueeze(1)
    q = torch.round(weight.detach() / scale).clamp(-qmax, qmax) * scale
    return weight + (q - weight).detach()


def quantize_weight(weight: torch.Tensor, mask: torch.Tensor | None = None,
                    bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 codes (out, in), float32 scales (out,))``; ``codes * scales[:, None]`` equals
    :func:`fake_quantize_weight` (same operations). At 4 bits the codes are in [-7, 7]."""
    weight = weight.detach()
    if mask is not None:
        weight = weight * mask.to(weight.dtype)
    qmax = weight_qmax(bits)
    scale = weight_scale(weight, bits).to(weight.dtype)
    codes = torch.round(weight / scale.unsqueeze(1)).clamp(-qmax, qmax)
    return codes.to(torch.int8), scale.float()


def rtn_group_weight(weight: torch.Tensor, mask: torch.Tensor | None = None, *, bits: int = 4, group_size: int = 128,
                     symmetric: bool = True) -> torch.Tensor:
    """Group-wise round-to-nearest (post-training, as Intel Neural Compressor's RTN weight-only mode): each row is
    cut into groups of ``group_size`` consecutive input features, each group with its own scale. symmetric: codes
    in [-qmax, qmax], ``scale = max|group| / qmax``; asymmetric: codes in [0, 2**bits - 1] with an integer zero
    point, the range ``[min, max]`` of the group widened to include 0 (so a zero weight, pruned, stays exactly 0).
    Returns the dequantized weight (no gradient: a PTQ mode); ``in_features`` must be a multiple of
    ``group_size``."""
    w = weight.detach()
    if mask is not None:
        w = w * mask.to(w.dtype)
    out, width = w.shape
    if width % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {width}")
    g = w.float().reshape(out, width // group_size, group_size)
    if symmetric:
        qmax = weight_qmax(bits)
        amax = g.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        q = torch.round(g / scale).clamp(-qmax, qmax) * scale
    else:
        levels = 2 ** bits - 1
        lo = torch.minimum(g.amin(dim=-1, keepdim=True), torch.zeros(()))
        hi = torch.maximum(g.amax(dim=-1, keepdim=True), torch.zeros(()))
        scale = torch.where(hi > lo, (hi - lo) / levels, torch.ones_like(hi))
        zp = torch.round(-lo / scale).clamp(0, levels)
        q = (torch.round(g / scale + zp).clamp(0, levels) - zp) * scale
    return q.reshape(out, width).to(w.dtype)


def fake_quantize_rows(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Each vector along the last dimension rounded to int8, symmetric, one scale ``max|row| / 127`` per vector
    (1 for an all-zero one), straight-through gradient. Applied to looked-up word embeddings it equals looking up
    the int8 rows the export stores (``--embeddings int8``): the same operations in float32, rounding half to even.
    ``bits`` 4 or 2: the rows of :mod:`sparsify.techniques.quantization.lowbit` instead."""
    if bits != 8:
        from sparsify.techniques.quantization.lowbit import fake_quantize_rows as lowbit_rows

        return lowbit_rows(x, bits)
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / WEIGHT_QMAX, torch.ones_like(amax))
    q = (torch.round(x.detach().float() / scale).clamp(WEIGHT_QMIN, WEIGHT_QMAX) * scale).to(x.dtype)
    return x + (q - x).detach()


# -- activations -------------------------------------------------------------------------------------------


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(scale, zero_point)`` for the range ``[lo, hi]`` (widened to include 0), elementwise.

    asymmetric: ``scale = (hi - lo) / 255``, ``zero_point = round(-lo / scale)`` in [0, 255];
    symmetric: ``scale = max(|lo|, |hi|) / 127``, ``zero_point = 128``. Returns float32 scale, int32 zero point.
    """
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if symmetric:
        scale = torch.maximum(-lo, hi) / 127.0
        scale = torch.clamp(scale, min=_TINY)
        return scale, torch.full_like(scale, SYMMETRIC_ZERO_POINT, dtype=torch.int32)
    scale = torch.clamp((hi - lo) / float(ACT_QMAX - ACT_QMIN), min=_TINY)
    zero_point = torch.clamp(torch.round(ACT_QMIN - lo / scale), ACT_QMIN, ACT_QMAX).to(torch.int32)
    return scale, zero_point


class MinMaxObserver:
    """Moving-average min/max of an activation: per tensor (``width=None``, scalar ranges) or per dimension of
    the last axis (``width=D``, ``(D,)`` ranges, for PEG). ``running = momentum * running + (1 - momentum) *
    batch``; the first batch initializes. Once ``frozen``, :meth:`update` does nothing."""

    def __init__(self, momentum: float, width: int | None = None):
        self.momentum = float(momentum)
        self.width = width
        shape = () if width is None else (width,)
        self.lo = torch.zeros(shape)
        self.hi = torch.zeros(shape)
        self.initialized = False
        self.frozen = False
        self.batches = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if self.frozen:
            return
        x = x.detach().float()
        if self.width is None:
            lo, hi = x.min(), x.max()
        else:
            flat = x.reshape(-1, x.shape[-1])
            lo, hi = flat.amin(dim=0), flat.amax(dim=0)
        if self.lo.device != lo.device:
            self.lo, self.hi = self.lo.to(lo.device), self.hi.to(lo.device)
        if not self.initialized:
            self.lo, self.hi, self.initialized = lo.clone(), hi.clone(), True
        else:
            m = self.momentum
            self.lo = m * self.lo + (1.0 - m) * lo
            self.hi = m * self.hi + (1.0 - m) * hi
        self.batches += 1

    def state_dict(self) -> dict:
        return {"lo": self.lo.detach().cpu().clone(), "hi": self.hi.detach().cpu().clone(),
                "initialized": self.initialized, "frozen": self.frozen, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        lo, hi = state["lo"], state["hi"]
        if tuple(lo.shape) != tuple(self.lo.shape):
            raise ValueError(f"observer range of shape {tuple(lo.shape)}, expected {tuple(self.lo.shape)}")
        self.lo, self.hi = lo.float().clone().to(self.lo.device), hi.float().clone().to(self.lo.device)
        self.initialized = bool(state["initialized"])
        self.frozen = bool(state["frozen"])
        self.batches = int(state.get("batches", 0))
