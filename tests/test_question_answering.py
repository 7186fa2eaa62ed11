"""Extractive question answering in the recipe trainer (``data.task: question-answering``): SQuAD-style answers
mapped to start / end tokens, SQuAD exact match / F1 with span decoding, distillation of the span distributions,
pruning and QAT on a QA head, export as a QA artifact whose runtime answers match PyTorch, one-line errors."""

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
def make_qa_recipe(make_recipe, toy_qa_data):
    def make(**sections):
        data = {"task": "question-answering", "train_file": str(toy_qa_data["train"]),
                "validation_file": str(toy_qa_data["validation"]), **sections.pop("data", {})}
        return make_recipe(data=data, **sections)

    return make


def test_squad_metrics_and_span_kl():
    from sparsify.evaluation import qa_metrics
    from sparsify.techniques.distillation.losses import span_kl

    m = qa_metrics(["The Eiffel tower", "in paris", "x"], [["eiffel tower"], ["Paris", "in Paris, France"], ["y"]])
    # EM: only "The Eiffel tower" (articles and case dropped); F1: 1, max(0.667, 0.8) against the two golds, 0
    assert m["exact_match"] == pytest.approx(1 / 3) and m["f1"] == pytest.approx(1.8 / 3)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 6, 2, generator=g)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    assert span_kl(t, t, 2.0, mask).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(3, 6, 2, generator=g)
    padded = s.clone()
    padded[0, 4:] = 100.0  # padding never counts
    assert span_kl(padded, t, 2.0, mask).item() == pytest.approx(span_kl(s, t, 2.0, mask).item(), abs=1e-5)
    assert span_kl(s, t, 2.0, mask).item() > 0


def test_answers_map_to_their_tokens(tiny_model_dir, toy_qa_data):
    from transformers import AutoTokenizer

    from sparsify.data import load_task_data
    from sparsify.recipe import DataConfig

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = DataConfig(task="question-answering", train_file=str(toy_qa_data["train"]),
                     validation_file=str(toy_qa_data["validation"]))
    data = load_task_data(cfg, tok)
    for split in (data.train, data.eval):
        row = split[0]
        rows = Path(toy_qa_data["train" if split is data.train else "validation"]).read_text().splitlines()
        answer = json.loads(rows[0])["answers"]["text"][0]
        assert tok.decode(row["input_ids"][row["start_positions"]:row["end_positions"] + 1]) == answer
    context, offsets, gold = data.answers[0]
    assert offsets[0] is None and gold == [json.loads(Path(toy_qa_data["validation"]).read_text().splitlines()[0])
                                            ["answers"]["text"][0]]


def test_qa_run_learns_exports_and_answers_like_torch(make_qa_recipe, tiny_model_dir, tmp_path):
    recipe = make_qa_recipe(teacher={"name_or_path": str(tiny_model_dir)},
                            training={"steps": 60, "eval_every": 30},
                            techniques=[
                                {"kind": "pruning", "block": "4x1", "final_sparsity": 0.5, "start_step": 1,
                                 "end_step": 8, "update_every": 2},
                                {"kind": "distillation", "task_weight": 1.0, "logits": {"weight": 0.1},
                                 "hidden": {"weight": 1.0}},
                                {"kind": "quantization", "start_step": 40, "freeze_after_steps": 4}])
    assert run_cli("train", recipe) == 0
    run = output_dir(recipe)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["metrics"]) == {"f1", "exact_match", "loss"}
    assert metrics["metrics"]["exact_match"] > 0.8, metrics["evals"]  # the answer is the one positive word
    assert metrics["conversion_parity"]["span_agreement"] >= 0.95
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["architectures"] == ["BertForQuestionAnswering"]

    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from sparsify.export import export
    from sparsify.runtime import SparseModel
    from sparsify.techniques.quantization.convert import load_converted, read_converted, trained_embeddings

    assert export(run, tmp_path / "art")["manifest"]["head"] == "question-answering"
    contexts = ["the movie was lovely and the music sad", "a dull plot and a great actor"]
    got = SparseModel.from_pretrained(tmp_path / "art").answer(["good"] * 2, contexts)
    model = AutoModelForQuestionAnswering.from_pretrained(run / "model").eval()
    load_converted(model, *read_converted(run / "model"), trained_embeddings(run / "model"))
    tok = AutoTokenizer.from_pretrained(run / "model")
    for context, answer in zip(contexts, got):
        enc = tok("good", context, return_offsets_mapping=True, return_tensors="pt")
        offsets = enc.pop("offset_mapping")[0]
        with torch.no_grad():
            out = model(**enc)
        allowed = torch.tensor([s == 1 for s in enc.sequence_ids(0)])
        s = out.start_logits[0].masked_fill(~allowed, -1e9).softmax(-1)
        e = out.end_logits[0].masked_fill(~allowed, -1e9).softmax(-1)
        scores = (s[:, None] * e[None, :]).triu()
        i, j = divmod(int(scores.argmax()), scores.shape[1])
        assert context[int(offsets[i][0]):int(offsets[j][1])] == answer["answer"]


def test_qa_errors(make_qa_recipe, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "good", "context": "a good film",
                               "answers": {"text": ["good"], "answer_start": [5]}}) + "\n")
    for sections, expected in (
            ({"data": {"validation_file": str(bad)}}, "data.label_column: example 0 of the eval data: answer 'good' is "
                                                      "not at character 5 of its context"),
            ({"techniques": [{"kind": "length_adaptive"}]}, "techniques[0].kind: length_adaptive drops tokens inside "
                                                            "the encoder, and a question-answering head"),
            ({"data": {"text_columns": ["context"]}}, "data.text_columns: question-answering reads two columns")):
        recipe = make_qa_recipe(**sections)
        assert run_cli("train", recipe) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.strip().splitlines() if line.startswith("error")]
        assert len(lines) == 1 and expected in lines[0], err


def test_eval_command_scores_a_qa_run_as_the_run_did(make_qa_recipe, toy_qa_data, tmp_path, capsys):
    recipe = make_qa_recipe(training={"steps": 20})
    assert run_cli("train", recipe) == 0
    run = output_dir(recipe)
    assert run_cli("eval", run, "--task", "question-answering", "--file", toy_qa_data["validation"],
                   "--max-length", 32, "-o", tmp_path / "m.json") == 0
    got = json.loads((tmp_path / "m.json").read_text())
    expected = json.loads((run / "metrics.json").read_text())["metrics"]
    assert got["examples"] == 64 and got["f1"] == pytest.approx(expected["f1"], abs=1e-9)
    assert got["exact_match"] == pytest.approx(expected["exact_match"], abs=1e-9)
    assert run_cli("eval", run, "--task", "question-answering") == 2
    assert "give the data, --file" in capsys.readouterr().err
