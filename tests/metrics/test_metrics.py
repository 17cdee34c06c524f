import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from pneumoscope.metrics.classification import compute_binary_metrics, compute_youden_threshold


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
    assert set(m) == {
        "n",
        "n_positive",
        "threshold",
        "accuracy",
        "sensitivity",
        "specificity",
        "precision",
        "f1",
        "roc_auc",
        "confusion_matrix",
    }


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

    from pneumoscope.metrics.intervals import _auc_and_ap

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 120)
    p = np.round(rng.uniform(size=120) * 0.6 + 0.3 * y, 1 if seed % 2 else 3)  # coarse rounding: many ties
    auc, ap = _auc_and_ap(y, p)
    assert auc == pytest.approx(roc_auc_score(y, p))
    assert ap == pytest.approx(average_precision_score(y, p))


# --------------------------------------------------------------------------- issue 4: intervals, calibration, comparison

from pneumoscope.metrics.calibration import compute_adaptive_reliability, compute_brier, compute_ece, fit_temperature  # noqa: E402
from pneumoscope.metrics.classification import decide  # noqa: E402
from pneumoscope.metrics.clinical import DROP_RULE, compare_with_validation, compute_clinical_metrics, is_drop_beyond_intervals  # noqa: E402
from pneumoscope.metrics.comparison import compute_delong, compute_mcnemar  # noqa: E402
from pneumoscope.metrics.intervals import (  # noqa: E402
    _patient_resamples,
    _precision_at,
    compute_bootstrap_ci,
    compute_pr_band,
    compute_roc_band,
    compute_wilson_interval,
)
from pneumoscope.metrics.operating_point import OperatingPoint, compute_threshold, describe_policy, fit_operating_point  # noqa: E402


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (57, 83), (1, 1), (190, 195)])
def test_wilson_equals_statsmodels(k, n):
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = compute_wilson_interval(k, n)
    ref = proportion_confint(k, n, alpha=0.05, method="wilson")
    assert lo == pytest.approx(ref[0], abs=1e-9) and hi == pytest.approx(ref[1], abs=1e-9)
    assert compute_wilson_interval(0, 0) is None


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
    by_patient = compute_bootstrap_ci(y, p, groups, n_boot=500, seed=1)
    by_image = compute_bootstrap_ci(y, p, np.arange(y.size), n_boot=500, seed=1)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(by_patient["roc_auc"]) > 1.8 * width(by_image["roc_auc"])  # ~sqrt(6) for 6 near-copies
    auc = roc_auc_score(y, p)
    assert by_patient["roc_auc"][0] < auc < by_patient["roc_auc"][1]


def test_bootstrap_is_seeded():
    y, p, groups = _correlated_patients(1)
    assert compute_bootstrap_ci(y, p, groups, n_boot=200, seed=3) == compute_bootstrap_ci(y, p, groups, n_boot=200, seed=3)
    assert compute_bootstrap_ci(y, p, groups, n_boot=200, seed=3) != compute_bootstrap_ci(y, p, groups, n_boot=200, seed=4)


def test_brier_and_ece():
    from sklearn.metrics import brier_score_loss

    rng = np.random.default_rng(0)
    p = rng.uniform(size=2000)
    y = (rng.uniform(size=2000) < p).astype(int)  # calibrated by construction
    assert compute_brier(y, p) == pytest.approx(brier_score_loss(y, p))
    assert compute_ece(y, p) < 0.04
    assert compute_ece(y, p**3) > 0.1  # distorted probabilities are miscalibrated


def test_temperature_recovers_overconfidence():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 5000)
    y = (rng.uniform(size=z.size) < 1 / (1 + np.exp(-z))).astype(int)
    t = fit_temperature(3.0 * z, y)  # logits three times too large
    assert t == pytest.approx(3.0, rel=0.1)
    before, after = compute_ece(y, 1 / (1 + np.exp(-3 * z))), compute_ece(y, 1 / (1 + np.exp(-3 * z / t)))
    assert after < before / 2


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_target_sensitivity_policy(target):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 300), 0, 1)
    t = compute_threshold(y, p, "sensitivity", target)
    m = compute_binary_metrics(y, p, t)
    assert m["sensitivity"] >= target
    higher = np.unique(p)[np.unique(p) > t]
    assert compute_binary_metrics(y, p, higher[0])["sensitivity"] < target  # the highest such threshold
    ts = compute_threshold(y, p, "specificity", target)
    assert compute_binary_metrics(y, p, ts)["specificity"] >= target


