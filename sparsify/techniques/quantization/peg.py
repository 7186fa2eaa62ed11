"""Per-embedding-group (PEG) activation quantization (Bondarenko et al., "Understanding and Overcoming the
Challenges of Efficient Transformer Quantization", 2021).

The last (hidden) dimension ``D`` of an activation is split into ``K`` groups of ``D / K`` dimensions, each with
its own range. With a permutation the dimensions are first sorted by their observed range (``hi - lo``,
ascending, stable), so the few outlier dimensions land together in the last group and no longer stretch the
range of the others.

Convention (shared with the export): group ``g`` holds the dimensions ``permutation[g * D/K : (g + 1) * D/K]``
(``permutation = arange(D)`` when there is none). Quantizing needs no data movement: each dimension looks up
its group's scale and zero point through :func:`group_index`.
"""

from __future__ import annotations

import torch


def check_groups(width: int, groups: int) -> None:
    if groups < 1 or width % groups:
        raise ValueError(f"{groups} groups do not divide the width {width}")


def sort_permutation(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Dimensions sorted by observed range ``hi - lo`` (ascending, ties by index), int64 ``(D,)``."""
    return torch.sort((hi - lo).float().cpu(), stable=True).indices.to(torch.int64)


def group_index(width: int, groups: int, permutation: torch.Tensor | None = None) -> torch.Tensor:
    """Group of each dimension, int64 ``(D,)``: ``index[permutation[j]] = j // (D / K)``."""
    check_groups(width, groups)
    slots = torch.arange(width, dtype=torch.int64) // (width // groups)
    if permutation is None:
        return slots
    index = torch.empty(width, dtype=torch.int64)
    index[permutation.cpu().long()] = slots
    return index


def group_ranges(lo: torch.Tensor, hi: torch.Tensor, groups: int,
                 permutation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ranges ``(K,)`` from per-dimension ranges ``(D,)``: the min of ``lo`` and max of ``hi`` over
    each group's dimensions."""
    width = lo.shape[-1]
    check_groups(width, groups)
    if permutation is not None:
        perm = permutation.to(lo.device).long()
        lo, hi = lo[perm], hi[perm]
    return lo.reshape(groups, -1).amin(dim=1), hi.reshape(groups, -1).amax(dim=1)


def expand(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-group values ``(K,)`` -> per-dimension ``(D,)``."""
    return values[index.to(values.device)]
