"""Scoring methods over patch features, each implementing `base.Method`: made from a detector's
settings (`from_settings`), fitted on feature grids, scoring grids into `GridScores`, saving
and restoring its arrays, exporting as tensor operations. A new method is one module with such
a class, added to `METHODS`; the detector, the CLI, the service and export need no change.
Zero-shot scoring (`mutual.MutualScorer`) has no fit and is not registered here."""

from __future__ import annotations

from typing import Any

from normalcy.methods.base import FitSettings
from normalcy.methods.fused import KNNGaussianFusion
from normalcy.methods.gaussian import GaussianScorer
from normalcy.methods.golden import GoldenTemplate
from normalcy.methods.patchknn import PatchKNN

METHODS: dict[str, type] = {
    PatchKNN.name: PatchKNN,
    GaussianScorer.name: GaussianScorer,
    KNNGaussianFusion.name: KNNGaussianFusion,
    GoldenTemplate.name: GoldenTemplate,
}


def create_method(name: str, **params: Any):
    """A method by name, with its constructor parameters."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](**params)


def method_for(name: str, settings: FitSettings) -> Any:
    """An unfitted method by name, in a detector's settings."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name].from_settings(settings)


def method_from_state(name: str, params: dict[str, Any], arrays: dict) -> Any:
    if name not in METHODS:
        raise ValueError(f"model uses method {name!r}, which this normalcy does not know")
    return METHODS[name].from_state(params, arrays)
