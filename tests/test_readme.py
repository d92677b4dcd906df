"""README.md as a newcomer meets it: every command line of its shell blocks is either run here,
as written, on small generated images laid out at the paths the README uses, or listed in
SKIPPED with the reason; its Python blocks run too, in README order."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from normalcy.cli import main
from normalcy.synthetic import make_demo_dataset

pytestmark = pytest.mark.arithmetic_free  # its subject is not the numbers

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_CHARS = 15_000
SHELL = {"", "bash", "sh", "shell", "console"}

# Commands (as `shlex` splits them, joined by single spaces) that a test cannot run.
SKIPPED = {
    "make demo": "makes .venv and installs first; the `normalcy demo` it then runs is run here",
    "make test": "installs, then runs this whole suite",
    "pip install normalcy[runtime]": "installs from PyPI; the runtime itself is run here",
    "normalcy serve models/part-a --port 8000": "serves until stopped (tests/test_server.py)",
    "curl -F files=@new/0001.png http://127.0.0.1:8000/v1/models/part-a/predict?maps=1": (
        "needs the server of the line before it (tests/test_server.py)"
    ),
    "normalcy serve --runtime onnx exported/part-a": (
        "serves until stopped (tests/test_server.py serves exported models)"
    ),
    "normalcy fit parts/train/good -o models/part-a --ray": (
        "starts a Ray instance (tests/test_distributed.py)"
    ),
    "normalcy predict models/part-a /mnt/images -o /mnt/scored --ray 10.0.0.5:6379 --actors 8": (
        "needs a Ray cluster at that address (tests/test_distributed.py)"
    ),
}
# Exit status other than 0 that the README documents for a command.
EXIT_CODES: dict[str, int] = {}


@dataclass
class Block:
    language: str
    text: str


@dataclass
class Outcome:
    code: int | None = None
    stdout: str = ""
    error: str = ""
    seconds: float = 0.0
    promised: list[str] = field(default_factory=list)


def readme_blocks(text: str) -> list[Block]:
    """The fenced code blocks, in order (indented ones, inside list items, too)."""
    fence = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.MULTILINE | re.DOTALL)
    blocks = []
    for match in fence.finditer(text):
        indent = len(match[1])
        lines = [line[indent:] for line in match[3].splitlines()]
        blocks.append(Block(match[2], "\n".join(lines)))
    return blocks


def command_lines(block: str) -> list[list[str]]:
    """A shell block's commands as argument lists: `\\` continuations joined, comments and
    blank lines dropped."""
    joined = re.sub(r"\\\n", " ", block)
    commands = []
    for line in joined.splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            commands.append(argv)
    return commands


def readme_commands() -> list[str]:
    blocks = readme_blocks(README.read_text())
    return [" ".join(argv) for b in blocks if b.language in SHELL for argv in command_lines(b.text)]


def runnable(command: str) -> bool:
    return command.startswith("normalcy ") or command.startswith(
        "python benchmarks/readme_tables.py"
    )


def promised_files(argv: list[str]) -> list[str]:
    """Files (glob patterns, relative to the working folder) a README command must leave."""

    def value(*flags: str) -> str | None:
        for flag in flags:
            if flag in argv:
                return argv[argv.index(flag) + 1]
        return None

    sub = argv[1]
    out = value("-o", "--output")
    if argv[0] == "python":  # benchmarks/readme_tables.py --write FILE
        return [value("--write")] if "--write" in argv else []
    if sub == "fit":
        return [f"{out}/config.json"]
    if sub == "export":
        return [f"{out}/export.json"]
    if sub == "predict":
        if out is None:
            return []
        maps = ["*_overlay.png", "*_mask.png", "*_map.npy"] if "--maps" in argv else []
        return [f"{out}/results.json", *(f"{out}/{pattern}" for pattern in maps)]
    if sub == "eval":
        return [v for v in (value("--json"), value("--report")) if v]
    if sub == "demo":
        return [f"{out or 'normalcy-demo'}/report.html", f"{out or 'normalcy-demo'}/results.json"]
    return []


# --- the working folder --------------------------------------------------------------------------


def write_bench_results(folder: Path) -> None:
    """Benchmark JSON of the shapes benchmarks/run.py and speed.py write, for readme_tables."""
    folder.mkdir()
    mean = {
        "image_auroc": 0.9,
        "pixel_auroc": 0.8,
        "aupro": 0.7,
        "image_f1_max": 0.85,
        "achieved_fpr": 0.01,
        "recall": 0.5,
        "fit_seconds": 10.0,
        "predict_ms_per_image": 50.0,
        "peak_rss_mb": 900.0,
    }
    for name, n_train, n_test in (
        ("dinov2-224-full", 762, 582),
        ("pcb-dinov2-224-full-train1of4-test1of4", 250, 250),
        ("pcb-lite0-224-tiles2-block10-train1of10-test1of1", 100, 1000),
    ):
        summary = {
            "results": [{"n_train": n_train, "n_test": n_test, **mean}],
            "mean": mean,
            "settings": [{"mean": mean, "spread": None}],
        }
        (folder / f"{name}.json").write_text(json.dumps(summary))
    row = {
        "images_of": "0.4 MP png (DeepPCB)",
        "image_size": 224,
        "precision": "bfloat16",
        "backbone_ms": 30.0,
        "predict_ms": 40.0,
        "predict_ratio": 1.33,
        "predict_maps_ms": 45.0,
        "predict_maps_ratio": 1.5,
        "decoded_images_per_s": 25.0,
        "peak_rss_mb": 500.0,
    }
    machine = {
        "cpu": {"model": "Test CPU", "cores": 2, "flags": ["avx2"]},
        "torch": "2.13.0+cpu",
        "device": "cpu",
        "precision": "auto",
        "batch_size": 8,
        "fit_images": 40,
        "runtime_install": None,
    }
    (folder / "speed.json").write_text(json.dumps({**machine, "rows": [row]}))
    exported = {**row, "exported_ms": {"onnxruntime": 50.0, "openvino-bfloat16": 30.0}}
    (folder / "speed-export.json").write_text(json.dumps({**machine, "rows": [exported]}))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding what the README's commands expect: the data set `parts` (MVTec layout,
    64 px generated fabric; 17 normal images, the fewest that `fit` takes as full-shot),
    images to inspect in `new/`, a good twin in `golden/`, and the table script with benchmark
    JSON of its own."""
    root = tmp_path_factory.mktemp("readme")
    parts = make_demo_dataset(root, "parts", n_train=17, n_test_good=2, n_test_defect=3, size=64)
    (root / "new").mkdir()
    for index, kind in enumerate(("good", "hole", "scratch"), start=1):
        shutil.copy(parts / "test" / kind / "000.png", root / "new" / f"{index:04d}.png")
    (root / "golden").mkdir()  # new/0001.png's aligned good twin
    shutil.copy(parts / "train" / "good" / "000.png", root / "golden" / "0001.png")
    (root / "benchmarks").mkdir()
    for script in ("readme_tables.py", "run.py", "speed.py", "common.py"):
        shutil.copy(ROOT / "benchmarks" / script, root / "benchmarks" / script)
    write_bench_results(root / "bench-results")
    shutil.copy(README, root / "README.md")
    return root


