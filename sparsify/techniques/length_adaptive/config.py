"""Recipe section of the ``length_adaptive`` technique (pydantic only: importing this module imports no torch).

    techniques:
      - kind: length_adaptive
        length_drop_ratio_bound: 0.2     # each layer keeps at least 80% of the previous layer's tokens
        num_sandwich: 2                  # random sub-models per batch, besides the full and the smallest
        layer_drop: 0.0                  # LayerDrop probability of each layer in the random sub-models
        start_step: 0                    # or start_epoch
        inplace_distillation_weight: 1.0
        length_config: [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]   # optional: evaluated and stored with the model

A *length configuration* gives, for each encoder layer, how many tokens leave that layer: either absolute
token counts (ints, e.g. ``[64, 56, 48, 40, 32, 24]``) or ratios of the input's length (floats in (0, 1], e.g.
``[1.0, 0.9, 0.8]``), never a mix; non-increasing from one layer to the next; one value per layer. For an example
with ``n`` real tokens (padding excluded), layer ``i`` keeps ``min(kept by layer i-1, max(1, ceil(r_i * n)))``
tokens for a ratio ``r_i`` and ``min(kept by layer i-1, l_i)`` for an absolute length ``l_i``; [CLS] (the first
token) is always kept. :func:`kept_lengths` is that rule, shared by the inference wrapper and the FLOPs counter.

Checks that need the model (the number of layers) run in ``LengthDrop.prepare``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sparsify.config import Config, FieldError, check_start_within_training, epochs_to_steps
from sparsify.errors import SparsifyError

LENGTH_CONFIG_HELP = (
    "a list with one kept length per encoder layer: absolute token counts (ints >= 1, e.g. [64, 48, 32]) or "
    "ratios of the input length (floats in (0, 1], e.g. [1.0, 0.75, 0.5]), non-increasing"
)


def check_length_config(values, num_layers: int | None = None, key: str = "length_config") -> tuple:
    """Validate a length configuration; returns it as a tuple of ints (absolute) or floats (ratios).

    Raises :class:`FieldError` on ``key`` for: not a list, empty, a mix of ints and floats, a value out of
    range, lengths that grow from one layer to the next, or (when ``num_layers`` is given) a size that differs
    from the number of layers.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise FieldError(key, f"must be {LENGTH_CONFIG_HELP}; got {values!r}")
    values = tuple(values)
    if not values:
        raise FieldError(key, f"is empty: give {LENGTH_CONFIG_HELP}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise FieldError(key, f"holds a value that is not a number: {list(values)}")
    ints = [isinstance(v, int) for v in values]
    if any(ints) and not all(ints):
        raise FieldError(key, f"mixes absolute lengths (ints) and ratios (floats): {list(values)}; write every "
                              "value as an int (tokens) or every value as a float (ratio, e.g. 1.0 not 1)")
    if all(ints):
        bad = [v for v in values if v < 1]
        if bad:
            raise FieldError(key, f"absolute lengths must be >= 1 token (the [CLS] token is always kept), got {bad}")
    else:
        bad = [v for v in values if not (0.0 < v <= 1.0) or math.isnan(v)]
        if bad:
            raise FieldError(key, f"ratios of the input length must be in (0, 1], got {bad} (for token counts, "
                                  "write ints)")
    for i in range(1, len(values)):
        if values[i] > values[i - 1]:
            raise FieldError(key, f"kept lengths must not grow from one layer to the next: layer {i} keeps "
                                  f"{values[i]:g} after layer {i - 1} kept {values[i - 1]:g} ({list(values)})")
    if num_layers is not None and len(values) != num_layers:
        raise FieldError(key, f"has {len(values)} value(s) but the model has {num_layers} encoder layers: give "
                              "one kept length per layer")
    return values


def is_ratio_config(values) -> bool:
    """True for a configuration of ratios (floats), False for absolute lengths (ints)."""
    return isinstance(values[0], float)


def kept_count(value: int | float, n_input: int, n_current: int) -> int:
    """Tokens kept by one layer for one example: ``n_input`` real input tokens, ``n_current`` entering the
    layer. A ratio keeps ``ceil(r * n_input)`` (at least 1, [CLS]); an absolute length keeps ``l``; neither
    keeps more than entered."""
    if isinstance(value, float):
        # round first: 0.3 * 10 is 3.0000000000000004 in floating point, which must keep 3 tokens, not 4
        wanted = max(1, math.ceil(round(value * n_input, 6)))
    else:
        wanted = max(1, int(value))
    return min(n_current, wanted)


def kept_lengths(length_config, n_input: int, skip_layers=()) -> list[int]:
    """Tokens leaving each layer for an example of ``n_input`` real tokens (a skipped layer keeps its input)."""
    out, current = [], n_input
    for i, value in enumerate(length_config):
        if i not in skip_layers:
            current = kept_count(value, n_input, current)
        out.append(current)
    return out


class LengthAdaptiveConfig(Config):
    """Length-adaptive training (Kim & Cho 2021, "Length-Adaptive Transformer"): LengthDrop with the sandwich
    rule and in-place distillation, so that one model runs at any per-layer sequence length.

    Each batch trains the full model (the loop's usual loss, distillation from a teacher included), the
    smallest sub-model (every layer keeps ``1 - length_drop_ratio_bound`` of the previous layer's tokens) and
    ``num_sandwich`` random sub-models (each layer keeps a fraction drawn uniformly from
    ``[1 - length_drop_ratio_bound, 1]`` of the previous layer's tokens); the sub-models learn from the full
    model's logits (KL, detached). Tokens are dropped by significance: the attention they receive, summed over
    the heads and over the real query tokens. Only a teacher's logit term is compatible with token dropping;
    hidden-state and attention terms of distillation apply to the full model, which sees every token.
    """

    kind: Literal["length_adaptive"] = "length_adaptive"
    length_drop_ratio_bound: float = Field(
        0.2, description="In (0, 1): each layer of a sampled sub-model keeps at least (1 - bound) of the previous "
        "layer's tokens (the paper's p; 0.2 there)."
    )
    num_sandwich: int = Field(2, ge=0, description="Random sub-models per batch, besides the full and the smallest.")
    layer_drop: float = Field(
        0.0, ge=0.0, lt=1.0, description="LayerDrop: probability that a random sub-model skips a layer, in [0, 1)."
    )
    start_step: int | None = Field(None, ge=0, description="Optimizer step from which sub-models are trained "
                                   "(default 0); before it, the loss is the full model's.")
    start_epoch: float | None = Field(None, ge=0, description="Instead of start_step; converted to optimizer steps.")
    inplace_distillation_weight: float = Field(
        1.0, ge=0.0, description="Weight of each sub-model's KL to the full model's logits (summed over sub-models)."
    )
    temperature: float = Field(1.0, gt=0.0, description="Softmax temperature of the in-place distillation KL.")
    length_config: tuple[int | float, ...] | None = Field(
        None, description="Per-layer kept lengths, ints (tokens) or floats in (0, 1] (ratios of the input length), "
        "non-increasing, one per encoder layer; evaluated during training and saved with the model as "
        "length_config.json. Default: none (run `sparsify search` after training)."
    )
    seed: int | None = Field(None, description="Seed of the sub-model sampling; default: training.seed.")

    @field_validator("length_drop_ratio_bound")
    @classmethod
    def _bound(cls, v):
        if not 0.0 < v < 1.0:  # also rejects NaN
            raise ValueError(f"length_drop_ratio_bound must be in (0, 1) (a fraction of the tokens a layer may drop), "
                             f"got {v:g}")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.length_config is not None:
            check_length_config(self.length_config)
        if self.start_step is not None and self.start_epoch is not None:
            raise FieldError("start_epoch", "give start_step or start_epoch, not both")
        return self

    def resolve_start(self, steps_per_epoch: int | None = None) -> int:
        """The first optimizer step that trains sub-models."""
        if self.start_epoch is None:
            return self.start_step or 0
        return epochs_to_steps(self.start_epoch, steps_per_epoch)

    def check_recipe(self, recipe) -> None:
        """Checks against the rest of the recipe, before any model is loaded."""
        check_start_within_training(self.start_step, self.start_epoch, recipe.training,
                                    "no sub-model would be trained")
        layers = getattr(getattr(recipe, "model", None), "layers", None)
        if layers is not None and self.length_config is not None:
            check_length_config(self.length_config, len(layers))


# -- stored with the model ----------------------------------------------------------------------------------

LENGTH_CONFIG_FILE = "length_config.json"
_FORMAT = "sparsify.length_config"


def save_length_config(model_dir, length_config, **info) -> Path:
    """Write ``model_dir/length_config.json``: the configuration, its kind (ratio or absolute), the number of
    layers, the rule that turns it into kept tokens, and any extra JSON ``info`` (e.g. how it was chosen)."""
    values = check_length_config(length_config)
    path = Path(model_dir) / LENGTH_CONFIG_FILE
    doc = {
        "format": _FORMAT,
        "version": 1,
        "length_config": list(values),
        "kind": "ratio" if is_ratio_config(values) else "absolute",
        "num_layers": len(values),
        "rule": "tokens leaving layer i = min(tokens entering, max(1, ceil(r_i * n))) for a ratio r_i of the n real "
                "input tokens, min(tokens entering, l_i) for an absolute length l_i; [CLS] always kept; dropped "
                "after self-attention, before the feed-forward block, by attention received",
        **info,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def load_length_config(model_dir, num_layers: int | None = None, *, required: bool = False) -> tuple | None:
    """The configuration stored in ``model_dir/length_config.json`` (``model_dir`` may also name the file);
    None when there is none (unless ``required``). Raises :class:`SparsifyError` for a malformed file."""
    path = Path(model_dir)
    if path.is_dir():
        path = path / LENGTH_CONFIG_FILE
    if not path.is_file():
        if required:
            raise SparsifyError(f"{path}: no length configuration (run 'sparsify search RUN_DIR --budget ...')")
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SparsifyError(f"{path}: not a length configuration ({e})") from None
    if not isinstance(doc, dict) or "length_config" not in doc:
        raise SparsifyError(f"{path}: not a length configuration (no 'length_config' key)")
    values = doc["length_config"]
    if isinstance(values, list) and doc.get("kind") == "ratio":
        values = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in values]
    try:
        return check_length_config(values, num_layers)
    except FieldError as e:
        raise SparsifyError(f"{path}: length_config: {e}") from None
