"""Evolutionary search of a length configuration under a FLOPs budget: ``sparsify search``.

    sparsify search RUN_DIR --budget 0.5 [--population 16] [--generations 8] [--seed 0]

Searches per-layer kept ratios (multiples of ``--grid``, non-increasing) that maximize the run's validation
metric while the FLOPs per example stay within ``budget`` x the full-length FLOPs (FLOPs = 2 x MACs, counted
over the validation examples' real tokens; see ``flops.py``). The search (as in Kim & Cho 2021):

1. generation 0: the full-length configuration, a uniform-decay configuration that just fits the budget, and
   random LengthDrop-style samples of varied strength (``population`` in all);
2. each generation: the parents are the Pareto frontier of everything evaluated so far (higher metric, fewer
   FLOPs) plus the best configurations within the budget; ``population`` new children are made by mutation
   (each layer's ratio scaled by a factor in [0.75, 1.25] with probability ``mutation_prob``) or crossover
   (each layer from one of two parents), snapped to the grid and made non-increasing; configurations already
   evaluated are not evaluated again (when no new child can be made, new random samples take their place);
3. the result: the frontier of every evaluated configuration, and the chosen one: the best metric within the
   budget (ties: fewer FLOPs).

Every random choice comes from one ``random.Random(seed)``, and evaluation is deterministic, so a seed gives
the same search. Writes ``RUN_DIR/search/frontier.json`` and ``frontier.png``, and the chosen configuration
into ``RUN_DIR/model/length_config.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sparsify.errors import SparsifyError
from sparsify.techniques.length_adaptive.flops import UNIT, format_flops

Ratios = tuple[float, ...]


@dataclass(frozen=True)
class Candidate:
    length_config: Ratios
    metric: float
    flops_fraction: float


@dataclass
class SearchResult:
    chosen: Candidate
    frontier: list[Candidate]
    evaluated: list[Candidate]
    history: list[dict] = field(default_factory=list)


def dominates(a: Candidate, b: Candidate) -> bool:
    """``a`` is at least as good as ``b`` on both axes (metric up, FLOPs down) and better on one."""
    return (a.metric >= b.metric and a.flops_fraction <= b.flops_fraction
            and (a.metric > b.metric or a.flops_fraction < b.flops_fraction))


def pareto_frontier(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The non-dominated candidates, by increasing FLOPs."""
    front = [c for c in candidates if not any(dominates(o, c) for o in candidates)]
    unique = {c.length_config: c for c in front}
    return sorted(unique.values(), key=lambda c: (c.flops_fraction, -c.metric, c.length_config))


def _snap(ratios: Sequence[float], grid: float) -> Ratios:
    """Multiples of ``grid`` in [grid, 1], non-increasing."""
    steps = round(1.0 / grid)
    out, prev = [], steps
    for r in ratios:
        k = min(prev, max(1, round(r * steps)))
        out.append(k)
        prev = k
    return tuple(round(k / steps, 6) for k in out)


def _uniform_decay(num_layers: int, cost: Callable[[Ratios], float], budget: float, grid: float) -> Ratios:
    """``r_i = d^(i+1)`` with the largest decay factor ``d`` (bisection) whose snapped configuration fits."""
    lo, hi = 0.0, 1.0
    best = _snap([grid] * num_layers, grid)
    for _ in range(30):
        d = (lo + hi) / 2
        cfg = _snap([d ** (i + 1) for i in range(num_layers)], grid)
        if cost(cfg) <= budget:
            best, lo = cfg, d
        else:
            hi = d
    return best


