"""Thread count of the numba kernels (numba keeps its own pool, separate from torch's: set both)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

__all__ = ["get_num_threads", "set_num_threads", "num_threads", "threading_layer"]


def _numba():
    import numba

    return numba


_fast_get = None  # numba's own reader of this thread's setting, once its pool is up


def get_num_threads() -> int:
    """Threads the next kernel call will use. The public ``numba.get_num_threads`` checks that the pool is
    launched on every call (about 1 us, a few percent of a 384 x 384 product over 128 tokens); after the first
    call this reads the setting directly (0.14 us), falling back to the public function if that is missing."""
    global _fast_get
    if _fast_get is not None:
        n = _fast_get()
        if n > 0:
            return int(n)
    n = int(_numba().get_num_threads())  # launches the pool on first use
    if _fast_get is None:
        from numba.np.ufunc import parallel

        _fast_get = getattr(parallel, "_get_num_threads", None) or (lambda: 0)
    return n


def set_num_threads(n: int) -> None:
    """Set the kernels' thread count (1 <= n <= numba.config.NUMBA_NUM_THREADS, the pool size)."""
    numba = _numba()
    if not isinstance(n, int) or isinstance(n, bool):
        raise ValueError(f"thread count must be an int, got {n!r}")
    limit = int(numba.config.NUMBA_NUM_THREADS)
    if not 1 <= n <= limit:
        raise ValueError(f"thread count must be in [1, {limit}] (NUMBA_NUM_THREADS), got {n}")
    numba.set_num_threads(n)


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Temporarily use ``n`` threads (``None``: leave the current setting)."""
    if n is None:
        yield
        return
    old = get_num_threads()
    set_num_threads(n)
    try:
        yield
    finally:
        _numba().set_num_threads(old)


def threading_layer() -> str:
    """The numba threading layer in use (only known after the first parallel call)."""
    try:
        return str(_numba().threading_layer())
    except ValueError:
        return os.environ.get("NUMBA_THREADING_LAYER", "default (not started)")
