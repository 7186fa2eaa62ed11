"""Sentence-embedding models in training: a transformers encoder followed by its sentence-transformers pooling.

    model = load_embedder("sentence-transformers/all-MiniLM-L6-v2")     # AutoModel + modules.json pooling
    out = model(input_ids=ids, attention_mask=mask)                     # out.logits: (batch, dim) embeddings

A recipe with ``data.task: embedding`` trains such a model. To the training loop, the distiller, LengthDrop, the
quantizer and the checkpoints an embedder looks like a sequence classifier whose "logits" are the pooled
sentence embedding (normalised when the model's ``modules.json`` lists Normalize) and whose loss is None (no
labels): the one loop and its techniques serve both.

Module and parameter names are the encoder's own (``embeddings.word_embeddings``, ``encoder.layer.0...``), as a
sentence-transformers folder stores them: the embedder registers the encoder's children as its own, so masks,
quantization parameters, checkpoints and sparsity reports name what the saved model and the export name.
``save_pretrained`` writes the encoder and the sentence-transformers files (``modules.json``, the pooling
folder, ``sentence_bert_config.json``) of the model the pooling came from: the export reads them.

With length-adaptive token dropping (:mod:`sparsify.techniques.length_adaptive.inference`), the pooling runs
over the tokens that reached the last layer.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.utils import ModelOutput

from sparsify.errors import SparsifyError

#: sentence-transformers files copied next to a saved embedder (besides the numbered module folders)
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


@dataclass
class EmbeddingOutput(ModelOutput):
    """``logits``: the pooled sentence embeddings ``(batch, dim)``; ``loss`` is always None (no labels)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple | None = None


def read_pooling(name_or_path: str) -> tuple[dict | None, Path]:
    """``(pooling, folder)``: the sentence-transformers pipeline of a model directory, run directory or (cached)
    hub id, as :func:`sparsify.export._pooling` reads it (``{"modes", "normalize", "max_seq_length",
    "source"}``), or None when the model has no ``modules.json``; ``folder`` is the local model directory."""
    from sparsify.export import _pooling, _resolve
    from sparsify.modeling import resolve_model_path

    folder, _ = _resolve(resolve_model_path(name_or_path))
    return _pooling(folder), folder


def require_pooling(name_or_path: str, who: str = "teacher") -> tuple[dict, Path]:
    """:func:`read_pooling`, refusing a model without a sentence-transformers pooling configuration."""
    pooling, folder = read_pooling(name_or_path)
    if pooling is None:
        raise SparsifyError(_no_pooling(who, name_or_path))
    return pooling, folder


def _no_pooling(who: str, name_or_path: str) -> str:
    return (f"{who} {name_or_path!r} has no sentence-transformers pooling configuration (modules.json with a Pooling "
            "module, e.g. 1_Pooling/config.json): an embedding task needs to know how its token states become one "
            "sentence embedding; use a sentence-transformers model")


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes, normalize: bool) -> torch.Tensor:
    """sentence-transformers pooling of ``hidden`` ``(B, L, H)`` over the real tokens of ``mask`` ``(B, L)``:
    the modes concatenated in order, then L2 normalisation if asked (as the library computes them)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            parts.append(hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            total, count = (hidden * m).sum(1), m.sum(1).clamp(min=1e-9)
            parts.append(total / (count if mode == "mean" else count.sqrt()))
        else:
            raise SparsifyError(f"pooling mode {mode!r} is not supported (cls, max, mean, mean_sqrt_len_tokens)")
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return nn.functional.normalize(out, p=2, dim=-1) if normalize else out


class SentenceEmbedder(nn.Module):
    """A transformers encoder (``AutoModel``) with the sentence-transformers pooling of ``pooling``; see the
    module's docstring. ``source``: the folder whose sentence-transformers files :meth:`save_pretrained` copies."""

    def __init__(self, encoder: nn.Module, pooling: dict, source: Path | None = None):
        super().__init__()
        for name, child in encoder.named_children():  # the encoder's names, not "encoder.<its names>"
            self.add_module(name, child)
        object.__setattr__(self, "_encoder", encoder)  # not a submodule: its children are registered above
        self.pooling = dict(pooling)
        self.source = None if source is None else Path(source)

    # what the techniques and the loop read from a transformers model
    @property
    def config(self):
        return self._encoder.config

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def embedding_dim(self) -> int:
        return int(self.config.hidden_size) * len(self.pooling["modes"])

    def get_input_embeddings(self) -> nn.Module:
        return self._encoder.get_input_embeddings()

    def train(self, mode: bool = True):
        self._encoder.train(mode)
        return super().train(mode)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, output_hidden_states=False,
                labels=None, **kwargs) -> EmbeddingOutput:
        if labels is not None:
            raise ValueError("an embedding model takes no labels")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        out = self._encoder(**inputs, output_hidden_states=output_hidden_states, return_dict=True)
        mask = attention_mask
        state = getattr(self, "_length_adaptive_state", None)  # token dropping: pool what reached the last layer
        if state is not None and state.dropped:
            mask = state.mask
        embedding = pool(out.last_hidden_state, mask, self.pooling["modes"], bool(self.pooling.get("normalize")))
        return EmbeddingOutput(logits=embedding, hidden_states=out.hidden_states if output_hidden_states else None)

    def save_pretrained(self, path, **kwargs) -> None:
        """The encoder (``config.json``, ``model.safetensors``) and the sentence-transformers files."""
        kwargs.setdefault("safe_serialization", True)
        path = Path(path)
        self._encoder.save_pretrained(path, **kwargs)
        if self.source is not None:
            for f in ST_FILES:
                if (self.source / f).is_file():
                    shutil.copyfile(self.source / f, path / f)
            for sub in self.source.glob("[0-9]_*"):
                if sub.is_dir():
                    shutil.copytree(sub, path / sub.name, dirs_exist_ok=True)


