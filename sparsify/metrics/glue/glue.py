"""GLUE metrics as an `evaluate` module that loads from a local path (no Hugging Face Hub needed).

    metric = evaluate.load("path/to/sparsify/metrics/glue", "mrpc")
    metric.compute(predictions=[0, 1], references=[0, 1])  # {'accuracy': 1.0, 'f1': 1.0}

Built on scikit-learn and scipy. Tasks: sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli, hans,
ax (accuracy); mrpc, qqp (accuracy, F1); cola (Matthews correlation); stsb (Pearson, Spearman).
"""

import datasets
import evaluate
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

ACCURACY_TASKS = ("sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "hans", "ax")
F1_TASKS = ("mrpc", "qqp")
TASKS = ACCURACY_TASKS + F1_TASKS + ("cola", "stsb")


class Glue(evaluate.Metric):
    def _info(self):
        if self.config_name not in TASKS:
            raise KeyError(f"unknown GLUE task {self.config_name!r}; expected one of {', '.join(TASKS)}")
        dtype = "float32" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description="GLUE task metrics (scikit-learn / scipy).",
            citation="Wang et al., GLUE: A Multi-Task Benchmark and Analysis Platform for NLU, 2019.",
            inputs_description="predictions and references: class ids, or floats for stsb.",
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
            format="numpy",
        )

    def _compute(self, predictions, references):
        task = self.config_name
        if task == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if task == "stsb":
            return {
                "pearson": float(pearsonr(predictions, references)[0]),
                "spearmanr": float(spearmanr(predictions, references)[0]),
            }
        out = {"accuracy": float(accuracy_score(references, predictions))}
        if task in F1_TASKS:
            out["f1"] = float(f1_score(references, predictions))
        return out
