"""What every technique looks like to the training loop.

Techniques look like optimizers: the loop builds them from their recipe config, calls ``prepare`` once
before training, calls their per-step methods explicitly where they belong in the loop, saves and restores
their ``state_dict`` with each checkpoint, and calls ``finalize`` at the end. There is no event bus and no
wrapping of the optimizer: reading ``sparsify/train.py`` top to bottom shows when each one acts.

``state_dict()`` returns a nested dict whose leaves are torch tensors or JSON values (numbers, strings,
booleans, None, lists of those); checkpoints store the tensors as safetensors and the rest as JSON.

Errors about the recipe found in ``prepare`` (a pattern that matches no layer, a layer map naming a layer the
model does not have) raise :class:`sparsify.config.FieldError` naming the field of the technique's config;
the trainer turns it into a recipe error with the file, the line and the key path.
"""

from __future__ import annotations

from typing import Any, Protocol


class Technique(Protocol):
    config: Any

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
