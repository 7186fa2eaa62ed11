"""Distillation: the loss terms, the Distiller's contract with the training loop, shallow students and the
bad-input messages. Tiny models built in code; the whole file runs in seconds on 2 cores."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from pydantic import ValidationError
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from sparsify.config import FieldError
from sparsify.student import encoder_layers, shallow_student
from sparsify.techniques.distillation import DistillationConfig, Distiller, RecipeFieldError, uniform_layer_map
from sparsify.techniques.distillation import losses

torch.set_num_threads(1)

ALL_TERMS = dict(
    logits={"temperature": 2.0},
    hidden={"include_embeddings": True},
    attention={},
    minilm={"value_weight": 1.0},
    minilmv2={"relation_heads": 4},
)
TERM_KEYS = ["distill/logits", "distill/hidden", "distill/attention", "distill/minilm_attention",
             "distill/minilm_value", "distill/minilmv2_qq", "distill/minilmv2_kk", "distill/minilmv2_vv"]


def bert(hidden=32, layers=4, heads=4, seed=0, vocab=100, attn="sdpa"):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3, attn_implementation=attn,
                        initializer_range=0.2)
    return BertForSequenceClassification(config).eval()


def distilbert(seed=0, layers=2):
    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=layers, n_heads=4, hidden_dim=64,
                              max_position_embeddings=32, num_labels=3, initializer_range=0.2)
    return DistilBertForSequenceClassification(config).eval()


def roberta(seed=0):
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=40, num_labels=3, pad_token_id=1,
                           initializer_range=0.2)
    return RobertaForSequenceClassification(config).eval()


MODELS = {"bert": bert, "distilbert": distilbert, "roberta": roberta}


def make_batch(seed=0, lengths=(8, 5, 3), pad_id=0):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.full((len(lengths), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(5, 100, (length,), generator=g)
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2][: len(lengths)]),
            "idx": torch.arange(len(lengths))}


def pad_more(batch, extra, pad_id=0):
    """The same batch with ``extra`` more padding tokens (mask 0) on every row."""
    out = dict(batch)
    b = batch["input_ids"].shape[0]
    out["input_ids"] = torch.cat([batch["input_ids"], torch.full((b, extra), pad_id, dtype=torch.long)], 1)
    out["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(b, extra, dtype=torch.long)], 1)
    return out


def step(distiller, student, batch, with_labels=True):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    labels = batch["labels"] if with_labels else None
    outputs = student(**inputs, labels=labels, **distiller.student_forward_kwargs())
    return distiller.loss(batch, outputs, labels)


def prepared(teacher, student, **config):
    distiller = Distiller(DistillationConfig(**config))
    distiller.prepare(student, teacher)
    return distiller


# -- the loss terms ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_term_is_zero_for_the_teacher_itself_and_positive_otherwise(kind):
    teacher = MODELS[kind](seed=0)
    pad = 1 if kind == "roberta" else 0
    batch = make_batch(pad_id=pad)
    same = prepared(teacher, copy.deepcopy(teacher), **ALL_TERMS)
    _, terms = step(same, same.student, batch)
    other = prepared(teacher, MODELS[kind](seed=1), **ALL_TERMS)
    _, other_terms = step(other, other.student, batch)
    for key in TERM_KEYS:
        assert abs(terms[key]) < 1e-5, (key, terms[key])
        assert other_terms[key] > 1e-4, (key, other_terms[key])


def test_adding_padding_changes_no_term():
    teacher = bert(hidden=32, heads=4, layers=4)
    student = bert(hidden=16, heads=4, layers=2, seed=3)  # different depth and width: projections are used
    distiller = prepared(teacher, student, **ALL_TERMS)
    batch = make_batch()
    loss, terms = step(distiller, student, batch)
    padded_loss, padded_terms = step(distiller, student, pad_more(batch, 5))
    assert set(terms) >= set(TERM_KEYS) | {"distill/task", "distill/total"}
    for key, value in terms.items():
        assert padded_terms[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert padded_loss.item() == pytest.approx(loss.item(), rel=1e-4)


def test_padding_is_masked_in_the_loss_functions_themselves():
    """Garbage at padded positions (not just zeros) must not leak into any loss."""
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    t2, s2 = t.clone(), s.clone()
    t2[0, 4:] = 100 * torch.randn(2, 8, generator=g)
    s2[0, 4:] = -50 * torch.randn(2, 8, generator=g)
    for fn in (lambda a, b: losses.hidden_mse(b, a, mask), lambda a, b: losses.self_relation_kl(a, b, mask, 2),
               lambda a, b: losses.attention_kl(a, a.flip(-1), b, b.flip(-1), mask, 4)):
        assert fn(t2, s2).item() == pytest.approx(fn(t, s).item(), rel=1e-5)
    token_logits = torch.randn(2, 6, 3, generator=g)
    token_logits2 = token_logits.clone()
    token_logits2[0, 4:] = 30.0
    base = losses.logit_kl(token_logits, torch.zeros(2, 6, 3), 2.0, mask)
    assert losses.logit_kl(token_logits2, torch.zeros(2, 6, 3), 2.0, mask).item() == pytest.approx(base.item())


@pytest.mark.parametrize("term", list(ALL_TERMS))
def test_gradients_reach_student_and_projections_never_the_teacher(term):
    teacher = bert(hidden=32, heads=4, layers=4)
    student = bert(hidden=16, heads=4, layers=2, seed=3)
    distiller = prepared(teacher, student, task_weight=0.0, **{term: ALL_TERMS[term]})
    loss, _ = step(distiller, student, make_batch(), with_labels=False)
    loss.backward()
    grad = student.bert.embeddings.word_embeddings.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    if term == "hidden":
        assert distiller.parameters(), "hidden sizes differ: projections expected"
    for p in distiller.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training


def test_task_loss_and_weights_make_the_total():
    teacher, student = bert(), bert(seed=1)
    distiller = prepared(teacher, student, task_weight=0.25, logits={"weight": 2.0}, minilm={"weight": 3.0})
    loss, terms = step(distiller, student, make_batch())
    expected = 0.25 * terms["distill/task"] + 2.0 * terms["distill/logits"] + 3.0 * terms["distill/minilm"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert terms["distill/total"] == pytest.approx(expected, rel=1e-5)
    assert terms["distill/minilm"] == pytest.approx(terms["distill/minilm_attention"] + terms["distill/minilm_value"])


# -- relation losses across shapes -------------------------------------------------------------------------


def _naive_relation_kl(t, s, lengths, heads):
    """Per example, per relation head, with plain loops over the real tokens only."""
    total, count = 0.0, 0
    for b, n in enumerate(lengths):
        dt, ds = t.shape[-1] // heads, s.shape[-1] // heads
        for r in range(heads):
            a = t[b, :n, r * dt:(r + 1) * dt].double()
            c = s[b, :n, r * ds:(r + 1) * ds].double()
            pt = torch.softmax(a @ a.T / math.sqrt(dt), -1)
            ps = torch.softmax(c @ c.T / math.sqrt(ds), -1)
            total += (pt * (pt.log() - ps.log())).sum().item()
            count += n
    return total / count


@pytest.mark.parametrize("relation_heads", [2, 4, 8])
def test_minilmv2_across_head_counts_and_hidden_sizes_matches_a_naive_reference(relation_heads):
    teacher = bert(hidden=32, heads=4, layers=4)
    student = bert(hidden=16, heads=2, layers=2, seed=5)
    distiller = prepared(teacher, student, task_weight=0.0,
                         minilmv2={"relation_heads": relation_heads, "teacher_layer": 2})
    batch = make_batch(lengths=(7, 4, 2))
    _, terms = step(distiller, student, batch, with_labels=False)
    lengths = batch["attention_mask"].sum(1).tolist()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():  # q/k/v recomputed from each layer's input, independently of the distiller's hooks
        th = teacher(**inputs, output_hidden_states=True).hidden_states[2]
        sh = student(**inputs, output_hidden_states=True).hidden_states[1]
    tatt, satt = teacher.bert.encoder.layer[2].attention.self, student.bert.encoder.layer[1].attention.self
    for rel, tm, sm in (("qq", tatt.query, satt.query), ("kk", tatt.key, satt.key), ("vv", tatt.value, satt.value)):
        expected = _naive_relation_kl(tm(th), sm(sh), lengths, relation_heads)
        assert terms[f"distill/minilmv2_{rel}"] == pytest.approx(expected, rel=1e-4), rel
    assert terms["distill/minilmv2"] == pytest.approx(sum(terms[f"distill/minilmv2_{r}"] for r in ("qq", "kk", "vv")))


def test_attention_from_hooked_projections_is_the_models_attention():
    """The attention distributions the distiller builds from q/k equal what an eager model reports."""
    model = bert(hidden=32, heads=4, layers=2, attn="eager")
    captured = {}
    attn = model.bert.encoder.layer[1].attention.self
    hooks = [getattr(attn, n).register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o))
             for n in ("query", "key")]
    batch = make_batch()
    mask = batch["attention_mask"]
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=mask, output_attentions=True)
    for h in hooks:
        h.remove()
    probs = losses.relation_log_probs(captured["query"], captured["key"], mask, 4).exp()
    real = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]
    assert torch.allclose(probs[real.expand_as(probs)], out.attentions[1][real.expand_as(probs)], atol=1e-6)


def test_minilm_matches_a_naive_reference_from_eager_attentions():
    teacher = bert(hidden=32, heads=4, layers=4, attn="eager")
    student = bert(hidden=16, heads=4, layers=2, seed=4, attn="eager")
    distiller = prepared(teacher, student, task_weight=0.0, minilm={}, attention={"layer_map": {0: 2}})
    batch = make_batch(lengths=(6, 3))
    _, terms = step(distiller, student, batch, with_labels=False)
    lengths = batch["attention_mask"].sum(1).tolist()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        t = teacher(**inputs, output_hidden_states=True, output_attentions=True)
        s = student(**inputs, output_hidden_states=True, output_attentions=True)

    def attention_kl(ta, sa):
        total, count = 0.0, 0
        for b, n in enumerate(lengths):
            pt, ps = ta[b, :, :n, :n].double(), sa[b, :, :n, :n].double()
            total += (pt * (pt.log() - ps.log())).sum().item()
            count += n * pt.shape[0]
        return total / count

    assert terms["distill/minilm_attention"] == pytest.approx(attention_kl(t.attentions[3], s.attentions[1]), rel=1e-4)
    assert terms["distill/attention"] == pytest.approx(attention_kl(t.attentions[2], s.attentions[0]), rel=1e-4)
    tv = teacher.bert.encoder.layer[3].attention.self.value(t.hidden_states[3])
    sv = student.bert.encoder.layer[1].attention.self.value(s.hidden_states[1])
    assert terms["distill/minilm_value"] == pytest.approx(_naive_relation_kl(tv, sv, lengths, 4), rel=1e-4)


def test_minilm_and_attention_work_across_hidden_sizes_with_equal_heads():
    teacher = bert(hidden=32, heads=4, layers=4)
    student = bert(hidden=16, heads=4, layers=3, seed=2)
    distiller = prepared(teacher, student, minilm={}, attention={})
    _, terms = step(distiller, student, make_batch())
    assert distiller.attention_map == {0: 1, 1: 2, 2: 3}
    for key in ("distill/attention", "distill/minilm_attention", "distill/minilm_value"):
        assert math.isfinite(terms[key]) and terms[key] > 0


# -- hand-computed values ----------------------------------------------------------------------------------


def test_logit_kl_hand_computed():
    student, teacher = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[0.0, 1.0, 3.0]])
    # T = 2: teacher/T = (0, .5, 1.5), student/T = (.5, 1, 0)
    zt = 1 + math.exp(0.5) + math.exp(1.5)
    zs = math.exp(0.5) + math.exp(1.0) + 1
    pt = [1 / zt, math.exp(0.5) / zt, math.exp(1.5) / zt]
    ps = [math.exp(0.5) / zs, math.exp(1.0) / zs, 1 / zs]
    expected = 4 * sum(a * math.log(a / b) for a, b in zip(pt, ps))
    assert expected == pytest.approx(1.8918573, rel=1e-6)
    assert losses.logit_kl(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-5)
    # batchmean: a second, identical row leaves the value unchanged; T = 1 has no T^2 factor
    assert losses.logit_kl(student.repeat(2, 1), teacher.repeat(2, 1), 2.0).item() == pytest.approx(expected, rel=1e-5)
    assert losses.logit_kl(student, student, 3.0).item() == pytest.approx(0.0, abs=1e-7)
    # a single output (regression): squared error
    assert losses.logit_kl(torch.tensor([[1.0]]), torch.tensor([[3.0]]), 2.0).item() == pytest.approx(4.0)


def test_relation_kl_and_hidden_mse_hand_computed():
    # one head, width 1; the third token is padding with values that would matter if it leaked
    teacher = torch.tensor([[[1.0], [0.0], [5.0]]])
    student = torch.tensor([[[0.0], [0.0], [-7.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # teacher relation: row 0 = softmax(1, 0) = (e, 1) / (e + 1), row 1 = softmax(0, 0) = (.5, .5)
    # student relation: both rows uniform; KL row 0 = sum p log(2p), row 1 = 0; averaged over 2 real queries
    e = math.e
    p = [e / (e + 1), 1 / (e + 1)]
    expected = sum(x * math.log(2 * x) for x in p) / 2
    assert expected == pytest.approx(0.0554720, rel=1e-5)
    assert losses.self_relation_kl(teacher, student, mask, 1).item() == pytest.approx(expected, rel=1e-5)
    # hidden MSE over the real tokens only: ((0 - 1)^2 + 0) / 2 tokens / 1 unit
    assert losses.hidden_mse(student, teacher, mask).item() == pytest.approx(0.5)


def test_uniform_layer_map():
    assert uniform_layer_map(3, 6) == {0: 1, 1: 3, 2: 5}
    assert uniform_layer_map(4, 4) == {0: 0, 1: 1, 2: 2, 3: 3}
    assert uniform_layer_map(2, 3) == {0: 1, 1: 2}


# -- shallow students --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,layers", [("bert", [0, 2, 3]), ("bert", [1]), ("distilbert", [1])])
def test_shallow_student_keeps_the_chosen_layers(kind, layers):
    teacher = bert(layers=4) if kind == "bert" else distilbert(layers=2)
    student = shallow_student(copy.deepcopy(teacher), layers)
    kept, original = encoder_layers(student), encoder_layers(teacher)
    assert len(kept) == len(layers) == student.config.num_hidden_layers
    for new, old in enumerate(layers):
        a, b = kept[new].state_dict(), original[old].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    batch = make_batch()
    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    assert len(out.hidden_states) == len(layers) + 1
    # the shallow student distills from its teacher
    distiller = prepared(teacher, student, hidden={}, minilmv2={"relation_heads": 4})
    assert distiller.hidden_map == uniform_layer_map(len(layers), len(original))
    _, terms = step(distiller, student, batch)
    assert terms["distill/hidden"] > 0


def test_shallow_student_rejects_missing_layers():
    with pytest.raises(RecipeFieldError) as err:
        shallow_student(bert(layers=4), [0, 4])
    assert err.value.field == ("model", "layers")
    assert "[4]" in str(err.value) and "4 layers" in str(err.value)


# -- teacher cache, dtypes, state --------------------------------------------------------------------------


def test_cache_teacher_runs_the_teacher_once_per_example_and_gives_the_same_losses():
    teacher = bert(hidden=32, heads=4, layers=4)
    student = bert(hidden=16, heads=4, layers=2, seed=3)
    plain = prepared(teacher, copy.deepcopy(student), **ALL_TERMS)
    cached = prepared(teacher, student, cache_teacher=True, **ALL_TERMS)
    plain.load_state_dict(cached.state_dict())  # the same projections
    calls = []
    hook = teacher.register_forward_hook(lambda *a: calls.append(1))
    batch = make_batch()
    _, expected = step(plain, plain.student, batch)
    calls.clear()
    _, first = step(cached, student, batch)
    _, again = step(cached, student, pad_more(batch, 3))  # another epoch, padded differently
    # a batch in another order and grouping
    reordered = {k: v[[2, 1]] for k, v in batch.items()}
    reordered = {**reordered, **{k: reordered[k][:, :5] for k in ("input_ids", "attention_mask")}}
    step(cached, student, reordered)
    hook.remove()
    assert len(calls) == 1
    for key in TERM_KEYS:
        assert first[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
        assert again[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, 0] += 1
    with pytest.raises(ValueError, match="other tokens"):
        step(cached, student, changed)
    with pytest.raises(ValueError, match="'idx'"):
        step(cached, student, {k: v for k, v in batch.items() if k != "idx"})


class _Split:
    """The two columns of a tokenized split that the data fingerprint reads."""

    def __init__(self, batch):
        self.rows = {"input_ids": [r[m.bool()].tolist() for r, m in zip(batch["input_ids"], batch["attention_mask"])]}
        self.column_names = list(self.rows)

    def __getitem__(self, column):
        return self.rows[column]

    def __len__(self):
        return len(self.rows["input_ids"])


def test_teacher_cache_on_disk_is_reused_by_the_next_run_and_refused_for_another_teacher_or_data(tmp_path):
    from sparsify.errors import SparsifyError
    from sparsify.techniques.distillation.cache import data_fingerprint

    teacher = bert(hidden=32, heads=4, layers=4)
    student = bert(hidden=16, heads=4, layers=2, seed=3)
    batch = make_batch()
    data = data_fingerprint(_Split(batch))
    cache = tmp_path / "cache"
    first = prepared(teacher, copy.deepcopy(student), teacher_cache=str(cache), **ALL_TERMS)
    assert first.attach_cache(cache, data) == 0
    _, expected = step(first, first.student, batch)
    assert not cache.exists()  # nothing written before a flush
    first.flush_cache()
    manifest = json.loads((cache / "cache.json").read_text())
    assert [s["examples"] for s in manifest["shards"]] == [3]
    # a second run: same teacher, data and terms -> every example read from disk, the teacher never runs
    second = prepared(teacher, copy.deepcopy(student), teacher_cache=str(cache), **ALL_TERMS)
    second.load_state_dict(first.state_dict())
    assert second.attach_cache(cache, data) == 3
    calls = []
    hook = teacher.register_forward_hook(lambda *a: calls.append(1))
    _, got = step(second, second.student, pad_more(batch, 2))
    hook.remove()
    assert calls == []
    for key in TERM_KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    # another teacher, other data, other terms: one clear error each, nothing read
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    for who, fingerprint, terms, what in ((other, data, ALL_TERMS, "teacher's weights"),
                                          (teacher, "0" * 64, ALL_TERMS, "tokenized training data"),
                                          (teacher, data, {"logits": {}}, "distillation terms")):
        d = prepared(who, copy.deepcopy(student), teacher_cache=str(cache), **terms)
        with pytest.raises(SparsifyError, match=what) as err:
            d.attach_cache(cache, fingerprint)
        assert str(cache / "cache.json") in str(err.value) and "\n" not in str(err.value)
    # a damaged shard is skipped with a warning and its examples computed (and stored) again
    shard = cache / manifest["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    third = prepared(teacher, copy.deepcopy(student), teacher_cache=str(cache), **ALL_TERMS)
    with pytest.warns(UserWarning, match="skipped"):
        assert third.attach_cache(cache, data) == 0
    step(third, third.student, batch)
    third.flush_cache()
    fourth = prepared(teacher, copy.deepcopy(student), teacher_cache=str(cache), **ALL_TERMS)
    assert fourth.attach_cache(cache, data) == 3  # the new manifest lists the rewritten shard, not the damaged one
    assert [s["file"] for s in json.loads((cache / "cache.json").read_text())["shards"]] == ["shard-00001.safetensors"]
    # a file, or a directory holding something else
    (tmp_path / "f").write_text("x")
    for bad, match in ((tmp_path / "f", "must be a directory"), (tmp_path, "not a teacher cache")):
        d = prepared(teacher, copy.deepcopy(student), teacher_cache=str(bad), **ALL_TERMS)
        with pytest.raises(SparsifyError, match=match):
            d.attach_cache(bad, data)
    with pytest.raises(ValidationError, match="teacher_cache"):
        DistillationConfig(logits={}, teacher_cache=" ")


def test_bfloat16_teacher_gives_close_losses():
    teacher = bert()
    student = bert(seed=1)
    _, reference = step(prepared(teacher, student, minilmv2={"relation_heads": 4}, logits={}), student, make_batch())
    half = copy.deepcopy(teacher).to(torch.bfloat16)
    distiller = prepared(half, student, minilmv2={"relation_heads": 4}, logits={})
    loss, terms = step(distiller, student, make_batch())
    assert loss.dtype == torch.float32
    for key in ("distill/logits", "distill/minilmv2"):
        assert terms[key] == pytest.approx(reference[key], rel=0.1), key


def test_state_dict_round_trip_and_finalize_removes_hooks():
    teacher = bert(hidden=32)
    student = bert(hidden=16, layers=2, seed=1)
    distiller = prepared(teacher, student, hidden={"include_embeddings": True}, minilm={})
    state = distiller.state_dict()
    assert set(state["projections"]) == {"layer0", "layer1", "embeddings"}
    assert state["hidden_layer_map"] == [[0, 1], [1, 3]]
    other = Distiller(distiller.config)
    other.prepare(copy.deepcopy(student), teacher)
    assert not torch.equal(other.projections["layer0"].weight, distiller.projections["layer0"].weight)
    other.load_state_dict(state)
    for name in state["projections"]:
        assert torch.equal(other.projections[name].weight, distiller.projections[name].weight)
    hooked = [m for m in list(student.modules()) + list(teacher.modules()) if m._forward_hooks]
    assert hooked
    distiller.finalize(student)
    other.finalize(other.student)
    assert not [m for m in list(student.modules()) + list(teacher.modules()) if m._forward_hooks]


def test_replacing_a_hooked_module_after_prepare_is_reported():
    teacher, student = bert(), bert(seed=1)
    distiller = prepared(teacher, student, minilm={})
    attn = student.bert.encoder.layer[-1].attention.self
    attn.value = copy.deepcopy(attn.value)  # e.g. swapped for a fake-quantized Linear; the copy has no hooks
    attn.value._forward_hooks.clear()
    with pytest.raises(RuntimeError, match="replaced"):
        step(distiller, student, make_batch())


# -- bad input ---------------------------------------------------------------------------------------------


def _field_error(exc: ValidationError) -> FieldError:
    err = exc.errors()[0]
    assert err["type"] == "value_error"
    return err["ctx"]["error"]


@pytest.mark.parametrize(
    "config,loc,field,words",
    [
        ({}, (), (), "no distillation term"),
        ({"logits": {"weight": 0.0}}, (), (), "no distillation term"),
        ({"logits": {"temperature": 0}}, ("logits",), ("temperature",), "> 0"),
        ({"logits": {"weight": -1}}, ("logits",), ("weight",), ">= 0"),
        ({"task_weight": -0.5, "logits": {}}, (), ("task_weight",), ">= 0"),
        ({"minilmv2": {"relation_heads": 0}}, ("minilmv2",), ("relation_heads",), ">= 1"),
        ({"minilmv2": {"relations": ["qq", "qq"]}}, ("minilmv2",), ("relations",), "distinct"),
        ({"hidden": {"layer_map": {0: -1}}}, ("hidden",), ("layer_map",), "non-negative"),
        ({"minilm": {"value_weight": -1}}, ("minilm",), ("value_weight",), ">= 0"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(config, loc, field, words):
    with pytest.raises(ValidationError) as err:
        DistillationConfig(**config)
    assert tuple(err.value.errors()[0]["loc"]) == loc
    error = _field_error(err.value)
    assert error.field == field and words in str(error)


def test_recipe_errors_name_the_key(tmp_path, monkeypatch):
    from sparsify import recipe as recipe_module
    from sparsify.techniques import TechniqueEntry

    monkeypatch.setitem(recipe_module.TECHNIQUES, "distillation",
                        TechniqueEntry(DistillationConfig, "sparsify.techniques.distillation:Distiller"))
    head = ("output_dir: out\nmodel: {name_or_path: s, layers: [0, 2]}\ndata: {dataset: d}\n"
            "training: {steps: 1}\n")
    cases = [
        ("teacher: {name_or_path: t}\ntechniques:\n  - kind: distillation\n    minilmv2: {relation_heads: 0}\n",
         "techniques[0].minilmv2.relation_heads: must be >= 1"),
        ("teacher: {name_or_path: t}\ntechniques:\n  - kind: distillation\n    task_weight: 1\n",
         "techniques[0]: no distillation term"),
        ("techniques:\n  - kind: distillation\n    logits: {}\n", "techniques[0]: distillation needs a teacher"),
        ("teacher: {name_or_path: t}\ntechniques:\n  - kind: distillation\n    hidden: {layer_map: {2: 5}}\n",
         "techniques[0].hidden.layer_map: student layer(s) [2] do not exist"),
    ]
    for i, (body, message) in enumerate(cases):
        path = tmp_path / f"r{i}.yaml"
        path.write_text(head + body)
        with pytest.raises(recipe_module.RecipeError) as err:
            recipe_module.load_recipe(path)
        assert message in str(err.value), str(err.value)
    ok = tmp_path / "ok.yaml"
    ok.write_text(head + "teacher: {name_or_path: t}\ntechniques:\n  - kind: distillation\n"
                  "    hidden: {layer_map: {0: 1, 1: 5}}\n")
    recipe = recipe_module.load_recipe(ok)
    assert recipe.technique("distillation").hidden.layer_map == {0: 1, 1: 5}


@pytest.mark.parametrize(
    "term,layer_map,words",
    [
        ("hidden", {0: 7}, "teacher layer(s) [7] do not exist"),
        ("attention", {5: 0}, "student layer(s) [5] do not exist"),
    ],
)
def test_layer_map_naming_missing_layers(term, layer_map, words):
    distiller = Distiller(DistillationConfig(**{term: {"layer_map": layer_map}}))
    with pytest.raises(FieldError) as err:
        distiller.prepare(bert(layers=2, seed=1), bert(layers=4))
    assert err.value.field == (term, "layer_map")
    assert words in str(err.value)


def test_minilmv2_layer_out_of_range():
    distiller = Distiller(DistillationConfig(minilmv2={"relation_heads": 4, "teacher_layer": 4}))
    with pytest.raises(FieldError) as err:
        distiller.prepare(bert(layers=2, seed=1), bert(layers=4))
    assert err.value.field == ("minilmv2", "teacher_layer") and "teacher has 4 layers" in str(err.value)


@pytest.mark.parametrize("heads", [3, 32])
def test_relation_heads_must_divide_both_hidden_sizes(heads):
    distiller = Distiller(DistillationConfig(minilmv2={"relation_heads": heads}))
    with pytest.raises(FieldError) as err:  # 3 divides neither 32 nor 16; 32 divides the teacher's 32 only
        distiller.prepare(bert(hidden=16, heads=2, seed=1), bert(hidden=32))
    assert err.value.field == ("minilmv2", "relation_heads")
    assert f"{heads} relation heads do not divide the student's" in str(err.value)


@pytest.mark.parametrize("term", ["attention", "minilm"])
def test_per_head_terms_need_equal_head_counts(term):
    distiller = Distiller(DistillationConfig(**{term: {}}))
    with pytest.raises(FieldError) as err:
        distiller.prepare(bert(hidden=16, heads=2, seed=1), bert(hidden=32, heads=4))
    assert err.value.field == (term,) and "minilmv2" in str(err.value)


class _Tokenizer:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def test_mismatched_vocabularies():
    distiller = Distiller(DistillationConfig(logits={}))
    with pytest.raises(RecipeFieldError) as err:
        distiller.prepare(bert(vocab=120, seed=1), bert(vocab=100))
    assert err.value.field == ("teacher", "name_or_path") and "120" in str(err.value) and "vocabulary" in str(err.value)
    vocab = {f"tok{i}": i for i in range(100)}
    swapped = {**vocab, "tok1": 2, "tok2": 1}
    with pytest.raises(RecipeFieldError) as err:
        distiller.prepare(bert(seed=1), bert(), tokenizer=_Tokenizer(vocab), teacher_tokenizer=_Tokenizer(swapped))
    assert err.value.field == ("teacher", "name_or_path") and "tok1" in str(err.value)
    distiller.prepare(bert(seed=1), bert(), tokenizer=_Tokenizer(vocab), teacher_tokenizer=_Tokenizer(dict(vocab)))


def test_student_and_teacher_must_be_two_models():
    model = bert()
    with pytest.raises(ValueError, match="two models"):
        Distiller(DistillationConfig(logits={})).prepare(model, model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("teacher_device,student_device", [("cuda", "cpu"), ("cpu", "cuda")])
def test_teacher_and_student_on_different_devices_and_dtypes(teacher_device, student_device):
    teacher, student = bert(hidden=32), bert(hidden=16, layers=2, seed=1)
    config = dict(ALL_TERMS, cache_teacher=True)
    reference = prepared(teacher, copy.deepcopy(student), **config)
    _, expected = step(reference, reference.student, make_batch())
    student = student.to(student_device)
    distiller = prepared(copy.deepcopy(teacher).to(teacher_device, torch.bfloat16), student, **config)
    distiller.load_state_dict(reference.state_dict())
    batch = {k: v.to(student_device) for k, v in make_batch().items()}
    for _ in range(2):  # the second call reads the cache
        loss, terms = step(distiller, student, batch)
        assert loss.device.type == student_device and loss.dtype == torch.float32
        loss.backward()
        for key in TERM_KEYS:
            assert terms[key] == pytest.approx(expected[key], rel=0.1, abs=1e-3), key


def test_config_import_is_lean():
    import subprocess
    import sys

    code = ("import sys; from sparsify.techniques.distillation import DistillationConfig; "
            "DistillationConfig(logits={}); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- SquareHead normalisation, soft targets only, the teacher's head -----------------------------------------------


def test_normalized_hidden_mse_is_the_relative_error_over_real_tokens():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    real = mask.bool()
    expected = ((s - t)[real] ** 2).sum() / (t[real] ** 2).sum()
    assert losses.hidden_mse(s, t, mask, normalize=True).item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses.hidden_mse(3 * s, 3 * t, mask, normalize=True).item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses.hidden_mse(3 * s, 3 * t, mask).item() == pytest.approx(9 * losses.hidden_mse(s, t, mask).item(),
                                                                          rel=1e-5)


def test_soft_targets_only_ignore_the_labels():
    teacher, student = bert(), bert(seed=1)
    distiller = prepared(teacher, student, task_weight=0.0, logits={"weight": 1.0}, hidden={"normalize": True})
    batch = make_batch()
    loss, terms = step(distiller, student, batch)
    flipped = dict(batch, labels=(batch["labels"] + 1) % 3)
    loss2, _ = step(distiller, student, flipped)
    assert "distill/task" not in terms and loss.item() == pytest.approx(loss2.item(), rel=1e-6)
    assert loss.item() == pytest.approx(terms["distill/logits"] + terms["distill/hidden"], rel=1e-5)


def test_keep_teacher_head_copies_and_freezes_pooler_and_classifier():
    teacher, student = bert(seed=0), bert(seed=1)
    prepared(teacher, student, keep_teacher_head=True, logits={"weight": 1.0})
    t = dict(teacher.named_parameters())
    head = {n: p for n, p in student.named_parameters() if n.startswith(("classifier.", "bert.pooler."))}
    assert len(head) == 4
    for name, p in head.items():
        assert torch.equal(p, t[name]) and not p.requires_grad
    assert all(p.requires_grad for n, p in student.named_parameters() if n not in head)
    with pytest.raises(FieldError, match="heads must match") as e:
        prepared(bert(hidden=64, heads=4), bert(seed=1), keep_teacher_head=True, logits={"weight": 1.0})
    assert e.value.field == ("keep_teacher_head",)
