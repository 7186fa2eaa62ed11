"""The sweep helper: grid parsing and expansion, per-point directories, and run / resume / skip of each point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sparsify import cli
from sparsify.checkpoint import checkpoint_dirs
from sparsify.errors import SparsifyError
from sparsify.recipe import load_recipe
from sparsify.sweep import expand, parse_grid, point_dir_name, point_status, sweep


def test_parse_grid_splits_on_top_level_commas():
    grid = parse_grid(["techniques.0.final_sparsity=0.5, 0.9", "model.layers=[0,2,4],[0, 5]", "name='a,b',c"])
    assert grid == {"techniques.0.final_sparsity": ["0.5", "0.9"], "model.layers": ["[0,2,4]", "[0, 5]"],
                    "name": ["'a,b'", "c"]}


@pytest.mark.parametrize("items, message", [
    (["techniques.0.final_sparsity"], "expected KEY=V1,V2"),
    (["=0.5"], "expected KEY=V1,V2"),
    (["training.steps="], "training.steps: empty value"),
    (["training.steps=1,,2"], "training.steps: empty value"),
    (["training.steps=1", "training.steps=2"], "training.steps: given twice"),
])
def test_parse_grid_errors(items, message):
    with pytest.raises(SparsifyError, match=message):
        parse_grid(items)


def test_expand_is_the_cartesian_product_with_deterministic_dirs(make_recipe, tmp_path):
    recipe = make_recipe(techniques=[{"kind": "pruning", "block": "4x1", "final_sparsity": 0.5,
                                      "start_step": 0, "end_step": 4}])
    grid = {"techniques.0.final_sparsity": [0.5, 0.75], "training.learning_rate": ["1e-3", 3e-3, 0.01]}
    points = expand(recipe, grid, root=tmp_path / "sw")
    assert [p.values for p in points] == [
        {"techniques.0.final_sparsity": a, "training.learning_rate": b} for a in ("0.5", "0.75")
        for b in ("1e-3", "0.003", "0.01")]
    assert len({p.output_dir for p in points}) == 6
    assert points[0].output_dir == tmp_path / "sw" / "techniques.0.final_sparsity=0.5__training.learning_rate=1e-3"
    for p in points:  # the grid values reach the validated recipe; each point writes to its own directory
        assert p.recipe.techniques[0].final_sparsity == float(p.values["techniques.0.final_sparsity"])
        assert p.recipe.training.learning_rate == float(p.values["training.learning_rate"])
        assert Path(p.recipe.output_dir) == p.output_dir
        assert p.status == "new"
    again = expand(recipe, ["techniques.0.final_sparsity=0.5,0.75", "training.learning_rate=1e-3,0.003,0.01"],
                   root=tmp_path / "sw")
    assert [p.output_dir for p in again] == [p.output_dir for p in points]
    default = expand(recipe, {"training.steps": [8]})  # default root: the recipe's output_dir + "-sweep"
    assert default[0].output_dir.parent == Path(load_recipe(recipe).output_dir + "-sweep")
    assert not (tmp_path / "sw").exists()  # expanding writes nothing


def test_point_dir_names_are_safe_and_unique():
    assert point_dir_name({"training.steps": "4"}) == "training.steps=4"
    a = point_dir_name({"model.layers": "[0, 2]"})
    b = point_dir_name({"model.layers": "[0,_2]"})
    assert "/" not in a and " " not in a and "[" not in a and a != b
    assert a == point_dir_name({"model.layers": "[0, 2]"})
    assert len(point_dir_name({"name": "x" * 500})) < 120


def _error(capsys, *argv) -> str:
    assert cli.main(["sweep", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_grid_errors_name_the_key_and_the_allowed_values(make_recipe, capsys, tmp_path):
    recipe = str(make_recipe())
    root = ["--root", str(tmp_path / "sw")]
    line = _error(capsys, recipe, *root, "--grid", "training.lr_schedule=linear,cubic")
    assert "--grid training.lr_schedule=cubic" in line and "'linear', 'cosine', 'constant' or 'rewind'" in line
    line = _error(capsys, recipe, *root, "--grid", "training.learnig_rate=1e-3,1e-4")
    assert "--grid training.learnig_rate" in line and "Did you mean 'learning_rate'" in line
    line = _error(capsys, recipe, *root, "--grid", "training.batch_size=8,0")
    assert "--grid training.batch_size=0" in line and "greater than or equal to 1" in line
    line = _error(capsys, recipe, *root, "--grid", "techniques.2.final_sparsity=0.5")
    assert line.startswith("error: --grid techniques[2].final_sparsity") and "not an index" in line
    assert "output_dir" in _error(capsys, recipe, *root, "--grid", "output_dir=a,b")
    assert "also given with --set" in _error(capsys, recipe, *root, "--grid", "training.steps=2,4",
                                             "--set", "training.steps=3")
    assert "expected KEY=V1,V2" in _error(capsys, recipe, *root, "--grid", "training.steps")
    assert not (tmp_path / "sw").exists()


def test_cli_dry_run_lists_points_and_runs_nothing(make_recipe, capsys, tmp_path):
    recipe = str(make_recipe())
    assert cli.main(["sweep", recipe, "--root", str(tmp_path / "sw"), "--grid", "training.steps=2,4",
                     "--grid", "training.seed=1,2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 point(s)" in out and out.count("new ") == 4 and "training.steps=4__training.seed=2" in out
    assert not (tmp_path / "sw").exists()
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", "--help"])
    assert e.value.code == 0
    assert "--grid" in capsys.readouterr().out


def test_sweep_runs_skips_and_resumes(make_recipe, tmp_path, monkeypatch):
    import sparsify.train

    recipe = make_recipe(training={"steps": 4, "save_every": 2, "eval_every": 4},
                         techniques=[{"kind": "pruning", "block": "4x1", "final_sparsity": 0.5,
                                      "start_step": 0, "end_step": 2, "update_every": 1}])
    grid = {"techniques.0.final_sparsity": [0.5, 0.75]}
    root = tmp_path / "sw"
    real_train = sparsify.train.train
    calls = []

    def spy(recipe, **kwargs):
        calls.append((Path(recipe.output_dir).name, kwargs.get("resume", False)))
        return real_train(recipe, **kwargs)

    monkeypatch.setattr(sparsify.train, "train", spy)
    points = sweep(recipe, grid, root=root, progress=False, log=None)
    assert calls == [(p.name, False) for p in points]
    for p, target in zip(points, (0.5, 0.75)):
        assert p.status == "finished"
        assert json.loads((p.output_dir / "sparsity.json").read_text())["total"]["sparsity"] == pytest.approx(target)
    doc = json.loads((root / "sweep.json").read_text())
    assert doc["grid"] == {"techniques.0.final_sparsity": ["0.5", "0.75"]}
    assert [q["name"] for q in doc["points"]] == [p.name for p in points]

    # finished points are skipped
    calls.clear()
    sweep(recipe, grid, root=root, progress=False, log=None)
    assert calls == []

    # a point killed after its step-2 checkpoint is resumed from it and finishes at step 4
    killed = points[1].output_dir
    (killed / "metrics.json").unlink()
    shutil.rmtree(checkpoint_dirs(killed)[-1])
    assert [c.name for c in checkpoint_dirs(killed)] == ["step-000002"] and point_status(killed) == "resumable"
    sweep(recipe, grid, root=root, progress=False, log=None)
    assert calls == [(killed.name, True)]
    assert json.loads((killed / "metrics.json").read_text())["optimizer_steps"] == 4

    # a directory with files but no checkpoint (running elsewhere, or killed early) is refused, nothing runs
    calls.clear()
    (points[0].output_dir / "metrics.json").unlink()
    shutil.rmtree(points[0].output_dir / "checkpoints")
    assert point_status(points[0].output_dir) == "incomplete"
    with pytest.raises(SparsifyError, match="without a checkpoint"):
        sweep(recipe, {"techniques.0.final_sparsity": [0.5, 0.6]}, root=root, progress=False, log=None)
    assert calls == [] and not (root / "techniques.0.final_sparsity=0.6").exists()


def test_a_point_that_breaks_another_key_is_named(make_recipe, tmp_path):
    recipe = make_recipe(techniques=[{"kind": "pruning", "block": "4x1", "final_sparsity": 0.5,
                                      "start_step": 0, "end_step": 4}])
    with pytest.raises(SparsifyError, match=r"--grid point training.steps=2: .*end_step 4 is after the last training step 2"):
        expand(recipe, {"training.steps": [8, 2]}, root=tmp_path / "sw")
