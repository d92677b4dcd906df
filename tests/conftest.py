"""Shared set-up: one compute thread, and a private weights cache instead of ~/.cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from normalcy.cli import main
from normalcy.synthetic import make_demo_dataset

# Set before torch and faiss load. The tests run tiny forward passes, where OpenMP threads only
# add overhead, and on a busy machine spinning threads slow each pass from ~15 ms to ~1 s.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def normalcy_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A session-wide $NORMALCY_HOME, so converted weights are cached once per test run.

    Session-scoped (not per test) because converting real weights takes seconds; tests that
    need an empty cache set NORMALCY_HOME to their own tmp_path with monkeypatch.
    """
    home = tmp_path_factory.mktemp("normalcy_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NORMALCY_HOME", str(home))
        yield home


# Small and fast: EfficientNet-Lite0 at 64 px.
FAST_OPTIONS = ["--backbone", "efficientnet_lite0", "--image-size", "64"]


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/woven_fabric in the MVTec layout: 12 train, 4 good and 6 defective test images."""
    root = tmp_path_factory.mktemp("demo_data")
    return make_demo_dataset(root, n_train=12, n_test_good=4, n_test_defect=6, size=64)


@pytest.fixture(scope="session")
def model(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model fitted on `dataset` with `normalcy fit`, in a folder named "fabric"."""
    target = tmp_path_factory.mktemp("demo_models") / "fabric"
    assert main(["fit", str(dataset / "train" / "good"), "-o", str(target), *FAST_OPTIONS]) == 0
    return target
