"""Boundary bias of the shipped model: mean signed surface distance (mm) per bone on a fine scan.

A synthetic proton-density-like scan is made from the bundled label map at its own fine grid
(0.36 x 0.36 mm in-plane, 0.7 mm slices): one intensity per tissue, a dark cortical rim (bone within
1 mm of its surface: the signal void of cortical bone in every MR contrast; without it a bone shaft
is a uniform blob no real scan shows, and the model left the tibial shaft's lower part out),
0.4 mm Gaussian blur (partial volume) and Rician-like noise. It is segmented through the library
(``segment_volume``) by the shipped default package three ways: as shipped, with decision offsets
0, and with offsets 0 and no opening step. A first row per knee takes the network out: the truth's
one-hot maps go through the members' working grids and the fusion (what geometry alone costs a
boundary). Two more rows on the training knee change what surrounds the bones: brighter
surroundings (0.6 instead of 0.3) against the dark cortex, and no dark cortex at all (the model's
bias depends on this contrast, which no step after the network does). For each bone the signed
distance (mm, negative inside the true bone) of every predicted boundary voxel's surface to the true surface is taken (both surfaces half a voxel
outside their boundary voxels, so a perfect segmentation reads 0): mean, median and the share
beyond 2 mm inside (a missing part rather than a shifted boundary). Negative means small.

With ``--bank BANK`` (``python3 -m KneeSegLogic.training.anatomy BANK``) the same is measured on
fine scans of the bank's held-out knees (never trained on), each on its own grid; ``--model``
names other packages to measure beside the shipped one (each as it is, offsets and opening
included).
Run: ``nice -n 10 python3 benchmarks/boundary_bias.py [--bank BANK] [--model PACKAGE ...]``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from KneeSegLogic.io.outputs import Progress, Results
from KneeSegLogic.io.scans import read_volume
from KneeSegLogic.io.volume import Volume, resample_to_grid
from KneeSegLogic.pipeline.segment import segment_volume
from KneeSegLogic.resources import BUNDLED_MODELS_DIR, SAMPLE_DATA
from KneeSegLogic.segmentation.inference import fuse_and_decide, member_spacing, working_grid
from KneeSegLogic.segmentation.package import ModelPackage, load_package
from KneeSegLogic.tissues import TISSUES, tissue
from KneeSegLogic.training.anatomy import HELDOUT_FOLDER

BONES = ("femur", "tibia", "patella")

#: Relative intensities of a fat-suppressed-free PD-like contrast, by tissue group.
INTENSITY = {"bone": 0.55, "cartilage": 0.75, "meniscus": 0.12}

#: Cortical bone: a rim this thick (mm) inside every bone, at this intensity (signal void).
CORTEX_MM, CORTEX = 1.0, 0.08


#: Intensity of everything unlabelled around the knee (muscle, fat, fluid alike).
BACKGROUND = 0.3

#: Other surroundings of the bones for the contrast rows: (what is varied, background, cortex).
SURROUNDINGS = (
    ("surroundings brighter (0.6)", 0.6, CORTEX),
    ("no dark cortex", BACKGROUND, INTENSITY["bone"]),
)


def fine_scan(labels: Volume, seed: int = 0, background: float = BACKGROUND, cortex: float = CORTEX) -> Volume:
    """Synthetic image on the label map's own grid (``background`` around per-group intensities,
    bones' outer :data:`CORTEX_MM` at ``cortex``)."""
    lookup = np.full(int(labels.array.max()) + 1, background, np.float32)
    for value in range(1, len(lookup)):
        lookup[value] = INTENSITY[tissue(value).group]
    image = lookup[labels.array]
    spacing = np.asarray(labels.spacing_kji)
    bone = np.isin(labels.array, [t.label for t in TISSUES if t.group == "bone"])
    image[bone & (ndimage.distance_transform_edt(bone, sampling=spacing) <= CORTEX_MM)] = cortex
    sigma = 0.4 / spacing
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

    On thick-slice grids (an axis more than twice the finest spacing) the boundary is measured in
    each slice's plane: across 4 mm slices a bone's end slice is 4 mm from the next one, which says
    nothing about where the model put the boundary.
    """
    step = spacing.min()
    thick = [axis for axis, s in enumerate(spacing) if s > 2 * step]
    if not thick:
        inside = ndimage.distance_transform_edt(truth, sampling=spacing)
        outside = ndimage.distance_transform_edt(~truth, sampling=spacing)
        structure = ndimage.generate_binary_structure(3, 1)
    else:
        axis = thick[0]
        plane = [s for a, s in enumerate(spacing) if a != axis]
        inside, outside = np.zeros(truth.shape), np.zeros(truth.shape)
        for n in range(truth.shape[axis]):
            cut = tuple(n if a == axis else slice(None) for a in range(3))
            layer = truth[cut]
            inside[cut] = ndimage.distance_transform_edt(layer, sampling=plane) if layer.any() else 0
            outside[cut] = ndimage.distance_transform_edt(~layer, sampling=plane) if layer.any() else np.inf
        structure = ndimage.generate_binary_structure(3, 1)
        structure[tuple(1 if a != axis else slice(None) for a in range(3))] = [False, True, False]
    signed = np.where(truth, step - inside, outside)
    # Cut faces where a bone leaves the scan (femoral and tibial shafts) are not surface: left out.
    boundary = predicted & ~ndimage.binary_erosion(predicted, structure, border_value=1)
    values = signed[boundary]
    return values[np.isfinite(values)]


def crop_to_knee(volume: Volume, margin: int = 8) -> Volume:
    box = tuple(slice(max(int(a.min()) - margin, 0), int(a.max()) + margin + 1) for a in np.nonzero(volume.array))
    origin = np.asarray(volume.origin) + volume.direction @ (
        np.array([b.start for b in box[::-1]]) * np.asarray(volume.spacing)
    )
    return Volume(volume.array[box], volume.spacing, tuple(origin), volume.direction)


def through_working_grids(package: ModelPackage, labels: Volume) -> Volume:
    """The truth through the geometry alone: each label's one-hot map sampled linearly onto every
    member's working grid (as inference samples a scan) and the members fused back onto the scan's
    grid, no network. What the working spacing, resampling and fusion cost a boundary."""
    members = []
    values = np.arange(len(package.tissue_labels))
    for member in package.members:
        grid = working_grid(labels, member_spacing(member, labels))
        channels = [
            resample_to_grid(
                labels.with_array((labels.array == value).astype(np.float32)), grid, interpolation="linear"
            )
            for value in values
        ]
        members.append((grid.with_array(np.stack([c.array for c in channels], -1)), member.weight))
    return labels.with_array(fuse_and_decide(members, labels).channel_index)


def segmented(package: ModelPackage, scan: Volume) -> Volume:
    """The label map ``segment`` makes of ``scan`` with ``package`` (on the CPU)."""
    predicted, _, _ = segment_volume(scan, package, torch.device("cpu"), Results("segment"), Progress(stream=None))
    return predicted


def bias_row(name: str, predicted: Volume, labels: Volume) -> str:
    """One table row: per bone of the truth, mean / median / share beyond 2 mm inside."""
    spacing = np.asarray(labels.spacing_kji)
    cells = []
    for bone in BONES:
        truth = labels.array == tissue(bone).label
        if not truth.any():
            cells.append("-")
            continue
        d = signed_surface_distances(predicted.array == tissue(bone).label, truth, spacing)
        cells.append(f"{d.mean():+.2f} / {np.median(d):+.2f} / {np.mean(d < -2):.3f}" if d.size else "none predicted")
    return f"{name:40s}" + "".join(f"{c:>24s}" for c in cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bank", type=Path, help="anatomy bank folder: also its held-out knees")
    parser.add_argument("--model", type=Path, action="append", default=[], help="another package folder")
    args = parser.parse_args()
    torch.set_num_threads(2)
    labels = crop_to_knee(read_volume(SAMPLE_DATA / "knee_labels.nrrd"))
    labels = labels.with_array(labels.array.astype(np.uint8))
    shipped = load_package(BUNDLED_MODELS_DIR / "kneeseg-knee-2p5d")
    no_offsets = dataclasses.replace(shipped, decision_offsets=[0.0] * len(shipped.decision_offsets))
    no_opening = dataclasses.replace(
        no_offsets, postprocessing=[s for s in shipped.postprocessing if s["name"] != "opening"]
    )
    others = [(f"{path.name} {load_package(path).version}", load_package(path)) for path in args.model]
    knees = [("training knee", labels)]
    if args.bank is not None:
        for path in sorted((args.bank / HELDOUT_FOLDER).glob("*.nrrd")):
            held = crop_to_knee(read_volume(path))
            knees.append((f"held-out {path.stem}", held.with_array(held.array.astype(np.uint8))))
    print(
        f"{'knee: variant':40s}"
        + "".join(f"{b:>24s}" for b in BONES)
        + "   (signed surface distance mm: mean / median / share of voxels beyond 2 mm inside)"
    )
    for knee, truth in knees:
        scan = fine_scan(truth)
        spacing = np.round(np.asarray(truth.spacing_kji), 3).tolist()
        print(f"{knee}: scan {scan.array.shape} voxels, spacing (k, j, i) {spacing} mm")
        print(bias_row(f"{knee}: geometry only (no network)", through_working_grids(shipped, truth), truth), flush=True)
        variants = [(f"{shipped.version} as shipped", shipped)]
        if knee == "training knee":
            variants += [("offsets 0", no_offsets), ("offsets 0, no opening", no_opening)]
        for name, package in variants + others:
            print(bias_row(f"{knee}: {name}", segmented(package, scan), truth), flush=True)
        if knee == "training knee":
            for name, background, cortex in SURROUNDINGS:
                other = fine_scan(truth, background=background, cortex=cortex)
                for label, package in [(shipped.version, shipped), *others]:
                    print(bias_row(f"{knee}: {label}, {name}", segmented(package, other), truth), flush=True)


if __name__ == "__main__":
    main()