def test_policy_errors_are_clear():
    with pytest.raises(ValueError, match="needs a target"):
        compute_threshold([0, 1], [0.1, 0.9], "sensitivity")
    with pytest.raises(ValueError, match="threshold policy must be one of"):
        compute_threshold([0, 1], [0.1, 0.9], "f1")


def test_clinical_metrics_intervals_contain_estimates_and_subgroups():
    y, p, groups = _correlated_patients(3)
    ptype = np.where(y == 1, np.where(groups % 2, "virus", "bacteria"), "none")
    m = compute_clinical_metrics(y, p, 0.5, groups=groups, pneumonia_type=ptype, n_boot=300)
    for key, (lo, hi) in ((k, v) for k, v in m["ci95"].items() if v):
        assert lo <= m[key] <= hi, key
    assert set(m["subgroups"]) == {"bacteria", "virus"}
    assert sum(g["n"] for g in m["subgroups"].values()) == m["n_positive"]
    assert m["ppv"] == m["precision"] and m["prevalence"] == pytest.approx(y.mean())


def test_single_class_reports_what_it_can():
    m = compute_clinical_metrics([1, 1, 1, 1], [0.2, 0.8, 0.9, 0.7], 0.5, n_boot=50)
    assert m["roc_auc"] is None and m["pr_auc"] is None and m["ci95"]["roc_auc"] is None
    assert m["sensitivity"] == 0.75 and m["ci95"]["sensitivity"] is not None
    assert "cannot be computed" in m["note"]


def test_mcnemar_equals_statsmodels():
    from statsmodels.stats.contingency_tables import mcnemar

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    a = np.where(rng.uniform(size=200) < 0.85, y, 1 - y)
    b = np.where(rng.uniform(size=200) < 0.75, y, 1 - y)
    ours = compute_mcnemar(y, a, b)
    ra, rb = a == y, b == y
    table = [[int((ra & rb).sum()), int((ra & ~rb).sum())], [int((~ra & rb).sum()), int((~ra & ~rb).sum())]]
    assert ours["p_value"] == pytest.approx(mcnemar(table, exact=True).pvalue)


def test_delong_agrees_with_paired_bootstrap():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    signal = rng.normal(y * 1.0, 1.0)
    a = signal + rng.normal(0, 0.3, 400)
    b = signal + rng.normal(0, 1.2, 400)
    d = compute_delong(y, a, b)
    assert d["auc_a"] == pytest.approx(roc_auc_score(y, a)) and d["auc_b"] == pytest.approx(roc_auc_score(y, b))
    diffs = []
    for _ in range(1000):
        i = rng.integers(0, 400, 400)
        if y[i].min() != y[i].max():
            diffs.append(roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]))
    assert d["se"] == pytest.approx(np.std(diffs), rel=0.15)
    assert d["p_value"] < 0.01
    same = compute_delong(y, a, a)
    assert same["difference"] == 0 and same["p_value"] == 1.0


def test_mean_sd_is_the_sample_standard_deviation():
    import statistics

    from pneumoscope.metrics.intervals import mean_sd

    values = [0.956, 0.964, 0.962]
    assert mean_sd(values) == pytest.approx({"mean": statistics.mean(values), "sd": statistics.stdev(values)})
    assert mean_sd([0.9]) == {"mean": 0.9, "sd": 0.0}


def test_smoothed_youden_threshold_is_where_the_smoothed_classes_cross():
    rng = np.random.default_rng(0)
    logit = lambda t: float(np.log(t / (1 - t)))  # noqa: E731
    # symmetric classes of equal spread: the crossing is the midpoint
    z = np.r_[rng.normal(-2, 1, 3000), rng.normal(2, 1, 3000)]
    y = np.r_[np.zeros(3000), np.ones(3000)].astype(int)
    assert abs(logit(compute_threshold(y, 1 / (1 + np.exp(-z)), "youden-smooth"))) < 0.1
    # a separable split (Youden's J flat across the whole gap): inside the gap, not at an edge
    z = np.r_[rng.uniform(-5, -1, 130), rng.uniform(1, 6, 470)]
    y = np.r_[np.zeros(130), np.ones(470)].astype(int)
    t = logit(compute_threshold(y, 1 / (1 + np.exp(-z)), "youden-smooth"))
    assert -1 < t < 1


