"""What each field of ``metrics.json`` is called when a person reads it: the report's tables and summary.

No imports, so the command line (``cli.format_metrics``) can use it without loading numpy or scikit-learn.
"""

METRIC_NAMES = {
    "sensitivity": "Sensitivity (recall)",
    "specificity": "Specificity",
    "ppv": "Positive predictive value (precision)",
    "precision": "Positive predictive value (precision)",
    "npv": "Negative predictive value",
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "f1": "F1 score",
    "roc_auc": "ROC AUC",
    "pr_auc": "PR AUC (average precision)",
    "brier": "Brier score",
    "ece": "Expected calibration error (ECE)",
    "prevalence": "Prevalence of pneumonia",
    "threshold": "Decision threshold",
    "n": "Images",
    "n_positive": "Pneumonia images",
}


def metric_name(key: str) -> str:
    """The human name of a ``metrics.json`` field; the field itself where there is none."""
    return METRIC_NAMES.get(key, key)
