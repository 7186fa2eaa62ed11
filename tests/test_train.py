"""The training spine end to end on a tiny model: run directory contents, resume equivalence, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sparsify.cli import main


def run_cli(*args) -> int:
    return main(list(map(str, args)) + ["--no-progress"] if args[0] == "train" else list(map(str, args)))


def output_dir(recipe_path: Path) -> Path:
    return Path(yaml.safe_load(recipe_path.read_text())["output_dir"])


def test_end_to_end_run_directory(make_recipe):
    recipe = make_recipe(training={"steps": 96, "eval_every": 32, "save_every": 32, "keep_checkpoints": 2,
                                   "select_best": True})
    assert run_cli("train", recipe) == 0
    run = output_dir(recipe)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 96 and metrics["steps_per_epoch"] == 12  # 192 examples / 16
    assert metrics["threads"] >= 1 and metrics["cpu"]["cpu_count"] >= 1  # wall times name their machine
    assert [e["step"] for e in metrics["evals"]] == [32, 64, 96]
    assert metrics["metrics"]["accuracy"] > 0.8  # the toy task is learnable: far above chance
    assert metrics["best"]["accuracy"] == max(e["accuracy"] for e in metrics["evals"])
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-000064", "step-000096"]
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["training"]["batch_size"] == 16 and resolved["training"]["lr_schedule"] == "linear"
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "tokenizer.json").is_file()
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(run / "model")
    assert model.config.num_labels == 2


def test_select_best_keeps_the_last_model_beside_the_chosen_one(make_recipe):
    """select_best puts the best evaluation in model/ and keeps the last step's model in last/ (the unselected
    reading, and where a next stage starts without a choice made on the eval split)."""
    recipe = make_recipe(training={"steps": 12, "eval_every": 4, "save_every": 4, "select_best": True,
                                   "learning_rate": 0.3, "seed": 1})  # diverges after the first evaluation
    assert run_cli("train", recipe) == 0
    run = output_dir(recipe)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model_step"] != metrics["optimizer_steps"] and metrics["last_model"] == "last"
    last = load_file(run / "last" / "model.safetensors")
    final = load_file(run / "checkpoints" / "step-000012" / "model.safetensors")
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in last)
    chosen = load_file(run / "model" / "model.safetensors")
    assert not all(torch.equal(chosen[k], last[k]) for k in last)
    assert (run / "last" / "tokenizer.json").is_file()

    plain = make_recipe(training={"steps": 12, "eval_every": 4})  # without select_best: model/ is the last step
    assert run_cli("train", plain) == 0
    assert json.loads((output_dir(plain) / "metrics.json").read_text())["last_model"] == "model"
    assert not (output_dir(plain) / "last").exists()


def test_epochs_are_converted_with_accumulation(make_recipe):
    recipe = make_recipe(training={"steps": None, "epochs": 1.5, "gradient_accumulation_steps": 3, "batch_size": 16})
    assert run_cli("train", recipe) == 0
    metrics = json.loads((output_dir(recipe) / "metrics.json").read_text())
    assert metrics["steps_per_epoch"] == 4  # 12 micro-batches / 3
    assert metrics["optimizer_steps"] == 6


class Killed(Exception):
    pass


PRUNE_AND_DISTILL = {
    "teacher": None,  # filled in with the tiny model below
    "techniques": [
        {"kind": "pruning", "block": "4x1", "final_sparsity": 0.5, "start_step": 1, "end_step": 8, "update_every": 2},
        {"kind": "distillation", "logits": {"weight": 1.0}, "hidden": {"weight": 1.0}, "minilm": {"weight": 1.0}},
        {"kind": "length_adaptive", "length_drop_ratio_bound": 0.2, "num_sandwich": 1, "start_step": 2,
         "length_config": [0.8, 0.6]},
    ],
}


# an embedding task (no labels): the sentence-transformers tiny model learns its own embeddings while pruned,
# length-dropped and quantized (QAT on from step 8)
EMBEDDING_COMPRESSION = {
    "data": {"task": "embedding"},
    "techniques": [
        {"kind": "pruning", "block": "4x1", "final_sparsity": 0.5, "start_step": 1, "end_step": 8, "update_every": 2},
        {"kind": "distillation", "embedding": {"weight": 1.0}, "hidden": {"weight": 1.0}, "minilm": {"weight": 1.0}},
        {"kind": "length_adaptive", "length_drop_ratio_bound": 0.2, "num_sandwich": 1, "start_step": 2},
        {"kind": "quantization", "start_step": 8, "freeze_after_steps": 1},
    ],
}


# token classification (a label per word): pruned, distilled (logits per token, hidden states) and quantized
TOKEN_COMPRESSION = {
    "techniques": [
        {"kind": "pruning", "block": "4x1", "final_sparsity": 0.5, "start_step": 1, "end_step": 8, "update_every": 2},
        {"kind": "distillation", "logits": {"weight": 1.0}, "hidden": {"weight": 1.0}},
        {"kind": "quantization", "start_step": 8, "freeze_after_steps": 1},
    ],
}


@pytest.mark.parametrize("kill_at", [4, 8])
@pytest.mark.parametrize("techniques", [False, True, "embedding", "token-classification", "question-answering"],
                         ids=["dense", "prune+distill+lengthdrop", "embedding:prune+distill+lengthdrop+qat",
                              "token-classification:prune+distill+qat", "question-answering:prune+distill+qat"])
def test_killed_run_resumes_to_the_same_weights(make_recipe, tiny_model_dir, tiny_st_dir, toy_token_data, toy_qa_data,
                                                monkeypatch, kill_at, techniques):
    # 12 micro-batches per epoch, accumulation 2 -> 6 steps per epoch; 10 steps cross an epoch boundary, and the
    # kill points sit mid-epoch 0 and mid-epoch 1, so the data position, RNG (dropout), optimizer, schedule and
    # technique state (masks) must all resume.
    sections = {"training": {"steps": 10, "gradient_accumulation_steps": 2, "save_every": 4, "warmup_steps": 2}}
    if techniques in (False, "embedding"):  # length-grouped batches: their order must resume too
        sections["training"]["group_by_length"] = 2
    if techniques == "embedding":
        sections.update(EMBEDDING_COMPRESSION, model={"name_or_path": str(tiny_st_dir)},
                        teacher={"name_or_path": str(tiny_st_dir)})
    elif techniques in ("token-classification", "question-answering"):  # distillation: logits per token / span
        files = toy_token_data if techniques == "token-classification" else toy_qa_data
        sections.update(TOKEN_COMPRESSION, teacher={"name_or_path": str(tiny_model_dir)},
                        data={"task": techniques, "train_file": str(files["train"]),
                              "validation_file": str(files["validation"])})
    elif techniques:
        sections.update(PRUNE_AND_DISTILL, teacher={"name_or_path": str(tiny_model_dir)})
    full = make_recipe(**sections)
    assert run_cli("train", full) == 0
    expected = load_file(output_dir(full) / "model" / "model.safetensors")

    killed = make_recipe(**sections)
    import sparsify.train as train_module

    original = train_module.write_checkpoint

    def write_then_die(run_dir, step, **kwargs):
        out = original(run_dir, step, **kwargs)
        if step == kill_at:
            raise Killed
        return out

    monkeypatch.setattr(train_module, "write_checkpoint", write_then_die)
    with pytest.raises(Killed):
        run_cli("train", killed)
    monkeypatch.setattr(train_module, "write_checkpoint", original)
    assert not (output_dir(killed) / "model").exists()
    assert run_cli("train", killed, "--resume") == 0
    resumed = load_file(output_dir(killed) / "model" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    if techniques in ("embedding", "token-classification", "question-answering"):
        for name in ("quantization.json", "quantization.safetensors"):  # the int8 conversion resumes too
            assert (output_dir(killed) / "model" / name).read_bytes() == (output_dir(full) / "model" / name).read_bytes()
        metrics = json.loads((output_dir(killed) / "metrics.json").read_text())
        assert metrics["metrics"] == json.loads((output_dir(full) / "metrics.json").read_text())["metrics"]
        assert ("teacher_cosine" if techniques == "embedding" else "f1") in metrics["metrics"]
    elif techniques:
        report = json.loads((output_dir(killed) / "sparsity.json").read_text())
        assert report["total"]["follows_block"] and abs(report["total"]["sparsity"] - 0.5) < 0.01
        length_config = json.loads((output_dir(killed) / "model" / "length_config.json").read_text())
        assert length_config  # the recipe's length configuration travels with the model
        metrics = json.loads((output_dir(killed) / "metrics.json").read_text())
        assert "length_config_accuracy" in metrics["metrics"]


@pytest.mark.parametrize("seed", [0, 7])
def test_length_grouped_batches(seed):
    from sparsify.train import EpochSampler

    gen = torch.Generator().manual_seed(seed)
    n, batch, group = 1000, 16, 8
    lengths = torch.randint(3, 64, (n,), generator=gen).tolist()
    random = EpochSampler(n, seed)
    grouped = EpochSampler(n, seed, lengths=lengths, batch_size=batch, group=group)

    def padded(order):  # tokens a batch pads to: its longest example x its size
        return sum(max(lengths[i] for i in order[a:a + batch]) * len(order[a:a + batch]) for a in range(0, n, batch))

    for epoch in (0, 1):
        random.set_epoch(epoch)
        grouped.set_epoch(epoch)
        order = list(grouped)
        assert sorted(order) == list(range(n))  # every example once per epoch
        assert order == list(grouped)  # one order per (seed, epoch): every process and every resume agrees
        for a in range(0, n - n % (batch * group), batch * group):  # a group's examples, in whole batches
            span = order[a:a + batch * group]
            assert set(span) == set(list(random)[a:a + batch * group])  # the groups are cut from the shuffled order
            firsts = [lengths[i] for i in span[::batch]]
            assert firsts != sorted(firsts, reverse=True) or len(set(firsts)) == 1  # batches shuffled in the group
            for b in range(0, len(span), batch):  # a batch holds a contiguous length band of its group
                inside = sorted(lengths[i] for i in span[b:b + batch])
                outside = [lengths[i] for i in span if i not in span[b:b + batch]]
                assert not [x for x in outside if inside[0] < x < inside[-1]]
        assert padded(order) < 0.75 * padded(list(random))
    grouped.set_epoch(0)
    first = list(grouped)
    grouped.set_epoch(1)
    assert list(grouped) != first


def test_pruning_run_reports_measured_sparsity(make_recipe, tiny_model_dir):
    recipe = make_recipe(training={"steps": 12, "eval_every": 4, "select_best": True},
                         techniques=[{"kind": "pruning", "block": "4x1", "final_sparsity": 0.75, "end_step": 8,
                                      "update_every": 2}])
    assert run_cli("train", recipe) == 0
    run = output_dir(recipe)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best"]["step"] >= 8  # a denser checkpoint from inside the pruning window never wins
    report = json.loads((run / "sparsity.json").read_text())
    assert report["block"] == "4x1" and report["total"]["follows_block"]
    assert report["total"]["sparsity"] == pytest.approx(0.75, abs=0.005)
    weights = load_file(run / "model" / "model.safetensors")
    w = weights["bert.encoder.layer.0.intermediate.dense.weight"]
    assert (w == 0).float().mean().item() == pytest.approx(0.75, abs=0.01)
    assert (w.reshape(-1, 4, w.shape[1]).abs().sum(1) == 0).float().mean().item() == pytest.approx(0.75, abs=0.01)


def test_technique_error_points_into_the_recipe(make_recipe, capsys):
    recipe = make_recipe(techniques=[{"kind": "pruning", "block": "4x1", "final_sparsity": 0.5, "end_step": 4,
                                      "include": ["no_such_layer"]}])
    assert run_cli("train", recipe) == 2
    err = capsys.readouterr().err
    assert "techniques[0].include" in err and f"{recipe}:" in err


def test_resume_refuses_a_changed_recipe(make_recipe, capsys, monkeypatch):
    recipe = make_recipe(training={"steps": 4, "save_every": 2})
    assert run_cli("train", recipe) == 0
    import sparsify.train as train_module

    with monkeypatch.context() as m:  # refused before anything is loaded
        m.setattr(train_module, "load_tokenizer", lambda *a, **k: pytest.fail("loaded the tokenizer first"))
        assert run_cli("train", recipe, "--resume", "--set", "training.learning_rate=0.5") == 2
    assert "differs" in capsys.readouterr().err
    # a run started by an older version: its recipe.yaml lacks a key added since, which counts at its default
    saved = output_dir(recipe) / "recipe.yaml"
    doc = yaml.safe_load(saved.read_text())
    del doc["training"]["group_by_length"]
    saved.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert run_cli("train", recipe, "--resume") == 0
    # threads say how fast, not what: a resume may change them (with a warning), and the recipe.yaml follows
    assert run_cli("train", recipe, "--resume", "--set", "training.threads=2") == 0
    assert "training.threads 1 -> 2" in capsys.readouterr().err
    assert yaml.safe_load((output_dir(recipe) / "recipe.yaml").read_text())["training"]["threads"] == 2
    assert run_cli("train", recipe, "--resume", "--set", "training.threads=1", "--set", "training.seed=3") == 2
    assert "differs" in capsys.readouterr().err


def test_existing_run_needs_resume_or_overwrite(make_recipe, capsys):
    recipe = make_recipe(training={"steps": 2})
    assert run_cli("train", recipe) == 0
    assert run_cli("train", recipe) == 2
    assert "--resume" in capsys.readouterr().err
    assert run_cli("train", recipe, "--overwrite") == 0


@pytest.mark.parametrize("fmt", ["tsv", "jsonl", "parquet"])
def test_local_file_formats(make_recipe, toy_data, fmt):
    d = toy_data["dir"]
    recipe = make_recipe(data={"train_file": str(d / f"train.{fmt}"), "validation_file": str(d / f"validation.{fmt}")},
                         training={"steps": 2})
    assert run_cli("train", recipe) == 0


def _bad_label_file(tmp_path, toy_data):
    import pandas as pd

    df = pd.read_csv(toy_data["validation"])
    df.loc[3, "label"] = 7
    df.to_csv(tmp_path / "bad-labels.csv", index=False)
    return str(tmp_path / "bad-labels.csv")


BAD_INPUTS = {
    "missing recipe": (lambda mk, tmp, data: tmp / "no-such-recipe.yaml", "not found"),
    "malformed yaml": (lambda mk, tmp, data: _write(tmp / "m.yaml", "model: [unclosed\n"), "malformed YAML"),
    "unknown technique": (lambda mk, tmp, data: mk(techniques=[{"kind": "sparsegpt"}]), "unknown technique 'sparsegpt'"),
    "missing column": (lambda mk, tmp, data: mk(data={"text_columns": ["review"]}), "column 'review' not in the train data"),
    "label outside set": (lambda mk, tmp, data: mk(data={"validation_file": _bad_label_file(tmp, data)}),
                          "label 7 in the eval data is outside the label set"),
    "model not found": (lambda mk, tmp, data: mk(model={"name_or_path": "no-such-org/no-such-model"}),
                        "cannot load tokenizer 'no-such-org/no-such-model'"),
}


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_error_and_no_run_dir(case, make_recipe, toy_data, tmp_path, capsys):
    make, expected = BAD_INPUTS[case]
    recipe = make(make_recipe, tmp_path, toy_data)
    runs_before = sorted(p.name for p in tmp_path.iterdir())
    assert run_cli("train", recipe) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]) and expected in lines[0], err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == runs_before  # nothing half-written


def test_eval_cli_on_a_run(make_recipe, capsys, toy_data):
    recipe = make_recipe(training={"steps": 4})
    assert run_cli("train", recipe) == 0
    capsys.readouterr()
    parquet = os.environ.get("SPARSIFY_GLUE_PARQUET")
    if not parquet:
        pytest.skip("SPARSIFY_GLUE_PARQUET not set (source ../shared/offline-env.sh)")
    assert main(["eval", str(output_dir(recipe)), "--task", "sst2", "--dataset", parquet, "--max-samples", "40",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["examples"] == 40 and 0.0 <= out["accuracy"] <= 1.0


def test_two_process_accelerate_launch(make_recipe):
    recipe = make_recipe(training={"steps": 3, "eval_every": 2})
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    # --multi_gpu selects accelerate's distributed launcher; on a machine without GPUs it runs on CPU with gloo.
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "sparsify", "train", str(recipe), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((output_dir(recipe) / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert metrics["steps_per_epoch"] == 6  # 192 examples / (16 x 2 processes)
    assert metrics["optimizer_steps"] == 3


def test_bf16_mixed_precision_run(make_recipe):
    recipe = make_recipe(training={"steps": 3, "mixed_precision": "bf16"})
    assert run_cli("train", recipe) == 0
    metrics = json.loads((output_dir(recipe) / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 3 and metrics["metrics"]["loss"] == metrics["metrics"]["loss"]  # not NaN
    weights = load_file(output_dir(recipe) / "model" / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())  # master weights stay fp32


SCORED_PRUNING = {
    "taylor+rewind": {"training": {"lr_schedule": "rewind", "rewind_floor": 0.2},
                      "techniques": [{"kind": "pruning", "block": "4x1", "final_sparsity": 0.5, "initial_sparsity": 0.25,
                                      "start_step": 0, "end_step": 6, "update_every": 3, "score": "taylor"}]},
    "obs+global": {"techniques": [{"kind": "pruning", "block": "4x1", "final_sparsity": 0.5, "start_step": 2,
                                   "end_step": 6, "update_every": 2, "score": "obs", "scope": "global",
                                   "calibration_samples": 24}]},
}


@pytest.mark.parametrize("variant", list(SCORED_PRUNING))
def test_scored_pruning_runs_resume_to_the_same_weights(make_recipe, monkeypatch, variant):
    sections = {"training": {"steps": 10, "save_every": 4, "warmup_steps": 1, "eval_on_mask_update": True,
                             "fit_samples": 32, **SCORED_PRUNING[variant].get("training", {})},
                "techniques": SCORED_PRUNING[variant]["techniques"]}
    full = make_recipe(**sections)
    assert run_cli("train", full) == 0
    expected = load_file(output_dir(full) / "model" / "model.safetensors")
    metrics = json.loads((output_dir(full) / "metrics.json").read_text())
    evaluated = [e["step"] for e in metrics["evals"]]
    updates = [0, 3, 6] if variant.startswith("taylor") else [2, 4, 6]
    assert [s for s in updates if s > 0] == [s for s in evaluated if s < 10]  # an evaluation after every update
    assert len(metrics["mask_update_seconds"]) == len(updates)
    assert set(metrics["train_fit"]) == {"examples", "train_accuracy"} and metrics["train_fit"]["examples"] == 32
    report = json.loads((output_dir(full) / "sparsity.json").read_text())
    assert report["total"]["follows_block"] and abs(report["total"]["sparsity"] - 0.5) < 0.01

    killed = make_recipe(**sections)
    import sparsify.train as train_module

    original = train_module.write_checkpoint

    def write_then_die(run_dir, step, **kwargs):
        out = original(run_dir, step, **kwargs)
        if step == 4:
            raise Killed
        return out

    monkeypatch.setattr(train_module, "write_checkpoint", write_then_die)
    with pytest.raises(Killed):
        run_cli("train", killed)
    monkeypatch.setattr(train_module, "write_checkpoint", original)
    assert run_cli("train", killed, "--resume") == 0
    resumed = load_file(output_dir(killed) / "model" / "model.safetensors")
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name


def test_teacher_cache_across_runs_gives_the_same_weights(make_recipe, tiny_model_dir, tmp_path, capsys):
    """A second run with the same teacher, data and terms reads every teacher output from the cache directory (the
    teacher never runs) and ends with the first run's weights."""
    cache = tmp_path / "teacher-cache"
    distill = {"kind": "distillation", "task_weight": 0.0, "logits": {"weight": 1.0, "temperature": 2.0},
               "hidden": {"weight": 1.0, "normalize": True}, "teacher_cache": str(cache)}
    sections = {"teacher": {"name_or_path": str(tiny_model_dir)}, "techniques": [distill],
                "training": {"steps": 8, "save_every": 4}}
    first = make_recipe(**sections)
    assert run_cli("train", first) == 0
    assert "0 of " in capsys.readouterr().out
    expected = load_file(output_dir(first) / "model" / "model.safetensors")
    stored = sum(s["examples"] for s in json.loads((cache / "cache.json").read_text())["shards"])
    assert stored > 0

    import transformers

    calls = []
    original = transformers.BertForSequenceClassification.forward

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("output_hidden_states"))  # the teacher asks for hidden states, the student too
        return original(self, *args, **kwargs)

    second = make_recipe(**sections)
    import unittest.mock

    with unittest.mock.patch.object(transformers.BertForSequenceClassification, "forward", counted):
        assert run_cli("train", second) == 0
    assert f"{stored} of " in capsys.readouterr().out
    got = load_file(output_dir(second) / "model" / "model.safetensors")
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    # 8 steps + evaluations of the student only: with the teacher running, the count would be 8 more
    plain = make_recipe(**{**sections, "techniques": [{k: v for k, v in distill.items() if k != "teacher_cache"}]})
    calls_cached = len(calls)
    calls.clear()
    with unittest.mock.patch.object(transformers.BertForSequenceClassification, "forward", counted):
        assert run_cli("train", plain) == 0
    assert len(calls) == calls_cached + 8


