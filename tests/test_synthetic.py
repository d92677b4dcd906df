from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from normalcy.synthetic import DEFECTS, make_demo_dataset

SMALL = {"n_train": 3, "n_test_good": 2, "n_test_defect": 7, "size": 64}


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def full_size(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default image size, few images: enough for statistics on real defect shapes."""
    root = tmp_path_factory.mktemp("demo")
    return make_demo_dataset(root, n_train=6, n_test_good=1, n_test_defect=12, seed=3)


def test_writes_mvtec_layout_with_requested_counts(tmp_path: Path) -> None:
    folder = make_demo_dataset(tmp_path, category="cloth", **SMALL)
    assert folder == tmp_path / "cloth"
    assert len(DEFECTS) >= 3
    assert sorted(p.name for p in (folder / "test").iterdir()) == sorted(["good", *DEFECTS])
    assert len(list((folder / "train" / "good").glob("*.png"))) == 3
    assert len(list((folder / "test" / "good").glob("*.png"))) == 2
    per_kind = {kind: len(list((folder / "test" / kind).glob("*.png"))) for kind in DEFECTS}
    assert sum(per_kind.values()) == 7 and min(per_kind.values()) >= 2
    for kind in DEFECTS:
        stems = sorted(p.stem for p in (folder / "test" / kind).glob("*.png"))
        masks = sorted(p.stem for p in (folder / "ground_truth" / kind).glob("*.png"))
        assert masks == [f"{stem}_mask" for stem in stems]
    image = _load(folder / "train" / "good" / "000.png")
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8


def test_masks_are_binary_nonempty_and_match_image_size(full_size: Path) -> None:
    for kind in DEFECTS:
        for image_path in (full_size / "test" / kind).glob("*.png"):
            mask = _load(full_size / "ground_truth" / kind / f"{image_path.stem}_mask.png")
            assert mask.shape == _load(image_path).shape[:2]
            assert set(np.unique(mask)) == {0, 255}
            assert 0.002 <= (mask > 0).mean() <= 0.05, f"{kind}/{image_path.name} area"


def test_defects_change_the_fabric_inside_their_masks(full_size: Path) -> None:
    normal = np.mean(
        [_load(p).astype(float) for p in (full_size / "train" / "good").glob("*.png")], axis=0
    )
    for kind in DEFECTS:
        for image_path in (full_size / "test" / kind).glob("*.png"):
            mask = _load(full_size / "ground_truth" / kind / f"{image_path.stem}_mask.png") > 0
            difference = np.abs(_load(image_path) - normal).mean(axis=2)
            assert difference[mask].mean() > 1.5 * difference[~mask].mean(), kind


def test_normal_images_vary_but_share_the_pattern(full_size: Path) -> None:
    first, second = (_load(full_size / "train" / "good" / f"00{i}.png") for i in (0, 1))
    assert not np.array_equal(first, second)
    np.testing.assert_allclose(first.mean(axis=(0, 1)), second.mean(axis=(0, 1)), rtol=0.1)


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    a = make_demo_dataset(tmp_path / "a", seed=7, **SMALL)
    b = make_demo_dataset(tmp_path / "b", seed=7, **SMALL)
    c = make_demo_dataset(tmp_path / "c", seed=8, **SMALL)
    assert _files(a) == _files(b) == _files(c)
    for name in _files(a):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "train/good/000.png").read_bytes() != (c / "train/good/000.png").read_bytes()
    assert (a / "ground_truth/hole/000_mask.png").read_bytes() != (
        c / "ground_truth/hole/000_mask.png"
    ).read_bytes()


def test_rerun_with_fewer_images_leaves_no_stale_files(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path, n_train=5, n_test_good=4, n_test_defect=9, size=64)
    folder = make_demo_dataset(tmp_path, **SMALL)
    assert len(list((folder / "train" / "good").glob("*.png"))) == SMALL["n_train"]
    assert len(list((folder / "ground_truth").rglob("*.png"))) == SMALL["n_test_defect"]
    assert [p.name for p in tmp_path.iterdir()] == ["woven_fabric"]  # no temp folders left


def test_rejects_too_small_images(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        make_demo_dataset(tmp_path, size=16)
    assert list(tmp_path.iterdir()) == []
