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

import asyncio
import base64
import errno
import io
import logging
import os
import queue
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from importlib import resources

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from starlette.datastructures import MutableHeaders

from ..data.bounded import MAX_PIXELS
from ..data.decode import image_pixels, screen_image
from ..errors import ImageReadError, StateError, UsageError
from ..inference.prediction import Prediction
from ..inference.predictor import Predictor

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # one file, or all the files of a batch together
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and part headers on top of the files
MAX_PENDING = 32  # requests admitted at once (reading, decoding, queued or running)
MAX_BATCH = 16  # uploads in one forward pass
BATCH_WAIT_S = 0.005  # how long the first upload of a batch waits for company
MAX_FILES = 16  # files in one POST /predict/batch
MAX_HEATMAPS = 2 * MAX_FILES  # heatmaps waiting or being made, over all requests: a full page upload, twice
HEADER_TIMEOUT_S = 10.0  # from connecting (or the last answer on a kept-alive connection) to the end of the headers
BODY_GRACE_S = 10.0  # a body may start this late...
MIN_BODY_RATE = 50_000  # ... and must then keep arriving at this many bytes a second on average (20 MB in 410 s)
RETRY_AFTER_S = 1
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
NOTICE = "Research software, not a medical device."
# An unreadable upload's status by ImageReadError.kind: not an image (or a format not read here) is
# 415 Unsupported Media Type; a damaged image of a known format is 422 Unprocessable Content.
UPLOAD_STATUS = {"unsupported": 415, "damaged": 422}
# The page's own origin only; images are data: URLs made by the page's own script.
CSP = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"


def _png(rgb_or_gray: np.ndarray, alpha: np.ndarray | None = None) -> str:
    from PIL import Image

    arr = np.clip(rgb_or_gray * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if alpha is not None:
        arr = np.dstack([arr, np.clip(alpha * 255.0 + 0.5, 0, 255).astype(np.uint8)])
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _clean_name(filename: str | None) -> str:
    """The upload's base name, printable and at most 100 characters: it is echoed in answers."""
    name = os.path.basename((filename or "").replace("\\", "/"))
    name = "".join(c for c in name if c.isprintable())[:100]
    return name or "upload"


class PixelBudget:
    """A counting semaphore over pixels: decodes run side by side while their pixels fit.

    An image larger than the whole budget waits until it can run alone.
    """

    def __init__(self, pixels: int):
        if pixels <= 0:
            raise ValueError(f"pixel_budget must be a positive number of pixels, got {pixels!r}")
        self.pixels = pixels
        self.used = 0
        self._cond = threading.Condition()

    @contextmanager
    def take(self, pixels: int):
        """Hold ``pixels`` of the budget for the ``with`` block, waiting until they fit."""
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + pixels <= self.pixels)
            self.used += pixels
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


class MicroBatcher:
    """One thread runs the network; uploads that arrive within ``wait_s`` share a forward pass.

    ``lock`` is held during each forward pass; whoever needs the model to itself
    (Grad-CAM's hooks) takes the same lock.
    """

    def __init__(self, predictor: Predictor, lock: threading.Lock, *, max_batch: int = MAX_BATCH, wait_s: float = BATCH_WAIT_S):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch!r}")
        self.predictor, self.lock, self.max_batch, self.wait_s = predictor, lock, max_batch, wait_s
        self.batches: list[int] = []  # sizes of the last batches run, for tests and logs
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="pneumoscope-batcher", daemon=True)
        self._thread.start()

    def submit(self, x: np.ndarray, name: str, screened: str = "") -> Future:
        """``x``: one preprocessed image (1, C, S, S); ``screened``: why the decoded image cannot be a radiograph, or "";
        the future gives its :class:`Prediction`."""
        future: Future = Future()
        self._queue.put((x, name, screened, future))
        return future

    def close(self) -> None:
        """Stop the batching thread once the queued uploads are done."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            batch, deadline = [item], time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(item)
            self._run(batch)

    def _run(self, batch: list) -> None:
        try:
            with self.lock:
                x = np.concatenate([x for x, *_ in batch])  # (B, C, S, S)
                preds = self.predictor.predict_batch(x, [name for _, name, _, _ in batch], [why for _, _, why, _ in batch])
        except Exception as err:  # every waiting request gets the failure; the loop goes on
            logger.exception("forward pass of %d uploads failed", len(batch))
            for *_, future in batch:
                future.set_exception(err)
            return
        self.batches = [*self.batches[-99:], len(batch)]
        for (*_, future), pred in zip(batch, preds, strict=True):
            future.set_result(pred)


class Guard:
    """ASGI middleware: refuse a Host header this server was not bound under; security headers on every answer."""

    def __init__(self, app, allowed_hosts: tuple[str, ...] | None):
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.allowed is not None:
            host = _host_name(dict(scope["headers"]).get(b"host", b"").decode("latin-1"))
            if host not in self.allowed:
                detail = (
                    f"this server answers to {', '.join(sorted(self.allowed))}, not to the Host header {host[:100]!r} (a guard against DNS rebinding); "
                    "open it by one of those names, or start it with `--allow-host NAME`"
                )
                return await _json_error(421, detail)(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Cache-Control"] = "no-store"
                headers["Referrer-Policy"] = "no-referrer"
                headers["Content-Security-Policy"] = CSP
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _host_name(host: str) -> str:
    """'example.org:8000' -> 'example.org'; '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _json_error(status: int, detail: str) -> Response:
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": detail}, status_code=status)


