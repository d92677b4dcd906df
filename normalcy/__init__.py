"""normalcy: training-free visual anomaly detection and segmentation."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Detector", "Prediction", "__version__"]


def __getattr__(name: str) -> Any:
    """`Detector` (which needs torch) and `Prediction` are imported when first used, so the
    torch-free parts (`normalcy.runtime`, `normalcy.data`) import without torch."""
    if name == "Detector":
        try:
            from normalcy.detector import Detector
        except ModuleNotFoundError as missing:
            raise ImportError(
                f"normalcy's Detector needs {missing.name}, part of the library's extra: "
                "pip install 'normalcy[torch]' (exported models run without it: "
                "normalcy.runtime, from 'normalcy[runtime]')"
            ) from missing
        return Detector
    if name == "Prediction":
        from normalcy.prediction import Prediction

        return Prediction
    raise AttributeError(f"module 'normalcy' has no attribute {name!r}")