def load_embedder(name_or_path: str, *, revision: str | None = None, dtype=None, dropout: float | None = None,
                  pooling_from: tuple[dict, Path] | None = None, who: str = "model") -> SentenceEmbedder:
    """An embedder from a sentence-transformers model (directory, run directory or cached hub id).

    A model without ``modules.json`` takes ``pooling_from`` (the teacher's ``(pooling, folder)``) when given;
    otherwise it is refused with one line (an embedding task needs to know how token states become one
    embedding)."""
    from transformers import AutoModel

    from sparsify.modeling import _load

    pooling, folder = read_pooling(name_or_path)
    if pooling is None:
        if pooling_from is None:
            raise SparsifyError(_no_pooling(who, name_or_path))
        pooling, folder = pooling_from
    kwargs = {"revision": revision, "dtype": dtype if dtype is not None else torch.float32}
    if dropout is not None:
        kwargs.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    encoder = _load(AutoModel.from_pretrained, name_or_path, who, **kwargs)
    return SentenceEmbedder(encoder, pooling, folder)


# -- evaluation ------------------------------------------------------------------------------------------------


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties count half); NaN without both classes."""
    import numpy as np
    from scipy.stats import rankdata

    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks: ties count half (Mann-Whitney U)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


@torch.no_grad()
def embed_batches(model, dataloader, *, accelerator=None, forward=None) -> torch.Tensor:
    """The embeddings ``(N, dim)`` (float32, CPU, in the loader's order) of every example of ``dataloader``."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for batch in dataloader:
            inputs = {k: v for k, v in batch.items() if k not in ("idx", "labels")}
            e = (forward(model, inputs) if forward is not None else model(**inputs)).logits
            if accelerator is not None:
                e = accelerator.gather_for_metrics(e)
            out.append(e.detach().float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def pair_scores(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each pair of rows."""
    return nn.functional.cosine_similarity(first.double(), second.double(), dim=-1)


def embedding_metrics(model, eval_dl, reference: torch.Tensor | None, pairs=None, *, accelerator=None, forward=None,
                      embeddings_out: list | None = None) -> dict[str, float]:
    """``teacher_cosine``: the mean cosine of the model's embeddings of the held-out texts to ``reference`` (the
    teacher's, same order), with ``teacher_cosine_min``; with ``pairs`` (``(loader_a, loader_b, labels)``):
    ``pair_roc_auc``, the ROC-AUC of the cosine similarity of each pair for its binary label (paraphrase or
    not). ``embeddings_out`` receives the held-out embeddings."""
    emb = embed_batches(model, eval_dl, accelerator=accelerator, forward=forward)
    if embeddings_out is not None:
        embeddings_out.append(emb)
    metrics = {}
    if reference is not None:
        cos = pair_scores(emb, reference)
        metrics["teacher_cosine"] = float(cos.mean())
        metrics["teacher_cosine_min"] = float(cos.min())
    if pairs is not None:
        first, second, labels = pairs
        a = embed_batches(model, first, accelerator=accelerator, forward=forward)
        b = embed_batches(model, second, accelerator=accelerator, forward=forward)
        metrics["pair_roc_auc"] = roc_auc(pair_scores(a, b).numpy(), labels)
    return metrics


def _encode_texts(model: SentenceEmbedder, tokenizer, texts: list[str], max_length: int, batch_size: int):
    import numpy as np

    out = []
    model.eval()
    with torch.no_grad():
        for a in range(0, len(texts), batch_size):
            enc = tokenizer(texts[a:a + batch_size], truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt")
            out.append(model(**enc).logits.float().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.embedding_dim), np.float32)


def _embedder_fn(name_or_path: str, max_length: int, batch_size: int, who: str):
    """``embed(texts) -> (N, dim)`` for an exported artifact (the CPU runtime) or a model / run directory or hub id
    (PyTorch), and the backend's name."""
    from sparsify.modeling import load_tokenizer, resolve_model_path

    if (Path(name_or_path) / "sparsify.json").is_file():
        from sparsify.runtime import SparseModel

        sm = SparseModel.from_pretrained(name_or_path)
        if sm.pooling is None or str(sm.pooling.get("source", "")).startswith("default"):
            raise SparsifyError(_no_pooling(f"artifact ({who})", name_or_path))
        return (lambda texts: sm.embed(texts, batch_size=batch_size, max_length=max_length)), "sparsify runtime"
    model = load_embedder(name_or_path, who=who)
    tokenizer = load_tokenizer(resolve_model_path(name_or_path))
    backend = "pytorch"
    folder = Path(read_pooling(name_or_path)[1])
    if (folder / "quantization.json").is_file():  # a quantized run: its int8 conversion, as the export packs it
        from sparsify.techniques.quantization.convert import load_run_conversion

        load_run_conversion(model, folder)
        backend = "pytorch (int8 conversion)"
    return (lambda texts: _encode_texts(model, tokenizer, texts, max_length, batch_size)), backend


def evaluate_embedding_model(model: str, *, teacher: str | None = None, dataset: str = "nyu-mll/glue",
                             config: str | None = None, split: str = "validation", file: str | None = None,
                             text_columns: list[str] | None = None, pairs=None, max_length: int = 128,
                             batch_size: int = 64, max_samples: int | None = None) -> dict:
    """``sparsify eval MODEL --task embedding``: the metrics a run with ``data.task: embedding`` reports, for a
    model or run directory, a hub id or an exported artifact (then through the CPU runtime). ``teacher_cosine``
    (the mean cosine similarity to ``teacher``'s embeddings of the held-out texts: ``file``, or ``split`` of
    ``dataset`` / ``config``, their ``text_columns``) and, with ``pairs`` (a :class:`sparsify.recipe.PairsConfig`),
    ``pair_roc_auc`` (and the teacher's, ``teacher_pair_roc_auc``)."""
    import numpy as np

    from sparsify.data import _texts, load_raw, read_file, read_pairs
    from sparsify.recipe import DataConfig

    if teacher is None and pairs is None:
        raise SparsifyError("--task embedding: give --teacher (mean cosine to its embeddings of held-out text), "
                            "labelled pairs (--pairs-config / --pairs-file: paraphrase ROC-AUC), or both")
    embed, backend = _embedder_fn(model, max_length, batch_size, "model")
    teacher_embed = _embedder_fn(teacher, max_length, batch_size, "teacher")[0] if teacher is not None else None
    out: dict = {"task": "embedding", "model": str(model), "backend": backend, "teacher": teacher}
    if teacher_embed is not None:
        if file is not None:
            split_data = read_file(file, lambda m: SparsifyError(f"--file: {m}"))
            columns = text_columns or (["text"] if file.endswith(".txt") else ["sentence"])
        else:
            if config is None:
                raise SparsifyError("--task embedding with --teacher: give the held-out texts, --file or --config "
                                    "(e.g. --config sst2 for the SST-2 validation sentences)")
            cfg = DataConfig(dataset=dataset, config=config, train_split=split, eval_split=split, task="embedding",
                             **({"text_columns": tuple(text_columns)} if text_columns else {}))
            split_data, columns = load_raw(cfg)[1], list(cfg.text_columns)
        texts = _texts(split_data, columns, "held-out", ("text_columns",), None)[:max_samples]
        if not texts:
            raise SparsifyError(f"no texts in column(s) {', '.join(columns)}")
        a, b = torch.from_numpy(np.asarray(embed(texts))), torch.from_numpy(np.asarray(teacher_embed(texts)))
        cos = pair_scores(a, b)
        out.update(texts=len(texts), teacher_cosine=float(cos.mean()), teacher_cosine_min=float(cos.min()))
    if pairs is not None:
        first, second, labels = read_pairs(pairs)

        def score(fn) -> float:
            a, b = (torch.from_numpy(np.asarray(fn(texts))) for texts in (first, second))
            return roc_auc(pair_scores(a, b).numpy(), labels)

        out.update(pairs=len(labels), pair_roc_auc=score(embed))
        if teacher_embed is not None:
            out["teacher_pair_roc_auc"] = score(teacher_embed)
    return out