def evolutionary_search(evaluate: Callable[[Ratios], float], cost: Callable[[Ratios], float], num_layers: int,
                        budget: float, *, population: int = 16, generations: int = 8, mutation_prob: float = 0.5,
                        grid: float = 0.05, seed: int = 0, log: Callable[[str], None] | None = None) -> SearchResult:
    """Search ratio configurations; ``evaluate(cfg)`` returns the metric (higher is better), ``cost(cfg)`` the
    FLOPs fraction of full length. Deterministic for a seed (given deterministic ``evaluate``)."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1] (a fraction of the full-length FLOPs), got {budget}")
    if population < 2 or generations < 0 or not 0.0 < grid <= 0.5 or not 0.0 <= mutation_prob <= 1.0:
        raise ValueError("population >= 2, generations >= 0, grid in (0, 0.5], mutation_prob in [0, 1]")
    rng = random.Random(seed)
    seen: dict[Ratios, Candidate] = {}
    history = []

    def add(cfg: Ratios) -> bool:
        if cfg in seen:
            return False
        seen[cfg] = Candidate(cfg, float(evaluate(cfg)), float(cost(cfg)))
        return True

    def sample_random() -> Ratios:
        bound = rng.uniform(0.05, 0.6)
        r, out = 1.0, []
        for _ in range(num_layers):
            r *= 1.0 - bound * rng.random()
            out.append(r)
        return _snap(out, grid)

    def mutate(parent: Ratios) -> Ratios:
        return _snap([r * rng.uniform(0.75, 1.25) if rng.random() < mutation_prob else r for r in parent], grid)

    def crossover(a: Ratios, b: Ratios) -> Ratios:
        return _snap([x if rng.random() < 0.5 else y for x, y in zip(a, b)], grid)

    def fill(make: Callable[[], Ratios], count: int) -> int:
        added, tries = 0, 0
        while added < count and tries < 20 * count:
            tries += 1
            added += add(make())
        return added

    def report(generation: int) -> None:
        within = [c for c in seen.values() if c.flops_fraction <= budget]
        best = max(within, key=lambda c: (c.metric, -c.flops_fraction), default=None)
        entry = {"generation": generation, "evaluated": len(seen),
                 "best_within_budget": None if best is None else asdict(best)}
        history.append(entry)
        if log is not None:
            text = "none yet" if best is None else f"{best.metric:.4f} at {best.flops_fraction:.1%} of full-length FLOPs"
            log(f"generation {generation}/{generations}: {len(seen)} configurations evaluated, best within budget {text}")

    add(tuple([1.0] * num_layers))
    add(_uniform_decay(num_layers, cost, budget, grid))
    fill(sample_random, population - len(seen))
    report(0)
    for generation in range(1, generations + 1):
        evaluated = sorted(seen.values(), key=lambda c: c.length_config)
        within = sorted((c for c in evaluated if c.flops_fraction <= budget),
                        key=lambda c: (-c.metric, c.flops_fraction, c.length_config))
        parents = [c.length_config for c in pareto_frontier(evaluated)]
        parents += [c.length_config for c in within[: max(2, population // 2)] if c.length_config not in parents]
        added = fill(lambda: mutate(rng.choice(parents)) if rng.random() < 0.5 or len(parents) < 2
                     else crossover(*rng.sample(parents, 2)), population)
        fill(sample_random, population - added)  # children all seen already: fresh random configurations instead
        report(generation)

    evaluated = sorted(seen.values(), key=lambda c: (c.flops_fraction, c.length_config))
    within = [c for c in evaluated if c.flops_fraction <= budget]
    if not within:
        raise SparsifyError(f"no configuration within the budget {budget:g} of the full-length FLOPs; raise --budget "
                            f"(the smallest evaluated is {evaluated[0].flops_fraction:.1%})")
    chosen = max(within, key=lambda c: (c.metric, -c.flops_fraction, c.length_config))
    return SearchResult(chosen=chosen, frontier=pareto_frontier(evaluated), evaluated=evaluated, history=history)


# -- a run directory ----------------------------------------------------------------------------------------


def _candidate_json(c: Candidate, full_flops: float, metric: str) -> dict:
    return {"length_config": list(c.length_config), metric: c.metric, "flops_fraction": round(c.flops_fraction, 6),
            "flops_per_example": round(c.flops_fraction * full_flops, 1)}


def plot_frontier(result: SearchResult, budget: float, metric: str, path: Path) -> Path | None:
    """The frontier as a PNG; None (no plot) when matplotlib is not installed (``pip install matplotlib``)."""
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.scatter([c.flops_fraction for c in result.evaluated], [c.metric for c in result.evaluated], s=12,
               color="0.7", label="evaluated")
    ax.plot([c.flops_fraction for c in result.frontier], [c.metric for c in result.frontier], "o-", ms=4,
            label="Pareto frontier")
    ax.plot([result.chosen.flops_fraction], [result.chosen.metric], "r*", ms=12, label="chosen")
    ax.axvline(budget, color="r", ls="--", lw=1, label=f"budget {budget:g}")
    ax.set_xlabel("FLOPs per example / full-length FLOPs (FLOPs = 2 x MACs)")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("length configurations")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def search_run(run_dir: str | Path, budget: float, *, population: int = 16, generations: int = 8, seed: int = 0,
               mutation_prob: float = 0.5, grid: float = 0.05, batch_size: int = 128, max_samples: int | None = None,
               log: Callable[[str], None] | None = print) -> dict:
    """Search a trained run's model on its validation data; writes ``search/frontier.{json,png}`` in the run
    directory and ``model/length_config.json``. Returns the frontier document."""
    import torch

    from sparsify.data import collator, load_task_data
    from sparsify.evaluation import evaluate
    from sparsify.metrics import main_metric
    from sparsify.modeling import load_classifier, load_tokenizer
    from sparsify.recipe import load_recipe
    from sparsify.student import encoder_layers
    from sparsify.techniques.length_adaptive.config import save_length_config
    from sparsify.techniques.length_adaptive.flops import EncoderDims, dataset_flops
    from sparsify.techniques.length_adaptive.inference import check_model, forward_with_lengths

    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if not (run_dir / "recipe.yaml").is_file() or not model_dir.is_dir():
        raise SparsifyError(f"{run_dir}: not a run directory (expected recipe.yaml and model/ from 'sparsify train')")
    recipe = load_recipe(run_dir / "recipe.yaml")
    task = recipe.data.metric_task
    # the training data too: the label ids come from it, exactly as in training
    data_cfg = recipe.data if max_samples is None else recipe.data.model_copy(update={"max_eval_samples": max_samples})
    tokenizer = load_tokenizer(str(model_dir))
    data = load_task_data(data_cfg, tokenizer, recipe)
    model = load_classifier(str(model_dir), num_labels=data.num_labels,
                            label_names=data.label_names, is_regression=data.is_regression)
    model.eval()
    try:
        check_model(model)
    except TypeError as e:
        raise SparsifyError(f"{model_dir}: {e}") from None
    num_layers = len(encoder_layers(model))
    metric = main_metric(task)
    collate = collator(tokenizer)
    rows = [{k: v for k, v in row.items()} for row in data.eval]
    batches = [collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    lengths = [int(sum(row["attention_mask"])) for row in rows]
    dims = EncoderDims.from_config(model.config)
    full = dataset_flops(dims, None, lengths)["full_flops_per_example"]

    def run_eval(cfg: Ratios) -> float:
        metrics = evaluate(model, batches, task, is_regression=data.is_regression,
                           forward=lambda m, inputs: forward_with_lengths(m, inputs, cfg))
        if metric not in metrics:
            raise SparsifyError(f"evaluation gave no {metric!r} (got {', '.join(metrics)})")
        return metrics[metric]

    def cost(cfg: Ratios) -> float:
        return dataset_flops(dims, cfg, lengths)["fraction"]

    if log is not None:
        log(f"searching {num_layers}-layer length configurations of {model_dir} on {len(rows)} {task} validation "
            f"examples: budget {budget:g} x full-length {format_flops(full)} per example ({UNIT}); population "
            f"{population}, {generations} generations, seed {seed}")
    started = time.monotonic()
    with torch.no_grad():
        result = evolutionary_search(run_eval, cost, num_layers, budget, population=population,
                                     generations=generations, mutation_prob=mutation_prob, grid=grid, seed=seed,
                                     log=log)
    out_dir = run_dir / "search"
    out_dir.mkdir(exist_ok=True)
    doc = {
        "task": task, "metric": metric, "budget": budget, "unit": UNIT, "full_flops_per_example": full,
        "examples": len(rows), "seed": seed, "population": population, "generations": generations,
        "mutation_prob": mutation_prob, "grid": grid, "wall_time_s": round(time.monotonic() - started, 1),
        "chosen": _candidate_json(result.chosen, full, metric),
        "frontier": [_candidate_json(c, full, metric) for c in result.frontier],
        "evaluated": [_candidate_json(c, full, metric) for c in result.evaluated],
        "history": result.history,
    }
    (out_dir / "frontier.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot = plot_frontier(result, budget, metric, out_dir / "frontier.png")
    save_length_config(model_dir, result.chosen.length_config, source="search", budget=budget, metric=metric,
                       **{metric: result.chosen.metric}, flops_fraction=round(result.chosen.flops_fraction, 6),
                       flops_per_example=round(result.chosen.flops_fraction * full, 1), unit=UNIT)
    if log is not None:
        c = result.chosen
        log(f"chosen {list(c.length_config)}: {metric} {c.metric:.4f} (full length "
            f"{next(e.metric for e in result.evaluated if e.flops_fraction == 1.0):.4f}), "
            f"{format_flops(c.flops_fraction * full)} per example = {c.flops_fraction:.1%} of full-length FLOPs")
        plotted = str(plot) if plot is not None else "no plot (matplotlib is not installed)"
        log(f"-> {model_dir / 'length_config.json'}, {out_dir / 'frontier.json'}, {plotted}")
    return doc


def main(argv: list[str] | None = None) -> int:
    """``sparsify search RUN_DIR --budget 0.5 [...]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="sparsify search",
        description="Evolutionary search of the per-layer kept lengths of a length-adaptive run: the best validation "
                    "metric within a FLOPs budget (FLOPs = 2 x MACs, as a fraction of the full-length FLOPs). Writes "
                    "RUN_DIR/search/frontier.{json,png} and RUN_DIR/model/length_config.json.",
    )
    parser.add_argument("run_dir", help="run directory of 'sparsify train' (recipe.yaml and model/)")
    parser.add_argument("--budget", type=float, required=True,
                        help="FLOPs per example allowed, as a fraction of the full-length model's, in (0, 1], e.g. 0.5")
    parser.add_argument("--population", type=int, default=16, help="configurations per generation (default 16)")
    parser.add_argument("--generations", type=int, default=8, help="generations after the first (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the search (default 0)")
    parser.add_argument("--mutation-prob", type=float, default=0.5, help="per-layer mutation probability (default 0.5)")
    parser.add_argument("--grid", type=float, default=0.05, help="ratios are multiples of this (default 0.05)")
    parser.add_argument("--batch-size", type=int, default=128, help="evaluation batch size (default 128)")
    parser.add_argument("--max-samples", type=int, default=None, help="search on the first N validation examples")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print the frontier document as JSON")
    args = parser.parse_args(argv)
    try:
        checks = [("--budget", 0.0 < args.budget <= 1.0, "must be in (0, 1]: a fraction of the full-length FLOPs"),
                  ("--population", args.population >= 2, "must be >= 2"),
                  ("--generations", args.generations >= 0, "must be >= 0"),
                  ("--mutation-prob", 0.0 <= args.mutation_prob <= 1.0, "must be in [0, 1]"),
                  ("--grid", 0.0 < args.grid <= 0.5, "must be in (0, 0.5]"),
                  ("--batch-size", args.batch_size >= 1, "must be >= 1"),
                  ("--max-samples", args.max_samples is None or args.max_samples >= 1, "must be >= 1"),
                  ("--threads", args.threads is None or args.threads >= 1, "must be >= 1")]
        for key, ok, message in checks:
            if not ok:
                raise SparsifyError(f"{key}: {message}, got {getattr(args, key[2:].replace('-', '_'))}")
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        log = (lambda text: print(text, file=sys.stderr)) if args.json else print
        doc = search_run(args.run_dir, args.budget, population=args.population, generations=args.generations,
                         seed=args.seed, mutation_prob=args.mutation_prob, grid=args.grid, batch_size=args.batch_size,
                         max_samples=args.max_samples, log=log)
    except SparsifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
