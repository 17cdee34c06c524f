"""A small web app: one page and a JSON API over the Predictor. Calls predict/explain only.

Safe by default: binds 127.0.0.1 and answers only to the names of the address it is
bound to (DNS rebinding), caps uploads while they stream in and keeps them in
memory (nothing is written to disk), and bounds the work in flight:

- at most ``max_pending`` requests are admitted; the next gets 503 with Retry-After;
- decoding runs on a small pool and draws on a pixel budget, so a few
  64-megapixel DICOMs cannot take the machine's memory between them;
- uploads that arrive within a few milliseconds share one forward pass
  (:class:`MicroBatcher`); Grad-CAM registers hooks on the model, so a heatmap
  (``?heatmap=true``) takes the model lock that the forward passes hold too;
- time is bounded as well as memory: a request's headers must arrive within
  ``HEADER_TIMEOUT_S`` and its body at ``MIN_BODY_RATE`` after a grace of
  ``BODY_GRACE_S`` (else 408), so a slow sender cannot hold a slot; at most
  ``MAX_HEATMAPS`` heatmaps wait or run at once, and past that a result says the
  heatmap was not made rather than keeping everyone else waiting.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from ..data.bounded import MAX_PIXELS
from ..inference.predictor import Predictor
from .batching import BATCH_WAIT_S, MAX_BATCH
from .guards import LOOPBACK_HOSTS, Guard, bind_socket, uvicorn_server
from .pipeline import _Pipeline
from .uploads import BODY_GRACE_S, MIN_BODY_RATE

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # one file, or all the files of a batch together
MAX_PENDING = 32  # requests admitted at once (reading, decoding, queued or running)
MAX_FILES = 16  # files in one POST /predict/batch
MAX_HEATMAPS = 2 * MAX_FILES  # heatmaps waiting or being made, over all requests: a full page upload, twice


def create_app(
    predictor: Predictor,
    *,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pending: int = MAX_PENDING,
    pixel_budget: int = MAX_PIXELS,
    decode_workers: int | None = None,
    max_batch: int = MAX_BATCH,
    batch_wait_s: float = BATCH_WAIT_S,
    max_heatmaps: int = MAX_HEATMAPS,
    body_grace_s: float = BODY_GRACE_S,
    min_body_rate: float = MIN_BODY_RATE,
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS,
    model_name: str | None = None,
):
    """The app. ``allowed_hosts``: names the Host header may carry (None: any, for a server behind a proxy);
    ``model_name``: how /health and the page name the model (default: its backbone); ``max_heatmaps``: heatmaps waiting
    or being made at once (past that a result carries ``heatmap_error``); ``body_grace_s``, ``min_body_rate``: how slowly
    an upload may arrive before 408."""
    from .. import __version__

    pipeline = _Pipeline(
        predictor,
        max_upload_bytes=max_upload_bytes,
        max_pending=max_pending,
        pixel_budget=pixel_budget,
        decode_workers=decode_workers,
        max_batch=max_batch,
        batch_wait_s=batch_wait_s,
        max_heatmaps=max_heatmaps,
        body_grace_s=body_grace_s,
        min_body_rate=min_body_rate,
    )

    @asynccontextmanager
    async def lifespan(app):
        yield
        pipeline.close()

    # no /docs or /redoc: FastAPI's pages load Swagger UI and ReDoc from a CDN, blank offline; the schema is at /openapi.json
    app = FastAPI(
        title="pneumoscope",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description="Chest X-ray PNEUMONIA vs NORMAL. Research software, not a medical device.",
    )
    app.state.batcher, app.state.budget = pipeline.batcher, pipeline.budget
    _add_page_routes(app)
    _add_health_route(app, predictor, model_name, max_upload_bytes=max_upload_bytes, max_pending=max_pending)
    _add_predict_routes(app, pipeline)
    app.add_middleware(Guard, allowed_hosts=allowed_hosts)
    return app


def _add_page_routes(app: FastAPI) -> None:
    """The page and its assets, read once from the package."""
    static = resources.files("pneumoscope.serving").joinpath("static")
    page = static.joinpath("index.html").read_text()
    assets = {name: static.joinpath(name).read_text() for name in ("app.js", "app.css", "favicon.svg")}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/app.js", include_in_schema=False)
    def script() -> Response:
        return Response(assets["app.js"], media_type="text/javascript")

    @app.get("/app.css", include_in_schema=False)
    def style() -> Response:
        return Response(assets["app.css"], media_type="text/css")

    # browsers ask for /favicon.ico even when the page names /favicon.svg; both get the SVG
    @app.get("/favicon.svg", include_in_schema=False)
    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(assets["favicon.svg"], media_type="image/svg+xml")


def _add_health_route(app: FastAPI, predictor: Predictor, model_name: str | None, *, max_upload_bytes: int, max_pending: int) -> None:
    """GET /health: the model served and the server's limits."""
    from .. import __version__

    @app.get("/health")
    def health() -> dict:
        return {
            "status": "ok",
            "version": __version__,
            "model": model_name or predictor.description.backbone,
            "backbone": predictor.description.backbone,
            "threshold": predictor.threshold,
            "classes": list(predictor.class_names),
            "prob_of": predictor.prob_of,
            "backend": predictor.backend.name,
            "ood_guard": predictor.ood_cutoff is not None,
            "max_upload_bytes": max_upload_bytes,
            "max_pending": max_pending,
        }


