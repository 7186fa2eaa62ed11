"""Loading the student, the teacher and the tokenizer: hub ids, local model directories or run directories.

A run directory (one that holds ``recipe.yaml`` and ``model/``) stands for its final model, so a recipe can
name the dense run of another recipe as its starting point or its teacher.
"""

from __future__ import annotations

from pathlib import Path

from sparsify.errors import SparsifyError

OFFLINE_HINT = (
    "give a local model directory, a run directory, or a hub id that is reachable or already in the "
    "Hugging Face cache (offline: HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing at the cache)"
)


def resolve_model_path(name_or_path: str) -> str:
    """A run directory resolves to its final model; anything else is returned unchanged."""
    path = Path(name_or_path)
    if (path / "recipe.yaml").is_file() and (path / "model").is_dir():
        return str(path / "model")
    return name_or_path


def _load(fn, name_or_path: str, what: str, **kwargs):
    try:
        return fn(resolve_model_path(name_or_path), **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SparsifyError(f"cannot load {what} {name_or_path!r}: {first}. {OFFLINE_HINT}") from None


def load_tokenizer(name_or_path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    return _load(AutoTokenizer.from_pretrained, name_or_path, "tokenizer", revision=revision)


def load_classifier(name_or_path: str, *, num_labels: int, label_names: list[str] | None = None,
                    revision: str | None = None, is_regression: bool = False, attn_implementation: str | None = None,
                    dtype=None, dropout: float | None = None, head: str = "sequence-classification"):
    """A sequence-classification model (``head``: ``"token-classification"``, ``"question-answering"``: those
    heads); a new head is initialized when the checkpoint has none."""
    import transformers

    auto = {"sequence-classification": transformers.AutoModelForSequenceClassification,
            "token-classification": transformers.AutoModelForTokenClassification,
            "question-answering": transformers.AutoModelForQuestionAnswering}[head]

    kwargs = {"num_labels": num_labels, "revision": revision}
    if label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    if is_regression:
        kwargs["problem_type"] = "regression"
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    # float32 unless asked otherwise: recent transformers load a checkpoint in its stored dtype ("auto"), and a
    # float16 checkpoint trained in float16 diverges.
    import torch

    kwargs["dtype"] = dtype if dtype is not None else torch.float32
    if dropout is not None:
        kwargs["hidden_dropout_prob"] = dropout
        kwargs["attention_probs_dropout_prob"] = dropout
    if head == "token-classification":
        config = _load(transformers.AutoConfig.from_pretrained, name_or_path, "model", revision=revision)
        if not any(n.endswith("ForTokenClassification") for n in (config.architectures or [])):
            kwargs["ignore_mismatched_sizes"] = True  # its "classifier" is another head's: a new token head
    model = _load(auto.from_pretrained, name_or_path, "model", **kwargs)
    if model.config.num_labels != num_labels:
        raise SparsifyError(f"model {name_or_path!r} has {model.config.num_labels} labels, the data has {num_labels}")
    return model


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
