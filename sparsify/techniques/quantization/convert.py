"""Conversion of a fake-quantized model for export, the integer reference of a converted layer, and PTQ
calibration.

    quantizer = calibrate(model, batches, QuantizationConfig(mode="ptq", calibration_batches=32))   # PTQ
    converted = quantizer.convert(model)          # after QAT: quantizer.finalize(model) first
    entry = converted["bert.encoder.layer.0.attention.self.query"]

Each entry (what the export consumes; one per quantized ``nn.Linear``, keyed by module name):

    weight_int8         int8 (out, in), symmetric codes in [-127, 127] ([-7, 7] when bits is 4); pruned
                        weights are exactly 0
    weight_scale        float32 (out,): w = weight_int8 * weight_scale[:, None]
    bias                float32 (out,) or None
    input_scale         float32, scalar (per tensor) or (groups,) (PEG); None when the input is not 8-bit
    input_zero_point    int32, same shape; uint8 codes: x = (code - zero_point) * scale, code in [0, 255]
    input_groups        int: 1 per tensor; K with PEG
    input_permutation   int64 (in,) or None: group g holds the input dimensions
                        input_permutation[g * in/K : (g + 1) * in/K] (None: contiguous groups)
    input_bits          8; 16 for an input kept in 16-bit floating point (keep_16bit); 32 for an input that is
                        not quantized (activations.linear_inputs false, or never observed)
    bits                8 or 4 (the weights: weight_bits)

Residual sums and LayerNorm outputs are not Linear inputs: :func:`convert_activations` gives their parameters
(same fields, prefixed ``scale``/``zero_point``/``groups``/``permutation``/``bits``), keyed by point name.

:func:`int8_linear` is the integer reference of a converted layer (uint8 codes x int8 codes accumulated exactly,
then scaled); :func:`load_converted` runs a model from a converted dict, so that the fake-quant model and the
converted one can be compared.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.errors import SparsifyError
from sparsify.sparsity import canonical_name
from sparsify.techniques.quantization import peg as peg_ops
from sparsify.techniques.quantization.config import QuantizationConfig
from sparsify.techniques.quantization.fake_quant import ACT_QMAX, ACT_QMIN, quantize, quantize_weight

log = logging.getLogger(__name__)

_DROP = ("labels", "idx")


def _point_params(quantizer, point) -> dict:
    if point is None or not point.quantized:
        bits = 16 if (point is not None and point.keep_16bit) else 32
        return {"scale": None, "zero_point": None, "groups": 1, "permutation": None, "bits": bits}
    if point.scale is None:
        return {"scale": None, "zero_point": None, "groups": 1, "permutation": None, "bits": 32}
    scale = torch.clamp(point.lsq.detach(), min=1e-8) if point.lsq is not None else point.scale
    return {
        "scale": scale.detach().float().cpu().clone(),
        "zero_point": point.zero_point.detach().to(torch.int32).cpu().clone(),
        "groups": int(point.groups),
        "permutation": None if point.permutation is None else point.permutation.detach().long().cpu().clone(),
        "bits": 8,
    }


def convert(quantizer, model: nn.Module | None = None) -> dict[str, dict]:
    """Per quantized Linear layer: int8 weights (mask applied), per-channel scales, bias and the frozen input
    quantization parameters (see the module docstring). The observers must be frozen (``finalize`` or
    ``calibrate``). ``model``: take the weights from this model's modules of the same names (default: the
    prepared model)."""
    if not quantizer.frozen:
        raise SparsifyError("quantization: convert() needs frozen observers: call finalize(model) after QAT, or "
                            "calibrate(...) for PTQ")
    cfg = quantizer.config
    if cfg.fp8:
        raise SparsifyError("quantization: FP8 (weight_format / activation_format) is emulation only: there is no "
                            "FP8 artifact to export; its accuracy is the fake-quant model's")
    if cfg.weight_group_size is not None:
        raise SparsifyError("quantization: group-wise weights (weight_group_size) are a post-training evaluation "
                            "mode; the artifact stores one scale per output channel: use weight_group_size: null to "
                            "export")
    quantizer._refresh_masks()
    modules = None if model is None else {canonical_name(n): m for n, m in model.named_modules()}
    out = {}
    for name, layer in quantizer.layers.items():
        module = layer.module if modules is None else modules.get(name)
        if module is None:
            raise SparsifyError(f"quantization: the model has no layer {name}")
        if name in quantizer.rounded:  # SignRound's codes
            codes, scale = (t.clone() for t in quantizer.rounded[name])
        else:
            codes, scale = quantize_weight(module.weight, layer.mask, cfg.weight_bits)
        params = _point_params(quantizer, layer.point)
        out[name] = {
            "weight_int8": codes.cpu(),
            "weight_scale": scale.cpu(),
            "bias": None if module.bias is None else module.bias.detach().float().cpu().clone(),
            "input_scale": params["scale"],
            "input_zero_point": params["zero_point"],
            "input_groups": params["groups"],
            "input_permutation": params["permutation"],
            "input_bits": params["bits"],
            "bits": int(cfg.weight_bits),
        }
    return out


def convert_activations(quantizer) -> dict[str, dict]:
    """Parameters of the quantized activations that are not Linear inputs (residual sums, LayerNorm outputs),
    keyed by point name (``<module>.input`` / ``<module>.output``)."""
    if not quantizer.frozen:
        raise SparsifyError("quantization: convert_activations() needs frozen observers")
    linear_inputs = {f"{n}.input" for n in quantizer.layers}
    return {name: _point_params(quantizer, p) for name, p in quantizer.points.items() if name not in linear_inputs}


# -- files --------------------------------------------------------------------------------------------------

CONVENTION = {
    "weight": "int8 codes in [-127, 127], symmetric, per output channel: w = weight_int8 * weight_scale[:, None]",
    "input": "uint8 codes in [0, 255]: x = (code - input_zero_point) * input_scale, per tensor or per group; group g "
             "holds the input features input_permutation[g * in/K : (g + 1) * in/K] (contiguous when null)",
    "rounding": "half to even",
}
WORD_EMBEDDINGS = "int8, symmetric, one scale per row: max|row| / 127"


def save_converted(directory, converted: Mapping[str, Mapping], activations: Mapping[str, Mapping] | None = None,
                   embeddings: str | None = None, embedding_bits: int = 8) -> None:
    """Write ``quantization.json`` (non-tensor fields, per module) and ``quantization.safetensors`` (tensors as
    ``MODULE.FIELD``) into ``directory``: the files :mod:`sparsify.export` reads from a model directory. No
    pickle. ``embeddings``: the module name of word embeddings that were trained quantized per row
    (``quantizer.embedding_name``), ``embedding_bits`` their bits (8, 4 or 2); recorded so that the export stores
    them the same way."""
    from sparsify.techniques.quantization.lowbit import describe
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, modules = {}, {}
    for name, entry in converted.items():
        fields = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
            else:
                fields[key] = value
        modules[name] = fields
    extra = {}
    for name, params in (activations or {}).items():
        fields = {}
        for key, value in params.items():
            if isinstance(value, torch.Tensor):
                tensors[f"activation:{name}.{key}"] = value.detach().cpu().contiguous()
            else:
                fields[key] = value
        extra[name] = fields
    save_file(tensors, str(directory / "quantization.safetensors"))
    doc = {"format": "sparsify-quantization/1", "convention": CONVENTION, "modules": modules, "activations": extra,
           "word_embeddings": None if embeddings is None else {
               "module": embeddings, "bits": int(embedding_bits),
               "storage": WORD_EMBEDDINGS if embedding_bits == 8 else describe(embedding_bits)}}
    (directory / "quantization.json").write_text(json.dumps(doc, indent=1))


def read_converted(directory) -> tuple[dict[str, dict], dict[str, dict]]:
    """``(converted, activations)`` as written by :func:`save_converted`, with torch tensors."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    directory = Path(directory)
    doc = json.loads((directory / "quantization.json").read_text())
    tensors = load_file(str(directory / "quantization.safetensors"))

    def collect(section: dict, prefix: str) -> dict[str, dict]:
        out = {}
        for name, fields in section.items():
            entry = dict(fields)
            head = f"{prefix}{name}."
            for key, value in tensors.items():
                if key.startswith(head) and "." not in key[len(head):]:
                    entry[key[len(head):]] = value
            out[name] = entry
        return out

    return collect(doc["modules"], ""), collect(doc.get("activations", {}), "activation:")


