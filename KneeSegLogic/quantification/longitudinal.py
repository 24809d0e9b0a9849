"""``kneeseg t2-change``: T2 change between two time points, per region and as focal clusters.

Inputs
------
Two output folders of ``kneeseg t2`` (or of ``kneeseg segment`` on a multi-echo scan), each
holding

- ``t2.nrrd``: the T2 map in ms (required);
- the segmentation (required), the first found of: ``segmentation.seg.nrrd`` (written by
  ``kneeseg segment``), ``labels.nrrd`` (a KneeSeg label volume), or the ``--mask`` file that
  ``kneeseg t2`` recorded as input ``"mask"`` in ``results.json``, used only while its sha256 still
  matches; read with :func:`KneeSegLogic.segfile.read_labels` onto the T2 grid;
- ``results.json`` (optional): the femoral region variant used there is reused.

``regions.nrrd`` of the input folders is not read: both time points are divided anew with the
baseline's boundaries, so a region covers the same cartilage at both visits.

Method
------
1. **Rigid registration** of follow-up to baseline (SimpleITK, Euler 3D): both label maps become
   clamped signed distance maps (+-10 mm) of femur + femoral cartilage (the femoral cartilage alone
   when no femur is labelled), within 15 mm of the femoral cartilage's bounding box, on a 1 mm
   grid; mean squares between them, regular-step gradient descent over three resolution levels,
   started from the femoral cartilage centroids aligned. Driving the registration by the segmentations
   makes it independent of T2 contrast, which is what changes between visits.
2. **Resampling** of the follow-up onto the baseline grid: labels by nearest neighbour; T2 by
   normalised linear interpolation inside the cartilage (T2 x mask and mask interpolated
   separately and divided), so fluid or bone T2 never bleeds into cartilage voxels.
3. **Regions**: the baseline is divided (:func:`KneeSegLogic.regions.divide_cartilage`) and the
   registered follow-up is divided with the baseline's geometry (circle, splits, variant). Change
   per region = follow-up minus baseline (T2 mean and median, thickness).
4. **Projection difference map** (Thomas et al.): the femoral T2 projection of each time point
   (same circle, same rows) resampled to 1 mm x 1 mm pixels (rows: mm along LR, lateral to
   medial; columns: mm of arc at the circle's radius); the overlap of both, eroded by a disk of
   radius 4 pixels, is the plate; difference = **follow-up minus baseline**, so T2 increases are
   positive (the published ``calculate_lesion_area`` passes the projections in the other order and
   so stores baseline minus follow-up).
5. **Focal clusters**: pixels with a difference >= mean + 1 SD of the plate's differences,
   8-connected, kept when larger than 1 % of the plate (Thomas et al.'s FullPipeline settings:
   ``sigma_multiple=1``, ``area_fraction_threshold=0.01``, one-sided). Lesion percentage = pixels
   in kept clusters / plate pixels x 100.

Outputs (``-o OUT``): ``t2_change.csv`` (per region), ``regions.nrrd`` (baseline grid),
``followup_t2_registered.nrrd``, ``followup_labels_registered.nrrd``, ``followup_to_baseline.tfm``,
``projection_t2_{baseline,followup,difference}.nrrd/.png`` (1 mm^2 pixels; the difference PNG
outlines the clusters), ``clusters.nrrd`` (cluster labels on the difference map) and
``results.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from skimage.measure import label as connected_components
from skimage.morphology import disk

from KneeSegLogic.errors import InputError, KneeSegError
from KneeSegLogic.io.outputs import (
    FOLLOWUP_LABELS_FILE,
    FOLLOWUP_T2_FILE,
    LABELS_FILE,
    REGIONS_FILE,
    RESULTS_FILE,
    SEGMENTATION_FILE,
    T2_CHANGE_TABLE,
    T2_FILE,
    Progress,
    Results,
    output_folder,
    sha256_of,
    write_csv,
)
from KneeSegLogic.io.scans import read_volume, write_volume
from KneeSegLogic.io.segfile import read_labels
from KneeSegLogic.io.volume import Volume, resample_to_grid
from KneeSegLogic.quantification import projection
from KneeSegLogic.quantification.regions import (
    FEMORAL,
    PLATES,
    REGION_NAMES,
    divide_cartilage,
    division_thickness,
    femoral_projection_maps,
    read_region_spec,
    region_statistics,
    valid_relaxation,
)
from KneeSegLogic.tissues import tissue

SEGMENTATION_FILES = (SEGMENTATION_FILE, LABELS_FILE)

EROSION_RADIUS_PX = 4

SIGMA_MULTIPLE = 1.0

AREA_FRACTION = 0.01

DISTANCE_CLAMP_MM = 10.0

METRIC_MARGIN_MM = 15.0

WORK_SPACING_MM = 1.0

FEMUR = tissue("femur").label


@dataclass(frozen=True)
class TimePoint:
    """One visit: T2 map (ms), label map on the same grid, and the region variant used there."""

    folder: Path
    t2: Volume
    labels: Volume
    variant: str | None = None
    segmentation: Path | None = None


def read_time_point(folder: str | Path) -> TimePoint:
    """Read the files ``t2-change`` needs from a ``kneeseg t2`` output folder (module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "is not an output folder of `kneeseg t2`")
    if not (folder / T2_FILE).is_file():
        raise InputError(folder, f"holds no {T2_FILE}; give an output folder of `kneeseg t2`")
    segmentation = next((folder / name for name in SEGMENTATION_FILES if (folder / name).is_file()), None)
    if segmentation is None:
        segmentation = _recorded_mask(folder / RESULTS_FILE)
    if segmentation is None:
        raise InputError(
            folder,
            f"holds no segmentation ({' or '.join(SEGMENTATION_FILES)}) and records no unchanged --mask input; "
            "run `kneeseg t2` with --mask",
        )
    t2 = read_volume(folder / T2_FILE)
    if t2.array.ndim != 3:
        raise InputError(folder / T2_FILE, "is not a 3D T2 map")
    labels = read_labels(segmentation, reference=t2)
    if not np.any(labels.array == FEMORAL):
        raise InputError(segmentation, "holds no femoral cartilage (label 1)")
    t2 = t2.with_array(t2.array.astype(np.float32))
    return TimePoint(folder, t2, labels, _variant_used(folder / RESULTS_FILE), segmentation)


