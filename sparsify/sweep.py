"""``sparsify sweep RECIPE --grid KEY=V1,V2 [--grid ...]``: one recipe over a grid of ``--set`` values.

    points = sweep("recipes/sst2/minilm-l6-4x1-90.yaml", {"techniques.0.final_sparsity": [0.5, 0.8, 0.9]})

The grid is expanded as a cartesian product (keys in the order given, values in the order given). Each point is
the recipe with the grid values applied as ``--set`` overrides (parsed and validated exactly like
``sparsify train --set``) and its own ``output_dir``: ``ROOT/KEY=VALUE__KEY=VALUE`` (characters other than
letters, digits and ``._=+-`` are replaced and a short hash of the exact text is appended, so the name is
deterministic and unique). ``ROOT`` defaults to the recipe's ``output_dir`` + ``-sweep``.

Every point is validated before anything runs. Then each point is, by what its directory holds:

- ``finished`` (``metrics.json`` present): skipped;
- ``resumable`` (a checkpoint, no ``metrics.json``): continued from its newest checkpoint (``train --resume``);
- ``new`` (no directory, or an empty one): trained;
- ``incomplete`` (files but no checkpoint and no ``metrics.json``: still running elsewhere, or killed before its
  first checkpoint): refused, with the directory named; delete it to start that point again.

Optionally each point is exported (``ARTIFACT_DIR = RUN/artifact``, ``sparsify export``) and benchmarked
(``RUN/bench.json``, as written by ``sparsify bench model --json``); both are skipped when their output exists.
``ROOT/sweep.json`` records the recipe, the grid and the points. :func:`sparsify.explore.collect_runs` reads a
sweep root into a table.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsify.errors import RecipeError, SparsifyError

__all__ = ["SweepPoint", "parse_grid", "expand", "point_dir_name", "point_status", "run_or_resume", "sweep", "main"]

SWEEP_FILE = "sweep.json"
ARTIFACT = "artifact"
BENCH = "bench.json"
BENCH_METHODS = ("sparsify", "torch_fp32")
_SAFE = re.compile(r"[^A-Za-z0-9._=+-]")


@dataclass(eq=False)
class SweepPoint:
    """One point of a sweep: its grid values (as override text), run directory and validated recipe."""

    values: dict[str, str]
    output_dir: Path
    overrides: tuple[str, ...]
    recipe: Any  # sparsify.recipe.Recipe

    @property
    def name(self) -> str:
        return self.output_dir.name

    @property
    def status(self) -> str:
        return point_status(self.output_dir)


# -- the grid ---------------------------------------------------------------------------------------------


def _split_values(text: str) -> list[str]:
    """Split ``v1,v2,...`` on the commas outside brackets, braces and quotes (``[0, 2],[1, 3]`` is two values)."""
    values, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += ch
    values.append(current.strip())
    return values


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["techniques.0.final_sparsity=0.5,0.9", ...]`` -> ``{key: [value text, ...]}`` (values stay YAML text,
    parsed later by the recipe loader exactly as ``--set`` values)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SparsifyError(f"--grid {item!r}: expected KEY=V1,V2,..., e.g. --grid techniques.0.final_sparsity=0.5,0.9")
        if key in grid:
            raise SparsifyError(f"--grid {key}: given twice; give all its values in one --grid {key}=V1,V2,...")
        values = _split_values(raw)
        if not raw.strip() or any(v == "" for v in values):
            raise SparsifyError(f"--grid {key}: empty value in {raw!r}; expected {key}=V1,V2,... (comma-separated)")
        grid[key] = values
    return grid


def _value_text(value: Any) -> str:
    """A grid value as ``--set`` text: strings as they are, anything else as JSON (a subset of YAML)."""
    return value if isinstance(value, str) else json.dumps(value)


def _normalize_grid(grid: Mapping[str, Sequence[Any]] | Sequence[str]) -> dict[str, list[str]]:
    if not isinstance(grid, Mapping):
        return parse_grid(list(grid))
    out: dict[str, list[str]] = {}
    for key, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise SparsifyError(f"--grid {key}: expected a non-empty list of values, got {values!r}")
        out[str(key)] = [_value_text(v) for v in values]
    return out


def _check_grid(grid: dict[str, list[str]], overrides: Sequence[str]) -> None:
    set_keys = {o.partition("=")[0].strip() for o in overrides}
    for key, values in grid.items():
        if key == "output_dir":
            raise SparsifyError("--grid output_dir: not allowed, the sweep gives each point its own output_dir "
                                "(choose the parent with --root)")
        if key in set_keys:
            raise SparsifyError(f"--grid {key}: also given with --set; give it in one place")
        seen = set()
        for v in values:
            if v in seen:
                raise SparsifyError(f"--grid {key}: value {v!r} given twice (values: {', '.join(values)})")
            seen.add(v)


def point_dir_name(values: Mapping[str, str]) -> str:
    """The directory name of a point, from its grid values (deterministic, unique, file-system safe)."""
    text = "__".join(f"{k}={v}" for k, v in values.items())
    safe = _SAFE.sub("_", text)
    if safe != text or len(safe) > 120 or not safe:
        safe = f"{safe[:100]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return safe


def expand(recipe_path: str | Path, grid: Mapping[str, Sequence[Any]] | Sequence[str], *,
           overrides: Sequence[str] = (), root: str | Path | None = None) -> list[SweepPoint]:
    """The points of a sweep, every one loaded and validated (raises :class:`SparsifyError` naming the grid key)."""
    from sparsify.recipe import load_recipe

    base = load_recipe(recipe_path, list(overrides))  # a problem of the recipe or of --set, reported as such
    grid = _normalize_grid(grid)
    _check_grid(grid, overrides)
    root = Path(root) if root is not None else Path(base.output_dir + "-sweep")
    points = []
    for combo in itertools.product(*grid.values()) if grid else [()]:
        values = dict(zip(grid, combo))
        out = root / point_dir_name(values)
        point_overrides = [*overrides, *(f"{k}={v}" for k, v in values.items()), f"output_dir={out}"]
        try:
            recipe = load_recipe(recipe_path, point_overrides)
        except RecipeError as e:
            raise _grid_error(e, values, grid) from None
        points.append(SweepPoint(values=values, output_dir=out, overrides=tuple(point_overrides), recipe=recipe))
    return points


def _grid_error(e: RecipeError, values: dict[str, str], grid: dict[str, list[str]]) -> SparsifyError:
    """A recipe error caused by a grid point, reported against the grid key (with the values it was given)."""
    from sparsify.recipe import format_path

    text = str(e)
    for key, value in values.items():
        path = format_path(tuple(int(p) if p.isdigit() else p for p in key.split(".")))
        allowed = f" (grid values: {', '.join(grid[key])})"
        if e.file == "--set" and e.key is not None and (e.key == path or e.key.startswith((path + ".", path + "["))):
            return SparsifyError(f"--grid {key}={value}: {e.key}: {e.reason}{allowed}")
        if text.startswith((f"--set {path}:", f"--set '{key}=")):  # the override itself: bad path or YAML
            return SparsifyError("--grid" + text[len("--set"):] + allowed)
    label = ", ".join(f"{k}={v}" for k, v in values.items())
    return SparsifyError(f"--grid point {label}: {e}")


# -- running ----------------------------------------------------------------------------------------------


def point_status(run_dir: str | Path) -> str:
    """``finished`` (metrics.json), ``resumable`` (a checkpoint), ``new`` (absent or empty) or ``incomplete``."""
    from sparsify.checkpoint import checkpoint_dirs

    run_dir = Path(run_dir)
    if (run_dir / "metrics.json").is_file():
        return "finished"
    if checkpoint_dirs(run_dir):
        return "resumable"
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "new"
    return "incomplete"


def _incomplete_error(run_dir: Path) -> SparsifyError:
    return SparsifyError(f"{run_dir} holds a run without a checkpoint or metrics.json (still running elsewhere, or "
                         "killed before its first checkpoint); delete that directory to start it again")


def run_or_resume(recipe, *, progress: bool = True, log: Callable[[str], None] | None = print) -> Path:
    """Train a recipe, resume it from its newest checkpoint, or skip it when finished; returns the run directory.

    A finished run whose ``recipe.yaml`` differs from ``recipe`` is kept (and said so): delete it, or use another
    output_dir, to train it again."""
    from sparsify.train import train

    run_dir = Path(recipe.output_dir)
    status = point_status(run_dir)
    if status == "incomplete":
        raise _incomplete_error(run_dir)
    if status == "finished":
        if log is not None:
            saved = run_dir / "recipe.yaml"
            same = saved.is_file() and saved.read_text() == recipe.to_yaml()
            log(f"{run_dir}: finished, skipped" + ("" if same else " (its recipe.yaml differs from this recipe; "
                                                             "delete the directory to train it again)"))
        return run_dir
    if log is not None:
        log(f"{run_dir}: {'resuming' if status == 'resumable' else 'training'}")
    return train(recipe, resume=status == "resumable", progress=progress)


def _export_point(run_dir: Path, log) -> Path:
    from sparsify.export import export

    artifact = run_dir / ARTIFACT
    if not (artifact / "sparsify.json").is_file():
        summary = export(run_dir, artifact, overwrite=True)
        if log is not None:
            log(f"{run_dir}: exported to {artifact} ({summary['artifact_bytes'] / 1e6:.1f} MB)")
    return artifact


def _bench_point(run_dir: Path, artifact: Path, options: Mapping[str, Any], log) -> Path:
    from sparsify.bench_model import run_benchmark

    path = run_dir / BENCH
    if not path.is_file():
        opts = {"methods": BENCH_METHODS, "cold_start": False, **options}
        result = run_benchmark(str(artifact), log=lambda s: None, **opts)
        path.write_text(json.dumps(result, indent=1))
        if log is not None:
            ours = [r for r in result["records"] if r["method"] == "sparsify"]
            log(f"{run_dir}: benchmarked -> {path} (" + ", ".join(
                f"{r['scenario']} x{r['speedup_vs_torch_fp32']:.2f}" for r in ours if r["speedup_vs_torch_fp32"]) + ")")
    return path


def sweep(recipe_path: str | Path, grid: Mapping[str, Sequence[Any]] | Sequence[str], *,
          overrides: Sequence[str] = (), root: str | Path | None = None, dry_run: bool = False,
          export: bool = False, bench: Mapping[str, Any] | bool | None = None, progress: bool = True,
          log: Callable[[str], None] | None = print) -> list[SweepPoint]:
    """Expand ``recipe_path`` over ``grid`` (``{key: [values]}`` or ``["key=v1,v2", ...]``) and train, resume or
    skip each point; with ``export`` each point is exported to ``RUN/artifact``, with ``bench`` (True, or keyword
    options of :func:`sparsify.bench_model.run_benchmark`, e.g. ``{"quick": True}``) also benchmarked into
    ``RUN/bench.json``. ``dry_run``: only validate and report. Returns the points."""
    points = expand(recipe_path, grid, overrides=overrides, root=root)
    root = points[0].output_dir.parent
    blocked = [p for p in points if p.status == "incomplete"]
    if log is not None:
        log(f"sweep of {recipe_path}: {len(points)} point(s) under {root}")
        for p in points:
            log(f"  {p.status:10s} {p.name}")
    if blocked:
        raise _incomplete_error(blocked[0].output_dir)
    if dry_run:
        return points
    root.mkdir(parents=True, exist_ok=True)
    (root / SWEEP_FILE).write_text(json.dumps({
        "recipe": str(recipe_path), "overrides": list(overrides),
        "grid": {k: list(v) for k, v in _normalize_grid(grid).items()},
        "points": [{"name": p.name, "values": p.values, "output_dir": str(p.output_dir)} for p in points],
    }, indent=1) + "\n")
    bench_options = {} if bench is True else dict(bench or {})
    for i, p in enumerate(points, 1):
        if log is not None:
            log(f"[{i}/{len(points)}] " + ", ".join(f"{k}={v}" for k, v in p.values.items()))
        run_or_resume(p.recipe, progress=progress, log=log)
        if export or bench:
            artifact = _export_point(p.output_dir, log)
            if bench:
                _bench_point(p.output_dir, artifact, bench_options, log)
    return points


# -- the command line ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparsify sweep",
        description="Train one recipe over a grid of --set values (the cartesian product of every --grid).\n"
                    "Each point gets its own output_dir, ROOT/KEY=VALUE__KEY=VALUE. A finished point (metrics.json)\n"
                    "is skipped and one with a checkpoint is resumed, so the same command again continues the sweep.\n"
                    "ROOT/sweep.json records the grid; sparsify.explore.collect_runs(ROOT) reads the results.",
        epilog="examples:\n"
               "  sparsify sweep recipes/sst2/minilm-l6-4x1-90.yaml --grid techniques.0.final_sparsity=0.5,0.8,0.9\n"
               "  sparsify sweep recipes/quickstart.yaml --grid techniques.0.block=4x1,1x4 "
               "--grid training.learning_rate=5e-5,1e-4 --dry-run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="path to a YAML recipe, e.g. recipes/quickstart.yaml")
    p.add_argument("--grid", action="append", default=[], metavar="KEY.PATH=V1,V2,...", required=True,
                   help="a recipe key and its values, comma-separated (repeatable; the points are every combination). "
                        "Values are parsed as YAML like --set values; a list value is written in brackets: "
                        "--grid 'model.layers=[0,2,4],[0,5]'")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a recipe field for every point (repeatable), as in 'sparsify train --set'")
    p.add_argument("--root", default=None, help="parent directory of the points (default: the recipe's output_dir "
                                                "+ '-sweep')")
    p.add_argument("--dry-run", action="store_true", help="validate every point and print what would run, run nothing")
    p.add_argument("--export", action="store_true", help="export each point to RUN/artifact (sparsify export)")
    p.add_argument("--bench", action="store_true", help="also benchmark each artifact against PyTorch fp32 into "
                                                       "RUN/bench.json (implies --export)")
    p.add_argument("--bench-quick", action="store_true", help="the benchmark's --quick mode (smoke)")
    p.add_argument("--bench-rounds", type=int, default=7, help="benchmark rounds (default 7)")
    p.add_argument("--threads", type=int, default=2, help="benchmark threads (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """``sparsify sweep ...``; a user mistake prints one ``error:`` line and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        if args.bench_rounds < 1 or args.threads < 1:
            raise SparsifyError("--bench-rounds and --threads must be >= 1")
        bench = {"quick": args.bench_quick, "rounds": args.bench_rounds, "threads": args.threads} if args.bench else None
        sweep(args.recipe, args.grid, overrides=args.overrides, root=args.root, dry_run=args.dry_run,
              export=args.export, bench=bench, progress=not args.no_progress)
    except SparsifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
