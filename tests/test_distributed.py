"""Scoring on a real local Ray instance: same results as local predict, resumable, and
complete when an actor dies mid-job."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_OPTIONS, assert_close

from normalcy import Detector, distributed, selection
from normalcy.cli import main
from normalcy.data import ImageLoadError
from normalcy.methods.mutual import MutualScorer
from normalcy.setting import SETTINGS, Setting

ray = pytest.importorskip(
    "ray", reason="the ray extra is not installed (pip install 'normalcy[ray]')"
)


@pytest.fixture(scope="module")
def local_ray():
    """One real local Ray instance for the module (starting one takes seconds)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def inputs(dataset: Path, tmp_path: Path) -> list[Path]:
    """The test images of the generated set, and one file that is not an image."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    return [*sorted((dataset / "test").rglob("*.png")), broken]


def _rows(out: Path) -> list[dict]:
    return distributed.read_results(out).to_pylist()


def test_distributed_predict_equals_local_predict_image_by_image(
    local_ray, model, inputs, tmp_path
):
    out = tmp_path / "out"
    summary = distributed.predict(model, inputs, out, batch_size=3, progress=False)
    rows = {row["name"]: row for row in _rows(out)}
    assert len(rows) == len(inputs) == summary.scored + summary.unreadable
    assert summary.unreadable == 1
    local = Detector.load(model).predict_iter([str(p) for p in inputs[:-1]])
    for prediction in local:
        row = rows[prediction.name]
        assert_close(row["score"], prediction.score)
        assert row["is_anomalous"] == prediction.is_anomalous
        assert row["threshold"] == pytest.approx(prediction.threshold)
        assert row["error"] is None
    broken = rows[str(inputs[-1])]
    assert broken["score"] is None and "not an image" in broken["error"]


@pytest.mark.arithmetic_free
def test_rerun_with_the_same_output_skips_what_is_done(local_ray, model, inputs, tmp_path):
    out = tmp_path / "out"
    distributed.predict(model, inputs[:4], out, batch_size=2, progress=False)
    again = distributed.predict(model, inputs, out, batch_size=2, progress=False)
    assert again.already_done == 4
    assert again.scored + again.unreadable == len(inputs) - 4
    names = [row["name"] for row in _rows(out)]
    assert sorted(names) == sorted(str(p) for p in inputs)


@pytest.mark.arithmetic_free
def test_interrupted_run_resumes_with_nothing_lost_or_duplicated(
    local_ray, model, inputs, tmp_path
):
    out = tmp_path / "out"

    def interrupt(path: Path) -> None:
        raise KeyboardInterrupt  # as Ctrl-C after the first results file

    with pytest.raises(KeyboardInterrupt):
        distributed.predict(
            model, inputs, out, batch_size=1, rows_per_file=2, on_file=interrupt, progress=False
        )
    first = _rows(out)
    assert 0 < len(first) < len(inputs)
    assert not list(out.glob(".*.tmp"))  # no partial results file left behind
    resumed = distributed.predict(model, inputs, out, batch_size=2, progress=False)
    assert resumed.already_done == len(first)
    names = [row["name"] for row in _rows(out)]
    assert sorted(names) == sorted(str(p) for p in inputs)


def _scoring_actor_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if entry.name.isdigit() and b"MapBatches(Scorer)" in command:
            pids.append(int(entry.name))
    return pids


@pytest.mark.arithmetic_free
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the actor in /proc")
def test_actor_killed_mid_job_is_replaced_and_the_output_is_complete(
    local_ray, model, inputs, tmp_path
):
    out = tmp_path / "out"
    killed = []

    def kill_an_actor(path: Path) -> None:
        if not killed:
            pids = _scoring_actor_pids()
            assert pids, "no scoring actor process found"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    summary = distributed.predict(
        model, inputs, out, batch_size=1, rows_per_file=1, on_file=kill_an_actor, progress=False
    )
    assert killed
    names = [row["name"] for row in _rows(out)]
    assert sorted(names) == sorted(str(p) for p in inputs)
    assert summary.scored == len(inputs) - 1


def test_cli_predict_on_ray_writes_parquet_and_maps(local_ray, model, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["predict", str(model), *map(str, inputs), "-o", str(out), "--ray", "--maps"])
    assert code == 3  # some inputs unreadable, the rest scored
    assert "10 scored, 1 unreadable" in capsys.readouterr().out
    rows = _rows(out)
    scored = [row for row in rows if row["error"] is None]
    assert all((out / row["map"]).is_file() and (out / row["overlay"]).is_file() for row in scored)


def test_cli_without_ray_says_how_to_install_it(model, inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    code = main(["predict", str(model), str(inputs[0]), "-o", str(tmp_path / "out"), "--ray"])
    assert code == 2
    assert "pip install 'normalcy[ray]'" in capsys.readouterr().err


def test_cli_predict_on_ray_needs_an_output_folder(model, inputs, capsys):
    assert main(["predict", str(model), str(inputs[0]), "--ray"]) == 2
    assert "-o OUT" in capsys.readouterr().err


def _fast_detector(method: str) -> Detector:
    return Detector(backbone="efficientnet_lite0", image_size=64, method=method)


def test_fit_on_ray_builds_the_bank_and_threshold_of_a_single_machine_fit(local_ray, dataset):
    train = dataset / "train" / "good"
    local = _fast_detector("patchknn").fit(train)
    spread = distributed.fit(_fast_detector("patchknn"), train, part_images=5, progress=False)
    assert_close(spread.method_.memory_bank_, local.method_.memory_bank_)
    assert_close(spread.threshold_, local.threshold_)
    assert_close(spread.pixel_threshold_, local.pixel_threshold_)
    assert (spread.n_train_, spread.input_size_) == (local.n_train_, local.input_size_)


def test_auto_on_ray_chooses_on_the_driver_and_fits_the_choice_on_the_cluster(
    local_ray, dataset, monkeypatch
):
    family = {
        "tiny-64": Setting(backbone="efficientnet_lite0", image_size=64),
        "tiny-96": Setting(backbone="efficientnet_lite0", image_size=96),
    }
    for name, setting in family.items():
        monkeypatch.setitem(SETTINGS, name, setting)
    monkeypatch.setattr(selection, "CANDIDATES", tuple(family))
    train = dataset / "train" / "good"
    spread = distributed.fit(Detector(), train, part_images=5, progress=False)
    chosen = spread.selection_.chosen
    assert chosen in family and {t.name for t in spread.selection_.trials} == set(family)
    pinned = Detector(family[chosen]).fit(train)
    assert spread.active_setting == pinned.active_setting
    assert_close(spread.method_.memory_bank_, pinned.method_.memory_bank_)
    assert_close(spread.threshold_, pinned.threshold_)


def test_gaussian_fit_on_ray_adds_the_parts_sums(local_ray, dataset):
    train = dataset / "train" / "good"
    local = _fast_detector("gaussian").fit(train)
    spread = distributed.fit(_fast_detector("gaussian"), train, part_images=4, progress=False)
    for name in ("patch_mean_", "image_mean_", "patch_shrinkage_", "image_shrinkage_"):
        assert_close(getattr(spread.method_, name), getattr(local.method_, name))
    # The whitening's eigenvectors may differ in sign; the distances they give may not.
    test = sorted((dataset / "test").rglob("*.png"))
    assert_close(spread.score(test), local.score(test))
    assert_close(spread.threshold_, local.threshold_)


def test_fit_on_ray_refuses_few_shot_models(dataset):
    few_shot = Detector(backbone="efficientnet_lite0", image_size=64, shots=2)
    with pytest.raises(ValueError, match="full-shot patchknn or gaussian"):
        distributed.fit(few_shot, dataset / "train" / "good")


def test_cli_fit_on_ray_saves_a_model_that_predicts(local_ray, dataset, tmp_path, capsys):
    target = tmp_path / "model"
    train = str(dataset / "train" / "good")
    assert main(["fit", train, "-o", str(target), *FAST_OPTIONS, "--ray"]) == 0
    assert "12 normal images" in capsys.readouterr().out
    prediction = Detector.load(target).predict(next((dataset / "test").rglob("*.png")))
    assert np.isfinite(prediction.score)


def test_zero_shot_on_ray_equals_the_single_machine_split(local_ray, inputs, tmp_path):
    def detector() -> Detector:
        scorer = MutualScorer(max_peers=4, precision="float32")
        return Detector(
            backbone="efficientnet_lite0", image_size=64, method="mutual", scorer=scorer
        )

    local = detector().zero_shot(inputs)
    out = tmp_path / "out"
    summary = distributed.zero_shot(detector(), inputs, out, part_images=3, progress=False)
    assert (summary.scored, summary.unreadable) == (len(inputs) - 1, 1)
    rows = {row["name"]: row for row in _rows(out)}
    for source, outcome in zip(inputs, local, strict=True):
        row = rows[str(source)]
        if isinstance(outcome, ImageLoadError):
            assert row["score"] is None and row["error"]
        else:
            assert_close(row["score"], outcome.score)
    with pytest.raises(ValueError, match="already holds results"):
        distributed.zero_shot(detector(), inputs, out, progress=False)