_UPLOAD_BODY = {
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary", "description": "a radiograph: PNG, JPEG or DICOM"}},
            }
        }
    },
    "required": True,
}
_BATCH_BODY = {
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["files"],
                "properties": {
                    "files": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": f"up to {MAX_FILES} radiographs",
                    }
                },
            }
        }
    },
    "required": True,
}


def _add_predict_routes(app: FastAPI, pipeline: _Pipeline) -> None:
    """POST /predict and POST /predict/batch, over the pipeline."""

    @app.post("/predict", openapi_extra={"requestBody": _UPLOAD_BODY})
    async def predict(request: Request, heatmap: bool = False):
        """One upload (form field `file`) -> probability, label, threshold, OOD flag and the image as the model sees it;
        with `?heatmap=true`, the Grad-CAM heatmap and overlay too."""
        return (await pipeline.admitted(request, ("file",), 1, heatmap))[0]

    @app.post("/predict/batch", openapi_extra={"requestBody": _BATCH_BODY})
    async def predict_batch(request: Request, heatmap: bool = False):
        """Several uploads (repeated form field `files`, at most 16, `max_upload_bytes` in all) -> one result each, in order;
        an unreadable file gets `error` and its `status` instead of a probability."""
        return {"results": await pipeline.admitted(request, ("files",), MAX_FILES, heatmap)}


def serve(run: str, *, host: str = "127.0.0.1", port: int = 8000, allow_hosts: tuple[str, ...] = ()) -> None:
    """Serve the app of ``run`` on ``host``:``port`` until interrupted.

    The address is checked and bound before the model loads, so a bad port or host, or a
    port in use, fails at once as a :class:`~pneumoscope.errors.PneumoscopeError` with the fix.
    """
    sock = bind_socket(host, port)
    try:
        predictor = Predictor.load(run)
        if host not in LOOPBACK_HOSTS:
            logger.warning("serving on %s: reachable from other machines; there is no authentication", host)
        allowed = (*LOOPBACK_HOSTS, *allow_hosts) if host in LOOPBACK_HOSTS else (host, *LOOPBACK_HOSTS, *allow_hosts)
        if host in ("0.0.0.0", "::") and not allow_hosts:
            logger.warning(
                "bound to all interfaces: requests must name this server as %s; add the names clients use with --allow-host",
                ", ".join(allowed),
            )
        app = create_app(predictor, allowed_hosts=allowed, model_name=run_name(run))
        logger.info("serving %s at http://%s:%d/ (Ctrl+C to stop)", run, f"[{host}]" if ":" in host else host, port)
        uvicorn_server(app, host, port).run(sockets=[sock])
    finally:
        sock.close()


def run_name(run: str | os.PathLike) -> str:
    """How the page names the model it serves: the run folder's name (not the checkpoint's), or the .onnx file's."""
    path = os.path.abspath(run)
    if os.path.isfile(path) and not path.endswith(".onnx"):
        path = os.path.dirname(path)
    return os.path.basename(path.rstrip(os.sep)) or path
