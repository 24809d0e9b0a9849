"""Training: time-budgeted, resumable members with validation-Dice checkpointing; training data
from label maps and real (image, label) pairs; ``kneeseg train`` end to end on a tiny ensemble."""

from __future__ import annotations

import functools
import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from KneeSegLogic.commands.main import main
from KneeSegLogic.errors import InputError, KneeSegError
from KneeSegLogic.io import outputs
from KneeSegLogic.io.scans import write_volume
from KneeSegLogic.io.segfile import write_segmentation
from KneeSegLogic.io.volume import Volume, reorient
from KneeSegLogic.segmentation.networks import build_network
from KneeSegLogic.segmentation.normalisation import (
    CANONICAL_ORIENTATION,
    normalise_intensity,
)
from KneeSegLogic.training import trainer as training
from KneeSegLogic.training.data import find_training_pairs, load_anatomies
from KneeSegLogic.training.synthesis import Anatomy
from KneeSegLogic.training.trainer import MemberRecipe, train_member

torch.set_num_threads(1)

# i, j, k axes pointing P, I, R: already the canonical frame (sagittal slices along k).
PIR_DIRECTION = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def tiny_spec(name: str = "tiny", seed: int = 0) -> MemberRecipe:
    return MemberRecipe(
        name, pixel_mm=3.0, context_slices=1, crop=32, channels=(4, 8), strides=(2,), slices_per_box=2, seed=seed
    )


def knee_like_labels() -> Volume:
    """A small joint: femur over tibia, cartilage on both, a meniscus between (1.5 mm voxels)."""
    array = np.zeros((16, 36, 36), np.uint8)  # (d, h, w) = (left-right, superior-inferior, anterior-posterior)
    array[3:13, 2:16, 8:28] = 5  # femur
    array[3:13, 16:18, 8:28] = 1  # femoral cartilage
    array[3:13, 20:22, 10:26] = 2  # tibial cartilage
    array[3:13, 22:34, 10:26] = 6  # tibia
    array[3:13, 18:20, 6:10] = 10  # meniscus
    return Volume(array, (1.5, 1.5, 1.5), (0.0, 0.0, 0.0), PIR_DIRECTION)


@pytest.fixture(scope="module")
def anatomies() -> list[Anatomy]:
    return [Anatomy.from_volume(knee_like_labels())]


def checkpoint_state(folder: Path) -> dict:
    return json.loads(torch.load(folder / "checkpoint.pt", weights_only=True)["state"])


def test_train_member_writes_checkpoints_and_resumes(anatomies: list[Anatomy], tmp_path: Path) -> None:
    spec = tiny_spec()
    best = train_member(anatomies, spec, tmp_path, time_budget_s=1.5, validate_every=3)
    folder = tmp_path / spec.name
    assert best == folder / "best.safetensors"
    for name in ("best.safetensors", "history.json", "checkpoint.pt", "spec.json"):
        assert (folder / name).is_file(), name
    first = checkpoint_state(folder)
    assert first["iteration"] >= 3 and first["elapsed_s"] >= 1.5
    history = json.loads((folder / "history.json").read_text())
    assert history == first["history"] and [h["iteration"] for h in history] == list(
        range(3, first["iteration"] + 1, 3)
    )
    # Validation-Dice checkpointing: the best score is the best validation mean seen.
    assert first["best_dice"] == pytest.approx(max(h["val_dice_mean"] for h in history), abs=1e-4)
    assert all(len(h["val_dice"]) == training.NUM_CLASSES - 1 for h in history)
    # The best weights fit the member's architecture.
    network = build_network(**spec.architecture())
    network.load_state_dict(load_file(str(best)))
    assert json.loads((folder / "spec.json").read_text())["channels"] == [4, 8]

    # Resume: the budget is the total, so a larger one continues from where the first run stopped.
    train_member(anatomies, spec, tmp_path, time_budget_s=3.0, validate_every=3)
    second = checkpoint_state(folder)
    assert second["iteration"] > first["iteration"]
    assert second["elapsed_s"] >= 3.0
    assert second["history"][: len(history)] == history  # curves kept, not restarted
    resumed = [h for h in second["history"] if h["iteration"] > first["iteration"]]
    assert resumed and min(h["elapsed_s"] for h in resumed) >= first["elapsed_s"] - 0.1

    # A spent budget trains no further.
    train_member(anatomies, spec, tmp_path, time_budget_s=second["elapsed_s"] - 0.5, validate_every=3)
    assert checkpoint_state(folder)["iteration"] == second["iteration"]

    # Each run that trained is one session: where it ran and which iterations it did.
    sessions = json.loads((folder / "sessions.json").read_text())
    assert sessions == checkpoint_state(folder)["sessions"] and len(sessions) == 2
    assert [s["first_iteration"] for s in sessions] == [1, first["iteration"] + 1]
    assert [s["iterations"] for s in sessions] == [first["iteration"], second["iteration"] - first["iteration"]]
    assert all("device cpu (no GPU used)" in s["hardware"] and s["mixed_precision"] is None for s in sessions)
    assert sessions[0]["seconds"] >= 1.5 and sessions[0]["synthesis_workers"] == 0


