"""Recipe loading: validation messages name the file, line, key path and what is allowed; --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sparsify.errors import RecipeError
from sparsify.recipe import load_recipe

GOOD = """\
output_dir: runs/x
model:
  name_or_path: some/model
data:
  dataset: nyu-mll/glue
  config: sst2
training:
  epochs: 1
  learning_rate: 1e-4
"""


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def error_of(path, overrides=()):
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value), info.value


def test_good_recipe_fills_defaults_and_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert recipe.training.learning_rate == 1e-4  # YAML 1.1 reads 1e-4 as a string; the config coerces it
    assert recipe.data.text_columns == ("sentence",)
    assert recipe.training.batch_size == 32
    again = load_recipe(write(tmp_path, recipe.to_yaml(), "resolved.yaml"))
    assert again == recipe


def test_glue_pair_task_gets_its_text_columns(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD.replace("config: sst2", "config: mrpc")))
    assert recipe.data.text_columns == ("sentence1", "sentence2")


def test_unknown_key_names_file_line_path_and_suggests(tmp_path):
    path = write(tmp_path, GOOD.replace("  learning_rate: 1e-4", "  lerning_rate: 1e-4"))
    msg, err = error_of(path)
    assert err.file == str(path) and err.line == 9 and err.key == "training.lerning_rate"
    assert "Did you mean 'learning_rate'?" in msg
    assert "Allowed:" in msg and "batch_size" in msg


def test_unknown_top_level_section(tmp_path):
    msg, err = error_of(write(tmp_path, GOOD + "trainer:\n  steps: 3\n"))
    assert err.line == 10 and err.key == "trainer" and "Did you mean 'training'?" in msg


def test_wrong_type_and_out_of_range(tmp_path):
    msg, err = error_of(write(tmp_path, GOOD + "  batch_size: many\n"))
    assert err.key == "training.batch_size" and err.line == 10 and "integer" in msg and "'many'" in msg
    msg, err = error_of(write(tmp_path, GOOD + "  batch_size: 0\n"))
    assert err.key == "training.batch_size" and "greater than or equal to 1" in msg


def test_literal_choices_are_listed(tmp_path):
    msg, err = error_of(write(tmp_path, GOOD + "  lr_schedule: cubic\n"))
    assert err.key == "training.lr_schedule" and "'linear'" in msg and "'cosine'" in msg


def test_cross_field_rule_blames_a_field(tmp_path):
    msg, err = error_of(write(tmp_path, GOOD + "  steps: 10\n"))
    assert err.key == "training.epochs" and "exactly one of 'epochs' or 'steps'" in msg


def test_missing_required_section(tmp_path):
    msg, err = error_of(write(tmp_path, GOOD.replace("output_dir: runs/x\n", "")))
    assert err.key == "output_dir" and "required" in msg


def test_malformed_yaml_gives_the_line(tmp_path):
    msg, err = error_of(write(tmp_path, GOOD + "  seed: [1, 2\n"))
    assert err.line is not None and err.line >= 10 and "malformed YAML" in msg


def test_duplicate_keys_are_refused(tmp_path):
    msg, err = error_of(write(tmp_path, GOOD + "  learning_rate: 3e-5\n"))
    assert "duplicate key 'learning_rate'" in msg and err.line == 10


def test_python_tags_are_refused(tmp_path):
    msg, _ = error_of(write(tmp_path, GOOD + "  seed: !!python/object/apply:os.system ['echo hi']\n"))
    assert "malformed YAML" in msg


def test_missing_file(tmp_path):
    msg, _ = error_of(tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "not found" in msg


def test_unknown_technique_suggests(tmp_path):
    text = GOOD + "techniques:\n  - kind: prunning\n"
    msg, err = error_of(write(tmp_path, text))
    assert err.key == "techniques[0].kind" and err.line == 11 and "unknown technique 'prunning'" in msg


def test_set_overrides_fields_lists_and_new_keys(tmp_path):
    path = write(tmp_path, GOOD)
    recipe = load_recipe(path, ["training.learning_rate=3e-5", "data.text_columns=[a, b]", "training.eval_every=50",
                                "teacher.name_or_path=some/teacher"])
    assert recipe.training.learning_rate == 3e-5
    assert recipe.data.text_columns == ("a", "b")
    assert recipe.training.eval_every == 50
    assert recipe.teacher.name_or_path == "some/teacher"


def test_set_errors_name_the_override(tmp_path):
    path = write(tmp_path, GOOD)
    msg, err = error_of(path, ["training.batch_size=-3"])
    assert err.file == "--set" and err.key == "training.batch_size"
    msg, _ = error_of(path, ["training.learning_rate"])
    assert "expected key.path=value" in msg
    msg, _ = error_of(path, ["output_dir.x=1"])
    assert "is a value, not a section" in msg


def test_recipe_check_cli(tmp_path, capsys):
    from sparsify.cli import main

    path = write(tmp_path, GOOD)
    assert main(["recipe", "check", str(path), "--set", "training.seed=3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["training"]["seed"] == 3 and resolved["training"]["batch_size"] == 32
    bad = write(tmp_path, GOOD + "  sed: 3\n", "bad.yaml")
    assert main(["recipe", "check", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {bad}:10: training.sed: unknown key")


RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    load_recipe(path)


def test_docs_recipe_reference_is_current():
    from sparsify.recipe import recipe_reference

    docs = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
    assert docs.read_text() == recipe_reference(), "regenerate: sparsify recipe reference > docs/recipes.md"


def test_unknown_key_inside_a_technique_suggests(tmp_path):
    text = GOOD + "techniques:\n  - kind: pruning\n    block: 4x1\n    final_sparsty: 0.9\n    end_step: 10\n"
    msg, err = error_of(write(tmp_path, text))
    assert err.key == "techniques[0].final_sparsty" and err.line == 13
    assert "Did you mean 'final_sparsity'?" in msg


def test_technique_cross_field_error_has_line(tmp_path):
    text = GOOD + "techniques:\n  - kind: pruning\n    final_sparsity: 0.9\n    start_step: 20\n    end_step: 10\n"
    msg, err = error_of(write(tmp_path, text))
    assert err.key == "techniques[0].start_step" and err.line == 13 and "after end_step" in msg


@pytest.mark.parametrize("technique, consequence", [
    ("{kind: quantization, start_step: 10}", "QAT would never run"),
    ("{kind: length_adaptive, length_drop_ratio_bound: 0.2, start_step: 12}", "no sub-model would be trained"),
])
def test_technique_start_after_training_is_refused(tmp_path, technique, consequence):
    text = GOOD.replace("  epochs: 1\n", "  steps: 10\n") + f"techniques:\n  - {technique}\n"
    msg, err = error_of(write(tmp_path, text))
    assert err.key == "techniques[0].start_step" and "is not before the last training step 10" in msg
    assert consequence in msg


def test_epochs_are_converted_to_optimizer_steps():
    from sparsify.config import epochs_to_steps

    assert epochs_to_steps(2.0, 2105) == 4210 and epochs_to_steps(0.05, 2105) == 105
    with pytest.raises(ValueError, match="steps_per_epoch"):
        epochs_to_steps(1.0, 0)
