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
    window = data.answers[0]
    assert window.example == 0 and window.offsets[0] is None
    first = json.loads(Path(toy_qa_data["validation"]).read_text().splitlines()[0])
    assert window.gold == [first["answers"]["text"][0]]
    assert len(data.eval) == len(data.answers) == 64  # short contexts: one window each


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
    from sparsify.techniques.quantization.convert import load_run_conversion

    assert export(run, tmp_path / "art")["manifest"]["head"] == "question-answering"
    contexts = ["the movie was lovely and the music sad", "a dull plot and a great actor"]
    got = SparseModel.from_pretrained(tmp_path / "art").answer(["good"] * 2, contexts)
    model = AutoModelForQuestionAnswering.from_pretrained(run / "model").eval()
    load_run_conversion(model, run / "model")
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


def test_qa_errors(make_qa_recipe, make_recipe, long_qa_data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "good", "context": "a good film",
                               "answers": {"text": ["good"], "answer_start": [5]}}) + "\n")
    long_question = tmp_path / "long-question.jsonl"
    long_question.write_text(json.dumps({"question": " ".join(["good"] * 30), "context": "a good film",
                                         "answers": {"text": ["good"], "answer_start": [2]}}) + "\n")
    # max_length 32: the question "good" (1 token) and [CLS] [SEP] [SEP] leave 28 tokens of context per window
    for sections, expected in (
            ({"data": {"doc_stride": 32}}, "data.doc_stride: 32 must be smaller than max_length (32) minus the "
                                           "question and special tokens: give 0 to at most 31"),
            ({"data": {"doc_stride": 28, **long_qa_data}}, "data.doc_stride: 28 must be smaller than the 28 tokens "
                                                           "of context a window holds"),
            ({"data": {"validation_file": str(long_question)}}, "data.max_length: 32 leaves no room for the context: "
                                                                "the longest question (example 0 of the eval data, "
                                                                "30 tokens)"),
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
        assert "give 0 to 27" in lines[0] or "doc_stride: 28" not in expected
    assert run_cli("train", make_recipe(data={"doc_stride": 4})) == 2  # a classification task has no windows
    assert "data.doc_stride: splits question-answering contexts into windows" in capsys.readouterr().err


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


# -- long contexts: a sliding window ------------------------------------------------------------------------------
# max_length 32 with the question "good" (1 token) and [CLS] [SEP] [SEP] leaves 28 context tokens per window; with
# doc_stride 8 the windows start at context tokens 0, 20, 40, 60 (the toy tokenizer: one token per word)
LONG = {"max_length": 32, "doc_stride": 8}
FILLER = ["the", "a", "movie", "film", "plot", "actor", "story", "was", "is", "very", "quite", "and", "scene", "music"]


def _long_example(answer: str, at: int, words: int, seed: int) -> dict:
    import random

    rng = random.Random(seed)
    tokens = rng.choices(FILLER, k=words)
    tokens[at] = answer
    context = " ".join(tokens)
    start = len(" ".join(tokens[:at])) + 1
    return {"question": "good", "context": context, "answers": {"text": [answer], "answer_start": [start]}}


@pytest.fixture(scope="module")
def long_qa_data(tmp_path_factory) -> dict[str, str]:
    """Three examples: the answer only in the second of four windows (context token 32), a short context (one
    window), the answer only in the last window (token 69)."""
    rows = [_long_example("superb", 32, 70, 1), {"question": "good", "context": "the film was fine",
                                                 "answers": {"text": ["fine"], "answer_start": [13]}},
            _long_example("lovely", 69, 70, 2)]
    path = tmp_path_factory.mktemp("long-qa") / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"train_file": str(path), "validation_file": str(path)}


def test_long_contexts_become_windows_labelled_with_the_answer(tiny_model_dir, long_qa_data):
    from transformers import AutoTokenizer

    from sparsify.data import load_task_data
    from sparsify.recipe import DataConfig

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = load_task_data(DataConfig(task="question-answering", **long_qa_data, **LONG), tok)
    examples = [w.example for w in data.answers]
    assert examples == [0, 0, 0, 0, 1, 2, 2, 2, 2]  # features > examples: 4 + 1 + 4 windows
    assert len(data.train) == len(data.eval) == 9 and data.train["idx"] == list(range(9))
    for split in (data.train, data.eval):
        labelled = [(w, split[w]["start_positions"], split[w]["end_positions"]) for w in range(9)
                    if split[w]["start_positions"] != 0]
        # only the window that holds the answer points at it, every other one at [CLS]
        assert [w for w, _, _ in labelled] == [1, 4, 8], labelled
        for (w, start, end), answer in zip(labelled, ["superb", "fine", "lovely"]):
            assert start == end and tok.decode(split[w]["input_ids"][start:end + 1]) == answer
            window = data.answers[w]
            assert window.context[window.offsets[start][0]:window.offsets[end][1]] == answer
        assert all(split[w]["end_positions"] == 0 for w in range(9) if w not in (1, 4, 8))
    assert all(len(ids) <= 32 for ids in data.train["input_ids"])