def test_synthesis_workers_feed_training_with_their_own_boxes(anatomies: list[Anatomy], tmp_path: Path) -> None:
    spec = replace(tiny_spec("tiny-workers", seed=5), boxes_per_batch=2)
    serial = training.training_batches(anatomies, spec, seed=7)
    parallel = training.training_batches(anatomies, spec, seed=7, workers=2)
    try:
        batches = [next(parallel) for _ in range(4)]
        reference = next(serial)
    finally:
        parallel.close()
        serial.close()
    # Two boxes of slices_per_box centre slices each, as the serial stream gives.
    for inputs, targets in batches:
        assert inputs.shape == reference[0].shape == (4, 3, 32, 32) and targets.shape == reference[1].shape
        assert targets.dtype == reference[1].dtype and set(targets.unique().tolist()) <= {0, 1, 2, 5, 6, 10}
    # Every box is a new draw: no two batches (from either worker) repeat one another.
    images = [b[0] for b in batches]
    assert all(not torch.equal(a, b) for i, a in enumerate(images) for b in images[i + 1 :])
    # The serial stream is seeded: the same boxes every time.
    again = training.training_batches(anatomies, spec, seed=7)
    assert torch.equal(next(again)[0], reference[0])
    again.close()

    train_member(anatomies, spec, tmp_path, time_budget_s=2.0, validate_every=2, workers=2)
    state = checkpoint_state(tmp_path / spec.name)
    assert state["iteration"] >= 2 and state["sessions"][0]["synthesis_workers"] == 2
    assert state["sessions"][0]["iterations"] == state["iteration"]


def other_knee_labels() -> Volume:
    """A knee shaped unlike :func:`knee_like_labels` (thinner femur, thicker cartilage, no meniscus)."""
    array = np.zeros((16, 36, 36), np.uint8)
    array[2:14, 4:14, 12:24] = 5  # femur
    array[2:14, 14:18, 12:24] = 1  # femoral cartilage
    array[2:14, 19:23, 12:26] = 2  # tibial cartilage
    array[2:14, 23:32, 12:26] = 6  # tibia
    return Volume(array, (1.5, 1.5, 1.5), (0.0, 0.0, 0.0), PIR_DIRECTION)


def test_checkpoint_is_chosen_on_heldout_knees_when_there_are_any(anatomies: list[Anatomy], tmp_path: Path) -> None:
    spec = tiny_spec("tiny-heldout", seed=3)
    heldout = [Anatomy.from_volume(other_knee_labels())]
    best = train_member(anatomies, spec, tmp_path, time_budget_s=1.5, validate_every=2, heldout=heldout)
    state = checkpoint_state(tmp_path / spec.name)
    assert state["validation"] == "heldout" and {h["validation"] for h in state["history"]} == {"heldout"}
    assert state["best_dice"] == pytest.approx(max(h["val_dice_mean"] for h in state["history"]), abs=1e-4)
    # The kept weights score best_dice on the held-out boxes, not on boxes of the training knee.
    network = build_network(**spec.architecture())
    network.load_state_dict(load_file(str(best)))
    on_heldout = float(
        np.nanmean(training.validate(network, training._validation_set(anatomies, spec, heldout=heldout)))
    )
    on_training = float(np.nanmean(training.validate(network, training._validation_set(anatomies, spec))))
    assert on_heldout == pytest.approx(state["best_dice"], abs=1e-4)
    assert on_training != pytest.approx(on_heldout, abs=1e-3)
    # Resumed without held-out knees (old behaviour), the best score restarts on the training boxes.
    train_member(anatomies, spec, tmp_path, time_budget_s=state["elapsed_s"] + 1.0, validate_every=2)
    resumed = checkpoint_state(tmp_path / spec.name)
    assert resumed["validation"] == "training" and resumed["history"][-1]["validation"] == "training"
    later = [h["val_dice_mean"] for h in resumed["history"] if h["iteration"] > state["iteration"]]
    assert resumed["best_dice"] == pytest.approx(max(later), abs=1e-4)


