"""8-bit quantization that keeps sparsity: QAT with fake quantization, per-embedding-group (PEG) activation
quantization, conversion for export, and a PTQ baseline.

``QuantizationConfig`` (pydantic only) is imported eagerly; ``Quantizer``, ``calibrate``, ``convert`` and the
fake-quant functions import torch and are loaded on first use, so that loading a recipe stays light.
"""

from __future__ import annotations

import importlib

from sparsify.techniques.quantization.config import (
    DEFAULT_PEG_TARGETS,
    ActivationsConfig,
    PegConfig,
    QuantizationConfig,
)

__all__ = [
    "DEFAULT_PEG_TARGETS",
    "ActivationsConfig",
    "PegConfig",
    "QuantizationConfig",
    "Quantizer",
    "calibrate",
    "convert_activations",
    "fake_quant",
    "int8_linear",
    "load_converted",
    "peg",
    "read_converted",
    "save_converted",
    "trained_embeddings",
]

_LAZY = {
    "Quantizer": ("sparsify.techniques.quantization.quantizer", "Quantizer"),
    "calibrate": ("sparsify.techniques.quantization.convert", "calibrate"),
    "convert_activations": ("sparsify.techniques.quantization.convert", "convert_activations"),
    "int8_linear": ("sparsify.techniques.quantization.convert", "int8_linear"),
    "load_converted": ("sparsify.techniques.quantization.convert", "load_converted"),
    "read_converted": ("sparsify.techniques.quantization.convert", "read_converted"),
    "save_converted": ("sparsify.techniques.quantization.convert", "save_converted"),
    "trained_embeddings": ("sparsify.techniques.quantization.convert", "trained_embeddings"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in ("fake_quant", "peg"):
        return importlib.import_module(f"sparsify.techniques.quantization.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
