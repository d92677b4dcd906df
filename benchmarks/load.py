"""Service throughput and latency under concurrent clients, against the raw backbone.

Fits a DINOv2 detector at short side 448 on some magnetic-tile images, serves it with
`normalcy serve` on a loopback port, and has 1, 8 and 32 clients post 448 x 448 PNG images
(one per request) for a fixed number of requests each round. Prints requests per second and
p50/p95/p99 latency per round, and the backbone's own batched throughput (batches of 8, the
service's batch size) on the same images for comparison.

With `--flood`, a last round has one healthy client post the same images one after another
while `--flood-clients` threads send the worst requests the service accepts or must refuse:
two 40-megapixel compressible PNGs (the most decoding one request may carry), 32 of them
(refused from their headers), a body announced at 1 GB, and a body that stalls (held until
the read timeout). It prints the healthy client's latencies, what the flood got, and the
server's peak memory, and writes them as JSON.

    python benchmarks/load.py            # about 15 minutes on a 2-core CPU
    python benchmarks/load.py --clients 1 --flood --json bench-results/load-flood.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from normalcy import Detector
from normalcy.data import load_image
from normalcy.datasets import find_categories

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mtd" / "magnetic_tile"
SIDE = 448


def _square(path: Path) -> np.ndarray:
    image = Image.fromarray(load_image(path)).resize((SIDE, SIDE), Image.BILINEAR)
    return np.asarray(image)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def backbone_throughput(detector: Detector, images: list[np.ndarray], batch: int) -> float:
    """Images per second of the backbone alone (preprocess, forward, aggregation)."""
    backbone = detector.backbone_
    backbone.features(images[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        backbone.features(images[i : i + batch])
    return len(images) / (time.perf_counter() - start)


def load_round(url: str, bodies: list[bytes], clients: int, requests: int) -> dict[str, float]:
    def one(index: int) -> float:
        body = bodies[index % len(bodies)]
        start = time.perf_counter()
        response = httpx.post(
            url, files=[("files", (f"{index}.png", body, "image/png"))], timeout=600
        )
        response.raise_for_status()
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = np.array(list(pool.map(one, range(requests))))
    wall = time.perf_counter() - start
    p50, p95, p99 = np.percentile(latencies * 1000, [50, 95, 99])
    return {"rps": requests / wall, "p50": p50, "p95": p95, "p99": p99}


def _huge_png(side: int = 6324) -> bytes:
    """A flat RGB PNG of side x side (40 megapixels at the default), about 120 KB."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


def _raw_request(port: int, head: bytes, hold: float) -> str:
    """Send a request head (and a little body) raw, keep the connection `hold` seconds at most
    or until the server answers; the status line, or what went wrong."""
    with socket.create_connection(("127.0.0.1", port), timeout=hold) as sock:
        sock.sendall(head)
        try:
            return sock.recv(64).split(b"\r\n")[0].decode(errors="replace")
        except TimeoutError:
            return "no answer"


