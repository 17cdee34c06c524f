"""Site shift: does a new site's set of images differ from the training split, and how?

Pure numpy/scikit-learn on pooled backbone features; computes, never draws.

* :func:`compute_mmd_test`: kernel two-sample test (Gretton et al. 2012, JMLR 13:723),
  unbiased MMD² with a Gaussian kernel, permutation p-value.
* :func:`compute_domain_auc`: how well a cross-validated logistic regression tells the
  site's images from the training images (0.5: indistinguishable), the effect size
  that the p-value lacks.
* :func:`estimate_prevalence`: the site's share of pneumonia without labels. Black-box
  shift estimation (Lipton et al. 2018, ICML) corrects the predicted positive rate
  with the validation confusion matrix; for a binary task it is the adjusted
  classify-and-count estimate ``(q - fpr) / (tpr - fpr)``. Saerens et al.'s EM (2002)
  is reported beside it. Both assume that only the prevalence changed; on the official
  test images the model is also over-confident on the site's normals, and both
  over-estimate (BENCHMARKS.md). A two-component Gaussian mixture fitted to the
  site's own logits does not lean on validation rates and came closer: it is the
  estimate ``adapt`` uses.
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np

from ..metrics.classification import decide, logit

# Below this p-value the site's features are taken to differ from the training split.
SHIFT_ALPHA = 0.01
# A domain classifier AUC under this is a difference too small to move an operating point.
SMALL_SHIFT_AUC = 0.65
MIN_SITE_IMAGES = 20


def _project(ref: np.ndarray, site: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Standardise and keep the top principal components, all estimated on the pooled sample.

    Pooled, not the reference's own: a basis fitted to one sample captures that sample's
    noise and makes two draws of one distribution look different; a projection symmetric
    in the pooled data keeps the permutation test exact.
    """
    pooled = np.concatenate([ref, site])
    mean, sd = pooled.mean(0), pooled.std(0) + 1e-6
    z = (pooled - mean) / sd
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    z = z @ vt[: min(dims, len(vt))].T  # (N, k)
    return z[: len(ref)], z[len(ref) :]


class MmdTest(TypedDict):
    """The kernel two-sample test's result."""

    mmd2: float
    p_value: float  # permutation p-value
    n_permutations: int
    n_reference: int
    n_site: int
    pca_dims: int


class Prevalence(TypedDict):
    """The site's positive share estimated without labels, several ways."""

    predicted_positive_rate: float
    bbse: float | None  # None when the validation rates are too close to tell apart
    em: float
    mixture: float  # the estimate `adapt` uses
    mean_probability: float


class ClassPriorEstimate(TypedDict):
    """N classes: the site's class shares estimated without labels, each a list in class order."""

    predicted_rate: list[float]
    bbse: list[float] | None  # None when the validation confusion matrix is too close to singular
    em: list[float] | None  # None when a class has no validation share
    mean_probability: list[float]


def compute_mmd_test(ref: np.ndarray, site: np.ndarray, *, n_perm: int = 500, dims: int = 32, max_n: int = 500, seed: int = 0) -> MmdTest:
    """Unbiased MMD² between two feature sets, Gaussian kernel (median-distance bandwidth), permutation p-value."""
    rng = np.random.default_rng(seed)
    ref = ref[rng.permutation(len(ref))[:max_n]]
    site = site[rng.permutation(len(site))[:max_n]]
    a, b = _project(np.asarray(ref, np.float64), np.asarray(site, np.float64), dims)
    z = np.concatenate([a, b])
    sq = np.sum(z**2, 1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0)  # (N, N) squared distances
    bandwidth2 = np.median(d2[np.triu_indices(len(z), 1)])
    k = np.exp(-d2 / bandwidth2)
    np.fill_diagonal(k, 0.0)
    n, m = len(a), len(b)

    def mmd2(is_a: np.ndarray) -> float:
        ka = k[np.ix_(is_a, is_a)].sum() / (n * (n - 1))
        kb = k[np.ix_(~is_a, ~is_a)].sum() / (m * (m - 1))
        kab = k[np.ix_(is_a, ~is_a)].sum() / (n * m)
        return float(ka + kb - 2 * kab)

    labels = np.r_[np.ones(n, bool), np.zeros(m, bool)]
    observed = mmd2(labels)
    null = np.array([mmd2(rng.permutation(labels)) for _ in range(n_perm)])
    p = (1 + int((null >= observed).sum())) / (1 + n_perm)
    return {"mmd2": observed, "p_value": p, "n_permutations": n_perm, "n_reference": n, "n_site": m, "pca_dims": a.shape[1]}


