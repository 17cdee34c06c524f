"""What a request goes through behind the routes: admission, its uploads read, decoded, batched, and explained when asked."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import HTTPException, Request

from ..data.decode import image_pixels, screen_image
from ..errors import ImageReadError
from ..inference.prediction import Prediction
from ..inference.predictor import Predictor
from .batching import MicroBatcher, PixelBudget
from .uploads import read_multipart

RETRY_AFTER_S = 1
NOTICE = "Research software, not a medical device."
# An unreadable upload's status by ImageReadError.kind: not an image (or a format not read here) is
# 415 Unsupported Media Type; a damaged image of a known format is 422 Unprocessable Content.
UPLOAD_STATUS = {"unsupported": 415, "damaged": 422}


def _png(rgb_or_gray: np.ndarray, alpha: np.ndarray | None = None) -> str:
    from PIL import Image

    arr = np.clip(rgb_or_gray * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if alpha is not None:
        arr = np.dstack([arr, np.clip(alpha * 255.0 + 0.5, 0, 255).astype(np.uint8)])
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


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
        result = {**pred.to_dict(), "prob_of": self.predictor.prob_of, "ood_cutoff": self.predictor.ood_cutoff, "notice": NOTICE}
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
