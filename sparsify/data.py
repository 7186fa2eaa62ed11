"""Task data: a GLUE-style dataset (hub id or local directory) or local files, tokenized for training.

Every check that a user's data can fail (a missing column, a label outside the label set, a file that does
not exist) runs here, before a run directory is created, and raises an error that names the recipe key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# IGNORE: the label that carries none (augmented copies; special tokens and sub-words after a word's first)
from sparsify.augment import IGNORE
from sparsify.errors import SparsifyError
from sparsify.qa_windows import stride_problem
from sparsify.recipe import EMBEDDING, QUESTION_ANSWERING, TOKEN_CLASSIFICATION, DataConfig, PairsConfig, Recipe
from sparsify.recipe import recipe_error as _recipe_error


def recipe_error(recipe: Recipe | None, path: tuple, message: str) -> SparsifyError:
    if recipe is None:
        return SparsifyError(f"{'.'.join(map(str, path))}: {message}")
    return _recipe_error(recipe, path, message)

FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                ".txt": "text"}  # .txt: one text per line, in a column named "text"


@dataclass
class TaskData:
    """Tokenized train/eval splits with columns input_ids, attention_mask, (token_type_ids), labels, idx (no
    labels for an embedding task, whose ``pairs`` are ``(first, second, labels)`` when the recipe has some)."""

    train: object  # datasets.Dataset
    eval: object
    label_names: list[str]
    is_regression: bool
    pairs: tuple | None = None
    answers: list | None = None  # question answering: a QAWindow per eval feature (row idx)
    holdout: object | None = None  # data.holdout_samples training examples kept out of training, for selection

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)


def load_raw(cfg: DataConfig, recipe: Recipe | None = None):
    """The train and eval splits as `datasets.Dataset`s, before tokenization."""
    import datasets

    def fail(key, message):
        return recipe_error(recipe, ("data", key), message)

    if cfg.train_file is not None:
        return (read_file(cfg.train_file, lambda m: fail("train_file", m)),
                read_file(cfg.validation_file, lambda m: fail("validation_file", m)))

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


def read_file(file: str, fail):
    """A local data file as a `datasets.Dataset`; ``fail(message)`` builds the error for a missing, unknown or
    unreadable file."""
    import datasets

    path = Path(file)
    if not path.is_file():
        raise fail(f"file not found: {path}")
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise fail(f"unsupported file type {path.suffix!r}; use one of {', '.join(FILE_FORMATS)}")
    kwargs = {"delimiter": "\t", "quoting": 3} if path.suffix.lower() == ".tsv" else {}
    try:
        return datasets.load_dataset(fmt, data_files={"x": str(path)}, split="x", **kwargs)
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
        raise fail(f"cannot read {path} as {fmt}: {type(e).__name__}: {e}") from None


def load_task_data(cfg: DataConfig, tokenizer, recipe: Recipe | None = None) -> TaskData:
    """Load, check and tokenize a recipe's data; errors point into ``recipe`` when given."""
    if cfg.metric_task == EMBEDDING:
        return load_text_data(cfg, tokenizer, recipe)
    if cfg.metric_task == TOKEN_CLASSIFICATION:
        return load_token_data(cfg, tokenizer, recipe)
    if cfg.metric_task == QUESTION_ANSWERING:
        return load_qa_data(cfg, tokenizer, recipe)
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

    train = tokenize(train)
    holdout = None
    if cfg.holdout_samples is not None:
        train, holdout = split_holdout(train, cfg.holdout_samples, recipe)
    return TaskData(train, tokenize(evaluation), label_names, is_regression, holdout=holdout)


HOLDOUT_SEED = 0  # the held-out examples do not depend on training.seed: every seed is selected on the same ones


