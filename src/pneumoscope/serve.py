"""A small web app: one page and a JSON API over the Predictor. Calls predict/explain only.

Safe by default: binds 127.0.0.1, caps uploads, writes nothing to disk, loads the
model once and serialises inference (Grad-CAM hooks change the model while they
run, so two requests must not overlap on it).
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from importlib import resources

import numpy as np
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse

from .io import ImageReadError
from .predict import Predictor

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 20 * 1024 * 1024


def _png(rgb_or_gray: np.ndarray, alpha: np.ndarray | None = None) -> str:
    from PIL import Image

    arr = np.clip(rgb_or_gray * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if alpha is not None:
        arr = np.dstack([arr, np.clip(alpha * 255.0 + 0.5, 0, 255).astype(np.uint8)])
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def create_app(predictor: Predictor, *, max_upload_bytes: int = MAX_UPLOAD_BYTES):
    from . import __version__
    from .explain import compute_cam
    from .plots import heatmap_rgb, overlay_cam

    app = FastAPI(
        title="pneumoscope",
        version=__version__,
        description="Chest X-ray PNEUMONIA vs NORMAL. Research software, not a medical device.",
    )
    lock = threading.Lock()
    page = resources.files("pneumoscope").joinpath("static/index.html").read_text()
    can_explain = predictor.backend.name == "pytorch"

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "version": __version__, "backbone": predictor.description.get("backbone"), "threshold": predictor.threshold,
                "backend": predictor.backend.name, "ood_guard": predictor.ood_cutoff is not None, "max_upload_bytes": max_upload_bytes}  # fmt: skip

    @app.post("/predict")
    def predict(request: Request, file: UploadFile = File(..., description="a radiograph: PNG, JPEG or DICOM")) -> dict:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_upload_bytes + 64 * 1024:
            raise HTTPException(413, f"upload is {int(declared):,} bytes; the limit is {max_upload_bytes:,}")
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload is over the limit of {max_upload_bytes:,} bytes")
        name = file.filename or "upload"
        try:
            image = predictor.read(name, data)
        except ImageReadError as err:
            unknown = "not a readable image" in err.reason or "not a readable DICOM" in err.reason
            raise HTTPException(415 if unknown else 422, f"{name}: {err.reason}. {err.fix}") from err
        with lock:
            pred = predictor.predict_images([image], [name])[0]
            view = predictor.preprocessing_view(image)
            cam = compute_cam(predictor.model, predictor.preprocess(image), int(predictor.decide(pred.prob)))[0] if can_explain else None
        result = {**pred.to_dict(), "ood_cutoff": predictor.ood_cutoff, "image_png": _png(view), "notice": "Research software, not a medical device."}
        if cam is not None:
            result.update(cam_method="gradcam", cam_target=pred.label, heatmap_png=_png(heatmap_rgb(cam), alpha=np.ones_like(cam)),
                          overlay_png=_png(overlay_cam(view, cam)))  # fmt: skip
        return result

    return app


def serve(run: str, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    predictor = Predictor.load(run)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: reachable from other machines; there is no authentication", host)
    uvicorn.run(create_app(predictor), host=host, port=port, log_level="info")
