"""ONNX export with the preprocessing contract, threshold and OOD guard inside, and a parity check."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import OutputExistsError, StateError
from ..models.checkpoint import SHA256_KEY
from ..outputs import check_writable, partial_name, remove_orphans, write_bytes_atomic
from .backends import onnx_digest
from .predictor import Predictor

logger = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4  # max |delta P(pneumonia)| between ONNX Runtime and PyTorch


class _Exported(nn.Module):
    """image (B, C, S, S), normalised -> logit (B,) [, ood_distance (B,)]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        logit, ood = self.model.logit_and_ood(image)
        return logit if ood is None else (logit, ood)


def export_onnx(
    run: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False, check_images: list[np.ndarray] | None = None
) -> dict:
    """Write ``out`` (.onnx) from a run; returns the parity report. Raises if parity fails.

    The model is written under a temporary name beside ``out`` and renamed only once
    the ONNX checker and the parity check pass: a killed or failed export never
    leaves an unverified ``out``, and ``overwrite`` keeps the previous file until the
    new one is verified.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out.")
    check_writable(out)
    remove_orphans(out)
    predictor = Predictor.from_checkpoint(run)
    outputs = ["logit"] + (["ood_distance"] if predictor.model.ood is not None else [])
    logger.info(
        "exporting %s (%s, outputs %s) to ONNX, then checking it against PyTorch", run, predictor.description.backbone, ", ".join(outputs)
    )
    proto = _onnx_model(predictor, outputs)
    report = _verify_into_place(proto, predictor, out, check_images)
    logger.debug("exported %s: max |delta prob| %.2e over %d images", out, report["max_abs_prob_diff"], report["n"])
    return report


def _onnx_model(predictor: Predictor, outputs: list[str]):
    """The ONNX model (a ModelProto, dynamic batch) of the predictor's network, its description in the metadata with the
    SHA-256 of both (``onnx_digest``)."""
    s = predictor.preprocessing.input_size
    dummy = torch.zeros(2, predictor.preprocessing.in_chans, s, s)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(
        _Exported(predictor.model).eval(),
        (dummy,),
        input_names=["image"],
        output_names=outputs,
        dynamic_shapes={"image": {0: batch}},
        dynamo=True,
        verbose=False,
    )
    proto = program.model_proto
    for node in proto.graph.node:  # the exporter's debug notes name this machine's source files (and its user's folders)
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    description = replace(
        predictor.description,
        onnx={
            "input": "image: (batch, channels, size, size) float32, preprocessed per 'preprocessing'",
            "outputs": outputs,
            "probability": "softmax(logit / temperature) over class_names; the screening probability is 1 - P(normal_class)"
            if predictor.multiclass
            else "sigmoid(logit / temperature)",
        },
    ).to_dict()
    for key, value in (
        ("pneumoscope", json.dumps(description)),
        ("threshold", str(predictor.threshold)),
        ("preprocessing", json.dumps(description["preprocessing"])),
        ("class_names", json.dumps(list(predictor.class_names))),
    ):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.metadata_props.add(key=SHA256_KEY, value=onnx_digest(proto))  # last: it covers every entry above and the graph
    return proto


def _verify_into_place(proto, predictor: Predictor, out: Path, check_images: list[np.ndarray] | None) -> dict:
    """Write the model under a temporary name, check it (ONNX checker, parity with PyTorch), then rename it to ``out``;
    returns the parity report. The temporary file never stays."""
    import onnx

    staged = out.with_name(f"{partial_name(out)}unverified.onnx")
    try:
        write_bytes_atomic(staged, proto.SerializeToString())
        onnx.checker.check_model(str(staged))
        report = check_parity(predictor, Predictor.from_onnx(staged), check_images)
        if report["max_abs_prob_diff"] > PARITY_TOLERANCE:
            raise StateError(
                f"ONNX export differs from PyTorch by {report['max_abs_prob_diff']:.2e} in probability (limit {PARITY_TOLERANCE}); not kept."
            )
        os.replace(staged, out)
    finally:
        staged.unlink(missing_ok=True)
    return report


def check_parity(torch_predictor: Predictor, onnx_predictor: Predictor, images: list[np.ndarray] | None = None, seed: int = 0) -> dict:
    """Max |delta probability| (P(pneumonia); N classes: every class's probability and P(not normal)) and the OOD
    distance's relative difference between two predictors on the same images."""
    if not images:
        rng = np.random.default_rng(seed)
        images = [rng.uniform(size=(160, 200)).astype(np.float32) for _ in range(4)]
    (za, da), (zb, db) = torch_predictor.forward(images), onnx_predictor.forward(images)
    pa, pb = torch_predictor.probability(za), onnx_predictor.probability(zb)
    diff = np.abs(pa - pb).max()
    if torch_predictor.multiclass:
        diff = max(diff, np.abs(torch_predictor.class_probabilities(za) - onnx_predictor.class_probabilities(zb)).max())
    report = {"n": len(images), "max_abs_prob_diff": float(diff)}
    if da is not None and db is not None:
        report["max_rel_ood_diff"] = float(np.max(np.abs(da - db) / np.maximum(np.abs(da), 1e-6)))
    return report
