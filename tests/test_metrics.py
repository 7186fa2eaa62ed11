"""The offline GLUE metric module loads through `evaluate` from a local path and matches scikit-learn/scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from sparsify.metrics import GLUE_METRIC_PATH, load_metric, main_metric

PRED = [1, 0, 1, 1, 0, 1, 0, 0]
REF = [1, 0, 0, 1, 0, 1, 1, 0]


def test_accuracy_hand_count():
    assert load_metric("sst2").compute(predictions=PRED, references=REF) == {"accuracy": 6 / 8}


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_accuracy_and_f1(task):
    out = load_metric(task).compute(predictions=PRED, references=REF)
    assert out["accuracy"] == 0.75
    # tp=3, fp=1, fn=1 -> F1 = 0.75
    assert out["f1"] == pytest.approx(0.75) and out["f1"] == pytest.approx(f1_score(REF, PRED))


def test_matthews():
    out = load_metric("cola").compute(predictions=PRED, references=REF)
    assert out == {"matthews_correlation": pytest.approx(matthews_corrcoef(REF, PRED))}
    assert main_metric("cola") == "matthews_correlation"


def test_pearson_spearman():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 5, 20)
    pred = ref + rng.normal(0, 1, 20)
    out = load_metric("stsb").compute(predictions=pred, references=ref)
    assert out["pearson"] == pytest.approx(pearsonr(pred, ref)[0], rel=1e-5)
    assert out["spearmanr"] == pytest.approx(spearmanr(pred, ref)[0], rel=1e-5)


def test_loads_from_local_path_with_plain_evaluate():
    import evaluate

    metric = evaluate.load(GLUE_METRIC_PATH, "rte")
    assert metric.compute(predictions=[0, 1], references=[1, 1]) == {"accuracy": 0.5}


def test_unknown_task_falls_back_to_accuracy():
    assert load_metric("my-sentiment").compute(predictions=[0, 1], references=[0, 1]) == {"accuracy": 1.0}
