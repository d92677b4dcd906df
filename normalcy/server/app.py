"""The inspection service: saved detectors behind a JSON API, a web page and metrics."""

from __future__ import annotations

import asyncio
import base64
import hmac
import re
import time
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from normalcy import __version__
from normalcy.data import (
    ImageLoadError,
    ImageTooLargeError,
    LoadedImage,
    load_image_bytes,
    load_image_bytes_with_size,
)
from normalcy.detector import Detector, Prediction
from normalcy.server.batching import BatchingWorker, QueueFullError
from normalcy.server.metrics import Metrics
from normalcy.visualize import encode_png, overlay

UPLOADS = File(..., description="images (repeat the field)")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class ServiceSettings:
    """Limits and options of one service instance."""

    token: str | None = None
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_files: int = 32
    max_batch: int = 8
    max_delay: float = 0.01
    max_queue: int = 64
    retry_after_s: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


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


def create_app(models: dict[str, Detector], settings: ServiceSettings | None = None) -> FastAPI:
    """A FastAPI app serving the given loaded detectors by name."""
    settings = settings or ServiceSettings()
    metrics = Metrics()
    workers = {
        name: BatchingWorker(det, settings.max_batch, settings.max_delay, settings.max_queue)
        for name, det in models.items()
    }
    app = FastAPI(
        title="normalcy",
        version=__version__,
        description="Visual anomaly detection: score images against saved normal models.",
    )

    def fail(status: int, code: str, message: str, headers: dict | None = None) -> ServiceError:
        return ServiceError(status, code, message, headers)

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, error: ServiceError) -> JSONResponse:
        metrics.error(error.code)
        return JSONResponse(
            _error_body(error.code, error.message), status_code=error.status, headers=error.headers
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        metrics.error("invalid_request")
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        return JSONResponse(_error_body("invalid_request", details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        metrics.error(code)
        return JSONResponse(_error_body(code, str(error.detail)), status_code=error.status_code)

    @app.middleware("http")
    async def authenticate_and_measure(request: Request, call_next):
        start = time.perf_counter()
        route = request.scope.get("path", "")
        if settings.token and route != "/healthz" and not _authorised(request, settings.token):
            metrics.error("unauthorized")
            response: Response = JSONResponse(
                _error_body("unauthorized", "missing or wrong bearer token"),
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        else:
            response = await call_next(request)
            if settings.token and route == "/" and request.query_params.get("token"):
                response.set_cookie(
                    "normalcy_token", settings.token, httponly=True, samesite="strict"
                )
        template = request.scope.get("route")
        label = getattr(template, "path", "unmatched")
        metrics.observe(request.method, label, response.status_code, time.perf_counter() - start)
        return response

    @app.get("/healthz", summary="Liveness: the service is up")
    async def healthz() -> dict:
        return {"status": "ok", "models": sorted(workers)}

    @app.get("/v1/models", summary="The loaded models")
    async def list_models() -> dict:
        return {"models": [_describe(name, det) for name, det in models.items()]}

    @app.post("/v1/models/{name}/predict", summary="Score one or several images")
    async def predict(
        name: str,
        files: list[UploadFile] = UPLOADS,
        maps: bool = Query(False, description="also return the overlay and mask as PNG base64"),
    ) -> dict:
        worker = workers.get(name)
        if worker is None:
            raise fail(404, "model_not_found", f"no model named {name!r}; see GET /v1/models")
        if len(files) > settings.max_files:
            raise fail(413, "too_many_files", f"at most {settings.max_files} images per request")
        # Scored as predict scores files: decoded reduced to what the backbone needs. The
        # bytes are kept only to draw overlays at the image's full size.
        min_side = models[name].image_size
        uploads = [await _decode_upload(upload, settings, fail, min_side) for upload in files]
        images = [image for image, _ in uploads]
        start = time.perf_counter()
        try:
            futures = worker.submit(images)
        except QueueFullError as error:
            raise fail(
                503, "queue_full", f"busy: {error}", {"Retry-After": str(settings.retry_after_s)}
            ) from None
        try:
            predictions = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except Exception as error:
            raise fail(500, "scoring_failed", f"scoring failed: {error}") from None
        elapsed_ms = 1000 * (time.perf_counter() - start)
        metrics.scored(name, len(predictions))
        results = await asyncio.to_thread(  # full-size maps and PNGs: off the event loop
            lambda: [
                _result(p, data if maps else None, elapsed_ms, settings.max_pixels)
                for p, (_, data) in zip(predictions, uploads, strict=True)
            ]
        )
        return {"model": name, "results": results}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def prometheus() -> str:
        return metrics.render()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return files("normalcy.server").joinpath("static/index.html").read_text()

    return app


def _authorised(request: Request, token: str) -> bool:
    header = request.headers.get("authorization", "")
    offered = header[7:] if header.lower().startswith("bearer ") else None
    offered = offered or request.cookies.get("normalcy_token") or request.query_params.get("token")
    return offered is not None and hmac.compare_digest(offered.encode(), token.encode())


def _describe(name: str, detector: Detector) -> dict:
    return {
        "name": name,
        "backbone": detector.backbone,
        "method": detector.method,
        "shots": detector.shots,
        "threshold": detector.threshold_,
        "image_size": detector.image_size,
        "version": getattr(detector, "normalcy_version_", __version__),
    }


async def _decode_upload(
    upload: UploadFile, settings: ServiceSettings, fail, min_side: int | None = None
) -> tuple[LoadedImage, bytes]:
    """The upload decoded (reduced for `min_side`) and its bytes."""
    name = upload.filename or "upload"
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise fail(
            413, "upload_too_large", f"{name}: larger than {settings.max_upload_bytes} bytes"
        )
    try:
        image, size = await asyncio.to_thread(
            load_image_bytes_with_size, data, name, settings.max_pixels, min_side
        )
    except ImageTooLargeError as error:
        raise fail(413, "image_too_large", str(error)) from None
    except ImageLoadError as error:
        raise fail(400, "invalid_image", str(error)) from None
    return LoadedImage(name, image, size), data


def _png_base64(array: np.ndarray) -> str:
    return base64.b64encode(encode_png(array)).decode("ascii")


def _result(prediction: Prediction, data: bytes | None, ms: float, max_pixels: int) -> dict:
    """One image's JSON; with the upload's bytes, also its overlay and mask at full size."""
    result = {
        "name": prediction.name,
        "score": prediction.score,
        "is_anomalous": prediction.is_anomalous,
        "threshold": prediction.threshold,
        "ms": round(ms, 2),
    }
    if data is not None:
        image = load_image_bytes(data, prediction.name, max_pixels)
        vmax = 2 * prediction.threshold if prediction.threshold else None
        vmax = vmax or float(np.percentile(prediction.anomaly_map, 99.5)) or 1.0
        result["overlay_png"] = _png_base64(
            overlay(image, prediction.anomaly_map, 0.0, vmax, mask=prediction.mask)
        )
        result["mask_png"] = (
            None if prediction.mask is None else _png_base64(prediction.mask.astype(np.uint8) * 255)
        )
    return result


def openapi_schema() -> dict:
    """The service's OpenAPI schema (the same for any set of models)."""
    return create_app({}).openapi()