MAX_BOUNDARY = 70  # characters of a multipart boundary (RFC 2046)


async def read_multipart(
    request: Request,
    fields: tuple[str, ...],
    *,
    max_bytes: int,
    max_files: int,
    grace_s: float = BODY_GRACE_S,
    min_rate: float = MIN_BODY_RATE,
) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each part named in ``fields``, parsed from the body as it streams in.

    Everything stays in memory: the body is counted as it arrives (chunked or
    not) and refused with 413 as soon as it passes ``max_bytes``; Starlette's own
    form parser would spool it to a temporary file first. A body slower than
    ``min_rate`` bytes a second (after ``grace_s``) is refused with 408.
    """
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser

    how = f"send multipart/form-data with the image in a `{fields[0]}` field, e.g. `curl -F {fields[0]}=@xray.dcm URL`"
    boundary = _form_boundary(request, how)
    too_big = f"the limit is {max_bytes:,} bytes of files per request. Send a smaller file (downscale it or export a PNG)"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes + FORM_OVERHEAD:
        raise HTTPException(413, f"upload is {int(declared):,} bytes; {too_big}")
    form = _FormParts(fields, max_files)
    parser = MultipartParser(boundary, form.callbacks())
    try:
        await _stream_into(parser, request, max_bytes=max_bytes, too_big=too_big, grace_s=grace_s, min_rate=min_rate)
        parser.finalize()
    except MultipartParseError as err:
        raise HTTPException(400, f"the multipart body is malformed ({type(err).__name__}); {how}") from err
    if not form.parts:
        raise HTTPException(422, f"no `{fields[0]}` field in the form; {how}")
    return [(name, bytes(data)) for name, data in form.parts]


def _form_boundary(request: Request, how: str) -> bytes:
    """The multipart boundary of the request's Content-Type; 415 when it is not multipart/form-data, 400 when too long."""
    from python_multipart.multipart import parse_options_header

    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or not params.get(b"boundary"):
        raise HTTPException(415, f"the request body must be multipart/form-data, got {content_type.decode('latin-1')[:60]!r}; {how}")
    if len(params[b"boundary"]) > MAX_BOUNDARY:  # RFC 2046: at most 70 characters (a longer one made the parser fail with 500)
        raise HTTPException(
            400, f"the multipart boundary is {len(params[b'boundary'])} characters; at most {MAX_BOUNDARY} are allowed (RFC 2046); {how}"
        )
    return params[b"boundary"]


class _FormParts:
    """The multipart parser's callbacks: the parts named in ``fields`` kept as (file name, bytes), at most ``max_files``."""

    def __init__(self, fields: tuple[str, ...], max_files: int):
        self.fields, self.max_files = fields, max_files
        self.parts: list[tuple[str, bytearray]] = []
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._keep = False

    def callbacks(self) -> dict:
        return {
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
        }

    def _on_header_field(self, data, start, end):
        self._field += data[start:end]

    def _on_header_value(self, data, start, end):
        key = self._field.lower()
        self._headers[key] = self._headers.get(key, b"") + data[start:end]

    def _on_header_end(self):
        self._field = b""

    def _on_headers_finished(self):
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        self._headers = {}
        self._keep = options.get(b"name", b"").decode("utf-8", "replace") in self.fields
        if self._keep:
            if len(self.parts) == self.max_files:
                raise HTTPException(413, f"a request may carry at most {self.max_files} files; send the rest in another request")
            self.parts.append((_clean_name(options.get(b"filename", b"").decode("utf-8", "replace")), bytearray()))

    def _on_part_data(self, data, start, end):
        if self._keep:
            self.parts[-1][1].extend(data[start:end])