def split_holdout(train, n: int, recipe: Recipe | None = None):
    """``(train without the held-out examples, the held-out examples)``: ``n`` drawn at random with a fixed seed;
    both keep their rows' ``idx`` (positions in the training split)."""
    import numpy as np

    if n >= len(train):
        raise recipe_error(recipe, ("data", "holdout_samples"), f"{n} leaves nothing to train on: the training data "
                           f"has {len(train)} examples; give 1 to {len(train) - 1}")
    order = np.random.default_rng(HOLDOUT_SEED).permutation(len(train))
    held = np.sort(order[:n])
    kept = np.sort(order[n:])
    return train.select(kept.tolist()), train.select(held.tolist())


def _texts(split, columns, name: str, key: tuple, recipe: Recipe | None) -> list[str]:
    """Every non-blank text of ``columns`` (column after column), checked to exist and to hold text."""
    missing = [c for c in columns if c not in split.column_names]
    if missing:
        raise recipe_error(recipe, key, f"column {missing[0]!r} not in the {name} data; its columns are "
                                        f"{', '.join(split.column_names)}")
    texts = []
    for c in columns:
        for value in split[c]:
            if value is not None and not isinstance(value, str):
                raise recipe_error(recipe, key, f"column {c!r} of the {name} data holds {type(value).__name__} "
                                                f"values ({value!r}), not text")
            if value is not None and value.strip():
                texts.append(value)
    return texts


def _tokenize_texts(texts: list[str], tokenizer, max_length: int):
    import datasets

    def encode(batch, indices):
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
        enc["idx"] = indices
        return enc

    return datasets.Dataset.from_dict({"text": texts}).map(encode, with_indices=True, batched=True,
                                                            remove_columns=["text"], desc="tokenizing")


def load_text_data(cfg: DataConfig, tokenizer, recipe: Recipe | None = None) -> TaskData:
    """An embedding task's data: the texts of the text columns, one example each, no labels; ``pairs`` tokenized
    when the recipe has some."""
    train, evaluation = load_raw(cfg, recipe)
    splits = []
    for name, split, limit in (("train", train, cfg.max_train_samples), ("eval", evaluation, cfg.max_eval_samples)):
        texts = _texts(split, cfg.text_columns, name, ("data", "text_columns"), recipe)
        if not texts:
            raise recipe_error(recipe, ("data", "text_columns"), f"the {name} data holds no text in "
                                                                 f"{', '.join(cfg.text_columns)}")
        splits.append(_tokenize_texts(texts[:limit], tokenizer, cfg.max_length))
    pairs = load_pairs(cfg.pairs, tokenizer, cfg.max_length, recipe) if cfg.pairs is not None else None
    return TaskData(splits[0], splits[1], [], False, pairs)


def load_pairs(cfg: PairsConfig, tokenizer, max_length: int, recipe: Recipe | None = None) -> tuple:
    """``(first, second, labels)``: the two sentences of each labelled pair, tokenized, and the binary labels."""
    first, second, labels = read_pairs(cfg, recipe)
    return _tokenize_texts(first, tokenizer, max_length), _tokenize_texts(second, tokenizer, max_length), labels


