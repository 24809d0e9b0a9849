"""Boundary bias of the shipped model: mean signed surface distance (mm) per bone on a fine scan.

A synthetic proton-density-like scan is made from the bundled label map at its own fine grid
(0.36 x 0.36 mm in-plane, 0.7 mm slices): one intensity per tissue, 0.4 mm Gaussian blur (partial
volume) and Rician-like noise. It is segmented through the library (``segment_volume``) by the
shipped default package three ways: as shipped, with decision offsets 0, and with offsets 0 and no
opening step. For each bone the signed distance (mm, negative inside the true bone) of every
predicted boundary voxel's surface to the true surface is taken (both surfaces half a voxel
outside their boundary voxels, so a perfect segmentation reads 0): mean, median and the share
beyond 2 mm inside (a missing part rather than a shifted boundary). Negative means small.
Run: ``nice -n 10 python3 benchmarks/boundary_bias.py``.
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


def signed_surface_distances(predicted: np.ndarray, truth: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Per predicted boundary voxel, how far the predicted surface lies outside the true one (mm).

    Both surfaces lie half a voxel outside their boundary voxels, so a boundary voxel inside the
    truth at distance d from the nearest outside voxel puts the predicted surface s - d outside
    the true one (0 when it is a true boundary voxel), and one outside the truth at distance d'
    from the nearest true voxel puts it d' outside (s: the smallest spacing, the in-plane step).
    """
    step = spacing.min()
    inside = ndimage.distance_transform_edt(truth, sampling=spacing)
    outside = ndimage.distance_transform_edt(~truth, sampling=spacing)
    signed = np.where(truth, step - inside, outside)
    # Cut faces where a bone leaves the scan (femoral and tibial shafts) are not surface: left out.
    boundary = predicted & ~ndimage.binary_erosion(predicted, border_value=1)
    return signed[boundary]


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
    print(
        f"{'variant':28s}"
        + "".join(f"{b:>24s}" for b in BONES)
        + "   (signed surface distance mm: mean / median / share of voxels beyond 2 mm inside)"
    )
    variants: tuple[tuple[str, ModelPackage], ...] = (
        ("as shipped", shipped),
        ("offsets 0", no_offsets),
        ("offsets 0, no opening", no_opening),
    )
    for name, package in variants:
        predicted, _, _ = segment_volume(scan, package, torch.device("cpu"), Results("segment"), Progress(stream=None))
        cells = []
        for bone in BONES:
            d = signed_surface_distances(
                predicted.array == tissue(bone).label, labels.array == tissue(bone).label, spacing
            )
            cells.append(f"{d.mean():+.2f} / {np.median(d):+.2f} / {np.mean(d < -2):.3f}")
        print(f"{name:28s}" + "".join(f"{c:>24s}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
