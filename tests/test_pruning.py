"""Block-wise gradual magnitude pruning: schedule, masks, optimizer state, resume, inference, bad input, report.

Tiny models built from a config in code and a hand-written AdamW loop; no trainer, no network.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from sparsify import sparsity
from sparsify.config import FieldError
from sparsify.errors import RecipeError, SparsifyError
from sparsify.techniques.pruning import BlockPruner, PruningConfig

ENCODER_LINEARS = 12  # 2 layers x (query, key, value, attention output, intermediate, output)


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def make_pruner(model, steps_per_epoch=10, total_steps=20, **kw):
    kw.setdefault("block", "4x1")
    kw.setdefault("final_sparsity", 0.75)
    kw.setdefault("end_step", 6)
    kw.setdefault("update_every", 2)
    pruner = BlockPruner(PruningConfig(**kw))
    pruner.prepare(model, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    return pruner


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (4, 8), generator=g), torch.randint(0, 2, (4,), generator=g)


def train(model, pruner, steps, optimizer=None, first=1):
    """The loop the trainer runs: backward, mask_gradients, optimizer.step, pruner.step(step)."""
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    x, y = batch()
    logs = {}
    for step in range(first, first + steps):
        model(input_ids=x, labels=y).loss.backward()
        pruner.mask_gradients()
        optimizer.step()
        optimizer.zero_grad()
        logs[step] = pruner.step(step, optimizer)
    return optimizer, logs


def linear_weights(model):
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def measured(model):
    return {n: float((w == 0).float().mean()) for n, w in linear_weights(model).items()}


# -- schedule ---------------------------------------------------------------------------------------------------


def test_cubic_schedule_values_and_update_steps():
    pruner = BlockPruner(PruningConfig(block="4x1", initial_sparsity=0.1, final_sparsity=0.9, start_step=10,
                                       end_step=110, update_every=25))
    # s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))^3, by hand:
    expected = {0: 0.0, 9: 0.0, 10: 0.1, 35: 0.9 - 0.8 * 0.75**3, 60: 0.9 - 0.8 * 0.125, 85: 0.9 - 0.8 * 0.25**3,
                109: 0.9 - 0.8 * 0.01**3, 110: 0.9, 1000: 0.9}
    for step, value in expected.items():
        assert pruner.target_at(step) == pytest.approx(value, abs=1e-12), step
    model = tiny_bert()
    pruner.prepare(model, steps_per_epoch=50, total_steps=200)
    updates = [s for s in range(1, 200) if pruner.step(s)["sparsity/mask_updated"]]
    assert updates == [10, 35, 60, 85, 110]  # every update_every steps inside the window, and exactly at end_step
    assert not pruner.finished(109) and pruner.finished(110)


def test_epochs_are_converted_to_steps_and_one_shot():
    model = tiny_bert()
    pruner = BlockPruner(PruningConfig(block="4x1", final_sparsity=0.5, start_epoch=0.5, end_epoch=1.5))
    pruner.prepare(model, steps_per_epoch=40, total_steps=80)
    assert (pruner.start_step, pruner.end_step) == (20, 60)
    assert pruner.target_at(60) == 0.5 and pruner.target_at(19) == 0.0
    # one-shot at step 0: final masks right after prepare
    model = tiny_bert()
    pruner = make_pruner(model, end_step=0)
    assert pruner.finished(0)
    assert all(v == 0.75 for n, v in measured(model).items() if n in pruner.layers)


# -- targets reached exactly, block pattern ---------------------------------------------------------------------


@pytest.mark.parametrize("block", ["1x1", "4x1", "1x4", "8x1", "4x4", "32x1"])
def test_layer_scope_reaches_exact_target_in_block_pattern(block):
    model = tiny_bert()
    pruner = make_pruner(model, block=block)
    _, logs = train(model, pruner, 8)
    assert pruner.finished(6) and not pruner.finished(5)
    sp = measured(model)
    pruned = [n for n in sp if n in pruner.layers]
    assert len(pruned) == ENCODER_LINEARS
    for name in pruned:
        assert sp[name] == 0.75, name  # 0.75 of every layer's blocks is a whole number of blocks here
    for name in ("bert.pooler.dense", "classifier"):
        assert sp[name] == 0.0
    assert (model.bert.embeddings.word_embeddings.weight[1:] != 0).all()  # row 0 is the padding row
    shape = tuple(int(v) for v in block.split("x"))
    weights = linear_weights(model)
    for name in pruned:
        assert sparsity.follows_block(weights[name], shape), name
    if shape[0] != shape[1]:  # orientation: the transposed block is not followed
        transposed = (shape[1], shape[0])
        assert not all(sparsity.follows_block(weights[n], transposed) for n in pruned if
                       sparsity.divides(weights[n].shape, transposed))
    assert logs[6]["sparsity/actual"] == 0.75 and logs[6]["sparsity/target"] == 0.75
    assert logs[2]["sparsity/mask_updated"] == 1.0 and logs[3]["sparsity/mask_updated"] == 0.0
    # intermediate update at step 2: target 0.75 * (1 - (1 - 2/6)^3)
    assert logs[2]["sparsity/actual"] == pytest.approx(0.75 * (1 - (2 / 3) ** 3), abs=0.5 / 32)


def test_global_scope_total_exact_and_min_max_respected():
    model = tiny_bert()
    with torch.no_grad():  # one layer far smaller than the rest, one far larger: the bounds must bind
        model.bert.encoder.layer[0].attention.self.query.weight.mul_(0.01)
        model.bert.encoder.layer[1].output.dense.weight.mul_(100.0)
    pruner = make_pruner(model, scope="global", min_sparsity=0.5, max_sparsity=0.875)
    train(model, pruner, 7)
    sp = {n: v for n, v in measured(model).items() if n in pruner.layers}
    numel = {n: linear_weights(model)[n].numel() for n in sp}
    total = sum(sp[n] * numel[n] for n in sp) / sum(numel.values())
    assert total == 0.75
    assert sp["bert.encoder.layer.0.attention.self.query"] == 0.875  # capped by max_sparsity
    assert sp["bert.encoder.layer.1.output.dense"] == 0.5  # held up by min_sparsity
    assert all(0.5 <= v <= 0.875 for v in sp.values())
    assert len({round(v, 4) for v in sp.values()}) > 2  # a real global ranking, not the layer-wise target


def test_global_scope_ranks_across_layers_without_bounds():
    model = tiny_bert()
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight.mul_(0.01)
    pruner = make_pruner(model, scope="global", final_sparsity=0.5, end_step=0)
    sp = {n: v for n, v in measured(model).items() if n in pruner.layers}
    assert sp["bert.encoder.layer.0.attention.self.query"] == 1.0
    model2 = tiny_bert()
    with torch.no_grad():
        model2.bert.encoder.layer[0].attention.self.query.weight.mul_(0.01)
    make_pruner(model2, scope="layer", final_sparsity=0.5, end_step=0)
    assert measured(model2)["bert.encoder.layer.0.attention.self.query"] == 0.5


def test_overrides_set_per_layer_targets_and_blocks():
    model = tiny_bert()
    pruner = make_pruner(model, overrides=[{"pattern": r"attention\.", "final_sparsity": 0.5, "block": "1x4"},
                                           {"pattern": r"intermediate", "final_sparsity": 0.25}])
    train(model, pruner, 6)
    weights = linear_weights(model)
    for name, value in measured(model).items():
        if name not in pruner.layers:
            continue
        if "attention." in name:
            assert value == 0.5 and sparsity.follows_block(weights[name], (1, 4)), name
            assert pruner.blocks[name] == (1, 4)
        elif "intermediate" in name:
            assert value == 0.25 and pruner.blocks[name] == (4, 1), name
        else:
            assert value == 0.75 and sparsity.follows_block(weights[name], (4, 1)), name


# -- gradients, optimizer state, masks held ---------------------------------------------------------------------


def test_gradients_masked_and_adam_moments_of_newly_pruned_entries_reset():
    model = tiny_bert()
    pruner = make_pruner(model, end_step=4, update_every=2)
    optimizer, _ = train(model, pruner, 1)  # step 1: no mask yet, Adam moments everywhere
    layer = pruner.layers["bert.encoder.layer.0.intermediate.dense"]
    w = layer.weight
    assert optimizer.state[w]["exp_avg"].ne(0).all()
    x, y = batch()
    model(input_ids=x, labels=y).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    logs = pruner.step(2, optimizer)  # mask update at step 2
    assert logs["sparsity/mask_updated"] == 1.0
    pruned = ~layer.mask
    assert pruned.any()
    for key in ("exp_avg", "exp_avg_sq"):
        assert optimizer.state[w][key][pruned].eq(0).all(), key
        assert optimizer.state[w][key][layer.mask].ne(0).any(), key
    model(input_ids=x, labels=y).loss.backward()
    assert w.grad[pruned].ne(0).any()  # the test means something: raw grads of pruned weights are not zero
    pruner.mask_gradients()
    assert w.grad[pruned].eq(0).all() and w.grad[layer.mask].ne(0).any()
    optimizer.step()
    optimizer.zero_grad()
    assert w.detach()[pruned].eq(0).all()  # zero grads + zero moments + decoupled decay: pruned weights stay 0
    train(model, pruner, 10, optimizer, first=3)
    assert w.detach()[pruned].eq(0).all()
    assert measured(model)["bert.encoder.layer.0.intermediate.dense"] == 0.75


def test_masks_are_reapplied_every_step_and_fixed_after_end():
    model = tiny_bert()
    pruner = make_pruner(model, end_step=2)
    optimizer, _ = train(model, pruner, 2)
    masks = {n: m.clone() for n, m in pruner.masks.items()}
    w = pruner.layers["bert.encoder.layer.1.output.dense"].weight
    with torch.no_grad():
        w.fill_(1.0)  # something writes the weights (e.g. a buggy callback)
    train(model, pruner, 3, optimizer, first=3)
    assert all(torch.equal(masks[n], m) for n, m in pruner.masks.items())
    assert measured(model)["bert.encoder.layer.1.output.dense"] == 0.75


def test_mask_computation_is_deterministic_with_ties():
    masks = []
    for _ in range(2):
        model = tiny_bert()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.fill_(0.5)  # every block ties
        pruner = make_pruner(model, end_step=0)
        masks.append(pruner.masks)
    for name in masks[0]:
        assert torch.equal(masks[0][name], masks[1][name])
    first = masks[0]["bert.encoder.layer.0.attention.self.query"]
    assert not first[:24].any() and first[24:].all()  # ties broken by block index: the first 3/4 of 4x1 blocks


# -- resume -----------------------------------------------------------------------------------------------------


def save_state(state: dict, path):
    """Checkpoint-style save: tensors into safetensors, the rest to JSON; keys flattened with '.' (naively)."""
    tensors, rest = {}, {}

    def walk(tree, prefix):
        for k, v in tree.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                walk(v, key)
            elif isinstance(v, torch.Tensor):
                tensors[key] = v
            else:
                rest[key] = v

    walk(state, "")
    save_file(tensors, str(path / "state.safetensors"))
    (path / "state.json").write_text(json.dumps(rest))


def load_state(path) -> dict:
    flat = {**json.loads((path / "state.json").read_text()), **load_file(str(path / "state.safetensors"))}
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def test_masks_identical_after_state_dict_round_trip(tmp_path):
    model = tiny_bert()
    pruner = make_pruner(model, end_step=8)
    optimizer, _ = train(model, pruner, 4)  # mid-schedule: masks at an intermediate sparsity
    save_state(pruner.state_dict(), tmp_path)
    model.save_pretrained(tmp_path / "model")
    resumed_model = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "model")
    with torch.no_grad():  # the zeros alone must not be the source: make the resumed weights dense
        for m in resumed_model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.add_(1e-3)
    resumed = make_pruner(resumed_model, end_step=8)
    assert not torch.equal(resumed.masks["bert.encoder.layer.0.output.dense"],
                           pruner.masks["bert.encoder.layer.0.output.dense"])
    resumed.load_state_dict(load_state(tmp_path))
    for name, mask in pruner.masks.items():
        assert mask.dtype == torch.bool and torch.equal(resumed.masks[name], mask), name
        w = resumed.layers[name].weight
        assert w.detach()[~mask].eq(0).all()
    assert resumed.last_update == 4 and not resumed.reached_end
    # the same masks keep evolving the same way: continue both from identical weights
    resumed_model.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(resumed_model.parameters(), lr=1e-2, weight_decay=0.01)
    opt2.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # load_state_dict would share the tensors
    train(model, pruner, 6, optimizer, first=5)
    train(resumed_model, resumed, 6, opt2, first=5)
    for name, mask in pruner.masks.items():
        assert torch.equal(resumed.masks[name], mask), name


def test_load_state_dict_rejects_masks_of_other_layers():
    pruner = make_pruner(tiny_bert())
    state = pruner.state_dict()
    state["masks"].pop("bert.encoder.layer.1.output.dense")
    other = make_pruner(tiny_bert())
    with pytest.raises(SparsifyError, match="bert.encoder.layer.1.output.dense"):
        other.load_state_dict(state)


def test_wrapped_model_names_are_canonical():
    model = tiny_bert()
    wrapper = torch.nn.Module()
    wrapper.module = model  # what DDP / accelerate's wrapping looks like from named_modules()
    pruner = make_pruner(wrapper)
    assert len(pruner.layers) == ENCODER_LINEARS
    assert all(not n.startswith("module.") for n in pruner.layers)
    state = pruner.state_dict()
    plain = make_pruner(tiny_bert())
    plain.load_state_dict(state)


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_default_layers_for_other_families(family):
    torch.manual_seed(0)
    if family == "roberta":
        model = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    else:
        model = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
            vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    pruner = make_pruner(model)
    assert len(pruner.layers) == 6
    assert not any("classifier" in n or "embeddings" in n or "pooler" in n for n in pruner.layers)


# -- an already-sparse starting model -------------------------------------------------------------------------


@pytest.mark.parametrize("block", [(8, 1), (1, 4), (4, 4)])
def test_masks_and_block_inferred_from_sparse_checkpoint(tmp_path, block):
    model = tiny_bert()
    make_pruner(model, block=f"{block[0]}x{block[1]}", final_sparsity=0.5, end_step=0)
    model.save_pretrained(tmp_path)
    weights = sparsity.select_weights(sparsity.load_report_weights(tmp_path))
    assert sparsity.infer_block_shape(weights) == block
    sparse = transformers.BertForSequenceClassification.from_pretrained(tmp_path)
    pruner = make_pruner(sparse, block=None, final_sparsity=0.75, start_step=2, end_step=6)
    assert set(pruner.blocks.values()) == {block}
    for name, l in pruner.layers.items():
        assert torch.equal(l.mask, l.weight.detach() != 0), name
    before = {n: m.clone() for n, m in pruner.masks.items()}
    train(sparse, pruner, 6)
    for name, l in pruner.layers.items():
        assert (l.mask <= before[name]).all(), name  # masks only grow: every zero of the checkpoint stays zero
        assert sparsity.follows_block(l.weight.detach(), block)
    assert all(v == 0.75 for n, v in measured(sparse).items() if n in pruner.layers)


def test_dense_model_block_inference():
    model = tiny_bert()
    assert sparsity.infer_block_shape(linear_weights(model)) is None
    with pytest.raises(FieldError, match="is required") as e:
        make_pruner(model, block=None)
    assert e.value.field == ("block",) and "4x1" in str(e.value)
    w = torch.ones(8, 8)
    w[:4, :4] = 0  # fits 4x4 (and 16-element shapes do not divide as 16x1 into 8 rows)
    assert sparsity.infer_block_shape(w) == (4, 4)
    w = torch.ones(32, 32)
    w[:16, :4] = 0  # follows 4x4 and 16x1 (and 16x4): same-size candidates tie -> ambiguous
    assert sparsity.infer_block_shape(w) is None


def test_starting_model_sparser_than_target_is_an_error():
    model = tiny_bert()
    make_pruner(model, final_sparsity=0.75, end_step=0)
    with pytest.raises(FieldError, match="already 0.75") as e:
        make_pruner(model, final_sparsity=0.5)
    assert e.value.field == ("final_sparsity",) and "bert.encoder.layer.0" in str(e.value)


# -- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, field, text",
    [
        ({"final_sparsity": 1.0}, "final_sparsity", "[0, 1)"),
        ({"final_sparsity": 90}, "final_sparsity", "0.9 for 90%"),
        ({"final_sparsity": -0.1}, "final_sparsity", "[0, 1)"),
        ({"initial_sparsity": 0.8, "final_sparsity": 0.5}, "initial_sparsity", "above final_sparsity"),
        ({"start_step": 100, "end_step": 50}, "start_step", "start_step 100 is after end_step 50"),
        ({"start_epoch": 2.0, "end_epoch": 1.0, "end_step": None}, "start_epoch", "after end_epoch"),
        ({"block": "4by1"}, "block", "rows x cols (out x in)"),
        ({"include": ["("]}, "include", "invalid regular expression"),
        ({"min_sparsity": 0.2}, "min_sparsity", "scope: global only"),
    ],
)
def test_config_errors_name_the_field(kw, field, text):
    args = {"block": "4x1", "final_sparsity": 0.5, "end_step": 10, **kw}
    args = {k: v for k, v in args.items() if v is not None}
    with pytest.raises(ValidationError) as e:
        PruningConfig(**args)
    err = e.value.errors()[0]
    fields = tuple(err["loc"]) + tuple(getattr(err.get("ctx", {}).get("error"), "field", ()))
    assert field in fields
    assert text in str(e.value)


def test_block_not_dividing_a_layer_names_the_layer_and_its_shape():
    with pytest.raises(FieldError) as e:
        make_pruner(tiny_bert(), block="3x1")
    msg = str(e.value)
    assert e.value.field == ("block",)
    assert "bert.encoder.layer.0.attention.self.query" in msg and "32x32 (out x in)" in msg and "3x1 (out x in)" in msg
    with pytest.raises(FieldError) as e:
        make_pruner(tiny_bert(), overrides=[{"pattern": "intermediate", "block": "1x64"}])
    assert e.value.field == ("overrides", 0, "block") and "intermediate.dense" in str(e.value) and "64x32" in str(e.value)


@pytest.mark.parametrize(
    "kw, field, text",
    [
        ({"include": [r"encoder\.layer\.\d+\.output\.dense$", "attention.selfie"]}, ("include", 1), "'attention.selfie'"),
        ({"exclude": ["decoder"]}, ("exclude", 0), "'decoder'"),
        ({"overrides": [{"pattern": "classifier", "final_sparsity": 0.1}]}, ("overrides", 0, "pattern"), "'classifier'"),
        ({"end_step": 50}, ("end_step",), "after the last training step 20"),
    ],
)
def test_prepare_errors_name_the_field_and_pattern(kw, field, text):
    with pytest.raises(FieldError) as e:
        make_pruner(tiny_bert(), **kw)
    assert e.value.field == field and text in str(e.value)


def test_recipe_errors_have_file_line_and_key(tmp_path, monkeypatch):
    from sparsify import recipe as recipe_mod
    from sparsify.techniques import TechniqueEntry

    monkeypatch.setitem(recipe_mod.TECHNIQUES, "pruning",
                        TechniqueEntry(PruningConfig, "sparsify.techniques.pruning.pruner:BlockPruner"))

    def load(technique: str):
        path = tmp_path / "r.yaml"
        path.write_text(textwrap.dedent("""\
            output_dir: runs/x
            model: {name_or_path: m}
            data: {dataset: nyu-mll/glue, config: sst2}
            training: {steps: 100}
            techniques:
              - kind: pruning
                block: 4x1
            """) + textwrap.indent(textwrap.dedent(technique), "    "))
        return recipe_mod.load_recipe(path)

    ok = load("final_sparsity: 0.9\nend_step: 100\n")
    assert ok.technique("pruning").block == "4x1"
    with pytest.raises(RecipeError) as e:
        load("final_sparsity: 1.5\nend_step: 50\n")
    assert e.value.line == 8 and e.value.key == "techniques[0].final_sparsity" and "[0, 1)" in str(e.value)
    with pytest.raises(RecipeError) as e:
        load("final_sparsity: 0.9\nstart_step: 60\nend_step: 50\n")
    assert e.value.line == 9 and e.value.key == "techniques[0].start_step"
    with pytest.raises(RecipeError) as e:
        load("final_sparsity: 0.9\nend_step: 500\n")
    assert e.value.line == 9 and e.value.key == "techniques[0].end_step" and "training.steps" in str(e.value)


def test_miss_at_end_step_fails_the_run():
    model = tiny_bert()
    pruner = make_pruner(model, end_step=4)
    original = pruner._update_masks

    def lost_update(step, optimizer):  # simulate masks that do not follow the schedule at the end
        if step < 4:
            original(step, optimizer)
        else:
            pruner.reached_end = True
            pruner._check_end(step)

    pruner._update_masks = lost_update
    with pytest.raises(SparsifyError) as e:
        train(model, pruner, 4)
    msg = str(e.value)
    assert "end_step 4" in msg and "target 0.75" in msg and "tolerance 0.005" in msg and "bert.encoder.layer" in msg


def test_config_imports_no_torch():
    code = "import sys, sparsify.techniques.pruning as p; p.PruningConfig; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- report -----------------------------------------------------------------------------------------------------


def test_report_from_zeros_with_pattern_check():
    model = tiny_bert()
    pruner = make_pruner(model, end_step=0)
    report = pruner.finalize(model)
    assert report["total"]["sparsity"] == 0.75 and report["total"]["follows_block"] is True
    assert report["block"] == "4x1" and report["orientation"] == "out x in"
    name = "bert.encoder.layer.0.output.dense"
    w = pruner.layers[name].weight
    with torch.no_grad():
        kept = torch.nonzero(w != 0)[0]
        w[kept[0], kept[1]] = 0.0  # a stray zero inside a kept block: measured, and breaks the pattern
    report = sparsity.sparsity_report({n: l.weight.detach() for n, l in pruner.layers.items()}, (4, 1))
    layer = report["layers"][name]
    assert layer["zeros"] == 1536 + 1 and layer["stray_zeros"] == 1 and layer["follows_block"] is False
    assert report["total"]["follows_block"] is False
    text = sparsity.format_report(report)
    assert "4x1 (out x in)" in text and "NO: 1 zeros outside whole blocks" in text and name in text


def test_report_cli_on_model_and_run_dirs(tmp_path, capsys):
    model = tiny_bert()
    make_pruner(model, block="8x1", end_step=0)
    model.save_pretrained(tmp_path / "run" / "model")
    assert sparsity.main([str(tmp_path / "run" / "model")]) == 0
    out = capsys.readouterr().out
    assert "block 8x1 (out x in), inferred" in out and "75.00%" in out and "bert.encoder.layer.1.output.dense" in out
    assert "classifier" not in out
    assert sparsity.main([str(tmp_path / "run"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"]["sparsity"] == 0.75 and len(report["layers"]) == ENCODER_LINEARS
    assert sparsity.main([str(tmp_path / "run"), "--block", "1x4"]) == 0
    out = capsys.readouterr().out
    assert "block 1x4 (out x in), given" in out and "NO:" in out
    assert sparsity.main([str(tmp_path / "run"), "--all", "--json"]) == 0
    assert "classifier" in json.loads(capsys.readouterr().out)["layers"]
    assert sparsity.main([str(tmp_path / "nowhere")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert sparsity.main([str(tmp_path / "run"), "--block", "4"]) == 2


# -- scores: taylor and obs ----------------------------------------------------------------------------------------


def calibration(n_batches=2, seed=5):
    """Labelled calibration batches for the tiny model (the same on every call)."""
    def batches():
        for i in range(n_batches):
            x, y = batch(seed + i)
            yield {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": y}
    return batches


def test_obs_prune_is_the_exact_least_squares_solution():
    from sparsify.techniques.pruning import scores as S

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 6, generator=g)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    h = x.T @ x
    keep = torch.ones(8, 6, dtype=torch.bool)
    keep[:, 2] = False
    got = S.obs_prune(w, keep, h, damping=0.01)
    hd = S._damped(h, 0.01)
    k = torch.tensor([0, 1, 3, 4, 5])
    exact = w.double() @ hd[:, k] @ torch.linalg.inv(hd[k][:, k])
    assert torch.equal(got[:, 2], torch.zeros(8))
    torch.testing.assert_close(got[:, k].double(), exact, rtol=1e-5, atol=1e-5)
    # the OBS form of the same update: w <- w - w_c H^-1[c, :] / [H^-1]_cc
    hinv = torch.linalg.inv(hd)
    obs = w.double() - w.double()[:, 2:3] * hinv[2:3, :] / hinv[2, 2]
    torch.testing.assert_close(got.double(), obs, rtol=1e-5, atol=1e-5)


def test_obs_prune_beats_plain_masking_and_keeps_zeros():
    from sparsify.techniques.pruning import scores as S

    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 32, generator=g)
    x = torch.randn(400, 32, generator=g, dtype=torch.float64) @ torch.randn(32, 32, generator=g, dtype=torch.float64)
    h = x.T @ x
    hinv = torch.diag(S.inverse_hessian(h, 0.01))
    sal = S.obs_saliency(w, hinv, (4, 1))  # (4, 32)
    keep_blocks = sal > sal.flatten().kthvalue(64).values  # half of the 128 blocks
    keep = sparsity.expand_blocks(keep_blocks, (4, 1))
    new = S.obs_prune(w, keep, h, damping=0.01)
    err = lambda v: float(((v.double() - w.double()) @ x.T).pow(2).sum())  # noqa: E731
    assert torch.all(new[~keep] == 0) and bool((new[keep] != 0).all())
    assert err(new) < 0.6 * err(w * keep)
    for r in range(16):  # the optimum for the mask: no row can do better (normal equations hold on its kept columns)
        k = keep[r].nonzero().flatten()
        grad = ((new[r].double() - w[r].double()) @ S._damped(h, 0.01))[k]
        assert float(grad.abs().max()) < 1e-6 * float(h.diag().max())


def test_obs_pruner_one_shot_hits_the_target_and_lowers_the_output_error():
    def output_error(score):
        model = tiny_bert(3)
        reference = copy.deepcopy(model)
        pruner = BlockPruner(PruningConfig(block="4x1", final_sparsity=0.75, start_step=0, end_step=0, score=score))
        pruner.prepare(model, total_steps=4, calibration=calibration(4))
        x, _ = batch(9)
        with torch.no_grad():
            got = model.bert(input_ids=x).last_hidden_state
            ref = reference.bert(input_ids=x).last_hidden_state
        assert all(abs(v - 0.75) < 1e-6 for v in measured(model).values() if v > 0)
        assert pruner.finished(0) and len(pruner.update_seconds) == 1
        return float((got - ref).pow(2).mean())

    assert output_error("obs") < output_error("l2")


def test_obs_needs_calibration_and_column_blocks():
    with pytest.raises(FieldError, match="calibration"):
        make_pruner(tiny_bert(), score="obs")
    pruner = BlockPruner(PruningConfig(block="1x4", final_sparsity=0.5, end_step=4, score="obs"))
    with pytest.raises(FieldError, match="one input column"):
        pruner.prepare(tiny_bert(), total_steps=8, calibration=calibration())


def test_taylor_score_is_the_moving_average_of_weight_times_grad():
    model = tiny_bert(4)
    pruner = make_pruner(model, score="taylor", taylor_momentum=0.5, start_step=4, end_step=8, update_every=2,
                         total_steps=10)
    name = "bert.encoder.layer.0.attention.self.query"
    layer = dict(model.named_modules())[name]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    x, y = batch()
    expected = None
    for step in (1, 2, 3):  # the window opens update_every (2) steps before start_step (4): steps 2 and 3 count
        model(input_ids=x, labels=y).loss.backward()
        contribution = (layer.weight.detach() * layer.weight.grad).abs()
        pruner.mask_gradients()
        if step >= 2:
            expected = contribution if expected is None else 0.5 * expected + contribution
        optimizer.step()
        optimizer.zero_grad()
        pruner.step(step, optimizer)
    torch.testing.assert_close(pruner.taylor[name], expected)
    state = pruner.state_dict()
    fresh = make_pruner(tiny_bert(4), score="taylor", taylor_momentum=0.5, start_step=4, end_step=8,
                        update_every=2, total_steps=10)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.taylor[name], pruner.taylor[name]) and fresh.steps_done == 3


def test_taylor_one_shot_takes_gradients_from_calibration_and_leaves_none_behind():
    model = tiny_bert(5)
    pruner = BlockPruner(PruningConfig(block="4x1", final_sparsity=0.5, start_step=0, end_step=0, score="taylor"))
    pruner.prepare(model, total_steps=4, calibration=calibration())
    assert set(pruner.taylor) == set(pruner.layers)
    assert all(p.grad is None for p in model.parameters())
    assert all(abs(v - 0.5) < 1e-6 for v in measured(model).values() if v > 0)
    with pytest.raises(SparsifyError, match="calibration"):
        BlockPruner(PruningConfig(block="4x1", final_sparsity=0.5, start_step=0, end_step=0,
                                  score="taylor")).prepare(tiny_bert(5), total_steps=4)


@pytest.mark.parametrize("score", ["taylor", "obs"])
def test_global_scope_with_second_order_and_taylor_scores(score):
    model = tiny_bert(6)
    pruner = BlockPruner(PruningConfig(block="4x1", final_sparsity=0.6, start_step=0, end_step=0, score=score,
                                       scope="global", min_sparsity=0.3, max_sparsity=0.9))
    pruner.prepare(model, total_steps=4, calibration=calibration())
    per_layer = [v for n, v in measured(model).items() if "encoder" in n]
    assert min(per_layer) >= 0.3 - 1e-6 and max(per_layer) <= 0.9 + 1e-6
    report = pruner.finalize()
    assert abs(report["total"]["sparsity"] - 0.6) < 0.01 and report["total"]["follows_block"]


def test_update_steps_list_every_mask_update():
    pruner = make_pruner(tiny_bert(), start_step=2, end_step=10, update_every=3, total_steps=12)
    assert pruner.update_steps() == [2, 5, 8, 10]
    # a grid step less than half an interval before end_step gives way to it: no two updates a step apart
    close = make_pruner(tiny_bert(), start_step=2, end_step=9, update_every=3, total_steps=12)
    assert close.update_steps() == [2, 5, 9]
    assert [s for s in range(1, 12) if close.step(s)["sparsity/mask_updated"]] == [2, 5, 9]
    one_shot = make_pruner(tiny_bert(), start_step=0, end_step=0, total_steps=12)
    assert one_shot.update_steps() == [0]
    big_first = make_pruner(tiny_bert(), initial_sparsity=0.5, start_step=0, end_step=6, update_every=3,
                            total_steps=12)
    assert big_first.update_steps() == [0, 3, 6]


def test_sensitivity_scan_cli(tiny_model_dir, toy_data, tmp_path, capsys):
    from sparsify.cli import main as cli_main

    out = tmp_path / "scan.json"
    code = cli_main(["sensitivity", str(tiny_model_dir), "--train-file", str(toy_data["train"]), "--validation-file",
                     str(toy_data["validation"]), "--max-length", "32", "--sparsities", "0.5,0.75",
                     "--score", "l2,taylor,obs", "--scope", "layer,global", "--layer-types",
                     "--calibration-samples", "32", "--json", str(out), "--plot", str(tmp_path / "scan.png"),
                     "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    plain = [r for r in result["records"] if "layer_type" not in r]
    assert len(plain) == 3 * 2 * 2 and len(result["records"]) == len(plain) + 4 * 3 * 2
    for r in plain:
        assert abs(r["sparsity"] - r["target"]) < 0.02 and r["follows_block"] and 0.0 <= r["accuracy"] <= 1.0
    qkv = next(r for r in result["records"] if r.get("layer_type") == "attention_qkv")
    assert all((v > 0) == ("attention.self" in n) for n, v in qkv["per_layer"].items())
    assert (tmp_path / "scan.png").stat().st_size > 0
    assert "one-shot pruning, 4x1 (out x in)" in capsys.readouterr().out
    if Path("/proc/cpuinfo").is_file():  # timings are comparable only on the same CPU: its SIMD flags are recorded
        assert any(f.startswith(("avx", "sse", "neon", "asimd")) for f in result["cpu"]["flags"])
    assert cli_main(["sensitivity", str(tiny_model_dir), "--score", "magnitude"]) == 2
    assert "choose from l1, l2, taylor, obs" in capsys.readouterr().err


def test_sensitivity_scan_of_an_embedding_model(tiny_st_dir, toy_data, tmp_path, capsys):
    """--task embedding: each pruned copy is scored by the cosine of its embeddings to the dense model's."""
    from sparsify.cli import main as cli_main

    out = tmp_path / "scan.json"
    files = ["--train-file", str(toy_data["train"]), "--validation-file", str(toy_data["validation"])]
    code = cli_main(["sensitivity", str(tiny_st_dir), "--task", "embedding", *files, "--max-length", "32",
                     "--sparsities", "0.5,0.9", "--score", "l2,obs", "--scope", "layer", "--calibration-samples",
                     "32", "--json", str(out), "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["metric"] == "teacher_cosine" and result["dense"]["teacher_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert len(result["records"]) == 4
    for r in result["records"]:
        assert abs(r["sparsity"] - r["target"]) < 0.02 and r["follows_block"]
        assert -1.0 <= r["teacher_cosine"] < 1.0 - 1e-6  # pruned: no longer the dense model
    by = {(r["score"], r["target"]): r["teacher_cosine"] for r in result["records"]}
    assert by[("obs", 0.5)] > by[("obs", 0.9)] and by[("l2", 0.5)] > by[("l2", 0.9)]
    assert cli_main(["sensitivity", str(tiny_st_dir), "--task", "embedding", *files, "--score", "taylor"]) == 2
    assert "taylor scores need the gradient of a task loss" in capsys.readouterr().err
    assert cli_main(["sensitivity", str(tiny_st_dir), "--config", "mrpc"]) == 2
    assert "--config names the texts of --task embedding" in capsys.readouterr().err