def read_pairs(cfg: PairsConfig, recipe: Recipe | None = None) -> tuple[list[str], list[str], list[int]]:
    """``(first, second, labels)``: the two sentences of each labelled pair and the binary labels, checked."""
    import datasets

    def fail(key, message):
        return recipe_error(recipe, ("data", "pairs", key), message)

    if cfg.file is not None:
        split = read_file(cfg.file, lambda m: fail("file", m))
    else:
        try:
            split = datasets.load_dataset(cfg.dataset, cfg.config, split=cfg.split)
        except Exception as e:  # noqa: BLE001 - hub/cache/dir/split errors all mean the same to the user
            raise fail("dataset", f"cannot load split {cfg.split!r} of dataset {cfg.dataset!r} (config "
                                  f"{cfg.config!r}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if cfg.max_samples is not None:
        split = split.select(range(min(cfg.max_samples, len(split))))
    for key, columns in (("text_columns", cfg.text_columns), ("label_column", (cfg.label_column,))):
        missing = [c for c in columns if c not in split.column_names]
        if missing:
            raise fail(key, f"column {missing[0]!r} not in the pairs; their columns are {', '.join(split.column_names)}")
    labels = []
    for v in split[cfg.label_column]:
        if isinstance(v, bool) or v in (0, 1):
            labels.append(int(v))
        else:
            raise fail("label_column", f"label {v!r} is not binary: pairs need 1 (or true) for a positive pair and 0 "
                                       "for a negative one (GLUE test labels are -1: use the validation split)")
    if len(set(labels)) < 2:
        raise fail("label_column", f"every pair has label {labels[0] if labels else None!r}: a ROC-AUC needs both "
                                   "positive and negative pairs")
    sides = []
    for c in cfg.text_columns:
        values = list(split[c])
        if any(not isinstance(v, str) for v in values):
            raise fail("text_columns", f"column {c!r} of the pairs holds values that are not text")
        sides.append(values)
    return sides[0], sides[1], labels


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


def collator(tokenizer, task: str | None = None):
    """Pads each batch to its longest example (dynamic padding); token labels with -100."""
    if task == TOKEN_CLASSIFICATION:
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer, return_tensors="pt")
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, return_tensors="pt")


def load_token_data(cfg: DataConfig, tokenizer, recipe: Recipe | None = None) -> TaskData:
    """A token-classification task's data: a list of words and a label per word, each example tokenized with
    ``is_split_into_words``; the first token of each word carries the word's label, the others :data:`IGNORE`."""
    import datasets

    if not getattr(tokenizer, "is_fast", False):
        raise recipe_error(recipe, ("model", "name_or_path"), "token-classification aligns word labels with the "
                           "tokens through a fast tokenizer's word ids; this model's tokenizer is not a fast one")
    train, evaluation = load_raw(cfg, recipe)
    if cfg.max_train_samples is not None:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if cfg.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(cfg.max_eval_samples, len(evaluation))))
    words_column = cfg.text_columns[0]
    for name, split in (("train", train), ("eval", evaluation)):
        for key, column in (("text_columns", words_column), ("label_column", cfg.label_column)):
            if column not in split.column_names:
                raise recipe_error(recipe, ("data", key), f"column {column!r} not in the {name} data; its columns are "
                                                          f"{', '.join(split.column_names)}")
        for row, (words, tags) in enumerate(zip(split[words_column], split[cfg.label_column])):
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise recipe_error(recipe, ("data", "text_columns"), f"example {row} of the {name} data: "
                                   f"{words_column!r} must be a list of words (strings), got {words!r:.80}")
            if not isinstance(tags, list) or len(tags) != len(words):
                raise recipe_error(recipe, ("data", "label_column"), f"example {row} of the {name} data: "
                                   f"{cfg.label_column!r} must be a list of one label per word ({len(words)} words), "
                                   f"got {tags!r:.80}")
    if len(train) == 0 or len(evaluation) == 0:
        raise recipe_error(recipe, ("data",), "the train or eval split is empty")
    feature = train.features[cfg.label_column]
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.ClassLabel):
        names = list(cfg.label_names or inner.names)
        if len(names) != inner.num_classes:
            raise recipe_error(recipe, ("data", "label_names"),
                               f"{len(names)} names for {inner.num_classes} classes ({', '.join(inner.names)})")
        values = {i: i for i in range(inner.num_classes)}
    else:
        seen = sorted({t for tags in train[cfg.label_column] for t in tags}, key=str)
        names = [str(v) for v in (cfg.label_names or seen)]
        values = {v: names.index(str(v)) for v in seen if str(v) in names}
    for name, split in (("train", train), ("eval", evaluation)):
        for v in {t for tags in split[cfg.label_column] for t in tags}:
            if v not in values and str(v) not in names:
                raise recipe_error(recipe, ("data", "label_column"), f"label {v!r} in the {name} data is outside the "
                                   f"label set {names} (set data.label_names)")
    by_name = {n: i for i, n in enumerate(names)}

    def to_id(v):
        return values[v] if v in values else by_name[str(v)]

    def encode(batch, indices):
        enc = tokenizer(batch[words_column], is_split_into_words=True, truncation=True, max_length=cfg.max_length)
        labels = []
        for i, tags in enumerate(batch[cfg.label_column]):
            row, previous = [], None
            for word in enc.word_ids(i):
                row.append(IGNORE if word is None or word == previous else to_id(tags[word]))
                previous = word
            labels.append(row)
        enc["labels"] = labels
        enc["idx"] = indices
        return enc

    def tokenize(split):
        return split.map(encode, with_indices=True, batched=True, remove_columns=split.column_names, desc="tokenizing")

    return TaskData(tokenize(train), tokenize(evaluation), names, False)


