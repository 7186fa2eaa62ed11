"""FP8 fake quantization (emulation only): E4M3, E5M2 and E3M4, saturating, round to nearest even.

No CPU here computes in FP8: these functions round float32 values to the values an FP8 format can hold and
return float32, so that the accuracy of an FP8 model can be measured (PTQ) or trained for (QAT). They make
nothing faster and the artifact does not store FP8.

Formats (1 sign bit, E exponent bits, M mantissa bits, exponent bias B; subnormals when the exponent field is 0):

- ``e4m3``: E4 M3 B7, the OCP / NVIDIA "E4M3FN" variant: no infinities, only S.1111.111 is NaN, so the largest
  value is 1.75 * 2**8 = **448**; smallest subnormal 2**-9. ``torch.float8_e4m3fn``.
- ``e5m2``: E5 M2 B15, IEEE-like (infinities and NaNs in the top exponent): largest 1.75 * 2**15 = **57344**;
  smallest subnormal 2**-16. ``torch.float8_e5m2``.
- ``e3m4``: E3 M4 B3, with E4M3's convention (no infinities, only S.111.1111 is NaN), as in Intel's FP8
  post-training recipes: largest 1.875 * 2**4 = **30**; smallest subnormal 2**-6. torch has no such dtype; the
  IEEE-like variant (``ml_dtypes.float8_e3m4``, largest 15.5) holds the same values up to 15.5.

Rounding saturates: a value beyond the largest magnitude becomes that magnitude. torch's float8 casts are not
relied on (on CPU, torch 2.13's E4M3FN cast saturates but its E5M2 cast overflows to infinity; E3M4 has none);
they serve as a test reference after a clamp. NaN stays NaN. Scaling: ``q(x) = fp8(x / s) * s`` with ``s = amax / largest`` per tensor or per channel,
so the observed range maps onto the format's range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FP8Format:
    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max_value: float

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal value (subnormals share its spacing)."""
        return 1 - self.bias

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (self.min_exponent - self.mantissa_bits)


FORMATS: dict[str, FP8Format] = {
    "e4m3": FP8Format("e4m3", 4, 3, 7, 448.0),
    "e5m2": FP8Format("e5m2", 5, 2, 15, 57344.0),
    "e3m4": FP8Format("e3m4", 3, 4, 3, 30.0),
}


def representable_values(fmt: FP8Format | str) -> torch.Tensor:
    """Every finite value of the format, sorted, decoded from the 256 bit patterns (the reference the rounding is
    tested against): float64."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    e_bits, m_bits = fmt.exponent_bits, fmt.mantissa_bits
    top = 2 ** e_bits - 1
    ieee = fmt.name == "e5m2"  # the top exponent field holds infinities and NaNs
    values = set()
    for pattern in range(256):
        sign = -1.0 if pattern >> 7 else 1.0
        e = (pattern >> m_bits) & top
        m = pattern & (2 ** m_bits - 1)
        if ieee and e == top:
            continue
        if not ieee and e == top and m == 2 ** m_bits - 1:
            continue  # the single NaN encoding
        if e == 0:
            v = m / 2 ** m_bits * 2.0 ** fmt.min_exponent
        else:
            v = (1 + m / 2 ** m_bits) * 2.0 ** (e - fmt.bias)
        values.add(sign * v)
    return torch.tensor(sorted(values), dtype=torch.float64)


def round_to_fp8(x: torch.Tensor, fmt: FP8Format | str) -> torch.Tensor:
    """``x`` rounded to the nearest value of the format (ties to even mantissa), saturating at its largest
    magnitude; float32 in, float32 out (same shape)."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    xf = x.float()
    a = xf.abs().clamp(max=fmt.max_value)
    _, exp = torch.frexp(a)  # a = mant * 2**exp with mant in [0.5, 1): floor(log2 a) = exp - 1 (exact)
    e = torch.clamp(exp - 1, min=fmt.min_exponent)  # subnormals: the spacing of the smallest binade
    step = torch.ldexp(torch.ones_like(a), (e - fmt.mantissa_bits).to(torch.int32))
    q = torch.clamp(torch.round(a / step) * step, max=fmt.max_value)
    return torch.copysign(q, xf)


def fp8_scale(amax: torch.Tensor, fmt: FP8Format | str) -> torch.Tensor:
    """``amax / largest`` (1 where amax is 0), float32."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    amax = amax.float()
    return torch.where(amax > 0, amax / fmt.max_value, torch.ones_like(amax))


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor, fmt: FP8Format | str) -> torch.Tensor:
    """``round_to_fp8(x / scale) * scale`` in ``x``'s dtype (computed in float32), straight-through gradient
    (written ``q + (x - x)`` so that the value is exactly ``q``)."""
    q = (round_to_fp8(x.detach().float() / scale, fmt) * scale).to(x.dtype)
    return q + (x - x.detach())


def fake_quantize_weight_fp8(weight: torch.Tensor, mask: torch.Tensor | None, fmt: FP8Format | str,
                             per_channel: bool) -> torch.Tensor:
    """A (masked) weight in FP8 with one scale per tensor or per output channel; a masked weight stays 0."""
    if mask is not None:
        weight = weight * mask.to(weight.dtype)
    a = weight.detach().abs()
    amax = a.amax(dim=1, keepdim=True) if per_channel else a.amax()
    return fake_quantize_fp8(weight, fp8_scale(amax, fmt), fmt)
