"""``SparseModel``: runs a sparsify artifact (see :mod:`sparsify.export`) on CPU with the block-sparse kernels.

    model = SparseModel.from_pretrained("artifacts/minilm-4x1-90", threads=2)
    logits = model(input_ids, attention_mask)               # numpy (batch, labels)
    model.predict(["a gripping film", "dull"])              # [{"label": "positive", "score": 0.97}, ...]

Loading reads JSON and safetensors only (no pickle), checks the format version and the sha256 of every file
listed in the manifest, and raises :class:`ArtifactError` (a ``SparsifyError``) naming the file and the problem.

The forward pass works on *packed* hidden states: the real tokens of all sequences one after another, no padding.
Every Linear layer of the encoder goes through :func:`sparsify.kernels.spmm` (query/key/value fused into one
call; GELU fused into the intermediate layer; the residual add fused into the output layers), attention through
:mod:`sparsify.runtime.attention`, layer norms and embeddings through the numba ops of
:mod:`sparsify.runtime.ops`. At the last layer only the [CLS] rows are needed after attention, so attention runs
only for the [CLS] query and the feed-forward block only on the [CLS] rows (exact for classification).

Architectures and heads: the parameter names of BERT / MiniLM, RoBERTa / XLM-R, ELECTRA and DistilBERT come from
one map (:mod:`sparsify.runtime.arch`), so every model runs the same forward pass. The head is the manifest's:
sequence classification (the architecture's head on the first token), token classification and question answering
(one Linear on every token, at full length; :meth:`SparseModel.answer` reads a long context in overlapping windows
and decodes the best span back to character offsets), or embeddings (the sentence-transformers pooling,
:meth:`SparseModel.embed`, which any artifact can also run).

Quantized artifacts: int8 weights (block-sparse, or dense with every block kept; dequantized to float32 once at
load by default, ``int8_weights="keep"`` to hold the codes) run with float32 activations that are fake-quantized
exactly where the trained model's quantizer did it, in the same order: the input of every quantized Linear, the
residual sum entering each encoder LayerNorm and that LayerNorm's output (manifest ``activations``; per tensor or
per embedding group, stored as one scale and zero point per feature; ``bits: 16`` rounds to float16). Rounding is
``round(x / scale)`` half to even, as ``torch.round``. The fake quantization is fused into the attention's output
and into the layer norms; the word embeddings may be int8 rows with one scale each (dequantized at lookup).

Length-adaptive inference (Length-Adaptive Transformer, Kim & Cho 2021): a length configuration gives, per
layer, how many tokens each sequence keeps after that layer's attention; the kept tokens are those receiving
the most attention (summed over heads and queries), [CLS] always kept, order preserved. Entries are token
counts (ints: ``min(count, current length)``) or ratios of the sequence's input length (floats in (0, 1]:
``ceil(ratio * input length)``); lengths never grow. It comes from the manifest (``length_config``) or per call.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sparsify.errors import SparsifyError
from sparsify.qa_windows import default_doc_stride, stride_problem

__all__ = ["SparseModel", "ArtifactError", "FORMAT", "FORMAT_VERSION", "MANIFEST", "WEIGHTS",
           "read_manifest", "parse_length_config", "load_tensors", "decode_span"]

FORMAT = "sparsify-artifact"
FORMAT_VERSION = 4  # 2: activation quantization points, int8 dense layers and word embeddings; 3: architectures
# besides BERT, heads (manifest "head": token classification, question answering, embeddings) and "pooling";
# 4: packed 4-bit / 2-bit word embeddings (manifest "embeddings": bits, width) and int4 Linear weights
INT8_WEIGHTS = ("dequantize", "keep")  # how the runtime holds int8 Linear weights (SparseModel.from_pretrained)
MANIFEST = "sparsify.json"
WEIGHTS = "model.safetensors"


class ArtifactError(SparsifyError):
    """A missing, corrupted, tampered or unsupported artifact."""


# ------------------------------------------------------------------------------------------------ manifest
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: str | Path, *, verify: bool = True) -> dict:
    """The artifact's manifest, after checking its format, version and (``verify``) every file's checksum."""
    root = Path(path)
    if not root.exists():
        raise ArtifactError(f"{root}: no such artifact directory")
    if not root.is_dir():
        raise ArtifactError(f"{root}: not a directory (an artifact is a directory written by 'sparsify export')")
    mpath = root / MANIFEST
    if not mpath.is_file():
        hint = " (this is a Hugging Face model directory: run 'sparsify export' on it first)" if (
            root / "config.json").is_file() else ""
        raise ArtifactError(f"{root}: no {MANIFEST} manifest, not a sparsify artifact{hint}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{mpath}: corrupted manifest, not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: not a sparsify artifact manifest (format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"{mpath}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: artifact format version {version} is newer than this sparsify supports "
                            f"({FORMAT_VERSION}); upgrade sparsify or re-export with this version")
    for key in ("architecture", "files", "layers", "weights"):
        if key not in manifest:
            raise ArtifactError(f"{mpath}: manifest lacks the required key {key!r}")
    files = manifest["files"]
    if not isinstance(files, dict) or manifest["weights"] not in files:
        raise ArtifactError(f"{mpath}: manifest 'files' must list the weight file {manifest['weights']!r}")
    for name, info in files.items():
        f = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(f"{mpath}: file name {name!r} points outside the artifact")
        if not f.is_file():
            raise ArtifactError(f"{f}: missing (listed in the manifest); the artifact is incomplete")
        size = f.stat().st_size
        if "bytes" in info and size != info["bytes"]:
            raise ArtifactError(f"{f}: {size} bytes, the manifest says {info['bytes']}: truncated or modified")
        if verify and sha256_file(f) != info.get("sha256"):
            raise ArtifactError(f"{f}: sha256 checksum mismatch: the file was modified or corrupted")
    return manifest


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file as numpy arrays (no torch, no pickle), with errors naming the file."""
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise ArtifactError(f"{path}: cannot read the weights ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------------ lengths
def parse_length_config(config: Any, n_layers: int) -> list | None:
    """Normalize a length configuration to a per-layer list of ints (token counts) or floats (ratios).

    Accepts ``None``, a list, or a dict with ``"length_config"`` / ``"lengths"`` (and optionally
    ``"unit": "tokens" | "ratio"``).
    """
    if config is None:
        return None
    unit = None
    if isinstance(config, dict):
        unit = config.get("unit")
        config = config.get("length_config", config.get("lengths"))
        if config is None:
            raise SparsifyError("length configuration: expected a 'length_config' (or 'lengths') list")
    if not isinstance(config, (list, tuple)):
        raise SparsifyError(f"length configuration must be a list of per-layer lengths, got {type(config).__name__}")
    if len(config) != n_layers:
        raise SparsifyError(f"length configuration has {len(config)} entries, the model has {n_layers} layers")
    if unit not in (None, "tokens", "ratio"):
        raise SparsifyError(f"length configuration unit must be 'tokens' or 'ratio', got {unit!r}")
    out: list = []
    for i, v in enumerate(config):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SparsifyError(f"length configuration entry {i} must be a number, got {v!r}")
        if unit == "ratio" or (unit is None and isinstance(v, float)):
            if not 0 < v <= 1:
                raise SparsifyError(f"length configuration entry {i}: ratio {v} outside (0, 1]")
            out.append(float(v))
        else:
            if int(v) != v or v < 1:
                raise SparsifyError(f"length configuration entry {i}: token count {v} must be a positive integer")
            out.append(int(v))
    prev = None
    for i, v in enumerate(out):
        if prev is not None and type(v) is type(prev) and v > prev:
            raise SparsifyError(f"length configuration entry {i} ({v}) grows from the previous layer ({prev})")
        prev = v
    return out


def _set_threads(threads: int | None) -> int:
    """Set numba's and (when imported) torch's thread counts explicitly, so the two pools do not oversubscribe."""
    import numba

    n = int(numba.config.NUMBA_NUM_THREADS) if threads is None else int(threads)
    limit = int(numba.config.NUMBA_NUM_THREADS)
    if not 1 <= n <= limit:
        raise SparsifyError(f"threads must be in [1, {limit}] (NUMBA_NUM_THREADS), got {threads}")
    numba.set_num_threads(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n


# ------------------------------------------------------------------------------------------------ model
class _Layer:
    __slots__ = ("qkv", "q", "k", "v", "attn_out", "inter", "out", "ln1", "ln2", "quant", "act")


class SparseModel:
    """A BERT-style encoder with its head from a sparsify artifact, on CPU (numpy in, numpy out)."""

    def __init__(self, path: Path, manifest: dict, tensors: dict[str, np.ndarray], threads: int | None,
                 length_config: Any = "default", int8_weights: str = "dequantize"):
        from sparsify.kernels.format import BlockSparseMatrix

        if int8_weights not in INT8_WEIGHTS:
            raise SparsifyError(f"int8_weights must be one of {', '.join(map(repr, INT8_WEIGHTS))}, "
                                f"got {int8_weights!r}")
        self.int8_weights = int8_weights
        self.path = Path(path)
        self.manifest = manifest
        from . import arch as A

        arch = manifest["architecture"]
        model_type = arch.get("model_type") if isinstance(arch, dict) else None
        self.arch = A.architecture(model_type)
        if self.arch is None:
            raise ArtifactError(f"{path}: model_type {model_type!r} is not supported by the runtime (supported: "
                                f"{A.supported()})")
        self.head = manifest.get("head") or "sequence-classification"  # format version 2 had only this head
        if self.head not in A.HEADS:
            raise ArtifactError(f"{path}: head {self.head!r} is not supported by the runtime (supported: "
                                f"{', '.join(A.HEADS)})")
        try:
            if arch.get("hidden_act", "gelu") != "gelu":
                raise ArtifactError(f"{path}: hidden_act {arch['hidden_act']!r} not supported (gelu only)")
            if arch.get("position_embedding_type", "absolute") != "absolute":
                raise ArtifactError(f"{path}: only absolute position embeddings are supported")
            self.hidden = int(arch["hidden_size"])
            self.n_layers = int(arch["num_hidden_layers"])
            self.n_heads = int(arch["num_attention_heads"])
            self.eps = float(arch.get("layer_norm_eps", 1e-12))
            # RoBERTa counts positions from pad_token_id + 1: fewer usable positions than embeddings
            self.position_offset = int(arch.get("pad_token_id") or 0) + 1 if self.arch.padding_positions else 0
            self.max_positions = int(arch["max_position_embeddings"]) - self.position_offset
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{path}: architecture in the manifest is incomplete ({e})") from None
        self.labels = list(manifest.get("labels") or [])
        self.problem_type = manifest.get("problem_type")
        self.task = manifest.get("task")
        self.max_length = int(manifest.get("max_length") or self.max_positions)
        self.qa_windows = manifest.get("qa_windows")  # a QA run's {max_length, doc_stride}: answer()'s defaults
        self.threads = _set_threads(threads)
        self._tokenizer = None
        prefix = manifest.get("prefix", "bert.")
        layers_meta = manifest["layers"]

        def t(name: str) -> np.ndarray:
            try:
                a = tensors[name]
            except KeyError:
                raise ArtifactError(f"{path / manifest['weights']}: tensor {name!r} missing") from None
            return np.ascontiguousarray(a, dtype=np.float32) if a.dtype != np.float32 else a

        def matrix(name: str) -> BlockSparseMatrix:
            m = stored_matrix(name)
            return m.dequantize() if m.dtype == np.int8 and int8_weights == "dequantize" else m

        def stored_matrix(name: str) -> BlockSparseMatrix:
            meta = layers_meta.get(name)
            if meta is None:
                raise ArtifactError(f"{path}: manifest has no entry for layer {name!r}")
            try:
                bias = t(f"{name}.bias")
                if meta.get("block") is None:
                    w = tensors[f"{name}.weight"]
                    if w.dtype == np.int8:  # int8 codes + per-output-channel scales, run as int8 weights
                        return _dense_int8(w, np.ascontiguousarray(tensors[f"{name}.scales"], np.float32), bias)
                    return _dense(t(f"{name}.weight"), bias)
                data = tensors[f"{name}.data"]
                scales = tensors.get(f"{name}.scales")
                return BlockSparseMatrix(tuple(meta["shape"]), tuple(meta["block_shape"]), tensors[f"{name}.indptr"],
                                         tensors[f"{name}.indices"], data,
                                         None if scales is None else np.ascontiguousarray(scales, np.float32), bias)
            except KeyError as e:
                raise ArtifactError(f"{path / manifest['weights']}: tensor {e} of layer {name!r} missing") from None
            except ValueError as e:
                raise ArtifactError(f"{path}: layer {name!r} is inconsistent: {e}") from None

        def quant_params(q: dict | None, scale_name: str, zp_name: str, width: int, what: str):
            """(scale, zero point, bits, signed) per feature, ("float16",) for a half-precision activation, or
            None (not quantized)."""
            if not q:
                return None
            bits = q.get("bits", 8)
            if bits == 16:
                return ("float16",)
            if bits != 8:
                raise ArtifactError(f"{path}: {what}: {bits}-bit activations are not supported (8 or 16)")
            scale, zp = t(scale_name), t(zp_name)
            if scale.shape != (width,) or zp.shape != (width,):
                raise ArtifactError(f"{path}: {what}: scale {scale.shape} / zero point {zp.shape} are not one "
                                    f"value per feature ({width})")
            if not np.all(np.isfinite(scale) & (scale > 0)):
                raise ArtifactError(f"{path}: {what}: activation scales must be positive and finite")
            return scale, zp, 8, bool(q.get("signed", False))

        def input_quant(name: str):
            q = (layers_meta[name].get("quantization") or {}).get("input")
            width = int(layers_meta[name]["shape"][1])
            return quant_params(q, f"{name}.input_scale", f"{name}.input_zero_point", width, f"input of {name}")

        points = manifest.get("activations") or {}
        if not isinstance(points, dict):
            raise ArtifactError(f"{path}: manifest 'activations' must be an object")
        unused = set(points)

        def point_quant(name: str):
            unused.discard(name)
            return quant_params(points.get(name), f"{name}.scale", f"{name}.zero_point", self.hidden, name)

        p = prefix
        E = self.arch.embeddings
        word = tensors.get(f"{p}{E['word']}.weight")
        emb_meta = manifest.get("embeddings") or {}
        self.word_bits = int(emb_meta.get("bits", 8)) if isinstance(emb_meta, dict) else 8
        self.word_offsets = None
        if self.word_bits in (4, 2):  # packed rows, decoded at lookup (sparsify.packing)
            self.word = np.ascontiguousarray(tensors.get(f"{p}{E['word']}.packed"))
            if self.word.dtype != np.uint8 or self.word.ndim != 2:
                raise ArtifactError(f"{path}: word_embeddings.packed missing or not a 2-D uint8 array (the manifest "
                                    f"says {self.word_bits}-bit word embeddings)")
            try:
                self.word_width = int(emb_meta["width"])
            except (KeyError, TypeError, ValueError):
                raise ArtifactError(f"{path}: manifest embeddings lacks the row width of the packed rows") from None
            if self.word.shape[1] != -(-self.word_width * self.word_bits // 8):
                raise ArtifactError(f"{path}: word_embeddings.packed has {self.word.shape[1]} bytes per row, not "
                                    f"{self.word_width} codes of {self.word_bits} bits")
            self.word_scales = t(f"{p}{E['word']}.scales")
            if self.word_bits == 2:
                self.word_offsets = t(f"{p}{E['word']}.offsets")
            for what, a in (("scales", self.word_scales), ("offsets", self.word_offsets)):
                if a is not None and a.shape != (self.word.shape[0],):
                    raise ArtifactError(f"{path}: word_embeddings.{what} has shape {a.shape}, expected "
                                        f"({self.word.shape[0]},)")
        elif self.word_bits != 8:
            raise ArtifactError(f"{path}: {self.word_bits}-bit word embeddings are not supported (8, 4 or 2)")
        elif word is not None and word.dtype == np.int8:  # int8 rows, one scale per row
            self.word = word
            self.word_scales = t(f"{p}{E['word']}.scales")
            if self.word_scales.shape != (word.shape[0],):
                raise ArtifactError(f"{path}: word_embeddings.scales has shape {self.word_scales.shape}, expected "
                                    f"({word.shape[0]},)")
        else:
            self.word = t(f"{p}{E['word']}.weight")
            self.word_scales = None
        self.pos = t(f"{p}{E['position']}.weight")
        # no token types (DistilBERT): one all-zero type row, so that every architecture takes the same kernel
        if self.word_bits == 8:
            self.word_width = int(self.word.shape[1])
        self.typ = t(f"{p}{E['token_type']}.weight") if E["token_type"] else np.zeros((1, self.word_width),
                                                                                      np.float32)
        self.emb_ln = (t(f"{p}{E['norm']}.weight"), t(f"{p}{E['norm']}.bias"))
        proj = self.arch.project and f"{p}{self.arch.project}.weight" in tensors
        self.project = _dense(t(f"{p}{self.arch.project}.weight"), t(f"{p}{self.arch.project}.bias")) if proj else None
        self.layers: list[_Layer] = []
        for i in range(self.n_layers):
            names = A.layer_linears(self.arch, p, i)
            ln1, ln2 = A.layer_norms(self.arch, p, i)
            L = _Layer()
            L.q, L.k, L.v = (matrix(names[r]) for r in ("query", "key", "value"))
            L.attn_out, L.inter, L.out = (matrix(names[r]) for r in ("attn_out", "inter", "out"))
            L.ln1 = (t(ln1 + ".weight"), t(ln1 + ".bias"))
            L.ln2 = (t(ln2 + ".weight"), t(ln2 + ".bias"))
            qs = [input_quant(names[r]) for r in ("query", "key", "value")]
            L.quant = {"qkv": qs, **{r: input_quant(names[r]) for r in ("attn_out", "inter", "out")}}
            # residual sums (LayerNorm inputs) and LayerNorm outputs, quantized where the quantizer's hooks were
            L.act = {"ln1_in": point_quant(ln1 + ".input"), "ln1_out": point_quant(ln1 + ".output"),
                     "ln2_in": point_quant(ln2 + ".input"), "ln2_out": point_quant(ln2 + ".output")}
            same_in = all(_same_quant(qs[0], x) for x in qs[1:])
            L.qkv = _concat_rows([L.q, L.k, L.v]) if same_in else None
            self.layers.append(L)
        if unused:
            raise ArtifactError(f"{path}: the manifest quantizes activation {sorted(unused)[0]!r}, which this runtime "
                                "does not know (encoder LayerNorm inputs and outputs only)")
        self.head_steps = self._head_steps(path, p, tensors, t)
        # names kept from the BERT-only runtime (the benchmark rebuilds a BERT from them)
        self.classifier = self.head_steps[-1][:2] if self.head_steps else None
        self.pooler = self.head_steps[0][:2] if len(self.head_steps) == 2 and self.arch.optional_head else None
        self.pooling = manifest.get("pooling")
        self.default_length_config = parse_length_config(manifest.get("length_config"), self.n_layers)
        self.length_config = (self.default_length_config if length_config == "default"
                              else parse_length_config(length_config, self.n_layers))

    def word_table(self) -> np.ndarray:
        """The word embeddings as float32 ``(vocab, width)``, as the lookup computes them (int8 and packed
        low-bit rows decoded)."""
        from . import ops

        if self.word_bits in (4, 2):
            return ops.decode_rows(np.arange(self.word.shape[0]), self.word, self.word_bits, self.word_scales,
                                   self.word_offsets, self.word_width)
        if self.word_scales is not None:
            return self.word.astype(np.float32) * self.word_scales[:, None]
        return self.word

    def _head_steps(self, path: Path, prefix: str, tensors: dict, t) -> list[tuple]:
        """The head's Linear layers as ``(weight, bias, activation)``: the architecture's sequence head (its
        optional modules only when stored), one Linear for the token and QA heads, none for embeddings."""
        from . import arch as A

        steps = []
        for name, act, optional in A.head_modules(self.arch, self.head, prefix):
            if optional and name + ".weight" not in tensors:
                continue
            steps.append((t(name + ".weight"), t(name + ".bias"), act))
        return steps

    # -------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, threads: int | None = None, *, verify: bool = True,
                        length_config: Any = "default", int8_weights: str = "dequantize") -> "SparseModel":
        """Load an artifact directory. ``threads``: numba (and torch, if imported) threads; default all cores.
        ``length_config``: ``"default"`` (the manifest's), ``None`` (full length) or a per-layer list.
        ``int8_weights`` (quantized artifacts): ``"dequantize"`` (default) turns each int8 weight into float32 once,
        at load (code x its channel's scale: the values the quantized model computes with, as the fake-quant
        training did); ``"keep"`` keeps the codes and widens them inside the kernel (4x less weight memory,
        but slower: measured 1.2-1.65x the time per Linear layer of MiniLM at 90% 4x1, 128 and 1024 tokens)."""
        from sparsify.runtime.validate import check_manifest_types, validate_artifact

        root = Path(path)
        check_manifest_types(root)
        manifest = read_manifest(root, verify=verify)
        tensors = load_tensors(root / manifest["weights"])
        _unpack_int4_layers(root, manifest, tensors)  # packed int4 codes -> the int8 codes the kernels take
        validate_artifact(root, manifest, tensors)  # the manifest against the tensors, finite weights, tokenizer
        return cls(root, manifest, tensors, threads, length_config, int8_weights)

    # -------------------------------------------------------------------------------------------- forward
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, length_config: Any = "default"):
        """The head's output for padded ``input_ids`` ``(batch, seq)`` (numpy or torch), float32 numpy:
        sequence classification ``(batch, labels)``; token classification ``(batch, seq, labels)``; question
        answering ``(batch, seq, 2)`` (start, end logits); embeddings ``(batch, dim)`` (pooled). Padded positions
        of per-token outputs are 0.

        ``attention_mask`` marks real tokens (1) and padding (0), left or right: positions count the real tokens
        (0, 1, ...; RoBERTa from pad_token_id + 1) and the first real token is [CLS], so left- and right-padded
        batches give the same output (as transformers does for right padding). ``length_config``: ``"default"``
        (the model's), ``None`` (full length) or a list.
        """
        ids = _as_int64(input_ids, "input_ids")
        if ids.ndim != 2:
            raise SparsifyError(f"input_ids must be 2-D (batch, sequence), got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else _as_int64(attention_mask, "attention_mask")
        types = np.zeros_like(ids) if token_type_ids is None else _as_int64(token_type_ids, "token_type_ids")
        if mask.shape != ids.shape or types.shape != ids.shape:
            raise SparsifyError(f"attention_mask / token_type_ids must have the shape of input_ids {ids.shape}")
        per_token = self.head in ("token-classification", "question-answering")
        if ids.shape[0] == 0:
            width = self.hidden * len(self.pooling_modes) if self.head == "embeddings" else len(self.head_steps[-1][1])
            return np.zeros((0, ids.shape[1], width) if per_token else (0, width), np.float32)
        if ids.shape[1] > self.max_positions:
            raise SparsifyError(f"sequence length {ids.shape[1]} exceeds the model's {self.max_positions} positions")
        real = mask.astype(bool)
        lens = real.sum(axis=1).astype(np.int64)
        if np.any(lens == 0):
            raise SparsifyError("a sequence has no real tokens (attention_mask all zero)")
        out = self._forward_packed(ids[real], self._positions(lens), types[real], lens, length_config)
        if not per_token:
            return out
        padded = np.zeros(ids.shape + out.shape[1:], np.float32)  # back to (batch, seq, ...) at the real tokens
        padded[real] = out
        return padded

    def _positions(self, lens: np.ndarray) -> np.ndarray:
        """Position ids of packed sequences: 0.. per sequence (RoBERTa: from pad_token_id + 1)."""
        if not len(lens):
            return np.zeros(0, np.int64)
        return np.concatenate([np.arange(self.position_offset, self.position_offset + n, dtype=np.int64) for n in lens])

    @property
    def pooling_modes(self) -> list[str]:
        return list((self.pooling or {}).get("modes") or ["mean"])

    def _forward_packed(self, ids, positions, types, lens, length_config="default", head: str | None = None,
                        normalize: bool | None = None):
        """The output of ``head`` (default: the artifact's) for packed tokens: per sequence for the sequence
        head and embeddings (unit length if ``normalize``, None: as the pooling configuration says), per token
        (packed rows) for the token and QA heads."""
        head = head or self.head
        first_only = head == "sequence-classification" or (head == "embeddings" and self.pooling_modes == ["cls"])
        if first_only or head == "embeddings":  # pooled over the tokens that reach the end, as in training
            cfg = self.length_config if length_config == "default" else parse_length_config(length_config,
                                                                                               self.n_layers)
        elif length_config not in ("default", None):  # the model's own configuration is skipped silently
            raise SparsifyError(f"a length configuration drops tokens, and {head} needs every token: run it at full "
                                "length (length_config=None)")
        else:
            cfg = None
        if not self.arch.token_types:  # one type or none: every token has type 0
            types = np.zeros(len(ids), np.int64)
        x, starts, lens = self._encoder(ids, positions, types, lens, cfg, first_only)
        from . import ops

        if head == "embeddings":
            if normalize is None:
                normalize = bool((self.pooling or {}).get("normalize"))
            return _pool(x, starts, lens, self.pooling_modes, normalize)
        if head != "sequence-classification":  # one Linear on every token
            return ops.linear64(x, *self.head_steps[0][:2]).astype(np.float32)
        h = x[starts]
        for w, b, act in self.head_steps:
            h = ops.linear64(h, w, b, tanh=act == "tanh")
            if act is not None and act != "tanh":
                h = _ACTIVATIONS[act](h)
        return h.astype(np.float32)

    def _encoder(self, ids, positions, types, lens, cfg, first_only: bool):
        """Final hidden states ``(x, starts, lens)``: packed rows of every kept token, or (``first_only``) of the
        first token of each sequence only (the last layer then runs attention and the feed-forward block for that
        row alone)."""
        from sparsify.kernels.spmm import spmm

        from . import ops
        from .attention import attention

        if ids.size and (ids.min() < 0 or ids.max() >= self.word.shape[0]):
            raise SparsifyError(f"input_ids out of the vocabulary range [0, {self.word.shape[0]})")
        if types.size and (types.min() < 0 or types.max() >= self.typ.shape[0]):
            raise SparsifyError(f"token_type_ids out of range [0, {self.typ.shape[0]})")
        lens = np.ascontiguousarray(lens, dtype=np.int64)
        input_lens = lens.copy()
        starts = np.zeros_like(lens)
        np.cumsum(lens[:-1], out=starts[1:])
        ids = np.ascontiguousarray(ids, np.int64)
        if self.word_bits in (4, 2):  # decode the looked-up rows, then the same embedding kernel over them
            rows = ops.decode_rows(ids, self.word, self.word_bits, self.word_scales, self.word_offsets,
                                   self.word_width)
            x = ops.embed_layernorm(np.arange(ids.shape[0], dtype=np.int64), np.ascontiguousarray(positions, np.int64),
                                    np.ascontiguousarray(types, np.int64), rows, self.pos, self.typ, *self.emb_ln,
                                    self.eps)
        else:
            x = ops.embed_layernorm(ids, np.ascontiguousarray(positions, np.int64),
                                    np.ascontiguousarray(types, np.int64), self.word, self.pos, self.typ,
                                    *self.emb_ln, self.eps, word_scales=self.word_scales)
        th = self.threads
        if self.project is not None:  # ELECTRA: embedding_size -> hidden_size
            x = spmm(x, self.project, threads=th)
        # Quantization points in the order of the PyTorch reference (see sparsify.techniques.quantization): the
        # input of each quantized Linear, the residual sum entering each encoder LayerNorm and that LayerNorm's
        # output. ``xq`` is ``x`` as the next query/key/value Linear sees it (fake-quantized when its input is).
        xq = _fq(x, self.layers[0].quant["qkv"][0]) if self.layers and self.layers[0].qkv is not None else x
        for i, L in enumerate(self.layers):
            last = i == self.n_layers - 1
            first = last and first_only
            # the last layer drops too when its tokens are pooled (mean / max); for the first row alone it need not
            drop = cfg is not None and not (last and first_only)
            qkv = spmm(xq, L.qkv, threads=th) if L.qkv is not None else self._qkv_separate(L, x, th)
            fuse = _fused(quant=L.quant["attn_out"])  # the context is fake-quantized as the attention writes it
            ctx, sig = attention(qkv, starts, lens, self.n_heads, significance=drop, first_query_only=first,
                                 quant=fuse.get("quant"))
            if not fuse:  # a float16 point
                ctx = _fq(ctx, L.quant["attn_out"], out=ctx)
            if first:  # only the [CLS] rows matter from here on (exact for sequence heads and CLS pooling)
                x = np.ascontiguousarray(x[starts])
                starts = np.arange(len(lens), dtype=np.int64)
                lens = np.ones_like(lens)
            h = spmm(ctx, L.attn_out, residual=x, out=x, threads=th)
            if drop:
                _norm(h, L.ln1, self.eps, L.act["ln1_in"], L.act["ln1_out"], None)
                h, starts, lens = _drop_tokens(h, sig, starts, lens, input_lens, cfg[i])
                hq = _fq(h, L.quant["inter"])
            else:
                h, hq = _norm(h, L.ln1, self.eps, L.act["ln1_in"], L.act["ln1_out"], L.quant["inter"])
            inter = spmm(hq, L.inter, activation="gelu", threads=th)
            inter = _fq(inter, L.quant["out"], out=inter)
            h = spmm(inter, L.out, residual=h, out=h, threads=th)
            nxt = self.layers[i + 1] if not last else None
            q_next = nxt.quant["qkv"][0] if nxt is not None and nxt.qkv is not None else None
            x, xq = _norm(h, L.ln2, self.eps, L.act["ln2_in"], L.act["ln2_out"], q_next)
        return x, starts, lens

    def _qkv_separate(self, L: _Layer, x: np.ndarray, th: int) -> np.ndarray:
        """Query, key and value one by one: their inputs are quantized differently, or their blocks differ."""
        from sparsify.kernels.spmm import spmm

        return np.hstack([spmm(_fq(x, qp), w, threads=th) for w, qp in zip((L.q, L.k, L.v), L.quant["qkv"])])

    # -------------------------------------------------------------------------------------------- texts
    @property
    def tokenizer(self):
        """The artifact's ``tokenizers.Tokenizer`` (no padding, no truncation: :meth:`encode` handles both)."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            f = self.path / "tokenizer.json"
            if not f.is_file():
                raise ArtifactError(f"{f}: missing; the artifact has no tokenizer (tokenize yourself and call the model)")
            tok = Tokenizer.from_file(str(f))
            tok.no_padding()
            tok.no_truncation()
            self._tokenizer = tok
        return self._tokenizer

    def _tokenize(self, texts: Sequence, max_length: int | None = None, *, strategy: str = "longest_first",
                  stride: int = 0):
        """``tokenizers`` encodings of ``texts`` (strings, or (text, text_pair) pairs), truncated to
        ``max_length`` (default: the artifact's) with ``strategy`` (``only_second`` keeps QA questions whole); the
        cut-off tokens are in each encoding's ``overflowing`` windows, ``stride`` tokens shared with the previous
        window (a stride too large for the question panics in ``tokenizers``: see :meth:`_doc_stride`)."""
        max_length = self._max_length(max_length)
        tok = self.tokenizer
        pairs = _text_inputs(texts)
        tok.enable_truncation(max_length, stride=stride, strategy=strategy)
        try:
            return tok.encode_batch(pairs)
        except Exception as e:  # e.g. only_second with a question longer than max_length
            raise SparsifyError(f"cannot tokenize the texts: {e}") from None
        finally:
            tok.no_truncation()

    def _max_length(self, max_length: int | None) -> int:
        return min(int(max_length or self.max_length), self.max_positions)

    def _pack(self, encs):
        """Packed (ids, positions, types, lens) of tokenizer encodings."""
        lens = np.array([len(e.ids) for e in encs], dtype=np.int64)
        ids = np.fromiter((i for e in encs for i in e.ids), dtype=np.int64, count=int(lens.sum()))
        types = np.fromiter((i for e in encs for i in e.type_ids), dtype=np.int64, count=int(lens.sum()))
        return ids, self._positions(lens), types, lens

    def encode(self, texts: Sequence, max_length: int | None = None):
        """Tokenize ``texts`` (strings, or (text, text_pair) pairs) -> packed (ids, positions, types, lens,
        n_truncated). Texts longer than ``max_length`` (default: the artifact's) are truncated."""
        encs = self._tokenize(texts, max_length)
        return (*self._pack(encs), sum(1 for e in encs if e.overflowing))

    def _batches(self, texts: Sequence, batch_size: int, max_length: int | None, what: str = "predict",
                 strategy: str = "longest_first"):
        """``(encodings, packed output of the head)`` per batch of ``batch_size`` texts; warns once about
        truncated texts."""
        if isinstance(texts, (str, tuple)):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise SparsifyError(f"no texts to {what} (empty input list)")
        _check_batch_size(batch_size)
        truncated = 0
        for b in range(0, len(texts), batch_size):
            encs = self._tokenize(texts[b:b + batch_size], max_length, strategy=strategy)
            truncated += sum(1 for e in encs if e.overflowing)
            yield encs, self._pack(encs)
        if truncated:
            warnings.warn(f"{truncated} of {len(texts)} texts were longer than {max_length or self.max_length} "
                          "tokens and were truncated", stacklevel=3)

    def logits(self, texts: Sequence, batch_size: int = 32, max_length: int | None = None,
               length_config: Any = "default") -> np.ndarray:
        """Logits of the sequence-classification head for a list of texts, in batches of ``batch_size``."""
        self._require("sequence-classification", "logits")
        return np.concatenate([self._forward_packed(*packed, length_config)
                               for _, packed in self._batches(texts, batch_size, max_length)])

    def embed(self, texts: Sequence, batch_size: int = 32, *, normalize: bool | None = None,
              max_length: int | None = None, length_config: Any = "default") -> np.ndarray:
        """Sentence embeddings ``(len(texts), dim)`` float32, pooled as the model's sentence-transformers
        configuration says (manifest ``pooling``; texts stripped of surrounding whitespace, as the library does).
        ``normalize``: None (as the model says), True or False (unit length or not). Any artifact can embed: one
        without a pooling configuration gets mean pooling over the real tokens, with a warning.
        ``length_config``: ``"default"`` (the manifest's), ``None`` (full length) or a per-layer list; with token
        dropping, mean and max pooling read the tokens that reached the last layer (as LengthDrop trains them)."""
        if self.pooling is None or str(self.pooling.get("source", "")).startswith("default"):
            warnings.warn(f"{self.path}: no sentence-transformers pooling configuration (modules.json / "
                          "1_Pooling/config.json): embeddings are the mean of the final hidden states over the real "
                          "tokens, not normalised", stacklevel=2)
        if isinstance(texts, str):
            texts = [texts]
        texts = [t.strip() if isinstance(t, str) else t for t in texts]
        return np.concatenate([self._forward_packed(*packed, length_config, head="embeddings", normalize=normalize)
                               for _, packed in self._batches(texts, batch_size, max_length, "embed")])

    def answer(self, questions: Sequence, contexts: Sequence | None = None, *, batch_size: int = 32,
               max_length: int | None = None, max_answer_length: int = 30, doc_stride: int | None = None) -> list[dict]:
        """Extractive question answering: ``[{"answer", "start", "end", "score"}, ...]`` per (question, context),
        ``start`` / ``end`` character offsets into the context. ``questions`` is a list of questions (with
        ``contexts`` beside it) or of (question, context) pairs. A context too long for ``max_length`` (default:
        the artifact's) is split into windows, each with the whole question, consecutive windows sharing
        ``doc_stride`` tokens of context (default: ``max_length // 4``, as ``data.doc_stride``). In each window the
        span maximises p(start) * p(end) over the context's tokens with start <= end < start +
        ``max_answer_length``; the best-scoring span over the windows of a question is its answer. ``batch_size``
        counts questions (their windows run together). An artifact exported from a QA run defaults to that run's
        ``data.max_length`` and ``data.doc_stride`` (manifest ``qa_windows``)."""
        self._require("question-answering", "answer")
        if isinstance(questions, str):
            questions, contexts = [questions], [contexts] if isinstance(contexts, str) else contexts
        pairs = list(zip(questions, contexts)) if contexts is not None else list(questions)
        if contexts is not None and len(pairs) != len(questions):
            raise SparsifyError(f"{len(questions)} questions but {len(contexts)} contexts")
        if not pairs:
            raise SparsifyError("no texts to answer (empty input list)")
        pairs = _text_inputs(pairs)
        if not isinstance(max_answer_length, int) or max_answer_length < 1:
            raise SparsifyError(f"max_answer_length must be a positive integer, got {max_answer_length!r}")
        _check_batch_size(batch_size)
        trained = self.qa_windows or {}
        max_length = self._max_length(max_length if max_length is not None else trained.get("max_length"))
        if doc_stride is None and trained.get("max_length") == max_length:
            doc_stride = trained.get("doc_stride")  # the windows the model was trained on
        stride = self._doc_stride(pairs, max_length, doc_stride)
        out: list[dict] = []
        for b in range(0, len(pairs), batch_size):
            out.extend(self._answer_batch(pairs[b:b + batch_size], max_length, stride, max_answer_length))
        return out

    def _doc_stride(self, pairs: list, max_length: int, doc_stride: int | None) -> int:
        """``doc_stride`` (default ``max_length // 4``), checked: smaller than the context tokens a window holds
        after the longest question and the special tokens (``tokenizers`` panics otherwise). A single text (no
        question; the answer may be anywhere in it) counts as an empty question."""
        stride = default_doc_stride(max_length) if doc_stride is None else doc_stride
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 0:
            raise SparsifyError(f"doc_stride must be a non-negative integer, got {doc_stride!r}")
        tok = self.tokenizer
        questions = [p[0] for p in pairs if isinstance(p, tuple)]
        longest = max((len(e.ids) for e in tok.encode_batch(questions, add_special_tokens=False)), default=0)
        special = tok.num_special_tokens_to_add(bool(questions))
        problem = stride_problem(max_length, stride, longest=longest, special=special,
                                 where=f"the longest question ({longest} tokens)", default=doc_stride is None)
        if problem is not None:
            raise SparsifyError(f"{problem[0]} {problem[1]}")
        return stride

    def _answer_batch(self, pairs: list, max_length: int, stride: int, max_answer_length: int) -> list[dict]:
        """:meth:`answer` for one batch of (question, context) pairs: every window of every pair in one forward
        pass, the best span per pair."""
        windows, owners = [], []
        for k, enc in enumerate(self._tokenize(pairs, max_length, strategy="only_second", stride=stride)):
            for w in [enc, *enc.overflowing]:
                windows.append(w)
                owners.append(k)
        packed = self._pack(windows)
        logits = self._forward_packed(*packed)
        best: list[dict | None] = [None] * len(pairs)
        for enc, k, st, n in zip(windows, owners, np.cumsum(packed[3]) - packed[3], packed[3]):
            span = decode_span(logits[st:st + n, 0], logits[st:st + n, 1], _context_tokens(enc), max_answer_length)
            if span is None or (best[k] is not None and span[2] <= best[k]["score"]):
                continue  # on a tie the earlier window's span stays
            i, j, score = span
            cs, ce = enc.offsets[i][0], enc.offsets[j][1]
            context = pairs[k][1] if isinstance(pairs[k], tuple) else pairs[k]
            best[k] = {"answer": context[cs:ce], "start": int(cs), "end": int(ce), "score": float(score)}
        return [b or {"answer": "", "start": 0, "end": 0, "score": 0.0} for b in best]

    def predict(self, texts: Sequence, batch_size: int = 32, *, max_length: int | None = None,
                length_config: Any = "default", return_probabilities: bool = False,
                doc_stride: int | None = None) -> list:
        """Per text: sequence classification ``{"label": name, "score": probability}`` (``"probabilities"``
        too when asked; regression models give ``{"score": value}``); token classification a list of ``{"token",
        "label", "score", "start", "end"}`` per word piece (character offsets; special tokens left out); question
        answering (texts are (question, context) pairs) :meth:`answer`, long contexts in windows sharing
        ``doc_stride`` tokens. Other long texts are truncated with a warning; an empty list is an error."""
        if self.head == "question-answering":
            return self.answer(texts, batch_size=batch_size, max_length=max_length, doc_stride=doc_stride)
        if self.head == "token-classification":
            return self._predict_tokens(texts, batch_size, max_length)
        logits = self.logits(texts, batch_size, max_length, length_config)
        if self.problem_type == "regression" or logits.shape[1] == 1:
            return [{"score": float(v)} for v in logits[:, 0]]
        names = self.labels or [f"LABEL_{i}" for i in range(logits.shape[1])]
        out = []
        for p in _softmax(logits):
            k = int(p.argmax())
            r = {"label": names[k], "score": float(p[k])}
            if return_probabilities:
                r["probabilities"] = {names[j]: float(p[j]) for j in range(len(p))}
            out.append(r)
        return out

    def _predict_tokens(self, texts: Sequence, batch_size: int, max_length: int | None) -> list[list[dict]]:
        out = []
        texts = [texts] if isinstance(texts, str) else list(texts)
        for encs, packed in self._batches(texts, batch_size, max_length):
            probs = _softmax(self._forward_packed(*packed))
            names = self.labels or [f"LABEL_{i}" for i in range(probs.shape[1])]
            st = 0
            for enc in encs:
                text = texts[len(out)]
                text = text[0] if isinstance(text, tuple) else text
                rows = []
                for k, (special, seq, (cs, ce)) in enumerate(zip(enc.special_tokens_mask, enc.sequence_ids,
                                                                 enc.offsets)):
                    if special or seq != 0:
                        continue
                    p = probs[st + k]
                    j = int(p.argmax())
                    rows.append({"token": text[cs:ce], "label": names[j], "score": float(p[j]), "start": int(cs),
                                 "end": int(ce)})
                out.append(rows)
                st += len(enc.ids)
        return out

    def _require(self, head: str, method: str) -> None:
        if self.head != head:
            hint = {"embeddings": "embed()", "question-answering": "answer()", "token-classification": "predict()",
                    "sequence-classification": "predict() or logits()"}[self.head]
            raise SparsifyError(f"{method}() needs a {head} artifact; this one has a {self.head} head: use {hint}")

    def __repr__(self) -> str:
        return (f"SparseModel({self.path}, layers={self.n_layers}, hidden={self.hidden}, threads={self.threads}, "
                f"length_config={self.length_config})")


def _text_inputs(texts: Sequence) -> list:
    """``texts`` as strings and (text, text_pair) tuples, checked."""
    out = [tuple(t) if isinstance(t, (list, tuple)) else t for t in texts]
    for t in out:
        if not isinstance(t, (str, tuple)) or (isinstance(t, tuple) and (len(t) != 2 or not all(
                isinstance(s, str) for s in t))):
            raise SparsifyError(f"texts must be strings or (text, text_pair) pairs, got {t!r:.80}")
    return out


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SparsifyError(f"batch_size must be a positive integer, got {batch_size!r}")


# ------------------------------------------------------------------------------------------------ heads
def _gelu(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


# activations inside sequence heads besides tanh (fused into the Linear): ELECTRA's GELU, DistilBERT's ReLU
_ACTIVATIONS = {"gelu": _gelu, "relu": lambda x: np.maximum(x, 0.0)}


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def _normalize(e: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (as torch.nn.functional.normalize: the norm clamped at 1e-12)."""
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def _pool(x: np.ndarray, starts: np.ndarray, lens: np.ndarray, modes: list[str], normalize: bool) -> np.ndarray:
    """sentence-transformers pooling of packed hidden states, modes concatenated in the order of the
    configuration, then L2 normalisation if asked -> float32 ``(batch, dim * len(modes))``."""
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(x[starts].astype(np.float64))
        elif mode == "max":
            parts.append(np.maximum.reduceat(x, starts, axis=0).astype(np.float64))
        else:
            total = np.add.reduceat(x.astype(np.float64), starts, axis=0)
            parts.append(total / (lens[:, None] if mode == "mean" else np.sqrt(lens[:, None])))
    e = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    return (_normalize(e) if normalize else e).astype(np.float32)


def _context_tokens(enc) -> np.ndarray:
    """Tokens an answer may use: those of the second sequence (the context) of a (question, context) encoding,
    or every non-special token of a single text."""
    seq = enc.sequence_ids
    want = 1 if any(s == 1 for s in seq) else 0
    return np.array([s == want and not special for s, special in zip(seq, enc.special_tokens_mask)], bool)


def decode_span(start_logits: np.ndarray, end_logits: np.ndarray, allowed: np.ndarray,
                max_answer_length: int = 30) -> tuple[int, int, float] | None:
    """The answer span ``(start token, end token, score)`` maximising p(start) * p(end), the probabilities a
    softmax over the ``allowed`` tokens, with start <= end < start + ``max_answer_length``; None when no token is
    allowed."""
    idx = np.flatnonzero(allowed)
    if not idx.size:
        return None
    ps = _softmax(np.asarray(start_logits)[idx])
    pe = _softmax(np.asarray(end_logits)[idx])
    gap = idx[None, :] - idx[:, None]
    scores = np.where((gap >= 0) & (gap < max_answer_length), ps[:, None] * pe[None, :], -1.0)
    i, j = np.unravel_index(int(scores.argmax()), scores.shape)
    return int(idx[i]), int(idx[j]), float(scores[i, j])


# ------------------------------------------------------------------------------------------------ helpers
def _as_int64(a, name: str) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor, without importing torch
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.dtype.kind not in "iub":
        raise SparsifyError(f"{name} must be integers, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _unpack_int4_layers(root: Path, manifest: dict, tensors: dict) -> None:
    """In place: each layer stored as packed int4 codes (manifest ``"dtype": "int4"``) gets its int8 codes back
    (dense ``NAME.weight`` or block ``NAME.data`` of shape ``codes_shape``); nothing else changes, so the rest of
    the loading sees an int8 layer with per-output-channel scales."""
    from sparsify.packing import packed_cols, unpack_int4

    layers = manifest.get("layers")
    if not isinstance(layers, dict):
        return
    for name, meta in layers.items():
        if not isinstance(meta, dict) or meta.get("dtype") != "int4":
            continue
        key = name + (".weight" if meta.get("block") is None else ".data")
        shape = meta.get("codes_shape")
        packed = tensors.get(key)
        if packed is None or packed.dtype != np.uint8 or not isinstance(shape, list) or not shape or \
                not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ArtifactError(f"{root}: int4 layer {name!r}: {key} must be uint8 packed codes with a codes_shape in "
                                "the manifest")
        if meta.get("block") is None:
            if len(shape) != 2 or packed.shape != (shape[0], packed_cols(shape[1], 4)):
                raise ArtifactError(f"{root}: int4 layer {name!r}: {key} has shape {packed.shape}, not the packed "
                                    f"rows of {shape}")
            tensors[key] = unpack_int4(packed, shape[1])
        else:
            n = int(np.prod(shape))
            if packed.shape != (packed_cols(n, 4),):
                raise ArtifactError(f"{root}: int4 layer {name!r}: {key} has shape {packed.shape}, not {n} packed "
                                    f"codes")
            tensors[key] = unpack_int4(packed[None, :], n).reshape(shape)


def _same_quant(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if len(a) != len(b):
        return False
    if len(a) == 1:
        return a == b
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


def _fq(x: np.ndarray, q, out: np.ndarray | None = None) -> np.ndarray:
    """``x`` quantized and dequantized with ``q`` (per-feature scale, zero point, bits, signed), rounded to
    float16 and back (``("float16",)``), or unchanged (None); into ``out`` when given (may be ``x``)."""
    if q is None:
        return x if out is None else out
    if len(q) == 1:
        y = x.astype(np.float16).astype(np.float32)
        if out is None:
            return y
        out[...] = y
        return out
    from . import ops

    return ops.fake_quant(x, q[0], q[1], q[2], q[3], out=out)


def _fused(**points) -> dict:
    """The points that the fused kernels take (8-bit ones and absent ones); {} when one is float16."""
    return {} if any(q is not None and len(q) != 4 for q in points.values()) else points


def _norm(h: np.ndarray, ln, eps: float, q_in, q_out, q_next) -> tuple[np.ndarray, np.ndarray]:
    """Layer norm in place, with the residual sum quantized before it and its output after it, where the
    quantizer put those points (the order of the PyTorch hooks: pre-hook, LayerNorm, forward hook); returns
    ``(h, h as the next Linear sees it)``: quantized with ``q_next``, or ``h`` itself."""
    from . import ops

    if _fused(q_in=q_in, q_out=q_out, q_next=q_next):
        return ops.layernorm_quant_(h, *ln, eps, q_in, q_out, q_next)
    _fq(h, q_in, out=h)
    ops.layernorm_(h, *ln, eps)
    _fq(h, q_out, out=h)
    return h, _fq(h, q_next)


def _dense(w: np.ndarray, bias: np.ndarray):
    """A dense float32 weight as a block-sparse matrix with every block kept, for the same kernels."""
    from sparsify.kernels.format import BlockSparseMatrix

    blk = (4, 1) if w.shape[0] % 4 == 0 else (1, 1)
    full = np.ones((w.shape[0] // blk[0], w.shape[1] // blk[1]), bool)
    return BlockSparseMatrix.from_dense(w, blk, mask=full, bias=bias)


def _dense_int8(codes: np.ndarray, scales: np.ndarray, bias: np.ndarray):
    """A dense int8 weight ``(out, in)`` as an int8 block-sparse matrix with every block kept (4x1 blocks when
    ``out`` allows), so that it runs through the same kernels with int8 weights."""
    from sparsify.kernels.format import BlockSparseMatrix

    n_out, n_in = codes.shape
    br = 4 if n_out % 4 == 0 else 1
    nbr = n_out // br
    data = np.ascontiguousarray(codes.reshape(nbr, br, n_in).transpose(0, 2, 1).reshape(nbr * n_in, br, 1))
    indptr = np.arange(nbr + 1, dtype=np.int64) * n_in
    indices = np.tile(np.arange(n_in, dtype=np.int64), nbr)
    return BlockSparseMatrix((n_out, n_in), (br, 1), indptr, indices, data, scales, bias)


def _concat_rows(ms):
    """Stack block-sparse matrices vertically (one SpMM for query, key and value); None if they differ in
    block shape or dtype."""
    from sparsify.kernels.format import BlockSparseMatrix

    if len({m.block for m in ms}) != 1 or len({m.dtype for m in ms}) != 1 or len({m.in_features for m in ms}) != 1:
        return None
    indptr = [ms[0].indptr]
    off = ms[0].nnz_blocks
    for m in ms[1:]:
        indptr.append(m.indptr[1:] + off)
        off += m.nnz_blocks
    scales = None if ms[0].scales is None else np.concatenate([m.scales for m in ms])
    bias = np.concatenate([m.bias if m.bias is not None else np.zeros(m.out_features, np.float32) for m in ms])
    return BlockSparseMatrix((sum(m.out_features for m in ms), ms[0].in_features), ms[0].block,
                             np.concatenate(indptr), np.concatenate([m.indices for m in ms]),
                             np.ascontiguousarray(np.concatenate([m.data for m in ms])), scales,
                             bias.astype(np.float32))


def target_lengths(lens: np.ndarray, input_lens: np.ndarray, entry) -> np.ndarray:
    """Tokens each sequence keeps for one length-configuration entry (never more than it has)."""
    if isinstance(entry, float):
        want = np.ceil(entry * input_lens - 1e-9).astype(np.int64)
    else:
        want = np.full_like(lens, int(entry))
    return np.clip(want, 1, lens)


def _drop_tokens(h, sig, starts, lens, input_lens, entry):
    keep_n = target_lengths(lens, input_lens, entry)
    if np.array_equal(keep_n, lens):
        return h, starts, lens
    rows = []
    for st, n, k in zip(starts.tolist(), lens.tolist(), keep_n.tolist()):
        if k >= n:
            rows.append(np.arange(st, st + n))
            continue
        s = sig[st:st + n].copy()
        s[0] = np.inf  # [CLS] always kept
        idx = np.argpartition(-s, k - 1)[:k]
        idx.sort()
        rows.append(idx + st)
    rows = np.concatenate(rows)
    new_starts = np.zeros_like(keep_n)
    np.cumsum(keep_n[:-1], out=new_starts[1:])
    return np.ascontiguousarray(h[rows]), new_starts, keep_n