def _recorded_mask(path: Path) -> Path | None:
    """The ``mask`` input recorded in a results.json, if the file is still there unchanged."""
    try:
        inputs = json.loads(path.read_text()).get("inputs", [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    for item in inputs:
        if isinstance(item, dict) and item.get("role") == "mask":
            mask = Path(item.get("path", ""))
            if mask.is_file() and sha256_of(mask) == item.get("sha256"):
                return mask
    return None


def _variant_used(path: Path) -> str | None:
    """The region variant recorded anywhere in a results.json (the analyse_cartilage section)."""
    if not path.is_file():
        return None
    try:
        stack = [json.loads(path.read_text())]
    except (OSError, json.JSONDecodeError):
        return None
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("variant"), str) and "geometry" in item:
                return item["variant"]
            stack.extend(item.values())
    return None


def _distance_image(labels: Volume, structures: tuple[int, ...]) -> sitk.Image:
    """Clamped signed distance (mm, negative inside) to ``structures`` around the femoral
    cartilage: the label map cropped to the cartilage's bounding box plus a margin, the distance
    computed on that native grid, then sampled on a 1 mm grid (registration cost follows the
    joint's size, not the field of view)."""
    inside = np.nonzero(labels.array == FEMORAL)
    spacing = np.asarray(labels.spacing_kji)
    margin = np.ceil(METRIC_MARGIN_MM / spacing).astype(int)
    lower = np.maximum([axis.min() for axis in inside] - margin, 0)
    upper = np.minimum([axis.max() + 1 for axis in inside] + margin, labels.array.shape)
    box = tuple(slice(lo, hi) for lo, hi in zip(lower, upper))
    region = labels.region(box)
    mask = region.with_array(np.isin(region.array, structures).astype(np.uint8))
    distance = sitk.SignedMaurerDistanceMap(
        mask.to_sitk(), insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    distance = sitk.Clamp(distance, sitk.sitkFloat32, -DISTANCE_CLAMP_MM, DISTANCE_CLAMP_MM)
    extent = (upper - lower)[::-1] * np.asarray(labels.spacing)  # (x, y, z) mm
    grid = sitk.Image([int(n) for n in np.maximum(np.ceil(extent / WORK_SPACING_MM), 1)], sitk.sitkFloat32)
    grid.SetSpacing([WORK_SPACING_MM] * 3)
    # Same outer corner as the crop: shift by half the change of voxel size.
    corner_shift = (WORK_SPACING_MM - np.asarray(labels.spacing)) / 2
    grid.SetOrigin(tuple(np.asarray(region.origin) + labels.direction @ corner_shift))
    grid.SetDirection(tuple(labels.direction.ravel()))
    return sitk.Resample(distance, grid, sitk.Transform(), sitk.sitkLinear, DISTANCE_CLAMP_MM, sitk.sitkFloat32)


def _centroid_lps(labels: Volume, value: int) -> np.ndarray:
    k, j, i = np.nonzero(labels.array == value)
    index = np.array([i.mean(), j.mean(), k.mean()])
    return np.asarray(labels.origin) + labels.direction @ (np.asarray(labels.spacing) * index)


def register_followup(baseline: TimePoint, followup: TimePoint) -> tuple[sitk.Transform, dict[str, Any]]:
    """Rigid transform mapping baseline points to follow-up points (see the module docstring).

    Returns the transform (for ``sitk.Resample`` of the follow-up onto the baseline grid) and a
    summary (metric value, iterations, rotation in degrees, translation in mm).
    """
    structures = (
        (FEMORAL, FEMUR)
        if np.any(baseline.labels.array == FEMUR) and np.any(followup.labels.array == FEMUR)
        else (FEMORAL,)
    )
    fixed = _distance_image(baseline.labels, structures)
    moving = _distance_image(followup.labels, structures)
    # Start from the femoral cartilage centroids aligned, rotating about the baseline's.
    centre = _centroid_lps(baseline.labels, FEMORAL)
    initial = sitk.Euler3DTransform()
    initial.SetCenter(tuple(centre))
    initial.SetTranslation(tuple(_centroid_lps(followup.labels, FEMORAL) - centre))
    registration = sitk.ImageRegistrationMethod()
    registration.SetMetricAsMeanSquares()
    registration.SetMetricSamplingStrategy(registration.RANDOM)
    registration.SetMetricSamplingPercentage(0.03, seed=1)
    registration.SetInterpolator(sitk.sitkLinear)
    registration.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-4, numberOfIterations=200, relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8
    )
    registration.SetOptimizerScalesFromPhysicalShift()
    registration.SetShrinkFactorsPerLevel([4, 2, 1])
    registration.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    registration.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    registration.SetInitialTransform(initial, inPlace=False)
    transform = registration.Execute(fixed, moving)
    euler = sitk.Euler3DTransform(sitk.CompositeTransform(transform).GetNthTransform(0))
    summary = {
        "structures": [tissue(v).key for v in structures],
        "metric_mean_squares_mm2": float(registration.GetMetricValue()),
        "iterations_last_level": int(registration.GetOptimizerIteration()),
        "stop_condition": registration.GetOptimizerStopConditionDescription(),
        "rotation_deg": [float(np.degrees(a)) for a in (euler.GetAngleX(), euler.GetAngleY(), euler.GetAngleZ())],
        "translation_mm": [float(t) for t in euler.GetTranslation()],
        "center_mm": [float(c) for c in euler.GetCenter()],
    }
    return euler, summary


def _resample(
    array: np.ndarray, source: Volume, reference: Volume, transform: sitk.Transform, interpolator: int
) -> np.ndarray:
    image = source.with_array(array).to_sitk()
    grid = sitk.Image([int(s) for s in reference.size], sitk.sitkUInt8)
    grid.SetSpacing(reference.spacing)
    grid.SetOrigin(reference.origin)
    grid.SetDirection(tuple(reference.direction.ravel()))
    return sitk.GetArrayFromImage(sitk.Resample(image, grid, transform, interpolator, 0.0, image.GetPixelID()))


def resample_followup(followup: TimePoint, reference: Volume, transform: sitk.Transform) -> TimePoint:
    """The follow-up on the baseline grid: labels nearest neighbour, T2 normalised-linear in cartilage."""
    labels = _resample(followup.labels.array, followup.labels, reference, transform, sitk.sitkNearestNeighbor)
    t2 = followup.t2.array
    valid = (np.isin(followup.labels.array, PLATES) & valid_relaxation(t2)).astype(np.float32)
    weighted = _resample(
        np.where(valid > 0, t2, 0).astype(np.float32), followup.t2, reference, transform, sitk.sitkLinear
    )
    weight = _resample(valid, followup.t2, reference, transform, sitk.sitkLinear)
    # Cartilage voxels with little valid T2 around them (a fit failed there) stay invalid (0).
    t2_registered = np.divide(weighted, weight, out=np.zeros_like(weighted), where=weight > 0.25)
    return TimePoint(
        followup.folder,
        reference.with_array(t2_registered),
        reference.with_array(labels.astype(np.uint8)),
        followup.variant,
        followup.segmentation,
    )


@dataclass(frozen=True)
class Cluster:
    """A focal cluster of T2 increase on the 1 mm^2 difference map."""

    label: int
    area_mm2: float
    mean_change_ms: float
    max_change_ms: float
    centroid_lr_mm: float
    centroid_arc_mm: float
    centroid_angle_deg: float

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class FocalChange:
    """Difference map (1 mm^2 pixels), the plate it is defined on, and its clusters."""

    baseline: np.ndarray
    followup: np.ndarray
    difference: np.ndarray
    plate: np.ndarray
    cluster_labels: np.ndarray
    clusters: list[Cluster]
    threshold_ms: float
    mean_ms: float
    sd_ms: float

    @property
    def lesion_percent(self) -> float:
        plate = int(self.plate.sum())
        return 100.0 * float(np.sum(self.cluster_labels > 0)) / plate if plate else 0.0


def focal_change(
    grid: projection.ProjectionGrid,
    baseline_map: tuple[np.ndarray, np.ndarray],
    followup_map: tuple[np.ndarray, np.ndarray],
    sigma_multiple: float = SIGMA_MULTIPLE,
    area_fraction: float = AREA_FRACTION,
    erosion_radius_px: int = EROSION_RADIUS_PX,
) -> FocalChange:
    """Follow-up minus baseline on 1 mm^2 pixels and its focal clusters (module docstring, 4-5).

    ``baseline_map`` and ``followup_map`` are (mean T2, voxel count) projection maps on ``grid``.
    """
    base, base_covered = projection.to_square_mm(grid, baseline_map[0], baseline_map[1] > 0)
    follow, follow_covered = projection.to_square_mm(grid, followup_map[0], followup_map[1] > 0)
    plate = ndimage.binary_erosion(base_covered & follow_covered, structure=disk(erosion_radius_px))
    difference = np.where(plate, follow - base, 0.0)
    if not plate.any():
        empty = np.zeros(plate.shape, np.int32)
        return FocalChange(base, follow, difference, plate, empty, [], float("nan"), float("nan"), float("nan"))
    values = difference[plate]
    mean, sd = float(values.mean()), float(values.std())
    threshold = mean + sigma_multiple * sd
    candidates = connected_components(plate & (difference >= threshold), connectivity=2)
    areas = np.bincount(candidates.ravel())
    min_area = area_fraction * plate.sum()
    cluster_labels = np.zeros(plate.shape, np.int32)
    clusters: list[Cluster] = []
    # Pixel size after resampling: 1 mm up to the rounding of the map's extent.
    pixel_lr_mm = grid.n_rows * grid.row_spacing_mm / plate.shape[0]
    pixel_arc_mm = projection.N_ANGLE_BINS * grid.column_width_mm / plate.shape[1]
    for candidate in np.flatnonzero(areas[1:] > min_area) + 1:
        member = candidates == candidate
        new_label = len(clusters) + 1
        cluster_labels[member] = new_label
        rows, columns = np.nonzero(member)
        arc_mm = (columns.mean() + 0.5) * pixel_arc_mm
        clusters.append(
            Cluster(
                label=new_label,
                area_mm2=float(member.sum()),
                mean_change_ms=float(difference[member].mean()),
                max_change_ms=float(difference[member].max()),
                centroid_lr_mm=float((rows.mean() + 0.5) * pixel_lr_mm),
                centroid_arc_mm=float(arc_mm),
                centroid_angle_deg=float(projection.ANGLE_START_DEG + np.degrees(arc_mm / grid.radius_mm)),
            )
        )
    return FocalChange(base, follow, difference, plate, cluster_labels, clusters, threshold, mean, sd)


CHANGE_COLUMNS = (
    "label_value",
    "name",
    "voxels_baseline",
    "voxels_followup",
    "t2_mean_baseline_ms",
    "t2_mean_followup_ms",
    "t2_mean_change_ms",
    "t2_median_change_ms",
    "thickness_baseline_mm",
    "thickness_followup_mm",
    "thickness_change_mm",
)


def region_changes(baseline_rows: list[dict[str, Any]], followup_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per region: follow-up minus baseline of T2 mean/median and thickness (None where undefined)."""

    def change(after: float | None, before: float | None) -> float | None:
        return None if after is None or before is None else after - before

    rows = []
    for before, after in zip(baseline_rows, followup_rows):
        rows.append(
            {
                "label_value": before["label_value"],
                "name": before["name"],
                "voxels_baseline": before["voxels"],
                "voxels_followup": after["voxels"],
                "t2_mean_baseline_ms": before.get("t2_mean_ms"),
                "t2_mean_followup_ms": after.get("t2_mean_ms"),
                "t2_mean_change_ms": change(after.get("t2_mean_ms"), before.get("t2_mean_ms")),
                "t2_median_change_ms": change(after.get("t2_median_ms"), before.get("t2_median_ms")),
                "thickness_baseline_mm": before["thickness_mean_mm"],
                "thickness_followup_mm": after["thickness_mean_mm"],
                "thickness_change_mm": change(after["thickness_mean_mm"], before["thickness_mean_mm"]),
            }
        )
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    write_csv(
        path,
        CHANGE_COLUMNS,
        (
            {
                k: ("" if row[k] is None else round(row[k], 4) if isinstance(row[k], float) else row[k])
                for k in CHANGE_COLUMNS
            }
            for row in rows
        ),
    )


def t2_change(
    baseline: TimePoint,
    followup: TimePoint,
    out_dir: Path,
    results: Results,
    progress: Progress | None = None,
    regions: str | Path | None = None,
) -> dict[str, Any]:
    """Register, compare and write every ``t2-change`` output into ``out_dir``; the results section.

    ``regions`` (a region file, see :func:`KneeSegLogic.quantification.regions.read_region_spec`)
    replaces the built-in regions: a label volume is placed on the baseline grid and, the
    follow-up being registered onto that grid, covers the same cartilage at both visits; a
    ``.json`` recipe divides both visits with its angles and depth split.
    """
    recipe, user_regions = read_region_spec(regions)
    with results.stage("registration", progress):
        transform, registration = register_followup(baseline, followup)
        registered = resample_followup(followup, baseline.labels, transform)
    with results.stage("regions", progress):
        base_division = divide_cartilage(baseline.labels, recipe or baseline.variant)
        follow_division = divide_cartilage(registered.labels, geometry=base_division.geometry)
        base_thickness = division_thickness(baseline.labels, base_division)
        follow_thickness = division_thickness(registered.labels, follow_division)
        names = dict(REGION_NAMES)
        base_regions, follow_regions = base_division.regions, follow_division.regions
        if user_regions is not None:
            base_regions = resample_to_grid(user_regions, baseline.labels, is_label=True)
            base_regions = base_regions.with_array(np.rint(base_regions.array).astype(np.uint16))
            follow_regions = base_regions
            names = {int(v): f"region_{int(v)}" for v in np.unique(base_regions.array) if v != 0}
        changes = region_changes(
            region_statistics(base_regions, names, base_division, base_thickness, baseline.t2),
            region_statistics(follow_regions, names, follow_division, follow_thickness, registered.t2),
        )
    with results.stage("focal_change", progress):
        base_projection = femoral_projection_maps(baseline.labels, base_division, base_thickness, baseline.t2)
        follow_projection = femoral_projection_maps(registered.labels, follow_division, follow_thickness, registered.t2)
        if base_projection is None or follow_projection is None:
            raise KneeSegError("no femoral cartilage at one time point: the focal T2 change needs it at both")
        grid, base_maps = base_projection
        follow_maps = follow_projection[1]
        focal = focal_change(grid, base_maps["t2"], follow_maps["t2"])
    with results.stage("write", progress):
        write_volume(base_regions, out_dir / REGIONS_FILE)
        write_volume(registered.t2, out_dir / FOLLOWUP_T2_FILE)
        write_volume(registered.labels, out_dir / FOLLOWUP_LABELS_FILE)
        sitk.WriteTransform(transform, str(out_dir / "followup_to_baseline.tfm"))
        _write_csv(out_dir / T2_CHANGE_TABLE, changes)
        square: dict[str, Any] = {"row_spacing_mm": 1.0, "column_spacing": 1.0, "column_unit": "mm"}
        projection.write_projection(
            out_dir / "projection_t2_baseline",
            focal.baseline * focal.plate,
            title="Femoral T2, baseline",
            value_unit="ms",
            **square,
        )
        projection.write_projection(
            out_dir / "projection_t2_followup",
            focal.followup * focal.plate,
            title="Femoral T2, follow-up",
            value_unit="ms",
            **square,
        )
        projection.write_projection(
            out_dir / "projection_t2_difference",
            focal.difference,
            title=f"T2 change, follow-up minus baseline; clusters: {focal.lesion_percent:.1f} % of plate",
            value_unit="ms",
            diverging=True,
            outline=focal.cluster_labels > 0,
            **square,
        )
        projection.write_projection(
            out_dir / "clusters",
            focal.cluster_labels.astype(float),
            title="Focal T2-increase clusters",
            value_unit="cluster",
            **square,
        )
    femoral_dice = _dice(baseline.labels.array == FEMORAL, registered.labels.array == FEMORAL)
    if femoral_dice < 0.5:
        results.warn(
            f"femoral cartilage overlaps poorly after registration (Dice {femoral_dice:.2f}); check both segmentations"
        )
    return {
        "method": {
            "difference": "follow-up minus baseline (T2 increases positive)",
            "registration": "rigid, follow-up to baseline, on signed distance maps of femur + femoral cartilage",
            "projection_pixel_mm2": 1.0,
            "plate_erosion_radius_px": EROSION_RADIUS_PX,
            "cluster_threshold": f"mean + {SIGMA_MULTIPLE:g} SD of the plate's differences, one-sided (increases)",
            "cluster_min_area": f"> {100 * AREA_FRACTION:g} % of the plate",
            "connectivity": 8,
        },
        "variant": base_division.geometry.variant,
        "user_regions": user_regions is not None,
        "geometry": base_division.geometry.to_json(),
        "registration": {**registration, "femoral_cartilage_dice_after": femoral_dice},
        "regions": changes,
        "plate_area_mm2": float(focal.plate.sum()),
        "difference_mean_ms": focal.mean_ms,
        "difference_sd_ms": focal.sd_ms,
        "cluster_threshold_ms": focal.threshold_ms,
        "clusters": [c.to_json() for c in focal.clusters],
        "lesion_percent": focal.lesion_percent,
    }


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / total if total else 1.0


def t2_change_folders(
    baseline: str | Path,
    followup: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    regions: str | Path | None = None,
) -> Results:
    """``kneeseg t2-change``: compare two ``t2``/``segment`` output folders into ``out`` (atomic).

    ``regions``: a region file replacing the built-in regions (see :func:`t2_change`).
    """
    progress = progress or Progress()
    results = Results("t2-change")
    base = read_time_point(baseline)
    follow = read_time_point(followup)
    for role, time_point in (("baseline", base), ("followup", follow)):
        results.add_input(f"{role}_t2", time_point.folder / T2_FILE)
        if time_point.segmentation is not None:
            results.add_input(f"{role}_segmentation", time_point.segmentation)
    with output_folder(out, results, overwrite) as folder:
        if regions is not None:
            results.add_input("regions", regions)
        results["t2_change"] = t2_change(base, follow, folder, results, progress, regions)
    return results
