"""The inspection service: saved detectors behind a JSON API, a web page and metrics."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import Future
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from normalcy import __version__
from normalcy.data import (
    ImageLoadError,
    ImageTooLargeError,
    load_image_bytes,
    load_image_bytes_with_size,
)
from normalcy.inputs import LoadedImage
from normalcy.prediction import Prediction
from normalcy.server.batching import BatchingWorker, Model, QueueFullError
from normalcy.server.budget import PixelBudget, header_pixels
from normalcy.server.guard import RequestGuard, allowed_hosts
from normalcy.server.metrics import Metrics
from normalcy.visualize import bounded_overlay, encode_png, overlay_decode_side

log = logging.getLogger("normalcy.server")

UPLOADS = File(..., description="images (repeat the field)")
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    400: "invalid_request",
}
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class ServiceSettings:
    """Limits and options of one service instance.

    max_upload_bytes, max_pixels: per image; max_request_bytes, max_request_pixels: per
    request (the body is refused from its Content-Length, or as soon as it passes the limit);
    decode_pixels: decoded pixels in flight across the service (`PixelBudget`);
    max_overlay_pixels: overlays and masks of larger images come back reduced to this.
    hosts: Host names answered (None: any; see `guard.allowed_hosts`); origins: other web
    origins allowed to post; read_timeout: seconds a request body may stall.
    """

    token: str | None = None
    max_upload_bytes: int = 20 * 1024 * 1024
    max_request_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_request_pixels: int = 100_000_000
    decode_pixels: int = 100_000_000
    max_overlay_pixels: int = 4_000_000
    max_files: int = 32
    max_batch: int = 8
    max_delay: float = 0.01
    max_queue: int = 64
    retry_after_s: int = 1
    hosts: frozenset[str] | None = field(default_factory=lambda: allowed_hosts("127.0.0.1"))
    origins: tuple[str, ...] = ()
    read_timeout: float = 30.0


class ServiceError(Exception):
    """An error answered as JSON with a stable `code`."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def parse_model_arg(argument: str) -> tuple[str, Path]:
    """`NAME=DIR` or `DIR` (named after its folder) -> (name, directory)."""
    name, sep, folder = argument.partition("=")
    if not sep:
        folder, name = argument, Path(argument.rstrip("/")).name
    if not MODEL_NAME.match(name):
        raise ValueError(
            f"model name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name, Path(folder)


def _error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def create_app(models: dict[str, Model], settings: ServiceSettings | None = None) -> FastAPI:
    """A FastAPI app serving the given loaded detectors by name."""
    settings = settings or ServiceSettings()
    metrics = Metrics()
    budget = PixelBudget(settings.decode_pixels)
    workers = {
        name: BatchingWorker(det, settings.max_batch, settings.max_delay, settings.max_queue)
        for name, det in models.items()
    }

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for worker in workers.values():  # shutting down: queued work is dropped, not done
            worker.cancel_waiting()

    app = FastAPI(
        title="normalcy",
        version=__version__,
        description="Visual anomaly detection: score images against saved normal models.",
        lifespan=lifespan,
        # FastAPI's /docs and /redoc pages load their scripts from a CDN, which line computers
        # often cannot reach; the schema itself is served at /openapi.json.
        docs_url=None,
        redoc_url=None,
    )

    def fail(status: int, code: str, message: str, headers: dict | None = None) -> ServiceError:
        return ServiceError(status, code, message, headers)

    def answer(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
        metrics.error(code)
        return JSONResponse(_error_body(code, message), status_code=status, headers=headers)

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, error: ServiceError) -> JSONResponse:
        return answer(error.status, error.code, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        return answer(422, "invalid_request", details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = getattr(error, "code", None) or HTTP_CODES.get(error.status_code, "http_error")
        return answer(error.status_code, code, str(error.detail))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        log.error("internal error", exc_info=error)
        return answer(500, "internal_error", "internal error; the server log has the details")

    @app.middleware("http")
    async def authenticate_and_measure(request: Request, call_next):
        start = time.perf_counter()
        route = request.scope.get("path", "")
        offered = request.query_params.get("token")
        if not settings.token or route == "/healthz":
            response: Response = await call_next(request)
        elif route == "/" and request.method == "GET" and offered is not None:
            # The page's link: the token moves to a cookie and out of the address bar.
            if _same(offered, settings.token):
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(
                    "normalcy_token", settings.token, httponly=True, samesite="strict"
                )
            else:
                response = _unauthorised(answer)
        elif _authorised(request, settings.token):
            response = await call_next(request)
        else:
            response = _unauthorised(answer)
        template = request.scope.get("route")
        label = getattr(template, "path", "unmatched")
        method = request.method if request.method in HTTP_METHODS else "other"
        metrics.observe(method, label, response.status_code, time.perf_counter() - start)
        return response

    @app.get("/healthz", summary="Liveness: the service is up")
    async def healthz() -> dict:
        return {"status": "ok", "models": sorted(workers)}

    @app.get("/v1/models", summary="The loaded models")
    async def list_models() -> dict:
        return {"models": [_describe(name, det) for name, det in models.items()]}

    @app.post("/v1/models/{name}/predict", summary="Score one or several images")
    async def predict(
        request: Request,
        name: str,
        files: list[UploadFile] = UPLOADS,
        maps: bool = Query(False, description="also return the overlay and mask as PNG base64"),
    ) -> dict:
        worker = workers.get(name)
        if worker is None:
            raise fail(404, "model_not_found", f"no model named {name!r}; see GET /v1/models")
        if len(files) > settings.max_files:
            raise fail(413, "too_many_files", f"at most {settings.max_files} images per request")
        uploads = [await _read_upload(upload, settings, fail) for upload in files]
        pixels = [header_pixels(data) for _, data in uploads]
        if sum(pixels) > settings.max_request_pixels:
            raise fail(
                413,
                "too_many_pixels",
                f"{sum(pixels)} pixels in one request; at most {settings.max_request_pixels}",
            )
        # Scored as predict scores files: decoded reduced to what the backbone needs. The
        # bytes are kept only to draw overlays.
        min_side = models[name].decode_side

        async def decoded() -> list[LoadedImage]:
            images = []
            for (upload_name, data), count in zip(uploads, pixels, strict=True):
                async with budget.hold(count):
                    images.append(await _decode(upload_name, data, settings, fail, min_side))
            return images

        images = await _while_connected(request, decoded(), fail)
        start = time.perf_counter()
        try:
            futures = worker.submit(images)
        except QueueFullError as error:
            raise fail(
                503, "queue_full", f"busy: {error}", {"Retry-After": str(settings.retry_after_s)}
            ) from None
        predictions = await _scored(request, futures, fail)
        elapsed_ms = 1000 * (time.perf_counter() - start)
        metrics.scored(name, len(predictions))
        results = []
        for prediction, (_, data), count in zip(predictions, uploads, pixels, strict=True):
            if not maps:
                results.append(_result(prediction, elapsed_ms))
                continue
            async with budget.hold(count):  # full-size decode and PNGs: off the event loop
                results.append(
                    await asyncio.to_thread(_result, prediction, elapsed_ms, data, settings)
                )
        return {"model": name, "results": results}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def prometheus() -> str:
        return metrics.render()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return files("normalcy.server").joinpath("static/index.html").read_text()

    app.add_middleware(
        RequestGuard,
        hosts=settings.hosts,
        origins=settings.origins,
        max_body=settings.max_request_bytes,
        read_timeout=settings.read_timeout,
        on_refusal=metrics.error,
    )
    return app


async def _while_connected(request: Request, work: Awaitable[Any], fail) -> Any:
    """The result of `work`; if the client goes away first, `work` is cancelled (queued images
    leave the queue, a decode waiting for the pixel budget stops waiting) and the request
    ends with 499."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            # Its outcome (a cancellation, or what the cancelled images raised) is not news.
            task.add_done_callback(lambda finished: finished.cancelled() or finished.exception())
            raise fail(499, "client_closed", "the client closed the connection")


async def _scored(request: Request, futures: list[Future], fail) -> list[Prediction]:
    """The predictions of queued images, for as long as the client waits for them."""
    waiting = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    try:
        return await _while_connected(request, waiting, fail)
    except ServiceError:
        raise
    except Exception as error:
        log.error("scoring failed", exc_info=error)
        raise fail(
            500, "scoring_failed", "scoring failed; the server log has the details"
        ) from None


def _same(offered: str, token: str) -> bool:
    return hmac.compare_digest(offered.encode(), token.encode())


def _authorised(request: Request, token: str) -> bool:
    """A bearer token in the Authorization header, or the page's cookie (never the URL)."""
    header = request.headers.get("authorization", "")
    offered = header[7:] if header.lower().startswith("bearer ") else None
    offered = offered or request.cookies.get("normalcy_token")
    return offered is not None and _same(offered, token)


def _unauthorised(answer) -> JSONResponse:
    return answer(
        401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
    )


def _describe(name: str, model: Model) -> dict:
    return {"name": name, **model.describe()}


async def _read_upload(upload: UploadFile, settings: ServiceSettings, fail) -> tuple[str, bytes]:
    """The upload's name and bytes, refused past `max_upload_bytes`."""
    name = upload.filename or "upload"
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise fail(
            413, "upload_too_large", f"{name}: larger than {settings.max_upload_bytes} bytes"
        )
    return name, data


async def _decode(
    name: str, data: bytes, settings: ServiceSettings, fail, min_side: int | None
) -> LoadedImage:
    """The upload decoded, reduced for `min_side`, keeping its original size."""
    try:
        image, size = await asyncio.to_thread(
            load_image_bytes_with_size, data, name, settings.max_pixels, min_side
        )
    except ImageTooLargeError as error:
        raise fail(413, "image_too_large", str(error)) from None
    except ImageLoadError as error:
        raise fail(400, "invalid_image", str(error)) from None
    return LoadedImage(name, image, size)


def _png_base64(array: np.ndarray) -> str:
    return base64.b64encode(encode_png(array)).decode("ascii")


def _result(
    prediction: Prediction,
    ms: float,
    data: bytes | None = None,
    settings: ServiceSettings | None = None,
) -> dict:
    """One image's JSON; with the upload's bytes, also its overlay and mask, at the image's
    size up to `max_overlay_pixels` (larger images: reduced to that, aspect kept)."""
    result = {
        "name": prediction.name,
        "score": prediction.score,
        "is_anomalous": prediction.is_anomalous,
        "threshold": prediction.threshold,
        "ms": round(ms, 2),
    }
    if data is None or settings is None:
        return result
    side = overlay_decode_side(prediction.image_size, settings.max_overlay_pixels)
    image = load_image_bytes(data, prediction.name, settings.max_pixels, side)
    vmax = 2 * prediction.threshold if prediction.threshold else None
    vmax = vmax or float(np.percentile(prediction.score_map, 99.5)) or 1.0
    shown, mask = bounded_overlay(
        image,
        prediction.score_map,
        prediction.image_size,
        vmax,
        prediction.pixel_threshold,
        settings.max_overlay_pixels,
    )
    result["overlay_png"] = _png_base64(shown)
    result["mask_png"] = None if mask is None else _png_base64(mask.astype(np.uint8) * 255)
    return result


def openapi_schema() -> dict:
    """The service's OpenAPI schema (the same for any set of models)."""
    return create_app({}).openapi()
