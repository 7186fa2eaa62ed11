"""Checks of an artifact's manifest against its tensors, and of weights for NaN / inf.

The checksums of an artifact only say that its files are the ones the manifest lists; a manifest can still lie
(rewritten by hand or by a buggy tool, with the checksums recomputed). :func:`validate_artifact` checks what the
runtime relies on before it builds anything: the architecture's numbers (positive, heads dividing the hidden
size), each tensor's shape against them, the per-layer entries, finite weights and a tokenizer that loads. Every
problem is an :class:`~sparsify.runtime.model.ArtifactError` naming the file and what is wrong.
:func:`require_finite` is the same NaN / inf check for the weights an export reads.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from sparsify.errors import SparsifyError

__all__ = ["check_manifest_types", "validate_artifact", "require_finite"]

_ARCH_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings")
_ROLE_SHAPES = {  # per encoder Linear role (runtime.arch): (out, in) in units of (hidden H, intermediate I)
    "query": ("H", "H"), "key": ("H", "H"), "value": ("H", "H"), "attn_out": ("H", "H"), "inter": ("I", "H"),
    "out": ("H", "I"),
}


def _error(message: str) -> SparsifyError:
    from sparsify.runtime.model import ArtifactError

    return ArtifactError(message)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def require_finite(tensors: dict, source: str | Path) -> None:
    """A :class:`SparsifyError` naming the first tensor with a NaN or an infinite value (numpy or torch tensors)."""
    for name, t in tensors.items():
        if hasattr(t, "detach"):  # torch, without importing it
            if not t.is_floating_point():
                continue
            t = t.detach().float().cpu().numpy()
        a = np.asarray(t)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            bad = int(np.size(a) - np.isfinite(a).sum())
            raise SparsifyError(f"{source}: tensor {name!r} has {bad} NaN or infinite value(s) of {a.size}: the "
                                "model diverged or the file is damaged; use an earlier checkpoint")


def check_manifest_types(root: Path) -> None:
    """Before the manifest's files are checked: ``weights`` a file name and ``files`` an object of file name ->
    ``{"sha256": str, "bytes": int}``, so that a damaged manifest is an error, not a traceback. Anything else
    (no manifest, not JSON) is left to :func:`~sparsify.runtime.model.read_manifest` to report."""
    import json

    mpath = Path(root) / "sparsify.json"
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return
    if not isinstance(manifest, dict):
        raise _error(f"{mpath}: the manifest must be a JSON object")
    files, weights = manifest.get("files"), manifest.get("weights")
    if "weights" in manifest and not isinstance(weights, str):
        raise _error(f"{mpath}: 'weights' must be a file name, got {weights!r:.80}")
    if "files" in manifest and not (isinstance(files, dict) and all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) and _is_int(v.get("bytes"))
            for v in files.values())):
        raise _error(f"{mpath}: 'files' must map each file name to its sha256 and bytes")


def validate_artifact(root: Path, manifest: dict, tensors: dict[str, np.ndarray]) -> None:
    """Check the manifest of the artifact at ``root`` against its tensors (see the module docstring)."""
    root = Path(root)
    mpath = root / "sparsify.json"
    wpath = root / str(manifest.get("weights"))
    arch = manifest.get("architecture")
    if not isinstance(arch, dict):
        raise _error(f"{mpath}: 'architecture' must be an object")
    for key in _ARCH_INTS:
        v = arch.get(key)
        if not _is_int(v) or not 1 <= v <= 1_000_000:
            raise _error(f"{mpath}: architecture.{key} must be a positive integer, got {v!r}")
    H, I, n_heads = arch["hidden_size"], arch["intermediate_size"], arch["num_attention_heads"]
    if H % n_heads:
        raise _error(f"{mpath}: architecture.num_attention_heads {n_heads} does not divide hidden_size {H}")
    eps = arch.get("layer_norm_eps", 1e-12)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise _error(f"{mpath}: architecture.layer_norm_eps must be a positive number, got {eps!r}")
    for key, types in (("labels", (list, type(None))), ("prefix", (str,)), ("layers", (dict,)),
                       ("activations", (dict, type(None))), ("problem_type", (str, type(None))),
                       ("task", (str, type(None))), ("length_config", (dict, list, type(None)))):
        if key in manifest and not isinstance(manifest[key], types):
            raise _error(f"{mpath}: {key!r} has the wrong type ({type(manifest[key]).__name__})")
    labels = manifest.get("labels") or []
    if not all(isinstance(x, str) for x in labels):
        raise _error(f"{mpath}: 'labels' must be a list of names")
    max_length = manifest.get("max_length")
    if max_length is not None and (not _is_int(max_length) or max_length < 1):
        raise _error(f"{mpath}: max_length must be a positive integer, got {max_length!r}")

    for name, a in tensors.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise _error(f"{wpath}: tensor {name!r} has NaN or infinite values (a diverged or damaged model)")

    def shape(name: str, expected: tuple, what: str = "") -> None:
        a = tensors.get(name)
        if a is None:
            raise _error(f"{wpath}: tensor {name!r} missing")
        if a.shape != expected:
            raise _error(f"{wpath}: tensor {name!r} has shape {a.shape}, the manifest's architecture needs "
                         f"{expected}{what}")

    from sparsify.runtime import arch as A

    model_type = arch.get("model_type", "bert")
    spec = A.architecture(model_type)
    if spec is None:
        raise _error(f"{mpath}: architecture.model_type {model_type!r} is not supported (supported: {A.supported()})")
    head_kind = manifest.get("head") or "sequence-classification"
    if head_kind not in A.HEADS:
        raise _error(f"{mpath}: head {head_kind!r} is not supported (supported: {', '.join(A.HEADS)})")
    p = manifest.get("prefix", spec.base + ".")
    emb = manifest.get("embeddings") if isinstance(manifest.get("embeddings"), dict) else {}
    word_bits = emb.get("bits", 8)
    if word_bits not in (8, 4, 2):
        raise _error(f"{mpath}: embeddings.bits must be 8, 4 or 2, got {word_bits!r}")
    word = _check_embeddings(spec, p, arch, tensors, shape, wpath, word_bits)
    layers = manifest["layers"]
    dims = {"H": H, "I": I}
    for i in range(arch["num_hidden_layers"]):
        for role, full in A.layer_linears(spec, p, i).items():
            o, k = _ROLE_SHAPES[role]
            _check_layer(full, (dims[o], dims[k]), layers.get(full), tensors, mpath, wpath)
        for ln in A.layer_norms(spec, p, i):
            shape(f"{ln}.weight", (H,))
            shape(f"{ln}.bias", (H,))
    outputs = _check_head(spec, head_kind, p, H, tensors, shape, wpath)
    if outputs is not None and labels and len(labels) != outputs:
        raise _error(f"{mpath}: {len(labels)} labels, the {head_kind} head has {outputs} outputs")
    _check_tokenizer(root, word.shape[0])


def _check_embeddings(spec, p: str, arch: dict, tensors: dict, shape, wpath: Path, word_bits: int = 8) -> np.ndarray:
    """The embedding tables of the architecture's map (width ``embedding_size`` where a projection follows them,
    as in ELECTRA, else ``hidden_size``); returns the word embeddings (the packed rows at 4 or 2 bits)."""
    H = arch["hidden_size"]
    E = arch.get("embedding_size", H)
    if not _is_int(E) or not 1 <= E <= 1_000_000:
        raise _error(f"{wpath.parent / 'sparsify.json'}: architecture.embedding_size must be a positive integer, "
                     f"got {E!r}")
    names = spec.embeddings

    def table(role: str, what: str) -> np.ndarray:
        a = tensors.get(f"{p}{names[role]}.weight")
        if a is None or a.ndim != 2 or a.shape[1] != E or a.shape[0] < 1:
            raise _error(f"{wpath}: {what} embeddings must be ({what}s, width {E}), got "
                         f"{None if a is None else a.shape}")
        return a

    if word_bits in (4, 2):
        from sparsify.packing import packed_cols

        base = f"{p}{names['word']}"
        word = tensors.get(base + ".packed")
        width = packed_cols(E, word_bits)
        if word is None or word.dtype != np.uint8 or word.ndim != 2 or word.shape[1] != width or word.shape[0] < 1:
            raise _error(f"{wpath}: {word_bits}-bit token embeddings must be uint8 (tokens, {width}) packed rows, got "
                         f"{None if word is None else (word.dtype, word.shape)}")
        shape(base + ".scales", (word.shape[0],))
        if word_bits == 2:
            shape(base + ".offsets", (word.shape[0],))
    else:
        word = table("word", "token")
    shape(f"{p}{names['position']}.weight", (arch["max_position_embeddings"], E))
    if names.get("token_type"):
        table("token_type", "token type")
    shape(f"{p}{names['norm']}.weight", (E,))
    shape(f"{p}{names['norm']}.bias", (E,))
    project = f"{p}{spec.project}" if spec.project else None
    if project and f"{project}.weight" in tensors:
        shape(f"{project}.weight", (H, E))
        shape(f"{project}.bias", (H,))
    elif E != H:
        raise _error(f"{wpath}: embeddings of width {E} need a projection to hidden_size {H}")
    return word


def _check_head(spec, head_kind: str, p: str, H: int, tensors: dict, shape, wpath: Path) -> int | None:
    """The head's Linear layers chained from ``hidden_size``; returns the number of outputs (None: embeddings)."""
    from sparsify.runtime import arch as A

    if head_kind == "embeddings":
        return None
    width = H
    for name, _, optional in A.head_modules(spec, head_kind, p):
        w = tensors.get(name + ".weight")
        if w is None and optional:
            continue
        if w is None or w.ndim != 2 or w.shape[1] != width or w.shape[0] < 1:
            raise _error(f"{wpath}: {name}.weight must be (outputs, {width}) for the {head_kind} head, got "
                         f"{None if w is None else w.shape}")
        shape(name + ".bias", (w.shape[0],))
        width = w.shape[0]
    if head_kind == "question-answering" and width != 2:
        raise _error(f"{wpath}: {A.QA_HEAD}.weight must have 2 outputs (start, end), got {width}")
    return width


