"""CPU runtime for sparsify artifacts: ``SparseModel.from_pretrained(path)`` (numpy / numba / safetensors only;
nothing is compiled at import)."""

from sparsify.runtime.model import ArtifactError, SparseModel

__all__ = ["SparseModel", "ArtifactError"]
