"""Shared set-up: one compute thread, a private weights cache instead of ~/.cache, and the
tolerance within which two computations of the same float32 values must agree."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import ArrayLike

from normalcy.cli import main
from normalcy.synthetic import make_demo_dataset

# Set before torch loads. The tests run tiny forward passes, where OpenMP threads only
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


# float32 keeps 24 bits (machine epsilon 1.2e-7). Two computations of the same score or map that
# add in another order (another batch composition, SIMD width or CPU, a kernel chosen for another
# shape, an exported engine) differ by rounding accumulated over hundreds of feature channels and
# a network's depth: up to 3.5e-5 relative was seen on map cells. RTOL leaves about 3x above it.
RTOL = 1e-4
# Near zero a relative tolerance is none: an image's distance to itself comes out at about 1e-6
# of the typical score rather than 0, since d^2 = |a|^2 + |b|^2 - 2ab cancels. So values may
# also differ by ATOL times the scale of the values compared.
ATOL = 1e-5


def assert_close(actual: ArrayLike, expected: ArrayLike, scale: float | None = None) -> None:
    """Computed float values agree within RTOL relative and ATOL * scale absolute; scale
    defaults to the largest magnitude among the expected values, and must be given where
    they are all zero (an image scored against itself)."""
    expected = np.asarray(expected, dtype=np.float64)
    if scale is None:
        scale = float(np.abs(expected).max(initial=0.0))
        if scale == 0.0:
            raise ValueError("comparing with zeros needs the scale of the values (scale=)")
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL * scale)
