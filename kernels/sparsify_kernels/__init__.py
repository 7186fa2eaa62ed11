"""Block-sparse CPU kernels (numpy / numba / scipy only, never torch), installed as ``sparsify.kernels``.

Importing this package compiles nothing: kernels are jitted lazily on first call and cached on disk.
"""
