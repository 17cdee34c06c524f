"""The backends that run the network on preprocessed batches: PyTorch, or ONNX Runtime for an exported model."""

from __future__ import annotations

import os

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
        blob = read_model_file(path)  # the bytes checked below are the bytes run
        self.session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        meta = verified_onnx_metadata(path, blob)
        self.description = description_from_json(meta["pneumoscope"], path)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits (B,), OOD distances (B,) or None) of a preprocessed batch (B, C, S, S)."""
        out = dict(zip(self.outputs, self.session.run(None, {"image": x}), strict=True))
        return out["logit"].astype(np.float64), out["ood_distance"].astype(np.float64) if "ood_distance" in out else None


def onnx_digest(proto) -> str:
    """The SHA-256 an export stores under ``SHA256_KEY``: its metadata entries (the description) and its model's
    operator sets, weights and nodes (:func:`model_payload`), by ``compute_digest``."""
    entries = {p.key: p.value for p in proto.metadata_props if p.key != SHA256_KEY}
    return compute_digest(entries, model_payload(proto))


def model_payload(proto) -> bytes:
    """The bytes an export's digest covers of its model: the operator sets, then :func:`graph_payload`. Built from the
    values, not from protobuf's serialisation, which another protobuf version may order differently: a model that
    is intact must never be refused."""
    opsets = ";".join(f"{o.domain}:{o.version}" for o in proto.opset_import).encode()
    return _field(opsets) + graph_payload(proto.graph)


def graph_payload(graph) -> bytes:
    """Each initializer's name, type, shape and values, and each node's domain, operator, inputs, outputs and
    attributes (by name, each with its value: a Gemm's alpha or a Conv's strides change the output as weights do)."""
    from onnx import numpy_helper

    parts = []
    for init in graph.initializer:
        parts += [
            _field(f"{init.name}|{init.data_type}|{','.join(map(str, init.dims))}".encode()),
            _field(numpy_helper.to_array(init).tobytes()),
        ]
    for node in graph.node:
        parts.append(_field(f"{node.domain}|{node.op_type}|{','.join(node.input)}|{','.join(node.output)}".encode()))
        parts += [_field(f"{a.name}|{a.type}".encode()) + _field(_attribute_value(a)) for a in sorted(node.attribute, key=lambda a: a.name)]
    return b"".join(parts)


def _field(data: bytes) -> bytes:
    """``data`` prefixed with its length, so that no two sequences of fields run together alike."""
    return len(data).to_bytes(8, "little") + data


def _attribute_value(attr) -> bytes:
    """A node attribute's value as bytes: numbers packed, texts as stored, tensors by their values, subgraphs by
    :func:`graph_payload`; a kind this export does not write (sparse tensors, types) by its serialisation."""
    import struct

    from onnx import AttributeProto, numpy_helper

    kind = attr.type
    if kind == AttributeProto.FLOAT:
        return struct.pack("<f", attr.f)
    if kind == AttributeProto.INT:
        return struct.pack("<q", attr.i)
    if kind == AttributeProto.STRING:
        return attr.s
    if kind == AttributeProto.FLOATS:
        return struct.pack(f"<{len(attr.floats)}f", *attr.floats)
    if kind == AttributeProto.INTS:
        return struct.pack(f"<{len(attr.ints)}q", *attr.ints)
    if kind == AttributeProto.STRINGS:
        return b"".join(_field(t) for t in attr.strings)
    if kind == AttributeProto.TENSOR:
        return _field(str(attr.t.data_type).encode()) + numpy_helper.to_array(attr.t).tobytes()
    if kind == AttributeProto.GRAPH:
        return graph_payload(attr.g)
    return attr.SerializeToString()


MAX_ONNX_BYTES = 2**31  # protobuf's limit for one message: an ONNX file without external data is smaller


def read_model_file(path: str | os.PathLike) -> bytes:
    """An ONNX file's bytes: a regular file within :data:`MAX_ONNX_BYTES`, never a FIFO (it would wait for ever) or a
    device (``/dev/zero`` never ends)."""
    from ..data.bounded import read_regular

    try:
        return read_regular(path, MAX_ONNX_BYTES)
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{path}: cannot be read as an ONNX file ({err}). Fix: give the .onnx file `pneumoscope export` wrote."
        ) from err


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
    verify_digest(path, meta, model_payload(proto), legacy_keys=ONNX_LEGACY_KEYS, fix="export it again with `pneumoscope export`")
    return meta
