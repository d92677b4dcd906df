"""Data sets on disk in the MVTec AD layout: categories, test samples and their masks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from normalcy.data import load_image
from normalcy.inputs import list_images


@dataclass(frozen=True)
class TestSample:
    """One MVTec test image with its label and, for defects, its ground-truth mask file."""

    __test__ = False  # not a pytest test class, despite the name

    path: Path
    label: int  # 0 good, 1 defect
    defect: str  # "good" or the defect folder name
    mask_path: Path | None


@dataclass(frozen=True)
class MVTecCategory:
    """One MVTec AD category: its training images (all good) and labelled test images."""

    name: str
    root: Path
    train: list[Path]
    test: list[TestSample]
    has_masks: bool  # True when the category has a ground_truth folder


_LAYOUT = (
    "expected <root>/<category>/train/good/ (or <root>/train/good/ when the root is a single "
    "category), with test/good/, test/<defect>/ and optionally ground_truth/<defect>/"
)


def find_categories(
    root: str | os.PathLike, names: Sequence[str] | None = None
) -> list[MVTecCategory]:
    """Find the MVTec AD categories under ``root`` (or ``root`` itself), sorted by name.

    A category is a folder with train/good. ``names`` restricts the result to those categories.
    Raises FileNotFoundError or ValueError with the offending path when the layout is broken.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"dataset root does not exist or is not a folder: {base}")
    if (base / "train" / "good").is_dir():
        folders = [base]
    else:
        folders = sorted(
            d
            for d in base.iterdir()
            if d.is_dir() and not d.name.startswith(".") and (d / "train" / "good").is_dir()
        )
    if not folders:
        raise ValueError(f"no MVTec AD category found in {base}: {_LAYOUT}")

    if names is not None:
        if isinstance(names, str):
            names = [names]
        available = [d.name for d in folders]
        missing = [n for n in names if n not in available]
        if missing:
            raise ValueError(
                f"categor{'y' if len(missing) == 1 else 'ies'} not found in {base}: "
                f"{', '.join(missing)}; available: {', '.join(available)}"
            )
        folders = [d for d in folders if d.name in names]
    return [_read_category(d) for d in folders]


def _read_category(folder: Path) -> MVTecCategory:
    train_dir = folder / "train" / "good"
    train = list_images(train_dir, recursive=False)
    if not train:
        raise ValueError(f"{train_dir}: no training images")

    test_dir = folder / "test"
    if not test_dir.is_dir():
        raise ValueError(f"{folder}: missing test folder {test_dir}")
    gt_dir = folder / "ground_truth"
    has_masks = gt_dir.is_dir()
    defect_dirs = sorted(
        (d for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith(".")),
        key=lambda d: (d.name != "good", d.name),
    )
    test: list[TestSample] = []
    missing_masks: list[Path] = []
    for defect_dir in defect_dirs:
        defect = defect_dir.name
        for path in list_images(defect_dir, recursive=False):
            mask_path = None
            if has_masks and defect != "good":
                mask_path = gt_dir / defect / f"{path.stem}_mask.png"
                if not mask_path.is_file():
                    missing_masks.append(mask_path)
            test.append(TestSample(path, int(defect != "good"), defect, mask_path))
    if not test:
        raise ValueError(f"{test_dir}: no test images")
    if missing_masks:
        raise ValueError(
            f"{folder}: {len(missing_masks)} defect image(s) have no ground-truth mask; "
            f"first expected mask: {missing_masks[0]}"
        )
    return MVTecCategory(folder.name, folder, train, test, has_masks)


def load_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a ground-truth mask as a bool array (pixel > 127), checking it is ``shape`` (H, W).

    Multi-channel masks use their first channel.
    """
    mask = load_image(path)[..., 0] > 127
    if mask.shape != tuple(shape):
        raise ValueError(
            f"{path}: mask size (H, W) = {mask.shape} does not match the image size {tuple(shape)}"
        )
    return mask


def few_shot_references(paths: Sequence[Path], shots: int, seed: int = 0) -> list[Path]:
    """Pick the ``shots`` reference images for a few-shot run, reproducibly.

    The protocol: sort the paths; seed ``s`` takes the s-th consecutive slice of ``shots``
    images, so different seeds use disjoint references.
    """
    if shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    needed = (seed + 1) * shots
    if needed > len(paths):
        raise ValueError(
            f"not enough images for {shots}-shot seed {seed}: {needed} are needed, "
            f"only {len(paths)} exist"
        )
    return sorted(paths)[seed * shots : needed]


def link_subsample(
    category: MVTecCategory, target: Path, train_every: int, test_every: int
) -> Path:
    """An MVTec-layout copy of every n-th train and test image, as symbolic links (no data
    copied), for quicker runs of benchmarks and tests. Returns `target`."""

    def link(source: Path, destination: Path) -> None:
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source.resolve(), destination)

    for path in category.train[::train_every]:
        link(path, target / "train" / "good" / path.name)
    for sample in category.test[::test_every]:
        link(sample.path, target / "test" / sample.defect / sample.path.name)
        if sample.mask_path is not None:
            link(sample.mask_path, target / "ground_truth" / sample.defect / sample.mask_path.name)
    return target
