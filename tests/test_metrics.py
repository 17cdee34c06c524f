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


@pytest.mark.parametrize("seed", range(6))
def test_fast_auc_and_ap_equal_sklearn_with_ties(seed):
    from sklearn.metrics import average_precision_score

    from pneumoscope.metrics import _auc_and_ap

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 120)
    p = np.round(rng.uniform(size=120) * 0.6 + 0.3 * y, 1 if seed % 2 else 3)  # coarse rounding: many ties
    auc, ap = _auc_and_ap(y, p)
    assert auc == pytest.approx(roc_auc_score(y, p))
    assert ap == pytest.approx(average_precision_score(y, p))


# --------------------------------------------------------------------------- issue 4: intervals, calibration, comparison

from pneumoscope import metrics as M  # noqa: E402


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (57, 83), (1, 1), (190, 195)])
def test_wilson_equals_statsmodels(k, n):
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = M.compute_wilson_interval(k, n)
    ref = proportion_confint(k, n, alpha=0.05, method="wilson")
    assert lo == pytest.approx(ref[0], abs=1e-9) and hi == pytest.approx(ref[1], abs=1e-9)
    assert M.compute_wilson_interval(0, 0) is None


def _correlated_patients(seed, n_patients=80, per_patient=6):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n_patients)
    base = rng.normal(labels * 1.2, 1.0)
    y = np.repeat(labels, per_patient)
    p = 1 / (1 + np.exp(-(np.repeat(base, per_patient) + 0.05 * rng.standard_normal(y.size))))
    groups = np.repeat(np.arange(n_patients), per_patient)
    return y, p, groups


def test_patient_bootstrap_is_wider_than_image_bootstrap_for_correlated_images():
    y, p, groups = _correlated_patients(0)
    by_patient = M.compute_bootstrap_ci(y, p, groups, n_boot=500, seed=1)
    by_image = M.compute_bootstrap_ci(y, p, np.arange(y.size), n_boot=500, seed=1)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(by_patient["roc_auc"]) > 1.8 * width(by_image["roc_auc"])  # ~sqrt(6) for 6 near-copies
    auc = roc_auc_score(y, p)
    assert by_patient["roc_auc"][0] < auc < by_patient["roc_auc"][1]


def test_bootstrap_is_seeded():
    y, p, groups = _correlated_patients(1)
    assert M.compute_bootstrap_ci(y, p, groups, n_boot=200, seed=3) == M.compute_bootstrap_ci(y, p, groups, n_boot=200, seed=3)
    assert M.compute_bootstrap_ci(y, p, groups, n_boot=200, seed=3) != M.compute_bootstrap_ci(y, p, groups, n_boot=200, seed=4)


def test_brier_and_ece():
    from sklearn.metrics import brier_score_loss

    rng = np.random.default_rng(0)
    p = rng.uniform(size=2000)
    y = (rng.uniform(size=2000) < p).astype(int)  # calibrated by construction
    assert M.compute_brier(y, p) == pytest.approx(brier_score_loss(y, p))
    assert M.compute_ece(y, p) < 0.04
    assert M.compute_ece(y, p**3) > 0.1  # distorted probabilities are miscalibrated


def test_temperature_recovers_overconfidence():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 5000)
    y = (rng.uniform(size=z.size) < 1 / (1 + np.exp(-z))).astype(int)
    t = M.fit_temperature(3.0 * z, y)  # logits three times too large
    assert t == pytest.approx(3.0, rel=0.1)
    before, after = M.compute_ece(y, 1 / (1 + np.exp(-3 * z))), M.compute_ece(y, 1 / (1 + np.exp(-3 * z / t)))
    assert after < before / 2


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_target_sensitivity_policy(target):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 300), 0, 1)
    t = M.compute_threshold(y, p, "sensitivity", target)
    m = M.compute_binary_metrics(y, p, t)
    assert m["sensitivity"] >= target
    higher = np.unique(p)[np.unique(p) > t]
    assert M.compute_binary_metrics(y, p, higher[0])["sensitivity"] < target  # the highest such threshold
    ts = M.compute_threshold(y, p, "specificity", target)
    assert M.compute_binary_metrics(y, p, ts)["specificity"] >= target


