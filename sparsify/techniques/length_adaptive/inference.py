"""Length-adaptive inference: run a PyTorch sequence classifier with a length configuration.

    outputs = forward_with_lengths(model, inputs, [1.0, 0.9, 0.8, 0.7, 0.6, 0.5])   # like model(**inputs)
    wrapped = LengthAdaptiveModel.from_pretrained("runs/x/model")   # reads model/length_config.json
    logits = wrapped(**inputs).logits

The model runs its own forward pass (embeddings, encoder layers, head, loss), with hooks on its encoder
layers that drop tokens between the self-attention and the feed-forward block of each layer, as in the
Length-Adaptive Transformer: layer ``i`` attends over the tokens layer ``i - 1`` kept, keeps the ones that
received the most attention (summed over the heads and over the real query tokens; the *significance*), and
runs its feed-forward block on those only. The kept tokens stay in their original order; the first token
([CLS] / <s>) is always kept, so the head reads it at position 0 as usual; padding is never kept and never
counts as a kept token. Per example, layer ``i`` keeps :func:`kept_count` tokens (see ``config.py``); when
examples of a batch keep different numbers, the shorter rows are padded and masked.

Nothing is changed while no real token is dropped: the full-length configuration (ratios of 1.0, or absolute
lengths no shorter than the input) gives exactly the plain model's outputs.

Works with BERT-style layers (BERT, MiniLM, RoBERTa, ELECTRA: ``layer.attention`` holding ``query``/``key``/
``value`` and the output projection) and DistilBERT (``q_lin``/``k_lin``/``v_lin``, ``sa_layer_norm``), with the
eager and SDPA attention implementations (the attention probabilities are recomputed from the captured
query and key projections, as SDPA returns none). Expects right padding (the first token is [CLS]).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from sparsify.student import encoder_layers
from sparsify.techniques.distillation.distiller import attention_projections
from sparsify.techniques.length_adaptive.config import (
    check_length_config,
    kept_count,
    load_length_config,
    save_length_config,
)

SUPPORTED_ATTENTION = (None, "eager", "sdpa")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / accelerate / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def post_attention_module(layer: nn.Module) -> nn.Module:
    """The module whose output is a layer's hidden states after self-attention (output projection, residual and
    LayerNorm included) and before the feed-forward block."""
    if isinstance(getattr(layer, "sa_layer_norm", None), nn.Module):  # DistilBERT
        return layer.sa_layer_norm
    attention = getattr(layer, "attention", None)
    if isinstance(attention, nn.Module) and isinstance(getattr(attention, "output", None), nn.Module):
        return attention  # BERT / RoBERTa / ELECTRA: BertAttention = self-attention + BertSelfOutput
    raise TypeError(
        f"{type(layer).__name__}: cannot find where self-attention ends (expected layer.attention.output as in "
        "BERT/RoBERTa or layer.sa_layer_norm as in DistilBERT)"
    )


def check_model(model: nn.Module) -> int:
    """Check that ``model`` can run length-adaptively; returns its number of encoder layers."""
    model = unwrap(model)
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl not in SUPPORTED_ATTENTION:
        raise TypeError(f"attention implementation {impl!r} is not supported for token dropping: load the model "
                        "with attn_implementation='sdpa' or 'eager'")
    layers = encoder_layers(model)
    for layer in layers:
        attention_projections(layer)
        post_attention_module(layer)
    return len(layers)


def significance(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention each token receives: softmax(Q K^T / sqrt(d_head)) over the real keys, summed over the heads
    and over the real queries. ``q``, ``k``: ``(B, n, H)``; ``mask``: ``(B, n)`` bool. Returns ``(B, n)``, float32."""
    b, n, hidden = q.shape
    d = hidden // heads
    qh = q.float().reshape(b, n, heads, d).transpose(1, 2)
    kh = k.float().reshape(b, n, heads, d).transpose(1, 2)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = scores.softmax(-1) * mask[:, None, :, None]  # padded queries do not vote
    return probs.sum(dim=(1, 2))


def select_tokens(scores: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``keep[b]`` most significant real tokens of each row, [CLS] (position 0) always among
    them, in their original order; rows are padded to ``max(keep)``. Returns ``(index (B, K), new_mask (B, K))``.
    Ties go to the earlier token (stable sort)."""
    n = scores.shape[1]
    width = int(keep.max())
    s = scores.masked_fill(~mask, float("-inf"))
    s[:, 0] = float("inf")
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :width]
    slots = torch.arange(width, device=scores.device)[None, :]
    valid = slots < keep[:, None]
    ordered = torch.where(valid, order, order + n).sort(dim=1).values  # kept tokens first, by position
    index = torch.where(valid, ordered, torch.zeros_like(ordered))  # padding slots point at [CLS]; masked
    return index, valid


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, n)`` bool -> ``(B, 1, n, n)`` additive mask (0 for a real key, the dtype's minimum for padding),
    the format both eager and SDPA attention accept."""
    b, n = mask.shape
    m = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return m[:, None, None, :].expand(b, 1, n, n)


class _State:
    """Per forward pass: the tokens each example still has, and where they came from."""

    def __init__(self, length_config, mask: torch.Tensor, skip_layers):
        self.length_config = tuple(length_config)
        self.skip = frozenset(skip_layers)
        self.mask = mask.bool()  # (B, n) real tokens among the current positions
        self.n_input = self.mask.sum(1).tolist()
        self.current = list(self.n_input)
        self.dropped = False
        self.kept: list[list[int]] = []  # per layer, tokens kept per example (for inspection and tests)
        self.positions = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape).clone()
        self.captured: dict[str, torch.Tensor] = {}
        self.saved_input = None


