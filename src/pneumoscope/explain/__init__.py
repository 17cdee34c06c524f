"""Explanations: CAM maps of the decided class, their faithfulness and sanity checks, the shortcut audit."""
