"""Scoring on Ray against one process: images per second, and the driver's memory on a long job.

On a local Ray instance of this machine's cores, it times, from image files on disk to result
rows:

- one process: `Detector.predict_iter` over the files (scores and decisions), as `normalcy
  predict` runs;
- Ray with 1 actor (all cores) and with 2 actors (the cores shared out): `distributed.predict`
  writing Parquet, from the call to the last row (actor start and model load included), and
  the steady rate after the first results file;

then runs a job of `--paths` paths (files linked from the dev set, a small model) and samples
the driver's resident memory at every results file: it must stay flat as the job grows.
Prints a table and writes JSON.

    python benchmarks/ray_scale.py                      # 20,000 paths for the memory row
    python benchmarks/ray_scale.py --images 100 --paths 2000   # quicker
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from common import write_json
from speed import cpu_description

from normalcy import Detector, distributed
from normalcy.datasets import find_categories

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "mtd" / "magnetic_tile"


def linked_images(folder: Path, count: int) -> list[Path]:
    """`count` image files, hard links to the dev set's test images in turn (no data copied,
    each a distinct path as a plant's files would be)."""
    sources = [s.path for s in find_categories(DATA)[0].test]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        source = sources[i % len(sources)]
        path = folder / f"{i:06d}{source.suffix}"
        try:
            os.link(source, path)
        except OSError:  # another filesystem: a symbolic link instead
            path.symlink_to(source)
        paths.append(path)
    return paths


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ray_row(model: Path, paths: list[Path], out: Path, actors: int, batch_size: int) -> dict:
    first: list[float] = []
    start = time.perf_counter()

    def on_file(path: Path) -> None:
        if not first:
            first.append(time.perf_counter() - start)

    summary = distributed.predict(
        model,
        paths,
        out,
        actors=actors,
        batch_size=batch_size,
        progress=False,
        rows_per_file=batch_size,
        on_file=on_file,
    )
    total = time.perf_counter() - start
    steady_images = len(paths) - batch_size
    return {
        "setting": f"ray, {actors} actor{'s' if actors > 1 else ''}",
        "images": summary.scored + summary.unreadable,
        "seconds": total,
        "images_per_second": len(paths) / total,
        "first_file_seconds": first[0] if first else None,
        "steady_images_per_second": steady_images / (total - first[0]) if first else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="images timed per setting")
    parser.add_argument("--paths", type=int, default=20_000, help="paths of the memory job")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "ray.json")
    args = parser.parse_args()
    ray = distributed.connect(None)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    category = find_categories(DATA)[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = linked_images(tmp / "images", args.images)
        step = max(1, len(category.train) // 40)
        detector = Detector().fit(category.train[::step][:40])  # the defaults, 224 px DINOv2
        model = detector.save(tmp / "model")
        start = time.perf_counter()
        for _ in detector.predict_iter([str(p) for p in paths]):
            pass
        seconds = time.perf_counter() - start
        rows.append(
            {
                "setting": "one process (normalcy predict)",
                "images": len(paths),
                "seconds": seconds,
                "images_per_second": len(paths) / seconds,
            }
        )
        for actors in (1, 2):
            rows.append(ray_row(model, paths, tmp / f"out-{actors}", actors, args.batch_size))

        # The long job: a small model (EfficientNet-Lite0 at 64 px), so the driver's side of
        # a job of many paths is what is measured.
        small = Detector(backbone="efficientnet_lite0", image_size=64).fit(category.train[:40])
        small_model = small.save(tmp / "small-model")
        many = linked_images(tmp / "many", args.paths)
        samples: list[tuple[int, float]] = []

        def sample(path: Path) -> None:
            rows_so_far = (samples[-1][0] if samples else 0) + pq.ParquetFile(
                path
            ).metadata.num_rows
            samples.append((rows_so_far, rss_mb()))

        before = rss_mb()
        start = time.perf_counter()
        summary = distributed.predict(
            small_model,
            many,
            tmp / "out-many",
            actors=cpus,
            batch_size=64,
            progress=False,
            rows_per_file=1000,
            on_file=sample,
        )
        memory = {
            "paths": len(many),
            "scored": summary.scored,
            "seconds": time.perf_counter() - start,
            "driver_rss_mb_before": before,
            "driver_rss_mb_by_rows": samples,
            "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "results_bytes_per_row": sum(f.stat().st_size for f in summary.files)
            / max(1, summary.scored + summary.unreadable),
        }
    result = {"cpu": cpu_description(), "ray_cpus": cpus, "rows": rows, "long_job": memory}
    print(f"CPU: {result['cpu']['model']} ({', '.join(result['cpu']['flags'])}), {cpus} cores")
    print("| setting | images/s | seconds | first results file (s) | steady images/s |")
    print("|---|---|---|---|---|")
    base = rows[0]["images_per_second"]
    for row in rows:
        steady = row.get("steady_images_per_second")
        first = row.get("first_file_seconds")
        print(
            f"| {row['setting']} | {row['images_per_second']:.1f} "
            f"({row['images_per_second'] / base:.2f}x) | {row['seconds']:.1f} | "
            f"{'-' if first is None else f'{first:.1f}'} | "
            f"{'-' if steady is None else f'{steady:.1f}'} |"
        )
    rss = [mb for _, mb in samples]
    print(
        f"long job: {memory['paths']} paths in {memory['seconds']:.0f} s; driver RSS "
        f"{memory['driver_rss_mb_before']:.0f} MB before, {rss[0]:.0f} MB after the first "
        f"{samples[0][0]} rows, {rss[len(rss) // 2]:.0f} MB halfway, {rss[-1]:.0f} MB at the end "
        f"(peak {memory['driver_peak_rss_mb']:.0f} MB); results files "
        f"{memory['results_bytes_per_row']:.0f} bytes per row"
    )
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
