"""Evolutionary search of a length configuration under a FLOPs or latency budget: ``sparsify search``.

    sparsify search RUN_DIR --budget 0.5 [--cost flops|latency] [--population 16] [--generations 8] [--seed 0]

Searches per-layer kept ratios (multiples of ``--grid``, non-increasing) that maximize the run's validation
metric while the cost stays within ``budget`` x the full-length cost. The cost is either

- ``flops`` (default): FLOPs per example (FLOPs = 2 x MACs, counted over the validation examples' real tokens;
  see ``flops.py``): exact and repeatable;
- ``latency``: wall time of the CPU runtime (``sparsify.runtime``) on the run's exported artifact, over a fixed
  set of validation batches, median of a few repeats, as a fraction of the full-length time: what a deployment
  pays, but measured, so it carries the machine's noise (a few percent on a quiet machine).

The search (as in Kim & Cho 2021):

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
    cost: float  # fraction of the full-length cost (FLOPs or latency)


@dataclass
class SearchResult:
    chosen: Candidate
    frontier: list[Candidate]
    evaluated: list[Candidate]
    history: list[dict] = field(default_factory=list)


def dominates(a: Candidate, b: Candidate) -> bool:
    """``a`` is at least as good as ``b`` on both axes (metric up, cost down) and better on one."""
    return (a.metric >= b.metric and a.cost <= b.cost
            and (a.metric > b.metric or a.cost < b.cost))


def pareto_frontier(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The non-dominated candidates, by increasing cost."""
    front = [c for c in candidates if not any(dominates(o, c) for o in candidates)]
    unique = {c.length_config: c for c in front}
    return sorted(unique.values(), key=lambda c: (c.cost, -c.metric, c.length_config))


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
                        grid: float = 0.05, seed: int = 0, log: Callable[[str], None] | None = None,
                        cost_name: str = "FLOPs") -> SearchResult:
    """Search ratio configurations; ``evaluate(cfg)`` returns the metric (higher is better), ``cost(cfg)`` the
    cost as a fraction of full length. Deterministic for a seed (given deterministic ``evaluate`` and ``cost``).
    ``cost_name`` labels the cost in the log."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1] (a fraction of the full-length cost), got {budget}")
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
        within = [c for c in seen.values() if c.cost <= budget]
        best = max(within, key=lambda c: (c.metric, -c.cost), default=None)
        entry = {"generation": generation, "evaluated": len(seen),
                 "best_within_budget": None if best is None else asdict(best)}
        history.append(entry)
        if log is not None:
            text = "none yet" if best is None else f"{best.metric:.4f} at {best.cost:.1%} of full-length {cost_name}"
            log(f"generation {generation}/{generations}: {len(seen)} configurations evaluated, best within budget {text}")

    add(tuple([1.0] * num_layers))
    add(_uniform_decay(num_layers, cost, budget, grid))
    fill(sample_random, population - len(seen))
    report(0)
    for generation in range(1, generations + 1):
        evaluated = sorted(seen.values(), key=lambda c: c.length_config)
        within = sorted((c for c in evaluated if c.cost <= budget),
                        key=lambda c: (-c.metric, c.cost, c.length_config))
        parents = [c.length_config for c in pareto_frontier(evaluated)]
        parents += [c.length_config for c in within[: max(2, population // 2)] if c.length_config not in parents]
        added = fill(lambda: mutate(rng.choice(parents)) if rng.random() < 0.5 or len(parents) < 2
                     else crossover(*rng.sample(parents, 2)), population)
        fill(sample_random, population - added)  # children all seen already: fresh random configurations instead
        report(generation)

    evaluated = sorted(seen.values(), key=lambda c: (c.cost, c.length_config))
    within = [c for c in evaluated if c.cost <= budget]
    if not within:
        raise SparsifyError(f"no configuration within the budget {budget:g} of the full-length {cost_name}; raise --budget "
                            f"(the smallest evaluated is {evaluated[0].cost:.1%})")
    chosen = max(within, key=lambda c: (c.metric, -c.cost, c.length_config))
    return SearchResult(chosen=chosen, frontier=pareto_frontier(evaluated), evaluated=evaluated, history=history)


# -- a run directory ----------------------------------------------------------------------------------------


def _candidate_json(c: Candidate, metric: str, flops_fraction: Callable[[Ratios], float], full_flops: float,
                    cost: str) -> dict:
    f = flops_fraction(c.length_config)
    out = {"length_config": list(c.length_config), metric: c.metric, "flops_fraction": round(f, 6),
           "flops_per_example": round(f * full_flops, 1)}
    if cost == "latency":
        out["latency_fraction"] = round(c.cost, 6)
    return out


def plot_frontier(result: SearchResult, budget: float, metric: str, path: Path, cost: str = "flops",
                  truncation: Sequence[dict] | None = None) -> Path | None:
    """The frontier as a PNG; None (no plot) when matplotlib is not installed (``pip install matplotlib``)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None

    # a Figure without pyplot: no backend switch, so a notebook's inline plots keep working
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    ax.scatter([c.cost for c in result.evaluated], [c.metric for c in result.evaluated], s=12,
               color="0.7", label="evaluated")
    ax.plot([c.cost for c in result.frontier], [c.metric for c in result.frontier], "o-", ms=4,
            label="Pareto frontier")
    ax.plot([result.chosen.cost], [result.chosen.metric], "r*", ms=12, label="chosen")
    if truncation:
        ax.plot([e["flops_fraction"] for e in truncation], [e["truncated_" + metric] for e in truncation], "s--",
                ms=4, color="C2", label="truncated inputs")
    ax.axvline(budget, color="r", ls="--", lw=1, label=f"budget {budget:g}")
    ax.set_xlabel("FLOPs per example / full-length FLOPs (FLOPs = 2 x MACs)" if cost == "flops" else
                  "CPU runtime latency / full-length latency (measured)")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("length configurations")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


