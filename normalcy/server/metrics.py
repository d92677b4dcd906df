"""Request, latency, error and throughput counters in the Prometheus text format."""

from __future__ import annotations

import threading
from collections import Counter

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.errors: Counter[str] = Counter()
        self.images: Counter[str] = Counter()
        self.bucket_counts = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[method, route, status] += 1
            self.latency_sum += seconds
            self.latency_count += 1
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self.bucket_counts[i] += 1

    def error(self, code: str) -> None:
        with self._lock:
            self.errors[code] += 1

    def scored(self, model: str, count: int) -> None:
        with self._lock:
            self.images[model] += count

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP normalcy_requests_total HTTP requests by method, route and status.",
                "# TYPE normalcy_requests_total counter",
            ]
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(
                    f'normalcy_requests_total{{method="{method}",route="{route}",'
                    f'status="{status}"}} {n}'
                )
            lines += [
                "# HELP normalcy_request_seconds HTTP request latency.",
                "# TYPE normalcy_request_seconds histogram",
            ]
            for bound, n in zip(LATENCY_BUCKETS, self.bucket_counts, strict=True):
                lines.append(f'normalcy_request_seconds_bucket{{le="{bound}"}} {n}')
            lines.append(f'normalcy_request_seconds_bucket{{le="+Inf"}} {self.latency_count}')
            lines.append(f"normalcy_request_seconds_sum {self.latency_sum:.6f}")
            lines.append(f"normalcy_request_seconds_count {self.latency_count}")
            lines += [
                "# HELP normalcy_errors_total Error responses by error code.",
                "# TYPE normalcy_errors_total counter",
            ]
            lines += [
                f'normalcy_errors_total{{code="{c}"}} {n}' for c, n in sorted(self.errors.items())
            ]
            lines += [
                "# HELP normalcy_images_scored_total Images scored by model.",
                "# TYPE normalcy_images_scored_total counter",
            ]
            lines += [
                f'normalcy_images_scored_total{{model="{m}"}} {n}'
                for m, n in sorted(self.images.items())
            ]
        return "\n".join(lines) + "\n"
