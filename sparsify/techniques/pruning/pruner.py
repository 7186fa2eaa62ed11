"""Block-wise gradual pruning, used like an optimizer by the training loop.

    pruner = BlockPruner(config)
    pruner.prepare(model, steps_per_epoch=spe, total_steps=total,  # plain (unwrapped) model
                   calibration=batches)                             # taylor / obs: a function returning batches
    for batch in loader:
        loss = model(**batch).loss; accelerator.backward(loss)
        if accelerator.sync_gradients:
            pruner.mask_gradients()                 # before optimizer.step() (taylor: accumulates |W * grad|)
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

Scores (``config.score``, functions in :mod:`sparsify.techniques.pruning.scores`): ``l1`` / ``l2`` magnitude;
``taylor``, a moving average of |W * grad| accumulated in :meth:`BlockPruner.mask_gradients` (from the
calibration batches when a mask update comes before any gradient, e.g. one-shot at step 0); ``obs``, the
layer-wise OBS cost from H = X^T X of each layer's inputs on the calibration batches, after which the kept
weights get the closed-form OBS correction. Calibration batches are the same on every process, so the masks and
weights stay identical across processes.
"""

from __future__ import annotations

import logging
import math
import re
import time
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
from sparsify.techniques.pruning import scores as S
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
        self._updates: frozenset[int] | None = None  # update_steps(), once the window is known
        self.steps_done = 0  # optimizer steps seen by step(): the next backward pass belongs to steps_done + 1
        self.taylor: dict[str, torch.Tensor] = {}  # score: taylor, the accumulated |W * grad| per layer
        self.calibration = None  # function returning the calibration batches (taylor before gradients, obs)
        self.model: nn.Module | None = None
        self.update_seconds: list[float] = []  # wall time of each mask update (obs: Hessians + OBS passes)
        self._hinv_diag: dict[str, torch.Tensor] = {}
        self._energy: dict[str, float] = {}

    # -- setup ------------------------------------------------------------------------------------------------

    def prepare(self, model: nn.Module, *, steps_per_epoch: int | None = None, total_steps: int | None = None,
                calibration=None) -> None:
        """Select the layers, validate the config against the model, resolve epochs to steps, take the masks
        of an already-sparse model from its zeros, and apply the step-0 masks when the window starts at 0.

        ``calibration``: a function returning an iterable of batches (dicts of tensors with ``input_ids``,
        ``attention_mask`` and, for taylor, ``labels``), identical on every process; required by ``score: obs``,
        and by ``score: taylor`` when a mask update comes before the first gradient."""
        cfg = self.config
        if cfg.score == "obs" and calibration is None:
            raise FieldError("score", "score: obs needs calibration batches (the trainer passes the first "
                                      "obs.calibration_samples training examples): none were given")
        self.calibration, self.model = calibration, model
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
            if cfg.score == "obs" and block[1] != 1:
                raise FieldError(field, f"score: obs needs blocks of one input column (r x 1 {ORIENTATION}); layer "
                                        f"{name} has block {describe_block(block)}")
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

    def update_steps(self) -> list[int]:
        """The optimizer steps at which the masks are updated (the learning rate restarts there with
        ``training.lr_schedule: rewind``): start_step, every update_every steps after it, and end_step. A grid
        step less than half an interval before end_step gives way to end_step (two mask updates and two restarts of
        the learning rate a few steps apart would choose the masks twice for nothing)."""
        if self.end_step is None:
            raise RuntimeError("the pruning window is in epochs: call prepare() first")
        every = self.config.update_every
        steps = list(range(self.start_step, self.end_step + 1, every))
        if not steps or steps[-1] != self.end_step:
            if len(steps) > 1 and self.end_step - steps[-1] < every / 2:
                steps[-1] = self.end_step
            else:
                steps.append(self.end_step)
        if self.start_step == 0 and not (self.end_step == 0 or self.config.initial_sparsity > 0):
            steps = [s for s in steps if s > 0] or [self.end_step]  # the target is 0 at step 0: no update there
        return steps

    def _due(self, step: int) -> bool:
        if self.start_step <= step <= self.end_step:
            if self._updates is None:
                self._updates = frozenset(self.update_steps())
            return step in self._updates  # end_step is always one of them
        return step > self.end_step and not self.reached_end

    def finished(self, step: int) -> bool:
        """True when the masks are final (``step >= end_step``, final update done): evaluations from here on
        see the final sparsity."""
        return self.end_step is not None and step >= self.end_step and self.reached_end

    # -- the per-step calls -----------------------------------------------------------------------------------

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of pruned weights; call after backward, before ``optimizer.step()``. With
        ``score: taylor`` inside the scoring window, first add |W * grad| to the moving average."""
        accumulate = self._taylor_window(self.steps_done + 1)
        for l in self.layers.values():
            g = l.weight.grad
            if g is not None:
                if accumulate:
                    self.taylor[l.name] = S.accumulate_taylor(self.taylor.get(l.name), l.weight, g,
                                                              self.config.taylor_momentum)
                g.masked_fill_(~self._mask_on(l, g.device), 0)

    def _taylor_window(self, step: int) -> bool:
        cfg = self.config
        if cfg.score != "taylor" or self.end_step is None:
            return False
        first = cfg.taylor_from_step if cfg.taylor_from_step is not None else self.start_step - cfg.update_every
        return max(first, 0) <= step <= self.end_step

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned weights."""
        for l in self.layers.values():
            l.weight.masked_fill_(~self._mask_on(l, l.weight.device), 0)

    def step(self, step: int, optimizer=None) -> dict[str, float]:
        """Call right after ``optimizer.step()`` with the new optimizer-step count. Updates the masks when due,
        resets the optimizer state of pruned entries, applies the masks, and at ``end_step`` checks the measured
        sparsity against the target. Returns scalars for logging."""
        self.steps_done = step
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
        """Block scores, flattened; pruned blocks score -inf so that they stay pruned. ``normalize`` (global
        scope): per weight, and for obs relative to the layer's output energy, so that layers rank together."""
        cfg = self.config
        w = l.weight.detach()
        if cfg.score in ("l1", "l2"):
            s = S.magnitude(w, l.block, cfg.score)
            if normalize:
                s = s / (math.sqrt(l.block_numel) if cfg.score == "l2" else l.block_numel)
        elif cfg.score == "taylor":
            s = S.taylor(self.taylor[l.name].to(w.device), l.block)
            if normalize:
                s = s / l.block_numel
        else:
            s = S.obs_saliency(w, self._hinv_diag[l.name], l.block).float()
            if normalize:
                s = s / (l.block_numel * self._energy[l.name])
        s = s.reshape(-1).float()
        kept = l.kept_blocks().to(s.device)
        return torch.where(kept, s, torch.full_like(s, -math.inf))

    # -- calibration ------------------------------------------------------------------------------------------

    def _calibration_forward(self, backward: bool, before=None) -> None:
        """Run the model over the calibration batches (eval mode: no dropout), optionally with backward on the
        task loss; ``before(batch)`` is called before each forward pass."""
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            for batch in self.calibration():
                inputs = {k: v.to(device) for k, v in batch.items() if k != "idx"}
                if backward and "labels" not in inputs and "start_positions" not in inputs:
                    raise SparsifyError("pruning: score: taylor needs labelled calibration batches")
                if before is not None:
                    before(inputs)
                with torch.set_grad_enabled(backward):
                    out = model(**inputs)
                    if backward:
                        out.loss.backward()
        finally:
            model.train(was_training)

    def _calibrate_taylor(self) -> None:
        """|W * grad| summed over the calibration batches, for layers with no accumulated score yet."""
        if self.calibration is None:
            raise SparsifyError("pruning: score: taylor has no gradients yet at this mask update and no calibration "
                                "batches to take them from")
        missing = [l for l in self.layers.values() if l.name not in self.taylor]
        self._calibration_forward(backward=True)  # called between optimizer steps: no gradient is pending
        for l in missing:
            g = l.weight.grad
            self.taylor[l.name] = S.accumulate_taylor(None, l.weight, g if g is not None else torch.zeros_like(l.weight),
                                                      1.0)
        for p in self.model.parameters():  # the calibration gradients must not reach the optimizer
            p.grad = None

    def _calibrate_obs(self) -> dict[str, torch.Tensor]:
        """H = X^T X of every pruned layer's inputs on the calibration batches (float64, CPU)."""
        collector = S.HessianCollector({l.name: l.module for l in self.layers.values()})
        with collector:
            self._calibration_forward(backward=False, before=lambda b: collector.set_mask(b.get("attention_mask")))
        missing = [n for n in self.layers if n not in collector.hessians]
        if missing:
            raise SparsifyError(f"pruning: score: obs saw no input of layer {missing[0]} on the calibration batches")
        d = self.config.obs.damping
        hessians = collector.hessians
        self._hinv_diag = {n: torch.diag(S.inverse_hessian(h, d)) for n, h in hessians.items()}
        self._energy = {n: S.output_energy(self.layers[n].weight, h) for n, h in hessians.items()}
        return hessians

    def _prune_lowest(self, l: _Layer, scores: torch.Tensor, k: int) -> None:
        order = torch.sort(scores, stable=True).indices
        kept = torch.ones(l.num_blocks, dtype=torch.bool, device=scores.device)
        kept[order[:k]] = False
        r, c = l.block
        o, i = l.weight.shape
        l.mask = expand_blocks(kept.reshape(o // r, i // c), l.block).contiguous().to(l.weight.device) & \
            self._mask_on(l, l.weight.device)

    def _update_masks(self, step: int, optimizer) -> None:
        started = time.perf_counter()
        hessians = None
        if self.config.score == "taylor" and len(self.taylor) < len(self.layers):
            self._calibrate_taylor()
        elif self.config.score == "obs":
            hessians = self._calibrate_obs()
        before = {n: l.mask.clone() for n, l in self.layers.items()} if hessians is not None else {}
        self._choose_masks(step)
        if hessians is not None and self.config.obs.update_weights:
            self._obs_update(hessians, before)
        self._hinv_diag, self._energy = {}, {}
        self.apply_masks()
        if optimizer is not None:
            self._reset_optimizer_state(optimizer)
        self.last_update = step
        self.update_seconds.append(time.perf_counter() - started)
        if step >= self.end_step:
            self.reached_end = True
            self._check_end(step)

    @torch.no_grad()
    def _obs_update(self, hessians: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> None:
        """The closed-form OBS correction of the kept weights of every layer whose mask changed."""
        cfg = self.config.obs
        for name, l in self.layers.items():
            mask = self._mask_on(l, l.weight.device)
            if torch.equal(mask, before[name].to(mask.device)):
                continue
            new = S.obs_prune(l.weight, mask, hessians[name], cfg.damping)
            l.weight.copy_(new.to(l.weight.dtype))

    @torch.no_grad()
    def _choose_masks(self, step: int) -> None:
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
            "steps_done": self.steps_done,
            "taylor": {n: t.detach().cpu().clone() for n, t in self.taylor.items()},
            "update_seconds": list(self.update_seconds),
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
        self.steps_done = int(state.get("steps_done", self.last_update or 0))
        self.taylor = {canonical_name(n): t.to(self.layers[canonical_name(n)].weight.device).float().clone()
                       for n, t in _flatten(state.get("taylor", {})).items() if canonical_name(n) in self.layers}
        self.update_seconds = list(state.get("update_seconds", []))
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
