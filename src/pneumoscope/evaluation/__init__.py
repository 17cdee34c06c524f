"""Evaluating a run on labelled images: metrics, figures, the HTML report, comparing two evaluations."""