@dataclass(frozen=True)
class QAWindow:
    """One eval window of a question-answering example (the eval feature of row ``idx``)."""

    example: int  # the example (row of the eval split) whose context the window slices
    context: str
    offsets: list  # per token, (start, end) character offsets into the context; None outside the context
    gold: list  # the example's gold answer texts


def load_qa_data(cfg: DataConfig, tokenizer, recipe: Recipe | None = None) -> TaskData:
    """Extractive QA data: (question, context) pairs tokenized with a sliding window over the context, each
    window one feature (the whole question, a slice of the context, ``cfg.qa_doc_stride`` tokens shared by
    consecutive slices); ``start_positions`` / ``end_positions`` point at the first answer's tokens in a window
    that holds all of it, at 0 (the first token) in any other; ``idx`` numbers the features (windows) of a split.
    ``answers`` holds a :class:`QAWindow` per eval feature (its example, context, token offsets, gold texts)."""
    if not getattr(tokenizer, "is_fast", False):
        raise recipe_error(recipe, ("model", "name_or_path"), "question-answering maps answers to tokens through a "
                           "fast tokenizer's offsets; this model's tokenizer is not a fast one")
    train, evaluation = _qa_splits(cfg, recipe)
    q_col, c_col = cfg.text_columns
    stride = _qa_doc_stride(cfg, tokenizer, {"train": train[q_col], "eval": evaluation[q_col]}, recipe)
    train_ds, eval_ds = (_qa_features(split, cfg, tokenizer, stride) for split in (train, evaluation))
    contexts, golds = evaluation[c_col], evaluation[cfg.label_column]
    answers = [QAWindow(e, contexts[e], [tuple(o) if inside else None for o, inside in zip(offsets, in_context)],
                        list(golds[e]["text"]))
               for e, offsets, in_context in zip(eval_ds["example"], eval_ds["offset_mapping"], eval_ds["in_context"])]
    extra = ["offset_mapping", "in_context", "example"]
    return TaskData(train_ds.remove_columns(extra), eval_ds.remove_columns(extra), ["start", "end"], False,
                    answers=answers)


