"""Evaluation on a task's eval split: a sequence classifier with the task's GLUE metrics, a token classifier with
entity-level F1 (:func:`evaluate_tokens`), extractive QA with SQuAD's exact match and F1 (:func:`evaluate_qa`)."""

from __future__ import annotations

import torch

from sparsify.metrics import load_metric


@torch.no_grad()
def evaluate(model, dataloader, task: str, *, is_regression: bool = False, accelerator=None,
             forward=None, logits_out: list | None = None) -> dict[str, float]:
    """Metrics of ``model`` over ``dataloader`` (plus mean eval loss). Works in multi-process runs.

    ``forward(model, inputs)`` replaces the plain ``model(**inputs)`` call (length-adaptive evaluation).
    ``logits_out``: a list that receives the (gathered) logits of each batch, as float32 CPU tensors.
    """
    was_training = model.training
    model.eval()
    metric = load_metric(task)
    losses, count = 0.0, 0
    for batch in dataloader:
        inputs = {k: v for k, v in batch.items() if k != "idx"}
        outputs = forward(model, inputs) if forward is not None else model(**inputs)
        logits, labels = outputs.logits, inputs["labels"]
        preds = logits.squeeze(-1) if is_regression else logits.argmax(-1)
        loss = outputs.loss.detach().float() * labels.shape[0]
        if accelerator is not None:
            if logits_out is not None:
                logits = accelerator.gather_for_metrics(logits)
            preds, labels = accelerator.gather_for_metrics((preds, labels))
            loss = accelerator.reduce(loss, reduction="sum")
        if logits_out is not None:
            logits_out.append(logits.detach().float().cpu())
        losses += float(loss)
        count += labels.shape[0]
        metric.add_batch(predictions=preds.float().cpu().numpy() if is_regression else preds.cpu().numpy(),
                         references=labels.float().cpu().numpy() if is_regression else labels.cpu().numpy())
    results = metric.compute()
    results["loss"] = losses / max(count, 1)
    model.train(was_training)
    return {k: float(v) for k, v in results.items()}


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """Entity spans ``(type, first, last)`` of a tag sequence: ``B-X`` starts an X, ``I-X`` continues an X (and
    starts one after anything else), ``O`` is outside; a tag without a B-/I- prefix is ``I-`` of its own name."""
    spans, current = set(), None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, kind = tag.partition("-") if tag[:2] in ("B-", "I-") else ("I", "-", tag)
        if tag == "O" or prefix == "B" or current is None or current[0] != kind:
            if current is not None:
                spans.add((current[0], current[1], i - 1))
            current = None if tag == "O" else (kind, i)
    return spans


