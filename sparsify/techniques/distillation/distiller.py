"""Teacher-student distillation, used like an optimizer by the training loop.

    distiller = Distiller(recipe.technique("distillation"))
    distiller.prepare(student, teacher, tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer)
    optimizer = AdamW([*student.parameters(), *distiller.parameters()], ...)
    for batch in loader:
        outputs = student(**inputs, **distiller.student_forward_kwargs())
        loss, terms = distiller.loss(batch, outputs, labels)   # terms: {"distill/logits": 0.12, ...}
        loss.backward(); ...
    distiller.finalize(student)

Attention distributions and relations are computed from the query/key/value projections captured by forward
hooks (``BertSelfAttention.query/key/value``, the same in RoBERTa, ``q_lin/k_lin/v_lin`` in DistilBERT), not
from ``output_attentions``: this works with any attention implementation (SDPA returns no attention
probabilities) and computes only the layers a term needs. Hidden states come from ``output_hidden_states``.

Every term assumes the student sees all the tokens the teacher sees (same tokenizer, no token dropping
inside the student); only the logit term is independent of the sequence.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsify.augment import IGNORE
from sparsify.config import FieldError
from sparsify.student import encoder_layers
from sparsify.techniques.distillation import losses
from sparsify.techniques.distillation.config import DistillationConfig, RecipeFieldError

_PROJECTION_NAMES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))


def uniform_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student layer ``i`` learns from teacher layer ``ceil((i + 1) * T / S) - 1``: evenly spaced, and the
    last student layer from the last teacher layer (3 of 6: {0: 1, 1: 3, 2: 5}; equal depths: identity)."""
    return {i: math.ceil((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)}


def attention_projections(layer: nn.Module) -> tuple[dict[str, nn.Module], int]:
    """The query/key/value projections of an encoder layer's self-attention and its head count."""
    for module in layer.modules():
        for names in _PROJECTION_NAMES:
            parts = [getattr(module, n, None) for n in names]
            if all(isinstance(p, nn.Module) for p in parts):
                heads = getattr(module, "num_attention_heads", None) or getattr(module, "n_heads", None)
                if heads is None:
                    config = getattr(module, "config", None)
                    heads = getattr(config, "num_attention_heads", None)
                if heads is None:
                    raise TypeError(f"{type(module).__name__}: cannot tell its number of attention heads")
                return dict(zip("qkv", parts)), int(heads)
    raise TypeError(
        f"{type(layer).__name__}: no self-attention projections found (expected query/key/value as in "
        "BERT/RoBERTa or q_lin/k_lin/v_lin as in DistilBERT)"
    )


def _width(projection: nn.Module, fallback: int) -> int:
    return int(getattr(projection, "out_features", None) or fallback)


def _hidden_size(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "hidden_size", None) or config.dim)


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


