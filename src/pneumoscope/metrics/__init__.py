"""Pure numpy/scikit-learn metrics: classification rates, the operating point, intervals, calibration, comparisons."""
