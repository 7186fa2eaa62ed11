"""Per-architecture parameter maps and the heads of the artifact: one runtime path for every encoder.

Every supported encoder is embeddings -> N post-LayerNorm layers (attention, feed-forward) -> a head; what differs
is names and a few switches, so an architecture is an :class:`Architecture` (a row of :data:`ARCHITECTURES`) and a
head is one of :data:`HEADS`. A new architecture is a new row here plus a row of the parity test table
(``tests/test_architectures.py``), not a copy of the export or the runtime.

Plain data only (no numba, no torch): both :mod:`sparsify.export` and :mod:`sparsify.runtime.model` read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Architecture", "ARCHITECTURES", "HEADS", "architecture", "canonical_config", "layer_linears",
           "layer_norms", "head_modules", "POOLING_MODES"]

# The heads an artifact can have: name -> what the runtime's __call__ returns.
HEADS = {
    "sequence-classification": "logits (batch, labels) from the first token ([CLS] / <s>)",
    "token-classification": "logits (batch, sequence, labels), one row per token",
    "question-answering": "start and end logits (batch, sequence, 2); SparseModel.answer decodes spans",
    "embeddings": "pooled sentence embeddings (batch, hidden), normalised when the model lists Normalize",
}
# sentence-transformers pooling modes (the library's names) that the runtime computes.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")

_BERT_LAYER = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
               "attn_out": "attention.output.dense", "inter": "intermediate.dense", "out": "output.dense"}
_BERT_NORMS = ("attention.output.LayerNorm", "output.LayerNorm")
_BERT_EMB = {"word": "embeddings.word_embeddings", "position": "embeddings.position_embeddings",
             "token_type": "embeddings.token_type_embeddings", "norm": "embeddings.LayerNorm"}


@dataclass(frozen=True)
class Architecture:
    """Where an encoder keeps its parameters and how it differs from BERT.

    Names are relative to the encoder's prefix (``bert.`` in a task model, empty in a bare encoder) except the
    head's modules, which sit at the top level of a task model. ``sequence_head`` lists the Linear modules of the
    sequence-classification head applied to the first token, each with the activation after it."""

    base: str                                     # attribute of the encoder in task models: bert, roberta, ...
    layer: str = "encoder.layer.{i}."
    linears: dict = field(default_factory=lambda: dict(_BERT_LAYER))   # role -> name inside a layer
    norms: tuple = _BERT_NORMS                    # (after attention, after the feed-forward block)
    embeddings: dict = field(default_factory=lambda: dict(_BERT_EMB))  # role -> name (token_type may be None)
    project: str | None = None                    # Linear after the embeddings (ELECTRA's embeddings_project)
    padding_positions: bool = False               # positions start at pad_token_id + 1 (RoBERTa)
    token_types: bool = True                      # False: one type (or none); every token gets type 0
    sequence_head: tuple = (("{prefix}pooler.dense", "tanh"), ("classifier", None))
    optional_head: tuple = ("{prefix}pooler.dense",)  # sequence-head modules that a checkpoint may lack
    config: dict = field(default_factory=dict)    # canonical config key -> this architecture's key
    defaults: dict = field(default_factory=dict)  # canonical config values the architecture fixes

    def prefix_in(self, state) -> str | None:
        """The encoder's prefix in a state dict: ``"<base>."`` (task model), ``""`` (bare encoder) or None."""
        word = self.embeddings["word"] + ".weight"
        for p in (self.base + ".", ""):
            if p + word in state:
                return p
        return None


_ROBERTA = Architecture("roberta", padding_positions=True, token_types=False,
                        sequence_head=(("classifier.dense", "tanh"), ("classifier.out_proj", None)), optional_head=())
ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture("bert"),
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "electra": Architecture("electra", project="embeddings_project", optional_head=(),
                            sequence_head=(("classifier.dense", "gelu"), ("classifier.out_proj", None))),
    "distilbert": Architecture(
        "distilbert", layer="transformer.layer.{i}.",
        linears={"query": "attention.q_lin", "key": "attention.k_lin", "value": "attention.v_lin",
                 "attn_out": "attention.out_lin", "inter": "ffn.lin1", "out": "ffn.lin2"},
        norms=("sa_layer_norm", "output_layer_norm"),
        embeddings={"word": "embeddings.word_embeddings", "position": "embeddings.position_embeddings",
                    "token_type": None, "norm": "embeddings.LayerNorm"},
        token_types=False, sequence_head=(("pre_classifier", "relu"), ("classifier", None)), optional_head=(),
        config={"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                "intermediate_size": "hidden_dim", "hidden_act": "activation"},
        defaults={"layer_norm_eps": 1e-12, "type_vocab_size": 0}),
}
# Other heads: one Linear on every token's final hidden state, the same name in every architecture.
TOKEN_HEAD = "classifier"
QA_HEAD = "qa_outputs"

_CANONICAL = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
              "layer_norm_eps", "max_position_embeddings", "type_vocab_size", "vocab_size", "position_embedding_type",
              "pad_token_id", "embedding_size")


def supported() -> str:
    return ", ".join(ARCHITECTURES)


def architecture(model_type) -> Architecture | None:
    return ARCHITECTURES.get(model_type)


def canonical_config(config: dict) -> dict:
    """The transformers config reduced to BERT's key names (``model_type`` and ``architectures`` kept)."""
    arch = ARCHITECTURES[config["model_type"]]
    out = {"model_type": config["model_type"]}
    if config.get("architectures"):
        out["architectures"] = config["architectures"]
    for key in _CANONICAL:
        src = arch.config.get(key, key)
        if src in config and config[src] is not None:
            out[key] = config[src]
        elif key in arch.defaults:
            out[key] = arch.defaults[key]
    if out.get("embedding_size") == out.get("hidden_size"):
        out.pop("embedding_size", None)
    return out


def layer_linears(arch: Architecture, prefix: str, i: int) -> dict[str, str]:
    """Role (query, key, value, attn_out, inter, out) -> full module name of layer ``i``."""
    base = prefix + arch.layer.format(i=i)
    return {role: base + name for role, name in arch.linears.items()}


def head_modules(arch: Architecture, head: str, prefix: str) -> list[tuple[str, str | None, bool]]:
    """The head's Linear modules in order as ``(name, activation after it, optional)``: the architecture's sequence
    head on the first token, one Linear on every token for the token and QA heads, none for embeddings."""
    if head == "sequence-classification":
        return [(n.format(prefix=prefix), act, n in arch.optional_head) for n, act in arch.sequence_head]
    if head in ("token-classification", "question-answering"):
        return [(TOKEN_HEAD if head == "token-classification" else QA_HEAD, None, False)]
    return []


def layer_norms(arch: Architecture, prefix: str, i: int) -> tuple[str, str]:
    base = prefix + arch.layer.format(i=i)
    return base + arch.norms[0], base + arch.norms[1]