COSTS = ("flops", "latency")


class LatencyCost:
    """Cost of a length configuration as measured on the CPU runtime: the wall time of running ``batches``
    (``input_ids`` / ``attention_mask`` numpy arrays) through ``runtime`` at that configuration, median of
    ``repeats``, divided by the full-length time (measured first, the same way). Results are cached per
    configuration, so a configuration is timed once in a search."""

    def __init__(self, runtime, batches: Sequence[dict], repeats: int = 3):
        self.runtime, self.batches, self.repeats = runtime, list(batches), repeats
        self._cache: dict[Ratios, float] = {}
        self.run(None)  # warm-up: compiles the kernels, touches the weights
        self.full_seconds = self.seconds(None)

    def run(self, cfg: Ratios | None) -> None:
        for b in self.batches:
            self.runtime(b["input_ids"], b["attention_mask"], length_config=None if cfg is None else list(cfg))

    def seconds(self, cfg: Ratios | None) -> float:
        times = []
        for _ in range(self.repeats):
            started = time.perf_counter()
            self.run(cfg)
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    def __call__(self, cfg: Ratios) -> float:
        if cfg not in self._cache:
            self._cache[cfg] = 1.0 if all(r == 1.0 for r in cfg) else self.seconds(cfg) / self.full_seconds
        return self._cache[cfg]