def test_holdout_examples_select_the_model_without_the_eval_split(make_recipe, tmp_path, capsys):
    """data.holdout_samples: training examples kept out of training (the same ones for every seed); every
    evaluation reports holdout_accuracy beside accuracy, and select_best chooses on holdout_accuracy."""
    from sparsify.data import load_task_data
    from sparsify.modeling import load_tokenizer
    from sparsify.recipe import load_recipe

    recipe_path = make_recipe(data={"holdout_samples": 48},
                              training={"steps": 40, "eval_every": 8, "select_best": True, "seed": 3})
    recipe = load_recipe(recipe_path)
    data = load_task_data(recipe.data, load_tokenizer(recipe.model.name_or_path))
    assert len(data.train) == 144 and len(data.holdout) == 48
    assert not set(data.train["idx"]) & set(data.holdout["idx"])  # disjoint
    other_seed = load_recipe(make_recipe(data={"holdout_samples": 48}, training={"seed": 9}))
    assert load_task_data(other_seed.data, load_tokenizer(recipe.model.name_or_path)).holdout["idx"] == \
        data.holdout["idx"]  # the same held-out examples whatever the training seed

    assert run_cli("train", recipe_path) == 0
    metrics = json.loads((output_dir(recipe_path) / "metrics.json").read_text())
    assert metrics["selected_on"] == "holdout_accuracy" and metrics["holdout_examples"] == 48
    assert metrics["steps_per_epoch"] == 9  # 144 training examples / 16
    evals = metrics["evals"]
    assert all("holdout_accuracy" in e and "accuracy" in e for e in evals)
    best = max(evals, key=lambda e: e["holdout_accuracy"])  # first of the ties, as the trainer keeps it
    assert metrics["best"]["step"] == best["step"] and metrics["model_step"] == best["step"]
    assert max(evals, key=lambda e: e["accuracy"])["step"] != best["step"]  # the eval split would choose another

    bad = make_recipe(data={"holdout_samples": 192})
    assert run_cli("train", bad) == 2
    assert "data.holdout_samples: 192 leaves nothing to train on" in capsys.readouterr().err
    embedding = make_recipe(data={"holdout_samples": 8, "task": "embedding"})
    assert run_cli("train", embedding) == 2
    assert "data.holdout_samples: holds out sequence-classification examples" in capsys.readouterr().err
