"""The inspection service, tested against real `normalcy serve` processes on loopback ports."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from normalcy import Detector
from normalcy.data import LoadedImage
from normalcy.server.app import openapi_schema, parse_model_arg
from normalcy.server.batching import BatchingWorker, QueueFullError

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-token"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A `normalcy serve` subprocess on a free loopback port."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "normalcy.cli", "serve", *args, "--port", str(self.port)]
        environment = {**os.environ, **(env or {})}
        self.process = subprocess.Popen(
            command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stdout.read()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start within 90 s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _start(args: list[str], env: dict[str, str] | None = None) -> Iterator[Server]:
    server = Server(args, env)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(model: Path) -> Iterator[Server]:
    yield from _start([str(model), "--max-upload-mb", "1", "--max-megapixels", "0.5"])


@pytest.fixture(scope="module")
def secured(model: Path) -> Iterator[Server]:
    yield from _start([f"part-a={model}"], {"NORMALCY_TOKEN": TOKEN})


def _images(dataset: Path) -> dict[str, list[Path]]:
    test = dataset / "test"
    return {
        "good": sorted((test / "good").glob("*.png")),
        "bad": sorted(p for p in test.glob("*/*.png") if p.parent.name != "good"),
    }


def _files(*paths: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def _post(server: Server, files, model: str = "fabric", **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models/{model}/predict", files=files, timeout=60, **kwargs)


# ---------------------------------------------------------------------------------- basics
def test_health_and_model_listing(server: Server, model: Path) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok", "models": ["fabric"]}
    (listed,) = httpx.get(server.url + "/v1/models").json()["models"]
    config = json.loads((model / "config.json").read_text())
    assert listed["name"] == "fabric" and listed["backbone"] == "efficientnet_lite0"
    assert listed["method"] == "patchknn" and listed["image_size"] == 64
    assert listed["threshold"] == pytest.approx(config["threshold"])
    assert listed["version"] == config["normalcy_version"]


def test_predict_scores_like_the_library(server: Server, model: Path, dataset: Path) -> None:
    images = _images(dataset)
    paths = images["good"][:2] + images["bad"][:2]
    response = _post(server, _files(*paths))
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["name"] for r in results] == [p.name for p in paths]
    expected = Detector.load(model).score(paths)
    np.testing.assert_allclose([r["score"] for r in results], expected, rtol=1e-4)
    for r in results:
        assert set(r) == {"name", "score", "is_anomalous", "threshold", "ms"}
        assert r["is_anomalous"] == (r["score"] > r["threshold"]) and r["ms"] > 0


def test_maps_come_back_as_png_overlay_and_mask(server: Server, dataset: Path) -> None:
    path = _images(dataset)["bad"][0]
    (result,) = _post(server, _files(path), params={"maps": 1}).json()["results"]
    overlay = Image.open(io.BytesIO(base64.b64decode(result["overlay_png"])))
    mask = Image.open(io.BytesIO(base64.b64decode(result["mask_png"])))
    assert overlay.size == mask.size == Image.open(path).size
    assert set(np.unique(np.asarray(mask))) <= {0, 255}


def test_a_large_upload_scores_like_the_library_with_or_without_maps(
    server: Server, model: Path, dataset: Path, tmp_path: Path
) -> None:
    large = tmp_path / "large.png"  # decoded reduced (short side >= 2 x the 64 px input)
    Image.open(_images(dataset)["bad"][0]).resize((400, 360)).save(large)
    expected = Detector.load(model).score(large)
    (plain,) = _post(server, _files(large)).json()["results"]
    (mapped,) = _post(server, _files(large), params={"maps": 1}).json()["results"]
    assert plain["score"] == mapped["score"] == pytest.approx(expected[0], rel=1e-5)
    overlay = Image.open(io.BytesIO(base64.b64decode(mapped["overlay_png"])))
    assert overlay.size == (400, 360)


# ------------------------------------------------------------------------------ bad input
def test_a_corrupt_image_is_a_400_naming_it_and_the_worker_survives(
    server: Server, dataset: Path
) -> None:
    response = _post(server, [("files", ("broken.png", b"\x89PNG\r\n\x1a\n garbage", "image/png"))])
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_image" and "broken.png" in error["message"]
    assert _post(server, _files(_images(dataset)["good"][0])).status_code == 200


def test_image_type_is_judged_by_content_not_name(server: Server, dataset: Path) -> None:
    png = _images(dataset)["good"][0].read_bytes()
    assert _post(server, [("files", ("photo.txt", png, "text/plain"))]).status_code == 200
    response = _post(server, [("files", ("notes.png", b"just some text", "image/png"))])
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_image"


def test_upload_and_pixel_limits_answer_413(server: Server) -> None:
    big = _png(np.zeros((800, 800, 3), np.uint8))  # 0.64 MP > 0.5 MP limit
    response = _post(server, [("files", ("big.png", big, "image/png"))])
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "image_too_large"
    noisy = _png(np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8))
    assert len(noisy) > 1024 * 1024
    response = _post(server, [("files", ("noisy.png", noisy, "image/png"))])
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "upload_too_large"


def test_unknown_models_and_escaping_names_are_404(server: Server, dataset: Path) -> None:
    files = _files(_images(dataset)["good"][0])
    for name in ("other", "..%2F..%2Fetc", "fabric%2F..%2F..%2Ffabric"):
        response = _post(server, files, model=name)
        assert response.status_code == 404, name
        assert response.json()["error"]["code"] in {"model_not_found", "not_found"}


def test_a_request_without_files_is_a_422_with_a_code(server: Server) -> None:
    response = httpx.post(server.url + "/v1/models/fabric/predict", timeout=30)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


# ------------------------------------------------------------------------------------ auth
def test_token_is_required_everywhere_but_healthz(secured: Server, dataset: Path) -> None:
    assert httpx.get(secured.url + "/healthz").status_code == 200
    for path in ("/v1/models", "/metrics", "/"):
        response = httpx.get(secured.url + path)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "unauthorized"
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.get(secured.url + "/v1/models", headers=wrong).status_code == 401
    right = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(secured.url + "/v1/models", headers=right).json()["models"][0]["name"] == (
        "part-a"
    )
    files = _files(_images(dataset)["good"][0])
    assert _post(secured, files, model="part-a").status_code == 401
    assert _post(secured, files, model="part-a", headers=right).status_code == 200


def test_the_page_with_a_token_sets_a_cookie_for_its_requests(secured: Server) -> None:
    with httpx.Client(base_url=secured.url) as client:
        page = client.get("/", params={"token": TOKEN})
        assert page.status_code == 200 and "<title>normalcy" in page.text
        assert client.get("/v1/models").status_code == 200  # the cookie authenticates


# ----------------------------------------------------------------------------- under load
def test_thirty_two_concurrent_clients_all_get_correct_answers(
    server: Server, model: Path, dataset: Path
) -> None:
    images = _images(dataset)
    paths = ((images["good"] + images["bad"]) * 4)[:32]
    expected = Detector.load(model).score(paths)
    with ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(pool.map(lambda p: _post(server, _files(p)), paths))
    assert [r.status_code for r in responses] == [200] * 32
    for response, path, score in zip(responses, paths, expected, strict=True):
        (result,) = response.json()["results"]
        assert result["name"] == path.name
        assert result["score"] == pytest.approx(score, rel=1e-4)


def test_metrics_count_requests_latency_errors_and_images(server: Server, dataset: Path) -> None:
    _post(server, _files(_images(dataset)["good"][0]))
    _post(server, [("files", ("x.png", b"nope", "image/png"))])
    text = httpx.get(server.url + "/metrics").text
    assert (
        'normalcy_requests_total{method="POST",route="/v1/models/{name}/predict",status="200"}'
        in text
    )
    assert 'normalcy_errors_total{code="invalid_image"}' in text
    assert 'normalcy_request_seconds_bucket{le="+Inf"}' in text
    scored = [line for line in text.splitlines() if line.startswith("normalcy_images_scored_total")]
    assert scored and int(scored[0].split()[-1]) >= 1


def test_a_request_larger_than_the_free_queue_gets_503_with_retry_after(
    model: Path, dataset: Path
) -> None:
    for server in _start([str(model), "--max-queue", "2"]):
        response = _post(server, _files(*_images(dataset)["good"][:3]))
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "queue_full"


class _BlockingDetector:
    """Stands in for a Detector whose scoring waits until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def predict_images(self, images):
        self.release.wait(10)
        return iter([f"scored {i.name}" for i in images])