def test_stacks_from_box_pairs_each_centre_slice_with_its_neighbours() -> None:
    image = torch.arange(6.0)[:, None, None].expand(6, 4, 4)
    labels = torch.arange(6)[:, None, None].expand(6, 4, 4)
    inputs, targets = training.stacks_from_box(image, labels, context=2)
    assert inputs.shape == (2, 5, 4, 4) and targets.shape == (2, 4, 4)
    assert inputs[:, :, 0, 0].tolist() == [[0, 1, 2, 3, 4], [1, 2, 3, 4, 5]]
    assert targets[:, 0, 0].tolist() == [2, 3]


def test_a_coronal_member_trains_on_slices_across_the_anterior_posterior_axis_as_inference_reads_them(
    anatomies: list[Anatomy],
) -> None:
    from KneeSegLogic.segmentation.inference import PLANE_AXIS

    spec = replace(tiny_spec("tiny-coronal"), plane="coronal")
    assert spec.slice_axis == PLANE_AXIS["coronal"] == 2 and spec.input_contract()["plane"] == "coronal"
    synthesizer = training._synthesizer(anatomies, spec, seed=0)
    depth = 2 * spec.context_slices + spec.slices_per_box
    assert synthesizer.spacing.tolist() == [spec.pixel_mm, spec.pixel_mm, spec.slice_mm]
    box, box_labels = synthesizer.sample()
    assert box.shape == box_labels.shape == (spec.crop, spec.crop, depth)  # canonical (R, I, P): P across slices
    # Inference moves the plane's axis to the front (crop.movedim(axis, 0)): so do the training stacks.
    image = torch.arange(5.0)[None, None, :].expand(3, 4, 5)
    inputs, targets = training.stacks_from_box(image, image.long(), context=1, axis=2)
    assert inputs.shape == (3, 3, 3, 4) and targets.shape == (3, 3, 4)
    assert inputs[:, :, 0, 0].tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    assert targets[:, 0, 0].tolist() == [1, 2, 3]


def test_blending_weight_candidates_split_one_among_the_members() -> None:
    from KneeSegLogic.training.builder import weight_candidates

    assert weight_candidates(1) == [(1.0,)]
    assert [w[0] for w in weight_candidates(2)] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])
    three = weight_candidates(3)
    assert len(three) == 10 and all(sum(w) == pytest.approx(1.0) and min(w) > 0 for w in three)
    assert (pytest.approx(1 / 3),) * 3 in [tuple(pytest.approx(x) for x in w) for w in three]
    four = weight_candidates(4)  # eighths: 35 splits, the equal one among them
    assert len(four) == 35 and all(sum(w) == pytest.approx(1.0) and min(w) >= 1 / 8 - 1e-9 for w in four)
    assert (pytest.approx(1 / 4),) * 4 in [tuple(pytest.approx(x) for x in w) for w in four]


def test_dice_per_class_counts_hits_and_marks_absent_classes() -> None:
    prediction = torch.tensor([[0, 1, 1, 2]])
    target = torch.tensor([[0, 1, 2, 2]])
    scores = training.dice_per_class(prediction, target, 4)
    np.testing.assert_allclose(scores[:2], [2 * 1 / 3, 2 * 1 / 3])
    assert np.isnan(scores[2])


def smooth_pattern(shape: tuple[int, ...], seed: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.0).astype(np.float32)


