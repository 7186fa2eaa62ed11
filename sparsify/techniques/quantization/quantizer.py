"""8-bit quantization-aware training that keeps sparsity, used like an optimizer by the training loop.

    quantizer = Quantizer(config)
    quantizer.prepare(model, steps_per_epoch=spe, total_steps=total, masks=lambda: pruner.masks)
    optimizer = AdamW([... model params ..., {"params": quantizer.parameters(), "weight_decay": 0.0}])
    for batch in loader:
        loss = model(**batch).loss; loss.backward()
        optimizer.step(); step += 1
        pruner.step(step, optimizer)
        logs = quantizer.step(step)        # switches on at start_step, freezes the observers after the warm-up
    quantizer.finalize(model)              # fake-quant eval state
    converted = quantizer.convert(model)   # int8 weights + scales, frozen activation parameters, for export

Nothing is replaced: each quantized ``nn.Linear`` gets an instance-level ``forward`` (the class's forward is
untouched, so parameter names, optimizer references, pruning masks and forward hooks — distillation's on
query/key/value — all stay valid), and encoder LayerNorms get forward (pre-)hooks for the residual sums and
their outputs. Until the start step these run the plain forward.

When active, a quantized Linear computes ``F.linear(fq_act(x), fq_weight(weight * mask), bias)``:

- ``fq_weight``: int8 symmetric per output channel, scales from the current (masked) weight, straight-through
  gradient; the pruning mask is applied inside, so a pruned weight is exactly 0 after quantization;
- ``fq_act``: uint8 with a zero point, per tensor or per PEG group, ranges from moving-average min/max observers
  that update on training forward passes during ``freeze_after_steps`` optimizer steps from the start and are
  then frozen (with PEG and ``permute`` the permutation is fixed then too); with ``observer: lsq`` the frozen
  scales become learnable parameters (``quantizer.parameters()``, for the optimizer). An activation whose
  observer has not yet seen a batch passes through unquantized.

With ``embeddings: true`` (default) a forward hook on the word embeddings rounds each looked-up row to int8 with
one scale per row (straight-through gradient): exactly the rows the export stores, so the artifact computes what
the run evaluated.

Masks: ``masks`` maps module names to bool masks (True = kept), or is a callable returning such a mapping
(``lambda: pruner.masks``); a callable is read again at every :meth:`step`, so masks the pruner replaces are
followed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.config import FieldError
from sparsify.errors import SparsifyError
from sparsify.sparsity import canonical_name
from sparsify.layers import select_layers
from sparsify.techniques.quantization import fp8 as fp8_ops
from sparsify.techniques.quantization import peg as peg_ops
from sparsify.techniques.quantization.config import DEFAULT_PEG_TARGETS, QuantizationConfig
from sparsify.techniques.quantization.fake_quant import (
    ACT_QMAX,
    ACT_QMIN,
    MinMaxObserver,
    fake_quantize,
    fake_quantize_rows,
    fake_quantize_weight,
    rtn_group_weight,
    lsq_fake_quantize,
    qparams_from_range,
)

log = logging.getLogger(__name__)

STATE_VERSION = 1
ENCODER_LAYER = re.compile(r"(?:^|\.)(?:encoder|transformer)\.layer\.\d+\.")
_MIN_SCALE = 1e-8


@dataclass(eq=False)
class _Point:
    """One quantized activation: ``<module>.input`` or ``<module>.output``."""

    name: str
    width: int
    groups: int  # 1: per tensor
    peg: bool
    permute: bool
    keep_16bit: bool
    observer: MinMaxObserver | None
    lsq: nn.Parameter | None = None
    # frozen parameters (None until frozen, or when never observed)
    scale: torch.Tensor | None = None  # () or (groups,), float32
    zero_point: torch.Tensor | None = None  # same shape, int32
    permutation: torch.Tensor | None = None  # (width,) int64
    index: torch.Tensor | None = None  # (width,) group of each dimension (PEG)
    error: torch.Tensor | None = None  # relative squared error of the last quantized batch

    @property
    def quantized(self) -> bool:
        return not self.keep_16bit


@dataclass(eq=False)
class _Layer:
    name: str
    module: nn.Linear
    point: _Point | None  # its input
    mask: torch.Tensor | None = None
    original_forward: Callable | None = field(default=None, repr=False)


class Quantizer:
    """8-bit fake quantization of the selected Linear layers (and optionally residual sums / LayerNorm outputs);
    see :class:`QuantizationConfig`."""

    def __init__(self, config: QuantizationConfig):
        self.config = config
        self.layers: dict[str, _Layer] = {}
        self.points: dict[str, _Point] = {}
        self.start_step: int | None = None if config.uses_epochs else (config.start_step or 0)
        self.freeze_step: int | None = None
        self.last_step: int | None = None
        self._active = False
        self.frozen = False
        self._calibrating = False
        self._mask_source: Callable[[], Mapping] | None = None
        self._handles: list = []
        self.rounded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # SignRound: layer -> (codes, scales)
        self.signround_stats: dict | None = None
        self.teq_stats: dict | None = None  # TEQ: per folded pair, the calibration error before and after
        self.embedding_name: str | None = None  # the word embeddings, quantized per row (config.embeddings)
        self._embedding: nn.Embedding | None = None

    # -- setup ------------------------------------------------------------------------------------------------

    def prepare(self, model: nn.Module, *, steps_per_epoch: int | None = None, total_steps: int | None = None,
                masks: Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]] | None = None) -> None:
        """Validate the config against the model (:class:`FieldError` naming the field), install the fake
        quantization (inactive until the start step; active at once when it is 0, or in PTQ mode)."""
        cfg = self.config
        if self.layers:
            raise RuntimeError("prepare() was already called; call remove() first")
        if cfg.mode == "qat":
            field_name = "start_epoch" if cfg.uses_epochs else "start_step"
            if cfg.uses_epochs and not steps_per_epoch:
                raise FieldError(field_name, "the start is given in epochs, but steps_per_epoch is unknown")
            start = cfg.resolve_start(steps_per_epoch)
            if total_steps is not None and start >= total_steps:
                at = f" (step {start})" if cfg.uses_epochs else ""
                raise FieldError(field_name, f"{field_name} {getattr(cfg, field_name):g}{at} is not before the last "
                                             f"training step {total_steps}: QAT would never run")
            self.start_step, self.freeze_step = start, start + cfg.freeze_after_steps
        else:
            self.start_step, self.freeze_step = 0, None

        selected = self._select(model)
        norms = []
        if cfg.activations.residual_sums or cfg.activations.layernorm_outputs:
            norms = [(canonical_name(n), m) for n, m in model.named_modules()
                     if isinstance(m, nn.LayerNorm) and ENCODER_LAYER.search(canonical_name(n))]
            if not norms:
                which = "residual_sums" if cfg.activations.residual_sums else "layernorm_outputs"
                raise FieldError(("activations", which), "the model has no LayerNorm inside its encoder layers "
                                                         "(<base>.encoder.layer.N. or <base>.transformer.layer.N.)")

        # the activation points and their widths
        widths: dict[str, int] = {}
        if cfg.activations.linear_inputs:
            for name, module in selected:
                widths[f"{name}.input"] = module.in_features
        for name, module in norms:
            width = int(module.normalized_shape[-1])
            if cfg.activations.residual_sums:
                widths[f"{name}.input"] = width
            if cfg.activations.layernorm_outputs:
                widths[f"{name}.output"] = width
        self._check_patterns(widths)

        device = next(model.parameters()).device
        points = {}
        for name, width in widths.items():
            keep = any(re.search(p, name) for p in cfg.keep_16bit)
            is_peg = cfg.peg is not None and not keep and any(re.search(p, name) for p in cfg.peg.targets)
            groups = cfg.peg.groups if is_peg else 1
            per_feature = is_peg or (cfg.activation_format != "int" and cfg.fp8_per_channel)
            observer = None if keep else MinMaxObserver(cfg.observer_momentum, width if per_feature else None)
            point = _Point(name, width, groups, is_peg, bool(is_peg and cfg.peg.permute), keep, observer)
            if cfg.observer == "lsq" and not keep:
                shape = (groups,) if is_peg else ()
                point.lsq = nn.Parameter(torch.ones(shape, device=device))
            points[name] = point
        self.points = points
        self.layers = {name: _Layer(name, module, points.get(f"{name}.input")) for name, module in selected}
        self.embedding_name, self._embedding = (_word_embeddings(model) if cfg.embeddings else (None, None))

        self._mask_source = None
        if callable(masks):
            self._mask_source = masks
            masks = masks()
        self._set_masks(masks)
        self._install(norms)
        self._active, self.frozen, self.last_step = False, False, None
        if cfg.mode == "ptq" or self.start_step == 0:
            self._active = True

    def _select(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        linears = [(canonical_name(n), m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        selected = select_layers(linears, self.config.include, self.config.exclude, action="quantize")
        size = self.config.weight_group_size
        for name, module in selected:
            if size is not None and module.in_features % size:
                raise FieldError("weight_group_size", f"{size} does not divide in_features {module.in_features} of "
                                                      f"{name}: choose a divisor of every quantized layer's input width")
        return selected

    def _check_patterns(self, widths: dict[str, int]) -> None:
        cfg = self.config
        names = list(widths)
        examples = ", ".join(names[:2]) or "none: no activation is quantized"
        for i, p in enumerate(cfg.keep_16bit):
            if not any(re.search(p, n) for n in names):
                raise FieldError(("keep_16bit", i), f"pattern {p!r} matches no quantized activation (names such as "
                                                    f"{examples})")
        if cfg.peg is None:
            return
        default = tuple(cfg.peg.targets) == DEFAULT_PEG_TARGETS
        for i, p in enumerate(cfg.peg.targets):
            if not default and not any(re.search(p, n) for n in names):
                raise FieldError(("peg", "targets", i), f"pattern {p!r} matches no quantized activation (names such "
                                                        f"as {examples})")
        targets = [n for n in names if any(re.search(p, n) for p in cfg.peg.targets)]
        if not targets:
            raise FieldError(("peg", "targets"), f"the default targets (feed-forward input, residual sum after the "
                                                 f"feed-forward) match no quantized activation; give targets for "
                                                 f"names such as {examples}")
        for name in targets:
            if widths[name] % cfg.peg.groups:
                raise FieldError(("peg", "groups"), f"{cfg.peg.groups} groups do not divide the hidden size "
                                                    f"{widths[name]} of {name}: choose a divisor of {widths[name]}")

    def _set_masks(self, masks: Mapping[str, torch.Tensor] | None) -> None:
        if masks is None:
            return
        for name, mask in masks.items():
            layer = self.layers.get(canonical_name(name))
            if layer is None:
                continue  # a pruned layer that is not quantized: the pruner keeps its zeros
            if tuple(mask.shape) != tuple(layer.module.weight.shape):
                raise SparsifyError(f"quantization: the mask of {name} has shape {tuple(mask.shape)}, the weight "
                                    f"{tuple(layer.module.weight.shape)}")
            layer.mask = mask

    def set_masks(self, masks: Mapping[str, torch.Tensor] | None) -> None:
        """Replace the masks (module name -> bool, True = kept) used inside the fake-quant weight path."""
        self._set_masks(masks)

    def _refresh_masks(self) -> None:
        if self._mask_source is not None:
            self._set_masks(self._mask_source())

    def _install(self, norms) -> None:
        for layer in self.layers.values():
            layer.original_forward = layer.module.forward
            layer.module.forward = self._linear_forward(layer)
        if self._embedding is not None:
            self._handles.append(self._embedding.register_forward_hook(
                lambda mod, args, output: fake_quantize_rows(output, self.config.embedding_bits) if self._active else None))
        for name, module in norms:
            if f"{name}.input" in self.points:
                point = self.points[f"{name}.input"]
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(module, point)))
            if f"{name}.output" in self.points:
                point = self.points[f"{name}.output"]
                self._handles.append(module.register_forward_hook(self._post_hook(module, point)))

    def remove(self) -> None:
        """Uninstall the fake quantization: the modules get their class's forward back, hooks are removed."""
        for layer in self.layers.values():
            if layer.module.__dict__.get("forward") is not None:
                del layer.module.forward
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.layers, self.points = {}, {}
        self.embedding_name, self._embedding = None, None

    # -- the forward passes -------------------------------------------------------------------------------------

    def _linear_forward(self, layer: _Layer):
        def forward(input: torch.Tensor) -> torch.Tensor:
            if not self._active:
                return layer.original_forward(input)
            module = layer.module
            if layer.point is not None:
                input = self._quantize_activation(layer.point, input, module.training)
            mask = layer.mask
            if mask is not None and mask.device != module.weight.device:
                mask = layer.mask = mask.to(module.weight.device)
            return F.linear(input, self._fake_weight(module.weight, mask, layer.name), module.bias)

        return forward

    def _fake_weight(self, weight: torch.Tensor, mask: torch.Tensor | None, name: str | None = None) -> torch.Tensor:
        """The weight as the quantized layer computes with it: per-channel symmetric codes of ``weight_bits``
        (straight-through gradient), the codes SignRound chose (PTQ), group-wise round-to-nearest (PTQ) or FP8."""
        cfg = self.config
        if name is not None and name in self.rounded:
            codes, scale = self.rounded[name]
            return (codes.to(weight.device, torch.float32) * scale.to(weight.device).unsqueeze(1)).to(weight.dtype)
        if cfg.weight_format != "int":
            return fp8_ops.fake_quantize_weight_fp8(weight, mask, cfg.weight_format, cfg.fp8_per_channel)
        if cfg.weight_group_size is not None:
            return rtn_group_weight(weight, mask, bits=cfg.weight_bits, group_size=cfg.weight_group_size,
                                    symmetric=cfg.weight_scheme == "symmetric")
        return fake_quantize_weight(weight, mask, cfg.weight_bits)

    def _pre_hook(self, module: nn.Module, point: _Point):
        def hook(mod, args):
            if not self._active or not args:
                return None
            return (self._quantize_activation(point, args[0], mod.training),) + tuple(args[1:])

        return hook

    def _post_hook(self, module: nn.Module, point: _Point):
        def hook(mod, args, output):
            if not self._active:
                return None
            return self._quantize_activation(point, output, mod.training)

        return hook

    def _quantize_activation(self, point: _Point, x: torch.Tensor, training: bool) -> torch.Tensor:
        if point.keep_16bit:
            return x + (x.to(torch.float16).to(x.dtype) - x).detach()
        observer = point.observer
        if not self.frozen and (training or self._calibrating):
            observer.update(x)
        if not observer.initialized and point.scale is None:
            return x
        if self.config.activation_format != "int":  # FP8 emulation: a scale per tensor or per feature
            if point.scale is not None:
                if point.scale.device != x.device:
                    point.scale = point.scale.to(x.device)
                scale = point.scale
            else:
                scale = self._fp8_scale(point).to(x.device)
            y = fp8_ops.fake_quantize_fp8(x.float(), scale, self.config.activation_format)
            with torch.no_grad():
                xd = x.detach().float()
                point.error = (y.detach() - xd).pow(2).mean() / xd.pow(2).mean().clamp(min=1e-12)
            return y.to(x.dtype)
        scale, zero_point, index = self._qparams(point, x.device)
        xf = x.float()  # quantize in float32, also under bf16 autocast
        if point.lsq is not None and self.frozen:
            s = torch.clamp(point.lsq, min=_MIN_SCALE)
            if index is not None:
                s, zero_point = peg_ops.expand(s, index), peg_ops.expand(zero_point, index)
            y = lsq_fake_quantize(xf, s.float(), zero_point, ACT_QMIN, ACT_QMAX)
        else:
            if index is not None:
                scale, zero_point = peg_ops.expand(scale, index), peg_ops.expand(zero_point, index)
            y = fake_quantize(xf, scale.float(), zero_point.float(), ACT_QMIN, ACT_QMAX)
        with torch.no_grad():
            point.error = (y.detach() - xf.detach()).pow(2).mean() / xf.detach().pow(2).mean().clamp(min=1e-12)
        return y.to(x.dtype)

    def _qparams(self, point: _Point, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(scale, zero_point, group index or None): the frozen ones, or those of the observer's current range."""
        if point.scale is not None:
            if point.scale.device != device:
                point.scale, point.zero_point = point.scale.to(device), point.zero_point.to(device)
                if point.index is not None:
                    point.index = point.index.to(device)
            return point.scale, point.zero_point, point.index
        lo, hi, permutation = self._ranges(point)
        scale, zero_point = qparams_from_range(lo, hi, self.config.activation_scheme == "symmetric")
        index = None
        if point.peg:
            index = peg_ops.group_index(point.width, point.groups, permutation).to(device)
        return scale.to(device), zero_point.to(device), index

    def _fp8_scale(self, point: _Point) -> torch.Tensor:
        """FP8 activation scale from the observer: ``max(|lo|, |hi|) / largest``, scalar or per feature."""
        obs = point.observer
        amax = torch.maximum(obs.lo.abs(), obs.hi.abs())
        return fp8_ops.fp8_scale(amax, self.config.activation_format)

    def _ranges(self, point: _Point) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        obs = point.observer
        if not point.peg:
            return obs.lo, obs.hi, None
        permutation = peg_ops.sort_permutation(obs.lo, obs.hi) if point.permute else None
        lo, hi = peg_ops.group_ranges(obs.lo, obs.hi, point.groups, permutation)
        return lo, hi, permutation

    # -- the per-step calls -----------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """True once fake quantization is on (from the start step)."""
        return self._active

    def parameters(self) -> list[nn.Parameter]:
        """The learnable activation scales (``observer: lsq``), for the optimizer (no weight decay); empty
        otherwise. They get gradients only once the observers are frozen."""
        return [p.lsq for p in self.points.values() if p.lsq is not None]

    def step(self, step: int) -> dict[str, float]:
        """Call right after ``optimizer.step()`` (and ``pruner.step``) with the new optimizer-step count: follows
        the pruner's masks, switches QAT on at the start step, freezes the observers ``freeze_after_steps``
        later. Returns TensorBoard scalars."""
        self._refresh_masks()
        if self.config.mode == "qat":
            if not self._active and step >= self.start_step:
                self._active = True
                log.info("quantization: fake quantization on from optimizer step %d", step)
            if self._active and not self.frozen and step >= self.freeze_step:
                self.freeze()
        self.last_step = step
        return self.scalars()

    @torch.no_grad()
    def freeze(self) -> None:
        """Freeze the observers: fix each activation's scale and zero point (and PEG permutation). With
        ``observer: lsq`` the scales become learnable from here on."""
        if self.frozen:
            return
        symmetric = self.config.activation_scheme == "symmetric"
        never = []
        for point in self.points.values():
            if not point.quantized:
                continue
            obs = point.observer
            _sync_observer(obs)
            obs.frozen = True
            if not obs.initialized:
                never.append(point.name)
                continue
            if self.config.activation_format != "int":
                point.scale = self._fp8_scale(point)
                point.zero_point = torch.zeros_like(point.scale, dtype=torch.int32)
                continue
            lo, hi, permutation = self._ranges(point)
            point.scale, point.zero_point = qparams_from_range(lo, hi, symmetric)
            point.permutation = permutation
            point.index = peg_ops.group_index(point.width, point.groups, permutation) if point.peg else None
            if point.lsq is not None:
                point.lsq.data.copy_(point.scale.to(point.lsq.device))
        if never:
            log.warning("quantization: %d activation(s) were never observed before the observers froze (e.g. %s); "
                        "they stay unquantized", len(never), never[0])
        self.frozen = True

    @torch.no_grad()
    def scalars(self) -> dict[str, float]:
        if not self._active:
            return {"quant/active": 0.0}
        out = {"quant/active": 1.0, "quant/frozen": float(self.frozen)}
        errors = []
        for layer in self.layers.values():
            w = layer.module.weight.detach()
            if layer.mask is not None:
                w = w * layer.mask.to(device=w.device, dtype=w.dtype)
            q = self._fake_weight(w, None, layer.name)
            errors.append(float((q - w).float().pow(2).sum() / w.float().pow(2).sum().clamp(min=1e-12)))
        if errors:
            out["quant/weight_error"] = sum(errors) / len(errors)
        act = [float(p.error) for p in self.points.values() if p.error is not None]
        if act:
            out["quant/activation_error"] = sum(act) / len(act)
        for point in self.points.values():
            if not point.quantized or not point.observer.initialized:
                continue
            if self.config.activation_format != "int":
                fmt = fp8_ops.FORMATS[self.config.activation_format]
                scale = point.scale if point.scale is not None else self._fp8_scale(point)
                lo, hi = -fmt.max_value * scale, fmt.max_value * scale
            elif point.scale is not None:
                scale = torch.clamp(point.lsq, min=_MIN_SCALE) if point.lsq is not None else point.scale
                lo = (ACT_QMIN - point.zero_point.to(scale.device)) * scale
                hi = (ACT_QMAX - point.zero_point.to(scale.device)) * scale
            else:
                lo, hi = point.observer.lo, point.observer.hi
            out[f"quant/range/{point.name}/min"] = float(lo.min())
            out[f"quant/range/{point.name}/max"] = float(hi.max())
        return out

    # -- calibration (PTQ) ------------------------------------------------------------------------------------

    def calibrate(self, model: nn.Module, batches, num_batches: int | None = None) -> int:
        """PTQ: run the observers over ``num_batches`` (default ``calibration_batches``) batches without training,
        in eval mode and without gradients, then freeze. Batches are mappings of model inputs (``labels`` and
        ``idx`` are dropped). Returns the number of batches seen."""
        from sparsify.techniques.quantization.convert import run_calibration

        num_batches = num_batches or self.config.num_calibration_batches
        if self.config.teq and self.teq_stats is None:
            self._teq(model, batches, num_batches)
        if self.config.rounding == "signround" and not self.rounded:
            self._signround(model, batches, num_batches)
        return run_calibration(self, model, batches, num_batches)

    def _teq(self, model: nn.Module, batches, num_batches: int) -> None:
        """TEQ scales learned and folded into the weights (value -> attention output), on the float model."""
        from sparsify.techniques.quantization.teq import teq

        was, self._active = self._active, False
        try:
            self.teq_stats = teq(model, batches, {n: layer.module for n, layer in self.layers.items()},
                                 bits=self.config.weight_bits, iters=self.config.teq_iters or 300,
                                 num_batches=num_batches)
        finally:
            self._active = was
        log.info("quantization: TEQ scales folded into %d layer pairs in %.1f s", len(self.teq_stats["pairs"]),
                 self.teq_stats["seconds"])

    def _signround(self, model: nn.Module, batches, num_batches: int) -> None:
        """SignRound over the quantized layers, on the float model (fake quantization off meanwhile); the codes
        are kept in ``self.rounded`` and the model's weights become ``code * scale``."""
        from sparsify.techniques.quantization.signround import signround

        cfg = self.config
        self._refresh_masks()
        was, self._active = self._active, False
        try:
            self.rounded, self.signround_stats = signround(
                model, batches, {n: layer.module for n, layer in self.layers.items()}, bits=cfg.weight_bits,
                iters=cfg.signround_iters or 200, lr=cfg.signround_lr, num_batches=num_batches,
                masks={n: layer.mask for n, layer in self.layers.items() if layer.mask is not None})
        finally:
            self._active = was
        s = self.signround_stats
        log.info("quantization: SignRound over %d encoder layers in %.1f s", len(s["blocks"]), s["seconds"])

    # -- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Observers, frozen parameters, LSQ scales and the schedule; tensors on CPU, JSON values elsewhere."""
        points = {}
        for name, p in self.points.items():
            if not p.quantized:
                continue
            scale = p.lsq.detach() if (p.lsq is not None and p.scale is not None) else p.scale
            points[name] = {
                "observer": p.observer.state_dict(),
                "scale": None if scale is None else scale.detach().cpu().clone(),
                "zero_point": None if p.zero_point is None else p.zero_point.detach().cpu().clone(),
                "permutation": None if p.permutation is None else p.permutation.detach().cpu().clone(),
            }
        return {
            "version": STATE_VERSION,
            "mode": self.config.mode,
            "active": self._active,
            "frozen": self.frozen,
            "start_step": self.start_step,
            "freeze_step": self.freeze_step,
            "last_step": self.last_step,
            "points": points,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore exactly (call after ``prepare``)."""
        if not self.layers:
            raise RuntimeError("call prepare(model, ...) before load_state_dict")
        saved = state.get("points", {})
        expected = {n for n, p in self.points.items() if p.quantized}
        if set(saved) != expected:
            missing, unexpected = sorted(expected - set(saved)), sorted(set(saved) - expected)
            what = f"no state for {missing[0]}" if missing else f"state for {unexpected[0]}, which is not quantized"
            raise SparsifyError(f"quantization: the checkpoint does not fit the quantized activations ({what}): was "
                                f"the recipe changed?")
        for name, s in saved.items():
            p = self.points[name]
            p.observer.load_state_dict(s["observer"])
            p.scale = None if s.get("scale") is None else s["scale"].float().clone()
            p.zero_point = None if s.get("zero_point") is None else s["zero_point"].to(torch.int32).clone()
            p.permutation = None if s.get("permutation") is None else s["permutation"].long().clone()
            p.index = (peg_ops.group_index(p.width, p.groups, p.permutation)
                       if (p.peg and p.scale is not None) else None)
            if p.lsq is not None and p.scale is not None:
                with torch.no_grad():
                    p.lsq.data.copy_(p.scale.to(p.lsq.device))
        for key in ("start_step", "freeze_step"):
            if state.get(key) is not None and state[key] != getattr(self, key):
                log.warning("quantization: the checkpoint's %s was %s, now %s", key, state[key], getattr(self, key))
        self._active = bool(state.get("active", False))
        self.frozen = bool(state.get("frozen", False))
        self.last_step = state.get("last_step")
        self._refresh_masks()

    def finalize(self, model: nn.Module | None = None) -> None:
        """Leave the model in the fake-quant eval state: quantization on, observers frozen, ``model.eval()``."""
        self._refresh_masks()
        if not self._active:
            log.warning("quantization: finalize() before the start step; switching fake quantization on now")
            self._active = True
        self.freeze()
        if model is not None:
            model.eval()

    # -- conversion -------------------------------------------------------------------------------------------

    def convert(self, model: nn.Module | None = None) -> dict[str, dict]:
        """Per quantized Linear (module name): int8 weights, per-channel scales and the frozen input
        quantization; see :func:`sparsify.techniques.quantization.convert.convert`."""
        from sparsify.techniques.quantization.convert import convert

        return convert(self, model)


def _word_embeddings(model: nn.Module) -> tuple[str, nn.Embedding]:
    """(canonical module name, module) of the model's word embeddings (``get_input_embeddings``)."""
    get = getattr(model, "get_input_embeddings", None)
    module = get() if callable(get) else None
    if not isinstance(module, nn.Embedding):
        raise FieldError("embeddings", "the model has no word embedding table (get_input_embeddings() gives no "
                                       "nn.Embedding): set embeddings: false")
    name = next(n for n, m in model.named_modules() if m is module)
    return canonical_name(name), module


def _sync_observer(obs: MinMaxObserver) -> None:
    """Average the running ranges over processes, so that every process freezes the same parameters."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    flags = torch.tensor([float(obs.initialized)], device=obs.lo.device)
    torch.distributed.all_reduce(flags)
    if flags.item() < world:
        return  # some process never observed this activation; keep local ranges (rare: an unused layer)
    for t in (obs.lo, obs.hi):
        torch.distributed.all_reduce(t)
        t /= world
