"""Site shift: set-level tests on generated feature sets, prevalence without labels, adaptation."""

import numpy as np
import pytest

from pneumoscope.adaptation.shift import compute_domain_auc, compute_mmd_test, estimate_prevalence, prior_shift_offset, shift_verdict


def _features(rng, n, dim=64, shift=0.0, scale=1.0):
    base = rng.standard_normal((n, dim)) @ np.diag(np.linspace(2.0, 0.2, dim))  # correlated-looking spectrum
    return base * scale + shift


def test_same_distribution_is_not_called_a_shift():
    rng = np.random.default_rng(0)
    ref, site = _features(rng, 400), _features(rng, 150)
    mmd = compute_mmd_test(ref, site, n_perm=300, seed=0)
    assert mmd["p_value"] > 0.05
    assert abs(compute_domain_auc(ref, site) - 0.5) < 0.1


@pytest.mark.parametrize("shift,scale", [(0.5, 1.0), (0.0, 1.6)])
def test_a_mean_or_scale_shift_is_detected(shift, scale):
    rng = np.random.default_rng(1)
    ref, site = _features(rng, 400), _features(rng, 150, shift=shift, scale=scale)
    mmd = compute_mmd_test(ref, site, n_perm=300, seed=0)
    assert mmd["p_value"] < 0.01
    assert compute_domain_auc(ref, site) > 0.65


def test_mmd_p_values_are_uniform_enough_under_the_null():
    """A valid test rejects about alpha of the time when nothing differs."""
    rejections = 0
    for seed in range(40):
        rng = np.random.default_rng(100 + seed)
        rejections += compute_mmd_test(_features(rng, 120, dim=16), _features(rng, 60, dim=16), n_perm=99, seed=seed)["p_value"] < 0.1
    assert rejections <= 9  # expected 4 of 40 at alpha 0.1; 9 is beyond p < 0.01 of Binomial(40, 0.1)


def test_bbse_recovers_the_prevalence_under_label_shift_where_counting_does_not():
    rng = np.random.default_rng(2)
    tpr, fpr = 0.9, 0.2  # a modest classifier: counting positives is biased
    n, prevalence = 4000, 0.3
    y = rng.uniform(size=n) < prevalence
    decided = np.where(y, rng.uniform(size=n) < tpr, rng.uniform(size=n) < fpr)
    prob = np.where(decided, 0.8, 0.2)
    est = estimate_prevalence(prob, 0.5, tpr, fpr, source_prevalence=0.74)
    assert abs(est["predicted_positive_rate"] - prevalence) > 0.08
    assert abs(est["bbse"] - prevalence) < 0.03


def test_em_prevalence_is_exact_for_calibrated_probabilities():
    rng = np.random.default_rng(3)
    # probabilities calibrated at prevalence 0.5; the site has 0.2
    n = 20000
    y = rng.uniform(size=n) < 0.2
    score = rng.normal(np.where(y, 1.0, -1.0), 1.0)
    prob = 1 / (1 + np.exp(-2 * score))  # the exact posterior at prior 0.5 for unit-variance Gaussians at +-1
    est = estimate_prevalence(prob, 0.5, 0.84, 0.16, source_prevalence=0.5)
    assert abs(est["em"] - 0.2) < 0.02


def test_prior_offset_moves_probabilities_to_the_new_prevalence():
    off = prior_shift_offset(0.625, 0.74)
    odds = lambda p: p / (1 - p)  # noqa: E731
    p = 0.9
    moved = 1 / (1 + np.exp(-(np.log(odds(p)) + off)))
    assert np.isclose(odds(moved) / odds(p), odds(0.625) / odds(0.74))
    assert prior_shift_offset(0.5, 0.5) == 0.0


def test_verdict_names_the_remedy_only_when_shifted():
    prev = {"predicted_positive_rate": 0.7, "bbse": 0.6, "em": 0.65, "mixture": 0.6, "mean_probability": 0.7}
    shifted, text = shift_verdict({"p_value": 0.002}, 0.8, prev, val_prevalence=0.74, ood_fraction=0.0)
    assert shifted and "unlikely to hold" in text and "pneumoscope adapt" in text and "calibrate" in text
    same, text = shift_verdict({"p_value": 0.4}, 0.52, prev, val_prevalence=0.74, ood_fraction=0.0)
    assert not same and "No set-level shift" in text