def _latency_cost(run_dir: Path, artifact: str | Path | None, rows: list[dict], *, batch_size: int, examples: int,
                  repeats: int, threads: int | None, log) -> tuple[LatencyCost, Path]:
    import numpy as np

    from sparsify.runtime import SparseModel

    if artifact is None:
        from sparsify.export import export

        artifact = run_dir / "search" / "artifact"
        if log is not None:
            log(f"exporting {run_dir} to {artifact} for the latency measurements")
        export(run_dir, artifact, overwrite=True)
    runtime = SparseModel.from_pretrained(artifact, threads=threads)
    batches = []
    for i in range(0, min(examples, len(rows)), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = np.zeros((len(chunk), width), dtype=np.int64)
        mask = np.zeros((len(chunk), width), dtype=np.int64)
        for j, r in enumerate(chunk):
            ids[j, :len(r["input_ids"])] = r["input_ids"]
            mask[j, :len(r["input_ids"])] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return LatencyCost(runtime, batches, repeats=repeats), Path(artifact)


def search_run(run_dir: str | Path, budget: float, *, population: int = 16, generations: int = 8, seed: int = 0,
               mutation_prob: float = 0.5, grid: float = 0.05, batch_size: int = 128, max_samples: int | None = None,
               cost: str = "flops", artifact: str | Path | None = None, latency_batch_size: int = 32,
               latency_examples: int = 128, latency_repeats: int = 5, threads: int | None = None,
               truncation: Sequence[float] | None = None, log: Callable[[str], None] | None = print) -> dict:
    """Search a trained run's model on its validation data; writes ``search/frontier.{json,png}`` in the run
    directory and ``model/length_config.json``. Returns the frontier document.

    ``cost="latency"`` times the CPU runtime on ``artifact`` (default: the run exported to
    ``search/artifact``) over the first ``latency_examples`` validation examples in batches of
    ``latency_batch_size``, with ``threads`` runtime threads. ``truncation``: FLOPs fractions at which to compare
    the best evaluated length configuration with the same model on truncated inputs (see ``truncation.py``)."""
    import torch

    from sparsify.data import collator, load_task_data
    from sparsify.evaluation import evaluate
    from sparsify.metrics import main_metric
    from sparsify.modeling import load_classifier, load_tokenizer
    from sparsify.recipe import EMBEDDING, load_recipe
    from sparsify.sentence import embed_batches, embedding_metrics, load_embedder
    from sparsify.student import encoder_layers
    from sparsify.techniques.length_adaptive.config import save_length_config
    from sparsify.techniques.length_adaptive.flops import EncoderDims, dataset_flops
    from sparsify.techniques.length_adaptive.inference import check_model, forward_with_lengths

    if cost not in COSTS:
        raise SparsifyError(f"cost must be one of {', '.join(COSTS)}, got {cost!r}")
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
    embedding = task == EMBEDDING
    if embedding:  # a sentence-embedding run: scored by the cosine of its embeddings to its teacher's
        if recipe.teacher is None:
            raise SparsifyError(f"{run_dir}: an embedding run is searched on the cosine to its teacher's embeddings, "
                                "and its recipe names no teacher")
        model = load_embedder(str(model_dir))
    else:
        model = load_classifier(str(model_dir), num_labels=data.num_labels,
                                label_names=data.label_names, is_regression=data.is_regression)
    model.eval()
    try:
        check_model(model)
    except TypeError as e:
        raise SparsifyError(f"{model_dir}: {e}") from None
    evaluated_as = "float32"
    if (model_dir / "quantization.json").is_file():
        # a quantized run is searched as it will run: its int8 conversion (weights, activations, embeddings), in
        # float32 arithmetic (the exact integer reference is about 10x slower, and the search evaluates a lot)
        from sparsify.techniques.quantization.convert import load_run_conversion

        load_run_conversion(model, model_dir, exact=False)
        evaluated_as = "int8 conversion (quantization.json)"
    num_layers = len(encoder_layers(model))
    metric = main_metric(task)
    collate = collator(tokenizer, task)
    rows = [{k: v for k, v in row.items()} for row in data.eval]
    batches = [collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]

    def score(batches_, forward=None) -> dict:
        """The task's metrics of ``model`` on ``batches_`` (embeddings: against the teacher's, computed once)."""
        if embedding:
            return embedding_metrics(model, batches_, reference, forward=forward)
        return evaluate(model, batches_, task, is_regression=data.is_regression, forward=forward)

    if embedding:
        with torch.no_grad():
            reference = embed_batches(load_embedder(recipe.teacher.name_or_path, revision=recipe.teacher.revision,
                                                    who="teacher"), batches)
    lengths = [int(sum(row["attention_mask"])) for row in rows]
    dims = EncoderDims.from_config(model.config)
    full = dataset_flops(dims, None, lengths)["full_flops_per_example"]

    def run_eval(cfg: Ratios) -> float:
        metrics = score(batches, forward=lambda m, inputs: forward_with_lengths(m, inputs, cfg))
        if metric not in metrics:
            raise SparsifyError(f"evaluation gave no {metric!r} (got {', '.join(metrics)})")
        return metrics[metric]

    def flops_fraction(cfg: Ratios) -> float:
        return dataset_flops(dims, cfg, lengths)["fraction"]

    latency, cost_name, measured = None, "FLOPs", {}
    if cost == "latency":
        latency, artifact = _latency_cost(run_dir, artifact, rows, batch_size=latency_batch_size,
                                          examples=latency_examples, repeats=latency_repeats, threads=threads, log=log)
        cost_name = "latency"
        measured = {"artifact": str(artifact), "latency_examples": min(latency_examples, len(rows)),
                    "latency_batch_size": latency_batch_size, "latency_repeats": latency_repeats,
                    "threads": latency.runtime.threads,
                    "full_length_seconds": round(latency.full_seconds, 6)}
    if log is not None:
        what = (f"{format_flops(full)} per example ({UNIT})" if latency is None else
                f"{latency.full_seconds * 1e3:.1f} ms for {measured['latency_examples']} examples on the CPU runtime")
        log(f"searching {num_layers}-layer length configurations of {model_dir} ({evaluated_as}) on {len(rows)} "
            f"{task} validation examples: budget {budget:g} x full-length {what}; population {population}, {generations} generations, "
            f"seed {seed}")
    started = time.monotonic()
    with torch.no_grad():
        result = evolutionary_search(run_eval, flops_fraction if latency is None else latency, num_layers, budget,
                                     population=population, generations=generations, mutation_prob=mutation_prob,
                                     grid=grid, seed=seed, log=log, cost_name=cost_name)
    out_dir = run_dir / "search"
    out_dir.mkdir(exist_ok=True)

    def described(c: Candidate) -> dict:
        return _candidate_json(c, metric, flops_fraction, full, cost)

    compared = None
    if truncation:
        from sparsify.techniques.length_adaptive.truncation import truncation_baseline

        def eval_rows(truncated: list[dict]) -> float:
            return score([collate(truncated[i:i + batch_size]) for i in range(0, len(truncated), batch_size)])[metric]

        with torch.no_grad():
            compared = truncation_baseline(eval_rows, dims, rows, truncation)
        for entry in compared:
            fits = [c for c in result.evaluated if flops_fraction(c.length_config) <= entry["target_flops_fraction"]]
            best = max(fits, key=lambda c: (c.metric, -flops_fraction(c.length_config)), default=None)
            entry["truncated_" + metric] = entry.pop("metric")
            entry["length_config"] = None if best is None else list(best.length_config)
            entry["length_config_" + metric] = None if best is None else best.metric
            entry["length_config_flops_fraction"] = None if best is None else round(flops_fraction(best.length_config), 6)

    doc = {
        "task": task, "metric": metric, "model": evaluated_as, "budget": budget, "cost": cost, "unit": UNIT,
        "full_flops_per_example": full,
        **measured,
        "examples": len(rows), "seed": seed, "population": population, "generations": generations,
        "mutation_prob": mutation_prob, "grid": grid, "wall_time_s": round(time.monotonic() - started, 1),
        "chosen": described(result.chosen),
        "frontier": [described(c) for c in result.frontier],
        "evaluated": [described(c) for c in result.evaluated],
        "history": result.history,
    }
    if compared is not None:
        doc["truncation"] = compared
    (out_dir / "frontier.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot = plot_frontier(result, budget, metric, out_dir / "frontier.png", cost,
                         truncation=compared if cost == "flops" else None)
    chosen = doc["chosen"]
    save_length_config(model_dir, result.chosen.length_config, source="search", budget=budget, cost=cost,
                       metric=metric, **{metric: result.chosen.metric}, flops_fraction=chosen["flops_fraction"],
                       flops_per_example=chosen["flops_per_example"], flops_unit=UNIT,
                       **({"latency_fraction": chosen["latency_fraction"]} if cost == "latency" else {}))
    if log is not None:
        c = result.chosen
        extra = "" if cost == "flops" else f", {c.cost:.1%} of the full-length latency (measured)"
        log(f"chosen {list(c.length_config)}: {metric} {c.metric:.4f} (full length "
            f"{next(e.metric for e in result.evaluated if all(r == 1.0 for r in e.length_config)):.4f}), "
            f"{format_flops(chosen['flops_per_example'])} per example = {chosen['flops_fraction']:.1%} of full-length "
            f"FLOPs{extra}")
        for e in compared or ():
            la = "none evaluated" if e["length_config"] is None else \
                f"{e['length_config_' + metric]:.4f} ({e['length_config_flops_fraction']:.1%} FLOPs)"
            log(f"at {e['target_flops_fraction']:.0%} of full-length FLOPs: length configuration {la}, truncated inputs "
                f"{e['truncated_' + metric]:.4f} (keep {e['keep_ratio']:.1%} of each input, {e['flops_fraction']:.1%} FLOPs)")
        plotted = str(plot) if plot is not None else "no plot (matplotlib is not installed)"
        log(f"-> {model_dir / 'length_config.json'}, {out_dir / 'frontier.json'}, {plotted}")
    return doc


def main(argv: list[str] | None = None) -> int:
    """``sparsify search RUN_DIR --budget 0.5 [...]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="sparsify search",
        description="Evolutionary search of the per-layer kept lengths of a length-adaptive run: the best validation "
                    "metric (an embedding run: the mean cosine to its teacher's embeddings) within a cost budget, as a "
                    "fraction of the full-length cost. The cost is FLOPs per example "
                    "(FLOPs = 2 x MACs; default) or the latency of the CPU runtime, measured. Writes "
                    "RUN_DIR/search/frontier.{json,png} and RUN_DIR/model/length_config.json.",
    )
    parser.add_argument("run_dir", help="run directory of 'sparsify train' (recipe.yaml and model/)")
    parser.add_argument("--budget", type=float, required=True,
                        help="cost allowed, as a fraction of the full-length model's, in (0, 1], e.g. 0.5")
    parser.add_argument("--cost", choices=COSTS, default="flops",
                        help="flops: FLOPs per example, counted (default); latency: CPU runtime wall time, measured")
    parser.add_argument("--artifact", default=None,
                        help="with --cost latency: the 'sparsify export' artifact to time (default: export the run "
                             "to RUN_DIR/search/artifact)")
    parser.add_argument("--latency-examples", type=int, default=128,
                        help="with --cost latency: time the first N validation examples (default 128)")
    parser.add_argument("--latency-batch-size", type=int, default=32, help="with --cost latency: batch size (default 32)")
    parser.add_argument("--latency-repeats", type=int, default=5,
                        help="with --cost latency: timings per configuration, the median counts (default 5; "
                             "use more on a busy machine)")
    parser.add_argument("--population", type=int, default=16, help="configurations per generation (default 16)")
    parser.add_argument("--generations", type=int, default=8, help="generations after the first (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the search (default 0)")
    parser.add_argument("--mutation-prob", type=float, default=0.5, help="per-layer mutation probability (default 0.5)")
    parser.add_argument("--grid", type=float, default=0.05, help="ratios are multiples of this (default 0.05)")
    parser.add_argument("--batch-size", type=int, default=128, help="evaluation batch size (default 128)")
    parser.add_argument("--max-samples", type=int, default=None, help="search on the first N validation examples")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch, and the runtime for latency)")
    parser.add_argument("--compare-truncation", default=None, metavar="F1,F2,...",
                        help="also evaluate the model on truncated inputs at these fractions of the full-length FLOPs "
                             "(e.g. 1,0.7,0.5,0.3) next to the best length configuration within each")
    parser.add_argument("--json", action="store_true", help="print the frontier document as JSON")
    args = parser.parse_args(argv)
    try:
        checks = [("--budget", 0.0 < args.budget <= 1.0, "must be in (0, 1]: a fraction of the full-length cost"),
                  ("--population", args.population >= 2, "must be >= 2"),
                  ("--generations", args.generations >= 0, "must be >= 0"),
                  ("--mutation-prob", 0.0 <= args.mutation_prob <= 1.0, "must be in [0, 1]"),
                  ("--grid", 0.0 < args.grid <= 0.5, "must be in (0, 0.5]"),
                  ("--batch-size", args.batch_size >= 1, "must be >= 1"),
                  ("--max-samples", args.max_samples is None or args.max_samples >= 1, "must be >= 1"),
                  ("--threads", args.threads is None or args.threads >= 1, "must be >= 1"),
                  ("--latency-examples", args.latency_examples >= 1, "must be >= 1"),
                  ("--latency-batch-size", args.latency_batch_size >= 1, "must be >= 1"),
                  ("--latency-repeats", args.latency_repeats >= 1, "must be >= 1"),
                  ("--artifact", args.artifact is None or args.cost == "latency", "only with --cost latency")]
        for key, ok, message in checks:
            if not ok:
                raise SparsifyError(f"{key}: {message}, got {getattr(args, key[2:].replace('-', '_'))}")
        fractions = None
        if args.compare_truncation is not None:
            try:
                fractions = [float(f) for f in args.compare_truncation.split(",")]
            except ValueError:
                fractions = []
            if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
                raise SparsifyError(f"--compare-truncation: a comma-separated list of FLOPs fractions in (0, 1], "
                                    f"got {args.compare_truncation!r}")
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        log = (lambda text: print(text, file=sys.stderr)) if args.json else print
        doc = search_run(args.run_dir, args.budget, population=args.population, generations=args.generations,
                         seed=args.seed, mutation_prob=args.mutation_prob, grid=args.grid, batch_size=args.batch_size,
                         max_samples=args.max_samples, cost=args.cost, artifact=args.artifact,
                         latency_batch_size=args.latency_batch_size, latency_examples=args.latency_examples,
                         latency_repeats=args.latency_repeats, threads=args.threads, truncation=fractions, log=log)
    except SparsifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
