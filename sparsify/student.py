"""Student initialization: a shallower student made of a subset of a model's encoder layers.

    student = shallow_student(AutoModelForSequenceClassification.from_pretrained(teacher_path), [0, 2, 4])

Works in place on BERT-style models (BERT, MiniLM, RoBERTa, ELECTRA...: ``<base>.encoder.layer``) and
DistilBERT (``<base>.transformer.layer``); the embeddings and the head are kept as they are.
"""

from __future__ import annotations

from torch import nn

from sparsify.techniques.distillation.config import RecipeFieldError


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer layers of a BERT-style or DistilBERT model (or of its base model)."""
    base = getattr(model, "base_model", model)
    for owner in (getattr(base, "encoder", None), getattr(base, "transformer", None)):
        layers = getattr(owner, "layer", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise TypeError(
        f"{type(model).__name__}: no encoder layers found (expected <base>.encoder.layer as in BERT/RoBERTa "
        "or <base>.transformer.layer as in DistilBERT)"
    )


def shallow_student(model: nn.Module, layers: list[int] | tuple[int, ...]) -> nn.Module:
    """Keep only the encoder layers ``layers`` (0-based, in this order) of ``model``; returns ``model``.

    The kept layers are the same modules (their weights are the chosen layers' weights); the config's layer
    count follows. Raises :class:`RecipeFieldError` on ``("model", "layers")`` for an index the model does not
    have.
    """
    old = encoder_layers(model)
    n = len(old)
    layers = list(layers)
    if not layers:
        raise RecipeFieldError(("model", "layers"), "must name at least one layer")
    bad = [i for i in layers if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n]
    if bad:
        raise RecipeFieldError(
            ("model", "layers"), f"layer(s) {bad} do not exist: the model has {n} layers, numbered 0..{n - 1}"
        )
    if len(set(layers)) != len(layers):
        raise RecipeFieldError(("model", "layers"), f"must be distinct, got {layers}")
    kept = nn.ModuleList([old[i] for i in layers])
    for new_index, layer in enumerate(kept):
        for module in layer.modules():  # keep per-layer indices (used by caches) consistent
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    base = getattr(model, "base_model", model)
    owner = base.encoder if getattr(base, "encoder", None) is not None and getattr(base.encoder, "layer", None) is old \
        else base.transformer
    owner.layer = kept
    config = getattr(model, "config", None)
    if config is not None:
        for key in ("num_hidden_layers", "n_layers"):
            if hasattr(config, key):
                setattr(config, key, len(kept))
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, (list, tuple)) and len(layer_types) == n:
            config.layer_types = [layer_types[i] for i in layers]
    for part in (base, getattr(base, "encoder", None), getattr(base, "transformer", None)):
        part_config = getattr(part, "config", None)
        if part_config is not None and part_config is not config:
            for key in ("num_hidden_layers", "n_layers"):
                if hasattr(part_config, key):
                    setattr(part_config, key, len(kept))
    return model
