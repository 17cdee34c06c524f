"""The model: backbones and the preprocessing contract, the classifier and its guards, features, the checkpoint and its description."""