def token_metrics(predictions: list[list[str]], references: list[list[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (exact type and span, over every sequence, as seqeval's default) and
    the accuracy of the labelled tokens."""
    found = gold = hit = right = total = 0
    for pred, ref in zip(predictions, references):
        p, r = entities(pred), entities(ref)
        found, gold, hit = found + len(p), gold + len(r), hit + len(p & r)
        right += sum(a == b for a, b in zip(pred, ref))
        total += len(ref)
    precision = hit / found if found else 0.0
    recall = hit / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "accuracy": right / max(total, 1)}


@torch.no_grad()
def evaluate_tokens(model, dataloader, label_names: list[str], *, accelerator=None, forward=None,
                    logits_out: list | None = None) -> dict[str, float]:
    """Token classification: :func:`token_metrics` over the labelled tokens (the first token of each word) of
    ``dataloader``, plus the mean eval loss. ``logits_out`` receives the logits of the labelled tokens,
    ``(tokens, labels)`` per batch."""
    from sparsify.data import IGNORE

    was_training = model.training
    model.eval()
    predictions, references = [], []
    losses, count = 0.0, 0
    for batch in dataloader:
        inputs = {k: v for k, v in batch.items() if k != "idx"}
        outputs = forward(model, inputs) if forward is not None else model(**inputs)
        logits, labels = outputs.logits, inputs["labels"]
        loss = outputs.loss.detach().float() * labels.shape[0]
        if accelerator is not None:
            logits = accelerator.pad_across_processes(logits, dim=1)
            labels = accelerator.pad_across_processes(labels, dim=1, pad_index=IGNORE)
            logits, labels = accelerator.gather_for_metrics((logits, labels))
            loss = accelerator.reduce(loss, reduction="sum")
        real = labels != IGNORE
        if logits_out is not None:
            logits_out.append(logits[real].detach().float().cpu())
        preds = logits.argmax(-1)
        for p, g, m in zip(preds.cpu(), labels.cpu(), real.cpu()):
            predictions.append([label_names[i] for i in p[m].tolist()])
            references.append([label_names[i] for i in g[m].tolist()])
        losses += float(loss)
        count += labels.shape[0]
    model.train(was_training)
    return {**token_metrics(predictions, references), "loss": losses / max(count, 1)}


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    import re
    import string

    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def answer_f1(prediction: str, gold: str) -> float:
    """SQuAD's token F1 of two answers (after :func:`normalize_answer`)."""
    from collections import Counter

    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def qa_metrics(predictions: list[str], golds: list[list[str]]) -> dict[str, float]:
    """SQuAD ``exact_match`` and ``f1`` (each example scored against its best gold answer), in [0, 1]."""
    em = f1 = 0.0
    for pred, gold in zip(predictions, golds):
        gold = gold or [""]
        em += max(float(normalize_answer(pred) == normalize_answer(g)) for g in gold)
        f1 += max(answer_f1(pred, g) for g in gold)
    n = max(len(predictions), 1)
    return {"f1": f1 / n, "exact_match": em / n}


@torch.no_grad()
def evaluate_qa(model, dataloader, answers: list, *, accelerator=None, forward=None, logits_out: list | None = None,
                max_answer_length: int = 30) -> dict[str, float]:
    """Extractive QA: in each eval window the span that maximises p(start) x p(end) over its context tokens
    (:func:`sparsify.runtime.model.decode_span`); per example, the best-scoring span over its windows, its text
    cut from the context with the token offsets, scored with :func:`qa_metrics` (metrics per example, not per
    window); plus the mean eval loss (per window). ``answers``: :attr:`sparsify.data.TaskData.answers`, a
    :class:`sparsify.data.QAWindow` per window (row ``idx``). ``logits_out`` receives the predicted spans
    ``(windows, 2)`` (start and end token) per batch."""
    was_training = model.training
    model.eval()
    best: dict[int, tuple[float, str]] = {}  # example -> (score, text) of its best window so far
    losses, count = 0.0, 0
    for batch in dataloader:
        inputs = {k: v for k, v in batch.items() if k != "idx"}
        outputs = forward(model, inputs) if forward is not None else model(**inputs)
        start, end, idx = outputs.start_logits, outputs.end_logits, batch["idx"]
        loss = outputs.loss.detach().float() * idx.shape[0]
        if accelerator is not None:
            start = accelerator.pad_across_processes(start, dim=1, pad_index=float("-inf"))
            end = accelerator.pad_across_processes(end, dim=1, pad_index=float("-inf"))
            start, end, idx = accelerator.gather_for_metrics((start, end, idx))
            loss = accelerator.reduce(loss, reduction="sum")
        spans = []
        for s, e, i in zip(start.float().cpu().numpy(), end.float().cpu().numpy(), idx.tolist()):
            window = answers[i]
            span, score, text = window_answer(s, e, window.context, window.offsets, max_answer_length)
            spans.append(span)
            if window.example not in best or score > best[window.example][0]:
                best[window.example] = (score, text)
        if logits_out is not None:
            logits_out.append(torch.tensor(spans, dtype=torch.float32).reshape(-1, 2))
        losses += float(loss)
        count += idx.shape[0]
    model.train(was_training)
    golds = {w.example: w.gold for w in answers}
    order = sorted(best)
    metrics = qa_metrics([best[e][1] for e in order], [golds[e] for e in order])
    return {**metrics, "loss": losses / max(count, 1)}


def window_answer(start_logits, end_logits, context: str, offsets: list,
                  max_answer_length: int = 30) -> tuple[tuple[int, int], float, str]:
    """The best span of one window, ``((start token, end token), score, text)``: ``((0, 0), -1.0, "")`` when the
    window has no context token. ``offsets``: per token, character offsets into ``context`` (None outside it;
    the logits may be longer, padded)."""
    import numpy as np

    from sparsify.runtime.model import decode_span

    allowed = np.array([o is not None for o in offsets] + [False] * (len(start_logits) - len(offsets)))
    span = decode_span(start_logits, end_logits, allowed, max_answer_length)
    if span is None:
        return (0, 0), -1.0, ""
    i, j, score = span
    return (i, j), score, context[offsets[i][0]:offsets[j][1]]


def evaluate_model_dir(model_dir: str, *, task: str, dataset: str = "nyu-mll/glue", split: str = "validation",
                       max_length: int = 128, batch_size: int = 128, max_samples: int | None = None,
                       config: str | None = None, file: str | None = None, doc_stride: int | None = None) -> dict:
    """``sparsify eval``: metrics of a saved model (directory, run directory or hub id) on a task's split: a GLUE
    task (``config`` defaults to the task), ``token-classification`` or ``question-answering`` (a ``config`` of
    ``dataset``, or a local ``file``, with the recipe defaults' columns; long contexts in windows sharing
    ``doc_stride`` tokens)."""
    from torch.utils.data import DataLoader

    from sparsify.data import collator, load_task_data
    from sparsify.errors import SparsifyError
    from sparsify.modeling import load_classifier, load_tokenizer
    from sparsify.recipe import QUESTION_ANSWERING, TOKEN_CLASSIFICATION, TOKEN_HEADS, DataConfig

    tokenizer = load_tokenizer(model_dir)
    if task in TOKEN_HEADS and config is None and file is None:
        raise SparsifyError(f"--task {task}: give the data, --file (jsonl, parquet, ...) or --config of --dataset")
    source = {"train_file": file, "validation_file": file} if file is not None else \
        {"dataset": dataset, "config": config or task, "train_split": split, "eval_split": split}
    if doc_stride is not None and task != QUESTION_ANSWERING:
        raise SparsifyError(f"--doc-stride: only question-answering reads windows (--task {task})")
    if doc_stride is not None and not 0 <= doc_stride < max_length:
        raise SparsifyError(f"--doc-stride {doc_stride}: give 0 to {max_length - 1} at most (--max-length "
                            f"{max_length} less the question and special tokens)")
    names = None
    if task == TOKEN_CLASSIFICATION:  # the model's labels, in its order (the data may not show them all)
        from transformers import AutoConfig

        from sparsify.modeling import resolve_model_path

        id2label = AutoConfig.from_pretrained(resolve_model_path(model_dir)).id2label
        names = tuple(id2label[i] for i in range(len(id2label)))
    cfg = DataConfig(**source, task=task, max_length=max_length, max_train_samples=1, max_eval_samples=max_samples,
                     label_names=names, doc_stride=doc_stride)
    data = load_task_data(cfg, tokenizer)
    head = task if task in TOKEN_HEADS else "sequence-classification"
    model = load_classifier(model_dir, num_labels=data.num_labels, label_names=data.label_names,
                            is_regression=data.is_regression, head=head)
    loader = DataLoader(data.eval, batch_size=batch_size, collate_fn=collator(tokenizer, task))
    if task == TOKEN_CLASSIFICATION:
        metrics = evaluate_tokens(model, loader, data.label_names)
    elif task == QUESTION_ANSWERING:
        metrics = evaluate_qa(model, loader, data.answers)
    else:
        metrics = evaluate(model, loader, task, is_regression=data.is_regression)
    examples = len(data.eval) if data.answers is None else len({w.example for w in data.answers})  # QA: not windows
    return {"task": task, "split": split, "examples": examples, **metrics}
