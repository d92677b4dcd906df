"""Predict speed as a user meets it: from image files on disk to scores, against the backbone.

For images of about 0.1, 0.4, 1 and 5 megapixels (real Magnetic Tile and DeepPCB images, the
larger ones upscaled from DeepPCB boards, as PNG and JPEG) at backbone input sizes 224 and 448,
it times in one process per row:

- backbone: the network's own forward pass on already resized inputs, batched as predict
  batches them (same-size images together), ms per image;
- predict: `Detector.predict_iter` over the files, reading scores and decisions only
  (decoding, resizing, backbone, search, image score), ms per image;
- predict + maps: the same, also reading each full-size `anomaly_map` and `mask`;
- decode: `load_image` alone on the same files, one thread, at the reduced size predict asks
  for, ms per image; on a machine whose cores the forward pass already fills, decoding cannot
  overlap it, so (backbone + decode) / backbone is the floor of the predict ratio;
- throughput from decoded images: `Detector.predict_images` on images already in memory
  (reduced as predict reduces them), scores and decisions, images per second: how a GPU is
  rated, where one decoding thread cannot keep up;

with their ratios to the backbone and the row's peak RSS. Each model is fitted on 40 normal
images of its data set. With `--engines`, each model is also exported (`normalcy export`) and
the same files are scored through `normalcy.runtime` on each engine (onnxruntime, OpenVINO in
float32 and in bfloat16; scores and decisions), ms per image; `--install-size` measures what
`pip install 'normalcy[runtime]'` adds to a fresh virtual environment. Prints a markdown
table and writes JSON.

    python benchmarks/speed.py                     # CPU, all rows (about 10 minutes)
    python benchmarks/speed.py --precision float32 --json bench-results/speed-float32.json
    python benchmarks/speed.py --device cuda --batch-size 64
    python benchmarks/speed.py --engines onnxruntime openvino openvino-bfloat16 --install-size \
        --json bench-results/speed-export.json      # exported models against the torch path
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ENGINE_SETTINGS
from PIL import Image

from normalcy import Detector, runtime
from normalcy.backbones import PRECISIONS
from normalcy.data import load_image, load_image_with_size
from normalcy.datasets import find_categories
from normalcy.export import export_model
from normalcy.inputs import LoadedImage

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
FIT_IMAGES = 40
WARM_UP = 2
REPEATS = 3
# name -> (data set, side of the square upscaled image or None for as is, format, images timed)
INPUTS = {
    "0.1 MP png (Magnetic Tile)": ("mtd/magnetic_tile", None, "png", 24),
    "0.4 MP png (DeepPCB)": ("deeppcb/pcb", None, "png", 24),
    "1 MP png": ("deeppcb/pcb", 1024, "png", 16),
    "5 MP png": ("deeppcb/pcb", 2240, "png", 10),
    "5 MP jpeg": ("deeppcb/pcb", 2240, "jpeg", 10),
}


def cpu_description() -> dict:
    """The CPU's model name and the instruction sets that decide torch's speed."""
    name = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine()):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return {
        "model": name,
        "cores": torch.get_num_threads(),
        "flags": [f for f in wanted if f in flags],
    }


def write_images(folder: Path, dataset: str, side: int | None, fmt: str, count: int) -> list[Path]:
    """Test images of the data set, upscaled to side x side where given, written as `fmt`."""
    category = find_categories(DATA / dataset)[0]
    step = max(1, len(category.test) // count)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, sample in enumerate(category.test[::step][: count + WARM_UP]):
        image = Image.fromarray(load_image(sample.path))
        if side is not None:
            image = image.resize((side, side), Image.Resampling.BICUBIC)
        path = folder / f"{i:03d}.{'jpg' if fmt == 'jpeg' else 'png'}"
        image.save(path, quality=92) if fmt == "jpeg" else image.save(path)
        paths.append(path)
    return paths


def fit_model(dataset: str, image_size: int, args: argparse.Namespace, target: Path) -> Path:
    category = find_categories(DATA / dataset)[0]
    step = max(1, len(category.train) // FIT_IMAGES)
    detector = Detector(image_size=image_size, device=args.device, precision=args.precision)
    detector.fit(category.train[::step][:FIT_IMAGES])
    return detector.save(target)


def time_row(
    model: Path,
    paths: list[Path],
    device: str,
    batch_size: int,
    exported: Path | None = None,
    engines: list[str] = (),
) -> dict:
    """One row's timings, in this process (see the module docstring)."""
    detector = Detector.load(model, device=device)
    detector.batch_size = batch_size
    backbone = detector.backbone_
    warm, timed = paths[:WARM_UP], paths[WARM_UP:]
    list(detector.predict_iter(warm))

    def synchronise() -> None:
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()

    # The backbone's own batched forward, on inputs already decoded and resized.
    inputs = [backbone.preprocess(load_image(p, min_side=backbone.image_size)) for p in timed]
    groups: dict[tuple, list[torch.Tensor]] = {}
    for tensor in inputs:
        groups.setdefault(tuple(tensor.shape), []).append(tensor)
    batches = [
        torch.stack(group[i : i + batch_size])
        for group in groups.values()
        for i in range(0, len(group), batch_size)
    ]

    def forward_ms() -> float:
        synchronise()
        start = time.perf_counter()
        for batch in batches:
            backbone(batch)
        synchronise()
        return 1000 * (time.perf_counter() - start) / len(timed)

    def per_image_ms(maps: bool) -> float:
        start = time.perf_counter()
        for prediction in detector.predict_iter(timed):
            assert prediction.score is not None
            if maps:
                assert prediction.anomaly_map.shape == prediction.image_size
                assert prediction.mask is not None
        return 1000 * (time.perf_counter() - start) / len(timed)

    def decode_ms() -> float:
        start = time.perf_counter()
        for path in timed:
            load_image(path, min_side=backbone.image_size)
        return 1000 * (time.perf_counter() - start) / len(timed)

    # Throughput from images already decoded (what a GPU is measured on), scores only.
    decoded = [
        LoadedImage(str(p), image, size)
        for p in timed
        for image, size in [load_image_with_size(p, min_side=backbone.image_size)]
    ]

    def decoded_per_s() -> float:
        synchronise()
        start = time.perf_counter()
        decisions = [p.is_anomalous for p in detector.predict_images(decoded)]
        synchronise()
        return len(decisions) / (time.perf_counter() - start)

    loaded = {engine: runtime.load(exported, *ENGINE_SETTINGS[engine]) for engine in engines}
    for model_on_engine in loaded.values():
        list(model_on_engine.predict_iter(warm))

    def engine_ms(engine: str) -> float:
        start = time.perf_counter()
        for prediction in loaded[engine].predict_iter(timed):
            assert prediction.score is not None
        return 1000 * (time.perf_counter() - start) / len(timed)

    # Every measure REPEATS times, round-robin, the best kept: other work on a shared machine
    # only adds time, and the first pass at a new input shape also builds its kernels.
    runs = [
        (
            forward_ms(),
            per_image_ms(False),
            per_image_ms(True),
            decode_ms(),
            decoded_per_s(),
            *(engine_ms(engine) for engine in engines),
        )
        for _ in range(REPEATS)
    ]
    backbone_ms, predict_ms, maps_ms, decoding_ms = (min(r[i] for r in runs) for i in range(4))
    per_s = max(r[4] for r in runs)
    engine_times = {engine: min(r[5 + i] for r in runs) for i, engine in enumerate(engines)}

    side = Image.open(timed[0]).size
    return {
        "images": len(timed),
        "image_pixels": side[0] * side[1],
        "input_size": list(inputs[0].shape[-2:]),
        "backbone_ms": backbone_ms,
        "predict_ms": predict_ms,
        "predict_maps_ms": maps_ms,
        "predict_ratio": predict_ms / backbone_ms,
        "predict_maps_ratio": maps_ms / backbone_ms,
        "decode_ms": decoding_ms,
        "decode_floor_ratio": (backbone_ms + decoding_ms) / backbone_ms,
        "decoded_images_per_s": per_s,
        "exported_ms": engine_times,
        "repeats": REPEATS,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "precision": backbone.precision,
        "device": str(backbone.device),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=list(INPUTS))
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "speed.json")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: one row, as JSON
    parser.add_argument("--table", type=Path, help="print the table of a JSON written before")
    parser.add_argument(
        "--engines",
        nargs="*",
        default=[],
        choices=list(ENGINE_SETTINGS),
        help="also time each model exported, on these engines",
    )
    parser.add_argument(
        "--install-size",
        action="store_true",
        help="measure what pip install 'normalcy[runtime]' adds to a fresh venv (needs PyPI)",
    )
    args = parser.parse_args()
    if args.table:
        result = json.loads(args.table.read_text())
        print(describe(result))
        print(format_table(result["rows"]))
        if result.get("runtime_install"):
            print(install_line(result["runtime_install"]))
        return 0
    if args.row:
        row = json.loads(args.row)
        paths = [Path(p) for p in row["paths"]]
        exported = Path(row["exported"]) if row.get("exported") else None
        timings = time_row(
            Path(row["model"]), paths, args.device, args.batch_size, exported, args.engines
        )
        print(json.dumps(timings))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = {
            name: write_images(Path(tmp) / f"images-{i}", *INPUTS[name][:3], INPUTS[name][3])
            for i, name in enumerate(args.inputs)
        }
        for size in args.sizes:
            models = {
                dataset: fit_model(dataset, size, args, Path(tmp) / f"{i}-{size}")
                for i, dataset in enumerate(sorted({INPUTS[n][0] for n in args.inputs}))
            }
            exports = {
                dataset: export_model(model, model.with_name(model.name + "-exported"))
                for dataset, model in models.items()
                if args.engines
            }
            for name in args.inputs:
                spec = {
                    "model": str(models[INPUTS[name][0]]),
                    "paths": list(map(str, images[name])),
                    "exported": str(exports.get(INPUTS[name][0], "")),
                }
                command = [
                    sys.executable,
                    __file__,
                    "--row",
                    json.dumps(spec),
                    "--device",
                    args.device,
                    "--batch-size",
                    str(args.batch_size),
                    "--engines",
                    *args.engines,
                ]
                output = subprocess.run(command, capture_output=True, text=True, check=True)
                row = {"images_of": name, "image_size": size, **json.loads(output.stdout)}
                rows.append(row)
                print(
                    f"{name} at {size}: backbone {row['backbone_ms']:.0f} ms, predict "
                    f"{row['predict_ms']:.0f} ms ({row['predict_ratio']:.2f}x), with maps "
                    f"{row['predict_maps_ms']:.0f} ms ({row['predict_maps_ratio']:.2f}x)",
                    file=sys.stderr,
                )
    result = {
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "device": args.device,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "fit_images": FIT_IMAGES,
        "rows": rows,
        "runtime_install": runtime_install_size() if args.install_size else None,
    }
    print(describe(result))
    print(format_table(rows))
    if result["runtime_install"]:
        print(install_line(result["runtime_install"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


def runtime_install_size() -> dict:
    """MB that `pip install 'normalcy[runtime]'` adds to a fresh venv's site-packages, in all
    and per top-level entry, and whether torch came with it."""
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        (site,) = venv.glob("lib/python*/site-packages")
        before = {p.name for p in site.iterdir()}
        pip = [str(venv / "bin" / "pip"), "install", "-q", "--no-cache-dir"]
        subprocess.run([*pip, f"{ROOT}[runtime]"], check=True)
        added = {p.name: _size_mb(p) for p in site.iterdir() if p.name not in before}
        return {
            "total_mb": sum(added.values()),
            "by_entry_mb": dict(sorted(added.items(), key=lambda item: -item[1])),
            "has_torch": "torch" in added,
        }


def install_line(install: dict) -> str:
    largest = ", ".join(f"{k} {v:.0f}" for k, v in list(install["by_entry_mb"].items())[:4])
    torch = "with" if install["has_torch"] else "without"
    return f"normalcy[runtime] adds {install['total_mb']:.0f} MB, {torch} torch ({largest} MB)"


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def describe(result: dict) -> str:
    cpu = result["cpu"]
    return (
        f"{cpu['model']}, {cpu['cores']} threads, flags: {' '.join(cpu['flags'])}; torch "
        f"{result['torch']}, device {result['device']}, precision {result['precision']}, "
        f"batch {result['batch_size']}"
    )


def format_table(rows: list[dict]) -> str:
    lines = [
        "| images | input | backbone ms/img | predict ms/img | ratio | predict + maps ms/img "
        "| ratio | decode ms/img | floor | decoded images/s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    engines = sorted({engine for row in rows for engine in row.get("exported_ms", {})})
    if engines:
        lines[0] += "".join(f" {engine} ms/img | ratio to predict |" for engine in engines)
        lines[1] += "---|---|" * len(engines)
    for row in rows:
        decode, floor = "-", "-"  # JSON written before the decode column
        if "decode_ms" in row:
            decode, floor = f"{row['decode_ms']:.0f}", f"{row['decode_floor_ratio']:.2f}x"
        lines.append(
            f"| {row['images_of']} | {row['image_size']} ({row['precision']}) | "
            f"{row['backbone_ms']:.0f} | {row['predict_ms']:.0f} | {row['predict_ratio']:.2f}x | "
            f"{row['predict_maps_ms']:.0f} | {row['predict_maps_ratio']:.2f}x | "
            f"{decode} | {floor} | {row['decoded_images_per_s']:.1f} | {row['peak_rss_mb']:.0f} |"
            + "".join(
                f" {row['exported_ms'][e]:.0f} | {row['exported_ms'][e] / row['predict_ms']:.2f}x |"
                for e in engines
            )
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
