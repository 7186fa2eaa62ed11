"""Packaging guards: a lean `import sparsify`, and `kernels/` never importable as a top-level `kernels`."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ["torch", "transformers", "numba", "datasets", "accelerate", "evaluate", "scipy"]


def imported_after(statement: str) -> list[str]:
    code = f"import sys; {statement}; import json; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    return json.loads(out.stdout)


def test_import_sparsify_is_lean():
    modules = imported_after("import sparsify")
    assert not [m for m in HEAVY if m in modules]


def test_recipe_loading_needs_no_torch():
    modules = imported_after("import sparsify.recipe, sparsify.cli")
    assert not [m for m in HEAVY if m in modules]


def test_kernels_package_imports_without_jit():
    modules = imported_after("import sparsify.kernels")
    assert "numba" not in modules and "torch" not in modules


def test_top_level_kernels_is_not_this_repository():
    spec = importlib.util.find_spec("kernels")
    if spec is not None:
        origin = Path(spec.origin or next(iter(spec.submodule_search_locations or []), "")).resolve()
        assert REPO not in origin.parents, f"'import kernels' resolves to {origin}: it would shadow the HF package"
    from transformers.utils import import_utils

    assert not (import_utils.is_kernels_available() and spec is not None and REPO in Path(spec.origin).parents)


def test_sparsify_kernels_maps_to_the_kernels_folder():
    import sparsify.kernels

    assert Path(sparsify.kernels.__file__).resolve() == REPO / "kernels" / "__init__.py"


def test_every_command_has_help():
    from sparsify.cli import DELEGATED, main

    for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["recipe", "check", "--help"],
                 ["recipe", "reference", "--help"], *[[name, "--help"] for name in DELEGATED], ["bench", "kernels", "--help"],
                 ["bench", "model", "--help"]):
        out = subprocess.run([sys.executable, "-m", "sparsify", *argv], capture_output=True, text=True)
        assert out.returncode == 0, (argv, out.stderr)
        assert "usage: sparsify" in out.stdout + out.stderr, argv
