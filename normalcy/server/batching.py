"""Batches images from concurrent requests so the backbone runs on several at once."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from normalcy.inputs import LoadedImage
from normalcy.prediction import Prediction


class Model(Protocol):
    """What the service needs of a model: a `Detector`, or an exported model
    (`normalcy.runtime`)."""

    decode_side: int | None

    def predict_images(self, images: Iterable[LoadedImage]) -> Iterable[Prediction]: ...

    def describe(self) -> dict[str, Any]: ...


class QueueFullError(RuntimeError):
    """The model's queue is full: the caller should retry later."""


@dataclass
class _Job:
    image: LoadedImage
    future: Future


class BatchingWorker:
    """One detector and the thread that scores its queued images.

    The thread takes the first waiting image, then waits at most `max_delay` seconds for more,
    up to `max_batch`, and scores them together. The queue holds at most `max_queue` images;
    beyond that `submit` refuses instead of letting memory grow.
    """

    def __init__(
        self, detector: Model, max_batch: int = 8, max_delay: float = 0.01, max_queue: int = 64
    ) -> None:
        self.detector = detector
        self.max_batch = max_batch
        self.max_delay = max_delay
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="normalcy-batcher")
        self._thread.start()

    def submit(self, images: list[LoadedImage]) -> list[Future]:
        """Queue all of a request's images, or none of them (QueueFullError)."""
        with self._lock:  # all-or-nothing against other submitters
            free = self._queue.maxsize - self._queue.qsize()
            if len(images) > free:
                raise QueueFullError(
                    f"{self._queue.qsize()} images waiting; queue holds {self._queue.maxsize}"
                )
            jobs = [_Job(image, Future()) for image in images]
            for job in jobs:
                self._queue.put_nowait(job)
        return [job.future for job in jobs]

    def _next_batch(self) -> list[_Job]:
        batch = [self._queue.get()]
        deadline = time.monotonic() + self.max_delay
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            batch.append(job)
        return batch

    def cancel_waiting(self) -> int:
        """Cancel every queued image not yet being scored (on shutdown); how many."""
        cancelled = 0
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return cancelled
            cancelled += job.future.cancel()

    def _run(self) -> None:
        while True:
            # Images whose request was abandoned (client gone, shutdown) are dropped here.
            batch = [job for job in self._next_batch() if job.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                predictions: list[Prediction] = list(
                    self.detector.predict_images([job.image for job in batch])
                )
            except Exception as error:  # a failure fails this batch's requests, not the worker
                for job in batch:
                    job.future.set_exception(error)
                continue
            for job, prediction in zip(batch, predictions, strict=True):
                job.future.set_result(prediction)
