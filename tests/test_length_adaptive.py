"""Length-adaptive transformer: token dropping in PyTorch models, the FLOPs counter, LengthDrop's contract with
the training loop, the evolutionary search and ``sparsify search``, length configurations on disk, and the
bad-input messages. Tiny models built in code; the whole file runs in seconds on 2 cores."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from pydantic import ValidationError
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from sparsify.checkpoint import load_state, save_state
from sparsify.config import FieldError
from sparsify.errors import SparsifyError
from sparsify.student import shallow_student
from sparsify.techniques.length_adaptive import (
    LengthAdaptiveConfig,
    LengthAdaptiveModel,
    LengthDrop,
    check_length_config,
    forward_with_lengths,
    kept_lengths,
    load_length_config,
    save_length_config,
)
from sparsify.techniques.length_adaptive.flops import EncoderDims, dataset_flops, example_flops
from sparsify.techniques.length_adaptive.inference import length_adaptive, select_tokens
from sparsify.techniques.length_adaptive.search import Candidate, dominates, evolutionary_search, main, pareto_frontier

torch.set_num_threads(1)


def bert(layers=3, attn="sdpa", seed=0, labels=3):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40, num_labels=labels, attn_implementation=attn,
                        initializer_range=0.2)
    return BertForSequenceClassification(config).eval()


def distilbert(seed=0):
    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=3, n_heads=4, hidden_dim=64,
                              max_position_embeddings=40, num_labels=3, initializer_range=0.2)
    return DistilBertForSequenceClassification(config).eval()


def roberta(seed=0):
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=48, num_labels=3, pad_token_id=1,
                           initializer_range=0.2)
    return RobertaForSequenceClassification(config).eval()


MODELS = {"bert-sdpa": lambda: bert(), "bert-eager": lambda: bert(attn="eager"), "distilbert": distilbert,
          "roberta": roberta}
LENGTHS = [12, 9, 5, 2]  # real tokens per example; the batch is padded to 12


def batch(model, lengths=LENGTHS, seed=1, labels=True):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(5, 100, (len(lengths), n), generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, :length] = 1
    pad = model.config.pad_token_id or 0
    ids = ids.masked_fill(mask == 0, pad)
    ids[:, 0] = 2  # [CLS]
    inputs = {"input_ids": ids, "attention_mask": mask}
    if labels:
        inputs["labels"] = torch.randint(0, model.config.num_labels, (len(lengths),), generator=g)
    return inputs


# -- inference ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_full_length_configuration_reproduces_the_plain_model_exactly(name):
    model = MODELS[name]()
    inputs = batch(model)
    plain = model(**inputs)
    for config in ([1.0, 1.0, 1.0], [40, 40, 40], [12, 12, 12]):
        out = forward_with_lengths(model, inputs, config)
        assert torch.equal(out.logits, plain.logits), config
        assert torch.equal(out.loss, plain.loss), config
    wrapped = LengthAdaptiveModel(model, [1.0, 1.0, 1.0])
    assert torch.equal(wrapped(**inputs).logits, plain.logits)
    # and a configuration that drops tokens does change the outputs (the hooks act)
    assert not torch.allclose(forward_with_lengths(model, inputs, [0.5, 0.3, 0.2]).logits, plain.logits)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("config", [[0.8, 0.5, 0.25], [8, 6, 3], [1.0, 0.6, 0.6]])
def test_cls_and_only_real_tokens_are_kept(name, config):
    model = MODELS[name]()
    inputs = batch(model)
    with length_adaptive(model, config, inputs["attention_mask"]) as state:
        out = model(**inputs)
    assert out.logits.shape == (len(LENGTHS), 3) and torch.isfinite(out.logits).all()
    assert state.kept == [list(k) for k in zip(*(kept_lengths(config, n) for n in LENGTHS))]
    for b, n in enumerate(LENGTHS):
        kept = state.mask[b].sum().item()
        assert kept == kept_lengths(config, n)[-1]
        assert state.mask[b, :kept].all() and not state.mask[b, kept:].any()  # real tokens first, then padding
        positions = state.positions[b, :kept].tolist()
        assert positions[0] == 0  # [CLS]
        assert positions == sorted(set(positions))  # original order, no duplicates
        assert max(positions) < n  # never a padding position
    # an example gives the same logits alone (no padding) as in the padded batch
    for b, n in enumerate(LENGTHS):
        alone = {k: v[b:b + 1, :n] for k, v in inputs.items() if k != "labels"}
        torch.testing.assert_close(forward_with_lengths(model, alone, config).logits[0], out.logits[b],
                                   rtol=1e-4, atol=1e-5)


def test_tokens_are_selected_by_significance_cls_first_in_order():
    scores = torch.tensor([[0.1, 5.0, 0.2, 9.0, 7.0], [0.0, 1.0, 3.0, 2.0, 8.0]])
    mask = torch.tensor([[True, True, True, True, True], [True, True, True, True, False]])
    index, new_mask = select_tokens(scores, mask, torch.tensor([3, 2]))
    assert index[0].tolist() == [0, 3, 4]  # [CLS] despite its low score, then the two most attended, in order
    assert index[1, :2].tolist() == [0, 2]  # position 4 is padding: never kept, however high its score
    assert new_mask.tolist() == [[True, True, True], [True, True, False]]


def test_layer_drop_skips_the_layer():
    model = bert()
    inputs = batch(model, labels=False)
    out = forward_with_lengths(model, inputs, [1.0, 1.0, 1.0], skip_layers=(1,))
    reference = shallow_student(copy.deepcopy(model), [0, 2])(**inputs)
    torch.testing.assert_close(out.logits, reference.logits, rtol=1e-5, atol=1e-6)


# -- FLOPs ----------------------------------------------------------------------------------------------------


def test_flops_counter_equals_a_hand_count():
    dims = EncoderDims(hidden=32, intermediate=64, layers=2, num_labels=2)
    # n = 6, kept [4, 2]. MACs: layer 0 (6 in, 4 out) = 4*6*32^2 + 2*6^2*32 + 2*4*32*64 = 24576 + 2304 + 16384
    # layer 1 (4 in, 2 out) = 4*4*32^2 + 2*4^2*32 + 2*2*32*64 = 16384 + 1024 + 8192; head = 32^2 + 32*2 = 1088
    assert example_flops(dims, [4, 2], 6) == 2 * (43264 + 25600 + 1088) == 139904
    assert example_flops(dims, [0.5, 0.25], 8) == 2 * (53248 + 25600 + 1088)  # kept [4, 2] of 8
    full = 2 * (2 * (4 * 6 * 1024 + 2 * 36 * 32 + 2 * 6 * 2048) + 1088)
    assert example_flops(dims, None, 6) == example_flops(dims, [1.0, 1.0], 6) == full
    report = dataset_flops(dims, [4, 2], [6, 6])
    assert report["unit"] == "FLOPs (2 x MACs)" and report["fraction"] == pytest.approx(139904 / full)


def test_kept_lengths_rule():
    assert kept_lengths([0.7, 0.4], 6) == [5, 3]  # ceil(4.2) = 5, ceil(2.4) = 3
    assert kept_lengths([0.3, 0.3], 10) == [3, 3]  # 0.3 * 10 is 3.0000000000000004 in floating point: still 3
    assert kept_lengths([8, 4], 5) == [5, 4]  # never more than the example has
    assert kept_lengths([0.01, 0.01], 5) == [1, 1]  # [CLS] is always kept
    assert kept_lengths([0.5, 0.5], 8, skip_layers=(0,)) == [8, 4]


def test_flops_counter_matches_torch_flop_counter():
    """The formula counts the model's matrix products: torch's FLOP counter on the real forward pass agrees
    (eager attention; at reduced length, plus the significance scores' Q K^T that the hooks recompute)."""
    model = bert(layers=2, attn="eager", labels=2)
    n = 10
    inputs = batch(model, lengths=[n, n], labels=False)
    dims = EncoderDims.from_config(model.config)
    for config in (None, [0.6, 0.3]):
        with FlopCounterMode(display=False) as counter:
            forward_with_lengths(model, inputs, config)
        overhead = 0 if config is None else 2 * 32 * sum(k * k for k in [n, kept_lengths(config, n)[0]])
        assert counter.get_total_flops() == 2 * (example_flops(dims, config, n) + overhead)


# -- LengthDrop -----------------------------------------------------------------------------------------------


def test_lengthdrop_contract_with_the_loop():
    model = bert(layers=3)
    model.train()
    technique = LengthDrop(LengthAdaptiveConfig(length_drop_ratio_bound=0.3, num_sandwich=2, start_step=2))
    technique.prepare(model, steps_per_epoch=10, total_steps=20, seed=7)
    inputs = batch(model)
    outputs = model(**inputs)
    state_before = technique.generator.get_state()
    loss, terms = technique.loss(model, inputs, outputs, outputs.loss, step=1)  # before start_step
    assert loss is outputs.loss and terms == {}
    assert torch.equal(technique.generator.get_state(), state_before)  # nothing drawn
    loss, terms = technique.loss(model, inputs, outputs, outputs.loss, step=2)
    assert set(terms) == {"length/smallest", "length/random", "length/total"}
    assert terms["length/smallest"] > 0 and loss.item() > outputs.loss.item()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_lengthdrop_sampling_follows_the_bound_and_resumes_exactly(tmp_path):
    technique = LengthDrop(LengthAdaptiveConfig(length_drop_ratio_bound=0.25, num_sandwich=3, layer_drop=0.2))
    technique.prepare(bert(layers=4), steps_per_epoch=5, total_steps=10, seed=3)
    first = technique.sample()
    name, smallest, skip = first[0]
    assert name == "smallest" and skip == ()
    assert smallest == pytest.approx([0.75 ** (i + 1) for i in range(4)])
    for _, ratios, skip in first[1:]:
        check_length_config(ratios, 4)  # non-increasing ratios in (0, 1]
        prev = 1.0
        for i, r in enumerate(ratios):
            assert (r == prev) if i in skip else (0.75 * prev - 1e-12 <= r <= prev)
            prev = r
    # the generator state goes through a checkpoint and the run continues with the same draws
    save_state(tmp_path / "techniques", {"length_adaptive": technique.state_dict()})
    expected = [technique.sample() for _ in range(3)]
    resumed = LengthDrop(technique.config)
    resumed.prepare(bert(layers=4), steps_per_epoch=5, total_steps=10, seed=3)
    resumed.load_state_dict(load_state(tmp_path / "techniques")["length_adaptive"])
    assert [resumed.sample() for _ in range(3)] == expected
    fresh = LengthDrop(technique.config)
    fresh.prepare(bert(layers=4), steps_per_epoch=5, total_steps=10, seed=3)
    assert fresh.sample() == first  # seeded from the recipe's seed


# -- search ---------------------------------------------------------------------------------------------------


def _search(seed, budget=0.6):
    model = bert(layers=3, labels=2)
    inputs = batch(model, lengths=[12, 11, 9, 7, 12, 6, 10, 8], seed=5)
    dims = EncoderDims.from_config(model.config)
    lengths = inputs["attention_mask"].sum(1).tolist()

    @torch.no_grad()
    def evaluate(cfg):
        logits = forward_with_lengths(model, inputs, cfg).logits
        return float(-torch.nn.functional.cross_entropy(logits, inputs["labels"]))

    return evolutionary_search(evaluate, lambda cfg: dataset_flops(dims, cfg, lengths)["fraction"], 3, budget,
                               population=6, generations=2, seed=seed)


def test_search_is_deterministic_for_a_seed_and_its_frontier_is_non_dominated():
    a, b = _search(0), _search(0)
    assert a.chosen == b.chosen and a.frontier == b.frontier and a.evaluated == b.evaluated
    assert len(a.evaluated) >= 12  # gen 0 plus two generations of new configurations
    for c in a.frontier:
        assert not any(dominates(o, c) for o in a.evaluated)
    for c in a.evaluated:  # everything off the frontier is dominated by (or equal to) a frontier member
        assert c in a.frontier or any(dominates(f, c) or f == c for f in a.frontier)
    within = [c for c in a.evaluated if c.cost <= 0.6]
    assert a.chosen.cost <= 0.6 and a.chosen.metric == max(c.metric for c in within)
    assert a.chosen in a.frontier
    assert any(c.length_config == (1.0, 1.0, 1.0) and c.cost == 1.0 for c in a.evaluated)


def test_pareto_frontier():
    cands = [Candidate((1.0,), 0.9, 1.0), Candidate((0.5,), 0.9, 0.5), Candidate((0.4,), 0.8, 0.4),
             Candidate((0.6,), 0.85, 0.6)]
    assert [c.length_config for c in pareto_frontier(cands)] == [(0.4,), (0.5,)]


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir, make_recipe):
    """A run directory as 'sparsify train' leaves it: recipe.yaml and model/ (the tiny BERT, toy data)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "model")
    shutil.copy(make_recipe(), run / "recipe.yaml")
    return run


def test_search_cli_writes_frontier_plot_and_length_config(run_dir, capsys):
    argv = [str(run_dir), "--budget", "0.6", "--population", "4", "--generations", "1", "--seed", "3",
            "--max-samples", "32", "--threads", "1"]
    assert main(argv) == 0
    doc = json.loads((run_dir / "search" / "frontier.json").read_text())
    assert doc["unit"] == "FLOPs (2 x MACs)" and doc["metric"] == "accuracy"
    assert doc["chosen"]["flops_fraction"] <= 0.6 and (run_dir / "search" / "frontier.png").stat().st_size > 0
    chosen = load_length_config(run_dir / "model", num_layers=2, required=True)
    assert list(chosen) == doc["chosen"]["length_config"]
    assert "FLOPs" in capsys.readouterr().out
    first = doc
    assert main(argv) == 0
    again = json.loads((run_dir / "search" / "frontier.json").read_text())
    assert again["frontier"] == first["frontier"] and again["chosen"] == first["chosen"]


@pytest.mark.parametrize("args, key", [(["--budget", "1.5"], "--budget"), (["--budget", "0"], "--budget"),
                                       (["--budget", "0.5", "--population", "1"], "--population")])
def test_search_cli_rejects_bad_options_naming_them(tmp_path, capsys, args, key):
    assert main([str(tmp_path), *args]) == 2
    assert capsys.readouterr().err.startswith(f"error: {key}:")


def test_search_cli_rejects_a_directory_that_is_no_run(tmp_path, capsys):
    assert main([str(tmp_path), "--budget", "0.5"]) == 2
    assert "not a run directory" in capsys.readouterr().err


# -- length configurations on disk ----------------------------------------------------------------------------


@pytest.mark.parametrize("config", [[1.0, 0.75, 0.5], [12, 8, 8]])
def test_length_config_round_trips_through_save_and_load(tmp_path, config):
    model = bert()
    inputs = batch(model, labels=False)
    wrapped = LengthAdaptiveModel(model, config)
    wrapped.save_pretrained(tmp_path / "m")
    assert load_length_config(tmp_path / "m") == tuple(config)
    assert type(load_length_config(tmp_path / "m")[0]) is type(config[0])
    loaded = LengthAdaptiveModel.from_pretrained(tmp_path / "m")
    assert loaded.length_config == tuple(config)
    torch.testing.assert_close(loaded(**inputs).logits, forward_with_lengths(model, inputs, config).logits)
    save_length_config(tmp_path / "n", config, source="test")
    assert json.loads((tmp_path / "n" / "length_config.json").read_text())["source"] == "test"
    assert load_length_config(tmp_path / "empty") is None
    with pytest.raises(SparsifyError, match="has 3 value"):
        load_length_config(tmp_path / "m", num_layers=4)


def test_lengthdrop_saves_the_recipe_length_config(tmp_path):
    technique = LengthDrop(LengthAdaptiveConfig(length_config=[1.0, 0.5, 0.5]))
    technique.prepare(bert(), steps_per_epoch=1, total_steps=1)
    technique.save_length_config(tmp_path)
    assert load_length_config(tmp_path, num_layers=3) == (1.0, 0.5, 0.5)
    assert technique.eval_forward() is not None
    assert LengthDrop(LengthAdaptiveConfig()).eval_forward() is None


# -- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, key, words", [
    ({"length_drop_ratio_bound": 0.0}, "length_drop_ratio_bound", "(0, 1)"),
    ({"length_drop_ratio_bound": 1.0}, "length_drop_ratio_bound", "(0, 1)"),
    ({"length_drop_ratio_bound": -0.2}, "length_drop_ratio_bound", "(0, 1)"),
    ({"length_config": [0.5, 0.8, 0.4]}, "length_config", "must not grow"),
    ({"length_config": [32, 48]}, "length_config", "must not grow"),
    ({"length_config": [1, 0.5]}, "length_config", "mixes"),
    ({"length_config": [1.5, 1.0]}, "length_config", "(0, 1]"),
    ({"length_config": [0, 0]}, "length_config", ">= 1"),
    ({"length_config": []}, "length_config", "empty"),
    ({"start_step": 1, "start_epoch": 0.5}, "start_epoch", "not both"),
])
def test_config_rejects_bad_values_naming_the_key(fields, key, words):
    with pytest.raises(ValidationError) as err:
        LengthAdaptiveConfig(**fields)
    e = err.value.errors()[0]
    where = tuple(e["loc"]) + getattr(e.get("ctx", {}).get("error"), "field", ())
    assert key in where and words in str(err.value)


def test_prepare_rejects_a_length_config_of_the_wrong_size():
    technique = LengthDrop(LengthAdaptiveConfig(length_config=[1.0, 0.5]))
    with pytest.raises(FieldError) as err:
        technique.prepare(bert(layers=3), steps_per_epoch=1, total_steps=10)
    assert err.value.field == ("length_config",) and "3 encoder layers" in str(err.value)
    with pytest.raises(ValueError, match="3 encoder layers"):
        forward_with_lengths(bert(layers=3), batch(bert(layers=3)), [1.0, 0.5])


def test_recipe_errors_name_the_key_and_line(monkeypatch, make_recipe):
    from sparsify import recipe as recipe_module
    from sparsify.techniques import TECHNIQUES, TechniqueEntry

    monkeypatch.setitem(TECHNIQUES, "length_adaptive", TechniqueEntry(
        LengthAdaptiveConfig, "sparsify.techniques.length_adaptive.lengthdrop:LengthDrop"))
    cases = [({"kind": "length_adaptive", "length_config": [1.0, 1.2]}, "techniques[0].length_config"),
             ({"kind": "length_adaptive", "length_drop_ratio_bound": 1.0}, "techniques[0].length_drop_ratio_bound"),
             ({"kind": "length_adaptive", "start_step": 8}, "techniques[0].start_step")]
    for technique, key in cases:
        path = make_recipe(techniques=[technique])
        with pytest.raises(recipe_module.RecipeError) as err:
            recipe_module.load_recipe(path)
        assert err.value.key == key and err.value.line is not None, str(err.value)
    path = make_recipe(techniques=[{"kind": "length_adaptive", "length_config": [1.0, 0.5]}],
                       model={"layers": [0]})
    with pytest.raises(recipe_module.RecipeError) as err:
        recipe_module.load_recipe(path)
    assert err.value.key == "techniques[0].length_config" and "1 encoder layers" in str(err.value)


def test_latency_cost_is_the_median_time_relative_to_full_length(monkeypatch):
    """LatencyCost times the runtime per configuration (median of the repeats) against the full-length time;
    a fake clock advanced by the fake runtime makes the measurement exact."""
    from sparsify.techniques.length_adaptive import search as search_mod

    clock = {"t": 0.0, "calls": []}

    class FakeRuntime:
        def __call__(self, input_ids, attention_mask, length_config=None):
            clock["calls"].append(length_config)
            clock["t"] += 1.0 if length_config is None else sum(length_config) / len(length_config)

    monkeypatch.setattr(search_mod.time, "perf_counter", lambda: clock["t"])
    batches = [{"input_ids": None, "attention_mask": None}] * 2
    cost = search_mod.LatencyCost(FakeRuntime(), batches, repeats=3)
    assert cost.full_seconds == 2.0  # two batches of 1 s
    assert cost((0.5, 0.5)) == pytest.approx(0.5) and cost((1.0, 0.5)) == pytest.approx(0.75)
    assert cost((1.0, 1.0)) == 1.0
    n = len(clock["calls"])
    assert cost((0.5, 0.5)) == pytest.approx(0.5) and len(clock["calls"]) == n  # cached: timed once
    assert clock["calls"].count([0.5, 0.5]) == 2 * 3  # 2 batches x 3 repeats


def test_search_cli_latency_cost_times_the_exported_runtime(run_dir, capsys):
    argv = [str(run_dir), "--budget", "1.0", "--cost", "latency", "--population", "3", "--generations", "1",
            "--max-samples", "32", "--latency-examples", "16", "--latency-batch-size", "8", "--threads", "1"]
    assert main(argv) == 0
    doc = json.loads((run_dir / "search" / "frontier.json").read_text())
    assert doc["cost"] == "latency" and doc["full_length_seconds"] > 0 and doc["latency_examples"] == 16
    assert (run_dir / "search" / "artifact" / "sparsify.json").is_file()  # the exported artifact
    assert all("latency_fraction" in c and "flops_fraction" in c for c in doc["evaluated"])
    full = [c for c in doc["evaluated"] if all(r == 1.0 for r in c["length_config"])]
    assert full and full[0]["latency_fraction"] == 1.0
    assert doc["chosen"]["latency_fraction"] <= 1.0  # a tiny model is all overhead: no real saving to expect
    saved = json.loads((run_dir / "model" / "length_config.json").read_text())
    assert saved["cost"] == "latency" and saved["latency_fraction"] == doc["chosen"]["latency_fraction"]
    assert "latency" in capsys.readouterr().out


def test_search_cli_artifact_needs_latency_cost(tmp_path, capsys):
    assert main([str(tmp_path), "--budget", "0.5", "--artifact", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --artifact: only with --cost latency")


# -- the truncation baseline ----------------------------------------------------------------------------------


def test_truncated_rows_match_the_tokenizer_truncation(tiny_model_dir):
    from transformers import AutoTokenizer

    from sparsify.techniques.length_adaptive.truncation import kept_tokens, truncate_row

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "good great bad awful fine good great bad"
    row = dict(tok(text))
    n = len(row["input_ids"])
    for keep in range(2, n + 1):
        assert truncate_row(row, keep) == dict(tok(text, truncation=True, max_length=keep)), keep
    assert kept_tokens(10, 0.5) == 5 and kept_tokens(10, 0.01) == 2 and kept_tokens(10, 1.0) == 10
    assert kept_tokens(3, 0.34) == 2  # ceil(1.02) = 2


def test_truncation_ratio_reaches_the_largest_flops_within_the_fraction():
    from sparsify.techniques.length_adaptive.truncation import kept_tokens, truncation_ratio

    dims = EncoderDims(hidden=32, intermediate=64, layers=2, num_labels=2)
    lengths = [5, 9, 17, 33, 12]
    full = dataset_flops(dims, None, lengths)["flops_per_example"]
    assert truncation_ratio(dims, lengths, 1.0) == (1.0, 1.0)
    for fraction in (0.7, 0.5, 0.3):
        ratio, reached = truncation_ratio(dims, lengths, fraction)
        cut = [kept_tokens(n, ratio) for n in lengths]
        assert reached == pytest.approx(dataset_flops(dims, None, cut)["flops_per_example"] / full)
        assert reached <= fraction
        more = [kept_tokens(n, ratio + 1e-3) for n in lengths]  # a little more of each input no longer fits
        assert dataset_flops(dims, None, more)["flops_per_example"] / full > fraction or more == cut


def test_search_cli_compares_with_truncated_inputs(run_dir):
    argv = [str(run_dir), "--budget", "0.5", "--population", "4", "--generations", "1", "--max-samples", "32",
            "--threads", "1", "--compare-truncation", "1,0.5"]
    assert main(argv) == 0
    doc = json.loads((run_dir / "search" / "frontier.json").read_text())
    at_full, at_half = doc["truncation"]
    full_metric = next(c["accuracy"] for c in doc["evaluated"] if all(r == 1.0 for r in c["length_config"]))
    # nothing truncated at 100%: the same accuracy as the full-length configuration
    assert at_full["keep_ratio"] == 1.0 and at_full["truncated_accuracy"] == full_metric
    assert at_full["length_config_accuracy"] == max(c["accuracy"] for c in doc["evaluated"])
    assert at_half["flops_fraction"] <= 0.5 and at_half["length_config_flops_fraction"] <= 0.5
    assert main([str(run_dir), "--budget", "0.5", "--compare-truncation", "0.5,2"]) == 2


def test_all_four_techniques_in_one_run(make_recipe, tiny_model_dir):
    """Pruning, distillation, QAT and LengthDrop together (the full-combination recipe's shape, tiny): the run
    ends at its target sparsity, with the int8 conversion agreeing with the fake-quant model."""
    from sparsify.recipe import load_recipe
    from sparsify.train import train

    techniques = [
        {"kind": "pruning", "block": "4x1", "final_sparsity": 0.5, "start_step": 0, "end_step": 4, "update_every": 2},
        {"kind": "distillation", "logits": {"weight": 1.0, "temperature": 2.0}},
        {"kind": "quantization", "start_step": 4, "freeze_after_steps": 2, "peg": {"groups": 4}},
        {"kind": "length_adaptive", "start_step": 4, "num_sandwich": 1},
    ]
    recipe = load_recipe(make_recipe(training={"steps": 8, "eval_every": None, "save_every": None},
                                     teacher={"name_or_path": str(tiny_model_dir)}, techniques=techniques))
    run_dir = train(recipe, progress=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    sparsity = json.loads((run_dir / "sparsity.json").read_text())
    assert sparsity["total"]["sparsity"] == pytest.approx(0.5) and sparsity["total"]["follows_block"]
    assert metrics["optimizer_steps"] == 8
    assert metrics["conversion_parity"]["label_agreement"] >= 0.95
    # the search evaluates the quantized run as it will run: the int8 conversion, as the parity check did
    from sparsify.techniques.length_adaptive.search import search_run

    doc = search_run(run_dir, 0.5, population=4, generations=1, log=None)
    assert doc["model"].startswith("int8 conversion")
    full = next(c["accuracy"] for c in doc["evaluated"] if all(r == 1.0 for r in c["length_config"]))
    assert full == metrics["conversion_parity"]["converted"]["accuracy"]
    # and the searched configuration travels into the artifact (the documented train -> search -> export)
    from sparsify.export import export

    manifest = export(run_dir, run_dir / "artifact")["manifest"]
    assert manifest["length_config"]["lengths"] == doc["chosen"]["length_config"]
