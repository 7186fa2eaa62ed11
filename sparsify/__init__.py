"""sparsify: make BERT-style encoders small and fast, and run them on CPU.

``import sparsify`` is deliberately lean: it imports neither torch, transformers nor numba, and compiles no
kernel. Import the submodule you need (``sparsify.recipe``, ``sparsify.train``, ``sparsify.kernels``, ...).
"""

__version__ = "0.1.0"
