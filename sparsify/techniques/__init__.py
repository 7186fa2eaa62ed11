"""The registry of compression techniques: recipe ``kind`` -> config class and implementation.

One explicit, literal table. Config classes are light (pydantic only) so that loading and checking a recipe
imports no torch; implementations are imported when a run uses them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from sparsify.techniques.distillation.config import DistillationConfig
from sparsify.techniques.length_adaptive.config import LengthAdaptiveConfig
from sparsify.techniques.pruning.config import PruningConfig
from sparsify.techniques.quantization.config import QuantizationConfig


@dataclass(frozen=True)
class TechniqueEntry:
    config: type
    implementation: str  # "module:Class"

    def load(self) -> type:
        module, _, name = self.implementation.partition(":")
        return getattr(importlib.import_module(module), name)


TECHNIQUES: dict[str, TechniqueEntry] = {
    "pruning": TechniqueEntry(PruningConfig, "sparsify.techniques.pruning.pruner:BlockPruner"),
    "distillation": TechniqueEntry(DistillationConfig, "sparsify.techniques.distillation.distiller:Distiller"),
    "length_adaptive": TechniqueEntry(LengthAdaptiveConfig, "sparsify.techniques.length_adaptive.lengthdrop:LengthDrop"),
    "quantization": TechniqueEntry(QuantizationConfig, "sparsify.techniques.quantization.quantizer:Quantizer"),
}
