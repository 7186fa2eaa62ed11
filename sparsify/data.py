"""Task data: a GLUE-style dataset (hub id or local directory) or local files, tokenized for training.

Every check that a user's data can fail (a missing column, a label outside the label set, a file that does
not exist) runs here, before a run directory is created, and raises an error that names the recipe key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sparsify.errors import SparsifyError
from sparsify.recipe import DataConfig, Recipe
from sparsify.recipe import recipe_error as _recipe_error


def recipe_error(recipe: Recipe | None, path: tuple, message: str) -> SparsifyError:
    if recipe is None:
        return SparsifyError(f"{'.'.join(map(str, path))}: {message}")
    return _recipe_error(recipe, path, message)

FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class TaskData:
    """Tokenized train/eval splits with columns input_ids, attention_mask, (token_type_ids), labels, idx."""

    train: object  # datasets.Dataset
    eval: object
    label_names: list[str]
    is_regression: bool

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)


def load_raw(cfg: DataConfig, recipe: Recipe | None = None):
    """The train and eval splits as `datasets.Dataset`s, before tokenization."""
    import datasets

    def fail(key, message):
        return recipe_error(recipe, ("data", key), message)

    if cfg.train_file is not None:
        files = {"train": cfg.train_file, "eval": cfg.validation_file}
        splits = {}
        for split, key in (("train", "train_file"), ("eval", "validation_file")):
            path = Path(files[split])
            if not path.is_file():
                raise fail(key, f"file not found: {path}")
            fmt = FILE_FORMATS.get(path.suffix.lower())
            if fmt is None:
                raise fail(key, f"unsupported file type {path.suffix!r}; use one of {', '.join(FILE_FORMATS)}")
            kwargs = {"delimiter": "\t", "quoting": 3} if path.suffix.lower() == ".tsv" else {}
            try:
                splits[split] = datasets.load_dataset(fmt, data_files={"x": str(path)}, split="x", **kwargs)
            except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
                raise fail(key, f"cannot read {path} as {fmt}: {type(e).__name__}: {e}") from None
        return splits["train"], splits["eval"]

    try:
        ds = datasets.load_dataset(cfg.dataset, cfg.config)
    except Exception as e:  # noqa: BLE001 - hub/cache/dir errors all mean the same to the user
        raise fail(
            "dataset",
            f"cannot load dataset {cfg.dataset!r} (config {cfg.config!r}): {type(e).__name__}: {str(e).splitlines()[0]}. "
            "Give a hub id reachable from here or cached (HF_DATASETS_CACHE, HF_HUB_OFFLINE=1), "
            "a local dataset directory, or train_file/validation_file",
        ) from None
    for key, split in (("train_split", cfg.train_split), ("eval_split", cfg.eval_split)):
        if split not in ds:
            raise fail(key, f"split {split!r} not in the dataset; it has {', '.join(ds)}")
    return ds[cfg.train_split], ds[cfg.eval_split]


def load_task_data(cfg: DataConfig, tokenizer, recipe: Recipe | None = None) -> TaskData:
    """Load, check and tokenize a recipe's data; errors point into ``recipe`` when given."""
    train, evaluation = load_raw(cfg, recipe)
    if cfg.max_train_samples is not None:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if cfg.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(cfg.max_eval_samples, len(evaluation))))
    for name, split in (("train", train), ("eval", evaluation)):
        missing = [c for c in (*cfg.text_columns, cfg.label_column) if c not in split.column_names]
        if missing:
            key = "label_column" if missing == [cfg.label_column] else "text_columns"
            raise recipe_error(
                recipe, ("data", key),
                f"column {missing[0]!r} not in the {name} data; its columns are {', '.join(split.column_names)}",
            )
    if len(train) == 0 or len(evaluation) == 0:
        raise recipe_error(recipe, ("data",), "the train or eval split is empty")

    label_names, is_regression, to_id = _labels(cfg, train, evaluation, recipe)

    def encode(batch, indices):
        enc = tokenizer(*[batch[c] for c in cfg.text_columns], truncation=True, max_length=cfg.max_length)
        enc["labels"] = [to_id(v) for v in batch[cfg.label_column]]
        enc["idx"] = indices  # position in the (sliced) split: keys cached teacher outputs
        return enc

    def tokenize(split):
        return split.map(encode, with_indices=True, batched=True, remove_columns=split.column_names, desc="tokenizing")

    return TaskData(tokenize(train), tokenize(evaluation), label_names, is_regression)


def _labels(cfg: DataConfig, train, evaluation, recipe: Recipe | None):
    """Label names, whether the task is regression, and a value -> id function that rejects unknown labels."""
    import datasets

    feature = train.features[cfg.label_column]
    if cfg.metric_task == "stsb" or (isinstance(feature, datasets.Value) and feature.dtype.startswith("float")):
        return [], True, float
    if isinstance(feature, datasets.ClassLabel):
        names = list(cfg.label_names or feature.names)
        if len(names) != feature.num_classes:
            raise recipe_error(recipe, ("data", "label_names"),
                               f"{len(names)} names for {feature.num_classes} classes ({', '.join(feature.names)})")
        values = {i: i for i in range(feature.num_classes)}
    else:
        seen = sorted(set(train[cfg.label_column]), key=str)
        names = [str(v) for v in (cfg.label_names or seen)]
        values = {v: names.index(str(v)) for v in seen if str(v) in names}
        if all(isinstance(v, int) for v in seen) and cfg.label_names is None:
            values = {v: i for i, v in enumerate(seen)}
    for split_name, split in (("train", train), ("eval", evaluation)):
        for v in set(split[cfg.label_column]):
            if v not in values and str(v) not in names:
                raise recipe_error(
                    recipe, ("data", "label_column"),
                    f"label {v!r} in the {split_name} data is outside the label set {names} "
                    "(set data.label_names, or remove unlabelled rows such as GLUE test labels of -1)",
                )
    by_name = {n: i for i, n in enumerate(names)}
    return names, False, lambda v: values[v] if v in values else by_name[str(v)]


def collator(tokenizer):
    """Pads each batch to its longest example (dynamic padding)."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, return_tensors="pt")