def run_command(argv: list[str], folder: Path) -> Outcome:
    outcome = Outcome(promised=promised_files(argv))
    start = time.perf_counter()
    if argv[0] == "python":
        done = subprocess.run(
            [sys.executable, *argv[1:]], cwd=folder, capture_output=True, text=True
        )
        outcome.code, outcome.stdout, outcome.error = done.returncode, done.stdout, done.stderr
    else:
        stdout = io.StringIO()
        try:
            with contextlib.redirect_stdout(stdout):
                outcome.code = main(argv[1:])
        except BaseException:  # noqa: BLE001 - SystemExit from argparse included
            outcome.error = traceback.format_exc()
        outcome.stdout = stdout.getvalue()
    outcome.seconds = time.perf_counter() - start
    return outcome


def run_python(source: str, name: str) -> Outcome:
    outcome = Outcome()
    start = time.perf_counter()
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            exec(compile(source, name, "exec"), {"__name__": "__readme__"})
        outcome.code = 0
    except BaseException:  # noqa: BLE001
        outcome.error = traceback.format_exc()
    outcome.stdout = stdout.getvalue()
    outcome.seconds = time.perf_counter() - start
    return outcome


@pytest.fixture(scope="module")
def ran(workspace: Path) -> Iterator[dict[str, Outcome]]:
    """Every runnable command and every Python block of the README, run once in README order
    in `workspace` (later ones use what earlier ones wrote, as a reader's would)."""
    outcomes: dict[str, Outcome] = {}
    threads = torch.get_num_threads()  # one in the suite (conftest); a reader's shell has all
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(workspace)
            for index, block in enumerate(readme_blocks(README.read_text())):
                if block.language == "python":
                    name = f"README.md python block {index}"
                    outcomes[name] = run_python(block.text, name)
                elif block.language in SHELL:
                    for argv in command_lines(block.text):
                        command = " ".join(argv)
                        if command not in SKIPPED and runnable(command):
                            outcomes[command] = run_command(argv, workspace)
    finally:
        torch.set_num_threads(threads)
    for name, outcome in outcomes.items():
        print(f"{outcome.seconds:6.1f} s  {name}")
    yield outcomes


