"""Teacher-student distillation (logits, hidden states, attention maps, MiniLM and MiniLMv2 relations).

``DistillationConfig`` (pydantic only) is imported eagerly; ``Distiller`` and ``losses`` import torch and are
loaded on first use, so that loading a recipe stays light.
"""

from __future__ import annotations

import importlib

from sparsify.techniques.distillation.config import DistillationConfig, RecipeFieldError

__all__ = ["DistillationConfig", "Distiller", "RecipeFieldError", "losses", "uniform_layer_map"]


def __getattr__(name: str):
    if name in ("Distiller", "uniform_layer_map"):
        return getattr(importlib.import_module("sparsify.techniques.distillation.distiller"), name)
    if name == "losses":
        return importlib.import_module("sparsify.techniques.distillation.losses")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