def test_shift_statistics_take_the_one_logit_with_the_same_numbers():
    """Issue 21: the logit written out by hand here is metrics.classification.logit, values unchanged."""
    from pneumoscope.metrics.classification import logit, sigmoid

    for prevalence, source in ((0.625, 0.74), (0.01, 0.99), (0.3, 0.5)):
        lo = lambda x: np.log(x / (1 - x))  # noqa: E731  # the formula prior_shift_offset had
        clip = lambda x: float(np.clip(x, 0.02, 0.98))  # noqa: E731
        assert abs(prior_shift_offset(prevalence, source) - (lo(clip(prevalence)) - lo(clip(source)))) < 1e-12
    threshold, offset = 0.37, prior_shift_offset(0.625, 0.74)
    moved = float(sigmoid(logit(threshold) + offset))  # how adapt carries the threshold
    assert abs(moved - 1.0 / (1.0 + np.exp(-(np.log(threshold / (1 - threshold)) + offset)))) < 1e-15
    rng = np.random.default_rng(3)
    y = rng.uniform(size=4000) < 0.3
    prob = np.r_[1 / (1 + np.exp(-2 * rng.normal(np.where(y, 1.0, -1.0), 1.0))), 0.0, 1.0]  # the ends are finite logits
    est = estimate_prevalence(prob, 0.5, 0.84, 0.16, source_prevalence=0.5)
    from sklearn.mixture import GaussianMixture

    by_hand = np.log(np.clip(prob, 1e-12, 1)) - np.log(np.clip(1 - prob, 1e-12, 1))  # the logit estimate_prevalence had
    assert np.array_equal(logit(prob), by_hand)
    gmm = GaussianMixture(2, n_init=3, random_state=0).fit(by_hand[:, None])
    assert est["mixture"] == float(gmm.weights_[int(np.argmax(gmm.means_[:, 0]))])


def _three_class_site(priors, n=30000, seed=5):
    """Labels drawn at ``priors`` and the exact posteriors of Gaussians at three means, calibrated at equal priors."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=priors)
    means = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    x = means[y] + rng.normal(size=(n, 2))
    z = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(-1)  # log density up to a constant
    p = np.exp(z - z.max(1, keepdims=True))
    return y, p / p.sum(1, keepdims=True)


def test_class_priors_of_a_three_class_site_by_em_and_bbse():
    """Issue 22: label shift over N classes. Probabilities calibrated at equal priors; the site has (0.6, 0.3, 0.1)."""
    from pneumoscope.adaptation.shift import estimate_class_priors

    _, p_val = _three_class_site([1 / 3] * 3, seed=1)
    y_val = _three_class_site([1 / 3] * 3, seed=1)[0]
    cm = np.zeros((3, 3))
    np.add.at(cm, (y_val, p_val.argmax(1)), 1)
    _, p_site = _three_class_site([0.6, 0.3, 0.1])
    est = estimate_class_priors(p_site, cm, cm.sum(1) / cm.sum())
    assert np.allclose(est["em"], [0.6, 0.3, 0.1], atol=0.02) and np.isclose(sum(est["em"]), 1)
    assert np.allclose(est["bbse"], [0.6, 0.3, 0.1], atol=0.03)
    assert not np.allclose(est["predicted_rate"], [0.6, 0.3, 0.1], atol=0.03)  # counting the argmax is biased
    singular = estimate_class_priors(p_site, np.ones((3, 3)), [1 / 3] * 3)
    assert singular["bbse"] is None and singular["em"] is not None  # a confusion matrix that cannot be inverted


def test_class_prior_offsets_give_the_bayes_posterior_at_the_new_priors():
    from pneumoscope.adaptation.shift import class_prior_offsets, screening_offset
    from pneumoscope.metrics.multiclass import softmax

    y, p = _three_class_site([0.6, 0.3, 0.1])
    moved = softmax(np.log(p) + class_prior_offsets([0.6, 0.3, 0.1], [1 / 3] * 3))
    exact = p * np.array([0.6, 0.3, 0.1])
    assert np.allclose(moved, exact / exact.sum(1, keepdims=True))
    assert np.allclose(class_prior_offsets([0.2, 0.5, 0.3], [0.2, 0.5, 0.3]), 0)
    # the screening odds of "not normal" (class 0 normal) move by the prior odds: from 2:1 to 0.4:0.6
    assert screening_offset([0.6, 0.3, 0.1], [1 / 3] * 3, 0) == pytest.approx(np.log(0.4 / 0.6) - np.log(2.0))


def test_a_class_without_a_validation_share_gives_no_em_priors_not_nan():
    """A run whose validation split lacked a class: EM divided by a prior of zero and its NaN shares would have reached
    the head's biases through `adapt --method center+prior`; now there is no estimate, and adapt refuses the prior shift."""
    from pneumoscope.adaptation.adapt import _estimated_prevalence, _fold_class_prior_shift
    from pneumoscope.adaptation.shift import estimate_class_priors
    from pneumoscope.errors import DataError

    _, p = _three_class_site([0.6, 0.3, 0.1], n=300)
    cm = np.array([[10, 1, 0], [1, 10, 0], [0, 0, 0]])  # no validation image of class 2
    est = estimate_class_priors(p, cm, cm.sum(1) / cm.sum())
    assert est["em"] is None and all(np.isfinite(est["predicted_rate"]))
    report = {
        "prevalence": {"mixture": 0.4},
        "class_priors": {**est, "classes": ["A", "B", "C"], "normal": "A", "validation": [0.5, 0.5, 0.0]},
    }
    assert _estimated_prevalence(report) == 0.4  # the screening view's estimate instead
    with pytest.raises(DataError, match="--method center"):
        _fold_class_prior_shift(None, report)
