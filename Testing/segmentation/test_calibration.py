"""Decision offsets: the shifted argmax, offsets fitted to a known answer, package and pipeline use."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_segment import SAMPLE, package  # noqa: F401  (module fixture: a tiny untrained package)

from KneeSegLogic.commands.main import main
from KneeSegLogic.errors import InputError
from KneeSegLogic.io.segfile import read_segmentation
from KneeSegLogic.segmentation.calibration import (
    _CalibrationCase,
    argmax_dice,
    decide_labels,
    fit_decision_offsets,
)
from KneeSegLogic.segmentation.package import load_package
from KneeSegLogic.tissues import BY_KEY


def random_probabilities(shape: tuple[int, ...], channels: int, seed: int) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(0, 2, (channels, *shape))
    p = np.exp(logits - logits.max(0))
    return (p / p.sum(0)).astype(np.float32)


def test_decision_is_the_argmax_of_shifted_log_probabilities() -> None:
    p = random_probabilities((6, 7, 8), 4, seed=0)
    np.testing.assert_array_equal(decide_labels(p), p.argmax(0))
    np.testing.assert_array_equal(decide_labels(p, [0, 0, 0, 0]), p.argmax(0))
    offsets = np.array([0.0, -0.7, 0.4, 1.1])
    np.testing.assert_array_equal(decide_labels(p, offsets), (np.log(p) + offsets[:, None, None, None]).argmax(0))
    # A large offset makes its channel win everywhere; ties go to the lower channel like argmax.
    assert (decide_labels(p, [0, 50, 0, 0]) == 1).all()
    assert (decide_labels(np.full((3, 2, 2), 1 / 3, np.float32), [0, 0, 0]) == 0).all()
    with pytest.raises(ValueError, match="3 decision offsets for 4 channels"):
        decide_labels(p, [0, 1, 2])


def slab_scan(over_mm: float, softness: float) -> tuple[np.ndarray, np.ndarray]:
    """Two slabs along x: channel 1 predicted ``over_mm`` too wide on each side, channel 2 unbiased.

    Truth: channel 1 where |x - 20| <= 5, channel 2 where |x - 45| <= 5 (1 mm voxels). Predicted
    probabilities are logistic in the distance d from each slab's centre with half-width
    ``5.5 + over_mm`` and scale ``softness``, so a voxel joins channel c when
    d < 5.5 + over_mm + softness * b_c: the right offset is b_1 = -over_mm / softness.
    """
    x = np.arange(64, dtype=float)[:, None, None] * np.ones((1, 4, 4))
    truth = np.zeros(x.shape, np.uint8)
    truth[np.abs(x - 20) <= 5] = 1
    truth[np.abs(x - 45) <= 5] = 2
    odds1 = np.exp((5.5 + over_mm - np.abs(x - 20)) / softness)
    odds2 = np.exp((5.5 - np.abs(x - 45)) / softness)
    total = 1 + odds1 + odds2
    return np.stack([1 / total, odds1 / total, odds2 / total]).astype(np.float32), truth


def test_fitted_offsets_recover_a_known_over_segmentation() -> None:
    probabilities, truth = slab_scan(over_mm=2.0, softness=2.0)
    assert (decide_labels(probabilities) == 1).sum() == 15 * 16 and (truth == 1).sum() == 11 * 16  # 15 wide, not 11
    offsets, before, after = fit_decision_offsets([(probabilities, truth)])
    # Perfect for -1.25 < b_1 <= -0.75 (voxels at d = 5 in, d = 6 out): -1.0 is the exact answer.
    assert -1.25 < offsets[1] <= -0.75
    assert offsets[0] == 0 and offsets[2] == 0  # background fixed; the unbiased slab is left alone
    assert before == pytest.approx((2 * 11 / (11 + 15) + 1) / 2, abs=1e-6) and after == pytest.approx(1.0)
    np.testing.assert_array_equal(decide_labels(probabilities, offsets), truth)


def test_offsets_stay_zero_when_the_decision_is_already_right() -> None:
    probabilities, truth = slab_scan(over_mm=0.0, softness=1.5)
    offsets, before, after = fit_decision_offsets([(probabilities, truth)])
    np.testing.assert_array_equal(offsets, 0.0)
    assert before == after == pytest.approx(1.0)


def test_fixed_and_uncertain_voxels_give_the_dense_dice() -> None:
    # The reduced case (certain voxels counted once) must agree with deciding every voxel.
    p = random_probabilities((10, 12, 14), 5, seed=3)
    truth = np.random.default_rng(4).integers(0, 5, p.shape[1:])
    case = _CalibrationCase(p, truth, max_gap=3.0)
    assert 0 < len(case.truth) < truth.size
    for offsets in (np.zeros(5), np.array([0, 1.5, -1.5, 0.3, -0.2])):
        decision = decide_labels(p, offsets)
        dense = [2 * np.sum((decision == c) & (truth == c)) / (np.sum(decision == c) + np.sum(truth == c))
                 for c in range(1, 5)]
        np.testing.assert_allclose(case.dice(offsets.astype(np.float32)), dense, rtol=1e-12)
        if not offsets.any():  # the plain argmax the blending-weight search scores
            np.testing.assert_allclose(argmax_dice(p, truth), dense, rtol=1e-12)


def test_fit_refuses_no_scans_and_a_grid_without_zero() -> None:
    with pytest.raises(ValueError, match="at least one"):
        fit_decision_offsets([])
    with pytest.raises(ValueError, match="contain 0"):
        fit_decision_offsets([slab_scan(1.0, 1.0)], grid=np.array([-0.5, 0.5]))


def with_offsets(source: Path, destination: Path, offsets) -> Path:
    shutil.copytree(source, destination)
    manifest = destination / "model.json"
    raw = json.loads(manifest.read_text())
    raw["decision_offsets"] = offsets
    manifest.write_text(json.dumps(raw))
    return destination


def test_package_reads_validates_and_reports_offsets(tmp_path, package) -> None:  # noqa: F811
    assert load_package(package).decision_offsets == [0.0] * 11  # absent: no shift
    offsets = [0.0, -0.5] + [0.0] * 9
    assert load_package(with_offsets(package, tmp_path / "ok", offsets)).decision_offsets == offsets
    for bad in ([0.0] * 10, [0.0] * 10 + ["x"], [0.0] * 10 + [float("nan")]):
        folder = with_offsets(package, tmp_path / f"bad{len(list(tmp_path.iterdir()))}", bad)
        with pytest.raises(InputError, match="decision_offsets"):
            load_package(folder)


def test_segment_applies_the_package_offsets(tmp_path, package) -> None:  # noqa: F811
    # An offset of +40 for the femur channel outweighs any network output: every voxel the
    # networks saw is femur (outside the knee crop the background probability is exactly 1).
    femur_channel = BY_KEY["femur"].label
    offsets = [0.0] * 11
    offsets[femur_channel] = 40.0
    shifted = with_offsets(package, tmp_path / "shifted", offsets)
    scan = tmp_path / "echo.nrrd"
    from KneeSegLogic.io.scans import read_volume, write_volume

    write_volume(read_volume(SAMPLE).echo(1), scan)
    out = tmp_path / "out"
    assert main(["segment", str(scan), "-o", str(out), "--model", str(shifted), "--no-surfaces"]) == 0
    labels, segments = read_segmentation(out / "segmentation.seg.nrrd")
    assert [s.name for s in segments] == ["Femur"]
    assert set(np.unique(labels.array)) == {0, BY_KEY["femur"].label}
    assert (labels.array == BY_KEY["femur"].label).mean() > 0.5
    assert json.loads((out / "results.json").read_text())["model"]["decision_offsets"] == offsets


def test_structures_the_reference_does_not_label_are_not_scored():
    # Channel 2 is predicted everywhere in the right half but the reference labels no channel 2
    # (a knee labelled for bones only): it is not a miss, its Dice is not counted at all.
    from KneeSegLogic.segmentation.calibration import _CalibrationCase

    truth = np.zeros((4, 4), np.int64)
    truth[:, :2] = 1
    probabilities = np.zeros((3, 4, 4), np.float32)
    probabilities[1, :, :2] = 1.0
    probabilities[2, :, 2:] = 1.0
    dice = _CalibrationCase(probabilities, truth, max_gap=2.0).dice(np.zeros(3, np.float32))
    assert dice[0] == 1.0 and np.isnan(dice[1])
    plain = argmax_dice(probabilities, truth)
    assert plain[0] == 1.0 and np.isnan(plain[1])
