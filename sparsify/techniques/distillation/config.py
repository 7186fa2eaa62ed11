"""Recipe section of the ``distillation`` technique (pydantic only: importing this module imports no torch).

    techniques:
      - kind: distillation
        task_weight: 0.5
        logits: {weight: 0.5, temperature: 2.0}      # classifiers; embedding models: embedding: {loss: cosine}
        hidden: {weight: 1.0, layer_map: {0: 1, 1: 3, 2: 5}}
        minilmv2: {weight: 1.0, relation_heads: 48}

Each term is a sub-section; a section that is absent (or ``null``) is off. Layers are 0-based encoder layer
indices; a ``layer_map`` maps a student layer to the teacher layer it learns from and defaults to the uniform
map (student layer ``i`` of ``S`` learns from teacher layer ``ceil((i + 1) * T / S) - 1`` of ``T``, so the last
student layer always learns from the last teacher layer).

Checks that need the models (layers they do not have, head counts, relation heads dividing the hidden sizes,
vocabularies) run in :meth:`sparsify.techniques.distillation.Distiller.prepare`, before training.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sparsify.config import Config, FieldError, RecipeFieldError  # noqa: F401 - re-exported


def _check_weight(value: float, field: str = "weight") -> None:
    if not value >= 0:  # also rejects NaN
        raise FieldError(field, f"must be >= 0, got {value}")


def _check_layer_map(layer_map: dict[int, int] | None) -> None:
    if layer_map is None:
        return
    if len(layer_map) == 0:
        raise FieldError("layer_map", "must map at least one student layer to a teacher layer (or be omitted)")
    bad = {s: t for s, t in layer_map.items() if s < 0 or t < 0}
    if bad:
        raise FieldError("layer_map", f"layer indices are 0-based and non-negative, got {bad}")


class LogitsTerm(Config):
    """KL(softmax(teacher / T) || softmax(student / T)) x T^2 (MSE for a single-output regression head)."""

    weight: float = 1.0
    temperature: float = 2.0

    @model_validator(mode="after")
    def _check(self):
        _check_weight(self.weight)
        if not self.temperature > 0:
            raise FieldError("temperature", f"must be > 0, got {self.temperature}")
        return self


class EmbeddingTerm(Config):
    """Sentence-embedding models (``data.task: embedding``): the student's pooled sentence embedding against the
    teacher's, ``cosine`` (1 - cosine similarity, averaged over examples) or ``mse`` (mean squared difference over
    examples and dimensions). Needs no labels."""

    weight: float = 1.0
    loss: Literal["cosine", "mse"] = Field("cosine", description="cosine: 1 - cos(student, teacher); mse: mean "
                                           "squared difference (of the embeddings as the model outputs them, "
                                           "normalised when it lists Normalize).")

    @model_validator(mode="after")
    def _check(self):
        _check_weight(self.weight)
        return self


class HiddenTerm(Config):
    """MSE between the hidden states of mapped layers, through a learned linear projection of the student's
    hidden states when the hidden sizes differ; with ``normalize``, ||s - t||^2 / ||t||^2 per layer."""

    weight: float = 1.0
    layer_map: dict[int, int] | None = Field(None, description="student layer -> teacher layer; default: uniform.")
    include_embeddings: bool = Field(False, description="Also match the embedding outputs.")
    normalize: bool = Field(False, description="Divide each layer's squared error by the squared norm of the "
                            "teacher's hidden states there (SquareHead): every layer counts alike, whatever its scale.")

    @model_validator(mode="after")
    def _check(self):
        _check_weight(self.weight)
        _check_layer_map(self.layer_map)
        return self


class AttentionTerm(Config):
    """KL between the self-attention distributions of mapped layers, per head (equal head counts)."""

    weight: float = 1.0
    layer_map: dict[int, int] | None = Field(None, description="student layer -> teacher layer; default: uniform.")

    @model_validator(mode="after")
    def _check(self):
        _check_weight(self.weight)
        _check_layer_map(self.layer_map)
        return self


class MiniLMTerm(Config):
    """MiniLM (Wang et al. 2020): last-layer self-attention KL + value_weight x value-relation KL
    (softmax(V V^T / sqrt(d_head))), per head. Needs equal head counts; hidden sizes may differ."""

    weight: float = 1.0
    value_weight: float = 1.0

    @model_validator(mode="after")
    def _check(self):
        _check_weight(self.weight)
        _check_weight(self.value_weight, "value_weight")
        return self


class MiniLMv2Term(Config):
    """MiniLMv2 (Wang et al. 2021): the sum over ``relations`` of the KL between the teacher's and the student's
    self-attention relations (softmax(A_r B_r^T / sqrt(d_r)) for A, B in {Q, K, V}), the concatenated heads
    being re-split into ``relation_heads`` heads, so that head counts and hidden sizes may differ."""

    weight: float = 1.0
    relation_heads: int = Field(48, description="Must divide both hidden sizes (the paper: 48 for base, 64 large).")
    teacher_layer: int | None = Field(None, description="0-based; default: the teacher's last layer.")
    student_layer: int | None = Field(None, description="0-based; default: the student's last layer.")
    relations: tuple[Literal["qq", "kk", "vv"], ...] = ("qq", "kk", "vv")

    @model_validator(mode="after")
    def _check(self):
        _check_weight(self.weight)
        if self.relation_heads < 1:
            raise FieldError("relation_heads", f"must be >= 1, got {self.relation_heads}")
        for name in ("teacher_layer", "student_layer"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise FieldError(name, f"is a 0-based layer index (or omitted for the last layer), got {value}")
        if not self.relations:
            raise FieldError("relations", "must name at least one of qq, kk, vv")
        if len(set(self.relations)) != len(self.relations):
            raise FieldError("relations", f"must be distinct, got {list(self.relations)}")
        return self


TERMS = ("logits", "embedding", "hidden", "attention", "minilm", "minilmv2")


class DistillationConfig(Config):
    """Teacher-student distillation: the task loss plus weighted distillation terms.

    total = task_weight x task loss (when labels are given) + sum of weight x term over the enabled terms.
    ``task_weight: 0`` trains on the teacher's soft targets only (the labels are then not read). The teacher
    itself is the recipe's ``teacher`` section.
    """

    kind: Literal["distillation"] = "distillation"
    task_weight: float = Field(1.0, description="Weight of the loss on the labels.")
    logits: LogitsTerm | None = None
    embedding: EmbeddingTerm | None = None
    hidden: HiddenTerm | None = None
    attention: AttentionTerm | None = None
    minilm: MiniLMTerm | None = None
    minilmv2: MiniLMv2Term | None = None
    keep_teacher_head: bool = Field(
        False, description="Copy the teacher's classification head (pooler and classifier) into the student and "
        "freeze it: the student learns to produce the features the teacher's head reads.")
    cache_teacher: bool = Field(
        False,
        description="Compute the teacher's outputs once per example (keyed by the batch's 'idx') and reuse them "
        "across epochs. Holds them in CPU memory: examples x tokens x hidden size x the captured layers.",
    )
    teacher_cache: str | None = Field(
        None,
        description="A directory that keeps the teacher's outputs across runs (implies cache_teacher): the first "
        "run writes them, later runs with the same teacher weights, tokenized training data and distillation terms "
        "read them instead of running the teacher. A directory built for another teacher, data or terms is "
        "refused; damaged shards are computed again.",
    )

    @model_validator(mode="after")
    def _check(self):
        _check_weight(self.task_weight, "task_weight")
        if self.teacher_cache is not None:
            if not self.teacher_cache.strip():
                raise FieldError(("teacher_cache",), "must be a directory path, got an empty string")
        if not any(getattr(self, t) is not None and getattr(self, t).weight > 0 for t in TERMS):
            raise FieldError(
                (), f"no distillation term is enabled: give at least one of {', '.join(TERMS)} with a weight > 0"
            )
        return self

    def enabled(self, term: str):
        """The sub-config of ``term`` if it is on (present, weight > 0), else None."""
        cfg = getattr(self, term)
        return cfg if cfg is not None and cfg.weight > 0 else None

    def check_recipe(self, recipe) -> None:
        """Cross-checks against the whole recipe, before any model is loaded."""
        if getattr(recipe, "teacher", None) is None:
            raise FieldError((), "distillation needs a teacher: add a 'teacher' section with its name_or_path")
        embedding_task = recipe.data.metric_task == "embedding"
        if embedding_task:
            if self.enabled("logits"):
                raise FieldError(("logits",), "compares class distributions, and an embedding model has no classes "
                                              "(data.task: embedding): use the embedding term (cosine or mse on the "
                                              "pooled embedding)")
            if self.keep_teacher_head:
                raise FieldError(("keep_teacher_head",), "an embedding model has no classification head "
                                                         "(data.task: embedding): remove it")
        elif self.enabled("embedding"):
            raise FieldError(("embedding",), f"compares pooled sentence embeddings: it needs data.task: embedding "
                                             f"(this task is {recipe.data.metric_task!r}); use logits for a classifier")
        layers = getattr(getattr(recipe, "model", None), "layers", None)
        if layers is not None:
            n = len(layers)
            for term in ("hidden", "attention"):
                cfg = self.enabled(term)
                if cfg is not None and cfg.layer_map is not None:
                    bad = sorted(s for s in cfg.layer_map if s >= n)
                    if bad:
                        raise FieldError(
                            (term, "layer_map"),
                            f"student layer(s) {bad} do not exist: the student keeps {n} layers "
                            f"(model.layers), numbered 0..{n - 1}",
                        )
            cfg = self.enabled("minilmv2")
            if cfg is not None and cfg.student_layer is not None and cfg.student_layer >= n:
                raise FieldError(
                    ("minilmv2", "student_layer"),
                    f"student layer {cfg.student_layer} does not exist: the student keeps {n} layers "
                    f"(model.layers), numbered 0..{n - 1}",
                )