def flood_round(url: str, port: int, bodies: list[bytes], requests: int, threads: int) -> dict:
    """Healthy latencies while `threads` flooders send the worst requests; see the docstring."""
    huge = _huge_png()
    multipart = b"Content-Type: multipart/form-data; boundary=x\r\n"
    stop = threading.Event()
    outcomes: Counter[str] = Counter()

    def flood(worker: int) -> None:
        # One kind per thread, the costly one first: thread i sends kind i mod 4, forever.
        kind = ["two 40 MP", "32 x 40 MP", "1 GB body", "stalled body"][worker % 4]
        while not stop.is_set():
            try:
                if kind in ("two 40 MP", "32 x 40 MP"):
                    n = 2 if kind == "two 40 MP" else 32
                    files = [("files", (f"{i}.png", huge, "image/png")) for i in range(n)]
                    status = str(httpx.post(url, files=files, timeout=120).status_code)
                else:
                    length = b"1000000000" if kind == "1 GB body" else b"5000"
                    head = (
                        b"POST /v1/models/tiles/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        + multipart
                        + b"Content-Length: "
                        + length
                        + b"\r\n\r\n--x\r\n"
                    )
                    status = _raw_request(port, head, 40)
            except httpx.HTTPError as error:
                status = type(error).__name__
            outcomes[f"{kind}: {status}"] += 1

    flooders = [threading.Thread(target=flood, args=(i,), daemon=True) for i in range(threads)]
    for thread in flooders:
        thread.start()
    time.sleep(2)  # let the flood build up
    latencies, statuses = [], Counter()
    for index in range(requests):
        body = bodies[index % len(bodies)]
        start = time.perf_counter()
        response = httpx.post(
            url, files=[("files", (f"{index}.png", body, "image/png"))], timeout=600
        )
        latencies.append(time.perf_counter() - start)
        statuses[response.status_code] += 1
    stop.set()
    for thread in flooders:
        thread.join(60)
    p50, p95, p99 = np.percentile(np.array(latencies) * 1000, [50, 95, 99])
    return {
        "healthy_requests": requests,
        "healthy_statuses": {str(k): v for k, v in statuses.items()},
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
        "flood_threads": threads,
        "flood_outcomes": dict(outcomes),
    }


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="one MVTec category")
    parser.add_argument("--train", type=int, default=40, help="normal images to fit on")
    parser.add_argument("--requests", type=int, default=64, help="requests per round")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--flood", action="store_true", help="add the flood round")
    parser.add_argument("--flood-clients", type=int, default=4, help="flooding threads")
    parser.add_argument("--json", type=Path, default=None, help="write the rounds here")
    args = parser.parse_args()
    category = find_categories(args.data)[0]
    step = max(1, len(category.train) // args.train)
    train = [_square(p) for p in category.train[::step][: args.train]]
    test = [_square(s.path) for s in category.test[:: max(1, len(category.test) // 32)][:32]]
    detector = Detector(image_size=SIDE).fit(train)
    raw = backbone_throughput(detector, test, batch=8)
    bodies = [_png(image) for image in test]
    with tempfile.TemporaryDirectory() as scratch:
        model = detector.save(Path(scratch) / "tiles")
        port = _free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "normalcy.cli", "serve", str(model), "--port", str(port)],
            env=os.environ.copy(),
        )
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.5)
            url = base + "/v1/models/tiles/predict"
            load_round(url, bodies, 1, 2)  # warm-up
            print(f"raw backbone, batches of 8 at {SIDE}x{SIDE}: {raw:.2f} images/s\n")
            print("| clients | requests/s | share of raw backbone | p50 ms | p95 ms | p99 ms |")
            print("|---|---|---|---|---|---|")
            rounds = []
            for clients in args.clients:
                r = load_round(url, bodies, clients, args.requests)
                rounds.append({"clients": clients, **r})
                print(
                    f"| {clients} | {r['rps']:.2f} | {100 * r['rps'] / raw:.0f}% | "
                    f"{r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} |",
                    flush=True,
                )
            result = {"raw_backbone_images_per_s": raw, "rounds": rounds}
            if args.flood:
                flooded = flood_round(url, port, bodies, args.requests, args.flood_clients)
                flooded["server_peak_rss_mb"] = _peak_rss_mb(server.pid)
                result["flood"] = flooded
                print(
                    f"\nhealthy client under a flood of {args.flood_clients} threads: p50 "
                    f"{flooded['p50_ms']:.0f} ms, p95 {flooded['p95_ms']:.0f} ms, p99 "
                    f"{flooded['p99_ms']:.0f} ms, statuses {flooded['healthy_statuses']}; "
                    f"server peak RSS {flooded['server_peak_rss_mb']:.0f} MB"
                )
                for outcome, n in sorted(flooded["flood_outcomes"].items()):
                    print(f"  flood {outcome}: {n}")
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(result, indent=2) + "\n")
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
