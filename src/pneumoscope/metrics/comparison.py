"""Comparison: part of the metrics (pure numpy/scikit-learn; positive class 1)."""

from __future__ import annotations

import numpy as np

from .classification import check_binary


def _delong_components(y_true: np.ndarray, scores: np.ndarray):
    pos, neg = scores[y_true == 1], scores[y_true == 0]
    # psi(x, y) = 1 if x > y, 0.5 if equal: structural components of the Mann-Whitney AUC
    cmp = (pos[:, None] > neg[None, :]).astype(float) + 0.5 * (pos[:, None] == neg[None, :])  # (m, n)
    return cmp.mean(), cmp.mean(1), cmp.mean(0)  # auc, V10 (per positive), V01 (per negative)


def compute_delong(y_true, prob_a, prob_b) -> dict:
    """Paired DeLong test for the difference of two correlated ROC-AUCs (DeLong et al. 1988)."""
    from scipy.stats import norm

    y_true, prob_a = check_binary(y_true, prob_a)
    _, prob_b = check_binary(y_true, prob_b)
    if len(np.unique(y_true)) < 2:
        raise ValueError("comparing AUCs needs both classes")
    auc_a, v10a, v01a = _delong_components(y_true, prob_a)
    auc_b, v10b, v01b = _delong_components(y_true, prob_b)
    s10 = np.cov(np.vstack([v10a, v10b]))  # (2, 2)
    s01 = np.cov(np.vstack([v01a, v01b]))
    m, n = len(v10a), len(v01a)
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    diff = auc_a - auc_b
    se = float(np.sqrt(max(var, 0.0)))
    z = diff / se if se > 0 else 0.0
    p = float(2 * norm.sf(abs(z))) if se > 0 else 1.0
    half = norm.ppf(0.975) * se
    return {
        "auc_a": float(auc_a),
        "auc_b": float(auc_b),
        "difference": float(diff),
        "se": se,
        "z": float(z),
        "p_value": p,
        "ci95": [float(diff - half), float(diff + half)],
    }


def compute_mcnemar(y_true, pred_a, pred_b) -> dict:
    """Exact McNemar test on the discordant decisions of two classifiers."""
    from scipy.stats import binomtest

    y_true = np.asarray(y_true).astype(int)
    right_a = np.asarray(pred_a).astype(int) == y_true
    right_b = np.asarray(pred_b).astype(int) == y_true
    b = int((right_a & ~right_b).sum())  # only A right
    c = int((~right_a & right_b).sum())  # only B right
    p = float(binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0
    return {"only_a_correct": b, "only_b_correct": c, "p_value": p, "method": "exact binomial McNemar"}
