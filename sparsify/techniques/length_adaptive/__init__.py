"""Length-adaptive transformer (Kim & Cho 2021; Dynamic-TinyBERT, QuaLA-MiniLM): LengthDrop training, length
configurations, their FLOPs, an evolutionary search under a FLOPs budget, and length-adaptive inference.

``LengthAdaptiveConfig`` and the length-configuration helpers (pydantic / pure Python) are imported eagerly;
the torch parts (``LengthDrop``, ``forward_with_lengths``, ``LengthAdaptiveModel``) on first use, so that
loading a recipe stays light.

    config.py      recipe section, length-configuration rules, length_config.json
    lengthdrop.py  LengthDrop: the technique the training loop calls
    inference.py   forward_with_lengths / LengthAdaptiveModel: token dropping in a PyTorch model
    flops.py       FLOPs (2 x MACs) of a length configuration
    search.py      evolutionary search; ``sparsify search`` (main)
"""

from __future__ import annotations

import importlib

from sparsify.techniques.length_adaptive.config import (
    LENGTH_CONFIG_FILE,
    LengthAdaptiveConfig,
    check_length_config,
    kept_count,
    kept_lengths,
    load_length_config,
    save_length_config,
)

__all__ = [
    "LENGTH_CONFIG_FILE",
    "LengthAdaptiveConfig",
    "LengthAdaptiveModel",
    "LengthDrop",
    "check_length_config",
    "forward_with_lengths",
    "kept_count",
    "kept_lengths",
    "load_length_config",
    "sample_length_config",
    "save_length_config",
]

_LAZY = {
    "LengthDrop": "lengthdrop",
    "sample_length_config": "lengthdrop",
    "LengthAdaptiveModel": "inference",
    "forward_with_lengths": "inference",
    "length_adaptive": "inference",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"sparsify.techniques.length_adaptive.{_LAZY[name]}"), name)
    if name in ("flops", "search", "inference", "lengthdrop"):
        return importlib.import_module(f"sparsify.techniques.length_adaptive.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
