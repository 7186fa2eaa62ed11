"""Embedding distillation (``data.task: embedding``): a sentence-embedding student learns its teacher's pooled
embeddings on unlabelled text through the one training loop; the run directory exports as an embeddings artifact;
``teacher_cosine`` / ``pair_roc_auc`` from the run, ``sparsify eval`` and the CPU runtime agree; bad input gives one
error line. Tiny models only (tests/conftest.py); the resume test is in test_train.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sparsify.cli import main

EMBEDDING_DATA = {"task": "embedding", "max_length": 32}


def run_cli(*args) -> int:
    return main(list(map(str, args)) + (["--no-progress"] if args[0] == "train" else []))


def output_dir(recipe_path: Path) -> Path:
    return Path(yaml.safe_load(recipe_path.read_text())["output_dir"])


@pytest.fixture
def make_embedding_recipe(make_recipe, tiny_st_dir):
    """make_recipe for the tiny sentence-transformers model, its own teacher, task embedding."""

    def make(distillation=None, techniques=(), **sections):
        data = {**EMBEDDING_DATA, **sections.pop("data", {})}
        distill = {"kind": "distillation", "embedding": {"weight": 1.0}} if distillation is None else distillation
        sections = {"model": {"name_or_path": str(tiny_st_dir)}, "teacher": {"name_or_path": str(tiny_st_dir)},
                    **sections}
        return make_recipe(data=data, techniques=[*techniques, distill] if distill else list(techniques), **sections)

    return make


def _texts_file(path: Path, csv: Path) -> Path:
    import pandas as pd

    path.write_text("\n".join(pd.read_csv(csv)["sentence"]) + "\n\n", encoding="utf-8")  # a blank line: skipped
    return path


@pytest.fixture(scope="module")
def compressed_run(tiny_st_dir, toy_data, toy_pairs, tmp_path_factory):
    """A finished run: pruning 50% 4x1 + embedding/hidden/MiniLM distillation + LengthDrop + QAT, on .txt files."""
    tmp = tmp_path_factory.mktemp("emb-run")
    files = {"train": _texts_file(tmp / "train.txt", toy_data["train"]),
             "validation": _texts_file(tmp / "validation.txt", toy_data["validation"])}
    recipe = dict(output_dir=str(tmp / "run"), model={"name_or_path": str(tiny_st_dir)},
                         teacher={"name_or_path": str(tiny_st_dir)},
                         data={**EMBEDDING_DATA, "text_columns": ["text"], "pairs": {"file": str(toy_pairs)},
                               "train_file": str(files["train"]), "validation_file": str(files["validation"])},
                         training={"steps": 10, "eval_every": 5, "batch_size": 16, "learning_rate": 3e-3,
                                   "seed": 7, "threads": 1},
                         techniques=[
                             {"kind": "pruning", "block": "4x1", "final_sparsity": 0.5, "start_step": 1,
                              "end_step": 4, "update_every": 2},
                             {"kind": "distillation", "embedding": {"weight": 1.0, "loss": "mse"},
                              "hidden": {"weight": 1.0}, "minilm": {"weight": 1.0}},
                             {"kind": "length_adaptive", "length_drop_ratio_bound": 0.3, "num_sandwich": 1,
                              "start_step": 2},
                             {"kind": "quantization", "start_step": 5, "freeze_after_steps": 2}])
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert run_cli("train", path) == 0
    return tmp / "run", files["validation"]


def test_compressed_run_reports_and_exports_embeddings(compressed_run, tiny_st_dir, toy_pairs, tmp_path, capsys):
    run, held_out = compressed_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "embedding"
    assert set(metrics["metrics"]) == {"teacher_cosine", "teacher_cosine_min", "pair_roc_auc"}
    assert 0.5 < metrics["metrics"]["teacher_cosine"] < 1.0  # pruned and quantized: close to, not equal to it
    assert metrics["teacher_metrics"]["teacher_cosine"] == pytest.approx(1.0)
    assert 0.0 <= metrics["teacher_metrics"]["pair_roc_auc"] <= 1.0
    assert [e["step"] for e in metrics["evals"]] == [5, 10]
    assert metrics["conversion_parity"]["min_cosine"] > 0.9999
    report = json.loads((run / "sparsity.json").read_text())
    assert report["total"]["follows_block"] and report["total"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    model_dir = run / "model"
    for name in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json", "quantization.json"):
        assert (model_dir / name).is_file(), name
    from safetensors.torch import load_file

    weights = load_file(model_dir / "model.safetensors")  # a bare encoder, named as sentence-transformers stores it
    assert "encoder.layer.0.attention.self.query.weight" in weights and not any(k.startswith("bert.") for k in weights)
    quant = json.loads((model_dir / "quantization.json").read_text())
    assert "encoder.layer.0.attention.self.query" in quant["modules"]

    from sparsify.export import export

    manifest = export(run, tmp_path / "art")["manifest"]
    assert manifest["head"] == "embeddings" and manifest["pooling"]["modes"] == ["mean"]
    assert manifest["pooling"]["normalize"] is True
    # the artifact (int8, 50% sparse) on the CPU runtime scores what the run reported for its int8 conversion
    for model in (run, tmp_path / "art"):
        assert run_cli("eval", model, "--task", "embedding", "--teacher", tiny_st_dir, "--file", held_out,
                       "--pairs-file", toy_pairs, "--max-length", 32, "-o", tmp_path / "m.json") == 0
        got = json.loads((tmp_path / "m.json").read_text())
        assert got["texts"] == 64 and got["pairs"] == 48
        assert got["teacher_cosine"] == pytest.approx(metrics["metrics"]["teacher_cosine"], abs=1e-5)
        assert got["pair_roc_auc"] == pytest.approx(metrics["metrics"]["pair_roc_auc"], abs=0.02)
        assert got["teacher_pair_roc_auc"] == pytest.approx(metrics["teacher_metrics"]["pair_roc_auc"], abs=1e-9)
    assert got["backend"] == "sparsify runtime"
    capsys.readouterr()


def test_distillation_pulls_a_different_student_towards_the_teacher(make_embedding_recipe, tiny_st_dir, toy_data,
                                                                    tmp_path):
    """A student with other weights (same shapes and tokenizer) learns the teacher's embeddings: its mean cosine to
    the teacher on held-out text rises well above where it started."""
    from transformers import BertModel

    student = tmp_path / "student"
    shutil.copytree(tiny_st_dir, student)
    torch.manual_seed(123)
    BertModel(BertModel.from_pretrained(tiny_st_dir).config).save_pretrained(student)  # fresh random weights
    before_file = tmp_path / "before.json"
    assert run_cli("eval", student, "--task", "embedding", "--teacher", tiny_st_dir, "--file",
                   toy_data["validation"], "--max-length", 32, "-o", before_file) == 0
    before = json.loads(before_file.read_text())["teacher_cosine"]
    recipe = make_embedding_recipe(model={"name_or_path": str(student)},
                                   training={"steps": 40, "learning_rate": 3e-3, "eval_every": 20})
    assert run_cli("train", recipe) == 0
    evals = json.loads((output_dir(recipe) / "metrics.json").read_text())["evals"]
    assert evals[-1]["teacher_cosine"] > before + 0.5 * (1 - before), (before, evals)


def test_student_without_pooling_takes_the_teachers(make_embedding_recipe, tiny_model_dir, tmp_path):
    """A plain encoder (no modules.json) distilled from a sentence-transformers teacher is saved with the teacher's
    pooling, so that it exports as embeddings."""
    recipe = make_embedding_recipe(model={"name_or_path": str(tiny_model_dir)}, training={"steps": 2})
    assert run_cli("train", recipe) == 0
    model_dir = output_dir(recipe) / "model"
    assert json.loads((model_dir / "modules.json").read_text())[1]["path"] == "1_Pooling"
    from sparsify.export import export

    assert export(model_dir, tmp_path / "art")["manifest"]["head"] == "embeddings"


@pytest.mark.parametrize("modes", [["mean"], ["cls"], ["max"], ["mean_sqrt_len_tokens"], ["cls", "mean"]])
def test_embedder_matches_sentence_transformers(tiny_st_dir, tmp_path, modes):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from sparsify.sentence import load_embedder

    path = tmp_path / "st"
    shutil.copytree(tiny_st_dir, path)
    modules = json.loads((path / "modules.json").read_text())
    if modes != ["mean"]:  # other modes without Normalize
        modules = modules[:2]
        shutil.rmtree(path / "2_Normalize")
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                "pooling_mode": modes}))
    texts = ["the movie was good", "a dull plot and a sad actor", "great", "the story is very boring and ugly"]
    ref = SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_numpy=True)
    model = load_embedder(str(path)).eval()
    enc = AutoTokenizer.from_pretrained(path)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = model(**enc).logits.numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_token_dropping_pools_the_tokens_that_reached_the_last_layer(tiny_st_dir):
    from transformers import AutoTokenizer

    from sparsify.sentence import load_embedder, pool
    from sparsify.techniques.length_adaptive.inference import forward_with_lengths, length_adaptive

    model = load_embedder(str(tiny_st_dir)).eval()
    enc = dict(AutoTokenizer.from_pretrained(tiny_st_dir)(
        ["the movie was very good and the music was lovely", "a dull plot"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        full = model(**enc).logits
        assert torch.equal(forward_with_lengths(model, enc, [1.0, 1.0]).logits, full)
        dropped = forward_with_lengths(model, enc, [0.5, 0.5]).logits
        with length_adaptive(model, [0.5, 0.5], enc["attention_mask"]) as state:
            last = model._encoder(**enc).last_hidden_state
        assert state.dropped and last.shape[1] < enc["input_ids"].shape[1]
        expected = pool(last, state.mask, ["mean"], True)
    torch.testing.assert_close(dropped, expected)
    assert not torch.allclose(dropped, full)
    assert getattr(model, "_length_adaptive_state") is None  # nothing left behind after the pass


def test_losses_and_roc_auc():
    from sklearn.metrics import roc_auc_score

    from sparsify.sentence import roc_auc
    from sparsify.techniques.distillation.losses import embedding_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    cos = torch.nn.functional.cosine_similarity(s, t, dim=-1)
    assert embedding_loss(s, t, "cosine").item() == pytest.approx((1 - cos).mean().item(), abs=1e-6)
    assert embedding_loss(s, 3 * s, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert embedding_loss(s, t, "mse").item() == pytest.approx(((s - t) ** 2).mean().item(), abs=1e-6)
    scores, labels = [0.1, 0.4, 0.4, 0.35, 0.8, 0.9, 0.2], [0, 0, 1, 1, 1, 1, 0]
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert np.isnan(roc_auc([0.1, 0.2], [1, 1]))


def _bad_pairs(tmp_path, toy_pairs):
    import pandas as pd

    df = pd.read_csv(toy_pairs)
    df.loc[2, "label"] = -1
    df.to_csv(tmp_path / "bad-pairs.csv", index=False)
    return str(tmp_path / "bad-pairs.csv")


BAD_EMBEDDING_INPUTS = {
    "no text column": (lambda mk, tmp, d: mk(data={"text_columns": ["review"]}),
                       "data.text_columns: column 'review' not in the train data"),
    "metric needs labels": (lambda mk, tmp, d: mk(training={"metric_for_best": "pair_roc_auc", "select_best": True}),
                            "training.metric_for_best: pair_roc_auc needs labelled pairs"),
    "teacher without pooling": (lambda mk, tmp, d: _with(mk(), teacher={"name_or_path": str(d["tiny"])}),
                                "teacher.name_or_path: teacher '" ),
    "logits term": (lambda mk, tmp, d: mk(distillation={"kind": "distillation", "logits": {"weight": 1.0}}),
                    "techniques[0].logits: compares class distributions"),
    "no distillation": (lambda mk, tmp, d: mk(distillation={}), "techniques: an embedding task has no labels"),
    "taylor scores": (lambda mk, tmp, d: mk(techniques=[{"kind": "pruning", "final_sparsity": 0.5, "end_step": 4,
                                                         "score": "taylor"}]),
                      "techniques[0].score: taylor scores need the gradient of a task loss"),
    "non-binary pair labels": (lambda mk, tmp, d: mk(data={"pairs": {"file": _bad_pairs(tmp, d["pairs"])}}),
                               "data.pairs.label_column: label -1 is not binary"),
    "pairs without labels": (lambda mk, tmp, d: mk(data={"pairs": {"file": str(d["pairs"]), "label_column": "y"}}),
                             "data.pairs.label_column: column 'y' not in the pairs"),
    "num_labels": (lambda mk, tmp, d: mk(model={"num_labels": 2}), "model.num_labels: an embedding model has no classes"),
}


def _with(recipe_path: Path, **sections) -> Path:
    data = yaml.safe_load(recipe_path.read_text())
    data.update(sections)
    recipe_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return recipe_path


@pytest.mark.parametrize("case", list(BAD_EMBEDDING_INPUTS))
def test_bad_embedding_input_one_line_error(case, make_embedding_recipe, tiny_model_dir, toy_pairs, tmp_path, capsys):
    make, expected = BAD_EMBEDDING_INPUTS[case]
    recipe = make(make_embedding_recipe, tmp_path, {"tiny": tiny_model_dir, "pairs": toy_pairs})
    assert run_cli("train", recipe) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]) and expected in lines[0], err
    assert "Traceback" not in err and not output_dir(recipe).exists()


def test_embedding_term_needs_an_embedding_task(make_recipe, tiny_model_dir, capsys):
    recipe = make_recipe(teacher={"name_or_path": str(tiny_model_dir)},
                         techniques=[{"kind": "distillation", "embedding": {"weight": 1.0}}])
    assert run_cli("train", recipe) == 2
    assert "techniques[0].embedding: compares pooled sentence embeddings: it needs data.task: embedding" in \
        capsys.readouterr().err
    recipe = make_recipe(data={"pairs": {"file": "x.csv"}})
    assert run_cli("train", recipe) == 2
    assert "data.pairs: scores sentence embeddings: it needs task: embedding" in capsys.readouterr().err


def test_eval_embedding_needs_a_teacher_or_pairs(tiny_st_dir, capsys):
    assert run_cli("eval", tiny_st_dir, "--task", "embedding") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --task embedding: give --teacher") and len(err.strip().splitlines()) == 1
    assert run_cli("eval", tiny_st_dir, "--task", "embedding", "--teacher", tiny_st_dir) == 2
    assert "give the held-out texts, --file or --config" in capsys.readouterr().err


def test_mean_pooled_student_with_a_length_config_embeds_with_it(make_embedding_recipe, tmp_path):
    """A LengthDrop run of a mean-pooled embedder with a length_config: the artifact carries the configuration,
    'sparsify embed' runs with it (pooling the tokens that reached the last layer, as the PyTorch student does)
    and --full-length runs without it."""
    from transformers import AutoTokenizer

    from sparsify.export import export
    from sparsify.sentence import load_embedder
    from sparsify.techniques.length_adaptive.inference import forward_with_lengths

    config = [0.6, 0.5]
    recipe = make_embedding_recipe(training={"steps": 3},
                                   techniques=[{"kind": "length_adaptive", "length_config": config}])
    assert run_cli("train", recipe) == 0
    model_dir = output_dir(recipe) / "model"
    manifest = export(model_dir, tmp_path / "art")["manifest"]
    assert manifest["pooling"]["modes"] == ["mean"] and manifest["length_config"]["lengths"] == config
    texts = ["the movie was very good and the music was lovely", "a dull plot and a sad actor", "great"]
    student = load_embedder(str(model_dir)).eval()
    enc = dict(AutoTokenizer.from_pretrained(model_dir)(texts, padding=True, return_tensors="pt"))
    with torch.no_grad():
        dropped, full = forward_with_lengths(student, enc, config).logits.numpy(), student(**enc).logits.numpy()
    for flag, ref in (([], dropped), (["--full-length"], full)):
        out = tmp_path / f"e{len(flag)}.npy"
        assert run_cli("embed", tmp_path / "art", "-o", out, *flag, *[a for t in texts for a in ("--text", t)]) == 0
        np.testing.assert_allclose(np.load(out), ref, atol=1e-5)
    assert np.abs(dropped - full).max() > 1e-2


def test_search_chooses_a_length_configuration_for_an_embedding_run(make_embedding_recipe, tmp_path):
    """'sparsify search' on a LengthDrop embedding run scores configurations by the cosine to the teacher's
    embeddings (full length: what the run reported), writes the chosen one, and the artifact embeds with it."""
    from sparsify.export import export
    from sparsify.runtime import SparseModel
    from sparsify.techniques.length_adaptive.search import search_run

    recipe = make_embedding_recipe(training={"steps": 3},
                                   techniques=[{"kind": "length_adaptive", "length_drop_ratio_bound": 0.3}])
    assert run_cli("train", recipe) == 0
    run = output_dir(recipe)
    doc = search_run(run, 0.6, population=4, generations=2, seed=0, log=None)
    assert doc["metric"] == "teacher_cosine" and doc["task"] == "embedding"
    reported = json.loads((run / "metrics.json").read_text())["metrics"]["teacher_cosine"]
    full = [c for c in doc["evaluated"] if all(r == 1.0 for r in c["length_config"])]
    assert full and full[0]["teacher_cosine"] == pytest.approx(reported, abs=1e-6)
    chosen = doc["chosen"]
    assert chosen["flops_fraction"] <= 0.6 and 0.0 < chosen["teacher_cosine"] <= 1.0 + 1e-9
    assert any(r < 1.0 for r in chosen["length_config"])
    saved = json.loads((run / "model" / "length_config.json").read_text())
    assert saved["length_config"] == chosen["length_config"]
    manifest = export(run, tmp_path / "art")["manifest"]
    assert manifest["length_config"]["lengths"] == chosen["length_config"]
    rt = SparseModel.from_pretrained(tmp_path / "art")
    texts = ["the movie was very good and the music was lovely", "a dull plot and a sad actor"]
    assert not np.allclose(rt.embed(texts), rt.embed(texts, length_config=None), atol=1e-4)


def test_fewer_layers_student_exports_and_runs_like_torch(make_embedding_recipe, tmp_path):
    """model.layers: a 1-layer embedding student (hidden states mapped to the teacher's last layer) exports as a
    1-layer embeddings artifact whose runtime embeddings are the PyTorch student's."""
    from transformers import AutoTokenizer

    from sparsify.export import export
    from sparsify.runtime import SparseModel
    from sparsify.sentence import load_embedder

    recipe = make_embedding_recipe(model={"layers": [1]}, training={"steps": 3},
                                   distillation={"kind": "distillation", "embedding": {"weight": 1.0},
                                                 "hidden": {"weight": 1.0}})
    assert run_cli("train", recipe) == 0
    model_dir = output_dir(recipe) / "model"
    assert json.loads((model_dir / "config.json").read_text())["num_hidden_layers"] == 1
    manifest = export(model_dir, tmp_path / "art")["manifest"]
    assert manifest["head"] == "embeddings"
    texts = ["the movie was good", "a dull plot and a sad actor", "great"]
    student = load_embedder(str(model_dir)).eval()
    enc = AutoTokenizer.from_pretrained(model_dir)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = student(**enc).logits.numpy()
    np.testing.assert_allclose(SparseModel.from_pretrained(tmp_path / "art").embed(texts), ref, atol=1e-5)