class _Pointer(torch.nn.Module):
    """A stand-in QA model whose start and end logits are high on one word's token, flat elsewhere."""

    def __init__(self, token_ids: list[int]):
        super().__init__()
        self.token_ids = torch.tensor(token_ids)

    def forward(self, input_ids, **_):
        from types import SimpleNamespace

        logits = 8.0 * torch.isin(input_ids, self.token_ids).float()
        return SimpleNamespace(start_logits=logits, end_logits=logits.clone(), loss=torch.tensor(0.0))


def test_evaluation_keeps_the_best_window_of_each_example(tiny_model_dir, long_qa_data):
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    from sparsify.data import collator, load_task_data
    from sparsify.evaluation import evaluate_qa
    from sparsify.recipe import DataConfig

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = load_task_data(DataConfig(task="question-answering", **long_qa_data, **LONG), tok)
    loader = DataLoader(data.eval, batch_size=4, collate_fn=collator(tok, "question-answering"))
    spans = []
    found = evaluate_qa(_Pointer(tok.convert_tokens_to_ids(["superb", "fine", "lovely"])), loader, data.answers,
                        logits_out=spans)
    # per example, not per window: all three found (the answers sit in windows 2 of 4, 1 of 1 and 4 of 4)
    assert found["exact_match"] == 1.0 and found["f1"] == 1.0
    assert torch.cat(spans).shape == (9, 2)
    missed = evaluate_qa(_Pointer(tok.convert_tokens_to_ids(["fine"])), loader, data.answers)
    assert missed["exact_match"] == pytest.approx(1 / 3)


def _torch_answers(model, tok, questions, contexts, max_length, stride, max_answer_length=30):
    """The reference: windows from the transformers tokenizer, per window the span maximising p(start) p(end) over
    the context tokens (softmax over them), per question the best window's span; with its window."""
    enc = tok(questions, contexts, truncation="only_second", max_length=max_length, stride=stride,
              return_overflowing_tokens=True, return_offsets_mapping=True, padding=True, return_tensors="pt")
    owners, offsets = enc.pop("overflow_to_sample_mapping").tolist(), enc.pop("offset_mapping")
    with torch.no_grad():
        out = model(**enc)
    best = [None] * len(questions)
    for w, k in enumerate(owners):
        allowed = torch.tensor([s == 1 for s in enc.sequence_ids(w)])
        s = out.start_logits[w].double().masked_fill(~allowed, float("-inf")).softmax(-1)
        e = out.end_logits[w].double().masked_fill(~allowed, float("-inf")).softmax(-1)
        scores = (s[:, None] * e[None, :]).triu().tril(max_answer_length - 1)
        i, j = divmod(int(scores.argmax()), scores.shape[1])
        if best[k] is None or float(scores[i, j]) > best[k]["score"]:
            cs, ce = int(offsets[w][i][0]), int(offsets[w][j][1])
            best[k] = {"answer": contexts[k][cs:ce], "start": cs, "end": ce, "score": float(scores[i, j]), "window": w}
    first_window = [owners.index(k) for k in range(len(questions))]
    return best, first_window


