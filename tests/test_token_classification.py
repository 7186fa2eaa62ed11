"""Token classification in the recipe trainer (``data.task: token-classification``): word labels aligned to the
first token of each word, entity-level F1, distillation / pruning / QAT on a token head, export as a
token-classification artifact whose runtime labels match PyTorch, and one-line errors. Tiny models only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from sparsify.cli import main


def run_cli(*args) -> int:
    return main(list(map(str, args)) + (["--no-progress"] if args[0] == "train" else []))


def output_dir(recipe_path: Path) -> Path:
    return Path(yaml.safe_load(recipe_path.read_text())["output_dir"])


@pytest.fixture
def make_token_recipe(make_recipe, toy_token_data):
    def make(**sections):
        data = {"task": "token-classification", "train_file": str(toy_token_data["train"]),
                "validation_file": str(toy_token_data["validation"]), **sections.pop("data", {})}
        return make_recipe(data=data, **sections)

    return make


def test_entities_and_metrics():
    from sparsify.evaluation import entities, token_metrics

    assert entities(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG"]) == {("PER", 0, 1), ("LOC", 3, 3),
                                                                           ("LOC", 4, 4), ("ORG", 5, 5)}
    assert entities(["POS", "POS", "O", "NEG"]) == {("POS", 0, 1), ("NEG", 3, 3)}
    m = token_metrics([["B-PER", "I-PER", "O"], ["O", "B-LOC"]], [["B-PER", "O", "O"], ["O", "B-LOC"]])
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["accuracy"] == pytest.approx(4 / 5)


def test_labels_go_to_the_first_token_of_each_word(tiny_model_dir, toy_token_data):
    from transformers import AutoTokenizer

    from sparsify.data import IGNORE, load_task_data
    from sparsify.recipe import DataConfig

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = DataConfig(task="token-classification", train_file=str(toy_token_data["train"]),
                     validation_file=str(toy_token_data["validation"]))
    data = load_task_data(cfg, tok)
    assert data.label_names == ["B-NEG", "B-POS", "O"]
    row = data.eval[0]
    words = json.loads(Path(toy_token_data["validation"]).read_text().splitlines()[0])
    labelled = [data.label_names[i] for i in row["labels"] if i != IGNORE]
    assert labelled == words["ner_tags"]  # one label per word ([CLS], [SEP] carry none)
    assert row["labels"][0] == IGNORE and row["labels"][-1] == IGNORE


def test_token_run_learns_exports_and_runs_like_torch(make_token_recipe, tiny_model_dir, tmp_path):
    recipe = make_token_recipe(teacher={"name_or_path": str(tiny_model_dir)},
                               training={"steps": 60, "eval_every": 30},
                               techniques=[
                                   {"kind": "pruning", "block": "4x1", "final_sparsity": 0.5, "start_step": 1,
                                    "end_step": 8, "update_every": 2},
                                   {"kind": "distillation", "task_weight": 1.0, "hidden": {"weight": 1.0},
                                    "minilm": {"weight": 1.0}},
                                   {"kind": "quantization", "start_step": 40, "freeze_after_steps": 4}])
    assert run_cli("train", recipe) == 0
    run = output_dir(recipe)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["metrics"]) == {"f1", "precision", "recall", "accuracy", "loss"}
    assert metrics["metrics"]["f1"] > 0.8, metrics["evals"]  # the tags follow the words: learnable
    assert metrics["conversion_parity"]["label_agreement"] >= 0.95
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["architectures"] == ["BertForTokenClassification"] and len(config["id2label"]) == 3

    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from sparsify.export import export
    from sparsify.runtime import SparseModel

    manifest = export(run, tmp_path / "art")["manifest"]
    assert manifest["head"] == "token-classification"
    from sparsify.techniques.quantization.convert import load_run_conversion

    texts = ["the movie was good great", "a dull plot", "the lovely film and the awful music was very sad"]
    enc = AutoTokenizer.from_pretrained(run / "model")(texts, padding=True, return_tensors="pt")
    got = SparseModel.from_pretrained(tmp_path / "art")(**{k: v.numpy() for k, v in enc.items()})
    model = AutoModelForTokenClassification.from_pretrained(run / "model").eval()
    load_run_conversion(model, run / "model")
    with torch.no_grad():
        ref = model(**enc).logits  # the run's int8 conversion in PyTorch
    real = enc["attention_mask"].bool()
    assert torch.equal(torch.as_tensor(got).argmax(-1)[real], ref.argmax(-1)[real])


@pytest.mark.parametrize("case,sections,expected", [
    ("length_adaptive", {"techniques": [{"kind": "length_adaptive"}]},
     "techniques[0].kind: length_adaptive drops tokens inside the encoder"),
    ("two columns", {"data": {"text_columns": ["tokens", "ner_tags"]}}, "data.text_columns: token-classification "
                                                                         "reads one column"),
    ("fit_samples", {"training": {"fit_samples": 8}}, "training.fit_samples: compares one predicted label"),
])
def test_token_recipe_errors(make_token_recipe, capsys, case, sections, expected):
    recipe = make_token_recipe(**sections)
    assert run_cli("train", recipe) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert len(lines) == 1 and expected in lines[0], err


def test_token_data_errors(make_token_recipe, toy_data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"tokens": ["a", "good", "film"], "ner_tags": ["O", "B-POS"]}) + "\n")
    recipe = make_token_recipe(data={"validation_file": str(bad)})
    assert run_cli("train", recipe) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "data.label_column: example 0 of the eval data: 'ner_tags' must be a list of one " \
        "label per word (3 words)" in lines[0], err
    recipe = make_token_recipe(data={"train_file": str(toy_data["train"]), "validation_file": str(toy_data["validation"])})
    assert run_cli("train", recipe) == 2
    assert "column 'tokens' not in the train data" in capsys.readouterr().err


def test_eval_command_scores_a_token_run_as_the_run_did(make_token_recipe, toy_token_data, tmp_path):
    recipe = make_token_recipe(training={"steps": 20})
    assert run_cli("train", recipe) == 0
    run = output_dir(recipe)
    assert run_cli("eval", run, "--task", "token-classification", "--file", toy_token_data["validation"],
                   "--max-length", 32, "-o", tmp_path / "m.json") == 0
    got = json.loads((tmp_path / "m.json").read_text())
    expected = json.loads((run / "metrics.json").read_text())["metrics"]
    for k in ("f1", "precision", "recall", "accuracy", "loss"):
        assert got[k] == pytest.approx(expected[k], abs=1e-6), k
