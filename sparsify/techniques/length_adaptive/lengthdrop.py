"""LengthDrop with the sandwich rule and in-place distillation, used like an optimizer by the training loop.

    lengthdrop = LengthDrop(config)
    lengthdrop.prepare(model, steps_per_epoch=spe, total_steps=total, seed=recipe.training.seed)
    for batch in loader:
        outputs = model(**inputs); loss = outputs.loss            # the full model (+ a teacher's terms)
        loss, terms = lengthdrop.loss(model, inputs, outputs, loss, step=step)   # + smallest + random sub-models
        accelerator.backward(loss); ...
    lengthdrop.finalize(model); lengthdrop.save_length_config(run_dir / "model")

Sampling (Kim & Cho 2021, LengthDrop, in ratio form): a sub-model keeps, at layer ``i``, a ratio
``r_i = r_{i-1} * u_i`` of the input's tokens with ``u_i ~ U[1 - p, 1]`` (``p`` = ``length_drop_ratio_bound``,
``r_{-1} = 1``); the smallest sub-model takes ``u_i = 1 - p`` at every layer. With ``layer_drop``, each layer of a
random sub-model is skipped with that probability (a skipped layer keeps its length). Every draw comes from the
technique's own ``torch.Generator``, seeded from the config's (or the recipe's) seed and saved in the state
dict, so that a resumed run samples exactly what the uninterrupted run would have.

The sub-models' loss is the KL from the full model's logits (detached) to theirs, at ``temperature``, summed
over the sub-models and weighted by ``inplace_distillation_weight``; for a sentence-embedding model
(:class:`sparsify.sentence.SentenceEmbedder`, pooled over the tokens a sub-model kept) it is 1 - the cosine
similarity of the sub-model's embedding to the full model's. All sub-model graphs are kept until the
loop's single backward pass (memory: about 1 + (1 + num_sandwich) x the shrinking sub-models' activations).
"""

from __future__ import annotations

import torch
from torch import nn

from sparsify.config import FieldError
from sparsify.techniques.distillation.losses import embedding_loss, logit_kl
from sparsify.techniques.length_adaptive.config import LengthAdaptiveConfig, check_length_config, save_length_config
from sparsify.techniques.length_adaptive.inference import check_model, forward_with_lengths, unwrap

STATE_VERSION = 1


def sample_length_config(num_layers: int, bound: float, generator: torch.Generator | None = None, *,
                         smallest: bool = False, layer_drop: float = 0.0) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """A LengthDrop sample: ``(ratios, skipped_layers)``. ``smallest``: every layer keeps ``1 - bound`` of the
    previous layer's tokens, no layer skipped."""
    if smallest:
        u = torch.full((num_layers,), 1.0 - bound, dtype=torch.float64)
        skip = torch.zeros(num_layers, dtype=torch.bool)
    else:
        u = 1.0 - bound * torch.rand(num_layers, generator=generator, dtype=torch.float64)
        skip = torch.rand(num_layers, generator=generator, dtype=torch.float64) < layer_drop if layer_drop > 0 \
            else torch.zeros(num_layers, dtype=torch.bool)
    ratios, r = [], 1.0
    for i in range(num_layers):
        if not skip[i]:
            r *= float(u[i])
        ratios.append(min(1.0, max(r, 1e-6)))
    return tuple(ratios), tuple(int(i) for i in torch.nonzero(skip).flatten())


