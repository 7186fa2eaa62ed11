"""``sparsify export RUN_OR_MODEL_DIR -o OUT [--format sparsify|hf|onnx]``: the trained model as an artifact.

``sparsify`` (default) writes a self-describing directory that :class:`sparsify.runtime.SparseModel` runs:

    model.safetensors   every encoder Linear packed block-sparse (``NAME.indptr / .indices / .data / .bias``,
                        plus ``.scales`` for int8 and ``.input_scale / .input_zero_point`` for quantized
                        inputs), or ``NAME.weight`` when the layer is not sparse (int8 with ``NAME.scales``
                        when quantized); the quantized residual sums / LayerNorm outputs as ``POINT.scale`` /
                        ``POINT.zero_point``; the word embeddings float32, or int8 with one scale per row
                        (``...word_embeddings.scales``); everything else float32
    sparsify.json       the manifest: format and version, architecture (the config in BERT's key names, see
                        :mod:`sparsify.runtime.arch`), head (sequence / token classification, question
                        answering, embeddings) and sentence-transformers pooling, per-layer block shape (rows x cols,
                        out x in) / sparsity / dtype / quantization parameters, the quantized activations
                        (``activations``), the embedding storage, length configuration, task and label names,
                        size and sha256 of every file
    tokenizer.json ...  the tokenizer files

The block shape of each layer is inferred from its zeros (the model-wide shape when the layer follows it); a
layer with under 5% of its blocks zero is stored dense. A quantized model is recognised by
``quantization.json`` (+ ``quantization.safetensors``) in the model directory, as written by
:func:`sparsify.techniques.quantization.save_converted`, or given as ``quantized=`` / ``activations=`` (the
``convert()`` / ``convert_activations()`` dicts): per module name ``weight_int8``, ``weight_scale`` (out,),
``bias``, ``input_scale``, ``input_zero_point``, ``input_groups``, ``input_permutation``, ``input_bits``; per
activation point (``<encoder LayerNorm>.input`` = the residual sum, ``.output``) ``scale``, ``zero_point``,
``groups``, ``permutation``, ``bits``. Weights are stored int8 with the per-channel scales; every activation
quantization point is written to the manifest (groups and permutation resolved to one scale and zero point per
feature) and replayed by the runtime at the same place. Word embeddings: ``--embeddings auto`` (default) stores
them as the run trained them: int8 with a scale per row (a quarter of their float32 size) when its
quantization had ``embeddings: true`` (recorded in quantization.json), float32 otherwise; ``int8`` forces the
int8 rows on a model that did not train with them (smaller, but it changes the model slightly: measure with
``scripts/parity_sst2.py``), ``float32`` keeps them float32. A length configuration is read from
``length_config.json`` in the model directory.

``hf`` writes a transformers checkpoint with the dense-equivalent weights (masks applied, int8 weights
dequantized; activation quantization cannot be expressed there). ``onnx`` writes ``model.onnx`` of the same
dense-equivalent network (inputs ``input_ids``, ``attention_mask`` and, where the model takes them,
``token_type_ids``; outputs by head: ``logits`` (sequence, token classification), ``start_logits`` and
``end_logits`` (question answering), ``sentence_embedding`` (embeddings, pooled and normalised as the model's
sentence-transformers configuration says)).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sparsify.errors import SparsifyError

__all__ = ["export", "main", "FORMATS"]

FORMATS = ("sparsify", "hf", "onnx")
DENSE_BELOW = 0.05  # block sparsity under which a layer is stored dense
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
_FAST_BLOCKS = ((4, 1), (8, 1), (16, 1), (1, 1), (1, 4))


# ------------------------------------------------------------------------------------------------ sources
def _resolve(path: str | Path) -> tuple[Path, Path | None]:
    """(model directory, run directory or None)."""
    p = Path(path)
    if not p.exists() and _is_hub_id(str(path)):
        p = _hub_snapshot(str(path))
    if not p.exists():
        raise SparsifyError(f"{p}: no such file or directory (give a run directory or a model directory)")
    if (p / "recipe.yaml").is_file() and (p / "model").is_dir():
        return p / "model", p
    if (p / "config.json").is_file():
        return p, None
    raise SparsifyError(f"{p}: neither a model directory (config.json) nor a run directory (recipe.yaml + model/)")


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a hub model (downloaded, or from the cache when HF_HUB_OFFLINE=1)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id))
    except Exception as e:  # not on the hub, not in the cache, offline...
        raise SparsifyError(f"{repo_id}: not a local directory, and the hub model cannot be loaded "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _run_data(run_dir: Path | None) -> dict:
    """The ``data`` section of a run's recipe.yaml; empty without a run or a readable recipe."""
    if run_dir is None:
        return {}
    import yaml

    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    data = recipe.get("data") if isinstance(recipe, dict) else None
    return data if isinstance(data, dict) else {}


def _task_of(run_dir: Path | None) -> str | None:
    data = _run_data(run_dir)
    return data.get("task") or data.get("config")


def _qa_windows(run_dir: Path | None) -> dict | None:
    """A question-answering run's windows, ``{"max_length", "doc_stride"}`` (the stride resolved), from its
    recipe.yaml: the runtime reads long contexts the way the model was trained to. None without a run."""
    from sparsify.qa_windows import default_doc_stride

    data = _run_data(run_dir)
    max_length = data.get("max_length")
    if not isinstance(max_length, int):
        return None
    stride = data.get("doc_stride")
    return {"max_length": max_length,
            "doc_stride": stride if isinstance(stride, int) else default_doc_stride(max_length)}