async def _stream_into(parser, request: Request, *, max_bytes: int, too_big: str, grace_s: float, min_rate: float) -> None:
    """Feed the body to ``parser`` as it arrives: 413 past ``max_bytes`` (and the form's overhead), 408 when slower than
    ``min_rate`` bytes a second after ``grace_s``."""
    received, started, chunks = 0, time.monotonic(), request.stream()
    while True:
        wait = started + grace_s + received / min_rate - time.monotonic()  # the slowest pace allowed so far
        try:
            chunk = await asyncio.wait_for(anext(chunks), timeout=max(wait, 0.0))
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise HTTPException(
                408,
                f"the upload arrived too slowly ({received:,} bytes in {time.monotonic() - started:.0f} s); "
                f"after {grace_s:g} s a body must arrive at {min_rate:,} bytes/s or more. Send it again "
                "over a faster connection",
                headers={"Connection": "close"},
            ) from None
        received += len(chunk)
        if received > max_bytes + FORM_OVERHEAD:
            raise HTTPException(413, f"upload is over {received - len(chunk):,} bytes and still coming; {too_big}")
        parser.write(chunk)


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
            "prob_of": prob_of(predictor),
            "backend": predictor.backend.name,
            "ood_guard": predictor.ood_cutoff is not None,
            "max_upload_bytes": max_upload_bytes,
            "max_pending": max_pending,
        }


def prob_of(predictor: Predictor) -> str:
    """What a result's ``prob`` is the probability of: the positive class, or (N classes) "not <normal class>"."""
    return f"not {predictor.description.normal_class}" if predictor.multiclass else predictor.class_names[1]