class LengthDrop:
    """Length-adaptive training: see :class:`LengthAdaptiveConfig`."""

    def __init__(self, config: LengthAdaptiveConfig):
        self.config = config
        self.num_layers: int | None = None
        self.start_step = 0
        self.generator = torch.Generator()
        self.seed: int | None = None

    # -- setup ------------------------------------------------------------------------------------------

    def prepare(self, model: nn.Module, *, steps_per_epoch: int | None = None, total_steps: int | None = None,
                seed: int | None = None) -> None:
        """Check the config against the model (its layers and attention), resolve the start step and seed the
        sampling generator (``config.seed``, else ``seed``, the recipe's ``training.seed``, else 0)."""
        cfg = self.config
        try:
            self.num_layers = check_model(model)
        except TypeError as e:
            raise FieldError("kind", f"this model cannot run length-adaptively: {e}") from None
        if cfg.length_config is not None:
            check_length_config(cfg.length_config, self.num_layers)
        try:
            self.start_step = cfg.resolve_start(steps_per_epoch)
        except ValueError as e:
            raise FieldError("start_epoch", str(e)) from None
        if total_steps is not None and self.start_step >= total_steps and total_steps > 0:
            field = "start_epoch" if cfg.start_epoch is not None else "start_step"
            raise FieldError(field, f"starts at optimizer step {self.start_step}, but training has {total_steps} "
                                    "steps: no sub-model would be trained")
        self.seed = cfg.seed if cfg.seed is not None else (seed if seed is not None else 0)
        self.generator.manual_seed(self.seed)

    def active(self, step: int | None) -> bool:
        """Whether sub-models are trained at this optimizer step (the number of steps already taken)."""
        return step is None or step >= self.start_step

    # -- per step ---------------------------------------------------------------------------------------

    def sample(self) -> list[tuple[str, tuple[float, ...], tuple[int, ...]]]:
        """This batch's sub-models: ``[(name, ratios, skipped_layers)]``, the smallest first."""
        cfg = self.config
        subs = [("smallest", *sample_length_config(self.num_layers, cfg.length_drop_ratio_bound, smallest=True))]
        for j in range(cfg.num_sandwich):
            subs.append((f"random{j}", *sample_length_config(self.num_layers, cfg.length_drop_ratio_bound,
                                                             self.generator, layer_drop=cfg.layer_drop)))
        return subs

    def loss(self, model: nn.Module, inputs: dict, full_outputs, full_loss: torch.Tensor, *,
             step: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """``full_loss`` plus the sub-models' in-place distillation loss, and the terms for logging:
        ``length/smallest``, ``length/random`` (mean over the random sub-models), ``length/total``.

        ``model`` is the model the loop calls (wrapped or not); ``inputs`` the batch it was called with;
        ``full_outputs`` its outputs (``.logits``); ``full_loss`` the loop's loss for it (task loss, or the
        distiller's total). Before the start step (``step``: optimizer steps taken so far) returns
        ``(full_loss, {})`` and draws nothing."""
        if self.num_layers is None:
            raise RuntimeError("call LengthDrop.prepare(model, ...) before LengthDrop.loss")
        if not self.active(step):
            return full_loss, {}
        cfg = self.config
        target = full_outputs.logits.detach()
        sub_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "idx")}
        total, values = full_loss, {}
        embedder = hasattr(unwrap(model), "embedding_dim")  # logits are pooled sentence embeddings
        for name, ratios, skip in self.sample():
            outputs = forward_with_lengths(model, sub_inputs, ratios, skip_layers=skip)
            if embedder:
                kl = embedding_loss(outputs.logits, target, "cosine")
            else:
                kl = logit_kl(outputs.logits, target, cfg.temperature)
            values[name] = kl.detach()
            if cfg.inplace_distillation_weight > 0:
                total = total + cfg.inplace_distillation_weight * kl
        terms = {"length/smallest": float(values["smallest"])}
        random = [float(v) for k, v in values.items() if k != "smallest"]
        if random:
            terms["length/random"] = sum(random) / len(random)
        terms["length/total"] = float(total.detach())
        return total, terms

    def eval_forward(self):
        """``forward(model, inputs)`` for :func:`sparsify.evaluation.evaluate` at the recipe's
        ``length_config``, or None when it has none."""
        length_config = self.config.length_config
        if length_config is None:
            return None
        return lambda model, inputs: forward_with_lengths(model, inputs, length_config)

    # -- state ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "generator": self.generator.get_state(), "seed": self.seed,
                "start_step": self.start_step}

    def load_state_dict(self, state: dict) -> None:
        """Restore the sampling generator (after :meth:`prepare`, with the same recipe)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"length_adaptive state version {state.get('version')!r}, expected {STATE_VERSION}")
        if self.seed is not None and state.get("seed") != self.seed:
            raise ValueError(f"length_adaptive state was saved with seed {state.get('seed')}, this run uses "
                             f"{self.seed}: was it saved with another recipe?")
        self.generator.set_state(state["generator"].to(torch.uint8).cpu())

    def finalize(self, model: nn.Module | None = None) -> None:
        """Nothing to undo: the hooks live only inside each sub-model's forward pass."""
        if model is not None:
            check_model(unwrap(model))

    def save_length_config(self, model_dir) -> None:
        """Write the recipe's ``length_config`` (if any) into a saved model directory as ``length_config.json``."""
        if self.config.length_config is not None:
            save_length_config(model_dir, self.config.length_config, source="recipe")
