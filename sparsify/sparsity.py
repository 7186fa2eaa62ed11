"""Sparsity measured from the weights' actual zeros, never remembered from a mask or a recipe.

    weights = load_report_weights("runs/minilm-4x1-90")           # run dir (its RUN/model) or model dir
    report = sparsity_report(select_weights(weights))            # the encoder's Linear layers
    print(format_report(report))

A block shape is ``(rows, cols)`` of the weight as ``nn.Linear`` stores it, ``(out_features, in_features)``:
"4x1" is 4 consecutive output channels x 1 input channel, printed as "4x1 (out x in)". A layer's zeros
*follow* a block shape when every zero lies in a block (of the aligned grid of that shape) whose entries
are all zero. The block shape of a sparse model is inferred as the largest common shape its zeros follow,
where that is unambiguous.

Command line: ``sparsify report RUN_OR_MODEL_DIR [--json] [--block 4x1] [--all]``. Files are read without
pickle (safetensors; ``torch.load(weights_only=True)`` for a legacy ``pytorch_model.bin``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from sparsify.errors import SparsifyError
from sparsify.techniques.pruning.config import DEFAULT_INCLUDE, ORIENTATION, describe_block, format_block, parse_block

Block = tuple[int, int]

# Candidates for inference, smallest first. Zeros that follow a shape also follow every shape that tiles it.
COMMON_BLOCKS: tuple[Block, ...] = (
    (1, 1), (2, 1), (1, 2), (4, 1), (1, 4), (2, 2), (8, 1), (1, 8), (4, 4),
    (16, 1), (1, 16), (8, 8), (32, 1), (1, 32), (16, 16),
)


# -- one layer ------------------------------------------------------------------------------------------------


def divides(shape, block: Block) -> bool:
    """Whether ``block`` tiles a 2-D ``shape`` exactly."""
    return len(shape) == 2 and shape[0] % block[0] == 0 and shape[1] % block[1] == 0


def zero_blocks(weight: torch.Tensor, block: Block) -> torch.Tensor:
    """Bool tensor ``(out // rows, in // cols)``: which blocks of ``weight`` are entirely zero."""
    rows, cols = block
    out_f, in_f = weight.shape
    if not divides(weight.shape, block):
        raise ValueError(f"block {describe_block(block)} does not divide a weight of shape {out_f}x{in_f}")
    zero = weight.detach() == 0
    return zero.reshape(out_f // rows, rows, in_f // cols, cols).all(dim=3).all(dim=1)


def expand_blocks(block_mask: torch.Tensor, block: Block) -> torch.Tensor:
    """Block-level tensor ``(out // rows, in // cols)`` -> element-level ``(out, in)``."""
    rows, cols = block
    nr, nc = block_mask.shape
    return block_mask.reshape(nr, 1, nc, 1).expand(nr, rows, nc, cols).reshape(nr * rows, nc * cols)


def follows_block(weight: torch.Tensor, block: Block) -> bool:
    """Whether every zero of ``weight`` lies in an all-zero block of shape ``block`` (False if it does not divide)."""
    if not divides(weight.shape, block):
        return False
    zeros = int((weight.detach() == 0).sum())
    return zeros == int(zero_blocks(weight, block).sum()) * block[0] * block[1]


def _followed(weight: torch.Tensor, candidates=COMMON_BLOCKS) -> list[Block]:
    return [b for b in candidates if follows_block(weight, b)]


def _pick_largest(shapes: list[Block]) -> tuple[Block | None, list[Block]]:
    """The largest shape by area, or None with the tied candidates when several share the largest area."""
    if not shapes:
        return None, []
    area = max(r * c for r, c in shapes)
    top = [b for b in shapes if b[0] * b[1] == area]
    return (top[0], top) if len(top) == 1 else (None, top)


def infer_block_shape(weights, candidates=COMMON_BLOCKS) -> Block | None:
    """The largest of ``candidates`` whose pattern the zeros follow, in one weight or jointly in a mapping of
    weights; None when there are no zeros or when two shapes of the same size tie."""
    block, _ = infer_block_candidates(weights, candidates)
    return block


def infer_block_candidates(weights, candidates=COMMON_BLOCKS) -> tuple[Block | None, list[Block]]:
    """Like :func:`infer_block_shape`, with the tied candidates when the inference is ambiguous."""
    if isinstance(weights, torch.Tensor):
        weights = {"": weights}
    sparse = [w for w in weights.values() if bool((w.detach() == 0).any())]
    if not sparse:
        return None, []
    common = [b for b in candidates if all(follows_block(w, b) for w in sparse)]
    return _pick_largest(common)


def layer_stats(weight: torch.Tensor, block: Block | None = None) -> dict:
    """Measured sparsity of one weight; with ``block``, also how much of it lies in whole zero blocks."""
    w = weight.detach()
    params = w.numel()
    zeros = int((w == 0).sum())
    stats = {
        "shape": list(w.shape),
        "params": params,
        "zeros": zeros,
        "sparsity": zeros / params if params else 0.0,
        "block": None if block is None else format_block(block),
        "block_zeros": None,
        "block_sparsity": None,
        "stray_zeros": None,
        "follows_block": None,
    }
    if block is not None and divides(w.shape, block):
        in_blocks = int(zero_blocks(w, block).sum()) * block[0] * block[1]
        stats.update(
            block_zeros=in_blocks,
            block_sparsity=in_blocks / params if params else 0.0,
            stray_zeros=zeros - in_blocks,
            follows_block=zeros == in_blocks,
        )
    return stats


# -- a model --------------------------------------------------------------------------------------------------


def canonical_name(name: str) -> str:
    """Module name without the wrappers' prefixes: leading ``module.`` (DDP, DataParallel) and ``_orig_mod.``
    anywhere (torch.compile)."""
    parts = [p for p in name.split(".") if p != "_orig_mod"]
    while parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def select_weights(
    state: Mapping[str, torch.Tensor],
    include: tuple[str, ...] | list[str] | None = DEFAULT_INCLUDE,
    exclude: tuple[str, ...] | list[str] = (),
) -> dict[str, torch.Tensor]:
    """The 2-D ``*.weight`` tensors of a state dict whose module name matches ``include`` (regexes, searched)
    and no ``exclude``, keyed by module name. ``include=None``: every 2-D weight."""
    out = {}
    for key, tensor in state.items():
        if not key.endswith(".weight") or tensor.dim() != 2:
            continue
        name = canonical_name(key[: -len(".weight")])
        if include is not None and not any(re.search(p, name) for p in include):
            continue
        if any(re.search(p, name) for p in exclude):
            continue
        out[name] = tensor
    return out


def sparsity_report(
    weights: Mapping[str, torch.Tensor],
    block: Block | str | Mapping[str, Block] | None = None,
    *,
    source: str | None = None,
) -> dict:
    """Per-layer and total sparsity of ``weights`` (module name -> 2-D weight), measured from their zeros.

    ``block``: one shape for every layer, a mapping layer -> shape, or None to infer it from the zeros
    (the largest common shape, when unambiguous). The result is JSON-serializable.
    """
    if isinstance(block, (str, list)):
        block = parse_block(block)
    candidates: list[Block] = []
    if isinstance(block, Mapping):
        per_layer = {name: tuple(block[name]) if name in block else None for name in weights}
        shapes = {b for b in per_layer.values() if b is not None}
        model_block = next(iter(shapes)) if len(shapes) == 1 else None
        block_source = "given" if len(shapes) <= 1 else "given (per layer)"
    elif block is not None:
        model_block = tuple(block)
        per_layer = {name: model_block for name in weights}
        block_source = "given"
    else:
        model_block, candidates = infer_block_candidates(weights)
        per_layer = {name: model_block for name in weights}
        block_source = "inferred" if model_block is not None else ("ambiguous" if candidates else "dense")
    layers = {}
    for name, w in weights.items():
        stats = layer_stats(w, per_layer[name])
        stats["inferred_block"] = None
        if stats["zeros"]:
            inferred, _ = _pick_largest(_followed(w))
            stats["inferred_block"] = None if inferred is None else format_block(inferred)
        layers[name] = stats
    params = sum(s["params"] for s in layers.values())
    zeros = sum(s["zeros"] for s in layers.values())
    checked = [s for s in layers.values() if s["follows_block"] is not None]
    block_zeros = sum(s["block_zeros"] for s in checked)
    total = {
        "params": params,
        "zeros": zeros,
        "sparsity": zeros / params if params else 0.0,
        "block_zeros": block_zeros if checked else None,
        "block_sparsity": block_zeros / params if checked and params else None,
        "follows_block": all(s["follows_block"] for s in checked) if checked else None,
    }
    problems = [
        f"{name}: block {s['block']} {ORIENTATION} does not divide its shape {s['shape'][0]}x{s['shape'][1]}"
        for name, s in layers.items()
        if s["block"] is not None and s["follows_block"] is None
    ]
    return {
        "source": source,
        "measured_from": "zeros of the weights",
        "orientation": "out x in",
        "block": None if model_block is None else format_block(model_block),
        "block_source": block_source,
        "block_candidates": [format_block(b) for b in candidates] if block_source == "ambiguous" else [],
        "layers": layers,
        "total": total,
        "problems": problems,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def format_report(report: dict) -> str:
    """The report as a text table."""
    block = report["block"]
    if block is not None:
        head = f"block {block} {ORIENTATION}, {report['block_source']}"
    elif report["block_source"] == "ambiguous":
        head = f"block ambiguous ({' or '.join(report['block_candidates'])} {ORIENTATION}); give --block"
    elif report["block_source"] == "dense":
        head = "no zeros: dense"
    else:
        head = f"blocks per layer {ORIENTATION}"
    lines = [f"Sparsity{' of ' + report['source'] if report['source'] else ''} "
             f"(measured from the weights' zeros; {head})"]
    in_blocks = f"in {block} blocks" if block is not None else "in blocks"
    rows = [("layer", f"shape {ORIENTATION}", "params", "sparsity", in_blocks, "block pattern")]
    for name, s in report["layers"].items():
        if s["follows_block"] is None:
            pattern = "-" if s["block"] is None else f"{s['block']} does not divide"
        elif s["follows_block"]:
            pattern = "ok" if block is not None else f"ok ({s['block']})"
        else:
            pattern = f"NO: {s['stray_zeros']} zeros outside whole blocks"
        rows.append((name, f"{s['shape'][0]} x {s['shape'][1]}", str(s["params"]), _pct(s["sparsity"]),
                     _pct(s["block_sparsity"]), pattern))
    t = report["total"]
    total_pattern = "-" if t["follows_block"] is None else ("ok" if t["follows_block"] else "NO")
    rows.append((f"total ({len(report['layers'])} layers)", "", str(t["params"]), _pct(t["sparsity"]),
                 _pct(t["block_sparsity"]), total_pattern))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {2, 3, 4}
    for k, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if k == 0 or k == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    lines.extend(f"warning: {p}" for p in report["problems"])
    return "\n".join(lines)


# -- files ----------------------------------------------------------------------------------------------------


def _model_dir(path: Path) -> Path | None:
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    if path.is_dir() and any((path / n).is_file() for n in names):
        return path
    return None


def load_report_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model: a Hugging Face model directory (model.safetensors, sharded or not) or a
    run directory (its final model, ``RUN/model``). No pickle: a legacy pytorch_model.bin is read with
    ``torch.load(weights_only=True)``."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return load_file(str(path))
    model_dir = _model_dir(path) or _model_dir(path / "model")
    if model_dir is None:
        if not path.exists():
            raise SparsifyError(f"{path}: no such file or directory (give a run directory or a model directory)")
        raise SparsifyError(
            f"{path}: neither a model directory (model.safetensors) nor a run directory with its final model in "
            f"{path / 'model'}"
        )
    single = model_dir / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            out.update(load_file(str(model_dir / shard)))
        return out
    return torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)


def main(argv: list[str] | None = None) -> int:
    """``sparsify report RUN_OR_MODEL_DIR [--json] [--block 4x1] [--all]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="sparsify report",
        description="Per-layer and total sparsity of a saved model, measured from the zeros of its weights, with a "
        f"check that the zeros form whole blocks. Block shapes are rows x cols of the weight as stored {ORIENTATION}.",
    )
    parser.add_argument("path", help="run directory (reads RUN/model) or model directory (model.safetensors)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--block", help=f"block shape to check, e.g. 4x1 {ORIENTATION}; default: inferred from the zeros")
    parser.add_argument("--all", action="store_true",
                        help="every 2-D weight (default: the encoder's Linear layers, as pruning selects them)")
    args = parser.parse_args(argv)
    try:
        block = None
        if args.block is not None:
            try:
                block = parse_block(args.block)
            except ValueError as e:
                raise SparsifyError(f"--block: {e}") from None
        weights = select_weights(load_report_weights(args.path), include=None if args.all else DEFAULT_INCLUDE)
        if not weights:
            raise SparsifyError(f"{args.path}: no encoder Linear weights found (use --all for every 2-D weight)")
        report = sparsity_report(weights, block, source=str(args.path))
    except SparsifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
