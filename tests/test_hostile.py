"""Hostile and careless inputs of at most 1 MB each, run through the real `normalcy` command in
a subprocess: every one is answered (scored, or refused with an error naming it), the other
inputs of the batch are still scored, and the process stays under 2 GB."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_OPTIONS
from PIL import Image

pytestmark = pytest.mark.arithmetic_free  # its subject is not the numbers

MEMORY_LIMIT_MB = 2048


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def flat_png(path: Path, height: int, width: int, bit_depth: int = 8, colour: int = 2) -> Path:
    """A PNG of one flat colour written row by row, so a huge image costs no memory to make
    (and compresses to almost nothing: the cheapest input that is expensive to decode)."""
    channels = {0: 1, 2: 3}[colour]
    row = b"\0" + bytes(width * channels * bit_depth // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    good = sorted((dataset / "test" / "good").glob("*.png"))[0]
    inputs = {
        "good": folder / "good.png",
        "rgb 79 MP": flat_png(folder / "rgb79.png", 8880, 8880),
        "16-bit grey 79 MP": flat_png(folder / "grey16.png", 8880, 8880, 16, 0),
        "5 x 40000 strip": flat_png(folder / "strip.png", 5, 40000),
        "40000 x 5 strip": flat_png(folder / "column.png", 40000, 5),
        "bomb header": folder / "bomb.png",
        "truncated": folder / "truncated.png",
        "text": folder / "notes.png",
    }
    inputs["good"].write_bytes(good.read_bytes())
    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)  # claims 3.6 gigapixels
    inputs["bomb header"].write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(bytes(1000)))
        + _png_chunk(b"IEND", b"")
    )
    inputs["truncated"].write_bytes(good.read_bytes()[:300])
    inputs["text"].write_text("not an image at all")
    for path in inputs.values():
        assert path.stat().st_size <= 1024 * 1024, path
    return inputs


@dataclass
class Finished:
    returncode: int
    stderr: str
    peak_mb: float


def _run(arguments: list[str]) -> Finished:
    """`normalcy ARGUMENTS` in a child process: its exit status, stderr and its own peak RSS
    (from wait4, so other children of this test process do not count)."""
    with tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-m", "normalcy.cli", *arguments],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        return Finished(child.returncode, stderr.read(), usage.ru_maxrss / 1024)


def test_predict_with_maps_answers_every_hostile_input_within_2_gb(
    model: Path, hostile: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    paths = [str(p) for p in hostile.values()]
    result = _run(["predict", str(model), *paths, "-o", str(out), "--maps"])
    assert result.returncode == 3, result.stderr  # some scored, some refused
    document = json.loads((out / "results.json").read_text())
    scored = {row["name"] for row in document["results"]}
    refused = {error["name"]: error["error"] for error in document["errors"]}
    assert scored | set(refused) == set(paths)
    for name in ("good", "rgb 79 MP", "16-bit grey 79 MP", "5 x 40000 strip", "40000 x 5 strip"):
        assert str(hostile[name]) in scored, name
    assert "60000" in refused[str(hostile["bomb header"])]
    for name in ("bomb header", "truncated", "text"):
        assert str(hostile[name]) in result.stderr, name
    big = np.load(out / "rgb79_map.npy", mmap_mode="r")
    assert big.shape == (8880, 8880) and np.isfinite(big[::97, ::97]).all()
    assert Image.open(out / "rgb79_overlay.png").size == (4000, 4000)
    assert result.peak_mb < MEMORY_LIMIT_MB, f"peak RSS {result.peak_mb:.0f} MB"


def test_fit_skips_what_it_cannot_read_and_stays_within_2_gb(
    dataset: Path, hostile: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "train"
    folder.mkdir()
    for path in sorted((dataset / "train" / "good").glob("*.png"))[:4]:
        (folder / path.name).write_bytes(path.read_bytes())
    for path in hostile.values():
        (folder / f"z-{path.name}").write_bytes(path.read_bytes())
    result = _run(["fit", str(folder), "-o", str(tmp_path / "model"), *FAST_OPTIONS])
    assert result.returncode == 0, result.stderr
    assert "could not be read and were skipped" in result.stderr
    for name in ("bomb.png", "truncated.png", "notes.png"):
        assert name in result.stderr
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["n_train"] == 4 + 5  # the 4 normal images and the 5 odd but valid ones
    assert result.peak_mb < MEMORY_LIMIT_MB, f"peak RSS {result.peak_mb:.0f} MB"
