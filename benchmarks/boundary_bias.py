"""Boundary bias of the shipped model: mean signed surface distance (mm) per bone on a fine scan.

A synthetic proton-density-like scan is made from the bundled label map at its own fine grid
(0.36 x 0.36 mm in-plane, 0.7 mm slices): one intensity per tissue, 0.4 mm Gaussian blur (partial
volume) and Rician-like noise. It is segmented through the library (``segment_volume``) by the
shipped default package three ways: as shipped, with decision offsets 0, and with offsets 0 and no
opening step. For each bone the signed distance (mm, negative inside the true bone) of every
predicted boundary voxel to the true boundary is averaged: a negative mean means the bone comes
out small. Run: ``nice -n 10 python3 benchmarks/boundary_bias.py``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from scipy import ndimage

from KneeSegLogic.io.outputs import Progress, Results
from KneeSegLogic.io.scans import read_volume
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.pipeline.segment import segment_volume
from KneeSegLogic.resources import BUNDLED_MODELS_DIR, SAMPLE_DATA
from KneeSegLogic.segmentation.package import ModelPackage, load_package
from KneeSegLogic.tissues import tissue

BONES = ("femur", "tibia", "patella")

#: Relative intensities of a fat-suppressed-free PD-like contrast, by tissue group.
INTENSITY = {"bone": 0.55, "cartilage": 0.75, "meniscus": 0.12}


def fine_scan(labels: Volume, seed: int = 0) -> Volume:
    """Synthetic image on the label map's own grid (background 0.3, per-group intensities)."""
    lookup = np.full(int(labels.array.max()) + 1, 0.3, np.float32)
    for value in range(1, len(lookup)):
        lookup[value] = INTENSITY[tissue(value).group]
    image = lookup[labels.array]
    sigma = 0.4 / np.asarray(labels.spacing_kji)
    image = ndimage.gaussian_filter(image, sigma)
    rng = np.random.default_rng(seed)
    noisy = np.hypot(image + rng.normal(0, 0.02, image.shape), rng.normal(0, 0.02, image.shape))
    return labels.with_array((noisy * 1000).astype(np.float32))


def signed_surface_distance(predicted: np.ndarray, truth: np.ndarray, spacing: np.ndarray) -> float:
    """Mean over the predicted boundary voxels of their signed distance to the truth (mm, < 0 inside)."""
    inside = ndimage.distance_transform_edt(truth, sampling=spacing)
    outside = ndimage.distance_transform_edt(~truth, sampling=spacing)
    signed = np.where(truth, -inside + 0.5 * spacing.min(), outside - 0.5 * spacing.min())
    # Cut faces where a bone leaves the scan (femoral and tibial shafts) are not surface: left out.
    boundary = predicted & ~ndimage.binary_erosion(predicted, border_value=1)
    return float(signed[boundary].mean()) if boundary.any() else float("nan")


def crop_to_knee(volume: Volume, margin: int = 8) -> Volume:
    box = tuple(slice(max(int(a.min()) - margin, 0), int(a.max()) + margin + 1) for a in np.nonzero(volume.array))
    origin = np.asarray(volume.origin) + volume.direction @ (
        np.array([b.start for b in box[::-1]]) * np.asarray(volume.spacing)
    )
    return Volume(volume.array[box], volume.spacing, tuple(origin), volume.direction)


def main() -> None:
    torch.set_num_threads(2)
    labels = crop_to_knee(read_volume(SAMPLE_DATA / "knee_labels.nrrd"))
    labels = labels.with_array(labels.array.astype(np.uint8))
    scan = fine_scan(labels)
    shipped = load_package(BUNDLED_MODELS_DIR / "kneeseg-knee-2p5d")
    no_offsets = dataclasses.replace(shipped, decision_offsets=[0.0] * len(shipped.decision_offsets))
    no_opening = dataclasses.replace(
        no_offsets, postprocessing=[s for s in shipped.postprocessing if s["name"] != "opening"]
    )
    spacing = np.asarray(labels.spacing_kji)
    print(f"scan {scan.array.shape} voxels, spacing (k, j, i) {np.round(spacing, 3).tolist()} mm")
    print(f"{'variant':28s}" + "".join(f"{b:>10s}" for b in BONES) + "   (mean signed surface distance, mm)")
    variants: tuple[tuple[str, ModelPackage], ...] = (
        ("as shipped", shipped),
        ("offsets 0", no_offsets),
        ("offsets 0, no opening", no_opening),
    )
    for name, package in variants:
        predicted, _, _ = segment_volume(scan, package, torch.device("cpu"), Results("segment"), Progress(stream=None))
        row = [
            signed_surface_distance(predicted.array == tissue(b).label, labels.array == tissue(b).label, spacing)
            for b in BONES
        ]
        print(f"{name:28s}" + "".join(f"{d:10.2f}" for d in row), flush=True)


if __name__ == "__main__":
    main()
