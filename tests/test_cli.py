"""Tests for the `normalcy` command, run in-process through normalcy.cli.main on a tiny
generated data set (EfficientNet-Lite0 at 64 px), plus one smoke test of the installed script."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_OPTIONS as FAST
from conftest import assert_close
from PIL import Image

from normalcy import __version__
from normalcy.cli import EXIT_SOME_SKIPPED, build_parser, fitted_detector_from, main, tsv_field
from normalcy.detector import Detector
from normalcy.methods.mutual import MutualScorer

METRIC_KEYS = {
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "image_f1_max",
    "achieved_fpr",
    "recall",
    "fit_seconds",
    "predict_ms_per_image",
    "peak_rss_mb",
}
RESULT_KEYS = METRIC_KEYS | {
    "threshold",
    "category",
    "method",
    "backbone",
    "shots",
    "draw",
    "by_defect",
    "n_train",
    "n_test",
    "setting",
    "selection",
}


def _test_images(dataset: Path) -> list[Path]:
    good = sorted((dataset / "test" / "good").glob("*.png"))[:2]
    defects = sorted((dataset / "test").glob("[!g]*/*.png"))[:2]
    return good + defects


# --- fit -----------------------------------------------------------------------------------------


def test_fit_writes_a_model_directory(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    assert sorted(p.name for p in model.iterdir()) == ["config.json", config["arrays"]]
    assert config["setting"]["backbone"] == "efficientnet_lite0"
    assert config["setting"]["image_size"] == 64
    assert config["n_train"] == 12 and config["threshold"] is not None
    assert config["setting"]["context"] == 1.0  # the patch kNN default
    assert config["dense_map"] is False  # the default


def test_fit_reports_where_it_saved(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "m"
    code = main(["fit", str(dataset / "train" / "good"), "-o", str(target), *FAST, "--shots", "2"])
    assert code == 0
    out = capsys.readouterr().out
    assert str(target) in out and "2 normal images" in out
    assert json.loads((target / "config.json").read_text())["shots"] == 2


@pytest.mark.parametrize(
    ("option", "keys", "expected"),
    [
        (["--context", "0.5"], ["setting", "context"], 0.5),
        (["--dense-map"], ["dense_map"], True),
        (["--closing", "5"], ["setting", "closing"], 5),
        (["--sigma", "2.5"], ["setting", "sigma"], 2.5),
        (["--max-bank-size", "50"], ["setting", "max_bank_size"], 50),
        (["--coreset-ratio", "0.5"], ["setting", "coreset_ratio"], 0.5),
        (["--setting", "fine-detail"], ["setting", "tile_scale"], 2.0),
        (["--precision", "float32"], ["backbone", "precision"], "float32"),
    ],
)
def test_fit_map_and_feature_options_reach_the_saved_model(
    dataset: Path, tmp_path: Path, option: list[str], keys: list[str], expected: object
) -> None:
    target = tmp_path / "m"
    argv = ["fit", str(dataset / "train" / "good"), "-o", str(target), *FAST, "--shots", "2"]
    assert main([*argv, *option]) == 0
    config = json.loads((target / "config.json").read_text())
    for key in keys:
        config = config[key]
    assert config == expected


def test_fit_on_a_missing_folder_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere" / "train" / "good"
    assert main(["fit", str(missing), "-o", str(tmp_path / "m"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "error" in err and str(missing) in err
    assert not (tmp_path / "m").exists()


# --- predict -------------------------------------------------------------------------------------


def test_predict_writes_results_maps_and_masks(
    model: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _test_images(dataset)
    out = tmp_path / "out"
    code = main(["predict", str(model), *map(str, images), "-o", str(out), "--maps", "--json"])
    assert code == 0
    document = json.loads((out / "results.json").read_text())
    assert json.loads(capsys.readouterr().out) == document  # --json prints the same document
    assert document["errors"] == []
    rows = document["results"]
    assert [r["name"] for r in rows] == [str(p) for p in images]
    for row in rows:
        assert {"name", "score", "is_anomalous", "threshold"} <= set(row)
        assert isinstance(row["score"], float) and isinstance(row["is_anomalous"], bool)
        assert row["threshold"] == rows[0]["threshold"] is not None
        assert set(row["files"]) == {"overlay", "map", "mask"}
        assert np.load(out / row["files"]["map"]).shape == (64, 64)
        with Image.open(out / row["files"]["overlay"]) as overlay:
            assert overlay.size == (64, 64)
        with Image.open(out / row["files"]["mask"]) as mask:
            assert mask.size == (64, 64)
    # Test images from different folders share stems (000.png): their files must not collide.
    assert len({r["files"]["map"] for r in rows}) == len(rows)
    defect_scores = [r["score"] for r in rows[2:]]
    good_scores = [r["score"] for r in rows[:2]]
    assert min(defect_scores) > max(good_scores)


def test_predict_with_a_corrupt_input_exits_3_and_names_it(
    model: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _test_images(dataset)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"definitely not a PNG")
    inputs = [str(images[0]), str(corrupt), str(images[2])]
    code = main(["predict", str(model), *inputs, "-o", str(tmp_path / "out")])
    assert code == EXIT_SOME_SKIPPED == 3
    captured = capsys.readouterr()
    assert str(corrupt) in captured.err
    document = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["name"] for r in document["results"]] == [inputs[0], inputs[2]]
    assert [e["name"] for e in document["errors"]] == [str(corrupt)]
    assert document["errors"][0]["error"]
    assert str(images[0]) in captured.out  # the readable ones are still listed


def test_predict_with_only_unreadable_inputs_exits_1(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.png"
    assert main(["predict", str(model), str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err


def test_predict_threshold_override(
    model: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _test_images(dataset)
    assert main(["predict", str(model), *map(str, images), "--json", "--threshold", "0"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert all(r["is_anomalous"] is True and r["threshold"] == 0.0 for r in rows)


def test_predict_dense_map_and_device_options_change_maps_only(
    model: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = list(map(str, _test_images(dataset)[:2]))
    documents = []
    for options in ([], ["--dense-map", "--device", "cpu"]):
        out = tmp_path / f"out{len(documents)}"
        argv = ["--threads", "1", "predict", str(model), *images, "-o", str(out), "--maps"]
        assert main([*argv, *options]) == 0
        documents.append(json.loads((out / "results.json").read_text())["results"])
        maps = [np.load(out / row["files"]["map"]) for row in documents[-1]]
        documents[-1] = ([row["score"] for row in documents[-1]], maps)
    (plain_scores, plain_maps), (dense_scores, dense_maps) = documents
    assert_close(dense_scores, plain_scores)
    assert not np.allclose(dense_maps[0], plain_maps[0])
    capsys.readouterr()


@pytest.mark.parametrize(
    ("before", "after", "message"),
    [([], ["--device", "tpu"], "device must be one of"), (["--threads", "0"], [], "--threads")],
)
def test_predict_refuses_a_bad_device_or_thread_count_with_exit_2(
    model: Path,
    dataset: Path,
    capsys: pytest.CaptureFixture[str],
    before: list[str],
    after: list[str],
    message: str,
) -> None:
    image = str(_test_images(dataset)[0])
    assert main([*before, "predict", str(model), image, *after]) == 2
    assert message in capsys.readouterr().err


def test_zero_shot_refuses_the_dense_map_naming_it(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["predict", "--zero-shot", str(dataset / "test"), "--dense-map", *FAST]
    assert main(argv) == 2
    assert "--dense-map" in capsys.readouterr().err


def test_predict_with_a_missing_model_exits_2(
    tmp_path: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", str(tmp_path / "no-model"), str(_test_images(dataset)[0])]) == 2
    assert str(tmp_path / "no-model") in capsys.readouterr().err


# --- eval ----------------------------------------------------------------------------------------


def test_eval_writes_the_documented_json_and_a_report(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, report = tmp_path / "out.json", tmp_path / "r.html"
    code = main(["eval", str(dataset.parent), *FAST, "--json", str(out), "--report", str(report)])
    assert code == 0
    summary = json.loads(out.read_text())
    assert set(summary) == {"results", "mean", "settings"}
    (row,) = summary["results"]
    assert set(row) == RESULT_KEYS
    assert row["category"] == "woven_fabric" and row["method"] == "patchknn"
    assert row["backbone"] == "efficientnet_lite0" and row["shots"] is None
    assert row["n_train"] == 12 and row["n_test"] == 10
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max"):
        assert 0.0 <= row[key] <= 1.0, key
    assert row["fit_seconds"] > 0 and row["predict_ms_per_image"] > 0 and row["peak_rss_mb"] > 0
    assert set(summary["mean"]) == METRIC_KEYS
    for key in METRIC_KEYS:
        assert summary["mean"][key] == pytest.approx(row[key])
    defects = {d["defect"]: d for d in row["by_defect"]}
    assert set(defects) == {"hole", "scratch", "stain"}
    assert sum(d["n_images"] for d in defects.values()) == 6
    for d in defects.values():
        assert 0.0 <= d["image_auroc"] <= 1.0 and 0.0 <= d["aupro"] <= 1.0
    html = report.read_text()
    assert html.lstrip().lower().startswith("<!doctype html") and "By defect type" in html
    printed = capsys.readouterr().out
    assert "woven_fabric" in printed and "by defect type" in printed and "scratch" in printed


def test_eval_of_a_single_category_folder_in_few_shot(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.json"
    assert main(["eval", str(dataset), *FAST, "--shots", "2", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["shots"] == 2 and row["n_train"] == 2 and row["n_test"] == 10


def test_eval_over_several_draws_reports_mean_and_spread(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.json"
    args = ["eval", str(dataset), *FAST, "--shots", "1", "--draws", "3", "--json", str(out)]
    assert main(args) == 0
    summary = json.loads(out.read_text())
    assert [r["draw"] for r in summary["results"]] == [0, 1, 2]
    (setting,) = summary["settings"]
    assert setting["n_draws"] == 3 and setting["shots"] == 1
    aurocs = [r["image_auroc"] for r in summary["results"]]
    assert setting["mean"]["image_auroc"] == pytest.approx(np.mean(aurocs))
    assert setting["spread"]["image_auroc"] == pytest.approx(np.std(aurocs))
    assert "spread" in capsys.readouterr().out


def test_eval_of_all_methods_gives_one_table(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.json"
    assert main(["eval", str(dataset), *FAST, "--method", "all", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    methods = ["patchknn", "gaussian", "patchknn+gaussian", "mutual"]
    assert [r["method"] for r in summary["results"]] == methods
    assert summary["mean"] is None and len(summary["settings"]) == 4
    mutual = summary["results"][3]
    assert mutual["n_train"] == 0 and mutual["fit_seconds"] == 0 and mutual["n_test"] == 10
    assert all(0 <= r["image_auroc"] <= 1 for r in summary["results"])
    table = capsys.readouterr().out
    assert all(m in table for m in methods)


def test_predict_zero_shot_needs_no_model(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = sorted((dataset / "test").rglob("*.png"))
    out = tmp_path / "zs"
    code = main(["predict", "--zero-shot", *map(str, inputs), *FAST, "-o", str(out), "--maps"])
    assert code == 0
    document = json.loads((out / "results.json").read_text())
    assert document["model"] == "zero-shot" and len(document["results"]) == len(inputs)
    assert all(r["is_anomalous"] is None for r in document["results"])
    assert (out / f"{inputs[0].stem}_overlay.png").is_file()


def test_zero_shot_options_reach_the_scorer(dataset: Path, tmp_path: Path) -> None:
    inputs = sorted((dataset / "test").rglob("*.png"))
    options = ["--mutual-sizes", "1", "3", "--mutual-rescore", "2"]
    out = tmp_path / "zs"
    code = main(["predict", "--zero-shot", *map(str, inputs), *FAST, *options, "-o", str(out)])
    assert code == 0
    scores = [r["score"] for r in json.loads((out / "results.json").read_text())["results"]]
    scorer = MutualScorer(neighbourhoods=(1, 3), rescore_neighbours=2)
    expected = Detector(
        method="mutual", backbone="efficientnet_lite0", image_size=64, scorer=scorer
    ).zero_shot(inputs)
    assert_close(scores, [p.score for p in expected])
    default = Detector(method="mutual", backbone="efficientnet_lite0", image_size=64)
    assert not np.allclose(scores, [p.score for p in default.zero_shot(inputs)], rtol=1e-3)


def test_zero_shot_options_are_validated(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = sorted((dataset / "test").rglob("*.png"))
    assert main(["predict", "--zero-shot", *map(str, inputs), *FAST, "--mutual-sizes", "2"]) == 2
    assert "odd" in capsys.readouterr().err


def test_predict_zero_shot_on_too_few_images_exits_2_with_the_reason(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = sorted((dataset / "test" / "good").glob("*.png"))[:2]
    assert main(["predict", "--zero-shot", *map(str, inputs), *FAST]) == 2
    assert "at least 3 images" in capsys.readouterr().err


def test_predict_without_inputs_explains_the_usage(
    model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", str(model)]) == 2
    assert "MODEL_DIR INPUT" in capsys.readouterr().err


def test_fit_without_a_method_picks_few_shot_for_few_images(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = tmp_path / "few"
    train.mkdir()
    for path in sorted((dataset / "train" / "good").glob("*.png"))[:3]:
        (train / path.name).write_bytes(path.read_bytes())
    assert main(["fit", str(train), "-o", str(tmp_path / "m"), *FAST]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["shots"] == 3 and config["setting"]["method"] == "patchknn"
    assert "3-shot" in capsys.readouterr().err


def test_fit_on_an_empty_folder_points_to_zero_shot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["fit", str(tmp_path / "empty"), "-o", str(tmp_path / "m"), *FAST]) == 2
    assert "--zero-shot" in capsys.readouterr().err


def test_eval_without_a_train_folder_exits_2_naming_the_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "dataset"
    (root / "test" / "good").mkdir(parents=True)
    assert main(["eval", str(root), *FAST]) == 2
    err = capsys.readouterr().err
    assert str(root) in err and "train/good" in err


def test_eval_of_an_unknown_category_exits_2_naming_it(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(dataset.parent), "--category", "carpet", *FAST]) == 2
    err = capsys.readouterr().err
    assert "carpet" in err and "woven_fabric" in err


# --- the installed script ------------------------------------------------------------------------


def test_installed_entry_point_prints_the_version() -> None:
    script = Path(sys.executable).with_name("normalcy")
    assert script.is_file(), f"the `normalcy` script is not installed next to {sys.executable}"
    done = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"normalcy {__version__}"


def test_low_variance_reaches_the_gaussian_and_is_refused_for_other_methods() -> None:
    args = build_parser().parse_args(["eval", "data", "--method", "all", "--low-variance", "0.05"])
    assert fitted_detector_from(args, "gaussian").setting.low_variance_fraction == 0.05
    assert fitted_detector_from(args, "patchknn").setting.low_variance_fraction is None
    args = build_parser().parse_args(
        ["fit", "data", "-o", "m", "--method", "patchknn", "--low-variance", "0.05"]
    )
    with pytest.raises(ValueError, match="--low-variance"):
        fitted_detector_from(args)


def test_eval_passes_zero_shot_options_to_its_detectors() -> None:
    args = build_parser().parse_args(
        ["eval", "data", "--method", "mutual", "--mutual-sizes", "1", "3", "--mutual-rescore", "2"]
        + ["--precision", "bfloat16"]
    )
    scorer = fitted_detector_from(args).scorer
    assert scorer.neighbourhoods == (1, 3) and scorer.rescore_neighbours == 2
    assert scorer.precision == "bfloat16"


def test_eval_of_all_methods_with_shots_leaves_out_the_full_shot_fusion(
    dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.json"
    args = ["eval", str(dataset), *FAST, "--method", "all", "--shots", "4", "--json", str(out)]
    assert main(args) == 0
    methods = [r["method"] for r in json.loads(out.read_text())["results"]]
    assert methods == ["patchknn", "gaussian", "mutual"]


# --- hostile names and interrupted runs ----------------------------------------------------------


def test_a_name_with_tabs_and_newlines_stays_one_escaped_line(
    model: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    forged = tmp_path / "a\tb\nfake.png\t0.0\tnormal.png"
    forged.write_bytes(_test_images(dataset)[0].read_bytes())
    assert main(["predict", str(model), str(forged)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    name, score, decision = lines[0].split("\t")
    assert name == str(forged).replace("\t", "\\t").replace("\n", "\\n")
    assert float(score) >= 0 and decision in ("normal", "ANOMALOUS")


def test_tsv_field_escapes_control_characters_and_undecodable_bytes() -> None:
    assert tsv_field("plain name.png") == "plain name.png"
    assert tsv_field("a\\b\tc\rd\x1be") == "a\\\\b\\tc\\rd\\x1be"
    assert tsv_field(os.fsdecode(b"caf\xe9.png")) == "caf\\xe9.png"
    assert tsv_field("über.png") == "über.png"


def test_a_name_that_is_not_utf8_never_aborts_the_batch(
    model: Path,
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    good = _test_images(dataset)[0].read_bytes()
    odd = os.path.join(os.fsencode(folder), b"caf\xe9-\xff.png")
    with open(odd, "wb") as file:
        file.write(good)
    (folder / "plain.png").write_bytes(good)
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    out = tmp_path / "out"
    assert main(["predict", str(model), str(folder), "-o", str(out)]) == 0
    stdout.flush()
    printed = stdout.buffer.getvalue().decode("utf-8").splitlines()
    assert len(printed) == 2 and any("caf\\xe9-\\xff.png" in line for line in printed)
    document = json.loads((out / "results.json").read_text())
    assert len(document["results"]) == 2 and document["complete"] is True


def test_an_interrupted_predict_keeps_what_it_scored_in_results_json(
    model: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = _test_images(dataset)
    real = Detector.predict_iter

    def interrupted(self: Detector, inputs: object):
        outcomes = real(self, inputs)
        yield next(outcomes)
        yield next(outcomes)
        raise KeyboardInterrupt

    monkeypatch.setattr(Detector, "predict_iter", interrupted)
    out = tmp_path / "out"
    assert main(["predict", str(model), *map(str, images), "-o", str(out)]) == 130
    document = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in document["results"]] == [str(p) for p in images[:2]]
    assert document["complete"] is False


def test_fit_chooses_few_or_full_shot_by_the_readable_images_only(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "train"
    folder.mkdir()
    train = sorted((dataset / "train" / "good").glob("*.png"))
    for path in train[:5]:
        (folder / path.name).write_bytes(path.read_bytes())
    for i in range(20):  # enough to push a count of all files past the few-shot limit
        (folder / f"notes-{i:02d}.png").write_text("not an image")
    assert main(["fit", str(folder), "-o", str(tmp_path / "model"), *FAST]) == 0
    err = capsys.readouterr().err
    assert "5 normal images: fitting patchknn 5-shot" in err
    assert "20 image(s) could not be read" in err
    assert json.loads((tmp_path / "model" / "config.json").read_text())["shots"] == 5


# --- demo ----------------------------------------------------------------------------------------


def test_demo_fits_evaluates_and_reports_on_the_embedded_circuit_boards(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), *FAST]) == 0
    assert (out / "report.html").stat().st_size > 0
    assert "MIT License" in (out / "data" / "LICENSE").read_text()
    (result,) = json.loads((out / "results.json").read_text())["results"]
    assert result["category"] == "pcb" and result["n_train"] == 40 and result["n_test"] == 24
    assert 0.0 <= result["image_auroc"] <= 1.0


def test_demo_can_still_use_the_generated_fabric(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--synthetic", *FAST]) == 0
    (result,) = json.loads((out / "results.json").read_text())["results"]
    assert result["category"] == "woven_fabric"
