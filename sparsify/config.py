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