def compute_domain_auc(ref: np.ndarray, site: np.ndarray, *, dims: int = 32, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated ROC-AUC of a logistic regression telling site features from reference ones."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    a, b = _project(np.asarray(ref, np.float64), np.asarray(site, np.float64), dims)
    x = np.concatenate([a, b])
    x = np.concatenate([x, x**2], axis=1)  # squares: a change of spread, not only of mean, shows
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    folds = max(2, min(folds, len(a), len(b)))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000), x, y, cv=cv, method="decision_function")
    return float(roc_auc_score(y, scores))


def estimate_prevalence(site_prob: np.ndarray, threshold: float, tpr: float, fpr: float, source_prevalence: float) -> Prevalence:
    """The site's pneumonia prevalence from its calibrated probabilities, without labels.

    ``tpr``/``fpr``: the validation sensitivity and 1 - specificity at ``threshold``;
    ``source_prevalence``: the prevalence the probabilities are calibrated to.
    Returns the predicted positive rate and three estimates: ``bbse``, ``em`` and ``mixture``.
    """
    from sklearn.mixture import GaussianMixture

    p = np.asarray(site_prob, np.float64)
    gmm = GaussianMixture(2, n_init=3, random_state=0).fit(logit(p)[:, None])
    mixture = float(gmm.weights_[int(np.argmax(gmm.means_[:, 0]))])
    q = float(decide(p, threshold).mean())
    bbse = float(np.clip((q - fpr) / (tpr - fpr), 0.0, 1.0)) if tpr - fpr > 0.05 else None
    pi0, pi = source_prevalence, source_prevalence
    for _ in range(500):  # Saerens-Latinne-Decaestecker EM on the priors
        w1, w0 = pi / pi0, (1 - pi) / (1 - pi0)
        new = float(np.mean(p * w1 / (p * w1 + (1 - p) * w0)))
        if abs(new - pi) < 1e-7:
            break
        pi = new
    return {"predicted_positive_rate": q, "bbse": bbse, "em": pi, "mixture": mixture, "mean_probability": float(p.mean())}


def estimate_class_priors(site_probs: np.ndarray, confusion, source_priors) -> ClassPriorEstimate:
    """N classes: the site's class priors from its calibrated class probabilities (n, K), without labels.

    ``confusion``: the validation confusion matrix (rows true, columns predicted); ``source_priors``: the class
    shares the probabilities are calibrated to. Returns the predicted class rates and two estimates, each a
    list of K shares: ``bbse`` (Lipton et al. 2018: the predicted rates solved through the validation
    confusion matrix, P(pred | true), by least squares, clipped and renormalised; None when that matrix is too
    close to singular to invert) and ``em`` (Saerens et al. 2002: EM on the priors; None when a class has no share in
    ``source_priors``).
    """
    p = np.asarray(site_probs, np.float64)
    k = p.shape[1]
    cm = np.asarray(confusion, np.float64)
    pi0 = np.asarray(source_priors, np.float64)
    predicted = np.bincount(p.argmax(axis=1), minlength=k) / len(p)
    given = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)  # P(pred = j | true = i)
    bbse = None
    if np.linalg.cond(given.T) < 20:
        solved = np.clip(np.linalg.lstsq(given.T, predicted, rcond=None)[0], 0.0, None)
        bbse = (solved / solved.sum()).tolist() if solved.sum() > 0 else None
    return {"predicted_rate": predicted.tolist(), "bbse": bbse, "em": _em_priors(p, pi0), "mean_probability": p.mean(axis=0).tolist()}


