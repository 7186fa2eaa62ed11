"""Sub-byte integer codes packed into bytes, row by row (numpy only: the export writes them, the runtime reads them).

- 4 bits: two codes per byte, the first code of a pair in the low nibble. Signed codes in [-8, 7] are stored
  offset by 8 (nibble = code + 8, in [0, 15]).
- 2 bits: four codes per byte, the first code in the lowest two bits. Codes are unsigned, in [0, 3].

A ``(rows, cols)`` array of codes becomes ``(rows, ceil(cols * bits / 8))`` bytes: each row starts on a byte, so
a row can be decoded alone (the word embeddings are decoded row by row at lookup). A row whose length is not a
multiple of the codes per byte is padded with code 0 (nibble 8 for signed 4-bit codes); unpacking drops the pad.
"""

from __future__ import annotations

import numpy as np

__all__ = ["pack_int4", "unpack_int4", "pack_uint2", "unpack_uint2", "packed_cols"]


def packed_cols(cols: int, bits: int) -> int:
    """Bytes per packed row of ``cols`` codes of ``bits`` (4 or 2) bits."""
    per = 8 // bits
    return -(-cols // per)


def _as_2d(codes: np.ndarray, what: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim == 1:
        codes = codes[None, :]
    if codes.ndim != 2:
        raise ValueError(f"{what}: expected a 1-D or 2-D array of codes, got shape {codes.shape}")
    return codes


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Signed 4-bit codes in [-8, 7] (any integer dtype), ``(rows, cols)`` -> uint8 ``(rows, ceil(cols / 2))``."""
    codes = _as_2d(codes, "pack_int4")
    if codes.size and (codes.min() < -8 or codes.max() > 7):
        raise ValueError(f"pack_int4: codes must be in [-8, 7], got [{codes.min()}, {codes.max()}]")
    rows, cols = codes.shape
    nib = np.full((rows, packed_cols(cols, 4) * 2), 8, np.uint8)
    nib[:, :cols] = (codes.astype(np.int16) + 8).astype(np.uint8)
    return np.ascontiguousarray(nib[:, 0::2] | (nib[:, 1::2] << 4))


def unpack_int4(packed: np.ndarray, cols: int) -> np.ndarray:
    """The inverse of :func:`pack_int4`: int8 codes ``(rows, cols)``."""
    packed = _as_2d(packed, "unpack_int4")
    if packed.dtype != np.uint8 or packed.shape[1] != packed_cols(cols, 4):
        raise ValueError(f"unpack_int4: expected uint8 rows of {packed_cols(cols, 4)} bytes for {cols} codes, got "
                         f"{packed.dtype} {packed.shape}")
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.int8)
    out[:, 0::2] = (packed & 0x0F).astype(np.int8) - 8
    out[:, 1::2] = (packed >> 4).astype(np.int8) - 8
    return np.ascontiguousarray(out[:, :cols])


def pack_uint2(codes: np.ndarray) -> np.ndarray:
    """Unsigned 2-bit codes in [0, 3], ``(rows, cols)`` -> uint8 ``(rows, ceil(cols / 4))``."""
    codes = _as_2d(codes, "pack_uint2")
    if codes.size and (codes.min() < 0 or codes.max() > 3):
        raise ValueError(f"pack_uint2: codes must be in [0, 3], got [{codes.min()}, {codes.max()}]")
    rows, cols = codes.shape
    c = np.zeros((rows, packed_cols(cols, 2) * 4), np.uint8)
    c[:, :cols] = codes.astype(np.uint8)
    return np.ascontiguousarray(c[:, 0::4] | (c[:, 1::4] << 2) | (c[:, 2::4] << 4) | (c[:, 3::4] << 6))


def unpack_uint2(packed: np.ndarray, cols: int) -> np.ndarray:
    """The inverse of :func:`pack_uint2`: uint8 codes ``(rows, cols)`` in [0, 3]."""
    packed = _as_2d(packed, "unpack_uint2")
    if packed.dtype != np.uint8 or packed.shape[1] != packed_cols(cols, 2):
        raise ValueError(f"unpack_uint2: expected uint8 rows of {packed_cols(cols, 2)} bytes for {cols} codes, got "
                         f"{packed.dtype} {packed.shape}")
    out = np.empty((packed.shape[0], packed.shape[1] * 4), np.uint8)
    for j in range(4):
        out[:, j::4] = (packed >> (2 * j)) & 0x03
    return np.ascontiguousarray(out[:, :cols])
