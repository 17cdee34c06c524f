"""The work in flight: a pixel budget over decodes, and the thread that batches uploads through the model."""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager

import numpy as np

from ..inference.predictor import Predictor

logger = logging.getLogger("pneumoscope.serving.app")  # the name the server's log lines have always carried

MAX_BATCH = 16  # uploads in one forward pass
BATCH_WAIT_S = 0.005  # how long the first upload of a batch waits for company


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