class Distiller:
    """Distillation from a frozen teacher: see :class:`DistillationConfig` for the terms."""

    def __init__(self, config: DistillationConfig):
        self.config = config
        self.student: nn.Module | None = None
        self.teacher: nn.Module | None = None
        self.projections = nn.ModuleDict()
        self.hidden_map: dict[int, int] = {}
        self.attention_map: dict[int, int] = {}
        self.minilm_layers: tuple[int, int] | None = None  # (student, teacher)
        self.minilmv2_layers: tuple[int, int] | None = None  # (student, teacher)
        self._heads: dict[str, list[int]] = {}
        self._needs: dict[str, dict[int, set[str]]] = {"student": {}, "teacher": {}}
        self._captured: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        self._hooks: list = []
        self._cache: dict[int, dict[str, torch.Tensor]] = {}
        self._disk = None  # a TeacherCache when the outputs are kept on disk (attach_cache)

    # -- setup ------------------------------------------------------------------------------------------

    def prepare(self, student: nn.Module, teacher: nn.Module, *, tokenizer=None, teacher_tokenizer=None) -> None:
        """Check the config against both models, freeze the teacher, hook the projections the terms need and
        create the learned projections. Call it once the student's modules are final (after building a
        shallow student, after any technique that replaces modules) and both models sit on their devices."""
        if student is teacher:
            raise ValueError("the student and the teacher must be two models (copy the teacher to start a student)")
        cfg = self.config
        _check_vocabularies(student, teacher, tokenizer, teacher_tokenizer)
        s_layers, t_layers = encoder_layers(student), encoder_layers(teacher)
        ns, nt = len(s_layers), len(t_layers)
        s_parts = [attention_projections(layer) for layer in s_layers]
        t_parts = [attention_projections(layer) for layer in t_layers]
        self._heads = {"student": [h for _, h in s_parts], "teacher": [h for _, h in t_parts]}
        needs: dict[str, dict[int, set[str]]] = {"student": {}, "teacher": {}}

        def need(s: int, t: int, parts: str) -> None:
            needs["student"].setdefault(s, set()).update(parts)
            needs["teacher"].setdefault(t, set()).update(parts)

        if cfg.enabled("hidden"):
            self.hidden_map = self._resolve_map("hidden", ns, nt)
        if cfg.enabled("attention"):
            self.attention_map = self._resolve_map("attention", ns, nt)
            for s, t in self.attention_map.items():
                self._same_heads("attention", s, t, f"student layer {s} / teacher layer {t}")
                need(s, t, "qk")
        if cfg.enabled("minilm"):
            self.minilm_layers = (ns - 1, nt - 1)
            self._same_heads("minilm", ns - 1, nt - 1, "the last layers")
            need(ns - 1, nt - 1, "qkv")
        if cfg.enabled("minilmv2"):
            c = cfg.minilmv2
            s = ns - 1 if c.student_layer is None else c.student_layer
            t = nt - 1 if c.teacher_layer is None else c.teacher_layer
            for name, index, count, who in (("student_layer", s, ns, "student"), ("teacher_layer", t, nt, "teacher")):
                if index >= count:
                    raise FieldError(("minilmv2", name), f"layer {index} does not exist: the {who} has {count} "
                                                         f"layers, numbered 0..{count - 1}")
            for who, parts in (("student", s_parts[s][0]), ("teacher", t_parts[t][0])):
                for rel in c.relations:
                    width = _width(parts[rel[0]], _hidden_size(student if who == "student" else teacher))
                    if width % c.relation_heads:
                        raise FieldError(("minilmv2", "relation_heads"),
                                         f"{c.relation_heads} relation heads do not divide the {who}'s "
                                         f"{rel[0]} width {width}: choose a common divisor of both hidden sizes")
            self.minilmv2_layers = (s, t)
            need(s, t, "".join(sorted({r[0] for r in c.relations})))

        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.finalize()
        self.student, self.teacher = student, teacher
        self._needs = needs
        for role, parts_list in (("student", s_parts), ("teacher", t_parts)):
            for layer, parts in sorted(needs[role].items()):
                for part in sorted(parts):
                    module = parts_list[layer][0][part]
                    self._hooks.append(module.register_forward_hook(self._hook(role, f"{part}.{layer}")))

        if cfg.keep_teacher_head:
            copy_head(student, teacher)
        if cfg.enabled("embedding"):
            dims = [getattr(m, "embedding_dim", None) for m in (student, teacher)]
            if None in dims:
                raise FieldError(("embedding",), "compares pooled sentence embeddings: the student and the teacher "
                                                 "must be embedding models (data.task: embedding)")
            if dims[0] != dims[1]:
                raise FieldError(("embedding",), f"the student's embeddings have {dims[0]} dimensions, the "
                                                 f"teacher's {dims[1]}: the term compares them directly; use a "
                                                 "student of the teacher's hidden size (and pooling)")

        # learned projections from the student's hidden size to the teacher's, when they differ
        self.projections = nn.ModuleDict()
        hs, ht = _hidden_size(student), _hidden_size(teacher)
        if cfg.enabled("hidden") and hs != ht:
            device, dtype = _device_dtype(student)
            names = [f"layer{s}" for s in self.hidden_map] + (["embeddings"] if cfg.hidden.include_embeddings else [])
            for name in names:
                self.projections[name] = nn.Linear(hs, ht).to(device=device, dtype=dtype)

    def _resolve_map(self, term: str, ns: int, nt: int) -> dict[int, int]:
        layer_map = getattr(self.config, term).layer_map
        if layer_map is None:
            return uniform_layer_map(ns, nt)
        for who, indices, count in (("student", layer_map.keys(), ns), ("teacher", layer_map.values(), nt)):
            bad = sorted({i for i in indices if i >= count})
            if bad:
                raise FieldError((term, "layer_map"), f"{who} layer(s) {bad} do not exist: the {who} has {count} "
                                                      f"layers, numbered 0..{count - 1}")
        return dict(sorted(layer_map.items()))

    def _same_heads(self, term: str, s: int, t: int, where: str) -> None:
        hs, ht = self._heads["student"][s], self._heads["teacher"][t]
        if hs != ht:
            raise FieldError((term,), f"compares attention per head and needs equal head counts, but at {where} "
                                      f"the student has {hs} heads and the teacher {ht}: use minilmv2, which "
                                      "works across head counts")

    def _hook(self, role: str, key: str):
        store = self._captured[role]

        def hook(module, inputs, output):
            store[key] = output

        return hook

    # -- per step ---------------------------------------------------------------------------------------

    def student_forward_kwargs(self) -> dict:
        """Extra keyword arguments for the student's forward pass."""
        return {"output_hidden_states": True} if self.config.enabled("hidden") else {}

    def parameters(self) -> list[nn.Parameter]:
        """The distiller's own trainable parameters (projections), for the optimizer."""
        return list(self.projections.parameters())

    def loss(self, batch: dict, student_outputs, labels=None) -> tuple[torch.Tensor, dict[str, float]]:
        """The total loss and each term's (unweighted) value, for logging: ``distill/task``, ``distill/logits``,
        ``distill/embedding`` (an embedding model, whose ``logits`` are its pooled sentence embedding),
        ``distill/hidden``, ``distill/attention``, ``distill/minilm`` (with ``distill/minilm_attention`` and
        ``distill/minilm_value``), ``distill/minilmv2`` (with ``distill/minilmv2_qq``, ...) and
        ``distill/total``. Layer-wise terms are averaged over their layer pairs."""
        if self.student is None:
            raise RuntimeError("call Distiller.prepare(student, teacher) before Distiller.loss")
        cfg = self.config
        captured = dict(self._captured["student"])
        self._captured["student"].clear()
        logits = task_logits(student_outputs)
        device = logits.device
        mask = batch["attention_mask"].to(device)
        teacher = self._teacher_outputs(batch, device)
        student = self._student_tensors(captured, mask)
        terms: dict[str, torch.Tensor] = {}
        total = logits.new_zeros((), dtype=torch.float32)

        if labels is not None and cfg.task_weight > 0 and labels.dim() == 1 and (labels == IGNORE).any():
            # augmented copies (data.augment) carry no label: the task loss of the labelled examples only
            terms["distill/task"] = losses.labelled_cross_entropy(logits, labels.to(device), IGNORE)
            total = total + cfg.task_weight * terms["distill/task"]
        elif labels is not None and cfg.task_weight > 0:
            if student_outputs.loss is None:
                raise ValueError("labels were given but the student's outputs hold no loss: pass labels to the student")
            terms["distill/task"] = student_outputs.loss
            total = total + cfg.task_weight * student_outputs.loss.float()
        if c := cfg.enabled("logits"):
            if hasattr(student_outputs, "start_logits"):  # extractive QA: distributions over the tokens
                terms["distill/logits"] = losses.span_kl(logits, teacher["logits"], c.temperature, mask)
            else:
                terms["distill/logits"] = losses.logit_kl(logits, teacher["logits"], c.temperature, mask)
            total = total + c.weight * terms["distill/logits"]
        if c := cfg.enabled("embedding"):  # an embedding model's "logits" are its pooled sentence embedding
            terms["distill/embedding"] = losses.embedding_loss(logits, teacher["logits"], c.loss)
            total = total + c.weight * terms["distill/embedding"]
        if c := cfg.enabled("hidden"):
            hidden = student_outputs.hidden_states
            if hidden is None:
                raise ValueError("the student's outputs hold no hidden states: call the student with "
                                 "**distiller.student_forward_kwargs()")
            pairs = [(f"layer{s}", hidden[s + 1], teacher[f"hidden.{t}"]) for s, t in self.hidden_map.items()]
            if c.include_embeddings:
                pairs.append(("embeddings", hidden[0], teacher["hidden.-1"]))
            values = []
            for name, hs, ht in pairs:
                if name in self.projections:
                    projection = self.projections[name]
                    hs = projection(hs.to(projection.weight.dtype))
                values.append(losses.hidden_mse(hs, ht, mask, normalize=c.normalize))
            terms["distill/hidden"] = torch.stack(values).mean()
            total = total + c.weight * terms["distill/hidden"]
        if c := cfg.enabled("attention"):
            values = [
                losses.attention_kl(teacher[f"q.{t}"], teacher[f"k.{t}"], student[f"q.{s}"], student[f"k.{s}"], mask,
                                    self._heads["student"][s])
                for s, t in self.attention_map.items()
            ]
            terms["distill/attention"] = torch.stack(values).mean()
            total = total + c.weight * terms["distill/attention"]
        if c := cfg.enabled("minilm"):
            s, t = self.minilm_layers
            heads = self._heads["student"][s]
            att = losses.attention_kl(teacher[f"q.{t}"], teacher[f"k.{t}"], student[f"q.{s}"], student[f"k.{s}"],
                                      mask, heads)
            val = losses.self_relation_kl(teacher[f"v.{t}"], student[f"v.{s}"], mask, heads)
            terms["distill/minilm_attention"], terms["distill/minilm_value"] = att, val
            terms["distill/minilm"] = att + c.value_weight * val
            total = total + c.weight * terms["distill/minilm"]
        if c := cfg.enabled("minilmv2"):
            s, t = self.minilmv2_layers
            value = None
            for rel in c.relations:
                x = rel[0]
                term = losses.self_relation_kl(teacher[f"{x}.{t}"], student[f"{x}.{s}"], mask, c.relation_heads)
                terms[f"distill/minilmv2_{rel}"] = term
                value = term if value is None else value + term
            terms["distill/minilmv2"] = value
            total = total + c.weight * value
        log = {k: float(v.detach()) for k, v in terms.items()}
        log["distill/total"] = float(total.detach())
        return total, log

    def _student_tensors(self, captured: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        for layer, parts in self._needs["student"].items():
            for part in parts:
                key = f"{part}.{layer}"
                if key not in captured:
                    raise RuntimeError(
                        f"the student's forward pass did not go through the hooked {part} projection of layer {layer}: "
                        "was that module replaced (e.g. by quantization) after Distiller.prepare, or was the "
                        "student not called before Distiller.loss? Call prepare once the modules are final."
                    )
                if tuple(captured[key].shape[:2]) != tuple(mask.shape):
                    raise RuntimeError(
                        f"the student's layer {layer} saw {tuple(captured[key].shape[:2])} tokens but the batch "
                        f"holds {tuple(mask.shape)}: attention and relation terms need every token (no token dropping)"
                    )
        return captured

    # -- teacher ----------------------------------------------------------------------------------------

    def _run_teacher(self, batch: dict) -> dict[str, torch.Tensor]:
        """The teacher's outputs the terms need, on the teacher's device and in its dtype."""
        teacher = self.teacher
        if teacher.training:
            teacher.eval()
        device = next(teacher.parameters()).device
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        store = self._captured["teacher"]
        store.clear()
        with torch.no_grad():
            out = teacher(**inputs, output_hidden_states=bool(self.config.enabled("hidden")))
        result = {"logits": task_logits(out)}
        if c := self.config.enabled("hidden"):
            for t in set(self.hidden_map.values()):
                result[f"hidden.{t}"] = out.hidden_states[t + 1]
            if c.include_embeddings:
                result["hidden.-1"] = out.hidden_states[0]
        result.update(store)
        store.clear()
        return result

    def _teacher_outputs(self, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        if not (self.config.cache_teacher or self.config.teacher_cache):
            out = self._run_teacher(batch)
        else:
            out = self._cached_teacher(batch)
        dtype = _device_dtype(self.student)[1]
        return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in out.items()}

    def attach_cache(self, directory, data_fingerprint: str, *, write: bool = True) -> int:
        """Keep the teacher's outputs in ``directory`` across runs (see :mod:`.cache`); call after
        :meth:`prepare`. Returns the number of examples read from it."""
        from sparsify.techniques.distillation.cache import TeacherCache, teacher_fingerprint

        c = self.config.enabled("hidden")
        outputs = {
            "logits": True,
            "hidden": sorted(set(self.hidden_map.values())) if c else [],
            "embeddings": bool(c and c.include_embeddings),
            "captured": {str(t): sorted(parts) for t, parts in sorted(self._needs["teacher"].items())},
            "dtype": str(_device_dtype(self.teacher)[1]),
        }
        pooling = getattr(self.teacher, "pooling", None)
        if pooling is not None:  # an embedding teacher's "logits" are its pooled embedding: pooled how
            outputs["pooling"] = {"modes": list(pooling["modes"]), "normalize": bool(pooling.get("normalize"))}
        self._disk = TeacherCache(directory, teacher=teacher_fingerprint(self.teacher), data=data_fingerprint,
                                  outputs=outputs, write=write)
        stored = self._disk.load()
        self._cache.update(stored)
        return len(stored)

    def flush_cache(self) -> None:
        """Write the teacher outputs computed since the last flush to the cache directory (if one is attached)."""
        if self._disk is not None:
            self._disk.flush(self._cache)

    def _cached_teacher(self, batch: dict) -> dict[str, torch.Tensor]:
        """Teacher outputs from the cache, keyed by the batch's example indices ``idx``; stored per example
        without padding (so a different padding in a later epoch still matches) along with the example's
        token ids and types, which must match when reused."""
        if "idx" not in batch:
            raise ValueError("cache_teacher needs the example indices: the batch must hold 'idx'")
        keys = [int(i) for i in batch["idx"]]
        mask = batch["attention_mask"].bool().cpu()
        ids = batch["input_ids"].cpu()
        types = batch["token_type_ids"].cpu() if "token_type_ids" in batch else None
        disk = self._disk
        if any(k not in self._cache for k in keys):
            fresh = self._run_teacher(batch)
            for row, key in enumerate(keys):
                if key not in self._cache:
                    real = mask[row]
                    # (B, L, ...) tensors are per token: keep the real tokens only; (B, C) logits per example
                    self._cache[key] = {
                        "ids": ids[row][real].to(torch.int32),
                        "types": None if types is None else types[row][real].to(torch.int32),
                        "tokens": {n: v[row].detach().cpu()[real].clone() for n, v in fresh.items() if v.dim() >= 3},
                        "example": {n: v[row].detach().cpu().clone() for n, v in fresh.items() if v.dim() < 3},
                    }
                    if disk is not None:
                        disk.added(key, self._cache)
        out: dict[str, list[torch.Tensor]] = {}
        for row, key in enumerate(keys):
            entry = self._cache[key]
            real = mask[row]
            same = torch.equal(entry["ids"], ids[row][real].to(torch.int32)) and (
                types is None or entry.get("types") is None or
                torch.equal(entry["types"], types[row][real].to(torch.int32)))
            if not same:
                raise ValueError(f"cache_teacher: example {key} holds other tokens than when its teacher outputs were "
                                 "cached (data that changes between epochs cannot use cache_teacher)")
            for name, value in entry["tokens"].items():
                full = value.new_zeros((mask.shape[1], *value.shape[1:]))
                full[real] = value
                out.setdefault(name, []).append(full)
            for name, value in entry["example"].items():
                out.setdefault(name, []).append(value)
        return {name: torch.stack(values) for name, values in out.items()}

    # -- state ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Learned projections (tensors) and the resolved layer maps (JSON values)."""
        return {
            "projections": {name: {k: v.detach().clone() for k, v in module.state_dict().items()}
                            for name, module in self.projections.items()},
            "hidden_layer_map": [[s, t] for s, t in self.hidden_map.items()],
            "attention_layer_map": [[s, t] for s, t in self.attention_map.items()],
            "minilm_layers": list(self.minilm_layers) if self.minilm_layers else None,
            "minilmv2_layers": list(self.minilmv2_layers) if self.minilmv2_layers else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the projections (after :meth:`prepare`, with the same recipe)."""
        saved = state.get("projections", {})
        if set(saved) != set(self.projections):
            raise ValueError(f"distillation state holds projections {sorted(saved)} but this run has "
                             f"{sorted(self.projections)}: was it saved with another recipe or other models?")
        maps = state.get("hidden_layer_map")
        if maps is not None and [list(p) for p in maps] != [[s, t] for s, t in self.hidden_map.items()]:
            raise ValueError(f"distillation state was saved with hidden layer map {maps}, this run uses "
                             f"{[[s, t] for s, t in self.hidden_map.items()]}")
        for name, module in self.projections.items():
            module.load_state_dict(saved[name])

    def finalize(self, model: nn.Module | None = None) -> None:
        """Remove the hooks and drop captured tensors and the teacher cache."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for store in self._captured.values():
            store.clear()
        self._cache.clear()


def task_logits(outputs) -> torch.Tensor:
    """``outputs.logits``; for extractive QA the start and end logits stacked, ``(B, L, 2)``."""
    if getattr(outputs, "start_logits", None) is not None:
        return torch.stack([outputs.start_logits, outputs.end_logits], dim=-1)
    return outputs.logits


def head_parameter_names(model: nn.Module) -> list[str]:
    """The classification head's parameters: everything outside the base model (``classifier.*``), plus the
    base model's pooler."""
    prefix = getattr(model, "base_model_prefix", "")
    return [n for n, _ in model.named_parameters()
            if not n.startswith(f"{prefix}.") or n.startswith(f"{prefix}.pooler.")]


@torch.no_grad()
def copy_head(student: nn.Module, teacher: nn.Module) -> list[str]:
    """keep_teacher_head: the teacher's head weights into the student, frozen there. Returns the names."""
    names = head_parameter_names(student)
    s_params, t_params = dict(student.named_parameters()), dict(teacher.named_parameters())
    for name in names:
        if name not in t_params or t_params[name].shape != s_params[name].shape:
            found = "absent" if name not in t_params else f"of shape {tuple(t_params[name].shape)}"
            raise FieldError("keep_teacher_head", f"the student's head parameter {name} "
                             f"{tuple(s_params[name].shape)} is {found} in the teacher: the heads must match")
        s_params[name].copy_(t_params[name].to(s_params[name].device, s_params[name].dtype))
        s_params[name].requires_grad_(False)
    return names


def _check_vocabularies(student: nn.Module, teacher: nn.Module, tokenizer=None, teacher_tokenizer=None) -> None:
    where = ("teacher", "name_or_path")
    advice = "distillation needs the teacher's tokenizer and vocabulary to be the student's"
    sv = getattr(getattr(student, "config", None), "vocab_size", None)
    tv = getattr(getattr(teacher, "config", None), "vocab_size", None)
    if sv is not None and tv is not None and sv != tv:
        raise RecipeFieldError(where, f"the teacher's vocabulary has {tv} tokens, the student's {sv}: {advice}")
    se, te = student.get_input_embeddings(), teacher.get_input_embeddings()
    if se is not None and te is not None and se.weight.shape[0] != te.weight.shape[0]:
        raise RecipeFieldError(where, f"the teacher's vocabulary has {te.weight.shape[0]} embeddings, the student's "
                                      f"{se.weight.shape[0]}: {advice}")
    if tokenizer is not None and teacher_tokenizer is not None:
        sv, tv = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if sv != tv:
            differ = sorted(t for t in set(sv) ^ set(tv) | {t for t in set(sv) & set(tv) if sv[t] != tv[t]})
            raise RecipeFieldError(where, f"the teacher's tokenizer vocabulary differs from the student's "
                                          f"({len(differ)} tokens differ, e.g. {differ[:5]}): {advice}")