# --------------------------------------------------------------------------- issue 14: adaptive reliability, ROC band


def _direct_patient_resamples(y, groups, n_boot, seed):
    """The stratified patient bootstrap written out on its own, to check the shared resampler against."""
    rng = np.random.default_rng(seed)
    patients = sorted(set(groups.tolist()))
    label = {g: y[groups == g].max() for g in patients}
    strata = [[g for g in patients if label[g] == c] for c in (0, 1)]
    out = []
    for _ in range(n_boot):
        chosen = np.concatenate([np.asarray(s)[rng.choice(len(s), size=len(s), replace=True)] for s in strata])
        idx = np.concatenate([np.flatnonzero(groups == g) for g in chosen])
        if y[idx].min() != y[idx].max():
            out.append(idx)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_adaptive_reliability_equals_direct_equal_count_bins_with_wilson(seed):
    from statsmodels.stats.proportion import proportion_confint

    rng = np.random.default_rng(seed)
    p = rng.beta(0.5, 0.5, 300)  # most predictions near 0 and 1, as a trained model's are
    y = (rng.uniform(size=300) < p).astype(int)
    rel = compute_adaptive_reliability(y, p, n_bins=10)
    order = np.argsort(p)
    yb, pb = y[order].reshape(10, 30), p[order].reshape(10, 30)  # 300 images: ten bins of exactly 30
    assert rel["count"].tolist() == [30] * 10
    np.testing.assert_allclose(rel["mean_predicted"], pb.mean(1))
    np.testing.assert_allclose(rel["observed"], yb.mean(1))
    lo, hi = proportion_confint(yb.sum(1), 30, alpha=0.05, method="wilson")
    np.testing.assert_allclose(rel["observed_lower"], lo, atol=1e-12)
    np.testing.assert_allclose(rel["observed_upper"], hi, atol=1e-12)
    np.testing.assert_allclose(rel["edges"], np.c_[pb.min(1), pb.max(1)])
    assert (rel["observed_lower"] <= rel["observed"]).all() and (rel["observed"] <= rel["observed_upper"]).all()


def test_adaptive_reliability_bins_differ_by_at_most_one_image_and_never_exceed_n():
    rng = np.random.default_rng(0)
    p, y = rng.uniform(size=23), rng.integers(0, 2, 23)
    rel = compute_adaptive_reliability(y, p, n_bins=10, min_width=0)  # plain equal-count bins
    assert rel["count"].sum() == 23 and rel["count"].max() - rel["count"].min() <= 1
    assert compute_adaptive_reliability(y, p, n_bins=10)["count"].sum() == 23
    assert len(compute_adaptive_reliability(y[:4], p[:4], n_bins=10, min_width=0)["count"]) == 4
    assert len(compute_adaptive_reliability(y[:4], p[:4], n_bins=10)["count"]) <= 4
    with pytest.raises(ValueError, match="at least one image"):
        compute_adaptive_reliability([], [])


def test_shared_resampler_is_the_stratified_patient_bootstrap():
    y, p, groups = _correlated_patients(2)
    got = list(_patient_resamples(y, groups, n_boot=50, seed=7))
    want = _direct_patient_resamples(y, groups, 50, 7)
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_roc_band_equals_tpr_quantiles_of_sklearn_curves_on_the_same_resamples():
    from sklearn.metrics import roc_curve

    y, p, groups = _correlated_patients(3)
    band = compute_roc_band(y, p, groups, n_boot=200, seed=5, n_grid=51)
    grid = np.linspace(0, 1, 51)
    tprs = []
    for idx in _direct_patient_resamples(y, groups, 200, 5):
        fpr, tpr, _ = roc_curve(y[idx], p[idx], drop_intermediate=False)
        tprs.append([tpr[fpr <= g].max() for g in grid])  # best TPR reachable without exceeding that FPR
    tprs = np.array(tprs)
    np.testing.assert_allclose(band["fpr"], grid)
    np.testing.assert_allclose(band["tpr_lower"], np.percentile(tprs, 2.5, axis=0))
    np.testing.assert_allclose(band["tpr_upper"], np.percentile(tprs, 97.5, axis=0))
    assert band["n_resamples"] == len(tprs)