def write_training_folder(root: Path) -> dict[str, Any]:
    """A label map at the top, and two pairs as Slicer's "save corrected case" lays them out.

    The pairs are the same anatomy on an LPS-ordered grid (axes i, j, k = L, P, S), so loading
    has to reorient image and labels together to reach the canonical frame.
    """
    labels = knee_like_labels()
    # Canonical (d, h, w) = (R, I, P): flip d and h, then put (h, w, d) on (k, j, i).
    lps = np.ascontiguousarray(np.transpose(labels.array[::-1, ::-1, :], (1, 2, 0)))
    scan_labels = Volume(lps, (1.5, 1.5, 1.5), (5.0, -3.0, 2.0))
    echoes = np.stack([smooth_pattern(scan_labels.array.shape, seed) for seed in (0, 1, 2)], -1) * 100 + 500
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    write_volume(labels, root / "knee_map.nrrd")
    write_volume(scan_labels.with_array(echoes, echo_times_ms=(10.0, 20.0, 30.0)), root / "images" / "case-1.nrrd")
    write_segmentation(scan_labels, root / "labels" / "case-1.seg.nrrd")
    single = smooth_pattern(scan_labels.array.shape, 3) * 50 + 200
    write_volume(scan_labels.with_array(single), root / "images" / "knee.v2.nii.gz")
    write_volume(scan_labels, root / "labels" / "knee.v2.nrrd")
    (root / "labels" / ".knee.v3.seg.nrrd.tmp.nrrd").write_bytes(b"partial write")  # hidden: ignored
    return {"case-1": echoes[..., 1], "knee.v2": single, "grid": scan_labels}


def canonical_normalised(array: np.ndarray, grid: Volume) -> np.ndarray:
    return normalise_intensity(reorient(grid.with_array(array.astype(np.float32)), CANONICAL_ORIENTATION).array)


def test_load_anatomies_reads_label_maps_and_pairs(tmp_path: Path) -> None:
    written = write_training_folder(tmp_path / "data")
    pairs = find_training_pairs(tmp_path / "data")
    assert [(image.name, label.name) for image, label in pairs] == [
        ("case-1.nrrd", "case-1.seg.nrrd"),
        ("knee.v2.nii.gz", "knee.v2.nrrd"),
    ]
    anatomies = load_anatomies(tmp_path / "data")
    assert [a.image is None for a in anatomies] == [True, False, False]
    reference = Anatomy.from_volume(knee_like_labels())
    for anatomy in anatomies:  # the same anatomy in every case, in the canonical frame
        torch.testing.assert_close(anatomy.labels, reference.labels)
    # The multi-echo scan gives its second echo (the echo inference reads), not the first.
    for anatomy, case in zip(anatomies[1:], ["case-1", "knee.v2"]):
        expected = canonical_normalised(written[case], written["grid"]).clip(min=0)
        np.testing.assert_allclose(anatomy.image[0, 0].numpy(), expected, atol=1e-4)
    first_echo = canonical_normalised(smooth_pattern(written["grid"].array.shape, 0), written["grid"])
    assert abs(np.corrcoef(anatomies[1].image.numpy().ravel(), first_echo.ravel())[0, 1]) < 0.5
    # Several sources mix: a label map file plus the folder.
    assert len(load_anatomies([tmp_path / "data" / "knee_map.nrrd", tmp_path / "data"])) == 4


def test_a_bank_draws_each_way_of_making_a_knee_equally_often(tmp_path: Path) -> None:
    """Three knees made from one source pair and one made otherwise: the lone knee is drawn as
    often as the three together (weights 1/2 and 1/6 each), a file the record does not know like
    an average knee; the synthesizer draws by those weights."""
    from KneeSegLogic.io.outputs import write_json
    from KneeSegLogic.training.anatomy import BANK_RECORD, composition_weights
    from KneeSegLogic.training.synthesis import Synthesizer

    labels = knee_like_labels()
    folder = tmp_path / "bank"
    folder.mkdir()
    names = ["a_host", "b_shape1", "c_shape2", "d_shape3"]
    for name in names + ["e_user"]:
        write_volume(labels, folder / f"{name}.nrrd")
    knees = [{"name": names[0], "role": "train", "sources": ["host"]}]
    knees += [{"name": n, "role": "train", "sources": ["shape", "host"]} for n in names[1:]]
    knees += [{"name": "held", "role": "heldout", "sources": ["other"]}]
    record = {"knees": knees}
    write_json(record, folder / BANK_RECORD)
    assert composition_weights(record) == pytest.approx(
        {"a_host": 0.5, "b_shape1": 1 / 6, "c_shape2": 1 / 6, "d_shape3": 1 / 6}
    )
    anatomies = load_anatomies(folder)
    assert [a.draw_weight for a in anatomies] == pytest.approx([2.5, 5 / 6, 5 / 6, 5 / 6, 1.0])
    synthesizer = Synthesizer(anatomies, (4, 8, 8), (1.0, 1.0, 1.0), seed=0)
    counts = np.bincount([synthesizer.draw() for _ in range(6000)], minlength=5) / 6000
    np.testing.assert_allclose(counts, np.array([2.5, 5 / 6, 5 / 6, 5 / 6, 1.0]) / 6, atol=0.02)