def test_a_full_queue_refuses_instead_of_growing() -> None:
    detector = _BlockingDetector()
    worker = BatchingWorker(detector, max_batch=1, max_delay=0, max_queue=2)  # type: ignore[arg-type]
    image = LoadedImage("a", np.zeros((2, 2, 3), np.uint8))
    first = worker.submit([image])  # taken by the worker thread, which then blocks
    time.sleep(0.2)
    waiting = worker.submit([image, image])  # fills the queue
    with pytest.raises(QueueFullError):
        worker.submit([image])
    detector.release.set()
    results = [f.result(timeout=10) for f in first + waiting]
    assert results == ["scored a"] * 3
    assert isinstance(worker.submit([image])[0], Future)


# --------------------------------------------------------------------------------- schema
def test_checked_in_openapi_schema_matches_the_service() -> None:
    checked_in = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert checked_in == json.loads(json.dumps(openapi_schema())), (
        "docs/openapi.json is stale: python -m normalcy.server > docs/openapi.json"
    )
    assert "/v1/models/{name}/predict" in checked_in["paths"]


@pytest.mark.parametrize(
    ("argument", "expected"),
    [("models/part-a", ("part-a", Path("models/part-a"))), ("a=models/x", ("a", Path("models/x")))],
)
def test_model_arguments_name_the_model(argument: str, expected: tuple[str, Path]) -> None:
    assert parse_model_arg(argument) == expected