def _load_quantization(model_dir: Path, quantized: dict | None,
                       activations: dict | None = None) -> tuple[dict[str, dict] | None, dict[str, dict]]:
    """``(modules, activations)``: the converted-model dict (module name -> fields) and the quantized activations
    that are not Linear inputs (point name -> fields, see :func:`sparsify.techniques.quantization.convert.
    convert_activations`), from the arguments or from quantization.json / quantization.safetensors in the model
    directory (array fields in the safetensors as ``MODULE.FIELD`` and ``activation:POINT.FIELD``)."""
    if quantized is not None:
        return ({k: {f: _np(v) for f, v in d.items()} for k, d in quantized.items()},
                {k: {f: _np(v) for f, v in d.items()} for k, d in (activations or {}).items()})
    jpath = model_dir / "quantization.json"
    if not jpath.is_file():
        return None, {}
    try:
        meta = json.loads(jpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SparsifyError(f"{jpath}: not valid JSON ({e})") from None
    modules = meta.get("modules", meta) if isinstance(meta, dict) else None
    if not isinstance(modules, dict):
        raise SparsifyError(f"{jpath}: expected an object of module name -> quantization parameters")
    points = meta.get("activations", {}) if "modules" in meta else {}
    if not isinstance(points, dict):
        raise SparsifyError(f"{jpath}: 'activations' must be an object of point name -> quantization parameters")
    tensors: dict[str, np.ndarray] = {}
    spath = model_dir / "quantization.safetensors"
    if spath.is_file():
        from safetensors.numpy import load_file

        tensors = load_file(str(spath))

    def collect(section: dict, head: str) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for name, fields in section.items():
            d = {f: _np(v) for f, v in (fields or {}).items()}
            prefix = head + name + "."
            for key, arr in tensors.items():
                if key.startswith(prefix) and "." not in key[len(prefix):]:
                    d[key[len(prefix):]] = arr
            out[name] = d
        return out

    for key, arr in tensors.items():  # a damaged or diverged file is refused, never half-used
        _check_quant_values(spath, key, arr)
    for head, section in (("", modules), ("activation:", points)):
        for name, fields in section.items():
            for field, value in (fields or {}).items():
                _check_quant_values(jpath, head + name + "." + field, value)
    return collect(modules, ""), collect(points, "activation:")


def _check_quant_values(path: Path, key: str, value) -> None:
    """Quantization parameters must be finite numbers, and scales positive."""
    if isinstance(value, (str, bool)) or value is None:
        return
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return
    if not np.isfinite(arr).all():
        bad = int(arr.size - np.isfinite(arr).sum())
        raise SparsifyError(f"{path}: {key} has {bad} non-finite value(s) (NaN or inf): the file is damaged or the "
                            "training diverged; export from another checkpoint")
    if "scale" in key.rsplit(".", 1)[-1] and (arr <= 0).any():
        raise SparsifyError(f"{path}: {key} has {int((arr <= 0).sum())} scale(s) <= 0; scales must be positive")


def _np(v: Any):
    if hasattr(v, "detach"):
        v = v.detach().cpu()
        return v.float().numpy() if v.is_floating_point() else v.numpy()
    if isinstance(v, (list, tuple)):
        return np.asarray(v)
    return v


def _input_quant(q: dict, in_features: int, name: str) -> tuple[np.ndarray | None, np.ndarray | None, dict] | None:
    """A Linear input's quantization: see :func:`_activation_quant` (fields ``input_*``)."""
    bits = int(q.get("input_bits", q.get("bits", 8)))
    return _activation_quant(q.get("input_scale"), q.get("input_zero_point", 0), q.get("input_groups"),
                             q.get("input_permutation"), bits, bool(q.get("input_signed", False)), in_features,
                             f"{name} input")


def _activation_quant(scale, zero_point, groups, perm, bits: int, signed: bool, width: int,
                      name: str) -> tuple[np.ndarray | None, np.ndarray | None, dict] | None:
    """``(per-feature scale, per-feature zero point, JSON description)`` of one quantized activation (per tensor
    or PEG groups with their permutation resolved to one scale / zero point per feature); ``(None, None,
    {"bits": 16, ...})`` for an activation kept in float16; None when it is not quantized."""
    if bits == 16:
        return None, None, {"bits": 16, "format": "float16 (rounded to half precision and back)"}
    if scale is None or bits != 8:
        return None  # not quantized (32 bits, or never observed)
    scale = np.atleast_1d(np.asarray(scale, np.float32)).ravel()
    zp = np.atleast_1d(np.asarray(zero_point if zero_point is not None else 0, np.float32)).ravel()
    groups = int(groups or scale.size)
    if scale.size not in (1, groups) or width % groups:
        raise SparsifyError(f"{name}: {scale.size} scale values for {groups} groups of {width} features")
    if not np.all(np.isfinite(scale) & (scale > 0)):
        raise SparsifyError(f"{name}: activation scales must be positive and finite")
    if zp.size == 1:
        zp = np.repeat(zp, scale.size)
    gs = width // groups
    per_pos_s = np.repeat(np.broadcast_to(scale, (groups,)), gs)
    per_pos_z = np.repeat(np.broadcast_to(zp, (groups,)), gs)
    feat_s = np.empty(width, np.float32)
    feat_z = np.empty(width, np.float32)
    if perm is not None:
        perm = np.asarray(perm, np.int64).ravel()
        if perm.shape != (width,) or not np.array_equal(np.sort(perm), np.arange(width)):
            raise SparsifyError(f"{name}: the permutation is not a permutation of {width} features")
        feat_s[perm] = per_pos_s  # permuted position p holds feature perm[p]
        feat_z[perm] = per_pos_z
    else:
        feat_s[:], feat_z[:] = per_pos_s, per_pos_z
    desc = {"bits": bits, "signed": signed, "groups": groups, "permuted": perm is not None,
            "granularity": "per-tensor" if groups == 1 else "per-embedding-group",
            "stored": "one scale and zero point per feature (groups and permutation resolved)"}
    return feat_s, feat_z, desc


# The activations the runtime can quantize besides Linear inputs: the residual sum entering each encoder
# LayerNorm (its input) and the LayerNorm's output, as the quantizer's hooks do (point suffix -> kind).
_POINT_KIND = {"input": "residual sum (LayerNorm input)", "output": "LayerNorm output"}


def _activation_points(acts: dict[str, dict], hidden: int, norms: list[str]) -> tuple[dict, dict]:
    """Manifest entries and tensors (``POINT.scale`` / ``POINT.zero_point``) of the quantized residual sums and
    LayerNorm outputs; ``norms``: the encoder layers' LayerNorm module names."""
    meta, tensors = {}, {}
    known = set(norms)
    for name, p in sorted(acts.items()):
        norm, _, kind = name.rpartition(".")
        if norm not in known or kind not in _POINT_KIND:
            raise SparsifyError(f"activation quantization for {name!r}: the runtime replays only the inputs and "
                                "outputs of the encoder layers' LayerNorms (e.g. <base>.encoder.layer.N.attention."
                                "output.LayerNorm.input / .output)")
        aq = _activation_quant(p.get("scale"), p.get("zero_point"), p.get("groups"), p.get("permutation"),
                               int(p.get("bits", 8)), bool(p.get("signed", False)), hidden, name)
        if aq is None:
            continue
        scale, zp, desc = aq
        desc = {"point": _POINT_KIND[kind], **desc}
        if scale is not None:
            tensors[name + ".scale"], tensors[name + ".zero_point"] = scale, zp
        meta[name] = desc
    return meta, tensors


def _quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes and float32 scales per row (symmetric, ``max|row| / 127``; 1 for an all-zero row):
    ``w ~= codes * scales[:, None]``."""
    amax = np.abs(w).max(axis=1)
    scales = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    codes = np.clip(np.rint(w / scales[:, None]), -127, 127).astype(np.int8)
    return codes, scales


# ------------------------------------------------------------------------------------------------ packing
EMBEDDINGS = ("auto", "int8", "int4", "int2", "float32")


def _word_bits(embeddings: str, trained_bits: int | None) -> int | None:
    """Bits of the stored word-embedding rows (None: float32) for ``--embeddings`` and what the run trained."""
    if embeddings == "auto":
        return trained_bits
    return {"int8": 8, "int4": 4, "int2": 2, "float32": None}[embeddings]


def _embeddings_meta(bits: int | None, width: int) -> dict:
    if bits is None:
        return {"word": "float32"}
    if bits == 8:
        return {"word": "int8, symmetric, one scale per row (word_embeddings.scales)", "bits": 8}
    from sparsify.packing import packed_cols
    from sparsify.techniques.quantization.lowbit import describe

    packing = ("two codes per byte, the first in the low nibble, stored as code + 8" if bits == 4 else
               "four codes per byte, the first in the lowest two bits")
    return {"word": f"{describe(bits)} (word_embeddings.packed, .scales" + (", .offsets)" if bits == 2 else ")"),
            "bits": bits, "packing": packing, "width": width, "packed_width": packed_cols(width, bits)}


def _pack_word_rows(base: str, table: np.ndarray, bits: int) -> dict[str, np.ndarray]:
    """The word-embedding table at 4 or 2 bits per value (the rows QAT trained with: one implementation,
    :mod:`sparsify.techniques.quantization.lowbit`): ``BASE.packed`` uint8 ``(vocab, ceil(width * bits / 8))``,
    ``BASE.scales`` float32 ``(vocab,)`` and, at 2 bits, ``BASE.offsets`` float32 ``(vocab,)``."""
    import torch

    from sparsify.packing import pack_int4, pack_uint2
    from sparsify.techniques.quantization.lowbit import quantize_rows

    codes, scales, offsets = quantize_rows(torch.from_numpy(table), bits)
    codes = codes.numpy()
    out = {base + "packed": pack_int4(codes) if bits == 4 else pack_uint2(codes.astype(np.uint8)),
           base + "scales": np.ascontiguousarray(scales.numpy(), np.float32)}
    if offsets is not None:
        out[base + "offsets"] = np.ascontiguousarray(offsets.numpy(), np.float32)
    return out


def _infer_block(w: np.ndarray, preferred: tuple[int, int] | None) -> tuple[tuple[int, int] | None, float]:
    """(block shape or None for dense, block sparsity)."""
    import torch

    from sparsify.sparsity import infer_block_candidates, follows_block

    t = torch.from_numpy(w)
    block = None
    if preferred is not None and follows_block(t, preferred):
        block = preferred
    else:
        block, tied = infer_block_candidates(t)
        if block is None and tied:
            block = next((b for b in _FAST_BLOCKS if b in tied), tied[0])
    if block is None:
        return None, 0.0
    br, bc = block
    zero = (w.reshape(w.shape[0] // br, br, w.shape[1] // bc, bc) == 0).all(axis=(1, 3))
    sparsity = float(zero.mean())
    return (block, sparsity) if sparsity >= DENSE_BELOW else (None, sparsity)


class _Source:
    """A model directory read for packing: its config reduced to BERT's names, its architecture map, its
    encoder prefix and Linear weights, its head and (sentence-transformers models) its pooling."""

    def __init__(self, model_dir: Path):
        from sparsify.runtime import arch as A
        from sparsify.sparsity import load_report_weights

        self.config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        model_type = self.config.get("model_type")
        self.arch = A.architecture(model_type)
        if self.arch is None:
            raise SparsifyError(f"{model_dir}: model_type {model_type!r}: the sparsify artifact supports "
                                f"{A.supported()}; use --format hf or onnx for others")
        self.canon = A.canonical_config(self.config)
        if self.canon.get("hidden_act", "gelu") != "gelu":
            raise SparsifyError(f"{model_dir}: hidden_act {self.canon['hidden_act']!r}: the runtime supports gelu only")
        if self.canon.get("position_embedding_type", "absolute") != "absolute":
            raise SparsifyError(f"{model_dir}: position_embedding_type {self.canon['position_embedding_type']!r}: "
                                "the runtime supports absolute position embeddings only")
        self.state = {k: v.float().numpy() if v.is_floating_point() else v.numpy()
                      for k, v in load_report_weights(model_dir).items()}
        self.prefix = self.arch.prefix_in(self.state)
        if self.prefix is None:
            raise SparsifyError(f"{model_dir}: no {model_type} encoder weights found (expected "
                                f"{self.arch.base}.{self.arch.embeddings['word']}.weight)")
        n_layers = int(self.canon["num_hidden_layers"])
        self.linears: dict[str, np.ndarray] = {}
        for i in range(n_layers):
            for name in A.layer_linears(self.arch, self.prefix, i).values():
                if name + ".weight" not in self.state:
                    raise SparsifyError(f"{model_dir}: encoder weight {name}.weight missing")
                self.linears[name] = self.state[name + ".weight"]
        self.norms = [n for i in range(n_layers) for n in A.layer_norms(self.arch, self.prefix, i)]
        self.pooling = _pooling(model_dir)
        self.head = _detect_head(model_dir, self.config, self.state, self.arch, self.prefix, self.pooling)


# an embeddings model without a sentence-transformers pooling configuration: mean over the real tokens
DEFAULT_POOLING = {"modes": ["mean"], "normalize": False, "max_seq_length": None,
                   "source": "default: no modules.json / 1_Pooling/config.json"}


def _pooling(model_dir: Path) -> dict | None:
    """The sentence-transformers pipeline of ``modules.json`` (Transformer -> Pooling -> Normalize) as
    ``{"modes", "normalize", "max_seq_length", "source"}``; None for a model without modules.json."""
    from sparsify.runtime.arch import POOLING_MODES

    mpath = model_dir / "modules.json"
    if not mpath.is_file():
        return None
    modules = _read_json(mpath)
    if not isinstance(modules, list):
        raise SparsifyError(f"{mpath}: expected a list of modules")
    out: dict[str, Any] = {"modes": None, "normalize": False, "max_seq_length": None, "source": "modules.json"}
    for m in modules:
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        path = model_dir / str(m.get("path", ""))
        if kind == "Transformer":
            if path.resolve() != model_dir.resolve():
                raise SparsifyError(f"{mpath}: the Transformer module lives in {m.get('path')!r}; export that folder")
            sbert = model_dir / "sentence_bert_config.json"
            if sbert.is_file():
                out["max_seq_length"] = _read_json(sbert).get("max_seq_length")
        elif kind == "Pooling":
            out["modes"] = _pooling_modes(_read_json(path / "config.json"), path / "config.json")
            out["source"] = f"modules.json, {m.get('path')}/config.json"
        elif kind == "Normalize":
            out["normalize"] = True
        else:
            raise SparsifyError(f"{mpath}: module {m.get('type')!r} is not supported by the runtime (Transformer, "
                                "Pooling, Normalize)")
    if not out["modes"]:
        raise SparsifyError(f"{mpath}: no Pooling module with a pooling mode ({', '.join(POOLING_MODES)})")
    return out


def _pooling_modes(cfg: dict, where: Path) -> list[str]:
    """The pooling modes of a sentence-transformers Pooling config, in the order the library concatenates
    them: ``pooling_mode`` (a name or a list) or the older ``pooling_mode_*`` flags."""
    from sparsify.runtime.arch import POOLING_MODES

    legacy = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
              "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
              "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
    modes = cfg.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in legacy.items() if cfg.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad:
        raise SparsifyError(f"{where}: pooling mode {', '.join(map(str, bad))}: the runtime pools with "
                            f"{', '.join(POOLING_MODES)} only")
    return modes


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SparsifyError(f"{path}: cannot read JSON ({e})") from None


def _detect_head(model_dir: Path, config: dict, state: dict, arch, prefix: str, pooling: dict | None) -> str:
    """Which of :data:`sparsify.runtime.arch.HEADS` the model carries."""
    from sparsify.runtime.arch import HEADS, QA_HEAD, TOKEN_HEAD

    names = config.get("architectures") or []
    if pooling is not None or prefix == "":
        return "embeddings"
    if QA_HEAD + ".weight" in state:
        return "question-answering"
    if any(n.endswith("ForTokenClassification") for n in names) and TOKEN_HEAD + ".weight" in state:
        return "token-classification"
    needed = [n for n, _ in arch.sequence_head if n not in arch.optional_head]
    if all(n + ".weight" in state for n in needed):
        return "sequence-classification"
    raise SparsifyError(f"{model_dir}: head {', '.join(names) or '(unknown)'} is not supported by the artifact; "
                        f"supported heads: {', '.join(HEADS)} (a bare encoder or sentence-transformers model gives "
                        "embeddings)")


def _pack_linear(name: str, w: np.ndarray, bias: np.ndarray, q: dict | None,
                 preferred: tuple[int, int] | None) -> tuple[dict[str, np.ndarray], dict]:
    """One encoder Linear layer: its tensors (block-sparse or dense, int8 where quantized) and manifest entry."""
    from sparsify.kernels.format import BlockSparseMatrix, format_block

    tensors: dict[str, np.ndarray] = {}
    if q is not None and q.get("weight_int8") is not None:
        qw = np.asarray(q["weight_int8"]).astype(np.int8)
        scale = np.asarray(q["weight_scale"], np.float32).ravel()
        if qw.shape != w.shape or scale.shape != (w.shape[0],):
            raise SparsifyError(f"{name}: weight_int8 {qw.shape} / weight_scale {scale.shape} do not match the "
                                f"weight {w.shape}")
        if q.get("bias") is not None:
            bias = np.asarray(q["bias"], np.float32)
        # the pattern comes from the float weight (rounding to int8 adds stray zeros) and from the int8 one
        w_eff = np.where((w != 0) | (qw != 0), np.float32(1), np.float32(0))
    else:
        qw, scale, w_eff = None, None, w
    int4 = qw is not None and int(q.get("bits", 8)) == 4
    if int4 and qw.size and (qw.min() < -7 or qw.max() > 7):
        raise SparsifyError(f"{name}: bits 4 but weight codes in [{qw.min()}, {qw.max()}], not [-7, 7]")
    block, sparsity = _infer_block(np.ascontiguousarray(w_eff), preferred)
    meta: dict[str, Any] = {"shape": list(w.shape), "block": None if block is None else format_block(block),
                            "block_shape": None if block is None else list(block),
                            "block_orientation": "rows x cols (out x in)",
                            "sparsity": round(float(((w if qw is None else qw) == 0).mean()), 6),
                            "block_sparsity": round(sparsity, 6), "dtype": "float32", "quantization": None}
    if block is None:
        if qw is not None:  # dense layer: int8 codes + per-output-channel scales
            tensors[name + ".weight"] = np.ascontiguousarray(qw, np.int8)
            tensors[name + ".scales"] = np.ascontiguousarray(scale, np.float32)
            meta["dtype"] = "int8"
        else:
            tensors[name + ".weight"] = np.ascontiguousarray(w, np.float32)
    else:
        if qw is not None:
            br, bc = block
            keep = (w_eff.reshape(w.shape[0] // br, br, w.shape[1] // bc, bc) != 0).any(axis=(1, 3))
            m = BlockSparseMatrix.from_dense(qw.astype(np.float32), block, mask=keep)
            m = BlockSparseMatrix(m.shape, m.block, m.indptr, m.indices, m.data.astype(np.int8), scale, None)
        else:
            m = BlockSparseMatrix.from_dense(w, block)
        tensors[name + ".indptr"], tensors[name + ".indices"], tensors[name + ".data"] = m.indptr, m.indices, m.data
        if m.scales is not None:
            tensors[name + ".scales"] = m.scales
        meta.update(nnz_blocks=m.nnz_blocks, dtype=str(m.dtype))
    if int4:  # two codes per byte; the runtime unpacks them to the int8 codes at load
        from sparsify.packing import pack_int4

        key = name + (".weight" if block is None else ".data")
        codes = tensors[key]
        meta.update(dtype="int4", codes_shape=list(codes.shape), packing="two codes per byte, the first in the low "
                    "nibble, stored as code + 8; rows of the dense weight, or the block data flattened")
        tensors[key] = pack_int4(codes) if block is None else pack_int4(codes.reshape(1, -1))[0]
    tensors[name + ".bias"] = np.ascontiguousarray(bias, np.float32)
    if q is not None:
        qdesc: dict[str, Any] = {"bits": int(q.get("bits", 8))}
        if qw is not None:
            qdesc["weight"] = ("int4 (codes -7..7, packed two per byte), symmetric, per output channel" if int4
                               else "int8, symmetric, per output channel")
        iq = _input_quant(q, w.shape[1], name)
        if iq is not None:
            s_in, z_in, qdesc["input"] = iq
            if s_in is not None:
                tensors[name + ".input_scale"], tensors[name + ".input_zero_point"] = s_in, z_in
        meta["quantization"] = qdesc
    return tensors, meta


def _length_config(model_dir: Path, n_layers: int) -> dict | None:
    from sparsify.runtime.model import parse_length_config

    lpath = model_dir / "length_config.json"
    if not lpath.is_file():
        return None
    raw = _read_json(lpath)
    if isinstance(raw, dict) and raw.get("format") == "sparsify.length_config":
        # the file the trainer and the search write: its "kind" says ratio or absolute; the rest is metadata
        raw = {"length_config": raw.get("length_config"),
               "unit": {"ratio": "ratio", "absolute": "tokens"}.get(raw.get("kind"))}
    lengths = parse_length_config(raw, n_layers)
    return {"lengths": lengths, "unit": "ratio" if isinstance(lengths[0], float) else "tokens",
            "source": "length_config.json"}


def _labels(src: _Source) -> list[str]:
    """Label names of a classification head (none for QA and embeddings)."""
    from sparsify.runtime.arch import TOKEN_HEAD

    if src.head not in ("sequence-classification", "token-classification"):
        return []
    last = src.arch.sequence_head[-1][0] if src.head == "sequence-classification" else TOKEN_HEAD
    id2label = src.config.get("id2label") or {}
    n_labels = int(src.state[last + ".weight"].shape[0]) if last + ".weight" in src.state else len(id2label)
    return [id2label.get(str(i), id2label.get(i, f"LABEL_{i}")) for i in range(n_labels)]


def _max_length(src: _Source, out: Path) -> int:
    """The longest input: the sentence-transformers max_seq_length, else the tokenizer's model_max_length,
    capped at the usable positions (RoBERTa's start after pad_token_id + 1)."""
    positions = int(src.canon["max_position_embeddings"])
    if src.arch.padding_positions:
        positions -= int(src.canon.get("pad_token_id") or 0) + 1
    want = (src.pooling or {}).get("max_seq_length")
    if not want and (out / "tokenizer_config.json").is_file():
        want = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8")).get("model_max_length")
    return int(min(want, positions)) if isinstance(want, (int, float)) and want > 0 else positions


def _pack_artifact(model_dir: Path, run_dir: Path | None, out: Path, quant: dict | None, acts: dict | None = None,
                   embeddings: str = "auto", trained_embedding_bits: int | None = None) -> dict:
    """Write the artifact of ``model_dir`` into ``out``: the packed tensors, the tokenizer, then the manifest."""
    from safetensors.numpy import save_file

    from sparsify.runtime.model import FORMAT, MANIFEST, WEIGHTS, sha256_file

    src = _Source(model_dir)
    quant = quant or {}
    unknown = sorted(set(quant) - set(src.linears))
    if unknown:
        raise SparsifyError(f"quantization parameters for unknown modules: {', '.join(unknown[:5])}")
    word_bits = _word_bits(embeddings, trained_embedding_bits)
    tensors, layers, act_meta = _pack_tensors(src, quant, acts or {}, word_bits)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": FORMAT})
    tok_files = _copy_tokenizer(model_dir, out)
    files = {f: {"sha256": sha256_file(out / f), "bytes": (out / f).stat().st_size} for f in [WEIGHTS, *tok_files]}
    parts = _size_parts(tensors, src.linears, src.prefix, src.arch)
    parts["other"] += files[WEIGHTS]["bytes"] - sum(parts.values())  # the safetensors header
    parts["tokenizer"] = sum(files[f]["bytes"] for f in tok_files)
    manifest = _manifest(src, model_dir, run_dir, out, layers=layers, files=files, parts=parts, quantized=bool(quant),
                         act_meta=act_meta, word_bits=word_bits)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def _pack_tensors(src, quant: dict, acts: dict, word_bits: int | None) -> tuple[dict, dict, dict]:
    """``(tensors, layers, activation metadata)``: every Linear packed block-sparse (its codes and scales when
    quantized), the activation quantization points, the word rows as ``word_bits`` says, the rest float32."""
    import torch

    from sparsify.sparsity import infer_block_shape

    state, linears, prefix = src.state, src.linears, src.prefix
    preferred = infer_block_shape({k: torch.from_numpy(v) for k, v in linears.items()})
    tensors: dict[str, np.ndarray] = {}
    layers: dict[str, dict] = {}
    for name, w in linears.items():
        bias = state.get(name + ".bias")
        layer_tensors, layers[name] = _pack_linear(name, w, np.zeros(w.shape[0], np.float32) if bias is None else bias,
                                                   quant.get(name), preferred)
        tensors.update(layer_tensors)
    act_meta, act_tensors = _activation_points(acts, int(src.canon["hidden_size"]), src.norms)
    tensors.update(act_tensors)
    word_key = f"{prefix}{src.arch.embeddings['word']}.weight"
    packed = {n + s for n in linears for s in (".weight", ".bias")}
    for k, v in state.items():
        if k.endswith("position_ids") or k in packed:
            continue
        if k == word_key and word_bits == 8:  # int8 rows + one scale per row, dequantized at lookup
            tensors[k], tensors[k[:-len("weight")] + "scales"] = _quantize_rows(np.asarray(v, np.float32))
            continue
        if k == word_key and word_bits is not None:  # 4 / 2-bit rows packed into bytes, decoded at lookup
            tensors.update(_pack_word_rows(k[:-len("weight")], np.asarray(v, np.float32), word_bits))
            continue
        tensors[k] = np.ascontiguousarray(v, np.float32)
    return tensors, layers, act_meta


def _manifest(src, model_dir: Path, run_dir: Path | None, out: Path, *, layers: dict, files: dict, parts: dict,
              quantized: bool, act_meta: dict, word_bits: int | None) -> dict:
    from sparsify.runtime.model import FORMAT, FORMAT_VERSION, WEIGHTS

    state = src.state
    dense_bytes = sum(int(np.prod(v.shape)) * 4 for k, v in state.items() if not k.endswith("position_ids"))
    weight_bytes = files[WEIGHTS]["bytes"]
    sparse_layers = [m for m in layers.values() if m["block"]]
    pooling = src.pooling
    if pooling is None and src.head == "embeddings":
        pooling = dict(DEFAULT_POOLING)
    word_key = f"{src.prefix}{src.arch.embeddings['word']}.weight"
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": _version(),
        "source": str(run_dir or model_dir),
        "architecture": src.canon,
        "prefix": src.prefix,
        "head": src.head,
        "pooling": pooling,
        "task": _task_of(run_dir),
        "labels": _labels(src),
        "problem_type": src.config.get("problem_type"),
        "max_length": _max_length(src, out),
        "qa_windows": _qa_windows(run_dir) if src.head == "question-answering" else None,
        "length_config": _length_config(model_dir, int(src.canon["num_hidden_layers"])),
        "quantized": quantized,
        "activations": act_meta,
        "embeddings": _embeddings_meta(word_bits, int(state[word_key].shape[1])),
        "weights": WEIGHTS,
        "layers": layers,
        "files": files,
        "size": {"weights_bytes": weight_bytes, "dense_fp32_bytes": dense_bytes,
                 "ratio": round(weight_bytes / dense_bytes, 4), "parts_bytes": parts},
        "summary": {"sparse_layers": len(sparse_layers), "dense_layers": len(layers) - len(sparse_layers),
                    "blocks": sorted({m["block"] for m in sparse_layers})},
    }


SIZE_PARTS = ("embeddings", "encoder_weights", "indices", "scales", "tokenizer", "other")
_SCALE_SUFFIXES = (".scales", ".input_scale", ".input_zero_point", ".scale", ".zero_point")


def _size_parts(tensors: dict[str, np.ndarray], linears, prefix: str, arch) -> dict[str, int]:
    """Bytes of the weight file's tensors by part: ``embeddings`` (the embedding tables, their layer norm and
    projection, and the word rows' scales / offsets), ``encoder_weights`` (the encoder Linear layers' values and
    biases), ``indices`` (their block-sparse ``indptr`` / ``indices``), ``scales`` (weight scales and activation
    scales / zero points), ``other`` (layer norms, the head). ``tokenizer`` is filled by the caller."""
    parts = dict.fromkeys(SIZE_PARTS, 0)
    emb = [f"{prefix}{n}." for n in arch.embeddings.values() if n] + ([f"{prefix}{arch.project}."] if arch.project
                                                                       else [])
    for key, a in tensors.items():
        module, _, field = key.rpartition(".")
        if any(key.startswith(e) for e in emb):
            part = "embeddings"
        elif module in linears and field in ("indptr", "indices"):
            part = "indices"
        elif key.endswith(_SCALE_SUFFIXES):
            part = "scales"
        elif module in linears and field in ("data", "weight", "bias"):
            part = "encoder_weights"
        else:
            part = "other"
        parts[part] += int(a.nbytes)
    return parts


def _copy_tokenizer(model_dir: Path, out: Path) -> list[str]:
    if not (model_dir / "tokenizer.json").is_file():
        from sparsify.modeling import load_tokenizer

        tok = load_tokenizer(str(model_dir))
        if not getattr(tok, "is_fast", False):
            raise SparsifyError(f"{model_dir}: no fast tokenizer (tokenizer.json) could be built")
        tok.save_pretrained(str(out))
    else:
        for f in _TOKENIZER_FILES:
            if (model_dir / f).is_file():
                shutil.copyfile(model_dir / f, out / f)
    return [f for f in _TOKENIZER_FILES if (out / f).is_file()]


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"sparsify-encoders {version('sparsify-encoders')}"
    except Exception:
        return "sparsify-encoders"


# ------------------------------------------------------------------------------------------------ hf / onnx
def dense_equivalent_model(model_dir: Path, quant: dict | None, *, embedding_bits: int | None = None):
    """The transformers model with masks applied (they are zeros already), int8 weights dequantized, and the
    word embeddings rounded to their int8 / int4 / 2-bit rows when the run trained them so."""
    import torch

    from sparsify.modeling import load_classifier

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    auto = _auto_class(model_dir, config)
    if auto is None:
        n = int(config.get("num_labels") or len(config.get("id2label") or {}) or 2)
        model = load_classifier(str(model_dir), num_labels=n)
    else:  # token classification, question answering, bare encoder: the checkpoint's own class
        import transformers

        model = getattr(transformers, auto).from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    if quant:
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, q in quant.items():
                if q.get("weight_int8") is None:
                    continue
                if name not in modules:
                    raise SparsifyError(f"quantization parameters for unknown module {name!r}")
                w = torch.from_numpy(np.asarray(q["weight_int8"]).astype(np.float32)) * \
                    torch.from_numpy(np.asarray(q["weight_scale"], np.float32).reshape(-1, 1))
                modules[name].weight.copy_(w)
                if q.get("bias") is not None:
                    modules[name].bias.copy_(torch.from_numpy(np.asarray(q["bias"], np.float32)))
    if embedding_bits == 8:
        table = model.get_input_embeddings().weight
        with torch.no_grad():
            codes, scales = _quantize_rows(table.detach().numpy())
            table.copy_(torch.from_numpy(codes.astype(np.float32) * scales[:, None]))
    elif embedding_bits is not None:
        from sparsify.techniques.quantization.lowbit import rounded_rows

        table = model.get_input_embeddings().weight
        with torch.no_grad():
            table.copy_(rounded_rows(table.detach(), embedding_bits))
    return model


_ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def _auto_class(model_dir: Path, config: dict) -> str | None:
    """The transformers Auto class of a checkpoint whose head is not sequence classification (None when it is)."""
    names = config.get("architectures") or []
    for suffix, auto in (("ForTokenClassification", "AutoModelForTokenClassification"),
                         ("ForQuestionAnswering", "AutoModelForQuestionAnswering")):
        if any(n.endswith(suffix) for n in names):
            return auto
    if (model_dir / "modules.json").is_file() or any(n.endswith("Model") for n in names):
        return "AutoModel"
    return None


def _copy_sentence_transformers(model_dir: Path, out: Path) -> None:
    """A sentence-transformers model's own files (pipeline, pooling, settings) next to the exported encoder."""
    for f in _ST_FILES:
        if (model_dir / f).is_file():
            shutil.copyfile(model_dir / f, out / f)
    for sub in model_dir.glob("[0-9]_*"):
        if sub.is_dir():
            shutil.copytree(sub, out / sub.name, dirs_exist_ok=True)


# per head: the ONNX outputs and their dynamic axes (inputs: input_ids, attention_mask and, for models that take
# them, token_type_ids, all (batch, sequence))
ONNX_OUTPUTS = {
    "sequence-classification": {"logits": {0: "batch"}},
    "token-classification": {"logits": {0: "batch", 1: "sequence"}},
    "question-answering": {"start_logits": {0: "batch", 1: "sequence"}, "end_logits": {0: "batch", 1: "sequence"}},
    "embeddings": {"sentence_embedding": {0: "batch"}},
}
_HEAD_OF_AUTO = {None: "sequence-classification", "AutoModelForTokenClassification": "token-classification",
                 "AutoModelForQuestionAnswering": "question-answering", "AutoModel": "embeddings"}


def export_onnx(model, path: Path, *, head: str = "sequence-classification", pooling: dict | None = None,
                opset: int = 17, seq_len: int = 16) -> Path:
    """``model.onnx`` of ``head`` (outputs: :data:`ONNX_OUTPUTS`) with dynamic batch and sequence axes (IR version 8
    so that older runtimes load it). Embeddings: the encoder with its sentence-transformers ``pooling`` (modes,
    normalize) inside the graph."""
    import inspect

    import torch

    try:
        import onnx
    except ImportError:
        raise SparsifyError("--format onnx needs the 'onnx' package (pip install 'sparsify-encoders[bench]')") from None
    import copy

    from sparsify.sentence import pool

    model = copy.deepcopy(model).eval()  # tracing changes the module's state (its outputs drift afterwards)
    seq_len = min(seq_len, model.config.max_position_embeddings)
    ids = torch.randint(5, min(100, model.config.vocab_size), (2, seq_len))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "token_type_ids" in inspect.signature(model.forward).parameters:  # not DistilBERT
        inputs["token_type_ids"] = torch.zeros_like(ids)
    outputs = ONNX_OUTPUTS[head]
    if head == "embeddings":
        pooling = pooling or DEFAULT_POOLING

    class _Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *args):
            out = self.m(**dict(zip(inputs, args)))
            if head == "embeddings":
                return pool(out.last_hidden_state, args[1], pooling["modes"], bool(pooling.get("normalize")))
            return tuple(getattr(out, name) for name in outputs)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Wrap(model), tuple(inputs.values()), str(path), dynamo=False, opset_version=opset,
                          input_names=list(inputs), output_names=list(outputs),
                          dynamic_axes={**{k: {0: "batch", 1: "sequence"} for k in inputs}, **outputs},
                          do_constant_folding=True)
    m = onnx.load(str(path))
    m.ir_version = min(m.ir_version, 8)
    onnx.save(m, str(path))
    return path


