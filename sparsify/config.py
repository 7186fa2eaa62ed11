"""Base class for every configuration section of a recipe.

A config is a frozen pydantic model that validates itself: field types and ranges are declared on the
fields, cross-field rules live in a ``model_validator``. Unknown keys are rejected (``extra="forbid"``).
To blame one field from a cross-field rule, raise :class:`FieldError` naming it; the recipe loader then
reports that field's key path and line.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Config(BaseModel):
    """Frozen, strict-keyed recipe section."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, protected_namespaces=())


class FieldError(ValueError):
    """A validation error that belongs to one field (or a sub-path) of the config being validated."""

    def __init__(self, field: str | tuple, message: str):
        self.field = (field,) if isinstance(field, str) else tuple(field)
        super().__init__(message)


class RecipeFieldError(FieldError):
    """A :class:`FieldError` whose ``field`` is a key path from the recipe's root (e.g. ``("teacher",
    "name_or_path")``), for a technique that finds a problem outside its own section."""

    from_root = True


def epochs_to_steps(epochs: float, steps_per_epoch: int | None) -> int:
    """A point given in epochs as an optimizer step (schedules count optimizer steps)."""
    if not steps_per_epoch or steps_per_epoch < 1:
        raise ValueError("steps_per_epoch (optimizer steps per epoch, >= 1) is needed to convert epochs to steps")
    return int(round(epochs * steps_per_epoch))


def check_start_within_training(start_step: int | None, start_epoch: float | None, training, consequence: str) -> None:
    """A technique's start must come before the end of training; a FieldError naming start_step / start_epoch."""
    if start_step is not None and training.steps is not None and start_step >= training.steps:
        raise FieldError("start_step", f"start_step {start_step} is not before the last training step "
                                       f"{training.steps} (training.steps): {consequence}")
    if start_epoch is not None and training.epochs is not None and start_epoch >= training.epochs:
        raise FieldError("start_epoch", f"start_epoch {start_epoch:g} is not before the end of training "
                                        f"({training.epochs:g} epochs, training.epochs): {consequence}")