def _qa_splits(cfg: DataConfig, recipe: Recipe | None):
    """The train and eval splits of a QA recipe, sliced, with their columns and SQuAD-style answers checked."""
    train, evaluation = load_raw(cfg, recipe)
    if cfg.max_train_samples is not None:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if cfg.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(cfg.max_eval_samples, len(evaluation))))
    q_col, c_col = cfg.text_columns
    for name, split in (("train", train), ("eval", evaluation)):
        for key, column in (("text_columns", q_col), ("text_columns", c_col), ("label_column", cfg.label_column)):
            if column not in split.column_names:
                raise recipe_error(recipe, ("data", key), f"column {column!r} not in the {name} data; its columns are "
                                                          f"{', '.join(split.column_names)}")
        for row, (context, answers) in enumerate(zip(split[c_col], split[cfg.label_column])):
            ok = isinstance(answers, dict) and isinstance(answers.get("text"), list) and \
                isinstance(answers.get("answer_start"), list) and len(answers["text"]) == len(answers["answer_start"])
            if not ok:
                raise recipe_error(recipe, ("data", "label_column"), f"example {row} of the {name} data: "
                                   f"{cfg.label_column!r} must be SQuAD-style answers {{'text': [...], 'answer_start': "
                                   f"[...]}}, got {answers!r:.80}")
            for text, start in zip(answers["text"], answers["answer_start"]):
                if not isinstance(start, int) or context[start:start + len(text)] != text:
                    raise recipe_error(recipe, ("data", "label_column"), f"example {row} of the {name} data: answer "
                                       f"{text!r} is not at character {start!r} of its context")
    if len(train) == 0 or len(evaluation) == 0:
        raise recipe_error(recipe, ("data",), "the train or eval split is empty")
    return train, evaluation


def _qa_doc_stride(cfg: DataConfig, tokenizer, questions: dict, recipe: Recipe | None) -> int:
    """``cfg.qa_doc_stride``, checked against the room the longest question (of ``questions``: split name -> list)
    and the special tokens leave for the context in ``max_length`` tokens: the stride must be smaller."""
    special = tokenizer.num_special_tokens_to_add(pair=True)
    longest = (0, "train", 0)
    for name, texts in questions.items():
        lengths = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        longest = max([longest] + [(len(ids), name, row) for row, ids in enumerate(lengths)], key=lambda t: t[0])
    tokens, name, row = longest
    where = f"the longest question (example {row} of the {name} data, {tokens} tokens)"
    problem = stride_problem(cfg.max_length, cfg.qa_doc_stride, longest=tokens, special=special, where=where,
                             default=cfg.doc_stride is None)
    if problem is not None:
        raise recipe_error(recipe, ("data", problem[0]), problem[1])
    return cfg.qa_doc_stride


def _qa_features(split, cfg: DataConfig, tokenizer, stride: int):
    """The windows of ``split`` as a tokenized dataset: input_ids, attention_mask, (token_type_ids),
    start_positions, end_positions, idx (the window's row); and, for the caller, offset_mapping, in_context (1 for
    the context's tokens) and example (the row of ``split`` it comes from)."""
    q_col, c_col = cfg.text_columns

    def encode(batch, indices):
        enc = tokenizer(batch[q_col], batch[c_col], truncation="only_second", max_length=cfg.max_length,
                        stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True)
        examples = enc.pop("overflow_to_sample_mapping")
        in_context = [[int(s == 1) for s in enc.sequence_ids(w)] for w in range(len(examples))]
        positions = [_answer_tokens(batch[cfg.label_column][e], enc["offset_mapping"][w], in_context[w])
                     for w, e in enumerate(examples)]
        enc["start_positions"], enc["end_positions"] = [p[0] for p in positions], [p[1] for p in positions]
        enc["in_context"] = in_context
        enc["example"] = [indices[e] for e in examples]
        return enc

    features = split.map(encode, with_indices=True, batched=True, remove_columns=split.column_names,
                         desc="tokenizing")
    return features.add_column("idx", list(range(len(features))))  # a window's key (cached teacher outputs)


def _answer_tokens(answers: dict, offsets: list, in_context: list) -> tuple[int, int]:
    """The first and last token of the first answer in a window, ``(0, 0)`` when the window does not hold all of
    it (or there is none)."""
    if not answers["text"]:
        return 0, 0
    first = answers["answer_start"][0]
    last = first + len(answers["text"][0])
    inside = [t for t, flag in enumerate(in_context) if flag]
    if not inside or offsets[inside[0]][0] > first or offsets[inside[-1]][1] < last:
        return 0, 0
    start = next(t for t in inside if offsets[t][1] > first)
    end = next(t for t in reversed(inside) if offsets[t][0] < last)
    return start, end