def test_roc_band_covers_the_observed_curve_and_widens_for_correlated_images():
    from sklearn.metrics import roc_curve

    y, p, groups = _correlated_patients(4)
    by_patient = compute_roc_band(y, p, groups, n_boot=300, seed=0)
    by_image = compute_roc_band(y, p, np.arange(y.size), n_boot=300, seed=0)
    fpr, tpr, _ = roc_curve(y, p)
    observed = np.array([tpr[fpr <= g].max() for g in by_patient["fpr"]])
    inside = (by_patient["tpr_lower"] <= observed + 1e-12) & (observed <= by_patient["tpr_upper"] + 1e-12)
    assert inside.mean() > 0.95
    width = lambda b: np.mean(b["tpr_upper"] - b["tpr_lower"])  # noqa: E731
    assert width(by_patient) > 1.5 * width(by_image)
    assert compute_roc_band(np.ones(10), np.linspace(0, 1, 10), np.arange(10)) is None


def test_bootstrap_ci_unchanged_by_sharing_the_resampler():
    """compute_bootstrap_ci now draws through _patient_resamples; its intervals are the direct computation's."""
    y, p, groups = _correlated_patients(5)
    aucs = [roc_auc_score(y[idx], p[idx]) for idx in _direct_patient_resamples(y, groups, 300, 2)]
    ci = compute_bootstrap_ci(y, p, groups, n_boot=300, seed=2)
    assert ci["roc_auc"] == pytest.approx([np.percentile(aucs, 2.5), np.percentile(aucs, 97.5)])


def test_wilson_interval_holds_the_observed_rate_at_zero_and_all():
    for n in (1, 7, 30, 113):
        assert compute_wilson_interval(n, n)[1] == 1.0 and compute_wilson_interval(0, n)[0] == 0.0


# --------------------------------------------------------------------------- one operating point


@pytest.mark.parametrize("policy, target", [("youden", None), ("youden-smooth", None), ("sensitivity", 0.9), ("specificity", 0.8)])
@pytest.mark.parametrize("seed", range(3))
def test_fit_operating_point_gives_exactly_what_train_and_calibrate_computed_before(policy, target, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 150)
    z = 3.0 * (y - 0.5) + rng.normal(0, 1.5, 150)
    # the sequence train_run and calibrate_run each wrote out before fit_operating_point
    temperature = fit_temperature(z, y)
    prob = 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64) / temperature))
    threshold = compute_threshold(y, prob, policy, target)
    point = fit_operating_point(z, y, policy, target, fitted_on="validation data (the patient-level validation split)")
    assert (point.temperature, point.threshold) == (temperature, threshold)
    assert np.array_equal(point.probabilities(z), prob)
    assert np.array_equal(decide(prob, point.threshold), (prob >= threshold).astype(int))
    # the checkpoint's policy text, as train wrote it and as calibrate wrote it by editing train's text
    assert point.description == f"{describe_policy(policy, target)} (the patient-level validation split)"
    site = fit_operating_point(z, y, policy, target, fitted_on="a local calibration sample (data/site)")
    assert site.description == f"{describe_policy(policy, target).replace('validation data', 'a local calibration sample')} (data/site)"


def test_operating_point_is_frozen():
    point = OperatingPoint(1.0, 0.5, "youden", None, "validation data")
    with pytest.raises(AttributeError):
        point.threshold = 0.4


def test_the_decision_rule_is_prob_at_or_above_the_threshold_everywhere():
    t = 0.37
    prob = np.array([t - 1e-9, t, t + 1e-9])
    assert decide(prob, t).tolist() == [0, 1, 1]
    cm = compute_binary_metrics([1, 1, 1], prob, t)["confusion_matrix"]
    assert (cm["fn"], cm["tp"]) == (1, 2)
    sub = compute_clinical_metrics([1, 1, 1], prob, t, pneumonia_type=["viral"] * 3, n_boot=10)["subgroups"]
    assert sub["viral"]["sensitivity"] == pytest.approx(2 / 3)


def test_adaptive_reliability_equals_sklearns_quantile_calibration_curve_without_ties():
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 2, 240), rng.uniform(size=240)  # 240 distinct probabilities, 10 bins of 24
    rel = compute_adaptive_reliability(y, p, n_bins=10)
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="quantile")
    np.testing.assert_allclose(rel["observed"], observed)
    np.testing.assert_allclose(rel["mean_predicted"], predicted)