def load_run_conversion(model: nn.Module, directory, *, exact: bool = True):
    """:func:`load_converted` with everything a quantized run saved in ``directory`` (``quantization.json``): its
    converted Linear layers and activation points, and its word-embedding rows at the bits they were trained with
    (8, 4 or 2). Returns the function that restores the model."""
    return load_converted(model, *read_converted(directory), trained_embeddings(directory), exact=exact,
                          embedding_bits=trained_embedding_bits(directory) or 8)


def trained_embeddings(directory) -> str | None:
    """The module name of the word embeddings the run trained quantized per row (``quantization.json``), or None
    (not quantized, or a run from before the option existed)."""
    entry = _word_embeddings_entry(directory)
    return entry.get("module") if entry else None


def trained_embedding_bits(directory) -> int | None:
    """The bits (8, 4 or 2) of the word-embedding rows the run trained (``quantization.json``; 8 for a run from
    before low-bit rows existed), or None when they were not quantized."""
    entry = _word_embeddings_entry(directory)
    return int(entry.get("bits", 8)) if entry else None


def _word_embeddings_entry(directory) -> dict | None:
    import json
    from pathlib import Path

    path = Path(directory) / "quantization.json"
    if not path.is_file():
        return None
    entry = json.loads(path.read_text()).get("word_embeddings")
    return entry if isinstance(entry, dict) else None


