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


def run_in_repo_root(code: str) -> subprocess.CompletedProcess:
    """Python started in the repository root: its sys.path[0] is the root, as for `python`, notebooks, scripts."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_top_level_kernels_is_not_this_repository():
    """Wherever the venv lives (inside the repository too), `import kernels` from the root is never `kernels/`."""
    out = run_in_repo_root(
        "import importlib.util, json; s = importlib.util.find_spec('kernels');"
        "print(json.dumps(None if s is None else [s.origin, list(s.submodule_search_locations or [])]))"
    )
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    if found is not None:
        origin, locations = found
        places = [Path(p).resolve() for p in [origin, *locations] if p]
        ours = REPO / "kernels"
        assert not any(p == ours or p == ours / "__init__.py" for p in places), (
            f"'import kernels' in the repository root resolves to {places}: it would shadow the Hugging Face package"
        )
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/__init__.py makes the folder a top-level package"


def test_transformers_and_sparsify_kernels_work_from_the_repository_root():
    code = (
        "from transformers import BertModel\n"
        "import numpy as np\n"
        "from sparsify.kernels.format import BlockSparseMatrix\n"
        "from sparsify.kernels.spmm import spmm\n"
        "rng = np.random.default_rng(0)\n"
        "w = rng.standard_normal((8, 12)).astype(np.float32); w[:4, ::2] = 0\n"
        "x = rng.standard_normal((5, 12)).astype(np.float32)\n"
        "m = BlockSparseMatrix.from_dense(w, block=(4, 1))\n"
        "np.testing.assert_allclose(spmm(x, m), x @ w.T, rtol=1e-5, atol=1e-5)\n"
        "print('ok', BertModel.__name__)\n"
    )
    out = run_in_repo_root(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", "BertModel"]


def test_sparsify_kernels_maps_to_the_kernels_folder():
    import sparsify.kernels

    assert Path(sparsify.kernels.__file__).resolve() == REPO / "kernels" / "sparsify_kernels" / "__init__.py"


def test_every_command_has_help():
    from sparsify.cli import DELEGATED, main

    for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["recipe", "check", "--help"],
                 ["recipe", "reference", "--help"], *[[name, "--help"] for name in DELEGATED], ["bench", "kernels", "--help"],
                 ["bench", "model", "--help"]):
        out = subprocess.run([sys.executable, "-m", "sparsify", *argv], capture_output=True, text=True)
        assert out.returncode == 0, (argv, out.stderr)
        assert "usage: sparsify" in out.stdout + out.stderr, argv


def test_wheel_ships_the_kernels_as_sparsify_kernels_only(tmp_path):
    """The built wheel holds sparsify/kernels/*.py and no top-level kernels/, and SpMM runs from it."""
    import zipfile

    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "sparsify/kernels/spmm.py" in names and "sparsify/kernels/__init__.py" in names
    assert not [n for n in names if n.startswith("kernels/")]
    target = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                          str(wheel)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    code = (
        "import numpy as np, sparsify.kernels\n"
        "from sparsify.kernels.format import BlockSparseMatrix\n"
        "from sparsify.kernels.spmm import spmm\n"
        "w = np.arange(96, dtype=np.float32).reshape(8, 12) / 50; w[4:, ::3] = 0\n"
        "x = np.ones((3, 12), np.float32)\n"
        "assert np.allclose(spmm(x, BlockSparseMatrix.from_dense(w, block=(4, 1))), x @ w.T, atol=1e-4)\n"
        "print(sparsify.kernels.__file__)\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().startswith(str(target))
