"""The inspection service, tested against real `normalcy serve` processes on loopback ports."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import select
import shutil
import signal
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
from conftest import assert_close
from fastapi.testclient import TestClient
from PIL import Image

from normalcy import Detector
from normalcy.inputs import LoadedImage
from normalcy.server.app import (
    ServiceError,
    ServiceSettings,
    _scored,
    _while_connected,
    create_app,
    openapi_schema,
    parse_model_arg,
)
from normalcy.server.batching import BatchingWorker, QueueFullError
from normalcy.server.budget import PixelBudget, header_pixels

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-token"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A `normalcy serve` subprocess on a free loopback port."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, python: str = "-mnormalcy.cli"
    ) -> None:
        """`python` runs the command: a module (`-m...`) or code (`-c...`) given the args."""
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, python, "serve", *args, "--port", str(self.port)]
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


def _start(
    args: list[str], env: dict[str, str] | None = None, python: str = "-mnormalcy.cli"
) -> Iterator[Server]:
    server = Server(args, env, python)
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
    assert_close([r["score"] for r in results], expected)
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
    assert_close([plain["score"], mapped["score"]], [expected[0]] * 2)
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


def test_the_page_link_with_a_token_moves_it_to_a_cookie_and_out_of_the_url(
    secured: Server,
) -> None:
    with httpx.Client(base_url=secured.url) as client:
        link = client.get("/", params={"token": TOKEN})
        assert link.status_code == 303 and link.headers["location"] == "/"
        assert "httponly" in link.headers["set-cookie"].lower()
        page = client.get("/")
        assert page.status_code == 200 and "<title>normalcy" in page.text
        assert client.get("/v1/models").status_code == 200  # the cookie authenticates
    assert httpx.get(secured.url + "/", params={"token": "wrong"}).status_code == 401


def test_a_token_in_the_url_is_accepted_on_the_page_link_only(
    secured: Server, dataset: Path
) -> None:
    assert httpx.get(secured.url + "/v1/models", params={"token": TOKEN}).status_code == 401
    files = _files(_images(dataset)["good"][0])
    response = _post(secured, files, model="part-a", params={"token": TOKEN})
    assert response.status_code == 401


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
        assert_close(result["score"], score)


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


def test_the_service_loads_nothing_from_the_internet(server: Server) -> None:
    # FastAPI's /docs and /redoc pages would fetch their scripts from a CDN: they are off.
    assert httpx.get(server.url + "/docs").status_code == 404
    assert httpx.get(server.url + "/redoc").status_code == 404
    schema = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/models/{name}/predict" in schema["paths"]
    assert "cdn" not in httpx.get(server.url + "/").text.lower()


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


@pytest.mark.arithmetic_free
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


# ------------------------------------------------------------------------- hostile requests
@pytest.fixture(scope="module")
def guarded(model: Path) -> Iterator[Server]:
    yield from _start(
        [
            str(model),
            "--max-request-mb",
            "1",
            "--read-timeout",
            "1",
            "--max-request-megapixels",
            "0.3",
            "--allowed-host",
            "inspect.local",
            "--allowed-origin",
            "https://line.example",
        ]
    )


def _raw(server: Server, request: bytes, wait: float = 10) -> bytes:
    """Send raw bytes and read the answer until the server closes or `wait` passes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as sock:
        sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            pass
    return answer


def test_a_foreign_host_header_is_refused_and_allowed_names_answer(
    guarded: Server, dataset: Path
) -> None:
    for host, status in [
        ("attacker.example", 421),
        (f"attacker.example:{guarded.port}", 421),
        (f"localhost:{guarded.port}", 200),
        (f"127.0.0.1:{guarded.port}", 200),
        ("inspect.local", 200),
    ]:
        response = httpx.get(guarded.url + "/v1/models", headers={"Host": host})
        assert response.status_code == status, host
        if status == 421:
            assert response.json()["error"]["code"] == "host_not_allowed"
    files = _files(_images(dataset)["good"][0])
    rebinding = _post(guarded, files, headers={"Host": "attacker.example"})
    assert rebinding.status_code == 421


def test_cross_origin_posts_are_refused_unless_allowed(guarded: Server, dataset: Path) -> None:
    files = _files(_images(dataset)["good"][0])
    for origin, status in [
        ("https://evil.example", 403),
        ("null", 403),
        (f"http://127.0.0.1:{guarded.port}", 200),  # the service's own page
        ("https://line.example", 200),
    ]:
        response = _post(guarded, files, headers={"Origin": origin})
        assert response.status_code == status, origin
        if status == 403:
            assert response.json()["error"]["code"] == "cross_origin"
    assert httpx.get(
        guarded.url + "/healthz", headers={"Origin": "https://evil.example"}
    ).is_success