# -- the integer reference --------------------------------------------------------------------------------


def _expanded(values: torch.Tensor, groups: int, permutation: torch.Tensor | None, width: int) -> torch.Tensor:
    if groups == 1:
        return values.reshape(())
    return peg_ops.expand(values, peg_ops.group_index(width, groups, permutation))


def quantize_input(x: torch.Tensor, params: Mapping) -> torch.Tensor:
    """uint8 codes of ``x`` (same shape, as float) with a converted entry's input parameters (``input_*`` keys,
    or the unprefixed keys of :func:`convert_activations`)."""
    scale, zp, groups, perm = _input_fields(params)
    width = x.shape[-1]
    s = _expanded(scale.to(x.device), groups, perm, width).to(x.dtype)
    z = _expanded(zp.to(x.device), groups, perm, width).to(x.dtype)
    return quantize(x, s, z, ACT_QMIN, ACT_QMAX)


def dequantize_input(codes: torch.Tensor, params: Mapping) -> torch.Tensor:
    scale, zp, groups, perm = _input_fields(params)
    width = codes.shape[-1]
    s = _expanded(scale.to(codes.device), groups, perm, width).to(torch.float32)
    z = _expanded(zp.to(codes.device), groups, perm, width).to(torch.float32)
    return (codes.float() - z) * s


def _input_fields(params: Mapping):
    prefix = "input_" if "input_scale" in params else ""
    return (params[f"{prefix}scale"], params[f"{prefix}zero_point"], int(params[f"{prefix}groups"]),
            params[f"{prefix}permutation"])


def dequantize_weight(entry: Mapping) -> torch.Tensor:
    """float32 ``(out, in)`` weight of a converted entry."""
    return entry["weight_int8"].float() * entry["weight_scale"].float().unsqueeze(1)


def int8_linear(x: torch.Tensor, entry: Mapping, *, exact: bool = True) -> torch.Tensor:
    """The converted layer as integer arithmetic: uint8 input codes minus zero points, times int8 weight codes,
    accumulated exactly (float64 holds every int32 sum here), then scaled per group and per output channel, plus
    the bias. An input that is not 8-bit runs against the dequantized weight (16-bit: rounded to float16).
    ``exact=False``: the same codes, dequantized, in one float32 product (about 10x faster on CPU, equal up to
    float32 summation order: what a search over many evaluations needs, not a parity reference)."""
    w = entry["weight_int8"].to(x.device)
    w_scale = entry["weight_scale"].to(x.device, torch.float64)
    bias = entry["bias"]
    if entry["input_bits"] == 8 and not exact:
        xq = dequantize_input(quantize_input(x, entry), entry)
        y = F.linear(xq, dequantize_weight(entry).to(x.device))
        return (y + (0 if bias is None else bias.to(x.device))).to(x.dtype)
    if entry["input_bits"] != 8:
        if entry["input_bits"] == 16:
            x = x.to(torch.float16).to(x.dtype)
        y = F.linear(x.float(), dequantize_weight(entry).to(x.device))
        return (y + (0 if bias is None else bias.to(x.device))).to(x.dtype)
    codes = quantize_input(x, entry).to(torch.float64)
    zp = _expanded(entry["input_zero_point"].to(x.device), entry["input_groups"], entry["input_permutation"],
                   x.shape[-1]).to(torch.float64)
    centered = codes - zp  # integers in [-255, 255]
    groups = entry["input_groups"]
    scale = entry["input_scale"].to(x.device, torch.float64)
    width = x.shape[-1]
    if groups == 1:
        acc = F.linear(centered, w.to(torch.float64))  # exact integer sums
        y = acc * (scale.reshape(()) * w_scale)
    else:
        perm = entry["input_permutation"]
        perm = torch.arange(width) if perm is None else perm
        perm = perm.to(x.device).long()
        size = width // groups
        y = 0
        for g in range(groups):
            dims = perm[g * size:(g + 1) * size]
            acc = F.linear(centered[..., dims], w[:, dims].to(torch.float64))
            y = y + acc * (scale[g] * w_scale)
    if bias is not None:
        y = y + bias.to(x.device, torch.float64)
    return y.to(x.dtype)