def test_adaptive_reliability_gives_a_crowd_near_one_one_bin_and_the_spread_predictions_the_rest():
    """Issue 20: with 60% of the predictions above 0.97, six of ten equal-count bins sat on top of each other at x ~ 1."""
    rng = np.random.default_rng(0)
    p = np.r_[rng.uniform(0.97, 1.0, 380), rng.uniform(0.0, 0.03, 100), rng.uniform(0.03, 0.97, 144)]
    y = (rng.uniform(size=p.size) < p).astype(int)
    plain = compute_adaptive_reliability(y, p, n_bins=10, min_width=0)
    assert (plain["mean_predicted"] > 0.97).sum() >= 5  # what the report drew
    rel = compute_adaptive_reliability(y, p, n_bins=10)
    assert len(rel["count"]) <= 10 and rel["count"].sum() == p.size
    assert (rel["mean_predicted"] > 0.97).sum() == 1 and (rel["count"] >= 20).all()
    assert ((rel["mean_predicted"] > 0.03) & (rel["mean_predicted"] < 0.97)).sum() >= 6  # the freed bins go where predictions spread
    assert (rel["edges"][1:, 1] - rel["edges"][:-1, 0] >= 0.05).all()  # no two neighbouring bins within 0.05 of each other
    assert (np.diff(rel["mean_predicted"]) > 0).all() and (rel["edges"][1:, 0] >= rel["edges"][:-1, 1]).all()
    assert rel["positives"].sum() == y.sum()


def test_adaptive_reliability_without_min_width_is_plain_equal_count_ties_included():
    rng = np.random.default_rng(1)
    p = np.round(rng.beta(0.4, 0.4, 237), 2)  # many ties
    y = rng.integers(0, 2, 237)
    rel = compute_adaptive_reliability(y, p, n_bins=10, min_width=0)
    bins = np.array_split(np.argsort(p, kind="mergesort"), 10)
    assert rel["count"].tolist() == [len(b) for b in bins]
    np.testing.assert_allclose(rel["mean_predicted"], [p[b].mean() for b in bins])


def test_adaptive_reliability_keeps_equal_count_bins_where_predictions_spread():
    rng = np.random.default_rng(2)
    p, y = rng.uniform(size=400), rng.integers(0, 2, 400)
    rel = compute_adaptive_reliability(y, p, n_bins=10)
    assert rel["count"].tolist() == [40] * 10


def test_pr_band_reads_interpolated_precision_as_scikit_learn_computes_it():
    from sklearn.metrics import precision_recall_curve

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    p = np.round(rng.uniform(size=80) * 0.6 + 0.4 * y, 2)  # ties included
    grid = np.linspace(0, 1, 41)
    precision, recall, _ = precision_recall_curve(y, p)
    expected = [precision[recall >= r].max() for r in grid]  # the best precision at this recall or higher
    np.testing.assert_allclose(_precision_at(grid, y, p), expected)


def test_pr_band_brackets_the_curve_over_the_roc_bands_resamples():
    y, p, groups = _correlated_patients(3)
    band = compute_pr_band(y, p, groups, n_boot=200, seed=0)
    roc = compute_roc_band(y, p, groups, n_boot=200, seed=0)
    assert band["n_resamples"] == roc["n_resamples"] and band["confidence"] == 0.95
    lo, hi = band["precision_lower"], band["precision_upper"]
    assert (lo >= 0).all() and (lo <= hi).all() and (hi <= 1).all()
    point = _precision_at(band["recall"], y, p)
    inside = (lo - 1e-12 <= point) & (point <= hi + 1e-12)
    assert inside.mean() > 0.9
    assert compute_pr_band(np.ones(10, int), np.linspace(0, 1, 10), np.arange(10)) is None


def test_drop_is_flagged_only_when_the_intervals_cannot_explain_it():
    drop = is_drop_beyond_intervals
    # issue 20: specificity 0.956 on validation, 0.564 on test
    assert drop(0.956, [0.90, 0.98], 0.564, [0.50, 0.63])
    assert not drop(0.95, [0.90, 0.98], 0.91, [0.87, 0.94])  # lower, but the intervals overlap
    assert not drop(0.60, [0.50, 0.70], 0.90, [0.85, 0.94])  # a rise is not a drop
    assert drop(0.95, None, 0.80, [0.75, 0.85]) and not drop(0.95, None, 0.90, [0.85, 0.96])  # no validation interval: its value
    assert not drop(0.95, [0.9, 0.98], 0.5, None) and not drop(None, None, 0.5, [0.4, 0.6]) and not drop(0.9, None, None, None)


