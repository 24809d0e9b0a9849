"""Inference mechanics with networks whose answer is known: geometry, ensembles, 3D, OOM, cancel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from KneeSegLogic.errors import CancelledError
from KneeSegLogic.io.outputs import Progress
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.segmentation import inference
from KneeSegLogic.segmentation.networks import build_network
from KneeSegLogic.segmentation.package import save_package
from KneeSegLogic.segmentation.uncertainty import entropy, mutual_information
from KneeSegLogic.tissues import TISSUES

torch.set_num_threads(1)
CLASSES = 1 + len(TISSUES)
FEMUR = 5


class ThresholdNet(torch.nn.Module):
    """Femur where the centre channel is bright (> 0.5), background elsewhere; counts its calls."""

    def __init__(self, oom_above: int | None = None) -> None:
        super().__init__()
        self.calls = 0
        self.oom_above = oom_above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.oom_above is not None and x.shape[0] > self.oom_above:
            raise torch.OutOfMemoryError("simulated")
        centre = x[:, x.shape[1] // 2 : x.shape[1] // 2 + 1]
        logits = torch.zeros((x.shape[0], CLASSES, *x.shape[2:]))
        logits[:, FEMUR] = 20 * (centre[:, 0] - 0.5)
        return logits


def _rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def sphere_volume(direction: np.ndarray, spacing=(0.8, 0.9, 2.0), shape=(24, 64, 60), radius_mm=14.0) -> tuple[Volume, np.ndarray]:
    """A bright ball (the 'femur') in an oblique, anisotropic volume, and its true mask."""
    k, j, i = np.indices(shape)
    centre = (np.asarray(shape) - 1) / 2
    offsets_mm = np.stack([(i - centre[2]) * spacing[0], (j - centre[1]) * spacing[1], (k - centre[0]) * spacing[2]], -1)
    truth = np.linalg.norm(offsets_mm, axis=-1) <= radius_mm
    image = np.where(truth, 1000.0, 100.0).astype(np.float32)
    image += np.random.default_rng(0).normal(0, 5, shape).astype(np.float32)
    return Volume(image, spacing, (12.5, -40.0, 7.25), direction), truth


def make_package(tmp_path, members: list[dict]):
    labels = {str(n + 1): t.key for n, t in enumerate(TISSUES)}
    spec = {"id": "test", "version": "0.1", "description": "test", "license": "Apache-2.0", "labels": labels,
            "members": members, "postprocessing": []}
    states = [build_network(m["architecture"]["name"], m["architecture"]["args"]).state_dict() for m in members]
    return save_package(tmp_path / "package", spec, states)


def planar_member(name: str, pixel_mm: float, context: int = 1, plane: str = "sagittal", weight: float = 1.0) -> dict:
    return {"name": name, "weight": weight,
            "architecture": {"name": "monai.UNet", "args": {"spatial_dims": 2, "in_channels": 2 * context + 1,
                                                            "out_channels": CLASSES, "channels": [4, 8], "strides": [2]}},
            "input": {"kind": "2.5d" if context else "2d", "plane": plane, "context_slices": context,
                      "spacing_mm": [pixel_mm, pixel_mm], "slice_spacing_mm": 1.5,
                      "normalisation": {"name": "percentile", "low": 1, "high": 99}}}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def run_members(package, volume, monkeypatch, net_factory=ThresholdNet, **kwargs):
    monkeypatch.setattr(type(package), "load_member", lambda self, index, device="cpu": net_factory())
    log = inference.RunLog()
    maps = [(inference.member_probabilities(package, i, volume, torch.device("cpu"), log, **kwargs), m.weight)
            for i, m in enumerate(package.members)]
    fused, mean_entropy = inference.fuse_on_grid(maps, volume)
    return fused, mean_entropy, log


@pytest.mark.parametrize("angles", [(0, 0, 0), (20, -10, 35)])
def test_results_overlay_oblique_input(tmp_path, monkeypatch, angles):
    volume, truth = sphere_volume(_rotation(angles))
    package = make_package(tmp_path, [planar_member("fine", 0.7)])
    fused, _, _ = run_members(package, volume, monkeypatch)
    assert fused.shape == (CLASSES, *volume.array.shape)
    np.testing.assert_allclose(fused.sum(0), 1.0, atol=1e-4)
    predicted = fused.argmax(0) == FEMUR
    assert dice(predicted, truth) > 0.93


def test_ensemble_of_two_resolutions_and_planes(tmp_path, monkeypatch):
    volume, truth = sphere_volume(_rotation((5, 15, -20)))
    package = make_package(tmp_path, [planar_member("fine", 0.7), planar_member("coarse", 1.6, context=2),
                                      planar_member("coronal", 1.0, context=0, plane="coronal", weight=0.5)])
    fused, mean_entropy, _ = run_members(package, volume, monkeypatch)
    assert mean_entropy is not None and mean_entropy.shape == volume.array.shape
    assert dice(fused.argmax(0) == FEMUR, truth) > 0.93


def test_3d_sliding_window_batches_patches(tmp_path, monkeypatch):
    volume, truth = sphere_volume(np.eye(3), spacing=(1.0, 1.0, 1.0), shape=(40, 40, 40), radius_mm=10)
    member = {"name": "3d", "weight": 1.0,
              "architecture": {"name": "monai.BasicUNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": CLASSES,
                                                                   "features": [4, 4, 8, 8, 16, 4]}},
              "input": {"kind": "3d", "spacing_mm": [1.0, 1.0, 1.0], "patch_size": [24, 24, 24],
                        "normalisation": {"name": "percentile", "low": 1, "high": 99}}}
    package = make_package(tmp_path, [member])
    nets = []

    def factory():
        nets.append(ThresholdNet())
        return nets[-1]

    fused, _, _ = run_members(package, volume, monkeypatch, net_factory=factory)
    assert dice(fused.argmax(0) == FEMUR, truth) > 0.95
    # 4 patches per batch: the network is called once per batch, not once per patch.
    patches = 3**3  # 40 voxels (cropped knee box <= 40) with 24-voxel patches at 50 % overlap
    assert nets[0].calls <= int(np.ceil(patches / 4))


def test_out_of_memory_halves_the_batch_then_succeeds(tmp_path, monkeypatch):
    volume, truth = sphere_volume(np.eye(3))
    package = make_package(tmp_path, [planar_member("fine", 0.9)])
    fused, _, log = run_members(package, volume, monkeypatch, net_factory=lambda: ThresholdNet(oom_above=2), batch_size=8)
    assert log.events[:2] == ["out of memory on cpu with batch 8; retrying with 4",
                              "out of memory on cpu with batch 4; retrying with 2"]
    assert dice(fused.argmax(0) == FEMUR, truth) > 0.93


def test_cancel_stops_inference(tmp_path, monkeypatch):
    volume, _ = sphere_volume(np.eye(3))
    package = make_package(tmp_path, [planar_member("fine", 0.9)])
    reports = []
    progress = Progress(stream=None, cancel=lambda: len(reports) > 2)
    monkeypatch.setattr(type(package), "load_member", lambda self, index, device="cpu": ThresholdNet())

    def counting(stage, fraction, message=""):
        reports.append(stage)
        progress(stage, fraction, message)

    with pytest.raises(CancelledError):
        inference.member_probabilities(package, 0, volume, torch.device("cpu"), inference.RunLog(), batch_size=2,
                                       progress=counting)


def test_entropy_is_zero_for_one_hot_and_one_for_uniform():
    one_hot = np.zeros((CLASSES, 3, 3, 3), np.float32)
    one_hot[4] = 1
    uniform = np.full((CLASSES, 3, 3, 3), 1 / CLASSES, np.float32)
    np.testing.assert_allclose(entropy(one_hot), 0.0, atol=1e-6)
    np.testing.assert_allclose(entropy(uniform), 1.0, atol=1e-5)


def test_fused_map_is_the_weighted_mean_of_members():
    rng = np.random.default_rng(1)
    reference = Volume(np.zeros((5, 6, 7), np.float32), (1.0, 1.0, 1.0))
    members = []
    for weight in (1.0, 3.0):
        p = rng.random((5, 6, 7, CLASSES)).astype(np.float32)
        p /= p.sum(-1, keepdims=True)
        members.append((Volume(p, (1.0, 1.0, 1.0)), weight))
    fused, mean_entropy = inference.fuse_on_grid(members, reference)
    expected = (0.25 * members[0][0].array + 0.75 * members[1][0].array)
    np.testing.assert_allclose(fused, np.moveaxis(expected, -1, 0), atol=1e-5)
    # Mutual information is >= 0 and 0 where members agree.
    assert np.all(mutual_information(entropy(fused), mean_entropy) >= 0)
    same, same_entropy = inference.fuse_on_grid([members[0], members[0]], reference)
    np.testing.assert_allclose(mutual_information(entropy(same), same_entropy), 0.0, atol=1e-5)


def test_slices_are_padded_to_the_network_multiple_by_repeating_their_edges():
    # A bone reaching the lower edge of the field of view must run on into the padding, as in
    # training boxes, not end in a band of zeros.
    from KneeSegLogic.segmentation.inference import _pad_to_multiple

    image = torch.arange(3 * 18 * 20, dtype=torch.float32).reshape(3, 18, 20)
    padded, (h, w) = _pad_to_multiple(image, 16)
    assert padded.shape == (3, 32, 32) and (h, w) == (18, 20)
    assert torch.equal(padded[:, :18, :20], image)
    assert torch.equal(padded[:, 18:, :20], image[:, 17:18, :].expand(3, 14, 20))
    assert torch.equal(padded[:, :18, 20:], image[:, :, 19:20].expand(3, 18, 12))
    assert torch.equal(padded[:, 18:, 20:], image[:, 17:18, 19:20].expand(3, 14, 12))
    same, _ = _pad_to_multiple(image[:, :16, :16], 16)
    assert torch.equal(same, image[:, :16, :16])
