"""Word-embedding rows at 8, 4 or 2 bits, one range per row: the numbers QAT trains with and the export stores.

Each looked-up row is replaced by ``code * scale + offset`` (float32; ``offset`` is 0 except at 2 bits):

- 8 bits: symmetric, ``scale = max|row| / 127``, codes in [-127, 127] (the existing int8 rows);
- 4 bits: symmetric **full range** (the 16 codes [-8, 7]): ``|scale| = max|row| / 8``, its sign chosen so that the
  row's extreme value lands on code -8 exactly (Intel Neural Compressor's ``full_range``): a negative scale when
  the largest magnitude is a positive value. The opposite extreme, if as large, clips to code 7 (one step off);
- 2 bits: asymmetric, codes in [0, 3], ``value = lo + code * (hi - lo) / 3``, the range ``[lo, hi] = alpha *
  [min(row), max(row)]`` chosen per row by a search over ``alpha`` in ``1.00, 0.98, ..., 0.20`` for the least
  squared error (the first, widest, on ties). Four levels cannot cover an embedding row's outliers and its bulk
  at once; the search trades the clipped outliers against the resolution of the bulk.

An all-zero row has scale 1 (codes 0). Rounding is half to even (``torch.round``), in float32; the squared errors
of the search are summed in float64, so that a row chooses the same range whether it is quantized alone (a
lookup during QAT) or with the whole table (the export). Gradients are straight through (the value of the rounded
row, the gradient of the float row), as for the int8 rows.
"""

from __future__ import annotations

import torch

EMBEDDING_BITS = (8, 4, 2)
INT2_ALPHAS = tuple(round(1.0 - 0.02 * k, 2) for k in range(41))  # 1.00 ... 0.20
_CHUNK_ROWS = 4096  # rows per step of the 2-bit search (bounds the memory of a whole-table search)


def describe(bits: int) -> str:
    """The storage of word-embedding rows at ``bits`` bits, in words (manifest and quantization.json)."""
    return {
        8: "int8, symmetric, one scale per row: max|row| / 127",
        4: "int4, symmetric full range (codes -8..7), one signed scale per row: the row's extreme value is code -8",
        2: "2-bit, asymmetric, codes 0..3, one scale and offset per row: value = offset + code * scale, the range "
           "chosen per row by a squared-error search",
    }[bits]


def _int2_params(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset), float32 ``(..., 1)``, of the 2-bit rows of float32 ``x``."""
    lo0 = x.amin(dim=-1, keepdim=True)
    hi0 = x.amax(dim=-1, keepdim=True)
    best_err = best_scale = best_lo = None
    for alpha in INT2_ALPHAS:
        lo, hi = lo0 * alpha, hi0 * alpha
        scale = (hi - lo) / 3.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round((x - lo) / scale).clamp(0, 3) * scale + lo
        err = (q.double() - x.double()).pow(2).sum(dim=-1, keepdim=True)
        if best_err is None:
            best_err, best_scale, best_lo = err, scale, lo
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_lo = torch.where(better, lo, best_lo)
    return best_scale, best_lo


def row_params(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, offset or None) per row of ``x`` (float32, shape ``(..., 1)``) at ``bits`` bits."""
    x = x.detach().float()
    if bits == 8:
        amax = x.abs().amax(dim=-1, keepdim=True)
        return torch.where(amax > 0, amax / 127, torch.ones_like(amax)), None
    if bits == 4:
        hi = x.amax(dim=-1, keepdim=True)
        lo = x.amin(dim=-1, keepdim=True)
        amax = torch.maximum(hi, -lo)
        scale = torch.where(amax > 0, amax / 8, torch.ones_like(amax))
        return torch.where(hi > -lo, -scale, scale), None
    if bits == 2:
        if x.dim() == 2 and x.shape[0] > _CHUNK_ROWS:
            parts = [_int2_params(x[i:i + _CHUNK_ROWS]) for i in range(0, x.shape[0], _CHUNK_ROWS)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return _int2_params(x)
    raise ValueError(f"embedding bits must be one of {EMBEDDING_BITS}, got {bits}")


def quantize_rows(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(codes, scales, offsets)`` of the rows of ``x`` (2-D ``(rows, width)`` or any shape, rows along the last
    dimension): int8 codes (in [-127, 127], [-8, 7] or [0, 3]), float32 scales and offsets (None except at 2 bits)
    with one value per row (the last dimension dropped)."""
    scale, offset = row_params(x, bits)
    xf = x.detach().float()
    if bits == 2:
        codes = torch.round((xf - offset) / scale).clamp(0, 3)
    elif bits == 4:
        codes = torch.round(xf / scale).clamp(-8, 7)
    else:
        codes = torch.round(xf / scale).clamp(-127, 127)
    return codes.to(torch.int8), scale.squeeze(-1), None if offset is None else offset.squeeze(-1)


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """float32 rows ``code * scale (+ offset)``: what the runtime computes at lookup."""
    y = codes.float() * scales.float().unsqueeze(-1)
    return y if offsets is None else y + offsets.float().unsqueeze(-1)


def rounded_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The rows of ``x`` rounded to ``bits`` bits (no gradient), in ``x``'s dtype."""
    codes, scales, offsets = quantize_rows(x, bits)
    return dequantize_rows(codes, scales, offsets).to(x.dtype)


def fake_quantize_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The rows of ``x`` rounded to ``bits`` bits, straight-through gradient. Written ``q + (x - x)`` rather than
    ``x + (q - x)``: the latter is not exactly ``q`` in floating point when ``q`` is far from ``x`` (a 2-bit
    code), and the runtime must see the same bits."""
    return rounded_rows(x, bits) + (x - x.detach())