# --- tests ---------------------------------------------------------------------------------------


def test_readme_is_shorter_than_15000_characters() -> None:
    assert len(README.read_text()) < MAX_CHARS


def test_readme_begins_with_the_two_setup_commands() -> None:
    first = readme_blocks(README.read_text())[0]
    assert [argv[:2] for argv in command_lines(first.text)] == [["make", "demo"], ["make", "test"]]


def test_every_readme_command_is_run_or_skipped_with_a_reason() -> None:
    commands = readme_commands()
    neither = [c for c in commands if c not in SKIPPED and not runnable(c)]
    assert not neither, f"README commands neither run by this test nor in SKIPPED: {neither}"
    stale = [c for c in SKIPPED if c not in commands]
    assert not stale, f"SKIPPED lists commands the README no longer holds: {stale}"
    assert all(reason.strip() for reason in SKIPPED.values())


def test_readme_commands_exit_as_documented(ran: dict[str, Outcome]) -> None:
    failed = {
        command: outcome.error or f"exit {outcome.code}\n{outcome.stdout[-2000:]}"
        for command, outcome in ran.items()
        if not command.startswith("README.md python") and outcome.code != EXIT_CODES.get(command, 0)
    }
    assert not failed, "\n\n".join(f"$ {c}\n{e}" for c, e in failed.items())


def test_readme_commands_write_the_files_they_promise(
    ran: dict[str, Outcome], workspace: Path
) -> None:
    missing = [
        f"{command}: {pattern}"
        for command, outcome in ran.items()
        for pattern in outcome.promised
        if not list(workspace.glob(pattern))
    ]
    assert not missing


def test_readme_python_blocks_run(ran: dict[str, Outcome]) -> None:
    blocks = {name: o for name, o in ran.items() if name.startswith("README.md python")}
    assert blocks, "the README shows no Python"
    failed = {name: o.error for name, o in blocks.items() if o.code != 0}
    assert not failed, "\n\n".join(f"{n}\n{e}" for n, e in failed.items())


def test_predict_prints_a_line_per_image_or_json(ran: dict[str, Outcome], workspace: Path) -> None:
    images = len(list((workspace / "new").glob("*.png")))
    lines = ran["normalcy predict models/part-a new/ -o scored --maps"].stdout.splitlines()
    assert len(lines) == images
    assert all(len(line.split("\t")) == 3 for line in lines)
    document = json.loads(ran["normalcy predict models/part-a new/0001.png --json"].stdout)
    (result,) = document["results"]
    assert set(result) >= {"name", "score", "is_anomalous", "threshold"}


def test_readme_tables_are_written_between_their_markers(
    ran: dict[str, Outcome], workspace: Path
) -> None:
    assert ran["python benchmarks/readme_tables.py --write README.md"].code == 0
    text = (workspace / "README.md").read_text()
    results = text.split("<!-- results:begin -->")[1].split("<!-- results:end -->")[0]
    speed = text.split("<!-- speed:begin -->")[1].split("<!-- speed:end -->")[0]
    assert "| Magnetic Tile | `default` | `dinov2-224-full` |" in results
    assert "| DeepPCB | `fine-detail-outline` | `lite0-224-tiles2-block10` |" in results
    assert "(1/10)" in results  # the board row's subsampled training set
    assert "Test CPU" in speed and "openvino-bfloat16" in speed


@pytest.mark.skipif(
    not (ROOT / "bench-results").is_dir(), reason="no benchmark JSON here (bench-results/)"
)
def test_readme_tables_match_the_benchmark_json_here() -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/readme_tables.py", "--check", "README.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