def _replace_mask(args, kwargs, value):
    if len(args) > 1:
        args = (args[0], value, *args[2:])
    else:
        kwargs = {**kwargs, "attention_mask": value}
    return args, kwargs


@contextmanager
def length_adaptive(model: nn.Module, length_config, attention_mask: torch.Tensor, *, skip_layers=()):
    """Inside this block, ``model(...)`` runs with ``length_config`` applied; yields the per-pass state
    (``state.kept[i]``: tokens layer ``i`` kept per example; ``state.positions``: input positions of the tokens
    that reached the head). ``skip_layers``: layers to skip (LayerDrop; a skipped layer keeps its input)."""
    inner = unwrap(model)
    layers = encoder_layers(inner)
    length_config = check_length_config(length_config, len(layers))
    state = _State(length_config, attention_mask, skip_layers)
    handles = []
    # a model that pools over its tokens (sparsify.sentence.SentenceEmbedder) reads which ones reached the end here
    object.__setattr__(inner, "_length_adaptive_state", state)
    try:
        for i, layer in enumerate(layers):
            parts, heads = attention_projections(layer)
            for name in ("q", "k"):
                handles.append(parts[name].register_forward_hook(_capture(state, name)))
            handles.append(layer.register_forward_pre_hook(_before_layer(state, i), with_kwargs=True))
            handles.append(post_attention_module(layer).register_forward_hook(_after_attention(state, i, heads)))
            handles.append(layer.register_forward_hook(_after_layer(state, i)))
        yield state
    finally:
        for handle in handles:
            handle.remove()
        object.__setattr__(inner, "_length_adaptive_state", None)
        state.captured.clear()
        state.saved_input = None


def _capture(state: _State, name: str):
    def hook(module, inputs, output):
        state.captured[name] = output

    return hook


def _before_layer(state: _State, i: int):
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if i in state.skip:
            # LayerDrop: the layer runs on [CLS] alone (next to no compute) and its output is replaced by its input
            state.saved_input = hidden
            one = torch.ones(hidden.shape[0], 1, dtype=torch.bool, device=hidden.device)
            if args:
                args = (hidden[:, :1], *args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": hidden[:, :1]}
            return _replace_mask(args, kwargs, additive_mask(one, hidden.dtype))
        if state.dropped:
            return _replace_mask(args, kwargs, additive_mask(state.mask, hidden.dtype))
        return None

    return hook


def _after_attention(state: _State, i: int, heads: int):
    def hook(module, inputs, output):
        q, k = state.captured.pop("q", None), state.captured.pop("k", None)
        if i in state.skip:
            state.kept.append(list(state.current))
            return None
        keep = [kept_count(state.length_config[i], n, c) for n, c in zip(state.n_input, state.current)]
        state.kept.append(keep)
        if keep == state.current:
            return None  # nothing dropped: leave the tensors (and the outputs) exactly as they are
        hidden = output[0] if isinstance(output, tuple) else output
        with torch.no_grad():
            scores = significance(q, k, state.mask, heads)
            index, new_mask = select_tokens(scores, state.mask, torch.tensor(keep, device=hidden.device))
        hidden = hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))
        state.positions = state.positions.gather(1, index)
        state.mask, state.current, state.dropped = new_mask, keep, True
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


def _after_layer(state: _State, i: int):
    def hook(module, inputs, output):
        if i not in state.skip:
            return None
        saved, state.saved_input = state.saved_input, None
        return (saved, *output[1:]) if isinstance(output, tuple) else saved

    return hook


def forward_with_lengths(model: nn.Module, inputs: dict, length_config, *, skip_layers=()):
    """``model(**inputs)`` with ``length_config`` applied (see the module's docstring); returns the model's
    outputs (logits, and the loss when ``inputs`` hold labels). ``length_config=None`` runs the plain model."""
    if length_config is None:
        return model(**inputs)
    mask = inputs.get("attention_mask")
    if mask is None:
        ids = inputs.get("input_ids", inputs.get("inputs_embeds"))
        mask = torch.ones(ids.shape[:2], dtype=torch.bool, device=ids.device)
    with length_adaptive(model, length_config, mask, skip_layers=skip_layers):
        return model(**inputs)


class LengthAdaptiveModel(nn.Module):
    """A sequence classifier with a length configuration: ``forward(**inputs)`` runs
    :func:`forward_with_lengths`. ``save_pretrained`` / ``from_pretrained`` keep the configuration next to the
    weights as ``length_config.json``."""

    def __init__(self, model: nn.Module, length_config=None):
        super().__init__()
        self.model = model
        self.num_layers = check_model(model)
        self.length_config = None if length_config is None else check_length_config(length_config, self.num_layers)

    def forward(self, **inputs):
        return forward_with_lengths(self.model, inputs, self.length_config)

    @property
    def config(self):
        return self.model.config

    def save_pretrained(self, path: str | Path, **kwargs) -> None:
        kwargs.setdefault("safe_serialization", True)
        self.model.save_pretrained(path, **kwargs)
        if self.length_config is not None:
            save_length_config(path, self.length_config)

    @classmethod
    def from_pretrained(cls, path: str | Path, length_config=None, **kwargs) -> "LengthAdaptiveModel":
        """Load a model directory; ``length_config`` defaults to its ``length_config.json`` (none: full length)."""
        from transformers import AutoModelForSequenceClassification

        kwargs.setdefault("dtype", torch.float32)
        model = AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)
        if length_config is None:
            length_config = load_length_config(path, num_layers=len(encoder_layers(model)))
        return cls(model, length_config)
