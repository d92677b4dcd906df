"""Scoring methods over patch features; each has the same fit / score / save protocol."""

from __future__ import annotations

from typing import Any

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


def method_from_state(name: str, params: dict[str, Any], arrays: dict) -> Any:
    if name not in METHODS:
        raise ValueError(f"model uses method {name!r}, which this normalcy does not know")
    return METHODS[name].from_state(params, arrays)
