"""Where an exported model spends its time in onnxruntime: milliseconds per operator type.

Fits the default detector on 40 Magnetic Tile images, exports it (224 px), runs one DeepPCB
board through onnxruntime with its profiler on, and prints each operator type's share.

    python benchmarks/ort_profile.py
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime

from normalcy import Detector
from normalcy.data import load_image
from normalcy.datasets import find_categories
from normalcy.export import export_model

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
RUNS = 10


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        train = find_categories(DATA / "mtd" / "magnetic_tile")[0].train
        model = Detector().fit(train[:: len(train) // 40][:40]).save(Path(tmp) / "model")
        export_model(model, Path(tmp) / "exported")
        graph = next((Path(tmp) / "exported").glob("*.onnx"))
        board = find_categories(DATA / "deeppcb" / "pcb")[0].test[0].path
        pixels = load_image(board).astype(np.float32)
        options = onnxruntime.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = onnxruntime.InferenceSession(str(graph), options)
        name = session.get_inputs()[0].name
        for _ in range(RUNS):
            session.run(None, {name: pixels})
        events = json.loads(Path(session.end_profiling()).read_text())
    total: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            total[event["args"]["op_name"]] += event["dur"]
    overall = sum(total.values())
    print(f"{board.name}, {RUNS} runs; ms per run by operator type:")
    for op, microseconds in total.most_common(12):
        print(
            f"  {op:22s} {microseconds / RUNS / 1000:7.2f} ms  {100 * microseconds / overall:5.1f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