def test_compare_with_validation_sets_the_two_side_by_side():
    val = {
        "sensitivity": 0.95,
        "specificity": 0.956,
        "roc_auc": 0.99,
        "ci95": {"sensitivity": [0.9, 0.98], "specificity": [0.91, 0.98], "roc_auc": [0.97, 1.0]},
    }
    test = {
        "sensitivity": 0.97,
        "specificity": 0.564,
        "roc_auc": 0.93,
        "ppv": 0.78,
        "ci95": {"sensitivity": [0.95, 0.98], "specificity": [0.5, 0.63], "roc_auc": [0.91, 0.95], "ppv": [0.74, 0.81]},
    }
    rows = {r["metric"]: r for r in compare_with_validation(val, test)}
    assert list(rows) == ["sensitivity", "specificity", "ppv", "roc_auc"]  # SUMMARY_METRICS order; absent from both: left out
    assert [k for k, r in rows.items() if r["drop_flagged"]] == ["specificity", "roc_auc"]
    assert rows["specificity"]["validation_ci"] == [0.91, 0.98] and rows["specificity"]["test_ci"] == [0.5, 0.63]
    assert rows["ppv"]["validation"] is None and not rows["ppv"]["drop_flagged"]
    assert "do not overlap" in DROP_RULE


def test_logit_and_sigmoid_are_float64_inverses_and_finite_at_the_ends():
    """Issue 21: one logit and one sigmoid; the copies written out by hand clipped differently (the
    smoothed Youden's logit of 1 was 27.63093, of 0 -27.63102) and overflowed with a warning."""
    import warnings

    from pneumoscope.metrics.classification import LOGIT_EPS, logit, sigmoid

    rng = np.random.default_rng(0)
    p = np.r_[0.0, 1e-15, rng.uniform(size=1000), 1 - 1e-15, 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero or overflow warning at the ends
        z = logit(p)
        s = sigmoid(np.r_[-1e4, -800.0, z, 800.0, 1e4])
    assert z.dtype == s.dtype == np.float64 and np.isfinite(z).all() and np.isfinite(s).all()
    assert logit(1.0) == -logit(0.0) == -np.log(LOGIT_EPS)
    np.testing.assert_allclose(logit(1 - p), -logit(p), rtol=0, atol=1e-9)
    assert s[0] == s[1] == 0.0 and s[-1] == s[-2] == 1.0
    inner = p[2:-2]
    np.testing.assert_allclose(sigmoid(logit(inner)), inner, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(logit(inner), np.log(inner / (1 - inner)), rtol=1e-12, atol=1e-12)  # the formula, up to rounding
    assert logit(np.float32(0.25)).dtype == np.float64 and sigmoid([0])[0] == 0.5


def test_calibrated_probability_is_the_sigmoid_of_the_tempered_logit_bit_for_bit():
    from pneumoscope.metrics.classification import calibrated_probability, sigmoid

    z = np.random.default_rng(1).normal(0, 5, 500)
    assert np.array_equal(calibrated_probability(z, 1.7), 1.0 / (1.0 + np.exp(-z / 1.7)))  # the formula it had
    assert np.array_equal(calibrated_probability(z, 1.7), sigmoid(z / 1.7))


def test_the_metric_tables_have_exactly_the_keys_their_types_declare():
    """Issue 21: the metrics are typed (ClinicalMetrics, MulticlassMetrics); the declared keys stay the computed ones."""
    from pneumoscope.metrics.clinical import ClinicalMetrics, compute_clinical_metrics
    from pneumoscope.metrics.multiclass import ClassRow, MulticlassMetrics, compute_multiclass_metrics
    from tests.conftest import conforms

    y = np.array([0, 1, 0, 1, 1, 0])
    m = compute_clinical_metrics(y, np.array([0.1, 0.9, 0.4, 0.6, 0.3, 0.2]), 0.5, pneumonia_type=["", "bacteria"] * 3, n_boot=20)
    conforms(m, ClinicalMetrics)
    assert "subgroups" in m
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]] * 2)
    mc = compute_multiclass_metrics([0, 1, 2] * 2, probs, ["A", "B", "C"], groups=list("abcdef"), n_boot=20)
    conforms(mc, MulticlassMetrics)
    for row in mc["per_class"].values():
        conforms(row, ClassRow)