def test_a_body_over_the_limit_is_refused_from_its_content_length_without_reading_it(
    guarded: Server,
) -> None:
    start = time.monotonic()
    answer = _raw(
        guarded,
        b"POST /v1/models/fabric/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: multipart/form-data; boundary=x\r\n"
        b"Content-Length: 1000000000\r\n\r\n--x\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"request_too_large" in answer
    assert time.monotonic() - start < 5  # answered at once, not after a gigabyte


def test_a_streamed_body_is_refused_as_soon_as_it_passes_the_limit(guarded: Server) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        yield b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
        for _ in range(64):  # 64 MB if it were all read
            sent += 1
            yield b"\0" * (1024 * 1024)

    headers = {"Content-Type": "multipart/form-data; boundary=x"}
    try:
        response = httpx.post(
            guarded.url + "/v1/models/fabric/predict", content=chunks(), headers=headers
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
    except httpx.TransportError:
        pass  # the server may close the connection on the remaining body instead
    assert sent < 64


def test_a_stalled_body_gets_408(guarded: Server) -> None:
    answer = _raw(
        guarded,
        b"POST /v1/models/fabric/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: multipart/form-data; boundary=x\r\n"
        b"Content-Length: 5000\r\n\r\n--x\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 408") and b"read_timeout" in answer


def test_a_request_over_the_pixel_budget_is_refused_before_decoding(guarded: Server) -> None:
    image = _png(np.zeros((400, 400, 3), np.uint8))  # 0.16 MP each, 0.32 MP > 0.3 MP
    response = _post(guarded, [("files", (f"{i}.png", image, "image/png")) for i in range(2)])
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_many_pixels"


def test_a_thin_strip_is_scored_at_bounded_cost(guarded: Server) -> None:
    strip = _png(np.full((5, 40000, 3), 128, np.uint8))
    response = _post(guarded, [("files", ("strip.png", strip, "image/png"))])
    assert response.status_code == 200
    assert np.isfinite(response.json()["results"][0]["score"])


def test_unknown_http_methods_share_one_metrics_label(guarded: Server) -> None:
    for method in ("FOO", "BAR", "X-RANDOM-1"):
        httpx.request(method, guarded.url + "/v1/models")
    text = httpx.get(guarded.url + "/metrics").text
    assert 'method="other"' in text
    assert "FOO" not in text and "BAR" not in text and "X-RANDOM" not in text


def test_sigterm_with_queued_work_exits_within_the_grace_period(model: Path, dataset: Path) -> None:
    for server in _start([str(model), "--max-queue", "64"]):
        files = _files(*_images(dataset)["good"][:2])
        with ThreadPoolExecutor(max_workers=16) as pool:
            pending = [pool.submit(_post, server, files) for _ in range(16)]
            time.sleep(0.5)
            start = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            server.process.wait(timeout=30)
            assert time.monotonic() - start < 15
            for future in pending:
                with contextlib.suppress(httpx.TransportError):
                    future.result()


# ----------------------------------------------------------------- in-process behaviour
def test_a_failed_scoring_answers_a_fixed_message_and_logs_the_details(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Failing:
        decode_side = 64

        def predict_images(self, images):
            raise RuntimeError("std::bad_alloc in some C++ frame")

    app = create_app({"m": Failing()}, ServiceSettings(hosts=None))
    image = _png(np.zeros((64, 64, 3), np.uint8))
    with TestClient(app) as client:
        response = client.post("/v1/models/m/predict", files=[("files", ("a.png", image))])
    assert response.status_code == 500
    assert response.json()["error"] == {
        "code": "scoring_failed",
        "message": "scoring failed; the server log has the details",
    }
    assert "bad_alloc" in caplog.text


def test_a_client_that_leaves_takes_its_queued_images_off_the_queue() -> None:
    class Gone:
        async def is_disconnected(self) -> bool:
            return True

    futures = [Future(), Future()]

    async def wait() -> None:
        await _scored(Gone(), futures, lambda *a: ServiceError(*a))

    with pytest.raises(ServiceError) as caught:
        asyncio.run(wait())
    assert caught.value.status == 499
    assert all(f.cancelled() for f in futures)


def test_a_client_that_leaves_while_waiting_for_the_pixel_budget_gives_its_place_up() -> None:
    class LeavesSoon:
        def __init__(self) -> None:
            self.polls = 0

        async def is_disconnected(self) -> bool:
            self.polls += 1
            return self.polls > 1

    async def run() -> tuple[int, int]:
        budget = PixelBudget(100)

        async def decode_after_budget() -> None:
            async with budget.hold(80):
                await asyncio.sleep(0)

        async with budget.hold(90):  # another request holds most of the budget meanwhile
            with pytest.raises(ServiceError) as caught:
                await _while_connected(LeavesSoon(), decode_after_budget(), ServiceError)
            waiting = len([w for w in budget._waiting if not w[2].cancelled()])
        return caught.value.status, waiting + budget.used

    status, left = asyncio.run(run())
    assert status == 499
    assert left == 0  # nothing still waiting, nothing held


def test_the_worker_skips_cancelled_images_and_cancels_the_rest_on_shutdown() -> None:
    scored: list[str] = []

    class Recording(_BlockingDetector):
        def predict_images(self, images):
            self.release.wait(10)
            scored.extend(i.name for i in images)
            return iter([f"scored {i.name}" for i in images])

    detector = Recording()
    worker = BatchingWorker(detector, max_batch=1, max_delay=0, max_queue=8)
    image = np.zeros((8, 8, 3), np.uint8)
    first = worker.submit([LoadedImage("first", image)])
    time.sleep(0.2)  # the worker now holds "first"
    rest = worker.submit([LoadedImage(n, image) for n in ("gone", "kept", "late")])
    rest[0].cancel()
    detector.release.set()
    assert first[0].result(10) == "scored first"
    assert rest[1].result(10) == "scored kept"
    assert rest[2].result(10) == "scored late"
    assert scored == ["first", "kept", "late"]
    blocked = Recording()
    worker = BatchingWorker(blocked, max_batch=1, max_delay=0, max_queue=8)
    holding = worker.submit([LoadedImage("holding", image)])
    time.sleep(0.2)
    queued = worker.submit([LoadedImage(n, image) for n in ("a", "b")])
    assert worker.cancel_waiting() == 2
    assert all(f.cancelled() for f in queued)
    blocked.release.set()
    assert holding[0].result(10) == "scored holding"


def test_the_pixel_budget_bounds_what_is_held_and_serves_the_smallest_first() -> None:
    order: list[int] = []

    async def run() -> int:
        budget = PixelBudget(100)
        peak = 0

        async def use(pixels: int, hold_s: float) -> None:
            nonlocal peak
            async with budget.hold(pixels):
                order.append(pixels)
                peak = max(peak, budget.used)
                await asyncio.sleep(hold_s)

        first = asyncio.create_task(use(90, 0.05))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(use(p, 0.01)) for p in (80, 60, 10, 500)]
        abandoned = asyncio.create_task(use(50, 0.01))
        await asyncio.sleep(0)
        abandoned.cancel()
        await asyncio.gather(first, *waiting, return_exceptions=True)
        assert budget.used == 0
        return peak

    assert asyncio.run(run()) <= 100
    assert order == [90, 10, 60, 80, 500]  # 500 is capped at the whole budget


def test_header_pixels_reads_the_size_without_decoding() -> None:
    assert header_pixels(_png(np.zeros((30, 20, 3), np.uint8))) == 600
    assert header_pixels(b"not an image") == 0


@pytest.mark.parametrize(
    "body",
    [
        b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\nabc',
        b"this is not multipart at all",
        b"--x\r\nContent-Disposition: form-data\r\n\r\n\r\n--x--\r\n",
    ],
    ids=["unterminated part", "no parts", "part without a name"],
)
def test_malformed_multipart_is_a_client_error_and_the_service_carries_on(
    guarded: Server, dataset: Path, body: bytes
) -> None:
    response = httpx.post(
        guarded.url + "/v1/models/fabric/predict",
        content=body,
        headers={"Content-Type": "multipart/form-data; boundary=x"},
    )
    assert 400 <= response.status_code < 500
    assert response.json()["error"]["code"] in ("invalid_request", "http_error")
    assert _post(guarded, _files(_images(dataset)["good"][0])).status_code == 200


def test_a_trickled_body_gets_408_though_each_part_comes_in_time(guarded: Server) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/models/fabric/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 5000\r\n\r\n"
        )
        start = time.monotonic()
        answer = b""
        while not answer and time.monotonic() - start < 8:
            # A byte every 0.4 s: each part well within the 1 s read timeout, and none sent
            # near the moment the server gives up (a byte reaching the closed connection
            # would reset it, and the answer with it).
            readable, _, _ = select.select([sock], [], [], 0.4)
            if readable:  # the answer, read to the end (it closes the connection)
                sock.settimeout(5)
                while chunk := sock.recv(4096):
                    answer += chunk
                break
            with contextlib.suppress(OSError):
                sock.sendall(b"-")
    assert answer.startswith(b"HTTP/1.1 408") and b"read_timeout" in answer
    assert time.monotonic() - start < 6


def test_an_exported_model_is_served_with_the_same_api(
    model: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pytest.importorskip("onnxruntime", reason="the runtime extra (onnxruntime) is not installed")
    from normalcy import runtime
    from normalcy.export import export_model

    exported = export_model(model, tmp_path_factory.mktemp("exported") / "fabric")
    paths = _images(dataset)["bad"][:2]
    # The command as where torch is not installed: importing it fails, the launcher serves.
    without_torch = (
        "-cimport sys; sys.modules['torch'] = None; sys.argv[0] = 'normalcy'; "
        "from normalcy.launcher import main; sys.exit(main())"
    )
    for served in _start([str(exported), "--runtime", "onnx"], python=without_torch):
        assert httpx.get(served.url + "/").status_code == 200  # the page
        (listed,) = httpx.get(served.url + "/v1/models").json()["models"]
        assert listed["name"] == "fabric" and listed["runtime"] == "onnxruntime"
        assert listed["method"] == "patchknn" and listed["backbone"] == "efficientnet_lite0"
        response = _post(served, _files(*paths), params={"maps": 1})
        assert response.status_code == 200
        results = response.json()["results"]
        expected = [p.score for p in runtime.load(exported).predict(paths)]
        assert_close([r["score"] for r in results], expected)
        assert all(r["overlay_png"] and r["mask_png"] for r in results)
