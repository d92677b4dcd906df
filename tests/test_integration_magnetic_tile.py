"""End to end on real inspection images: `normalcy fit` and `normalcy eval` on magnetic tiles.

Uses a fixed subsample (every 8th training image, every 5th test image) so it runs in a few
minutes on a 2-core CPU; the floors sit below the full-benchmark figures in the README by a
margin that covers the subsample's noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from normalcy.cli import main
from normalcy.datasets import find_categories, link_subsample

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mtd" / "magnetic_tile"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (DATA / "train" / "good").is_dir(),
        reason=f"real data not found at {DATA} (see shared/data/README.md)",
    ),
]

# image AUROC and AUPRO floors per method; see the module docstring
FLOORS = {
    "patchknn": (0.85, 0.65),
    "gaussian": (0.80, 0.65),
    "patchknn+gaussian": (0.85, 0.65),  # the image score is patchknn's
    "mutual": (0.65, 0.60),
}


@pytest.fixture(scope="module")
def subsample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A linked (not copied) MVTec-layout subsample of magnetic_tile."""
    root = tmp_path_factory.mktemp("mtd") / "magnetic_tile"
    return link_subsample(find_categories(DATA)[0], root, train_every=8, test_every=5)


def test_fit_then_eval_of_every_method_on_magnetic_tiles_beats_the_floors(
    subsample: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    assert main(["fit", str(subsample / "train" / "good"), "-o", str(model)]) == 0
    config = json.loads((model / "config.json").read_text())
    assert config["threshold"] is not None

    out = tmp_path / "eval.json"
    assert main(["eval", str(subsample), "--method", "all", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["method"] for r in results] == list(FLOORS)
    n_test = len(find_categories(subsample)[0].test)
    for result in results:
        image_floor, aupro_floor = FLOORS[result["method"]]
        assert result["n_test"] == n_test
        assert result["image_auroc"] >= image_floor, result
        assert result["aupro"] >= aupro_floor, result
