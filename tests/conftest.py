"""Shared set-up: one compute thread, and a private weights cache instead of ~/.cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

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
