"""Evaluation of a sequence classifier on a task's eval split, with the task's GLUE metrics."""

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


def evaluate_model_dir(model_dir: str, *, task: str, dataset: str = "nyu-mll/glue", split: str = "validation",
                       max_length: int = 128, batch_size: int = 128, max_samples: int | None = None) -> dict:
    """``sparsify eval``: metrics of a saved model (directory, run directory or hub id) on a task's split."""
    from torch.utils.data import DataLoader

    from sparsify.data import collator, load_task_data
    from sparsify.modeling import load_classifier, load_tokenizer
    from sparsify.recipe import DataConfig

    tokenizer = load_tokenizer(model_dir)
    cfg = DataConfig(dataset=dataset, config=task, train_split=split, eval_split=split, task=task, max_length=max_length,
                     max_train_samples=1, max_eval_samples=max_samples)
    data = load_task_data(cfg, tokenizer)
    model = load_classifier(model_dir, num_labels=data.num_labels, label_names=data.label_names,
                            is_regression=data.is_regression)
    loader = DataLoader(data.eval, batch_size=batch_size, collate_fn=collator(tokenizer))
    metrics = evaluate(model, loader, task, is_regression=data.is_regression)
    return {"task": task, "split": split, "examples": len(data.eval), **metrics}
