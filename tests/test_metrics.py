import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from pneumoscope.metrics import compute_binary_metrics, compute_youden_threshold


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_sklearn_on_random_data(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 200), 0, 1)
    t = rng.uniform(0.2, 0.8)
    m = compute_binary_metrics(y, p, t)
    pred = (p >= t).astype(int)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, 1 - pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert sum(m["confusion_matrix"].values()) == m["n"] == 200
    assert set(m) == {"n", "n_positive", "threshold", "accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "confusion_matrix"}


def test_single_class_gives_no_auc():
    m = compute_binary_metrics([1, 1, 1], [0.2, 0.8, 0.9], 0.5)
    assert m["roc_auc"] is None and m["specificity"] is None and m["sensitivity"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", range(5))
def test_youden_threshold_maximises_j(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 150)
    p = np.clip(0.25 * y + rng.uniform(0, 0.75, 150), 0, 1)
    t = compute_youden_threshold(y, p)
    def j(th):
        m = compute_binary_metrics(y, p, th)
        return m["sensitivity"] + m["specificity"] - 1
    assert j(t) == pytest.approx(max(j(c) for c in np.unique(p)))
    assert not np.isclose(p, t).any()  # between samples, not on one


def test_youden_separable():
    t = compute_youden_threshold([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert 0.2 < t <= 0.8
