"""Inference: the Predictor (the one path from an image to a decision), streaming over archives, ONNX export."""