def int8_rows(x: torch.Tensor) -> torch.Tensor:
    """Word embedding rows as the export stores them: int8 codes and one float32 scale per row, dequantized."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    codes = torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)
    return (codes.float() * scale).to(x.dtype)


def load_converted(model: nn.Module, converted: Mapping[str, Mapping], activations: Mapping[str, Mapping] | None = None,
                   embeddings: str | None = None, *, exact: bool = True, embedding_bits: int = 8):
    """Run ``model`` from a converted dict: each converted Linear computes :func:`int8_linear` (its own weights
    are ignored), and the residual sums / LayerNorm outputs of ``activations`` (from :func:`convert_activations`)
    are quantized and dequantized; ``embeddings`` (a module name) looks its rows up as int8 (:func:`int8_rows`),
    or at ``embedding_bits`` 4 / 2 as the low-bit rows of :mod:`sparsify.techniques.quantization.lowbit`.
    ``exact``: see :func:`int8_linear`. The model must not be prepared by a Quantizer. Returns a function that
    restores the model."""
    modules = {canonical_name(n): m for n, m in model.named_modules()}
    restore = []
    if embeddings is not None:
        if embeddings not in modules:
            raise SparsifyError(f"load_converted: the model has no module {embeddings}")
        if embedding_bits == 8:
            rows = int8_rows
        else:
            from sparsify.techniques.quantization.lowbit import rounded_rows

            def rows(out):
                return rounded_rows(out, embedding_bits)
        restore.append(modules[embeddings].register_forward_hook(lambda mod, args, out: rows(out)).remove)
    for name, entry in converted.items():
        module = modules.get(name)
        if module is None:
            raise SparsifyError(f"load_converted: the model has no layer {name}")
        if "forward" in module.__dict__:
            raise SparsifyError(f"load_converted: {name} already has an instance forward (a prepared Quantizer?)")
        module.forward = (lambda e: (lambda x: int8_linear(x, e, exact=exact)))(entry)
        restore.append(lambda m=module: m.__dict__.pop("forward", None))
    for name, params in (activations or {}).items():
        module_name, _, where = name.rpartition(".")
        module = modules.get(module_name)
        if module is None:
            raise SparsifyError(f"load_converted: the model has no module {module_name}")

        def qdq(x, p=params):
            if p["bits"] == 16:
                return x.to(torch.float16).to(x.dtype)
            if p["bits"] != 8:
                return x
            return dequantize_input(quantize_input(x, p), p).to(x.dtype)

        if where == "input":
            handle = module.register_forward_pre_hook(lambda mod, args, f=qdq: (f(args[0]),) + tuple(args[1:]))
        else:
            handle = module.register_forward_hook(lambda mod, args, out, f=qdq: f(out))
        restore.append(handle.remove)

    def undo():
        for fn in restore:
            fn()

    return undo


# -- PTQ --------------------------------------------------------------------------------------------------


@torch.no_grad()
def run_calibration(quantizer, model: nn.Module, batches: Iterable, num_batches: int) -> int:
    """Observe ``num_batches`` batches in eval mode without gradients, then freeze (see
    :meth:`Quantizer.calibrate`)."""
    if quantizer.frozen:
        raise SparsifyError("quantization: the observers are already frozen; calibrate a fresh Quantizer")
    quantizer._active = True
    was_training = model.training
    model.eval()
    quantizer._calibrating = True
    seen = 0
    try:
        for batch in itertools.islice(batches, num_batches):
            if isinstance(batch, Mapping):
                model(**{k: v for k, v in batch.items() if k not in _DROP})
            else:
                model(batch)
            seen += 1
    finally:
        quantizer._calibrating = False
        model.train(was_training)
    if seen < num_batches:
        log.warning("quantization: calibrated on %d batches, fewer than the %d asked for (the data ran out)",
                    seen, num_batches)
    quantizer.freeze()
    return seen


def calibrate(model: nn.Module, batches: Iterable, config: QuantizationConfig, *,
              masks: Mapping[str, torch.Tensor] | None = None):
    """Post-training quantization: prepare a :class:`Quantizer` on ``model`` (``config.mode`` should be
    ``ptq``; a QAT config is calibrated the same way), run its observers over ``config.calibration_batches``
    batches without training, freeze, and return it (the model is left in fake-quant eval state)."""
    from sparsify.techniques.quantization.quantizer import Quantizer

    quantizer = Quantizer(config)
    quantizer.prepare(model, masks=masks)
    quantizer.calibrate(model, batches, config.num_calibration_batches)
    model.eval()
    return quantizer
