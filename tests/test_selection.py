"""Tests for normalcy.selection and `--setting auto`: the setting is chosen from normal images
alone, by defects planted into the ones it was not fitted on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_OPTIONS, assert_close
from PIL import Image

from normalcy import Detector, selection
from normalcy.backbones.memo import ForwardMemo
from normalcy.cli import main
from normalcy.selection import Selection, Trial, choose, select_setting
from normalcy.setting import SETTINGS, Setting

# Two small settings, one whole-image and one on tiles at the image's resolution.
WHOLE = Setting(backbone="efficientnet_lite0", image_size=64)
TILES = WHOLE.replace(tile_scale=1.0, context=0.0, closing=1)
FAMILY = {"tiny-whole": WHOLE, "tiny-tiles": TILES}
SIDE = 192


def _traces(seed: int) -> np.ndarray:
    """A board-like image: one-pixel traces on a dark substrate, shifted per image."""
    rng = np.random.default_rng(seed)
    image = np.full((SIDE, SIDE, 3), 40.0)
    offset = int(rng.integers(0, 6))
    image[offset::6, :] = 210
    image[:, (offset + 3) :: 9] = 210
    image += rng.normal(0, 2, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _write(folder: Path, make, n: int = 17) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        Image.fromarray(make(i)).save(path)
        paths.append(path)
    return paths


def _make(setting: Setting, **changes: object) -> Detector:
    return Detector(setting, precision="float32", device="cpu", **changes)


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _write(tmp_path_factory.mktemp("traces"), _traces)


@pytest.fixture(scope="module")
def traces_selection(traces: list[Path]) -> Selection:
    return select_setting(traces, _make, FAMILY, seed=0)


def test_on_one_pixel_traces_the_fine_scale_setting_is_chosen(traces_selection: Selection) -> None:
    assert traces_selection.chosen == "tiny-tiles"
    found = {t.name: t for t in traces_selection.trials}
    assert found["tiny-tiles"].objective > found["tiny-whole"].objective + selection.TIE
    assert traces_selection.planted_images == selection.PLANTS_PER_IMAGE * 5
    assert traces_selection.held_images == 5
    assert traces_selection.fit_images == 12


def test_the_choice_is_the_same_for_a_seed_and_keeps_a_budget_measured_here(
    traces: list[Path], traces_selection: Selection
) -> None:
    again = select_setting(traces, _make, FAMILY, max_ms_per_image=1e-3, seed=0)
    for a, b in zip(again.trials, traces_selection.trials, strict=True):
        assert a.name == b.name
        assert_close([a.image_auroc, a.aupro], [b.image_auroc, b.aupro])
    assert not any(t.within_budget for t in again.trials)  # none predicts in a microsecond
    assert again.chosen == min(again.trials, key=lambda t: t.ms_per_image).name


def test_ties_go_to_the_faster_setting_and_the_budget_is_kept() -> None:
    slow = Trial("slow", 0.95, 0.80, 300.0, 10.0, True)
    fast = Trial("fast", 0.95, 0.795, 30.0, 1.0, True)
    assert choose([slow, fast]) == "fast"  # 0.005 apart: tied
    better = Trial("slow", 0.99, 0.90, 300.0, 10.0, True)
    assert choose([better, fast]) == "slow"
    assert choose([Trial(**{**better.__dict__, "within_budget": False}), fast]) == "fast"
    nothing = [Trial(**{**t.__dict__, "within_budget": False}) for t in (better, fast)]
    assert choose(nothing) == "fast"  # none within budget: the fastest


def test_too_few_images_to_choose_is_said(traces: list[Path]) -> None:
    with pytest.raises(ValueError, match="at least 6 images, got 5"):
        select_setting(traces[:5], _make, FAMILY)


def test_few_shot_references_are_left_out_in_turn_and_choose_the_fine_scale(
    traces: list[Path],
) -> None:
    chosen = select_setting(traces[:5], _make, FAMILY, seed=0, few_shot=True)
    assert chosen.chosen == "tiny-tiles"
    assert chosen.fit_images == 4  # each fold: a few-shot model of all references but one
    assert chosen.held_images == selection.FEW_SHOT_FOLDS == 4
    assert chosen.planted_images == selection.PLANTS_PER_IMAGE * 4


def test_a_single_reference_is_judged_on_its_views_fitted_without_augmentation(
    traces: list[Path],
) -> None:
    fits: list[dict[str, object]] = []

    def make(setting: Setting, **changes: object) -> Detector:
        fits.append(changes)
        return _make(setting, **changes)

    chosen = select_setting(traces[:1], make, FAMILY, seed=0, few_shot=True)
    assert chosen.fit_images == 7 and chosen.held_images == 4  # of the 8 views
    assert fits and all(f == {"augment": False, "shots": 7} for f in fits)
    assert chosen.chosen in FAMILY
    assert all(0 <= t.image_auroc <= 1 and t.ms_per_image > 0 for t in chosen.trials)


@pytest.fixture
def tiny_family(monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` chooses between the two small settings (named in SETTINGS for the test)."""
    for name, setting in FAMILY.items():
        monkeypatch.setitem(SETTINGS, name, setting)
    monkeypatch.setattr(selection, "CANDIDATES", tuple(FAMILY))


