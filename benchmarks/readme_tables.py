"""The README's results and speed tables, generated from the benchmark JSON in bench-results/.

Results: one row per data set and setting (the default on every data set, the named
fine-detail settings on DeepPCB, zero-shot and few-shot where their JSON exists), each from the
JSON of `benchmarks/run.py` that covers the most test images (the full test set where one
was run), and how to reproduce each. Speed: `benchmarks/speed.py`'s JSON, the
library's own path (speed.json, and speed-cuda.json on a GPU) and exported models on each
engine (speed-export.json, speed-export-float32.json).

    python benchmarks/readme_tables.py                    # print both sections
    python benchmarks/readme_tables.py --write README.md  # replace them between the markers
    python benchmarks/readme_tables.py --check README.md  # exit 1 when README is out of date
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from speed import describe  # benchmarks/speed.py: the machine and settings of a speed JSON

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results"
MARKERS = {
    "results": ("<!-- results:begin -->", "<!-- results:end -->"),
    "speed": ("<!-- speed:begin -->", "<!-- speed:end -->"),
}


@dataclass(frozen=True)
class DataSet:
    name: str
    prefix: str  # what benchmarks/run.py puts before a row's name in its JSON file names
    data: str | None  # run.py's --data (None: its default, Magnetic Tile)


@dataclass(frozen=True)
class Shown:
    row: str  # a row of benchmarks/run.py
    label: str
    data_sets: tuple[str, ...]


DATA_SETS = (
    DataSet("Magnetic Tile", "", None),
    DataSet("DeepPCB", "pcb-", "../shared/data/deeppcb/pcb"),
)
BOTH = tuple(d.name for d in DATA_SETS)
SETTINGS = (
    Shown("auto", "`auto`", BOTH),
    Shown("dinov2-224-full", "`default`", BOTH),
    Shown("lite0-224-tiles2-nocontext-noclosing", "`fine-detail`", ("DeepPCB",)),
    Shown("lite0-224-tiles2-block10", "`fine-detail-outline`", ("DeepPCB",)),
    # Shown only where their JSON exists.
    Shown("dinov2-224-mutual", "zero-shot", BOTH),
    Shown("dinov2-224-1shot", "1-shot", BOTH),
    Shown("dinov2-224-4shot", "4-shot", BOTH),
)
QUALITY = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")
SUBSAMPLE = re.compile(r"-train(\d+)of(\d+)-test(\d+)of(\d+)$")


@dataclass(frozen=True)
class Found:
    path: Path
    train_every: int
    test_every: int


def find_json(results: Path, data_set: DataSet, row: str) -> Found | None:
    """The JSON of `row` on `data_set` with the most test images, then training images, then
    the newest; None when there is none."""
    found = []
    for path in results.glob(f"{data_set.prefix}{row}*.json"):
        tag = path.stem[len(data_set.prefix + row) :]
        match = SUBSAMPLE.fullmatch(tag)
        if tag and not match:
            continue  # another row whose name starts with this one's
        train, test = (int(match[2]), int(match[4])) if match else (1, 1)
        found.append(Found(path, train, test))
    found.sort(key=lambda f: (f.test_every, f.train_every, -f.path.stat().st_mtime))
    return found[0] if found else None


def _metric(value: float | None, spread: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + ("" if spread is None else f" ± {spread:.3f}")


def _whole(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _images(count: int, every: int) -> str:
    return str(count) if every == 1 or count == 0 else f"{count} (1/{every})"


def results_section(results: Path = RESULTS) -> str:
    """The results table, and how to reproduce each row's JSON."""
    lines = [
        "| data set | setting | `benchmarks/run.py` row | train / test images | image AUROC "
        "| pixel AUROC | AUPRO | image F1-max | FPR / recall at the threshold | fit s "
        "| predict ms/img | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in SETTINGS:
        for data_set in DATA_SETS:
            if data_set.name not in setting.data_sets:
                continue
            found = find_json(results, data_set, setting.row)
            if found is None:
                continue
            summary = json.loads(found.path.read_text())
            (entry,) = summary["settings"]
            mean, spread = entry["mean"], entry.get("spread") or {}
            first = summary["results"][0]
            quality = [_metric(mean.get(key), spread.get(key)) for key in QUALITY]
            decision = "-"
            if mean.get("achieved_fpr") is not None and mean.get("recall") is not None:
                decision = f"{mean['achieved_fpr']:.3f} / {mean['recall']:.3f}"
            label = setting.label
            if first.get("selection"):  # auto: the setting it chose
                label += f": {first['selection']['chosen']}"
            lines.append(
                f"| {data_set.name} | {label} | `{setting.row}` | "
                f"{_images(first['n_train'], found.train_every)} / "
                f"{_images(first['n_test'], found.test_every)} | {' | '.join(quality)} | "
                f"{decision} | {_whole(mean.get('fit_seconds'))} | "
                f"{_whole(mean.get('predict_ms_per_image'))} | {_whole(mean.get('peak_rss_mb'))} |"
            )
    data = " | ".join(f"`--data {d.data}`" for d in DATA_SETS if d.data)
    return "\n".join(
        [
            *lines,
            "",
            "A row: `python benchmarks/run.py --rows ROW` on Magnetic Tile, adding "
            f"{data} for DeepPCB, and `--train-every N --test-every M` where the table shows "
            "(1/N), (1/M): every n-th image. It writes "
            "`bench-results/[pcb-]ROW[-trainNofN-testMofM].json`; each row's `normalcy eval` "
            "options are in `benchmarks/run.py`. Few-shot rows: mean ± spread over 3 draws.",
        ]
    )


def _speed_inputs() -> list[str]:
    """benchmarks/speed.py's INPUTS names, read from its source (it imports torch)."""
    tree = ast.parse((ROOT / "benchmarks" / "speed.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "INPUTS" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise ValueError("benchmarks/speed.py has no INPUTS")


def speed_command(result: dict, path: Path) -> str:
    """The benchmarks/speed.py command that writes `path` (from what the JSON holds)."""
    rows = result["rows"]
    words = ["python benchmarks/speed.py"]
    if result["precision"] != "auto":
        words += ["--precision", result["precision"]]
    if result["device"] != "cpu":
        words += ["--device", result["device"]]
    if result["batch_size"] != 8:
        words += ["--batch-size", str(result["batch_size"])]
    sizes = list(dict.fromkeys(row["image_size"] for row in rows))
    if sizes != [224, 448]:
        words += ["--sizes", *map(str, sizes)]
    inputs = list(dict.fromkeys(row["images_of"] for row in rows))
    if inputs != _speed_inputs():
        words += ["--inputs", *(f'"{name}"' for name in inputs)]
    engines = list(dict.fromkeys(e for row in rows for e in row.get("exported_ms", {})))
    if engines:
        words += ["--engines", *engines]
    if result.get("runtime_install"):
        words.append("--install-size")
    if path.name != "speed.json":
        words += ["--json", f"bench-results/{path.name}"]
    return " ".join(words)


def _ms(value: float) -> str:
    """Milliseconds to two significant digits at most below 10 (GPU rows), whole above."""
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def _input(row: dict) -> str:
    return f"{row['image_size']} px ({row['precision']})"


def library_speed(path: Path) -> list[str]:
    result = json.loads(path.read_text())
    lines = [
        f"`{speed_command(result, path)}`: {describe(result)}, models fitted on "
        f"{result['fit_images']} normal images.",
        "",
        "| images | backbone input | backbone forward ms/img | predict ms/img (x forward) | "
        "predict + full-size maps ms/img (x forward) | from decoded images, images/s "
        "| peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['images_of']} | {_input(row)} | {_ms(row['backbone_ms'])} | "
            f"{_ms(row['predict_ms'])} ({row['predict_ratio']:.2f}x) | "
            f"{_ms(row['predict_maps_ms'])} ({row['predict_maps_ratio']:.2f}x) | "
            f"{row['decoded_images_per_s']:.1f} | {row['peak_rss_mb']:.0f} |"
        )
    return lines


def export_speed(path: Path, library: dict | None) -> list[str]:
    result = json.loads(path.read_text())
    same = library is not None and describe(library).split(";")[0] == describe(result).split(";")[0]
    engines = list(dict.fromkeys(e for row in result["rows"] for e in row.get("exported_ms", {})))
    lines = [
        f"Exported models (`normalcy.runtime`, from the file to scores and decisions): "
        f"`{speed_command(result, path)}`, {'the same CPU' if same else describe(result)}:",
        "",
        "| images | backbone input | library predict ms/img | "
        + " | ".join(f"{engine} ms/img (x library)" for engine in engines)
        + " |",
        "|---|---|---|" + "---|" * len(engines),
    ]
    for row in result["rows"]:
        times = row.get("exported_ms", {})
        cells = [
            f"{times[e]:.0f} ({times[e] / row['predict_ms']:.2f}x)" if e in times else "-"
            for e in engines
        ]
        lines.append(
            f"| {row['images_of']} | {_input(row)} | {row['predict_ms']:.0f} | "
            + " | ".join(cells)
            + " |"
        )
    install = result.get("runtime_install")
    if install:
        torch = "with" if install["has_torch"] else "without"
        lines += [
            "",
            f"`pip install 'normalcy[runtime]'` added {install['total_mb']:.0f} MB to a fresh "
            f"virtual environment, {torch} torch.",
        ]
    return lines


def float32_ratios(path: Path) -> str:
    """One sentence: each engine's time against the library's, both in float32."""
    result = json.loads(path.read_text())
    ratios: dict[str, list[float]] = {}
    for row in result["rows"]:
        for engine, ms in row.get("exported_ms", {}).items():
            ratios.setdefault(engine, []).append(ms / row["predict_ms"])
    spans = ", ".join(f"{e} {min(r):.2f}-{max(r):.2f}x" for e, r in ratios.items())
    sizes = " and ".join(str(s) for s in dict.fromkeys(r["image_size"] for r in result["rows"]))
    return (
        f"Both in float32, at {sizes} px, an engine takes this share of the library's time: "
        f"{spans} (`{speed_command(result, path)}`)."
    )


def speed_section(results: Path = RESULTS) -> str:
    """The library's speed tables (CPU, and GPU where measured) and, where measured, the
    exported models' tables (at the library's default precision, and in float32)."""
    lines: list[str] = []
    library = results / "speed.json"
    measured = json.loads(library.read_text()) if library.is_file() else None
    for name in ("speed.json", "speed-cuda.json"):
        if (results / name).is_file():
            lines += [*([""] if lines else []), *library_speed(results / name)]
    if (results / "speed-export.json").is_file():
        lines += [*([""] if lines else []), *export_speed(results / "speed-export.json", measured)]
    if (results / "speed-export-float32.json").is_file():
        lines += ["", float32_ratios(results / "speed-export-float32.json")]
    return "\n".join(lines) if lines else "No speed JSON in bench-results/."


def replace_between(text: str, name: str, body: str) -> str:
    """`text` with what lies between the `name` markers replaced by `body`."""
    begin, end = MARKERS[name]
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"no {begin} ... {end} in the README")
    return text[: start + len(begin)] + "\n" + body + "\n" + text[stop:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the benchmark JSON folder")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, help="replace the tables in this README")
    group.add_argument("--check", type=Path, help="exit 1 when this README's tables differ")
    args = parser.parse_args()
    sections = {"results": results_section(args.results), "speed": speed_section(args.results)}
    readme = args.write or args.check
    if readme is None:
        print("\n\n".join(sections.values()))
        return 0
    before = readme.read_text()
    after = before
    for name, body in sections.items():
        after = replace_between(after, name, body)
    if args.check:
        if after != before:
            print(f"{readme}: tables differ from {args.results}; run --write", file=sys.stderr)
            return 1
        return 0
    readme.write_text(after)
    print(f"wrote {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
