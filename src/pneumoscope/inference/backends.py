"""The backends that run the network on preprocessed batches: PyTorch, or ONNX Runtime for an exported model."""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import CheckpointError
from ..models.checkpoint import description_from_json


class TorchBackend:
    """Runs the PyTorch model: preprocessed batches -> logits and OOD distances."""

    name = "pytorch"

    def __init__(self, model):
        self.model = model.eval()

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, C, S, S) normalised -> logits (B,), OOD distances (B,) or None."""
        with torch.inference_mode():
            logits, dist = self.model.logit_and_ood(torch.from_numpy(x))
        return logits.double().numpy(), (None if dist is None else dist.double().numpy())


class OnnxBackend:
    """Runs an exported .onnx file in ONNX Runtime: preprocessed batches -> logits and OOD distances."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        from ..runtime import available_cpus

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cpus()  # its default counts the machine's CPUs, not the process's
        # waiting threads sleep rather than spin: under contention a spinning thread burns the time its partner needs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        meta = self.session.get_modelmeta().custom_metadata_map
        if "pneumoscope" not in meta:
            raise CheckpointError(
                f"{path}: not a pneumoscope ONNX export (no description in its metadata). Export one with `pneumoscope export`."
            )
        self.description = description_from_json(meta["pneumoscope"], path)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits (B,), OOD distances (B,) or None) of a preprocessed batch (B, C, S, S)."""
        out = dict(zip(self.outputs, self.session.run(None, {"image": x}), strict=True))
        return out["logit"].astype(np.float64), out["ood_distance"].astype(np.float64) if "ood_distance" in out else None
