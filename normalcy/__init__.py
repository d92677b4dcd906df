"""normalcy: training-free visual anomaly detection and segmentation."""

__version__ = "0.1.0"

from normalcy.detector import Detector, Prediction  # noqa: E402

__all__ = ["Detector", "Prediction", "__version__"]