def test_model_names_that_could_escape_are_refused() -> None:
    for bad in ("../x=models/a", "a/b=models/a", ".hidden=models/a"):
        with pytest.raises(ValueError, match="model name"):
            parse_model_arg(bad)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------- the page
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def _chromium() -> str:
    """Debian's chromium, installed with apt-get when absent (as root, with the registry)."""
    found = shutil.which("chromium")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=600)
        found = shutil.which("chromium")
    if found is None:
        pytest.skip(
            "chromium is not installed and could not be installed (apt-get install chromium)"
        )
    return found


def test_page_scores_an_upload_and_the_slider_moves_decisions(
    server: Server, dataset: Path, tmp_path: Path
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    images = _images(dataset)
    paths = [images["bad"][0], images["good"][0]]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector("#model option[value='fabric']", state="attached")
            page.set_input_files("#files", [str(p) for p in paths])
            page.wait_for_function("document.querySelectorAll('.card').length === 2")
            cards = page.query_selector_all(".card")
            overlay = cards[0].query_selector("img").get_attribute("src")
            assert overlay.startswith("data:image/png;base64,") and len(overlay) > 100
            scores = [float(c.query_selector(".score").inner_text()) for c in cards]
            threshold = float(page.inner_text("#threshold-value"))
            decisions = [c.query_selector(".decision").inner_text() for c in cards]
            assert decisions == ["ANOMALOUS" if s > threshold else "normal" for s in scores]

            def slide_to(value: float) -> list[str]:
                page.eval_on_selector(
                    "#threshold",
                    "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
                    value,
                )
                return [e.inner_text() for e in page.query_selector_all(".card .decision")]

            assert slide_to(0.0) == ["ANOMALOUS", "ANOMALOUS"]
            assert slide_to(max(scores) * 1.1) == ["normal", "normal"]
            with page.expect_download() as download:
                page.click("#download")
            csv = Path(download.value.path()).read_text().splitlines()
            assert csv[0] == "name,score,is_anomalous,threshold"
            assert len(csv) == 3 and csv[1].startswith(f'"{paths[0].name}"')
            assert csv[1].split(",")[2] == "false"
        finally:
            browser.close()
