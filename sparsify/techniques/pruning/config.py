"""Recipe configuration of block-wise gradual magnitude pruning. Imports no torch.

    - kind: pruning
      block: 4x1                 # rows x cols of the weight as nn.Linear stores it: (out_features, in_features)
      final_sparsity: 0.9
      start_step: 0
      end_step: 1200             # or start_epoch / end_epoch
      update_every: 50
      score: l2                  # l1 | l2 (magnitude), taylor (moving average of |W * grad|), obs (layer-wise OBS)
      overrides:
        - {pattern: 'attention\\.', final_sparsity: 0.8}

Block orientation: "4x1" is 4 consecutive output channels x 1 input channel, "(out x in)". Peers disagree on
this (Intel's NxM puts N on output channels, SparseML's ``block4`` runs along the input), so every message
prints the orientation with the shape.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from sparsify.config import Config, FieldError, epochs_to_steps
from sparsify.layers import DEFAULT_INCLUDE, check_patterns

ORIENTATION = "(out x in)"


_BLOCK_RE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def parse_block(value: Any) -> tuple[int, int]:
    """``"4x1"``, ``[4, 1]`` or ``(4, 1)`` -> ``(4, 1)``; raises ValueError with an example otherwise."""
    rows = cols = None
    if isinstance(value, str):
        m = _BLOCK_RE.match(value)
        if m:
            rows, cols = int(m.group(1)), int(m.group(2))
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        rows, cols = value
    if rows is None:
        raise ValueError(f"block {value!r} is not a block shape: give rows x cols {ORIENTATION}, e.g. 4x1 or [4, 1]")
    if rows < 1 or cols < 1:
        raise ValueError(f"block {value!r}: rows and cols must be at least 1")
    return rows, cols


def format_block(block: tuple[int, int]) -> str:
    return f"{block[0]}x{block[1]}"


def describe_block(block: tuple[int, int]) -> str:
    """``(4, 1)`` -> ``"4x1 (out x in)"``, the way every message prints a block."""
    return f"{format_block(block)} {ORIENTATION}"


def _normalize_block(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    return format_block(parse_block(value))


def _check_fraction(value: float | None, name: str, *, upper_inclusive: bool = False) -> float | None:
    if value is None:
        return value
    ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not ok:
        interval = "[0, 1]" if upper_inclusive else "[0, 1)"
        hint = f" (a fraction of the weights: {value / 100:g} for {value:g}%)" if 1.0 < value <= 100.0 else ""
        raise ValueError(f"{name} must be in {interval}, got {value:g}{hint}")
    return value


class PruningOverride(Config):
    """A different target (and/or block) for the selected layers whose module name matches ``pattern``."""

    pattern: str = Field(min_length=1, description="Regular expression, searched in module names.")
    final_sparsity: float | None = Field(None, description="This layer's final sparsity, in [0, 1).")
    block: str | None = Field(None, description="This layer's block shape, e.g. 1x4 (out x in).")

    @field_validator("final_sparsity")
    @classmethod
    def _fraction(cls, v):
        return _check_fraction(v, "final_sparsity")

    @field_validator("block", mode="before")
    @classmethod
    def _block(cls, v):
        return _normalize_block(v)

    @model_validator(mode="after")
    def _check(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise FieldError("pattern", f"invalid regular expression {self.pattern!r}: {e}") from None
        if self.final_sparsity is None and self.block is None:
            raise FieldError("pattern", "an override changes final_sparsity, block or both: give at least one")
        return self

    @property
    def block_shape(self) -> tuple[int, int] | None:
        return None if self.block is None else parse_block(self.block)


class ObsConfig(Config):
    """Layer-wise Optimal Brain Surgeon for (r x 1) blocks (score: obs): every selected Linear layer's input
    Hessian H = X^T X is accumulated on calibration batches (``calibration_samples`` training
    examples, the same on every process: ``calibration_samples``), a block of rows R in input column c scores
    sum_{r in R} w_rc^2 / [H^-1]_cc, and after each mask update the kept weights of every row get the closed-form
    OBS correction for its whole pruned set (least squares on the calibration inputs)."""

    damping: float = Field(0.01, gt=0.0, le=1.0, description="Added to H's diagonal, as a fraction of its mean.")
    update_weights: bool = Field(True, description="Apply the OBS correction to the kept weights (else: scores "
                                 "only).")


class PruningConfig(Config):
    """Block-wise gradual pruning (Zhu & Gupta 2017, cubic schedule), counted in optimizer steps.

    Scores: ``l1`` / ``l2`` (block magnitude), ``taylor`` (a moving average of |W * grad| summed per block,
    updated after every backward pass from ``taylor_from_step`` on: Molchanov et al., Intel Neural Compressor's
    snip_momentum) and ``obs`` (second order, layer-wise, with a closed-form update of the kept weights: see
    ``obs``). ``scope: global`` ranks the blocks of all layers together (within min/max_sparsity per layer)."""

    kind: Literal["pruning"] = "pruning"
    block: str | None = Field(
        None,
        description="rows x cols of the weight as stored, (out_features, in_features): 4x1 = 4 output channels x 1 "
        "input channel; 1x1 = unstructured. Also [4, 1]. None/'auto': inferred from the starting model's zeros.",
    )
    score: Literal["l2", "l1", "taylor", "obs"] = Field(
        "l2", description="Block score: l2 / l1 norm of the block's weights; taylor: moving average of |W * grad| "
        "per block; obs: layer-wise Optimal Brain Surgeon (with the update of the kept weights).")
    taylor_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="score: taylor: score <- momentum x score + "
                                   "|W * grad| after every backward pass.")
    taylor_from_step: int | None = Field(None, ge=0, description="score: taylor: first optimizer step whose "
                                         "gradients enter the score (default: update_every steps before start_step).")
    obs: ObsConfig = Field(default_factory=ObsConfig, description="score: obs: damping and weight update.")
    calibration_samples: int = Field(256, ge=1, description="score: obs (and taylor when a mask update comes "
                                     "before the first gradient): training examples, a fixed random sample, whose "
                                     "Linear inputs / gradients are used.")
    scope: Literal["layer", "global"] = Field(
        "layer", description="layer: every layer reaches its target; global: one ranking across layers."
    )
    initial_sparsity: float = Field(0.0, description="Target at the start step, in [0, 1).")
    final_sparsity: float = Field(description="Target at the end step and after, in [0, 1).")
    start_step: int | None = Field(None, ge=0, description="Optimizer step of the first mask update (default 0).")
    end_step: int | None = Field(None, ge=0, description="Optimizer step at which the target is final.")
    start_epoch: float | None = Field(None, ge=0, description="Instead of start_step; converted to optimizer steps.")
    end_epoch: float | None = Field(None, ge=0, description="Instead of end_step; converted to optimizer steps.")
    update_every: int = Field(50, ge=1, description="Optimizer steps between mask updates inside the window.")
    include: tuple[str, ...] = Field(
        DEFAULT_INCLUDE, min_length=1, description="Regexes searched in module names; default: the encoder's Linear layers."
    )
    exclude: tuple[str, ...] = Field((), description="Regexes; a matching layer is not pruned.")
    min_sparsity: float | None = Field(None, description="Global scope: every layer at least this sparse.")
    max_sparsity: float | None = Field(None, description="Global scope: no layer sparser than this.")
    overrides: tuple[PruningOverride, ...] = Field((), description="First matching override wins.")
    tolerance: float = Field(0.005, ge=0.0, le=1.0, description="Allowed miss of the target at the end step.")

    @field_validator("initial_sparsity", "final_sparsity")
    @classmethod
    def _fraction(cls, v, info):
        return _check_fraction(v, info.field_name)

    @field_validator("min_sparsity", "max_sparsity")
    @classmethod
    def _bound(cls, v, info):
        return _check_fraction(v, info.field_name, upper_inclusive=True)

    @field_validator("block", mode="before")
    @classmethod
    def _block(cls, v):
        return _normalize_block(v)

    @field_validator("include", "exclude", mode="before")
    @classmethod
    def _listify(cls, v):
        return (v,) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self):
        check_patterns(self.include, "include")
        check_patterns(self.exclude, "exclude")
        if self.initial_sparsity > self.final_sparsity:
            raise FieldError(
                "initial_sparsity",
                f"initial_sparsity {self.initial_sparsity:g} is above final_sparsity {self.final_sparsity:g}",
            )
        steps = self.start_step is not None or self.end_step is not None
        epochs = self.start_epoch is not None or self.end_epoch is not None
        if steps and epochs:
            field = "start_epoch" if self.start_epoch is not None else "end_epoch"
            raise FieldError(field, "give the window in steps (start_step, end_step) or in epochs "
                                    "(start_epoch, end_epoch), not both")
        if steps and self.end_step is None:
            raise FieldError("end_step", "is required: the optimizer step at which final_sparsity is reached "
                                         "(equal to start_step for one-shot pruning)")
        if epochs and self.end_epoch is None:
            raise FieldError("end_epoch", "is required with start_epoch")
        if not steps and not epochs:
            raise FieldError("end_step", "give end_step (or end_epoch): when final_sparsity is reached")
        if steps and (self.start_step or 0) > self.end_step:
            raise FieldError("start_step", f"start_step {self.start_step} is after end_step {self.end_step}")
        if epochs and (self.start_epoch or 0.0) > self.end_epoch:
            raise FieldError("start_epoch", f"start_epoch {self.start_epoch:g} is after end_epoch {self.end_epoch:g}")
        for name in ("min_sparsity", "max_sparsity"):
            if getattr(self, name) is not None and self.scope != "global":
                raise FieldError(name, f"applies to scope: global only (scope is {self.scope!r}); "
                                       "with scope: layer every layer reaches its own target")
        if self.min_sparsity is not None and self.min_sparsity > self.final_sparsity:
            raise FieldError("min_sparsity", f"min_sparsity {self.min_sparsity:g} is above final_sparsity "
                                             f"{self.final_sparsity:g}: every layer would be sparser than the target")
        if self.max_sparsity is not None and self.max_sparsity < self.final_sparsity:
            raise FieldError("max_sparsity", f"max_sparsity {self.max_sparsity:g} is below final_sparsity "
                                             f"{self.final_sparsity:g}: the global target could not be reached")
        return self

    # -- derived values ------------------------------------------------------------------------------------

    @property
    def block_shape(self) -> tuple[int, int] | None:
        """``(rows, cols)`` of the weight as stored, (out, in); None when inferred from the model."""
        return None if self.block is None else parse_block(self.block)

    @property
    def uses_epochs(self) -> bool:
        return self.end_epoch is not None

    def resolve_steps(self, steps_per_epoch: int | None = None) -> tuple[int, int]:
        """``(start_step, end_step)`` in optimizer steps; epochs need ``steps_per_epoch``."""
        if not self.uses_epochs:
            return self.start_step or 0, self.end_step
        start = epochs_to_steps(self.start_epoch or 0.0, steps_per_epoch)
        end = epochs_to_steps(self.end_epoch, steps_per_epoch)
        return start, max(start, end)

    def check_recipe(self, recipe) -> None:
        """Checks against the rest of the recipe: the window must end within training."""
        training = recipe.training
        if self.end_step is not None and training.steps is not None and self.end_step > training.steps:
            raise FieldError("end_step", f"end_step {self.end_step} is after the last training step "
                                         f"{training.steps} (training.steps)")
        if self.end_epoch is not None and training.epochs is not None and self.end_epoch > training.epochs:
            raise FieldError("end_epoch", f"end_epoch {self.end_epoch:g} is after the end of training "
                                          f"({training.epochs:g} epochs, training.epochs)")
