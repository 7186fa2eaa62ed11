"""Recipes: YAML files loaded with a safe loader into typed, frozen, self-validating configs.

    recipe = load_recipe("recipes/sst2/minilm-l6-dense.yaml", overrides=["training.learning_rate=5e-5"])

Every error names the file, the line, the key path and what is allowed; a misspelt key gets a suggestion.
YAML holds literal values only: no tags, no expressions. ``--set key.path=value`` overrides any field,
its value parsed as a YAML scalar or flow collection.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from sparsify.config import Config, FieldError
from sparsify.errors import RecipeError
from sparsify.qa_windows import default_doc_stride
from sparsify.techniques import TECHNIQUES

KeyPath = tuple  # of str (mapping keys) and int (list indices)


class ModelConfig(Config):
    """The student: the model that is trained and compressed."""

    name_or_path: str = Field(min_length=1, description="Hub id, local directory or run directory.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    num_labels: int | None = Field(None, ge=1, le=100_000, description="Classes of the head; must match the "
                                   "labels of the data (1 for regression). Default: taken from the data.")
    layers: tuple[int, ...] | None = Field(
        None, description="Keep only these encoder layers of name_or_path (a shallower student), e.g. [0, 2, 4]."
    )
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="Override hidden and attention dropout.")

    @model_validator(mode="after")
    def _check_layers(self):
        if self.layers is not None:
            if len(self.layers) == 0:
                raise FieldError("layers", "must name at least one layer")
            if any(i < 0 for i in self.layers) or list(self.layers) != sorted(set(self.layers)):
                raise FieldError("layers", f"must be distinct, increasing, non-negative indices, got {list(self.layers)}")
        return self


class TeacherConfig(Config):
    """A frozen teacher for distillation (used by the ``distillation`` technique)."""

    name_or_path: str = Field(min_length=1, description="Run directory, local directory or hub id.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="The teacher's weights and compute.")
    device: str | None = Field(None, description="Default: the student's device.")


EMBEDDING = "embedding"  # data.task of a sentence-embedding model (no labels)
TOKEN_CLASSIFICATION = "token-classification"  # data.task of a per-token classifier (a list of words, a label each)
QUESTION_ANSWERING = "question-answering"  # data.task of extractive QA (question, context, SQuAD-style answers)
TOKEN_HEADS = (TOKEN_CLASSIFICATION, QUESTION_ANSWERING)  # heads that read every token

GLUE_TEXT_COLUMNS = {
    "cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"), "stsb": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"), "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
}


class PairsConfig(Config):
    """Labelled sentence pairs that score an embedding task (``data.task: embedding``): the ROC-AUC of the cosine
    similarity of the two embeddings of each pair for its binary label (MRPC: paraphrase or not)."""

    dataset: str | None = Field(None, description="Hub id or local dataset directory, e.g. nyu-mll/glue.")
    config: str | None = Field(None, description="Dataset configuration, e.g. mrpc.")
    file: str | None = Field(None, description="Local csv/tsv/json/jsonl/parquet file instead of a dataset.")
    split: str = Field("validation", description="Split of 'dataset'.")
    text_columns: tuple[str, str] = Field(("sentence1", "sentence2"), description="The two sentences of a pair.")
    label_column: str = Field("label", description="Binary labels: 1 (or true) for a positive pair.")
    max_samples: int | None = Field(None, ge=1, description="Use the first N pairs only.")

    @model_validator(mode="after")
    def _check_source(self):
        if (self.dataset is None) == (self.file is None):
            raise FieldError("dataset", "give exactly one of 'dataset' (hub id or directory) or 'file'")
        return self


class AugmentConfig(Config):
    """Augmentation for distillation (TinyBERT-style): ``copies`` noisy copies of every training example are added
    to the training data, without a label: the teacher labels them through the distillation terms, the task loss
    reads the original examples only. In a copy, each alphabetic word is replaced with probability
    ``replace_prob`` by one of its ``top_k`` nearest words (cosine of the student's input word embeddings; words of
    one WordPiece token only, the others stay) and masked with probability ``mask_prob`` (the tokenizer's mask
    token). Drawn once from ``seed``: every epoch and every resume sees the same copies."""

    copies: int = Field(1, ge=1, le=64, description="Augmented copies per training example.")
    replace_prob: float = Field(0.3, ge=0.0, le=1.0, description="Chance that a word of a copy is replaced by a "
                                "nearest neighbour.")
    mask_prob: float = Field(0.1, ge=0.0, le=1.0, description="Chance that a word of a copy is masked.")
    top_k: int = Field(15, ge=1, le=1000, description="Neighbours a replacement is drawn from (uniformly).")
    seed: int | None = Field(None, ge=0, lt=2**32, description="Default: training.seed.")

    @model_validator(mode="after")
    def _check_probs(self):
        if self.replace_prob + self.mask_prob > 1.0:
            raise FieldError("mask_prob", f"replace_prob + mask_prob is {self.replace_prob + self.mask_prob:g}: a "
                                          "word is replaced or masked or kept, so the two add up to at most 1")
        if self.replace_prob + self.mask_prob == 0.0:
            raise FieldError("replace_prob", "replace_prob and mask_prob are both 0: the copies would equal the "
                                             "originals; remove data.augment or give one of them > 0")
        return self


class DataConfig(Config):
    """Training and evaluation data: a hub/local dataset by name and config, or local files.

    With ``task: embedding`` the data needs no labels: every text of the text columns (each column's texts on
    their own, not as pairs) is one example, trained on and held out; ``.txt`` files hold one text per line
    (column ``text``). ``pairs`` adds a labelled pair evaluation.

    With ``task: token-classification`` an example is a list of words (``text_columns``, default ``tokens``) with
    one label per word (``label_column``, default ``ner_tags``: class ids or names, e.g. B-PER / I-PER / O); the
    first sub-word token of each word carries its label, the other tokens none.

    With ``task: question-answering`` an example is a question and a context (``text_columns``, default
    ``question, context``) and SQuAD-style answers (``label_column``, default ``answers``: ``{"text": [...],
    "answer_start": [character offsets]}``). A context too long for ``max_length`` is split into windows (a
    sliding window, as the runtime's ``answer``): each window is one feature holding the whole question and a
    slice of the context, consecutive slices sharing ``doc_stride`` tokens. A window that holds the whole answer
    trains the model to point at the answer's tokens, any other window at the first token; evaluation keeps, per
    example, the best span over its windows."""

    dataset: str | None = Field(None, description="Hub id or local dataset directory, e.g. nyu-mll/glue.")
    config: str | None = Field(None, description="Dataset configuration, e.g. sst2.")
    train_file: str | None = Field(None, description="Local csv/tsv/json/jsonl/parquet file (or .txt, one text per "
                                   "line, for task: embedding).")
    validation_file: str | None = Field(None, description="Evaluation file, with train_file.")
    train_split: str = Field("train", description="Split of 'dataset' to train on.")
    eval_split: str = Field("validation", description="Split of 'dataset' to evaluate on.")
    text_columns: tuple[str, ...] = Field(
        ("sentence",), min_length=1, max_length=2, description="One column, or two for sentence pairs. Default: "
        "the GLUE task's columns (sst2: sentence; mrpc, rte: sentence1, sentence2; ...)."
    )
    label_column: str = Field("label", description="Column holding the labels (class ids or names).")
    label_names: tuple[str, ...] | None = Field(None, description="Default: from the dataset's features or values.")
    max_length: int = Field(128, ge=8, le=4096, description="Tokens per example (longer ones are truncated; "
                            "question-answering reads a longer context in windows, see doc_stride).")
    max_train_samples: int | None = Field(None, ge=1, description="Train on the first N examples only.")
    max_eval_samples: int | None = Field(None, ge=1, description="Evaluate on the first N examples only.")
    holdout_samples: int | None = Field(
        None, ge=1, description="Sequence classification: hold this many training examples out of training (a "
        "fixed random draw, the same for every seed). Every evaluation also reports holdout_<metric> on them, and "
        "training.select_best chooses on holdout_<main metric> (the default metric_for_best then): the model is "
        "chosen without looking at the eval split, whose numbers stay unbiased.")
    task: str | None = Field(
        None, description="GLUE task whose metric to report (sst2, mrpc, cola, stsb, ...); 'embedding': a "
        "sentence-embedding model learns its teacher's embeddings, no labels (metrics teacher_cosine, pair_roc_auc); "
        "'token-classification': a label per word (entity f1, precision, recall; token accuracy); "
        "'question-answering': extractive QA (SQuAD exact_match, f1). "
        "Default: config or sst2."
    )
    pairs: PairsConfig | None = Field(None, description="task: embedding only: labelled sentence pairs for the "
                                      "pair_roc_auc metric, e.g. {dataset: nyu-mll/glue, config: mrpc}.")
    doc_stride: int | None = Field(None, ge=0, description="task: question-answering only: tokens of context "
                                   "shared by consecutive windows of a context too long for max_length; smaller than "
                                   "max_length minus the question and special tokens. Default: max_length // 4.")
    augment: AugmentConfig | None = Field(None, description="Sequence classification with a distillation logits "
                                          "term: teacher-labelled noisy copies of the training examples (TinyBERT-style "
                                          "augmentation), e.g. {copies: 1, replace_prob: 0.3, mask_prob: 0.1}.")

    @model_validator(mode="before")
    @classmethod
    def _glue_columns(cls, data):
        if isinstance(data, dict) and data.get("task") == TOKEN_CLASSIFICATION:
            data = {"text_columns": ("tokens",), "label_column": "ner_tags", **data}
        if isinstance(data, dict) and data.get("task") == QUESTION_ANSWERING:
            data = {"text_columns": ("question", "context"), "label_column": "answers", **data}
        if isinstance(data, dict) and "text_columns" not in data:
            for name in (data.get("task"), data.get("config")):
                if isinstance(name, str) and name in GLUE_TEXT_COLUMNS:
                    data = {**data, "text_columns": GLUE_TEXT_COLUMNS[name]}
                    break
        return data

    @model_validator(mode="after")
    def _check_source(self):
        if (self.dataset is None) == (self.train_file is None):
            raise FieldError("dataset", "give exactly one of 'dataset' (hub id or directory) or 'train_file'")
        if self.train_file is not None and self.validation_file is None:
            raise FieldError("validation_file", "is required with train_file")
        if self.metric_task == TOKEN_CLASSIFICATION and len(self.text_columns) != 1:
            raise FieldError("text_columns", "token-classification reads one column, a list of words per example, got "
                                             f"{list(self.text_columns)}")
        if self.metric_task == QUESTION_ANSWERING and len(self.text_columns) != 2:
            raise FieldError("text_columns", "question-answering reads two columns, the question and the context, got "
                                             f"{list(self.text_columns)}")
        if self.doc_stride is not None and self.metric_task != QUESTION_ANSWERING:
            raise FieldError("doc_stride", f"splits question-answering contexts into windows: it needs task: "
                                           f"{QUESTION_ANSWERING} (this task is {self.metric_task!r})")
        if self.doc_stride is not None and self.doc_stride >= self.max_length:
            raise FieldError("doc_stride", f"{self.doc_stride} must be smaller than max_length ({self.max_length}) "
                                           "minus the question and special tokens: give 0 to at most "
                                           f"{self.max_length - 1}")
        if self.holdout_samples is not None and self.metric_task in (EMBEDDING, *TOKEN_HEADS):
            raise FieldError("holdout_samples", f"holds out sequence-classification examples for model selection; "
                                                f"this task is {self.metric_task!r}: remove it")
        if self.pairs is not None and self.metric_task != EMBEDDING:
            raise FieldError("pairs", f"scores sentence embeddings: it needs task: {EMBEDDING} (this task is "
                                      f"{self.metric_task!r})")
        return self

    @property
    def metric_task(self) -> str:
        return self.task or self.config or "sst2"

    @property
    def qa_doc_stride(self) -> int:
        """``doc_stride``, or its default: a quarter of ``max_length``."""
        return self.doc_stride if self.doc_stride is not None else default_doc_stride(self.max_length)


MAX_THREADS = 1024


def task_metrics(task: str) -> tuple[str, ...]:
    """The metrics an evaluation of ``task`` reports (higher is better), as sparsify.metrics computes them."""
    return {"cola": ("matthews_correlation",), "stsb": ("pearson", "spearmanr"), "mrpc": ("accuracy", "f1"),
            "qqp": ("accuracy", "f1"), EMBEDDING: ("teacher_cosine", "pair_roc_auc"),
            TOKEN_CLASSIFICATION: ("f1", "precision", "recall", "accuracy"),
            QUESTION_ANSWERING: ("f1", "exact_match")}.get(task, ("accuracy",))


class TrainingConfig(Config):
    """Optimization and bookkeeping. Every schedule counts optimizer steps."""

    epochs: float | None = Field(None, gt=0, description="Converted to optimizer steps from the data size.")
    steps: int | None = Field(None, ge=1, description="Optimizer steps; give epochs or steps.")
    batch_size: int = Field(32, ge=1, description="Examples per process per forward pass.")
    eval_batch_size: int = Field(128, ge=1, description="Examples per process per evaluation batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Forward passes per optimizer step.")
    group_by_length: int = Field(0, ge=0, description="Batches of similar length, drawn from groups of this many "
                                 "shuffled batches (50: SST-2 pads about 2.9x fewer tokens per step than random "
                                 "batches); 0: random batches.")
    learning_rate: float = Field(5e-5, gt=0, le=1.0, description="Peak AdamW learning rate.")
    lr_schedule: Literal["linear", "cosine", "constant", "rewind"] = Field(
        "linear", description="Decay after warmup. rewind (needs a pruning technique): the rate restarts at the peak "
        "at every mask update and decays linearly to rewind_floor x peak by the next one, then from the peak to 0 "
        "over the recovery after the last update (oBERT's sawtooth).")
    rewind_floor: float = Field(0.1, ge=0.0, le=1.0, description="lr_schedule: rewind: the rate at the end of "
                                "each pruning interval, as a fraction of the peak.")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Warmup as a fraction of the optimizer steps.")
    warmup_steps: int | None = Field(None, ge=0, description="Overrides warmup_ratio.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay (not on biases and norms).")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null: none.")
    seed: int = Field(42, ge=0, lt=2**32, description="Seeds the head's init, dropout and the data order "
                      "(0 <= seed < 2**32).")
    mixed_precision: Literal["no", "bf16"] = Field("no", description="bf16 autocast (CPU or GPU).")
    eval_every: int | None = Field(None, ge=1, description="Optimizer steps between evaluations (and at the end).")
    save_every: int | None = Field(None, ge=1, description="Optimizer steps between checkpoints.")
    log_every: int = Field(20, ge=1, description="Optimizer steps between TensorBoard scalars.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept.")
    select_best: bool = Field(False, description="Final model (model/) = best evaluation, not the last step; "
                              "the last step's model is then kept in last/.")
    metric_for_best: str | None = Field(None, description="A metric of the task (sst2: accuracy; mrpc, qqp: "
                                        "accuracy, f1; cola: matthews_correlation; stsb: pearson, spearmanr), or "
                                        "length_config_<metric>. Default: the task's main metric.")
    threads: int | None = Field(None, ge=1, le=MAX_THREADS, description="torch CPU threads; default: torch's choice.")
    eval_on_mask_update: bool = Field(False, description="Also evaluate right after every pruning mask update "
                                      "(the damage of each update before recovery).")
    fit_samples: int = Field(0, ge=0, description="At the end, evaluate on this many training examples too "
                             "(accuracy and, with a teacher, agreement with it: underfit or overfit?).")

    @model_validator(mode="after")
    def _check_length(self):
        if (self.epochs is None) == (self.steps is None):
            raise FieldError("epochs", "give exactly one of 'epochs' or 'steps'")
        return self


class Recipe(Config):
    """A whole recipe: what to train, on what, how, and with which compression techniques."""

    name: str | None = Field(None, description="A label for the run.")
    output_dir: str = Field(min_length=1, description="The run directory (recipe.yaml, metrics.json, checkpoints/, "
                            "model/, tensorboard/).")
    model: ModelConfig = Field(description="The student.")
    teacher: TeacherConfig | None = Field(None, description="A frozen teacher, for distillation.")
    data: DataConfig = Field(description="Training and evaluation data.")
    training: TrainingConfig = Field(description="Optimization and bookkeeping.")
    techniques: tuple[Any, ...] = Field((), description="Compression techniques, each a mapping with a 'kind' (see "
                                        "below); empty for a dense run.")

    @model_validator(mode="after")
    def _check_metric_for_best(self):
        name = self.training.metric_for_best
        if name is not None:
            allowed = task_metrics(self.data.metric_task)
            if self.data.holdout_samples is not None:
                allowed = allowed + tuple(f"holdout_{m}" for m in allowed)
            if name not in allowed and name.removeprefix("length_config_") not in allowed:
                raise FieldError(("training", "metric_for_best"),
                                 f"unknown metric {name!r} for task {self.data.metric_task!r}.{_suggest(name, list(allowed))}"
                                 f" Allowed: {', '.join(allowed)} (or length_config_<metric> with a length_config)")
            if name.removeprefix("length_config_") == "pair_roc_auc" and self.data.pairs is None:
                raise FieldError(("training", "metric_for_best"), "pair_roc_auc needs labelled pairs, and the "
                                 "embedding data has no labels: add data.pairs (e.g. {dataset: nyu-mll/glue, config: "
                                 "mrpc}) or use teacher_cosine")
        return self

    @model_validator(mode="after")
    def _check_embedding_task(self):
        task = self.data.metric_task
        if self.training.fit_samples and task in (EMBEDDING, *TOKEN_HEADS):
            raise FieldError(("training", "fit_samples"), f"compares one predicted label per training example with "
                             f"its label; a {task} task has {'none' if task == EMBEDDING else 'other labels'}: set it "
                             "to 0")
        if self.data.augment is not None:
            if task in (EMBEDDING, *TOKEN_HEADS):
                raise FieldError(("data", "augment"), f"adds unlabelled copies of sequence-classification examples; "
                                 f"this task is {task!r}: remove data.augment")
        if task != EMBEDDING:
            return self
        if self.model.num_labels is not None:
            raise FieldError(("model", "num_labels"), "an embedding model has no classes (data.task: embedding); "
                             "remove model.num_labels")
        return self

    def technique(self, kind: str):
        """The config of the technique of this kind, or None."""
        return next((t for t in self.techniques if t.kind == kind), None)

    def to_yaml(self) -> str:
        """The resolved recipe (every default filled in), loadable again with :func:`load_recipe`."""
        data = self.model_dump(mode="json")
        data["techniques"] = [t.model_dump(mode="json") for t in self.techniques]
        return yaml.safe_dump(data, sort_keys=False)


# -- loading ----------------------------------------------------------------------------------------------


@dataclass
class RecipeSource:
    """Where each key of a recipe came from: file lines, or a --set override."""

    file: str
    lines: dict[KeyPath, int] = field(default_factory=dict)
    overridden: set[KeyPath] = field(default_factory=set)

    def locate(self, path: KeyPath) -> tuple[str, int | None]:
        for n in range(len(path), -1, -1):
            prefix = tuple(path[:n])
            if prefix in self.overridden:
                return "--set", None
            if prefix in self.lines:
                return self.file, self.lines[prefix]
        return self.file, None

    def error(self, path: KeyPath, message: str) -> RecipeError:
        file, line = self.locate(path)
        return RecipeError(message, file=file, line=line, key=format_path(path))


def format_path(path: KeyPath) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe loader that refuses duplicate keys (plain PyYAML silently keeps the last)."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a plain value, not a {type(key).__name__}", key_node.start_mark
            )
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

MAX_YAML_NODES = 10_000  # values a recipe may hold once its aliases are expanded (a real recipe: about 100)


def _expanded_size(node, sizes: dict, limit: int) -> int:
    """Values under ``node`` with every alias expanded, counted without expanding anything (each node once); a
    node met again while it is being counted is a recursive alias. Stops counting above ``limit``."""
    key = id(node)
    if key in sizes:
        if sizes[key] is None:
            raise yaml.composer.ComposerError(None, None, "recursive alias: an anchor used inside itself",
                                              node.start_mark)
        return sizes[key]
    sizes[key] = None
    total = 1
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        children = [c for kv in node.value for c in kv] if isinstance(node, yaml.MappingNode) else node.value
        for child in children:
            total += _expanded_size(child, sizes, limit)
            if total > limit:
                break
    sizes[key] = total
    return total


def _load_yaml(text: str):
    """``(node, data)`` of one YAML document with the unique-key safe loader; refuses aliases that expand past
    :data:`MAX_YAML_NODES` values (a few hundred bytes of nested anchors can expand to gigabytes) and recursive
    aliases, before anything is expanded. ``(None, None)`` for an empty document."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        if _expanded_size(node, {}, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"aliases expand to more than {MAX_YAML_NODES} values (nested anchors and aliases, "
                "a 'billion laughs' document?); write the values out", node.start_mark)
        return node, loader.construct_document(node)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
    finally:
        loader.dispose()


def _line_map(node, path: KeyPath = (), out=None) -> dict[KeyPath, int]:
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            out[path + (k.value,)] = k.start_mark.line + 1
            _line_map(v, path + (k.value,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_map(v, path + (i,), out)
    return out


def _parse_override(text: str) -> tuple[KeyPath, Any]:
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected key.path=value, e.g. training.learning_rate=3e-5")
    key, _, raw = text.partition("=")
    parts = tuple(int(p) if p.isdigit() else p for p in key.strip().split("."))
    if not key.strip() or any(p == "" for p in parts):
        raise RecipeError(f"--set {text!r}: empty key")
    try:
        value = _load_yaml(raw)[1] if raw.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {text!r}: value is not valid YAML ({getattr(e, 'problem', None) or e})") from None
    return parts, value


def _apply_override(data: dict, path: KeyPath, value: Any) -> None:
    node = data
    for i, p in enumerate(path):
        here = format_path(path[: i + 1])
        if isinstance(node, list):
            if not isinstance(p, int) or p >= len(node):
                raise RecipeError(f"--set {format_path(path)}: {here} is not an index of the list ({len(node)} items)")
        elif not isinstance(node, dict):
            raise RecipeError(f"--set {format_path(path)}: {format_path(path[:i])} is a value, not a section")
        if i == len(path) - 1:
            node[p] = value
        else:
            if isinstance(node, dict) and node.get(p) is None:
                node[p] = {}
            node = node[p]


def _suggest(name: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _config_class(annotation):
    """The Config subclass inside a field annotation (``X``, ``X | None``, ``tuple[X, ...]``), or None."""
    if isinstance(annotation, type) and issubclass(annotation, Config):
        return annotation
    return next((c for a in getattr(annotation, "__args__", ()) if (c := _config_class(a)) is not None), None)


def _model_at(path: KeyPath, cls):
    """The config class that owns the mapping at ``path`` below ``cls`` (for listing allowed keys)."""
    for p in path:
        if isinstance(p, int):
            continue
        info = cls.model_fields.get(p)
        cls = _config_class(info.annotation) if info is not None else None
        if cls is None:
            return None
    return cls


def _describe(err: dict, cls) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        name = err["loc"][-1]
        allowed = list(cls.model_fields) if cls is not None else []
        return f"unknown key.{_suggest(name, allowed)} Allowed: {', '.join(allowed)}"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"invalid value {err.get('input')!r}: {msg.replace('Input should be', 'expected')}"
    if kind == "value_error":
        return str(err["ctx"]["error"])
    return f"{msg} (got {err.get('input')!r})"


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, override and validate a recipe; raises :class:`RecipeError` for any problem."""
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise RecipeError("recipe file not found (give the path to a .yaml recipe, e.g. recipes/quickstart.yaml)", file=file)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"cannot read the recipe ({e.strerror or e})", file=file) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RecipeError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the recipe as "
                          "UTF-8", file=file, line=line) from None
    try:
        node, data = _load_yaml(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        raise RecipeError(f"malformed YAML: {e.problem or e.context}", file=file, line=line) from None
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1
        raise RecipeError(f"malformed YAML: character {chr(e.character)!r} is not allowed in YAML", file=file,
                          line=line) from None
    except yaml.YAMLError as e:
        raise RecipeError(f"malformed YAML: {e}", file=file) from None
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a mapping of sections (model, data, training, ...)", file=file, line=1)
    source = RecipeSource(file=file, lines=_line_map(node) if node is not None else {})
    for text_override in overrides:
        key, value = _parse_override(text_override)
        _apply_override(data, key, value)
        source.overridden.add(key)
    return validate_recipe(data, source)


def validate_recipe(data: dict, source: RecipeSource) -> Recipe:
    """Validate a recipe mapping; errors point into ``source``."""
    raw_techniques = data.get("techniques") or []
    if not isinstance(raw_techniques, list):
        raise source.error(("techniques",), "must be a list of techniques, each a mapping with a 'kind'")
    techniques = []
    for i, entry in enumerate(raw_techniques):
        where = ("techniques", i)
        if not isinstance(entry, dict) or "kind" not in entry:
            raise source.error(where, f"each technique is a mapping with a 'kind': one of {', '.join(TECHNIQUES)}")
        kind = entry["kind"]
        if not isinstance(kind, str) or kind not in TECHNIQUES:
            raise source.error(where + ("kind",), f"unknown technique {kind!r}.{_suggest(kind, list(TECHNIQUES))}"
                               f" Allowed: {', '.join(TECHNIQUES)}")
        cls = TECHNIQUES[kind].config
        try:
            techniques.append(cls.model_validate(entry))
        except ValidationError as e:
            raise _to_recipe_error(e, source, where, cls) from None
    if len({t.kind for t in techniques}) != len(techniques):
        raise source.error(("techniques",), "each technique kind may appear only once")
    body = {k: v for k, v in data.items() if k != "techniques"}
    try:
        recipe = Recipe.model_validate(body)
    except ValidationError as e:
        raise _to_recipe_error(e, source, (), Recipe) from None
    recipe = recipe.model_copy(update={"techniques": tuple(techniques)})
    metric = recipe.training.metric_for_best
    lengths = recipe.technique("length_adaptive")
    if metric is not None and metric.startswith("length_config_") and getattr(lengths, "length_config", None) is None:
        raise source.error(("training", "metric_for_best"), f"{metric!r} needs a length_adaptive technique with a "
                           "length_config (evaluated at that configuration)")
    for i, t in enumerate(techniques):
        check = getattr(t, "check_recipe", None)
        if check is not None:
            try:
                check(recipe)
            except FieldError as e:
                raise source.error(("techniques", i) + e.field, str(e)) from None
    if recipe.data.metric_task == EMBEDDING:
        if recipe.technique("distillation") is None:
            raise source.error(("techniques",), "an embedding task has no labels: the student learns from a teacher; "
                               "add a distillation technique (embedding term: cosine or mse on the pooled embedding) "
                               "and a teacher")
        for i, t in enumerate(techniques):
            if t.kind == "pruning" and t.score == "taylor":
                raise source.error(("techniques", i, "score"), "taylor scores need the gradient of a task loss, and an "
                                   "embedding task has no labels: use l2, l1 or obs")
    if recipe.data.metric_task in TOKEN_HEADS:
        for i, t in enumerate(techniques):
            if t.kind == "length_adaptive":
                raise source.error(("techniques", i, "kind"), "length_adaptive drops tokens inside the encoder, and a "
                                   f"{recipe.data.metric_task} head needs every token: remove it")
    distillation = recipe.technique("distillation")
    if recipe.data.augment is not None and (distillation is None or distillation.enabled("logits") is None):
        raise source.error(("data", "augment"), "the augmented copies have no labels, only the teacher's: it needs "
                           "a distillation technique with a logits term (weight > 0)")
    if recipe.training.lr_schedule == "rewind" and recipe.technique("pruning") is None:
        raise source.error(("training", "lr_schedule"), "rewind restarts the learning rate at every pruning mask "
                           "update: it needs a pruning technique (with its window); use linear, cosine or constant")
    object.__setattr__(recipe, "_source", source)
    return recipe


def _to_recipe_error(e: ValidationError, source: RecipeSource, prefix: KeyPath, cls) -> RecipeError:
    # an unknown key first: a misspelt key also shows up as the required key it was meant to be
    err = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")[0]
    loc = prefix + tuple(err["loc"])
    if err["type"] == "value_error" and isinstance(err["ctx"]["error"], FieldError):
        loc = loc + err["ctx"]["error"].field
    owner = _model_at(tuple(err["loc"][:-1]), cls) if err["type"] == "extra_forbidden" else None
    more = f" (and {len(e.errors()) - 1} more problem(s))" if len(e.errors()) > 1 else ""
    return source.error(loc, _describe(err, owner) + more)


def recipe_error(recipe: Recipe, path: KeyPath, message: str) -> RecipeError:
    """An error about ``path`` of a loaded recipe, with file and line when known."""
    source = getattr(recipe, "_source", None)
    if source is None:
        return RecipeError(message, key=format_path(path))
    return source.error(path, message)


# -- reference ----------------------------------------------------------------------------------------------


def _type_name(annotation) -> str:
    import re

    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    text = text or str(annotation)
    text = re.sub(r"\b(?:typing|sparsify(?:\.\w+)*)\.", "", text).replace("NoneType", "None")
    return text.replace("tuple[Any, ...]", "list").replace(" | ", " or ").replace(", ...]", "]")


def _section_table(cls, prefix: str, recurse: bool = True) -> list[str]:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for name, info in cls.model_fields.items():
        default = "required" if info.is_required() else repr(info.default)
        if isinstance(info.default, tuple) and not info.default:
            default = "[]"
        ann = info.annotation
        sub = _config_class(ann)
        rows.append(f"| `{prefix}{name}` | {_type_name(ann)} | `{default}` | {(info.description or '').replace('|', '/')} |")
        if sub is not None and recurse:
            nested.append((f"{prefix}{name}", sub))
    out = rows
    for path, sub in nested:
        out += ["", f"`{path}`: {' '.join((sub.__doc__ or '').split())}", ""] + _section_table(sub, f"{path}.")
    return out


def recipe_reference() -> str:
    """Markdown reference of every recipe key, generated from the configs (docs/recipes.md holds a copy)."""
    lines = ["# Recipe reference", "", "Generated by `sparsify recipe reference` from the configs themselves. "
             "Block shapes are rows x cols of the weight as `nn.Linear` stores it, (out_features, in_features). "
             "Schedules count optimizer steps.", ""]
    lines += ["## Top level", ""] + _section_table(Recipe, "", recurse=False)
    for name, info in Recipe.model_fields.items():
        cls = _config_class(info.annotation)
        if cls is not None:
            lines += ["", f"## `{name}`", "", " ".join((cls.__doc__ or "").split()), ""] + _section_table(cls, f"{name}.")
    for kind, entry in TECHNIQUES.items():
        lines += ["", f"## Technique `{kind}`", "", " ".join((entry.config.__doc__ or "").split()), "",
                  f"An entry of `techniques:` with `kind: {kind}`.", ""] + _section_table(entry.config, "")
    return "\n".join(lines) + "\n"


# -- checks against the data and the models, before the run directory is created ---------------------------


def check_output_dir(recipe: Recipe) -> None:
    """``output_dir`` and the folders above it are directories where they exist (a RecipeError at the key)."""
    out = Path(recipe.output_dir)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise recipe_error(recipe, ("output_dir",), f"{p} is a file, not a directory: choose another "
                                   "output_dir (--set output_dir=...)")
            break


def check_run_inputs(recipe: Recipe, data, model, teacher=None) -> None:
    """What the recipe says against what was loaded (``data``: :class:`sparsify.data.TaskData`): a writable
    output_dir, ``model.num_labels`` against the data's labels, ``data.max_length`` against the positions of the
    student and the teacher. Raises a :class:`RecipeError` at the key, before anything is written."""
    check_output_dir(recipe)
    wanted = recipe.model.num_labels
    if wanted is not None and wanted != data.num_labels:
        found = "regression (1 output)" if data.is_regression else f"{data.num_labels} labels ({', '.join(map(str, data.label_names))})"
        raise recipe_error(recipe, ("model", "num_labels"), f"{wanted} does not match the data: {found}; "
                           "remove model.num_labels or fix it")
    for who, m in (("model", model), ("teacher", teacher)):
        positions = _max_positions(m)
        if positions is not None and recipe.data.max_length > positions:
            raise recipe_error(recipe, ("data", "max_length"), f"{recipe.data.max_length} tokens, but the {who} "
                               f"({getattr(recipe, who).name_or_path}) has {positions} positions; use at most "
                               f"{positions}")


def _max_positions(model) -> int | None:
    """Tokens a model can take (position embeddings; RoBERTa-style models start after the padding index)."""
    config = getattr(model, "config", None)
    n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int):
        return None
    if getattr(config, "model_type", None) in ("roberta", "xlm-roberta", "camembert") and \
            isinstance(getattr(config, "pad_token_id", None), int):
        n -= config.pad_token_id + 1
    return n
