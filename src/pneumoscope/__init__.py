"""pneumoscope: chest X-ray PNEUMONIA vs NORMAL classifiers. Research software, not a medical device."""

__version__ = "0.1.0"
