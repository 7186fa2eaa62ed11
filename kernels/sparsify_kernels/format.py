"""Block-sparse storage for the weight of a Linear layer (numpy / scipy only).

Orientation: the matrix is the weight as ``nn.Linear`` stores it, ``(out_features, in_features)``, and a block
shape ``(rows, cols)`` is "rows x cols (out x in)": ``4x1`` means 4 consecutive output channels x 1 input
channel. The layout is BSR over that matrix:

* ``indptr``  int32 ``(out_features // rows + 1,)``: block-row pointers;
* ``indices`` int32 ``(nnz_blocks,)``: block-column indices, strictly increasing inside each block row;
* ``data``    ``(nnz_blocks, rows, cols)`` float32, or int8 with ``scales`` (float32 ``(out_features,)``,
  one per output channel: ``W[o, :] = scales[o] * data[...]``);
* ``bias``    optional float32 ``(out_features,)``.

Every array is validated on construction (dtypes, shapes, contiguity, index ranges and order), so the jitted
kernels never see inconsistent input. The matrix owns its arrays: each is copied on construction (unless it is
already a read-only array owning its memory) and stored read-only, so a caller changing the arrays it passed in
changes neither the matrix nor the padded copies the kernels cache, and ``m.indices[0] = ...`` raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["BlockSparseMatrix", "parse_block", "format_block", "quantize_per_channel"]

_INDEX_DTYPE = np.int32
_VALUE_DTYPES = (np.dtype(np.float32), np.dtype(np.int8))


def parse_block(block: Any) -> tuple[int, int]:
    """``"4x1"``, ``(4, 1)`` or ``[4, 1]`` -> ``(4, 1)`` (rows = output channels, cols = input channels)."""
    if isinstance(block, str):
        parts = block.lower().replace(" ", "").split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"block shape {block!r} is not of the form 'RxC' (out x in), e.g. '4x1'")
        r, c = int(parts[0]), int(parts[1])
    else:
        try:
            r, c = (int(v) for v in block)
        except (TypeError, ValueError):
            raise ValueError(f"block shape {block!r} is not a pair of ints or a 'RxC' string") from None
    if r < 1 or c < 1:
        raise ValueError(f"block shape {block!r} must have positive sides")
    return r, c


def format_block(block: tuple[int, int]) -> str:
    """``(4, 1)`` -> ``"4x1"`` (out x in)."""
    return f"{block[0]}x{block[1]}"


def quantize_per_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel: ``weight ~= scales[:, None] * q`` with ``q`` in [-127, 127].

    All-zero rows get scale 1 (their q is 0). Returns ``(q int8, scales float32)``.
    """
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {w.shape}")
    amax = np.abs(w).max(axis=1) if w.shape[1] else np.zeros(w.shape[0], np.float32)
    scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scales[:, None]), -127, 127).astype(np.int8)
    return q, scales


def _owned(a: np.ndarray, dtype=None) -> np.ndarray:
    """``a`` as a read-only, C-contiguous array that nobody else can write: a copy, unless ``a`` already is a
    read-only array owning its memory (one of ours, shared between matrices by ``with_bias`` / ``dequantize``)."""
    if not a.flags.writeable and a.base is None and a.flags.c_contiguous and (dtype is None or a.dtype == dtype):
        return a
    out = np.array(a, dtype=dtype, order="C", copy=True)
    out.flags.writeable = False
    return out


def _check_array(name: str, a: Any, dtypes: tuple[np.dtype, ...], ndim: int) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype not in dtypes:
        allowed = " or ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} must have dtype {allowed}, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    return a


def _own(m: "BlockSparseMatrix", name: str, a: np.ndarray) -> np.ndarray:
    """Store the owned (read-only) version of checked array ``a`` as field ``name`` of ``m``; returns it."""
    a = _owned(a)
    object.__setattr__(m, name, a)
    return a