def test_load_anatomies_rejects_incomplete_or_empty_data(tmp_path: Path) -> None:
    write_training_folder(tmp_path / "data")
    (tmp_path / "data" / "labels" / "knee.v2.nrrd").unlink()
    with pytest.raises(InputError, match=r"knee\.v2.*no file of the same name in labels/"):
        load_anatomies(tmp_path / "data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no label maps"):
        load_anatomies(tmp_path / "empty")
    blank = knee_like_labels()
    write_volume(blank.with_array(np.zeros_like(blank.array)), tmp_path / "blank.nrrd")
    with pytest.raises(InputError, match="empty"):
        load_anatomies(tmp_path / "blank.nrrd")
    with pytest.raises(InputError, match="no such file"):
        load_anatomies(tmp_path / "missing.nrrd")


@pytest.fixture
def tiny_ensemble(monkeypatch: pytest.MonkeyPatch) -> tuple[MemberRecipe, ...]:
    from KneeSegLogic.training import builder

    members = (tiny_spec("tiny-a", seed=1), tiny_spec("tiny-b", seed=2))
    monkeypatch.setattr(training, "DEFAULT_MEMBERS", members)
    monkeypatch.setattr(builder, "DEFAULT_MEMBERS", members)  # it imported the name
    return members


def train_command(data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--debug",
        "train",
        str(data),
        "-o",
        str(tmp_path / "package"),
        "--workdir",
        str(tmp_path / "work"),
        "--time-budget-min",
        "0.02",
        "--threads",
        "1",
        *extra,
    ]


