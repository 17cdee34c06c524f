"""The backends that run the network on preprocessed batches: PyTorch, or ONNX Runtime for an exported model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from ..models.checkpoint import SHA256_KEY, compute_digest, description_from_json, verify_digest

# The metadata entries exports made before the digest: its description and copies of its parts for other tools.
ONNX_LEGACY_KEYS = frozenset({"pneumoscope", "threshold", "preprocessing", "class_names"})


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
        blob = Path(path).read_bytes()  # the bytes checked below are the bytes run
        self.session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        meta = verified_onnx_metadata(path, blob)
        self.description = description_from_json(meta["pneumoscope"], path)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits (B,), OOD distances (B,) or None) of a preprocessed batch (B, C, S, S)."""
        out = dict(zip(self.outputs, self.session.run(None, {"image": x}), strict=True))
        return out["logit"].astype(np.float64), out["ood_distance"].astype(np.float64) if "ood_distance" in out else None


def onnx_digest(proto) -> str:
    """The SHA-256 an export stores under ``SHA256_KEY``: its metadata entries (the description) and its graph's
    weights and wiring (:func:`graph_payload`), by ``compute_digest``."""
    entries = {p.key: p.value for p in proto.metadata_props if p.key != SHA256_KEY}
    return compute_digest(entries, graph_payload(proto.graph))


def graph_payload(graph) -> bytes:
    """The bytes an export's digest covers of its graph: each initializer's name, type, shape and values, and each
    node's operator, inputs and outputs. Built from the values, not from protobuf's serialisation, which another
    protobuf version may order differently: a model that is intact must never be refused."""
    from onnx import numpy_helper

    parts = []
    for init in graph.initializer:
        header = f"{init.name}|{init.data_type}|{','.join(map(str, init.dims))}|".encode()
        parts += [len(header).to_bytes(8, "little"), header, numpy_helper.to_array(init).tobytes()]
    for node in graph.node:
        wiring = f"{node.op_type}|{','.join(node.input)}|{','.join(node.output)}".encode()
        parts += [len(wiring).to_bytes(8, "little"), wiring]
    return b"".join(parts)


def verified_onnx_metadata(path: str | os.PathLike, blob: bytes) -> dict[str, str]:
    """The metadata entries of an exported model (``blob``: the file's bytes), checked against its digest; exports
    written before the digest are not checked."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load_model_from_string(blob)
    except DecodeError as err:
        raise CheckpointError(f"{path}: not a readable ONNX file ({err}). Fix: export it again with `pneumoscope export`.") from err
    meta = {p.key: p.value for p in proto.metadata_props}
    if "pneumoscope" not in meta:
        raise CheckpointError(
            f"{path}: not a pneumoscope ONNX export (no description in its metadata). Export one with `pneumoscope export`."
        )
    verify_digest(path, meta, graph_payload(proto.graph), legacy_keys=ONNX_LEGACY_KEYS, fix="export it again with `pneumoscope export`")
    return meta
