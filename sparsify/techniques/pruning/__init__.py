"""Block-wise gradual magnitude pruning: ``PruningConfig`` (recipe section) and ``BlockPruner`` (the technique).

The config imports no torch, so that loading a recipe stays light; ``BlockPruner`` is imported on first use.
"""

from __future__ import annotations

from sparsify.techniques.pruning.config import (
    DEFAULT_INCLUDE,
    ORIENTATION,
    PruningConfig,
    PruningOverride,
    describe_block,
    format_block,
    parse_block,
)

__all__ = [
    "DEFAULT_INCLUDE",
    "ORIENTATION",
    "BlockPruner",
    "PruningConfig",
    "PruningOverride",
    "describe_block",
    "format_block",
    "parse_block",
]


def __getattr__(name: str):
    if name == "BlockPruner":
        from sparsify.techniques.pruning.pruner import BlockPruner

        return BlockPruner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