def test_kneeseg_train_only_member(
    tiny_ensemble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # Progress binds sys.stdout when its module is imported, before pytest's capsys: collect its
    # lines through an explicit stream instead.
    from KneeSegLogic.training import builder

    stream = io.StringIO()
    monkeypatch.setattr(builder, "Progress", functools.partial(outputs.Progress, stream=stream))
    write_training_folder(tmp_path / "data")
    assert main(train_command(tmp_path / "data", tmp_path, "--only-member", "tiny-b")) == 0
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert {"stage": "data", "progress": 0.0, "message": "1 label maps, 2 image/label pairs"} in lines
    assert lines[-1]["stage"] == "train" and "tiny-b trained" in lines[-1]["message"]
    assert (tmp_path / "work" / "tiny-b" / "best.safetensors").is_file()
    assert checkpoint_state(tmp_path / "work" / "tiny-b")["elapsed_s"] >= 1.2
    assert not (tmp_path / "work" / "tiny-a").exists()
    assert not (tmp_path / "package").exists()  # assembling waits for a run without --only-member

    assert main(train_command(tmp_path / "data", tmp_path, "--only-member", "nonesuch")) == 1
    assert "unknown member 'nonesuch'" in capsys.readouterr().err


def test_kneeseg_train_assembles_a_package(tiny_ensemble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from KneeSegLogic.segmentation.package import load_package
    from KneeSegLogic.training import builder as model_card
    from KneeSegLogic.training import heldout

    # Held-out scans small enough for a test (the real ones are 64 x 224 x 224 voxels).
    monkeypatch.setattr(heldout, "BOX_SHAPE", (12, 40, 40))
    monkeypatch.setattr(heldout, "BOX_SPACING_MM", (1.5, 1.5, 1.5))
    monkeypatch.setattr(heldout, "HELDOUT_ACQUISITIONS", heldout.HELDOUT_ACQUISITIONS[:2])
    monkeypatch.setattr(model_card, "HELDOUT_ACQUISITIONS", heldout.HELDOUT_ACQUISITIONS[:2])
    write_training_folder(tmp_path / "data")
    assert main(train_command(tmp_path / "data", tmp_path, "--only-member", "tiny-a")) == 0
    assert main(train_command(tmp_path / "data", tmp_path)) == 0  # trains tiny-b, finds tiny-a, assembles
    package = load_package(tmp_path / "package")
    assert len(package.members) == len(tiny_ensemble)
    assert package.training["command"].startswith(f"kneeseg train {tmp_path / 'data'} -o ")
    for index in range(len(package.members)):
        package.load_member(index)
    # Weights and decision offsets come from the calibration scans; accuracy from the held-out ones.
    assert len(package.decision_offsets) == 1 + len(package.labels) and package.decision_offsets[0] == 0
    calibration = package.metrics["calibration_synthetic"]
    assert calibration["mean_dice_after_offsets"] >= calibration["mean_dice_before_offsets"]
    assert sum(m.weight for m in package.members) == pytest.approx(1.0)
    heldout_metrics = package.metrics["heldout_synthetic"]
    assert set(heldout_metrics["mean_dice"]) == {"tiny-a", "tiny-b", model_card.ENSEMBLE, model_card.FINAL}
    for scores in heldout_metrics["per_case"].values():
        final = scores[model_card.FINAL]
        assert set(final["volume_ratio"]) <= set(final["dice"]) and all(0 <= d <= 1 for d in final["dice"].values())
    card = (tmp_path / "package" / "MODEL_CARD.md").read_text()
    assert "## Calibration" in card and "Predicted / true volume" in card
    # Where each member was trained: its runs, from the work folder, in the card.
    for member in package.training["members"]:
        (run,) = member["sessions"]
        # The history's last validation is at most validate_every iterations before the run's end.
        assert run["first_iteration"] == 1 and member["iterations"] <= run["iterations"] < member["iterations"] + 150
        assert f"  - trained on {run['hardware']}: iterations 1-{run['iterations']} in " in card

    # --assemble-only trains nothing more (with a budget that would): the same weights, another package.
    before = {m.name: checkpoint_state(tmp_path / "work" / m.name)["iteration"] for m in tiny_ensemble}
    command = train_command(tmp_path / "data", tmp_path, "--assemble-only", "--time-budget-min", "5")
    command[command.index("-o") + 1] = str(tmp_path / "again")
    assert main([*command, "--no-decision-offsets"]) == 0
    assert {m.name: checkpoint_state(tmp_path / "work" / m.name)["iteration"] for m in tiny_ensemble} == before
    again = load_package(tmp_path / "again")
    assert again.training["command"].endswith("--no-decision-offsets --assemble-only")
    # --no-decision-offsets: the plain argmax is shipped, and the card says why there are none.
    assert again.decision_offsets == [0.0] * len(package.decision_offsets)
    assert again.members[0].weight == package.members[0].weight  # the blend is chosen as before
    for scores in again.metrics["heldout_synthetic"]["per_case"].values():
        assert scores[model_card.FINAL] == scores[model_card.ENSEMBLE]
    assert "offsets (log units, added before the argmax): none (not fitted (kneeseg train --no-decision-offsets)" in (
        tmp_path / "again" / "MODEL_CARD.md"
    ).read_text()
    for index in range(len(package.members)):
        first, second = package.load_member(index).state_dict(), again.load_member(index).state_dict()
        assert all(torch.equal(first[k], second[k]) for k in first)
    (tmp_path / "work" / "tiny-b" / "best.safetensors").unlink()
    command[command.index("-o") + 1] = str(tmp_path / "third")
    assert main(command) == 1 and not (tmp_path / "third").exists()
    # --members: a package of the members named (tiny-b, whose weights are gone, is not one of them).
    command[command.index("-o") + 1] = str(tmp_path / "fourth")
    assert main([*command, "--members", "tiny-a"]) == 0
    fourth = load_package(tmp_path / "fourth")
    assert [m.name for m in fourth.members] == ["tiny-a"] and "--members tiny-a " in fourth.training["command"]
    assert fourth.members[0].weight == 1.0
    assert main([*command, "--members", "tiny-c"]) == 1 and not (tmp_path / "fifth").exists()


def test_train_init_from_starts_each_member_from_the_same_named_one(anatomies: list[Anatomy], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from KneeSegLogic.segmentation.package import save_package
    from KneeSegLogic.training.builder import _initial_networks, _spec

    spec = tiny_spec("tiny-a", seed=3)
    first = load_file(str(train_member(anatomies, spec, tmp_path / "first", time_budget_s=1.0, validate_every=2)))
    package = tmp_path / "package"
    save_package(package, _spec([spec], [1.0], training={}, metrics={}), [first])
    initial = _initial_networks(str(package), [spec, tiny_spec("tiny-b", seed=4)])
    assert list(initial) == ["tiny-a"]  # tiny-b has no same-named member to start from
    # Zero seconds of training from it: the best weights are exactly the package's.
    start = load_file(str(train_member(anatomies, spec, tmp_path / "second", 0.0, initial=initial["tiny-a"])))
    assert start.keys() == first.keys() and all(torch.equal(start[k], first[k]) for k in first)
    # A recipe of another name starts from the member its start_from names.
    coronal = replace(tiny_spec("tiny-coronal", seed=5), plane="coronal", start_from="tiny-a")
    started = _initial_networks(str(package), [coronal])["tiny-coronal"].state_dict()
    assert all(torch.equal(started[k], first[k]) for k in first)
    # Different architecture (wider): refused, nothing to start from.
    with pytest.raises(KneeSegError, match="no member shares a name and architecture"):
        _initial_networks(str(package), [MemberRecipe("tiny-a", pixel_mm=3.0, channels=(8, 16), strides=(2,))])


def test_heldout_repeats_add_new_scans_and_keep_the_first(
    anatomies: list[Anatomy], monkeypatch: pytest.MonkeyPatch
) -> None:
    from KneeSegLogic.training import heldout

    monkeypatch.setattr(heldout, "BOX_SHAPE", (6, 24, 24))
    monkeypatch.setattr(heldout, "HELDOUT_ACQUISITIONS", heldout.HELDOUT_ACQUISITIONS[:2])
    single = heldout.heldout_cases(anatomies)
    repeated = heldout.heldout_cases(anatomies, repeats=2)
    names = [a[0] for a in heldout.HELDOUT_ACQUISITIONS]
    assert [c.name for c in repeated] == names + [f"{n} #2" for n in names]
    for first, again in zip(single, repeated):
        np.testing.assert_array_equal(first.image.array, again.image.array)
    assert not np.array_equal(repeated[0].image.array, repeated[2].image.array)  # same acquisition, new scan
    calibration = heldout.heldout_cases(anatomies, seed=80_000)
    assert not np.array_equal(calibration[0].image.array, single[0].image.array)


def test_model_card_tables_held_out_knees_against_the_training_knee_per_structure() -> None:
    from KneeSegLogic.training import builder

    def case(dice: dict, ratio: dict) -> dict:
        scores = {"dice": dice, "volume_ratio": ratio}
        return {builder.ENSEMBLE: scores, builder.FINAL: scores}

    # The clinical knee labels bones only: its cartilage is not scored, not counted as 0.
    heldout_cases = {
        "clinical: t1": case({"femur": 0.9}, {"femur": 1.1}),
        "composed: t1": case({"femur": 0.8, "femoral_cartilage": 0.5}, {"femur": 0.9, "femoral_cartilage": 1.5}),
    }
    training_cases = {"t1": case({"femur": 0.95, "femoral_cartilage": 0.75}, {"femur": 1.0, "femoral_cartilage": 1.2})}
    assert builder._structure_means(heldout_cases, builder.FINAL) == {"femoral_cartilage": 0.5, "femur": 0.85}
    spec = {
        "id": "kneeseg-knee-2p5d",
        "version": "9.9.9",
        "description": "test",
        "license": "Apache-2.0",
        "labels": {},
        "members": [],
        "decision_offsets": [0.0],
        "training": {
            "data": "one label map",
            "command": "kneeseg train",
            "hardware": "cpu",
            "torch": "2",
            "members": [],
        },
        "metrics": {
            "heldout_synthetic": {
                "description": "held out",
                "mean_dice": {builder.ENSEMBLE: 0.7, builder.FINAL: 0.7},
                "per_case": heldout_cases,
                "dice_per_structure": builder._structure_means(heldout_cases, builder.FINAL),
                "volume_ratio_per_structure": builder._structure_means(heldout_cases, builder.FINAL, "volume_ratio"),
            },
            "training_knee_synthetic": {
                "mean_dice": {builder.ENSEMBLE: 0.85, builder.FINAL: 0.85},
                "dice_per_structure": builder._structure_means(training_cases, builder.FINAL),
                "volume_ratio_per_structure": builder._structure_means(training_cases, builder.FINAL, "volume_ratio"),
            },
        },
    }
    card = builder.model_card(spec)
    assert "| femur | 0.850 | 0.950 | 1.00 | 1.00 |" in card
    assert "| femoral_cartilage | 0.500 | 0.750 | 1.50 | 1.20 |" in card
    assert "thins or thickens each cartilage plate and meniscus" in card