def _check_layer(name: str, expected: tuple, meta: Any, tensors: dict, mpath: Path, wpath: Path) -> None:
    """One encoder Linear: its manifest entry (shape, block) against the architecture and its tensors."""
    if not isinstance(meta, dict):
        raise _error(f"{mpath}: layers[{name!r}] missing or not an object")
    if meta.get("shape") != list(expected):
        raise _error(f"{mpath}: layers[{name!r}].shape is {meta.get('shape')!r}, the architecture needs "
                     f"{list(expected)} (out x in)")
    for key in ("quantization",):
        q = meta.get(key)
        if q is not None and (not isinstance(q, dict) or not isinstance(q.get("input") or {}, dict)):
            raise _error(f"{mpath}: layers[{name!r}].{key} must be an object")
    bias = tensors.get(name + ".bias")
    if bias is None or bias.shape != (expected[0],):
        raise _error(f"{wpath}: {name}.bias must have shape ({expected[0]},), got {None if bias is None else bias.shape}")
    if meta.get("block") is None:
        w = tensors.get(name + ".weight")
        if w is None or w.shape != expected:
            raise _error(f"{wpath}: {name}.weight must have shape {expected} (a dense layer in the manifest), got "
                         f"{None if w is None else w.shape}")
        return
    block = meta.get("block_shape")
    if not (isinstance(block, list) and len(block) == 2 and all(_is_int(b) and b >= 1 for b in block)) or \
            expected[0] % block[0] or expected[1] % block[1]:
        raise _error(f"{mpath}: layers[{name!r}].block_shape {block!r} is not a block shape dividing {list(expected)}")
    for part in ("indptr", "indices", "data"):
        if name + "." + part not in tensors:
            raise _error(f"{wpath}: tensor {name + '.' + part!r} missing (a block-sparse layer in the manifest)")


def _check_tokenizer(root: Path, vocabulary: int) -> None:
    f = root / "tokenizer.json"
    if not f.is_file():
        return  # the runtime says so when texts are given; token ids still work
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises plain Exceptions for malformed files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _error(f"{f}: not a valid tokenizer ({first[:200]})") from None
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocabulary:
        raise _error(f"{f}: {n} tokens, but the word embeddings have {vocabulary} rows")