@dataclass(frozen=True, eq=False)
class BlockSparseMatrix:
    """A Linear weight ``(out_features, in_features)`` in block-sparse (BSR) form; see the module docstring."""

    shape: tuple[int, int]
    block: tuple[int, int]
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    scales: np.ndarray | None = None
    bias: np.ndarray | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            n_out, n_in = (int(v) for v in self.shape)
        except (TypeError, ValueError):
            raise ValueError(f"shape must be (out_features, in_features), got {self.shape!r}") from None
        if n_out < 1 or n_in < 1:
            raise ValueError(f"shape {self.shape} must be positive")
        br, bc = parse_block(self.block)
        object.__setattr__(self, "shape", (n_out, n_in))
        object.__setattr__(self, "block", (br, bc))
        if n_out % br or n_in % bc:
            raise ValueError(
                f"block {br}x{bc} (out x in) does not divide the matrix shape {n_out}x{n_in} (out x in)"
            )
        nbr, nbc = n_out // br, n_in // bc
        # Index arrays: int32 or int64 accepted, stored as int32 C-contiguous.
        for name in ("indptr", "indices"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.dtype.kind not in "iu":
                raise ValueError(f"{name} must be an integer numpy array, got {getattr(a, 'dtype', type(a))}")
            if a.ndim != 1:
                raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
            if a.size and (a.min() < 0 or a.max() > np.iinfo(np.int32).max):
                raise ValueError(f"{name} has values outside [0, 2**31)")
            object.__setattr__(self, name, _owned(a, _INDEX_DTYPE))
        indptr, indices = self.indptr, self.indices
        if indptr.shape[0] != nbr + 1:
            raise ValueError(f"indptr must have out_features / {br} + 1 = {nbr + 1} entries, got {indptr.shape[0]}")
        if indptr[0] != 0:
            raise ValueError(f"indptr[0] must be 0, got {indptr[0]}")
        if np.any(np.diff(indptr) < 0):
            raise ValueError("indptr must be non-decreasing")
        nnzb = int(indptr[-1])
        if indices.shape[0] != nnzb:
            raise ValueError(f"indices has {indices.shape[0]} entries but indptr[-1] = {nnzb}")
        if nnzb and indices.max() >= nbc:
            raise ValueError(f"block-column index {int(indices.max())} out of range [0, {nbc})")
        if nnzb > 1:
            step = np.diff(indices.astype(np.int64))
            row_start = np.zeros(nnzb, dtype=bool)
            row_start[indptr[:-1][indptr[:-1] < nnzb]] = True
            if np.any((step <= 0) & ~row_start[1:]):
                raise ValueError("block-column indices must be strictly increasing within each block row")
        data = _own(self, "data", _check_array("data", self.data, _VALUE_DTYPES, 3))
        if data.shape != (nnzb, br, bc):
            raise ValueError(f"data must have shape (nnz_blocks, {br}, {bc}) = {(nnzb, br, bc)}, got {data.shape}")
        if data.dtype == np.int8:
            if self.scales is None:
                raise ValueError("int8 data needs per-output-channel scales (float32, shape (out_features,))")
            s = _own(self, "scales", _check_array("scales", self.scales, (np.dtype(np.float32),), 1))
            if s.shape != (n_out,):
                raise ValueError(f"scales must have shape ({n_out},), got {s.shape}")
            if not np.all(np.isfinite(s)):
                raise ValueError("scales must be finite")
        elif self.scales is not None:
            raise ValueError("scales are only allowed with int8 data")
        elif not np.all(np.isfinite(data)):
            raise ValueError("data contains NaN or inf")
        if self.bias is not None:
            b = _own(self, "bias", _check_array("bias", self.bias, (np.dtype(np.float32),), 1))
            if b.shape != (n_out,):
                raise ValueError(f"bias must have shape ({n_out},), got {b.shape}")

    # ------------------------------------------------------------------ properties
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def nnz_blocks(self) -> int:
        return int(self.indptr[-1])

    @property
    def nnz(self) -> int:
        """Stored weights (the values inside the kept blocks, zeros included)."""
        return self.data.size

    @property
    def density(self) -> float:
        return self.nnz / (self.shape[0] * self.shape[1])

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def __repr__(self) -> str:
        return (
            f"BlockSparseMatrix(shape={self.shape}, block={format_block(self.block)} (out x in), "
            f"dtype={self.dtype}, nnz_blocks={self.nnz_blocks}, sparsity={self.sparsity:.3f}, "
            f"bias={self.bias is not None})"
        )

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_dense(
        cls,
        weight: np.ndarray,
        block: Any = (4, 1),
        *,
        mask: np.ndarray | None = None,
        bias: np.ndarray | None = None,
        dtype: str | np.dtype = "float32",
    ) -> "BlockSparseMatrix":
        """Pack a dense ``(out_features, in_features)`` weight.

        Without ``mask`` a block is kept when any of its values is non-zero. ``mask`` is either element-wise
        (same shape as ``weight``; values outside it are zeroed, a block is kept if any mask entry in it is
        set) or block-wise (shape ``(out/rows, in/cols)``). ``dtype="int8"`` quantizes symmetrically per
        output channel.
        """
        w = np.asarray(weight)
        if w.ndim != 2:
            raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {w.shape}")
        if w.dtype.kind not in "fiu":
            raise ValueError(f"weight must be numeric, got dtype {w.dtype}")
        w = w.astype(np.float32)
        if not np.all(np.isfinite(w)):
            raise ValueError("weight contains NaN or inf")
        br, bc = parse_block(block)
        n_out, n_in = w.shape
        if n_out % br or n_in % bc:
            raise ValueError(
                f"block {br}x{bc} (out x in) does not divide the matrix shape {n_out}x{n_in} (out x in)"
            )
        nbr, nbc = n_out // br, n_in // bc
        if mask is not None:
            m = np.asarray(mask)
            if m.shape == w.shape:
                m = m.astype(bool)
                w = np.where(m, w, np.float32(0))
                keep = m.reshape(nbr, br, nbc, bc).any(axis=(1, 3))
            elif m.shape == (nbr, nbc):
                keep = m.astype(bool)
                w = w * np.repeat(np.repeat(keep, br, axis=0), bc, axis=1)
            else:
                raise ValueError(
                    f"mask must have the weight's shape {w.shape} or the block grid's shape {(nbr, nbc)}, "
                    f"got {m.shape}"
                )
        else:
            keep = (w.reshape(nbr, br, nbc, bc) != 0).any(axis=(1, 3))
        rows, cols = np.nonzero(keep)  # row-major order: sorted by row, then column
        indptr = np.zeros(nbr + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=nbr), out=indptr[1:])
        blocks = w.reshape(nbr, br, nbc, bc).transpose(0, 2, 1, 3)[rows, cols]  # (nnzb, br, bc)
        scales = None
        dt = np.dtype(dtype)
        if dt == np.int8:
            _, scales = quantize_per_channel(w)
            row_of = np.repeat(np.arange(nbr), np.diff(indptr))
            s = scales.reshape(nbr, br)[row_of][:, :, None]
            blocks = np.clip(np.rint(blocks / s), -127, 127).astype(np.int8)
        elif dt != np.float32:
            raise ValueError(f"dtype must be 'float32' or 'int8', got {dtype!r}")
        b = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        return cls(
            shape=(n_out, n_in),
            block=(br, bc),
            indptr=indptr,
            indices=cols,
            data=np.ascontiguousarray(blocks, dtype=dt),
            scales=scales,
            bias=b,
        )

    def to_dense(self) -> np.ndarray:
        """The dense float32 ``(out_features, in_features)`` weight (int8 values are dequantized)."""
        br, bc = self.block
        n_out, n_in = self.shape
        nbr, nbc = n_out // br, n_in // bc
        grid = np.zeros((nbr, nbc, br, bc), dtype=np.float32)
        rows = np.repeat(np.arange(nbr), np.diff(self.indptr))
        grid[rows, self.indices] = self.data
        dense = grid.transpose(0, 2, 1, 3).reshape(n_out, n_in)
        if self.scales is not None:
            dense *= self.scales[:, None]
        return dense

    def block_mask(self) -> np.ndarray:
        """Boolean ``(out/rows, in/cols)`` grid of the stored blocks."""
        br, bc = self.block
        m = np.zeros((self.shape[0] // br, self.shape[1] // bc), dtype=bool)
        m[np.repeat(np.arange(m.shape[0]), np.diff(self.indptr)), self.indices] = True
        return m

    def to_bsr(self):
        """A ``scipy.sparse.bsr_array`` of the float32 weight (int8 is dequantized; the bias is not included)."""
        import scipy.sparse as sp

        return sp.bsr_array((self.dequantize().data, self.indices.copy(), self.indptr.copy()), shape=self.shape,
                            blocksize=self.block)

    def dequantize(self) -> "BlockSparseMatrix":
        """A float32 copy with the per-output-channel scales folded into the values (``float32(code) * scale``,
        the values the int8 codes stand for; no scales left); same blocks, same bias."""
        data = self.data.astype(np.float32)
        if self.scales is not None:
            br = self.block[0]
            rows = np.repeat(np.arange(self.shape[0] // br), np.diff(self.indptr))
            data *= self.scales.reshape(-1, br)[rows][:, :, None]
        return BlockSparseMatrix(self.shape, self.block, self.indptr, self.indices, data, None, self.bias)

    @classmethod
    def from_bsr(
        cls, matrix: Any, *, bias: np.ndarray | None = None, dtype: str | np.dtype = "float32"
    ) -> "BlockSparseMatrix":
        """From a ``scipy.sparse`` BSR array/matrix (duplicates are summed, indices sorted; stored zero blocks
        are kept, so the sparsity pattern survives)."""
        import scipy.sparse as sp

        if not sp.issparse(matrix) or matrix.format != "bsr":
            raise ValueError(f"expected a scipy.sparse BSR array, got {type(matrix).__name__}")
        m = matrix.copy()
        m.sum_duplicates()  # also sorts indices
        br, bc = m.blocksize
        data = np.asarray(m.data)
        if data.dtype.kind not in "fiu":
            raise ValueError(f"BSR data must be real, got dtype {data.dtype}")
        data = data.astype(np.float32)
        n_out = m.shape[0]
        scales = None
        dt = np.dtype(dtype)
        if dt == np.int8:
            rows = np.repeat(np.arange(n_out // br), np.diff(m.indptr))
            # Per-channel amax over the stored blocks of each output channel.
            amax = np.zeros(n_out, dtype=np.float32)
            if data.shape[0]:
                per_row = np.abs(data).max(axis=2)  # (nnzb, br)
                np.maximum.at(amax.reshape(-1, br), rows, per_row)
            scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
            s = scales.reshape(-1, br)[rows][:, :, None]
            data = np.clip(np.rint(data / s), -127, 127).astype(np.int8)
        elif dt != np.float32:
            raise ValueError(f"dtype must be 'float32' or 'int8', got {dtype!r}")
        b = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        return cls(
            shape=m.shape, block=(br, bc), indptr=np.asarray(m.indptr), indices=np.asarray(m.indices),
            data=np.ascontiguousarray(data), scales=scales, bias=b,
        )

    def with_bias(self, bias: np.ndarray | None) -> "BlockSparseMatrix":
        """The same weight with another bias (arrays are shared, not copied)."""
        b = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        return BlockSparseMatrix(self.shape, self.block, self.indptr, self.indices, self.data, self.scales, b)

    def quantize(self) -> "BlockSparseMatrix":
        """An int8 copy (per-output-channel symmetric scales); int8 input is returned unchanged."""
        if self.dtype == np.int8:
            return self
        return BlockSparseMatrix.from_bsr(self.to_bsr(), bias=self.bias, dtype="int8")