class _Pipeline:
    """What a request goes through behind the routes: admission, the uploads read, decoded within the pixel budget,
    batched through the model, and explained when asked."""

    def __init__(
        self,
        predictor: Predictor,
        *,
        max_upload_bytes: int,
        max_pending: int,
        pixel_budget: int,
        decode_workers: int | None,
        max_batch: int,
        batch_wait_s: float,
        max_heatmaps: int,
        body_grace_s: float,
        min_body_rate: float,
    ):
        from .. import plots
        from ..explain import cams  # with the app, not on the first heatmap

        self._cams, self._plots = cams, plots
        self.predictor = predictor
        self.lock = threading.Lock()
        self.batcher = MicroBatcher(predictor, self.lock, max_batch=max_batch, wait_s=batch_wait_s)
        self.budget = PixelBudget(pixel_budget)
        self.decode_pool = ThreadPoolExecutor(decode_workers or min(4, os.cpu_count() or 1), thread_name_prefix="pneumoscope-decode")
        self.cam_pool = ThreadPoolExecutor(1, thread_name_prefix="pneumoscope-cam")
        self.can_explain = predictor.backend.name == "pytorch"
        self.slots = threading.BoundedSemaphore(max_pending)  # one per request admitted
        self.heatmaps = threading.BoundedSemaphore(max_heatmaps)  # one per heatmap asked for and not yet made
        self.max_upload_bytes, self.max_pending, self.max_heatmaps = max_upload_bytes, max_pending, max_heatmaps
        self.body_grace_s, self.min_body_rate = body_grace_s, min_body_rate

    def close(self) -> None:
        self.batcher.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.cam_pool.shutdown(wait=False, cancel_futures=True)

    def prepare(self, name: str, data: bytes) -> tuple[np.ndarray, np.ndarray, str]:
        """Decode within the pixel budget -> (the model's view (S, S), its input (1, C, S, S), the image-level screen);
        the full-size image is dropped here."""
        predictor, budget = self.predictor, self.budget
        pixels = image_pixels(name, data)
        with budget.take(min(pixels or budget.pixels, budget.pixels)):  # unknown size: as much as the largest accepted
            image = predictor.read(name, data)
            screened = screen_image(image)
            view = predictor.preprocessing_view(image)
            del image
        return (
            view,
            predictor.preprocess(view).numpy(),
            screened,
        )  # the view is already at the input size: same input as from the full image

    def explain(self, view: np.ndarray, pred: Prediction) -> dict:
        with self.lock:  # Grad-CAM's hooks must not meet a batched forward pass
            # the view, at the input size, preprocesses to x
            known = None if pred.probs is None else [list(pred.probs.values())]  # N classes: what the batch computed
            _, (cam,), _ = self._cams.views_and_cams(self.predictor, [view], probs=[pred.prob], class_probs=known)
        return {
            "cam_method": "gradcam",
            "cam_target": pred.label,
            "heatmap_png": _png(self._plots.heatmap_rgb(cam), alpha=np.ones_like(cam)),
            "overlay_png": _png(self._plots.overlay_cam(view, cam)),
        }

    async def analyse(self, name: str, data: bytes, heatmap: bool) -> dict:
        loop = asyncio.get_running_loop()
        try:
            view, x, screened = await loop.run_in_executor(self.decode_pool, self.prepare, name, data)
        except ImageReadError as err:
            raise HTTPException(UPLOAD_STATUS[err.kind], f"{name}: {err.detail}") from err
        del data
        pred = await asyncio.wrap_future(self.batcher.submit(x, name, screened))
        result = {**pred.to_dict(), "prob_of": prob_of(self.predictor), "ood_cutoff": self.predictor.ood_cutoff, "notice": NOTICE}
        result["image_png"] = await loop.run_in_executor(self.decode_pool, _png, view)
        if heatmap and self.can_explain and pred.label is not None:  # no decision (unreadable, or not assessable), nothing to explain
            if not self.heatmaps.acquire(blocking=False):
                result["heatmap_error"] = (
                    f"not made: the server is busy with {self.max_heatmaps} other heatmaps; "
                    "ask again for this image alone (POST /predict?heatmap=true)"
                )
                return result
            try:
                result.update(await loop.run_in_executor(self.cam_pool, self.explain, view, pred))
            finally:
                self.heatmaps.release()
        return result

    async def admitted(self, request: Request, fields: tuple[str, ...], max_files: int, heatmap: bool) -> list[dict]:
        """Admit the request (or 503 when ``max_pending`` are in progress), read its uploads, analyse them."""
        if not self.slots.acquire(blocking=False):
            raise HTTPException(
                503,
                f"the server is busy ({self.max_pending} requests in progress); retry in {RETRY_AFTER_S} s",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        try:
            uploads = await read_multipart(
                request,
                fields,
                max_bytes=self.max_upload_bytes,
                max_files=max_files,
                grace_s=self.body_grace_s,
                min_rate=self.min_body_rate,
            )
            if max_files == 1:
                return [await self.analyse(*uploads[0], heatmap)]
            results = await asyncio.gather(*(self.analyse(name, data, heatmap) for name, data in uploads), return_exceptions=True)
            return [r if isinstance(r, dict) else self._failed(name, r) for (name, _), r in zip(uploads, results, strict=True)]
        finally:
            self.slots.release()

    def _failed(self, name: str, err: BaseException) -> dict:
        if not isinstance(err, HTTPException):
            raise err
        return {**Prediction(name, None, None, self.predictor.threshold, error=err.detail).to_dict(), "status": err.status_code}


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


def uvicorn_server(app, host: str, port: int, *, header_timeout_s: float = HEADER_TIMEOUT_S, log_level: str = "info"):
    """A uvicorn server for ``app`` whose connections are closed when a request's headers take longer than
    ``header_timeout_s`` (uvicorn bounds only the wait between kept-alive requests)."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _header_timer = None

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _headers_late(self) -> None:
            if self.cycle is None or self.cycle.response_complete:  # no request in hand: its headers are late
                logger.info("closing a connection from %s: no complete request headers within %g s", self.client, header_timeout_s)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, http=Protocol))


def run_name(run: str | os.PathLike) -> str:
    """How the page names the model it serves: the run folder's name (not the checkpoint's), or the .onnx file's."""
    path = os.path.abspath(run)
    if os.path.isfile(path) and not path.endswith(".onnx"):
        path = os.path.dirname(path)
    return os.path.basename(path.rstrip(os.sep)) or path


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` and listening, or a one-line error with the fix.

    Raises:
        UsageError: ``port`` outside 1-65535, or a ``host`` that does not resolve.
        StateError: the address cannot be bound (the port is in use, needs privileges, or
            the host is not an address of this machine).
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UsageError(f"--port must be a TCP port from 1 to 65535, got {port!r}. Fix: e.g. --port 8000")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise UsageError(
            f"--host {host!r}: not an address, nor a name this machine can resolve ({getattr(err, 'strerror', None) or err}). "
            "Fix: an address of this machine, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (all its interfaces)"
        ) from err
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port left in TIME_WAIT is free again at once
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise StateError(f"{host}:{port}: cannot listen there: {_bind_failure(err)}") from err
    return sock


def _bind_failure(err: OSError) -> str:
    """What a failed bind means, and the fix."""
    if err.errno == errno.EADDRINUSE:
        return "the port is in use (another server, or a `pneumoscope serve` still running). Fix: stop it, or choose another --port"
    if err.errno == errno.EACCES:
        return "permission denied (ports below 1024 need administrator rights). Fix: --port 8000, or another port from 1024 up"
    if err.errno == errno.EADDRNOTAVAIL:
        return (
            "not an address of this machine. Fix: --host 127.0.0.1 (this machine only), 0.0.0.0 (all interfaces), or one of its addresses"
        )
    return f"{err.strerror or err}. Fix: another --host or --port"