def test_a_model_fitted_with_auto_saves_its_choice_and_predicts_as_a_pinned_fit(
    tiny_family: None, traces: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, model = traces[0].parent, tmp_path / "auto"
    options = ["--precision", "float32", "--device", "cpu"]
    assert main(["fit", str(folder), "-o", str(model), "--setting", "auto", *options]) == 0
    out = capsys.readouterr().out
    assert "setting tiny-tiles" in out and "planted AUROC" in out
    config = json.loads((model / "config.json").read_text())
    assert {t["name"] for t in config["selection"]["trials"]} == set(FAMILY)
    loaded = Detector.load(model, device="cpu")
    assert loaded.selection_.chosen == "tiny-tiles"
    assert loaded.active_setting == TILES.replace(layers=loaded.backbone_.layers)
    pinned = Detector(TILES, precision="float32", device="cpu").fit(traces)
    probe = [_traces(100), _traces(101)]
    assert_close(loaded.score(probe), pinned.score(probe))
    assert_close(loaded.threshold_, pinned.threshold_)


def test_a_few_shot_fit_with_auto_chooses_and_is_calibrated_by_leaving_one_out(
    tiny_family: None, traces: list[Path]
) -> None:
    detector = Detector("auto", shots=4, precision="float32", device="cpu").fit(traces)
    assert detector.selection_ is not None and detector.selection_.fit_images == 3
    assert detector.active_setting == SETTINGS[detector.selection_.chosen]
    assert detector.threshold_ is not None and len(detector.normal_scores_) == 4


def test_an_explicit_option_pins_the_setting_and_skips_the_choice(
    tiny_family: None, traces: list[Path], tmp_path: Path
) -> None:
    assert Detector("auto", image_size=64).setting == SETTINGS["default"].replace(image_size=64)
    argv = ["fit", str(traces[0].parent), "-o", str(tmp_path / "p"), "--setting", "auto"]
    assert main([*argv, *FAST_OPTIONS]) == 0
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["selection"] is None and config["setting"]["image_size"] == 64


def test_eval_planted_measures_a_setting_or_a_model_and_reports_synthetic_defects(
    traces: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, results, report = traces[0].parent, tmp_path / "planted.json", tmp_path / "r.html"
    argv = ["eval", "--planted", str(folder), *FAST_OPTIONS, "--tile-scale", "1"]
    assert main([*argv, "--json", str(results), "--report", str(report)]) == 0
    assert "synthetic, not real defects" in capsys.readouterr().out
    row = json.loads(results.read_text())["planted"]
    assert (row["fitted_on"], row["normal_images"]) == (12, 5)
    assert row["planted_images"] == selection.PLANTS_PER_IMAGE * 5
    assert row["setting"]["tile_scale"] == 1.0
    assert 0.5 < row["planted_image_auroc"] <= 1.0 and 0.0 < row["planted_aupro"] <= 1.0
    html = report.read_text()
    assert "SYNTHETIC defects" in html and "synthetic: line" in html
    model = tmp_path / "model"
    assert main(["fit", str(folder), "-o", str(model), *FAST_OPTIONS]) == 0
    assert (
        main(["eval", "--planted", str(folder), "--model", str(model), "--json", str(results)]) == 0
    )
    row = json.loads(results.read_text())["planted"]
    assert (row["fitted_on"], row["normal_images"]) == (0, 17)
    assert row["planted_images"] == selection.PLANTS_PER_IMAGE * 17


def test_eval_without_data_or_planted_images_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval"]) == 2
    assert "--planted NORMAL_DIR" in capsys.readouterr().err


def test_candidates_sharing_a_memo_are_timed_without_reading_it(traces: list[Path]) -> None:
    class Recording(ForwardMemo):
        timed = 0

        def writing_only(self):  # noqa: ANN202 - the parent's context manager
            Recording.timed += 1
            return super().writing_only()

    memo = Recording()  # empty, as at the start of every choice

    def make(setting: Setting) -> Detector:
        detector = _make(setting)
        detector.backbone_model().memo = memo
        return detector

    same_passes = {"a": TILES, "b": TILES.replace(closing=3)}  # maps differ, passes do not
    chosen = select_setting(traces, make, same_passes, seed=0, memo=memo)
    assert Recording.timed == 2 and memo.hits > 0  # b's fit and planted images were read
    alone = select_setting(traces, _make, {"b": same_passes["b"]}, seed=0)
    # Passes read from the memo were computed in other batches, which may change the last
    # bits of a score: a near-tie may then swap one (normal, planted) pair of the 100.
    np.testing.assert_allclose(
        [chosen.trials[1].image_auroc, chosen.trials[1].aupro],
        [alone.trials[0].image_auroc, alone.trials[0].aupro],
        atol=0.01,
    )
