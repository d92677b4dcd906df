"""Service throughput and latency under concurrent clients, against the raw backbone.

Fits a DINOv2 detector at short side 448 on some magnetic-tile images, serves it with
`normalcy serve` on a loopback port, and has 1, 8 and 32 clients post 448 x 448 PNG images
(one per request) for a fixed number of requests each round. Prints requests per second and
p50/p95/p99 latency per round, and the backbone's own batched throughput (batches of 8, the
service's batch size) on the same images for comparison.

    python benchmarks/load.py            # about 15 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from normalcy import Detector
from normalcy.data import find_categories, load_image

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="one MVTec category")
    parser.add_argument("--train", type=int, default=40, help="normal images to fit on")
    parser.add_argument("--requests", type=int, default=64, help="requests per round")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
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
            for clients in args.clients:
                r = load_round(url, bodies, clients, args.requests)
                print(
                    f"| {clients} | {r['rps']:.2f} | {100 * r['rps'] / raw:.0f}% | "
                    f"{r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} |",
                    flush=True,
                )
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
