"""Reliability (issue 17): the kernel format owns its arrays, YAML alias bombs, damaged checkpoints on --resume,
user mistakes caught before a run starts, artifacts whose manifest lies and non-finite weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from sparsify.cli import main
from sparsify.kernels.format import BlockSparseMatrix
from sparsify.kernels.spmm import spmm

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args) -> int:
    args = list(map(str, args))
    return main(args + ["--no-progress"] if args[0] == "train" else args)


def one_error(capsys, *expected: str) -> str:
    """The single ``error:`` line of a failed command (which is the last line of stderr), holding ``expected``."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def output_dir(recipe: Path) -> Path:
    return Path(yaml.safe_load(recipe.read_text())["output_dir"])


# ------------------------------------------------------------------------------ 1. the kernel format owns its data
def _parts(seed=0, n_out=16, n_in=12):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    w[rng.random((n_out, n_in)) < 0.5] = 0
    m = BlockSparseMatrix.from_dense(w, (4, 1))
    return dict(shape=m.shape, block=m.block, indptr=m.indptr.copy(), indices=m.indices.copy(), data=m.data.copy(),
                bias=rng.standard_normal(n_out).astype(np.float32))


def test_matrix_ignores_changes_to_the_callers_arrays():
    parts = _parts()
    m = BlockSparseMatrix(**parts)
    dense, bias = m.to_dense(), parts["bias"].copy()
    x = np.random.default_rng(1).standard_normal((5, 12)).astype(np.float32)
    expected = x @ dense.T + bias
    parts["data"] *= 3  # before the first call: the kernel used to read these
    parts["bias"][:] = 7
    parts["indices"][:] = parts["indices"][::-1]
    np.testing.assert_allclose(spmm(x, m), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(m.to_dense(), dense)
    parts["data"] *= 5  # after the first call: the padded copies and the stored arrays must still agree
    np.testing.assert_allclose(spmm(x, m), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(m.to_dense(), dense)


def test_matrix_arrays_are_read_only():
    m = BlockSparseMatrix(**_parts())
    for name in ("indptr", "indices", "data", "bias"):
        with pytest.raises(ValueError, match="read-only"):
            getattr(m, name)[0] = 0
    assert m.with_bias(None).indices is m.indices  # derived matrices share the owned arrays, no copy


def test_out_of_range_indices_after_construction_cannot_crash_the_kernel():
    # used to end with a segfault (exit 139): the kernel read block column 10**6 of x
    script = textwrap.dedent("""
        import numpy as np
        from sparsify.kernels.format import BlockSparseMatrix
        from sparsify.kernels.spmm import spmm
        w = np.ones((8, 8), np.float32)
        m = BlockSparseMatrix.from_dense(w, (4, 1))
        indptr, indices, data = m.indptr.copy(), m.indices.copy(), m.data.copy()
        m = BlockSparseMatrix((8, 8), (4, 1), indptr, indices, data)
        indices[:] = 10**6
        y = spmm(np.ones((3, 8), np.float32), m)
        assert np.allclose(y, 8.0), y
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


# ------------------------------------------------------------------------------ 2. YAML alias bombs
ALIAS_BOMB = textwrap.dedent("""\
    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
    h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
    i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
    """)


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB.encode()) < 600
    # in a subprocess with a memory cap: before the fix this expanded to gigabytes (MemoryError after a minute)
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
              "from sparsify.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", script, "recipe", "check", str(bomb)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bomb}:") and "aliases expand" in lines[0], lines


def test_recursive_alias_and_alias_bomb_in_set_are_refused(tmp_path, capsys):
    rec = tmp_path / "rec.yaml"
    rec.write_text("output_dir: x\nmodel: &m {name_or_path: *m}\n")
    assert run_cli("recipe", "check", rec) == 2
    one_error(capsys, f"{rec}:", "recursive alias")
    ok = tmp_path / "ok.yaml"
    ok.write_text("output_dir: x\n")
    bomb = "[&a0 [1,1,1,1,1,1,1,1,1,1], " + ", ".join(f"&a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]"
                                                     for i in range(1, 6)) + "]"  # 10**6 values
    assert run_cli("recipe", "check", ok, "--set", f"name={bomb}") == 2
    one_error(capsys, "--set", "aliases expand")


def test_a_key_with_a_line_separator_character_stays_on_one_error_line(tmp_path, capsys):
    # found by the property suite: "\x1e" (and "\x85", "\u2028", ...) end a line for str.splitlines
    for ch in ("\x1e", "\x85", "\u2028", "\x0c"):
        r = tmp_path / "r.yaml"
        r.write_text(yaml.safe_dump({"output_dir": "x", "model": {ch: None}}, allow_unicode=True), encoding="utf-8")
        assert run_cli("recipe", "check", r) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "unknown key" in err, repr(err)


def test_small_aliases_still_work(tmp_path, tiny_model_dir, toy_data):
    r = tmp_path / "r.yaml"
    r.write_text(textwrap.dedent(f"""\
        output_dir: {tmp_path / 'run'}
        model: {{name_or_path: &m {tiny_model_dir}}}
        teacher: {{name_or_path: *m}}
        data: {{train_file: {toy_data['train']}, validation_file: {toy_data['validation']}}}
        training: {{steps: 2}}
        """))
    assert run_cli("recipe", "check", r, "--quiet") == 0


# ------------------------------------------------------------------------------ 3. damaged checkpoints
def _damage(ckpt: Path, how: str) -> None:
    if how == "truncated":
        f = ckpt / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "flipped":
        f = ckpt / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[-5] ^= 0x01  # inside a weight: still a valid file
        f.write_bytes(bytes(data))
    elif how == "broken_json":
        (ckpt / "trainer_state.json").write_text('{"step": 4, ')
    elif how == "missing":
        (ckpt / "optimizer.safetensors").unlink()


def _copy_run(finished_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(output_dir(finished_run), tmp_path / "run")
    recipe = yaml.safe_load(finished_run.read_text())
    recipe["output_dir"] = str(tmp_path / "run")
    (tmp_path / "run" / "recipe.yaml").write_text(
        (tmp_path / "run" / "recipe.yaml").read_text().replace(str(output_dir(finished_run)), str(tmp_path / "run")))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_checkpoints_carry_a_manifest_of_checksums(finished_run):
    ckpt = output_dir(finished_run) / "checkpoints" / "step-000004"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    listed = set(manifest["files"])
    assert listed == {p.name for p in ckpt.iterdir()} - {"manifest.json"}
    assert {"model.safetensors", "trainer_state.json", "rng-0.safetensors"} <= listed
    assert all(len(v["sha256"]) == 64 and v["bytes"] > 0 for v in manifest["files"].values())


@pytest.mark.parametrize("how", ["truncated", "flipped", "broken_json", "missing"])
def test_resume_skips_a_damaged_checkpoint(finished_run, tmp_path, capsys, how):
    recipe = _copy_run(finished_run, tmp_path)
    _damage(tmp_path / "run" / "checkpoints" / "step-000004", how)
    capsys.readouterr()
    assert run_cli("train", recipe, "--resume") == 0
    out, err = capsys.readouterr()
    assert "skipped the damaged checkpoint" in err and "step-000004" in err, err
    assert "resuming from" in out and "step-000002" in out, out
    assert "Traceback" not in err


def test_resume_with_every_checkpoint_damaged_is_one_error(finished_run, tmp_path, capsys):
    recipe = _copy_run(finished_run, tmp_path)
    _damage(tmp_path / "run" / "checkpoints" / "step-000004", "flipped")
    _damage(tmp_path / "run" / "checkpoints" / "step-000002", "truncated")
    capsys.readouterr()
    assert run_cli("train", recipe, "--resume") == 2
    one_error(capsys, "no intact checkpoint", "step-000004: model.safetensors: sha256",
              "step-000002: model.safetensors:")


# ------------------------------------------------------------------------------ 4. user mistakes, caught early
def test_recipe_not_utf8(tmp_path, capsys):
    r = tmp_path / "latin1.yaml"
    r.write_bytes("output_dir: x\nname: caf\u00e9\n".encode("latin-1"))
    assert run_cli("recipe", "check", r) == 2
    one_error(capsys, f"{r}:2:", "not UTF-8")


@pytest.mark.parametrize("override, key", [("training.seed=-1", "training.seed"),
                                           ("training.seed=4294967296", "training.seed"),
                                           ("training.threads=1000000000", "training.threads"),
                                           ("training.metric_for_best=acuracy", "training.metric_for_best"),
                                           ("training.metric_for_best=length_config_accuracy",
                                            "training.metric_for_best")])
def test_recipe_check_refuses_values_train_cannot_use(make_recipe, capsys, override, key):
    recipe = make_recipe()
    assert run_cli("recipe", "check", recipe, "--quiet", "--set", override) == 2
    line = one_error(capsys, key)
    if "acuracy" in override:
        assert "Did you mean 'accuracy'" in line


def _long_example_data(tmp_path: Path, toy_data) -> str:
    import pandas as pd

    df = pd.read_csv(toy_data["train"])
    df.loc[5, "sentence"] = " ".join(["good"] * 100)  # 102 tokens: past the tiny model's 64 positions
    df.to_csv(tmp_path / "long.csv", index=False)
    return str(tmp_path / "long.csv")


TRAIN_MISTAKES = {
    "output_dir is a file": (lambda tmp, data: {"training": {"steps": 1}}, "output_dir", "is a file"),
    "max_length past the positions": (
        lambda tmp, data: {"data": {"train_file": _long_example_data(tmp, data), "max_length": 128}},
        "data.max_length", "has 64 positions"),
    "num_labels mismatch": (lambda tmp, data: {"model": {"num_labels": 3}}, "model.num_labels", "does not match"),
}


def _touch(path: Path) -> Path:
    path.write_text("not a directory\n")
    return path


@pytest.mark.parametrize("case", list(TRAIN_MISTAKES))
def test_train_mistakes_are_one_error_before_the_run_directory(make_recipe, toy_data, tmp_path, capsys, case):
    sections, key, text = TRAIN_MISTAKES[case]
    recipe = make_recipe(**sections(tmp_path, toy_data))
    if case == "output_dir is a file":
        _touch(output_dir(recipe))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run_cli("train", recipe) == 2
    one_error(capsys, f"{recipe}:", key, text)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run directory, not even an empty one


def test_num_labels_matching_the_data_is_accepted(make_recipe):
    assert run_cli("train", make_recipe(model={"num_labels": 2}, training={"steps": 1})) == 0


# ------------------------------------------------------------------------------ 5. artifacts
@pytest.fixture
def artifact(sparse_artifact) -> Path:
    return sparse_artifact


def rehash(art: Path) -> None:
    """Make the manifest's checksums match the files again (a manifest that lies consistently)."""
    from sparsify.runtime.model import sha256_file

    m = json.loads((art / "sparsify.json").read_text())
    for name in m["files"]:
        m["files"][name] = {"sha256": sha256_file(art / name), "bytes": (art / name).stat().st_size}
    (art / "sparsify.json").write_text(json.dumps(m))


def _edit_manifest(art: Path, fn) -> None:
    m = json.loads((art / "sparsify.json").read_text())
    fn(m)
    (art / "sparsify.json").write_text(json.dumps(m))


def _set_weight(art: Path, name: str, fn) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(art / "model.safetensors"))
    fn(tensors[name])
    save_file(tensors, str(art / "model.safetensors"), metadata={"format": "sparsify-artifact"})
    rehash(art)


LAYER = "bert.encoder.layer.0.attention.self.query"
LIES = {
    "wrong layer shape": (lambda a: _edit_manifest(a, lambda m: m["layers"][LAYER].update(shape=[32, 64])),
                          "layers['bert.encoder.layer.0.attention.self.query'].shape"),
    "heads do not divide hidden": (lambda a: _edit_manifest(a, lambda m: m["architecture"].update(num_attention_heads=3)),
                                   "num_attention_heads 3 does not divide hidden_size 32"),
    "broken tokenizer.json": (lambda a: ((a / "tokenizer.json").write_text('{"version": "1.0", "model": 7}'),
                                         rehash(a)), "tokenizer.json: not a valid tokenizer"),
    "NaN weight": (lambda a: _set_weight(a, "classifier.weight", lambda t: t.__setitem__((0, 0), np.nan)),
                   "'classifier.weight' has NaN"),
    "inf in sparse data": (lambda a: _set_weight(a, LAYER + ".data", lambda t: t.__setitem__(0, np.inf)),
                           f"'{LAYER}.data' has NaN"),
}


@pytest.mark.parametrize("case", list(LIES))
def test_artifact_whose_manifest_lies_is_one_error(artifact, tmp_path, capsys, case):
    damage, expected = LIES[case]
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    damage(art)
    assert run_cli("predict", art, "--text", "a good film") == 2
    one_error(capsys, str(art), expected)


def test_export_refuses_non_finite_weights(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = load_file(str(model / "model.safetensors"))
    weights["bert.encoder.layer.1.output.dense.weight"][3, 4] = float("nan")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    for fmt in ("sparsify", "hf"):
        assert run_cli("export", model, "-o", tmp_path / fmt, "--format", fmt) == 2
        one_error(capsys, str(model), "bert.encoder.layer.1.output.dense.weight", "NaN")
        assert not (tmp_path / fmt).exists()


@pytest.mark.parametrize("value, expected", [("-5", "at least 8"), ("0", "at least 8"), ("1", "at least 8"),
                                             ("100000", "has 64 positions")])
def test_predict_max_length_out_of_range(artifact, capsys, value, expected):
    assert run_cli("predict", artifact, "--text", "good", "--max-length", value) == 2
    one_error(capsys, f"--max-length {value}", expected)


def test_predict_max_length_in_range_truncates(artifact, capsys):
    assert run_cli("predict", artifact, "--text", "good " * 40, "--max-length", "8") == 0
    assert "longer than 8 tokens" in capsys.readouterr().err