def test_policy_errors_are_clear():
    with pytest.raises(ValueError, match="needs a target"):
        M.compute_threshold([0, 1], [0.1, 0.9], "sensitivity")
    with pytest.raises(ValueError, match="threshold policy must be one of"):
        M.compute_threshold([0, 1], [0.1, 0.9], "f1")


def test_clinical_metrics_intervals_contain_estimates_and_subgroups():
    y, p, groups = _correlated_patients(3)
    ptype = np.where(y == 1, np.where(groups % 2, "virus", "bacteria"), "none")
    m = M.compute_clinical_metrics(y, p, 0.5, groups=groups, pneumonia_type=ptype, n_boot=300)
    for key, (lo, hi) in ((k, v) for k, v in m["ci95"].items() if v):
        assert lo <= m[key] <= hi, key
    assert set(m["subgroups"]) == {"bacteria", "virus"}
    assert sum(g["n"] for g in m["subgroups"].values()) == m["n_positive"]
    assert m["ppv"] == m["precision"] and m["prevalence"] == pytest.approx(y.mean())


def test_single_class_reports_what_it_can():
    m = M.compute_clinical_metrics([1, 1, 1, 1], [0.2, 0.8, 0.9, 0.7], 0.5, n_boot=50)
    assert m["roc_auc"] is None and m["pr_auc"] is None and m["ci95"]["roc_auc"] is None
    assert m["sensitivity"] == 0.75 and m["ci95"]["sensitivity"] is not None
    assert "cannot be computed" in m["note"]


def test_mcnemar_equals_statsmodels():
    from statsmodels.stats.contingency_tables import mcnemar

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    a = np.where(rng.uniform(size=200) < 0.85, y, 1 - y)
    b = np.where(rng.uniform(size=200) < 0.75, y, 1 - y)
    ours = M.compute_mcnemar(y, a, b)
    ra, rb = a == y, b == y
    table = [[int((ra & rb).sum()), int((ra & ~rb).sum())], [int((~ra & rb).sum()), int((~ra & ~rb).sum())]]
    assert ours["p_value"] == pytest.approx(mcnemar(table, exact=True).pvalue)


def test_delong_agrees_with_paired_bootstrap():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    signal = rng.normal(y * 1.0, 1.0)
    a = signal + rng.normal(0, 0.3, 400)
    b = signal + rng.normal(0, 1.2, 400)
    d = M.compute_delong(y, a, b)
    assert d["auc_a"] == pytest.approx(roc_auc_score(y, a)) and d["auc_b"] == pytest.approx(roc_auc_score(y, b))
    diffs = []
    for _ in range(1000):
        i = rng.integers(0, 400, 400)
        if y[i].min() != y[i].max():
            diffs.append(roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]))
    assert d["se"] == pytest.approx(np.std(diffs), rel=0.15)
    assert d["p_value"] < 0.01
    same = M.compute_delong(y, a, a)
    assert same["difference"] == 0 and same["p_value"] == 1.0


def test_mean_sd_is_the_sample_standard_deviation():
    import statistics

    from pneumoscope.metrics import mean_sd

    values = [0.956, 0.964, 0.962]
    assert mean_sd(values) == pytest.approx({"mean": statistics.mean(values), "sd": statistics.stdev(values)})
    assert mean_sd([0.9]) == {"mean": 0.9, "sd": 0.0}


def test_smoothed_youden_threshold_is_where_the_smoothed_classes_cross():
    rng = np.random.default_rng(0)
    logit = lambda t: float(np.log(t / (1 - t)))  # noqa: E731
    # symmetric classes of equal spread: the crossing is the midpoint
    z = np.r_[rng.normal(-2, 1, 3000), rng.normal(2, 1, 3000)]
    y = np.r_[np.zeros(3000), np.ones(3000)].astype(int)
    assert abs(logit(M.compute_threshold(y, 1 / (1 + np.exp(-z)), "youden-smooth"))) < 0.1
    # a separable split (Youden's J flat across the whole gap): inside the gap, not at an edge
    z = np.r_[rng.uniform(-5, -1, 130), rng.uniform(1, 6, 470)]
    y = np.r_[np.zeros(130), np.ones(470)].astype(int)
    t = logit(M.compute_threshold(y, 1 / (1 + np.exp(-z)), "youden-smooth"))
    assert -1 < t < 1
