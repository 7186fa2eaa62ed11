"""Learning-rate schedules the trainer builds itself (the others come from ``transformers.get_scheduler``).

``rewind`` (oBERT's sawtooth): with mask updates at optimizer steps u_0 < u_1 < ... < u_n (the last one the
pruning window's end), the rate restarts at the peak at every update and decays linearly to ``floor`` x peak by
the next one; after the last update it restarts once more and decays linearly to 0 at the last step (the
recovery). Before u_0 the rate decays the same way from step 0. A linear warmup multiplies the first steps.
Factors are of the peak rate, indexed like LambdaLR: ``factor(t)`` is the rate of optimizer step t + 1.
"""

from __future__ import annotations


def rewind_factor(t: int, *, updates: list[int], total: int, warmup: int = 0, floor: float = 0.1) -> float:
    """The rewind schedule's factor after ``t`` optimizer steps."""
    bounds = sorted({u for u in updates if 0 < u < total})
    edges = [0, *bounds]
    start = max(e for e in edges if e <= t)
    if start == edges[-1]:  # the recovery: peak -> 0 at the last step
        end, low = total, 0.0
    else:
        end, low = edges[edges.index(start) + 1], floor
    progress = (t - start) / max(1, end - start)
    factor = 1.0 - (1.0 - low) * min(1.0, progress)
    if warmup and t < warmup:
        factor *= t / warmup
    return max(0.0, factor)


def rewind_schedule(optimizer, *, updates: list[int], total: int, warmup: int = 0, floor: float = 0.1):
    """A ``LambdaLR`` following :func:`rewind_factor` (its state is the step count, as for the other schedules)."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, lambda t: rewind_factor(t, updates=updates, total=total, warmup=warmup, floor=floor))
