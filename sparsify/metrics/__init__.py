"""Task metrics through the `evaluate` interface, from modules shipped with the package (no Hub access)."""

from __future__ import annotations

from pathlib import Path

GLUE_METRIC_PATH = str(Path(__file__).parent / "glue")
# The task names glue/glue.py accepts (that module must stay self-contained for `evaluate.load`).
GLUE_TASKS = ("sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "hans", "ax",
              "mrpc", "qqp", "cola", "stsb")
MAIN_METRIC = {"cola": "matthews_correlation", "stsb": "pearson", "embedding": "teacher_cosine",
               "token-classification": "f1", "question-answering": "f1"}


def load_metric(task: str):
    """An `evaluate` metric for a GLUE task; any other task is scored like sst2 (accuracy)."""
    import evaluate

    return evaluate.load(GLUE_METRIC_PATH, task if task in GLUE_TASKS else "sst2")


def main_metric(task: str) -> str:
    """The metric that 'best checkpoint' selection and summaries use for a task."""
    return MAIN_METRIC.get(task, "accuracy")
