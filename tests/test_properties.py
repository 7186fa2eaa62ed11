"""Property-based checks (hypothesis, derandomized): whatever a user does to a recipe, a checkpoint or an artifact,
the command ends with status 0, or status 2 and one ``error:`` line naming the file; never a traceback, never a
half-written run directory, never a damaged checkpoint resumed from.

Recipes get random values at the keys of the recipe reference (the configs the reference is generated from),
deleted and unknown keys, and YAML-level damage (truncation, inserted YAML syntax, flipped bytes, alias bombs).
Checkpoints get random truncation, byte flips and deletions. Artifacts get random values in their manifest and
damaged files, with the checksums rewritten to match (a manifest that lies)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsify.cli import main
from sparsify.config import Config
from sparsify.errors import SparsifyError
from sparsify.recipe import Recipe, _config_class
from sparsify.techniques import TECHNIQUES

SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def run(argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of the CLI, in this process: an exception escaping it fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


def assert_one_error(rc: int, err: str, file: str, need_line: bool = False) -> None:
    assert rc in (0, 2), (rc, err)
    assert "Traceback" not in err, err
    if rc == 2:
        lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and err.strip().endswith(lines[0]), err
        pattern = re.escape(f"error: {file}") + (r":\d+: " if need_line else "")
        assert re.match(pattern, lines[0]) or lines[0].startswith("error: --set"), lines[0]


# ------------------------------------------------------------------------------------------------ recipes
def _reference_keys() -> list[tuple]:
    """(section, key) of every recipe key in the reference; technique keys as ("techniques", kind, key)."""
    keys = [((), name) for name in Recipe.model_fields if name != "techniques"]
    for name, info in Recipe.model_fields.items():
        cls = _config_class(info.annotation)
        if cls is not None and issubclass(cls, Config):
            keys += [((name,), k) for k in cls.model_fields]
    for kind, entry in TECHNIQUES.items():
        keys += [(("techniques", kind), k) for k in entry.config.model_fields if k != "kind"]
    return keys


KEYS = _reference_keys()
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, -1, 2**31, 2**32, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 1.0, 1e-300, 1e300]),
    st.text(max_size=12), st.sampled_from(["4x1", "2x2", "linear", "cubic", "bf16", "accuracy", "f1", "sst2", "x"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


def base_recipe(root: Path) -> dict:
    return {"output_dir": str(root / "run"), "model": {"name_or_path": "some/model"},
            "data": {"train_file": "train.csv", "validation_file": "validation.csv", "max_length": 32},
            "training": {"steps": 8, "batch_size": 16}, "techniques": []}


@st.composite
def mutated_recipes(draw):
    edits = draw(st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(["set", "set", "delete", "unknown"]),
                                    VALUES), min_size=1, max_size=4))
    return edits


def apply_edits(recipe: dict, edits) -> dict:
    for (section, key), action, value in edits:
        if section and section[0] == "techniques":
            kind = section[1]
            node = next((t for t in recipe["techniques"] if t.get("kind") == kind), None)
            if node is None:
                node = {"kind": kind}
                recipe["techniques"].append(node)
        elif section:
            node = recipe.setdefault(section[0], {})
            if not isinstance(node, dict):
                node = recipe[section[0]] = {}
        else:
            node = recipe
        if action == "delete":
            node.pop(key, None)
        elif action == "unknown":
            node[key + "_x"] = value
        else:
            node[key] = value
    return recipe


@settings(max_examples=300, **SETTINGS)
@given(edits=mutated_recipes())
def test_recipe_check_random_values(edits):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / "r.yaml"
        path.write_text(yaml.safe_dump(apply_edits(base_recipe(root), edits), sort_keys=False, allow_unicode=True))
        rc, err = run(["recipe", "check", str(path), "--quiet"])
        assert_one_error(rc, err, str(path), need_line=True)
        assert not (root / "run").exists()


DAMAGE_TEXT = st.sampled_from([": ", "- ", "&a ", "*a ", "*nope", "[", "]", "{", "}", "\t", "\n  ", "!!python/object:os.system ",
                               "? ", "<<: *a\n", "%YAML 1.1\n", "---\n", "\x00", "'", '"', "|", "#", "\ufeff", "\x85"])
BOMB = "".join(f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]\n" for p, c in zip("abcdefgh", "bcdefghi"))


@settings(max_examples=300, **SETTINGS)
@given(data=st.data())
def test_recipe_check_yaml_damage(data):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / "r.yaml"
        raw = bytearray(yaml.safe_dump(base_recipe(root), sort_keys=False).encode())
        for _ in range(data.draw(st.integers(1, 3))):
            how = data.draw(st.sampled_from(["truncate", "insert", "flip", "bomb", "bytes"]))
            at = data.draw(st.integers(0, len(raw)))
            if how == "truncate":
                del raw[at:]
            elif how == "insert":
                raw[at:at] = data.draw(DAMAGE_TEXT).encode()
            elif how == "flip" and at < len(raw):
                raw[at] ^= data.draw(st.integers(1, 255))
            elif how == "bomb":
                raw[:0] = ("a: &a [1,2,3,4,5,6,7,8,9]\n" + BOMB).encode()
            elif how == "bytes":
                raw[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        path.write_bytes(bytes(raw))
        rc, err = run(["recipe", "check", str(path), "--quiet"])
        assert_one_error(rc, err, str(path))
        assert not (root / "run").exists()


# ------------------------------------------------------------------------------------------------ checkpoints


CKPTS = ("step-000002", "step-000004")


@st.composite
def checkpoint_damage(draw, files: list[str]):
    out = {}
    for ckpt in CKPTS:
        how = draw(st.sampled_from(["none", "truncate", "flip", "delete"]))
        if how != "none":
            out[ckpt] = (how, draw(st.sampled_from(files)), draw(st.floats(0, 1, exclude_max=True)),
                         draw(st.integers(1, 255)))
    return out


def _checkpoint_files(finished_run: Path) -> list[str]:
    run_dir = Path(yaml.safe_load(finished_run.read_text())["output_dir"])
    return sorted(p.name for p in (run_dir / "checkpoints" / CKPTS[-1]).iterdir())


@pytest.mark.usefixtures("finished_run")
def test_resume_from_damaged_checkpoints(finished_run):
    files = _checkpoint_files(finished_run)
    src = Path(yaml.safe_load(finished_run.read_text())["output_dir"])
    calls = {"resume_cli": 0}

    @settings(max_examples=40, **SETTINGS)
    @given(damage=checkpoint_damage(files))
    def check(damage):
        from sparsify.checkpoint import MANIFEST, resume_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            shutil.copytree(src, run_dir)
            recipe = yaml.safe_load(finished_run.read_text())
            recipe["output_dir"] = str(run_dir)
            (run_dir / "recipe.yaml").write_text((run_dir / "recipe.yaml").read_text().replace(str(src), str(run_dir)))
            for ckpt, (how, name, where, xor) in damage.items():
                f = run_dir / "checkpoints" / ckpt / name
                data = bytearray(f.read_bytes())
                if how == "delete":
                    f.unlink()
                elif how == "truncate":
                    f.write_bytes(bytes(data[: int(where * len(data))]))
                else:
                    data[int(where * len(data))] ^= xor
                    f.write_bytes(bytes(data))
            data_damaged = {c for c, (how, name, *_) in damage.items() if name != MANIFEST}
            try:
                with contextlib.redirect_stderr(io.StringIO()) as err:
                    chosen = resume_checkpoint(run_dir)
            except SparsifyError as e:
                assert "no intact checkpoint" in str(e)
                assert set(damage) == set(CKPTS)  # only when every checkpoint was damaged
                if calls["resume_cli"] >= 3:
                    return  # the whole command (about 1 s each) on the first three such cases only
                before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
                path = Path(tmp) / "r.yaml"
                path.write_text(yaml.safe_dump(recipe))
                calls["resume_cli"] += 1
                rc, cli_err = run(["train", str(path), "--resume", "--no-progress"])
                assert rc == 2
                assert_one_error(rc, cli_err, "--resume")
                assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # nothing written
                return
            assert chosen.name not in data_damaged  # a damaged checkpoint is never resumed from
            newer = [c for c in CKPTS if c > chosen.name]
            assert all(c in damage for c in newer)  # an undamaged newer checkpoint is never skipped
            for c in newer:
                assert c in err.getvalue()

    check()
    print(f"resume --cli calls: {calls['resume_cli']}")


# ------------------------------------------------------------------------------------------------ artifacts
@pytest.fixture
def artifact(sparse_artifact) -> Path:
    return sparse_artifact


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _rehash(art: Path) -> None:
    from sparsify.runtime.model import sha256_file

    m = json.loads((art / "sparsify.json").read_text())
    files = m.get("files") if isinstance(m, dict) else None
    if isinstance(files, dict):
        for name in list(files):
            if (art / name).is_file():
                files[name] = {"sha256": sha256_file(art / name), "bytes": (art / name).stat().st_size}
        (art / "sparsify.json").write_text(json.dumps(m))


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.sampled_from([0, 1, -1, 3, 5, 7, 33, 64]),
              st.floats(allow_nan=False), st.text(max_size=8), st.sampled_from(["4x1", "bert", "gelu", "ratio"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=5)


def test_predict_on_damaged_artifacts(artifact):
    manifest = json.loads((artifact / "sparsify.json").read_text())
    paths = [p for p in _paths(manifest) if p and p[0] != "files"]
    files = sorted(p.name for p in artifact.iterdir())

    @settings(max_examples=100, **SETTINGS)
    @given(data=st.data())
    def check(data):
        with tempfile.TemporaryDirectory() as tmp:
            art = Path(tmp) / "art"
            shutil.copytree(artifact, art)
            for _ in range(data.draw(st.integers(1, 2))):
                kind = data.draw(st.sampled_from(["manifest", "manifest", "manifest", "file"]))
                if kind == "manifest":
                    try:
                        m = json.loads((art / "sparsify.json").read_text())
                    except (OSError, ValueError):
                        continue  # an earlier edit deleted or broke it
                    path = data.draw(st.sampled_from(paths))
                    node = m
                    try:
                        for p in path[:-1]:
                            node = node[p]
                        if data.draw(st.booleans()) and isinstance(node, dict):
                            node.pop(path[-1], None)
                        else:
                            node[path[-1]] = data.draw(JSON_VALUES)
                    except (KeyError, IndexError, TypeError):
                        pass  # an earlier edit removed this path
                    (art / "sparsify.json").write_text(json.dumps(m))
                else:
                    name = data.draw(st.sampled_from(files))
                    f = art / name
                    if not f.is_file():
                        continue
                    raw = bytearray(f.read_bytes())
                    how = data.draw(st.sampled_from(["truncate", "flip", "delete"]))
                    at = data.draw(st.integers(0, max(0, len(raw) - 1)))
                    if how == "delete":
                        f.unlink()
                    elif how == "truncate":
                        f.write_bytes(bytes(raw[:at]))
                    elif raw:
                        raw[at] ^= data.draw(st.integers(1, 255))
                        f.write_bytes(bytes(raw))
                    if name != "sparsify.json" and data.draw(st.booleans()):
                        _rehash(art)  # the manifest lies consistently
            rc, err = run(["predict", str(art), "--text", "a good film", "--text", "bad\tdull"])
            assert_one_error(rc, err, str(art))

    check()
