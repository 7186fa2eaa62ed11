"""The ``sparsify`` command line.

    sparsify train RECIPE [--set key.path=value ...] [--resume | --overwrite]
    sparsify eval MODEL_DIR --task sst2 [--split validation] [--json]
    sparsify eval MODEL_OR_ARTIFACT --task embedding --teacher TEACHER --config sst2 [--pairs-config mrpc]
    sparsify recipe check RECIPE [--set ...] [--print]
    sparsify report RUN_OR_MODEL_DIR [--json]
    sparsify search RUN_DIR --budget 0.5
    sparsify export RUN_OR_MODEL_DIR -o OUT [--format sparsify|hf|onnx]
    sparsify predict ARTIFACT --text "..." | --file texts.txt
    sparsify embed ARTIFACT --file texts.txt -o embeddings.npy
    sparsify bench kernels [...] | sparsify bench model ARTIFACT [...]
    sparsify sweep RECIPE --grid key.path=v1,v2 [--grid ...] [--set ...] [--dry-run]
    sparsify sensitivity MODEL --task sst2 --block 4x1 --sparsities 0.5,0.7,0.9 --score l2,taylor,obs

A user mistake prints one line starting with ``error:`` and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from sparsify.errors import SparsifyError

EPILOG = "Run 'sparsify COMMAND --help' for the options of a command. Docs: README.md and docs/recipes.md."


# Commands whose options live with their implementation: 'sparsify NAME ARGS' calls MODULE.main(ARGS).
DELEGATED = {
    "report": ("sparsify.sparsity", "sparsity report of a saved model, measured from its zeros"),
    "search": ("sparsify.techniques.length_adaptive.search", "search length configurations under a FLOPs budget"),
    "export": ("sparsify.export", "export a run or model as a compressed artifact (or --format hf / onnx)"),
    "predict": ("sparsify.predict", "predict with an exported artifact on CPU"),
    "embed": ("sparsify.embed", "sentence embeddings of texts with an exported artifact on CPU (.npy)"),
    "bench": ("sparsify.bench", "benchmarks: 'sparsify bench kernels ...', 'sparsify bench model ARTIFACT ...'"),
    "sweep": ("sparsify.sweep", "train one recipe over a grid of --set values (runs, resumes or skips each point)"),
    "sensitivity": ("sparsify.sensitivity", "one-shot pruning scans (scores x scopes x sparsities) on a task's dev split"),
}


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to a YAML recipe, e.g. recipes/quickstart.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a recipe field (repeatable), e.g. --set training.learning_rate=3e-5 "
                        "--set techniques.0.final_sparsity=0.8; the value is parsed as YAML")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsify",
        description="Make BERT-style encoders small and fast: recipe-driven pruning, distillation, "
                    "length-adaptive training and 8-bit QAT, with block-sparse CPU kernels.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="run a training recipe",
                       description="Run a recipe end to end: train, evaluate, checkpoint, and write the run directory "
                                   "(recipe.yaml, metrics.json, TensorBoard logs, checkpoints/, model/). Under "
                                   "'accelerate launch' the same recipe runs on several processes.")
    _add_recipe_args(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue from the newest checkpoint in the recipe's output_dir (the same recipe; only "
                      "training.threads may change)")
    mode.add_argument("--overwrite", action="store_true", help="delete an existing run in output_dir first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to TensorBoard)")

    p = sub.add_parser("eval", help="evaluate a model directory on a task",
                       description="Evaluate a Hugging Face model directory (or a run directory) on a GLUE-style task.")
    p.add_argument("model", help="model directory, run directory or hub id")
    p.add_argument("--task", required=True, help="GLUE task: sst2, mrpc, rte, qnli, cola, stsb, ...; "
                   "token-classification, question-answering (with --config or --file); or embedding")
    p.add_argument("--dataset", default="nyu-mll/glue", help="dataset hub id or directory (default: nyu-mll/glue)")
    p.add_argument("--split", default="validation", help="split to evaluate (default: validation)")
    p.add_argument("--max-length", type=int, default=128, help="tokenizer max length (default: 128)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--doc-stride", type=int, default=None, help="question-answering: tokens of context shared by "
                   "consecutive windows of a long context, as data.doc_stride (default: max length // 4)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("-o", "--output", default=None, help="also write the metrics to this JSON file")
    e = p.add_argument_group("--task embedding", "a sentence-embedding model (model or run directory, hub id, or an "
                             "exported artifact, run by the CPU runtime): mean cosine to a teacher's embeddings of "
                             "held-out texts and / or the ROC-AUC of the cosine similarity of labelled pairs")
    e.add_argument("--teacher", default=None, help="the teacher (model or run directory, hub id, artifact)")
    e.add_argument("--config", default=None, help="held-out texts: this configuration of --dataset, its --split "
                   "(e.g. sst2: the SST-2 validation sentences); token-classification / question-answering: the "
                   "dataset configuration")
    e.add_argument("--file", default=None, help="held-out texts from a file instead (.txt: one per line); "
                   "token-classification / question-answering: the evaluation file (jsonl, parquet, ...)")
    e.add_argument("--text-column", action="append", default=None, help="text column(s) of the held-out data "
                   "(default: the GLUE task's, or 'text' for a .txt file)")
    e.add_argument("--pairs-config", default=None, help="labelled pairs: this configuration of --pairs-dataset "
                   "(e.g. mrpc), its --pairs-split, columns sentence1, sentence2, label")
    e.add_argument("--pairs-file", default=None, help="labelled pairs from a file instead (csv/tsv/json/parquet)")
    e.add_argument("--pairs-dataset", default="nyu-mll/glue", help="default: nyu-mll/glue")
    e.add_argument("--pairs-split", default="validation", help="default: validation")

    p = sub.add_parser("recipe", help="check recipes", description="Validate recipes without training.")
    rsub = p.add_subparsers(dest="recipe_command", required=True, metavar="ACTION")
    c = rsub.add_parser("check", help="validate a recipe and print it resolved",
                        description="Load and validate a recipe (with --set overrides); print the resolved recipe "
                                    "with every default filled in.")
    _add_recipe_args(c)
    c.add_argument("--quiet", action="store_true", help="print only errors")
    rsub.add_parser("reference", help="print the reference of every recipe key (Markdown)",
                    description="Print every recipe key with its type, default and meaning, from the configs.")

    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)  # options: 'sparsify NAME --help'
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in DELEGATED:
            import importlib

            return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:])
        return _run(build_parser().parse_args(argv))
    except SparsifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130


def _run(args) -> int:
    if args.command == "recipe" and args.recipe_command == "reference":
        from sparsify.recipe import recipe_reference

        print(recipe_reference(), end="")
        return 0
    if args.command == "recipe":
        from sparsify.recipe import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        if not args.quiet:
            print(recipe.to_yaml(), end="")
        print(f"ok: {args.recipe}", file=sys.stderr)
        return 0
    if args.command == "train":
        from sparsify.recipe import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        from sparsify.train import train

        train(recipe, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
        return 0
    if args.command == "eval":
        if args.task == "embedding":
            from sparsify.recipe import PairsConfig
            from sparsify.sentence import evaluate_embedding_model

            pairs = None
            if args.pairs_config is not None or args.pairs_file is not None:
                if args.pairs_config is not None and args.pairs_file is not None:
                    raise SparsifyError("give --pairs-config or --pairs-file, not both")
                pairs = PairsConfig(dataset=None if args.pairs_file else args.pairs_dataset, config=args.pairs_config,
                                    file=args.pairs_file, split=args.pairs_split)
            metrics = evaluate_embedding_model(args.model, teacher=args.teacher, dataset=args.dataset,
                                               config=args.config, split=args.split, file=args.file,
                                               text_columns=args.text_column, pairs=pairs,
                                               max_length=args.max_length, batch_size=args.batch_size,
                                               max_samples=args.max_samples)
        else:
            from sparsify.evaluation import evaluate_model_dir

            metrics = evaluate_model_dir(args.model, task=args.task, dataset=args.dataset, split=args.split,
                                         max_length=args.max_length, batch_size=args.batch_size,
                                         max_samples=args.max_samples, config=args.config, file=args.file,
                                         doc_stride=args.doc_stride)
        if args.output is not None:
            from pathlib import Path

            Path(args.output).write_text(json.dumps(metrics, indent=1))
        if args.json:
            print(json.dumps(metrics, indent=1))
        else:
            for k, v in metrics.items():
                print(f"{k:>22s}  {v:.4f}" if isinstance(v, float) else f"{k:>22s}  {v}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