# ------------------------------------------------------------------------------------------------ public
def size_by_part(manifest: dict, artifact_bytes: int) -> dict[str, int]:
    """An artifact's bytes by part (embeddings, encoder weights, indices, scales, tokenizer, other) from its
    manifest; "other" also holds what the manifest's parts leave out (the manifest itself), so that the parts add
    up to ``artifact_bytes``."""
    parts = dict(manifest["size"]["parts_bytes"])
    parts["other"] += artifact_bytes - sum(parts.values())
    return parts


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export(run_or_model_dir: str | Path, out_dir: str | Path, format: str = "sparsify", *,
           quantized: dict | None = None, activations: dict | None = None, embeddings: str = "auto",
           overwrite: bool = False) -> dict:
    """Export a run directory (its ``model/``) or a model directory; returns a summary dict (format, out,
    artifact_bytes, dense_fp32_bytes, ratio, and for ``sparsify`` the manifest).

    ``quantized`` / ``activations``: the QAT ``convert()`` and ``convert_activations()`` dicts (default: read
    from quantization.json in the model directory). ``embeddings``: how the ``sparsify`` format stores the word
    embeddings: ``"int8"`` (per-row scales), ``"float32"``, or ``"auto"`` (int8 when quantization.json records
    that the run trained them int8; with ``quantized=`` given, float32: pass ``"int8"`` for a model whose
    quantizer had ``embeddings: true``)."""
    if format not in FORMATS:
        raise SparsifyError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if embeddings not in EMBEDDINGS:
        raise SparsifyError(f"--embeddings must be one of {', '.join(map(repr, EMBEDDINGS))}, got {embeddings!r}")
    model_dir, run_dir = _resolve(run_or_model_dir)
    from sparsify.runtime.validate import require_finite
    from sparsify.sparsity import load_report_weights

    require_finite(load_report_weights(model_dir), model_dir)  # no artifact of a diverged model
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SparsifyError(f"{out}: exists and is not empty (choose another -o or pass --overwrite)")
        shutil.rmtree(out)
    quant, acts = _load_quantization(model_dir, quantized, activations)
    from sparsify.techniques.quantization.convert import trained_embedding_bits

    trained_bits = trained_embedding_bits(model_dir) if quantized is None else None
    summary: dict[str, Any] = {"format": format, "out": str(out), "source": str(run_or_model_dir), "notes": []}
    if format == "sparsify" and embeddings == "auto" and quant and trained_bits is None:
        summary["notes"].append("word embeddings kept float32: the run did not train them int8 (quantization "
                                "embeddings: true); --embeddings int8 stores them in a quarter of the space but changes "
                                "the model slightly")
    from sparsify.sparsity import load_report_weights

    dense_bytes = sum(v.numel() * 4 for k, v in load_report_weights(model_dir).items() if not k.endswith("position_ids"))
    if format == "sparsify":
        manifest = _pack_artifact(model_dir, run_dir, out, quant, acts, embeddings, trained_bits)
        summary["manifest"] = manifest
    else:
        out.mkdir(parents=True, exist_ok=True)
        model = dense_equivalent_model(model_dir, quant, embedding_bits=trained_bits)
        if format == "hf":
            model.save_pretrained(str(out), safe_serialization=True)
            from sparsify.modeling import load_tokenizer

            load_tokenizer(str(model_dir)).save_pretrained(str(out))
            if (model_dir / "length_config.json").is_file():
                shutil.copyfile(model_dir / "length_config.json", out / "length_config.json")
            _copy_sentence_transformers(model_dir, out)
        else:
            head = _HEAD_OF_AUTO[_auto_class(model_dir, _read_json(model_dir / "config.json"))]
            pooling = _pooling(model_dir) if head == "embeddings" else None
            if head == "embeddings" and pooling is None:
                summary["notes"].append("no sentence-transformers pooling configuration: the ONNX model's "
                                        "sentence_embedding is the mean of the final hidden states, not normalised")
            export_onnx(model, out / "model.onnx", head=head, pooling=pooling)
            summary["onnx_outputs"] = list(ONNX_OUTPUTS[head])
            _copy_tokenizer(model_dir, out)
    summary["artifact_bytes"] = _dir_bytes(out)
    if format == "sparsify":
        summary["size_by_part"] = size_by_part(summary["manifest"], summary["artifact_bytes"])
    summary["dense_fp32_bytes"] = dense_bytes
    summary["ratio"] = summary["artifact_bytes"] / dense_bytes
    return summary


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    """``sparsify export RUN_OR_MODEL_DIR -o OUT [--format sparsify|hf|onnx] [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="sparsify export",
        description="Pack a trained model (run directory or model directory) into a compressed artifact for the CPU "
                    "runtime (block-sparse, int8 where quantized, manifest with checksums), or write a dense-equivalent "
                    "transformers checkpoint (--format hf) or ONNX model (--format onnx).")
    parser.add_argument("path", help="run directory (uses RUN/model) or Hugging Face model directory")
    parser.add_argument("-o", "--output", required=True, help="output directory")
    parser.add_argument("--format", default="sparsify", choices=FORMATS, help="artifact format (default: sparsify)")
    parser.add_argument("--embeddings", default="auto", choices=EMBEDDINGS,
                        help="word embeddings in the sparsify format: int8 with one scale per row, int4 / int2 packed "
                             "rows, float32, or auto (default: as the run trained them, from quantization embeddings: "
                             "true and embedding_bits)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    try:
        s = export(args.path, args.output, args.format, embeddings=args.embeddings, overwrite=args.overwrite)
    except SparsifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: v for k, v in s.items() if k != "manifest"}, indent=1))
        return 0
    print(f"wrote {args.format} artifact to {s['out']}")
    m = s.get("manifest")
    if m:
        blocks = ", ".join(f"{b} (out x in)" for b in m["summary"]["blocks"]) or "none"
        print(f"  encoder Linear layers: {m['summary']['sparse_layers']} block-sparse [{blocks}], "
              f"{m['summary']['dense_layers']} dense; quantized: {m['quantized']} "
              f"({len(m['activations'])} residual-sum / LayerNorm-output points); "
              f"word embeddings: {m['embeddings']['word'].split(',')[0]}; "
              f"length config: {m['length_config']['lengths'] if m['length_config'] else 'none'}")
    print(f"  size: {_mb(s['artifact_bytes'])} vs dense fp32 model {_mb(s['dense_fp32_bytes'])} "
          f"({100 * s['ratio']:.1f}%)")
    if s.get("size_by_part"):
        print("  size by part: " + ", ".join(f"{k.replace('_', ' ')} {_mb(v)}" for k, v in s["size_by_part"].items()))
    for note in s["notes"]:
        print(f"  note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