def _em_priors(p: np.ndarray, pi0: np.ndarray) -> list[float] | None:
    """Saerens et al.'s EM on the priors of probabilities ``p`` (n, K) calibrated at ``pi0``; None when a class has no
    validation share (its probabilities cannot be reweighted: the ratio to a prior of zero is undefined)."""
    if not (pi0 > 0).all():
        return None
    pi = pi0.copy()
    for _ in range(1000):
        q = p * (pi / pi0)
        new = (q / q.sum(axis=1, keepdims=True)).mean(axis=0)
        if np.abs(new - pi).max() < 1e-8:
            pi = new
            break
        pi = new
    return pi.tolist()


def _shares(x) -> np.ndarray:
    """Class shares, each clipped to at least 0.01, summing to one."""
    x = np.clip(np.asarray(x, np.float64), 0.01, None)
    return x / x.sum()


def class_prior_offsets(priors, source_priors) -> np.ndarray:
    """N classes: the logit offsets (K,) that move softmax probabilities calibrated at ``source_priors`` to ``priors``
    (Bayes' rule with the class-conditional densities unchanged; each share clipped to at least 0.01)."""
    return np.log(_shares(priors)) - np.log(_shares(source_priors))


def screening_offset(priors, source_priors, normal: int) -> float:
    """N classes: the logit offset of "not normal" against ``normal`` that the same move of priors gives (the change
    in the log prior odds of the two groups)."""
    moved, source = _shares(priors)[normal], _shares(source_priors)[normal]
    return float(np.log((1 - moved) / moved) - np.log((1 - source) / source))


def prior_shift_offset(prevalence: float, source_prevalence: float) -> float:
    """Logit offset that moves probabilities calibrated at ``source_prevalence`` to ``prevalence``
    (Bayes' rule with the class-conditional densities unchanged)."""
    clip = lambda x: float(np.clip(x, 0.02, 0.98))  # noqa: E731
    return float(logit(clip(prevalence)) - logit(clip(source_prevalence)))


def shift_verdict(
    mmd: dict, domain_auc: float, prevalence: dict, *, val_prevalence: float, ood_fraction: float | None, positive: str = "pneumonia"
) -> tuple[bool, str]:
    """(shift detected, a plain sentence with the remedy); ``positive``: what the prevalence is the share of."""
    detected = mmd["p_value"] < SHIFT_ALPHA
    parts = []
    if not detected:
        parts.append(
            f"No set-level shift detected (MMD p = {mmd['p_value']:.3g}, domain AUC {domain_auc:.2f}): the operating point "
            "chosen on validation may hold here, but only a labelled local sample can confirm it."
        )
    else:
        size = "small" if domain_auc < SMALL_SHIFT_AUC else "clear"
        parts.append(
            f"The site's images differ from the training images ({size} shift: MMD p = {mmd['p_value']:.3g}, "
            f"a classifier tells them apart with AUC {domain_auc:.2f}). The threshold chosen on validation is unlikely to "
            "hold here: run `pneumoscope adapt` on these unlabelled images, or `pneumoscope calibrate` with about 40 "
            "labelled local images."
        )
    parts.append(
        f"Estimated {positive} prevalence {prevalence['mixture']:.2f} (validation {val_prevalence:.2f}); predicted positive "
        f"rate {prevalence['predicted_positive_rate']:.2f}."
    )
    if ood_fraction is not None and ood_fraction > 0.05:
        parts.append(
            f"{100 * ood_fraction:.0f}% of the images are flagged out of distribution one by one: check that they are frontal chest radiographs."
        )
    return detected, " ".join(parts)
