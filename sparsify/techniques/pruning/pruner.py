"""Block-wise gradual magnitude pruning, used like an optimizer by the training loop.

    pruner = BlockPruner(config)
    pruner.prepare(model, steps_per_epoch=spe, total_steps=total)   # plain (unwrapped) model
    for batch in loader:
        loss = model(**batch).loss; accelerator.backward(loss)
        if accelerator.sync_gradients:
            pruner.mask_gradients()                 # before optimizer.step()
            accelerator.clip_grad_norm_(...)
            optimizer.step(); scheduler.step(); optimizer.zero_grad()
            step += 1
            logs = pruner.step(step, optimizer)     # masks: update when due, reset Adam moments, apply
    report = pruner.finalize(model)

Masks are per-weight bool tensors, True where the weight is kept; a pruned block is all zero. They only
grow: a block pruned once (or zero in the starting checkpoint) stays pruned. The target follows the cubic
schedule of Zhu & Gupta (2017) between ``start_step`` and ``end_step`` (optimizer steps), updated every
``update_every`` steps and exactly at ``end_step``; after that the masks are fixed. At ``end_step`` the sparsity
measured from the weights is checked against the target. Mask computation is deterministic (stable sort,
ties broken by layer order and block index), so processes holding identical weights compute identical masks.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from sparsify.config import FieldError
from sparsify.errors import SparsifyError
from sparsify.sparsity import (
    canonical_name,
    divides,
    expand_blocks,
    infer_block_candidates,
    sparsity_report,
    zero_blocks,
)
from sparsify.layers import select_layers
from sparsify.techniques.pruning.config import ORIENTATION, PruningConfig, describe_block

log = logging.getLogger(__name__)

Block = tuple[int, int]
STATE_VERSION = 1


@dataclass(eq=False)
class _Layer:
    name: str
    module: nn.Module
    block: Block
    final: float  # this layer's final sparsity
    pinned: bool  # has its own target from an override (global scope: not in the shared ranking)
    field: str | tuple  # config field that set the block (for error messages)
    target_field: str | tuple  # config field that set the final sparsity
    mask: torch.Tensor  # bool, (out, in), True = kept

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def numel(self) -> int:
        return self.module.weight.numel()

    @property
    def block_numel(self) -> int:
        return self.block[0] * self.block[1]

    @property
    def num_blocks(self) -> int:
        return self.numel // self.block_numel

    def kept_blocks(self) -> torch.Tensor:
        """Block-level kept flags, flattened ``(num_blocks,)``."""
        r, c = self.block
        o, i = self.mask.shape
        return self.mask.reshape(o // r, r, i // c, c).any(dim=3).any(dim=1).reshape(-1)

    def measured_zeros(self) -> int:
        return int((self.weight.detach() == 0).sum())


def _round(x: float) -> int:
    """Round half up (Python's round() rounds half to even)."""
    return int(math.floor(x + 0.5 + 1e-9))


def _shape(t) -> str:
    return f"{t.shape[0]}x{t.shape[1]}"


class BlockPruner:
    """Gradual block magnitude pruning of the selected Linear layers of a model."""

    def __init__(self, config: PruningConfig):
        self.config = config
        self.layers: dict[str, _Layer] = {}
        self.start_step: int | None = None if config.uses_epochs else (config.start_step or 0)
        self.end_step: int | None = None if config.uses_epochs else config.end_step
        self.last_update: int | None = None
        self.reached_end = False

    # -- setup ------------------------------------------------------------------------------------------------

    def prepare(self, model: nn.Module, *, steps_per_epoch: int | None = None, total_steps: int | None = None) -> None:
        """Select the layers, validate the config against the model, resolve epochs to steps, take the masks
        of an already-sparse model from its zeros, and apply the step-0 masks when the window starts at 0."""
        cfg = self.config
        end_field = "end_epoch" if cfg.uses_epochs else "end_step"
        if cfg.uses_epochs and not steps_per_epoch:
            raise FieldError(end_field, "the window is given in epochs, but steps_per_epoch is unknown")
        start, end = cfg.resolve_steps(steps_per_epoch)
        if total_steps is not None and end > total_steps:
            at = f" (step {end})" if cfg.uses_epochs else ""
            raise FieldError(end_field, f"{end_field} {getattr(cfg, end_field):g}{at} is after the last training "
                                        f"step {total_steps}")
        self.start_step, self.end_step = start, end

        selected = self._select(model)
        inferred_block = None
        if cfg.block_shape is None:
            inferred_block = self._infer_block(selected)
        layers = {}
        for name, module in selected:
            final, block = cfg.final_sparsity, cfg.block_shape or inferred_block
            pinned, field, target_field = False, "block", "final_sparsity"
            for i, ov in enumerate(cfg.overrides):
                if re.search(ov.pattern, name):
                    if ov.final_sparsity is not None:
                        final, pinned, target_field = ov.final_sparsity, True, ("overrides", i, "final_sparsity")
                    if ov.block_shape is not None:
                        block, field = ov.block_shape, ("overrides", i, "block")
                    break
            w = module.weight
            if not divides(w.shape, block):
                raise FieldError(
                    field,
                    f"block {describe_block(block)} does not divide layer {name} of shape {_shape(w)} {ORIENTATION}: "
                    f"{block[0]} must divide out_features {w.shape[0]} and {block[1]} in_features {w.shape[1]}. "
                    f"Pick a block that divides it, or exclude the layer",
                )
            mask = ~expand_blocks(zero_blocks(w, block), block)
            layers[name] = _Layer(name, module, block, final, pinned, field, target_field, mask)
        self.layers = layers
        self._check_inferred()
        if any(not bool(l.mask.all()) for l in layers.values()):
            n = sum(int((~l.mask).sum()) for l in layers.values())
            total = sum(l.numel for l in layers.values())
            log.info("pruning: kept the masks of the starting model's zero blocks (%.4f of the pruned layers)", n / total)
        self.apply_masks()
        self.last_update, self.reached_end = None, False
        if start == 0 and (end == 0 or cfg.initial_sparsity > 0):
            self._update_masks(0, optimizer=None)

    def _select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        linears = [(canonical_name(n), m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        selected = select_layers(linears, self.config.include, self.config.exclude, action="prune")
        for i, ov in enumerate(self.config.overrides):
            if not any(re.search(ov.pattern, n) for n, _ in selected):
                raise FieldError(("overrides", i, "pattern"),
                                 f"pattern {ov.pattern!r} matches none of the pruned layers (such as "
                                 f"{', '.join(n for n, _ in selected[:3])})")
        return selected

    def _infer_block(self, selected) -> Block:
        block, candidates = infer_block_candidates({n: m.weight for n, m in selected})
        if block is not None:
            log.info("pruning: block %s inferred from the starting model's zeros", describe_block(block))
            return block
        if candidates:
            raise FieldError("block", f"cannot infer the block shape from the starting model's zeros: they fit "
                                      f"{' and '.join(describe_block(b) for b in candidates)}; give block")
        raise FieldError("block", f"is required: the starting model has no zeros to infer it from (give rows x cols "
                                  f"{ORIENTATION}, e.g. 4x1)")

    def _check_inferred(self) -> None:
        cfg = self.config
        for l in self.layers.values():
            pruned = 1.0 - l.mask.float().mean().item()
            slack = cfg.tolerance + 0.5 * l.block_numel / l.numel
            limit, field, what = l.final, l.target_field, "its final_sparsity"
            if not l.pinned and cfg.scope == "global":
                limit = cfg.max_sparsity if cfg.max_sparsity is not None else 1.0
                field = what = "max_sparsity"
            if pruned > limit + slack:
                raise FieldError(field, f"layer {l.name} is already {pruned:.4f} sparse in {describe_block(l.block)} "
                                        f"blocks (its zeros in the starting model), above {what} {limit:g}; masks "
                                        f"never shrink")
        shared = [l for l in self.layers.values() if cfg.scope == "global" and not l.pinned]
        if shared:
            total = sum(l.numel for l in shared)
            pruned = sum(int((~l.mask).sum()) for l in shared) / total
            if pruned > cfg.final_sparsity + cfg.tolerance + 0.5 * max(l.block_numel for l in shared) / total:
                raise FieldError("final_sparsity", f"the starting model's pruned layers are already {pruned:.4f} "
                                                   f"sparse (their zero blocks), above final_sparsity "
                                                   f"{cfg.final_sparsity:g}; masks never shrink")

    def attach(self, model: nn.Module) -> None:
        """Point the masks at this model's modules (same names), e.g. after the Linear modules were replaced."""
        modules = {canonical_name(n): m for n, m in model.named_modules()}
        missing = [n for n in self.layers if n not in modules]
        if missing:
            raise SparsifyError(f"pruning: the model has no layer {missing[0]} (masks are for {len(self.layers)} layers)")
        for name, l in self.layers.items():
            if tuple(modules[name].weight.shape) != tuple(l.mask.shape):
                raise SparsifyError(f"pruning: layer {name} has shape {_shape(modules[name].weight)}, its mask "
                                    f"{_shape(l.mask)}")
            l.module = modules[name]

    # -- schedule ---------------------------------------------------------------------------------------------

    def _schedule(self, step: int, initial: float, final: float) -> float:
        if self.end_step is None:
            raise RuntimeError("the pruning window is in epochs: call prepare() first")
        if step < self.start_step:
            return 0.0
        if step >= self.end_step:
            return final
        progress = (step - self.start_step) / (self.end_step - self.start_step)
        return final + (initial - final) * (1.0 - progress) ** 3

    def target_at(self, step: int) -> float:
        """Scheduled sparsity at ``step``: 0 before start_step, then s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3,
        then final_sparsity from end_step on (Zhu & Gupta 2017)."""
        return self._schedule(step, self.config.initial_sparsity, self.config.final_sparsity)

    def layer_target_at(self, name: str, step: int) -> float:
        """The scheduled sparsity of one layer (its override's final_sparsity, if any)."""
        final = self.layers[name].final
        return self._schedule(step, min(self.config.initial_sparsity, final), final)

    def _due(self, step: int) -> bool:
        if self.start_step <= step <= self.end_step:
            return (step - self.start_step) % self.config.update_every == 0 or step == self.end_step
        return step > self.end_step and not self.reached_end

    def finished(self, step: int) -> bool:
        """True when the masks are final (``step >= end_step``, final update done): evaluations from here on
        see the final sparsity."""
        return self.end_step is not None and step >= self.end_step and self.reached_end

    # -- the per-step calls -----------------------------------------------------------------------------------

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of pruned weights; call after backward, before ``optimizer.step()``."""
        for l in self.layers.values():
            g = l.weight.grad
            if g is not None:
                g.masked_fill_(~self._mask_on(l, g.device), 0)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned weights."""
        for l in self.layers.values():
            l.weight.masked_fill_(~self._mask_on(l, l.weight.device), 0)

    def step(self, step: int, optimizer=None) -> dict[str, float]:
        """Call right after ``optimizer.step()`` with the new optimizer-step count. Updates the masks when due,
        resets the optimizer state of pruned entries, applies the masks, and at ``end_step`` checks the measured
        sparsity against the target. Returns scalars for logging."""
        updated = self._due(step)
        if updated:
            self._update_masks(step, optimizer)
        else:
            self.apply_masks()
        return self.scalars(step, mask_updated=updated)

    def scalars(self, step: int, mask_updated: bool = False) -> dict[str, float]:
        total = sum(l.numel for l in self.layers.values())
        zeros = sum(l.measured_zeros() for l in self.layers.values())
        targets = self._layer_targets(min(step, self.end_step))
        target = sum(targets[n] * l.numel for n, l in self.layers.items()) / total
        return {"sparsity/target": target, "sparsity/actual": zeros / total, "sparsity/mask_updated": float(mask_updated)}

    def _layer_targets(self, step: int) -> dict[str, float]:
        shared = self.target_at(step)
        return {
            n: (self.layer_target_at(n, step) if (l.pinned or self.config.scope == "layer") else shared)
            for n, l in self.layers.items()
        }

    # -- mask computation -------------------------------------------------------------------------------------

    def _mask_on(self, l: _Layer, device) -> torch.Tensor:
        if l.mask.device != device:
            l.mask = l.mask.to(device)
        return l.mask

    def _scores(self, l: _Layer, normalize: bool) -> torch.Tensor:
        """Block scores, flattened; pruned blocks score -inf so that they stay pruned."""
        r, c = l.block
        o, i = l.weight.shape
        w = l.weight.detach().float().reshape(o // r, r, i // c, c)
        if self.config.score == "l2":
            s = w.square().sum(dim=(1, 3)).sqrt()
            if normalize:
                s = s / math.sqrt(r * c)
        else:
            s = w.abs().sum(dim=(1, 3))
            if normalize:
                s = s / (r * c)
        kept = l.kept_blocks().to(s.device)
        return torch.where(kept, s.reshape(-1), torch.full_like(s.reshape(-1), -math.inf))

    def _prune_lowest(self, l: _Layer, scores: torch.Tensor, k: int) -> None:
        order = torch.sort(scores, stable=True).indices
        kept = torch.ones(l.num_blocks, dtype=torch.bool, device=scores.device)
        kept[order[:k]] = False
        r, c = l.block
        o, i = l.weight.shape
        l.mask = expand_blocks(kept.reshape(o // r, i // c), l.block).contiguous().to(l.weight.device) & \
            self._mask_on(l, l.weight.device)

    @torch.no_grad()
    def _update_masks(self, step: int, optimizer) -> None:
        cfg = self.config
        targets = self._layer_targets(step)
        shared = [l for l in self.layers.values() if cfg.scope == "global" and not l.pinned]
        for l in self.layers.values():
            if l in shared:
                continue
            scores = self._scores(l, normalize=False)
            already = int(torch.isinf(scores).sum())
            self._prune_lowest(l, scores, max(_round(targets[l.name] * l.num_blocks), already))
        if shared:
            self._update_global(shared, self.target_at(step))
        self.apply_masks()
        if optimizer is not None:
            self._reset_optimizer_state(optimizer)
        self.last_update = step
        if step >= self.end_step:
            self.reached_end = True
            self._check_end(step)

    def _update_global(self, layers: list[_Layer], target: float) -> None:
        cfg = self.config
        lo = min(cfg.min_sparsity or 0.0, target)
        hi = 1.0 if cfg.max_sparsity is None else cfg.max_sparsity
        total = sum(l.numel for l in layers)
        budget = _round(target * total)
        forced, pools, orders = [], [], []
        for l in layers:
            scores = self._scores(l, normalize=True)
            order = torch.sort(scores, stable=True)
            already = int(torch.isinf(scores).sum())
            n_forced = max(_round(lo * l.num_blocks), already)
            cap = max(int(math.floor(hi * l.num_blocks + 1e-9)), n_forced)
            forced.append(n_forced)
            orders.append(order.indices)
            pools.append(order.values[n_forced:cap].cpu().double())
            budget -= n_forced * l.block_numel
        taken = [0] * len(layers)
        if budget > 0 and sum(len(p) for p in pools):
            values = torch.cat(pools)
            owner = torch.cat([torch.full((len(p),), j, dtype=torch.long) for j, p in enumerate(pools)])
            size = torch.tensor([l.block_numel for l in layers], dtype=torch.long)[owner]
            idx = torch.sort(values, stable=True).indices  # ties: layer order, then rank inside the layer
            cum = torch.cumsum(size[idx], 0)
            m = int(torch.searchsorted(cum, torch.tensor(budget, dtype=cum.dtype)))
            if m < len(cum):
                below = int(cum[m - 1]) if m > 0 else 0
                if int(cum[m]) - budget <= budget - below:
                    m += 1
            taken = torch.bincount(owner[idx[:m]], minlength=len(layers)).tolist()
        for j, l in enumerate(layers):
            k = forced[j] + taken[j]
            kept = torch.ones(l.num_blocks, dtype=torch.bool, device=orders[j].device)
            kept[orders[j][:k]] = False
            r, c = l.block
            o, i = l.weight.shape
            l.mask = expand_blocks(kept.reshape(o // r, i // c), l.block).contiguous().to(l.weight.device) & \
                self._mask_on(l, l.weight.device)

    @torch.no_grad()
    def _reset_optimizer_state(self, optimizer) -> None:
        """Zero the optimizer state (Adam's exp_avg, exp_avg_sq, ...) of the pruned entries."""
        while not hasattr(optimizer, "state") and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        state = getattr(optimizer, "state", {})
        for l in self.layers.values():
            st = state.get(l.weight)
            if not st:
                continue
            for value in st.values():
                if isinstance(value, torch.Tensor) and value.shape == l.mask.shape:
                    value.masked_fill_(~self._mask_on(l, value.device), 0)

    def _check_end(self, step: int) -> None:
        cfg = self.config
        problems = []
        shared = [l for l in self.layers.values() if cfg.scope == "global" and not l.pinned]
        for l in self.layers.values():
            actual = l.measured_zeros() / l.numel
            slack = cfg.tolerance + 0.5 * l.block_numel / l.numel
            if l not in shared:
                if abs(actual - l.final) > slack:
                    problems.append(f"layer {l.name} ({_shape(l.weight)}, {describe_block(l.block)} blocks) is "
                                    f"{actual:.4f} sparse, target {l.final:g}")
                continue
            if cfg.min_sparsity is not None and actual < cfg.min_sparsity - slack:
                problems.append(f"layer {l.name} is {actual:.4f} sparse, below min_sparsity {cfg.min_sparsity:g}")
            if cfg.max_sparsity is not None and actual > cfg.max_sparsity + slack:
                problems.append(f"layer {l.name} is {actual:.4f} sparse, above max_sparsity {cfg.max_sparsity:g}")
        if shared:
            total = sum(l.numel for l in shared)
            actual = sum(l.measured_zeros() for l in shared) / total
            slack = cfg.tolerance + 0.5 * max(l.block_numel for l in shared) / total
            if abs(actual - cfg.final_sparsity) > slack:
                problems.append(f"the {len(shared)} globally ranked layers are {actual:.4f} sparse, "
                                f"target {cfg.final_sparsity:g}")
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise SparsifyError(
                f"pruning: at end_step {step} the sparsity measured from the weights misses the target by more than "
                f"the tolerance {cfg.tolerance:g}: {'; '.join(problems[:3])}{more}. Were the masks applied after "
                f"every optimizer step (pruner.step) and the weights not changed afterwards?"
            )

    # -- state ------------------------------------------------------------------------------------------------

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Layer name -> bool mask (True = kept), e.g. for a fake-quant weight path."""
        return {n: l.mask for n, l in self.layers.items()}

    @property
    def blocks(self) -> dict[str, Block]:
        return {n: l.block for n, l in self.layers.items()}

    def state_dict(self) -> dict:
        """Masks (bool CPU tensors keyed by layer name) and the schedule; JSON values elsewhere."""
        return {
            "version": STATE_VERSION,
            "mask_convention": "true = kept",
            "start_step": self.start_step,
            "end_step": self.end_step,
            "last_update": self.last_update,
            "reached_end": self.reached_end,
            "blocks": {n: f"{l.block[0]}x{l.block[1]}" for n, l in self.layers.items()},
            "masks": {n: l.mask.detach().cpu().clone() for n, l in self.layers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the masks exactly (call after ``prepare``) and apply them to the weights."""
        if not self.layers:
            raise RuntimeError("call prepare(model, ...) before load_state_dict")
        masks = _flatten(state.get("masks", {}))
        masks = {canonical_name(n): m for n, m in masks.items()}
        missing = sorted(set(self.layers) - set(masks))
        unexpected = sorted(set(masks) - set(self.layers))
        if missing or unexpected:
            what = (f"no mask for {missing[0]}" if missing else f"a mask for {unexpected[0]}, which is not pruned")
            raise SparsifyError(f"pruning: the checkpoint's masks do not fit the pruned layers ({what}; "
                                f"{len(missing)} missing, {len(unexpected)} unexpected): was the recipe changed?")
        blocks = {canonical_name(n): b for n, b in _flatten(state.get("blocks", {}), leaf=str).items()}
        for name, l in self.layers.items():
            m = masks[name]
            if tuple(m.shape) != tuple(l.mask.shape):
                raise SparsifyError(f"pruning: the checkpoint's mask for {name} is {_shape(m)}, the layer {_shape(l.mask)}")
            saved_block = blocks.get(name)
            if saved_block is not None and saved_block != f"{l.block[0]}x{l.block[1]}":
                raise SparsifyError(f"pruning: the checkpoint pruned {name} in {saved_block} {ORIENTATION} blocks, "
                                    f"the recipe says {describe_block(l.block)}")
            l.mask = m.to(device=l.weight.device, dtype=torch.bool).clone()
        for key in ("start_step", "end_step"):
            if state.get(key) is not None and state[key] != getattr(self, key):
                log.warning("pruning: the checkpoint's %s was %s, now %s", key, state[key], getattr(self, key))
        self.last_update = state.get("last_update")
        self.reached_end = bool(state.get("reached_end", False))
        self.apply_masks()

    def finalize(self, model: nn.Module | None = None) -> dict:
        """Apply the masks for good and return the sparsity report, measured from the weights' zeros."""
        if model is not None:
            self.attach(model)
        self.apply_masks()
        report = sparsity_report({n: l.weight.detach() for n, l in self.layers.items()}, self.blocks)
        report["target"] = {n: l.final for n, l in self.layers.items()}
        report["scope"] = self.config.scope
        return report


def _flatten(tree, prefix: str = "", leaf=torch.Tensor) -> dict:
    """Nested dicts (as a checkpoint flattener may have split dotted layer names) -> {dotted name: leaf}."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, name, leaf))
        elif isinstance(value, leaf):
            out[name] = value
    return out