def test_runtime_answers_long_contexts_like_torch_with_windows(tiny_model_dir, long_qa_data, tmp_path, capsys):
    import shutil

    from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

    from sparsify.errors import SparsifyError
    from sparsify.export import export
    from sparsify.runtime import SparseModel

    torch.manual_seed(3)
    model = BertForQuestionAnswering(BertConfig.from_pretrained(tiny_model_dir, num_labels=2)).eval()
    model.save_pretrained(tmp_path / "qa")
    for f in tiny_model_dir.glob("*token*"):
        shutil.copyfile(f, tmp_path / "qa" / f.name)
    export(tmp_path / "qa", tmp_path / "art")
    rt = SparseModel.from_pretrained(tmp_path / "art", threads=1)
    tok = AutoTokenizer.from_pretrained(tmp_path / "qa")
    rows = [json.loads(line) for line in Path(long_qa_data["validation_file"]).read_text().splitlines()]
    contexts = [r["context"] for r in rows] + [_long_example("great", 30, 40, s)["context"] for s in range(3, 9)]
    questions = ["good"] * len(contexts)
    want, first_window = _torch_answers(model, tok, questions, contexts, 32, 8)
    got = rt.answer(questions, contexts, max_length=32, doc_stride=8, batch_size=3)
    assert [{k: v for k, v in a.items() if k != "score"} for a in got] == \
        [{k: v for k, v in a.items() if k not in ("score", "window")} for a in want]
    assert [a["score"] for a in got] == pytest.approx([a["score"] for a in want], abs=1e-4)
    # the comparison reaches past the first window: some best spans lie only in the second one (characters after
    # the end of the first window, context token 28 onwards)
    later = [k for k, a in enumerate(want) if a["window"] == first_window[k] + 1 and
             a["start"] > len(" ".join(contexts[k].split()[:28]))]
    assert later, want
    assert rt.predict(list(zip(questions, contexts)), max_length=32, doc_stride=8) == got
    lines = tmp_path / "qa.txt"
    lines.write_text("".join(f"{q}\t{c}\n" for q, c in zip(questions, contexts)))
    capsys.readouterr()
    assert run_cli("predict", tmp_path / "art", "--file", lines, "--max-length", 32, "--doc-stride", 8, "--json") == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["answer"] for p in printed] == [a["answer"] for a in got]
    with pytest.raises(SparsifyError, match=r"doc_stride 28 must be smaller than the 28 tokens of context a window "
                                            r"holds .*: give 0 to 27"):
        rt.answer(questions, contexts, max_length=32, doc_stride=28)


def test_qa_run_trains_and_evaluates_on_windows(make_qa_recipe, tiny_model_dir, long_qa_data, tmp_path, capsys):
    """A run on long contexts: every window trains (teacher outputs cached per window), evaluation and 'sparsify
    eval' count examples, not windows."""
    recipe = make_qa_recipe(data={**long_qa_data, **LONG}, training={"steps": 4, "batch_size": 4},
                            teacher={"name_or_path": str(tiny_model_dir)},
                            techniques=[{"kind": "distillation", "logits": {"weight": 1.0}, "cache_teacher": True}])
    assert run_cli("train", recipe) == 0
    metrics = json.loads((output_dir(recipe) / "metrics.json").read_text())["metrics"]
    assert round(metrics["exact_match"] * 3) == pytest.approx(metrics["exact_match"] * 3)  # a multiple of 1/3
    assert run_cli("eval", output_dir(recipe), "--task", "question-answering", "--file",
                   long_qa_data["validation_file"], "--max-length", 32, "-o", tmp_path / "m.json") == 0
    got = json.loads((tmp_path / "m.json").read_text())
    assert got["examples"] == 3 and got["exact_match"] == pytest.approx(metrics["exact_match"], abs=1e-9)
    assert run_cli("eval", output_dir(recipe), "--task", "question-answering", "--file",
                   long_qa_data["validation_file"], "--max-length", 32, "--doc-stride", 28) == 2
    assert "data.doc_stride: 28 must be smaller than the 28 tokens" in capsys.readouterr().err


def test_an_exported_qa_run_reads_contexts_in_its_training_windows(make_qa_recipe, long_qa_data, tmp_path,
                                                                    monkeypatch):
    """The artifact of a QA run records its data.max_length and data.doc_stride (manifest qa_windows); answer()
    uses them unless told otherwise (another max_length takes that length's default stride)."""
    from sparsify.export import export
    from sparsify.runtime import SparseModel

    recipe = make_qa_recipe(data={**long_qa_data, "max_length": 32, "doc_stride": 6}, training={"steps": 2})
    assert run_cli("train", recipe) == 0
    export(output_dir(recipe), tmp_path / "art")
    manifest = json.loads((tmp_path / "art" / "sparsify.json").read_text())
    assert manifest["qa_windows"] == {"max_length": 32, "doc_stride": 6}
    rt = SparseModel.from_pretrained(tmp_path / "art", threads=1)
    seen = []
    original = SparseModel._answer_batch

    def spy(self, pairs, max_length, stride, max_answer_length):
        seen.append((max_length, stride))
        return original(self, pairs, max_length, stride, max_answer_length)

    monkeypatch.setattr(SparseModel, "_answer_batch", spy)
    rows = [json.loads(line) for line in Path(long_qa_data["validation_file"]).read_text().splitlines()]
    rt.answer([r["question"] for r in rows], [r["context"] for r in rows])
    rt.answer([r["question"] for r in rows], [r["context"] for r in rows], max_length=48)
    rt.answer([r["question"] for r in rows], [r["context"] for r in rows], doc_stride=4)
    assert seen == [(32, 6), (48, 12), (32, 4)]
