"""Training a run: the pipeline (features, head, operating point, guard), fine-tuning, settings, tracking."""
