"""Cartilage subregions, their thickness and T2 statistics, and unrolled projection maps.

Femoral cartilage: 12 subregions
--------------------------------
(medial/lateral x anterior/central/posterior x deep/superficial), in the knee's anatomical frame
(:mod:`KneeSegLogic.knee_frame`), in millimetres:

1. **Circle.** A circle is fitted (geometric least squares, ``|p - c| - mean|p - c|``, started at
   the centroid) to the cartilage's sagittal projection: every (inferior, posterior) position
   holding cartilage in any slice, counted once, as DOSMA and Thomas et al. fit it to the
   maximum-intensity projection. One circle per knee: the condyles as a cylinder along LR.
2. **Angle** of a voxel about the circle centre in the sagittal plane, in degrees from inferior,
   positive posterior, in [-180, 180) (the seam is superior, where there is no cartilage).
3. **Anterior / central / posterior** by angle: anterior ``theta < a``, central ``a <= theta < b``,
   posterior ``theta >= b``, with ``(a, b)`` set by the variant.
4. **Deep / superficial**: within each (slice, 5 degree bin) the voxels with radius
   ``rho <= rho_min + 0.5 (rho_max - rho_min)`` are deep (nearer the bone), the rest superficial.
   DOSMA counts voxels exactly at the threshold in both; here they are deep, so the 12 regions
   partition the cartilage.
5. **Medial / lateral** by position along LR, on the side given by the knee frame (the knee's
   side comes from its anatomy, not from slice order).

Variants (``variant=``):

- ``"dosma"`` (the default): DOSMA's ``split_regions``. Central arc 30 degrees centred on
  inferior, ``[-15, 15)``; medial/lateral split at the cartilage's centre of mass along LR.
- ``"thomas"``: Thomas et al. 2021 (``projection.py``). Central arc 60 degrees, ``[-35, 25)``,
  centred 5 degrees anterior of inferior; medial/lateral split, for anterior regions, at the median
  LR position of the slices holding cartilage in the 5 degree bin at the anterior/central boundary
  (their column 29) and, for central and posterior regions, at the centre of the field of view
  along LR (their ``nr_slices // 2``). Their code calls the slices before the split lateral
  (OAI's lateral-first slice order); here the side comes from the knee frame.

The default is ``"dosma"`` because its medial/lateral split follows the cartilage itself, while
Thomas et al.'s central/posterior split is the middle of the field of view and moves with knee
positioning; use ``"thomas"`` to compare with their published numbers.

Tibial and patellar cartilage
-----------------------------
Tibial: medial (label 2) and lateral (label 3) plates, each in anterior/central/posterior thirds
of its own extent along the posterior axis (DOSMA, after Black et al., ISMRM 2020). Patellar
(label 4): medial/lateral at its centre of mass along LR (medial side by the knee frame);
deep/superficial within each (slice, inferior row) line by the same half-extent rule as the
femur, deep being the anterior half (the patella lies anterior to its cartilage).

Region label values (``REGION_NAMES``): femoral 101-112, tibial 201-206, patellar 301-304.
Thickness: :mod:`KneeSegLogic.thickness`. Projection maps: :mod:`KneeSegLogic.projection`.
T2 statistics use voxels with a finite T2 in (0, 100] ms: 0 or NaN marks a failed fit, and 100 ms
is the upper bound DOSMA fits to and Thomas et al. filter at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from KneeSegLogic.errors import InputError
from KneeSegLogic.io.outputs import REGIONS_FILE, REGIONS_TABLE, write_csv
from KneeSegLogic.io.scans import write_volume
from KneeSegLogic.io.volume import Volume, resample_to_grid
from KneeSegLogic.quantification import projection
from KneeSegLogic.quantification.knee_frame import KneeFrame, knee_frame
from KneeSegLogic.quantification.thickness import PlateThickness, plate_thickness
from KneeSegLogic.tissues import tissue

FEMORAL = tissue("femoral_cartilage").label

MEDIAL_TIBIAL = tissue("medial_tibial_cartilage").label

LATERAL_TIBIAL = tissue("lateral_tibial_cartilage").label

PATELLAR = tissue("patellar_cartilage").label

PLATES = (FEMORAL, MEDIAL_TIBIAL, LATERAL_TIBIAL, PATELLAR)

BONE_OF_PLATE = {
    FEMORAL: tissue("femur").label,
    MEDIAL_TIBIAL: tissue("tibia").label,
    LATERAL_TIBIAL: tissue("tibia").label,
    PATELLAR: tissue("patella").label,
}

#: Upper end (ms) of the T2 values counted in statistics; see :func:`valid_relaxation`.
T2_MAX_MS = 100.0


def valid_relaxation(values: np.ndarray, max_ms: float = T2_MAX_MS) -> np.ndarray:
    """Where ``values`` (T2, T1rho or T2* in ms) count in statistics: finite and in (0, max_ms].

    The one home of this rule (statistics, projection maps, follow-up resampling): 0 or NaN
    marks a voxel without a fit, and values above ``max_ms`` are fluid or a failed fit.
    """
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (values > 0) & (values <= max_ms)


SIDES = ("medial", "lateral")

THIRDS = ("anterior", "central", "posterior")

LAYERS = ("deep", "superficial")


def _region_table() -> dict[int, str]:
    names: dict[int, str] = {}
    for s, side in enumerate(SIDES):
        for t, third in enumerate(THIRDS):
            for layer_index, layer in enumerate(LAYERS):
                names[101 + 6 * s + 2 * t + layer_index] = f"femoral_{side}_{third}_{layer}"
            names[201 + 3 * s + t] = f"tibial_{side}_{third}"
        for layer_index, layer in enumerate(LAYERS):
            names[301 + 2 * s + layer_index] = f"patellar_{side}_{layer}"
    return dict(sorted(names.items()))


#: Label value -> name of every built-in subregion.
REGION_NAMES: dict[int, str] = _region_table()

REGION_VALUES: dict[str, int] = {name: value for value, name in REGION_NAMES.items()}


@dataclass(frozen=True)
class FemoralVariant:
    """One recipe for the 12 femoral subregions (see the module docstring).

    ``depth_fraction`` places the deep/superficial boundary at that fraction of each line's
    radial extent from the bone (0.5: the half-extent rule of DOSMA and Thomas et al.).
    """

    name: str
    central_arc_deg: tuple[float, float]
    medial_lateral_split: str
    description: str
    depth_fraction: float = 0.5


VARIANTS: dict[str, FemoralVariant] = {
    "dosma": FemoralVariant(
        "dosma",
        (-15.0, 15.0),
        "centre_of_mass",
        "DOSMA split_regions: central arc 30 deg centred on inferior [-15, 15); "
        "medial/lateral at the femoral cartilage centre of mass along LR",
    ),
    "thomas": FemoralVariant(
        "thomas",
        (-35.0, 25.0),
        "thomas",
        "Thomas et al. 2021 projection.py: central arc 60 deg [-35, 25) from inferior; medial/lateral "
        "at the median LR of cartilage slices in the bin at -35 deg (anterior regions) and at the "
        "centre of the field of view along LR (central and posterior regions)",
    ),
}

DEFAULT_VARIANT = "dosma"


@dataclass(frozen=True)
class Circle:
    """Circle in the sagittal plane: centre (inferior, posterior) and radius, in mm."""

    inferior: float
    posterior: float
    radius: float


def fit_circle(points: np.ndarray) -> Circle:
    """Geometric least-squares circle through 2D points ``(inferior, posterior)`` in mm."""
    if len(points) < 3:
        raise InputError(None, f"too little femoral cartilage to fit its circle ({len(points)} sagittal positions)")

    def residuals(centre: np.ndarray) -> np.ndarray:
        distance = np.hypot(points[:, 0] - centre[0], points[:, 1] - centre[1])
        return distance - distance.mean()

    centre = least_squares(residuals, points.mean(axis=0)).x
    radius = float(np.hypot(points[:, 0] - centre[0], points[:, 1] - centre[1]).mean())
    return Circle(float(centre[0]), float(centre[1]), radius)


@dataclass(frozen=True)
class DivisionGeometry:
    """Everything that places the region boundaries, fixed once per knee.

    Reusing a baseline's geometry on a registered follow-up puts both time points' boundaries in
    the same place (see :mod:`KneeSegLogic.longitudinal`).

    Attributes
    ----------
    variant : str
        Femoral recipe (a key of :data:`VARIANTS`).
    frame : KneeFrame
    circle : Circle or None
        Femoral circle (None without femoral cartilage).
    femoral_split_lr : (float, float) or None
        Medial/lateral boundary (lr mm) for anterior, and for central and posterior regions.
    tibial_ap_limits : dict
        Plate label -> (min, max) of its posterior coordinate (mm).
    patellar_split_lr : float or None
    """

    variant: str
    frame: KneeFrame
    circle: Circle | None
    femoral_split_lr: tuple[float, float] | None
    tibial_ap_limits: dict[int, tuple[float, float]]
    patellar_split_lr: float | None
    recipe: FemoralVariant | None = None

    @property
    def femoral_variant(self) -> FemoralVariant:
        """The femoral recipe: a user's (from a region file) or a built-in one."""
        return self.recipe if self.recipe is not None else VARIANTS[self.variant]

    def to_json(self) -> dict[str, Any]:
        frame = self.frame
        return {
            "variant": self.variant,
            "knee_side": frame.knee_side,
            "knee_side_evidence": frame.side_evidence,
            "lr_image_axis": "kji"[frame.lr_axis],
            "lr_obliquity_deg": round(frame.lr_obliquity_deg, 3),
            "femoral_circle_mm": None
            if self.circle is None
            else {"inferior": self.circle.inferior, "posterior": self.circle.posterior, "radius": self.circle.radius},
            "femoral_split_lr_mm": None
            if self.femoral_split_lr is None
            else {"anterior": self.femoral_split_lr[0], "central_posterior": self.femoral_split_lr[1]},
            "tibial_posterior_limits_mm": {tissue(k).key: list(v) for k, v in self.tibial_ap_limits.items()},
            "patellar_split_lr_mm": self.patellar_split_lr,
            "femoral_recipe": {
                "central_arc_deg": list(self.femoral_variant.central_arc_deg),
                "medial_lateral_split": self.femoral_variant.medial_lateral_split,
                "depth_fraction": self.femoral_variant.depth_fraction,
            },
        }


Index = tuple[np.ndarray, np.ndarray, np.ndarray]
"""Array indices ``(k, j, i)`` of a set of voxels, as :func:`numpy.nonzero` gives them."""


def voxel_index(mask: np.ndarray) -> Index:
    """The :data:`Index` of the non-zero voxels of a 3D ``mask`` (``[k, j, i]``)."""
    k, j, i = np.nonzero(mask)
    return k, j, i


@dataclass(frozen=True)
class Plate:
    """The voxels of one cartilage plate and their subregion values.

    ``index`` are array indices ``(k, j, i)``; ``coordinates`` their frame coordinates
    (lr, inferior, posterior) in mm; ``region`` their subregion label values;
    ``bone_direction`` unit vectors (frame components) toward the plate's bone.
    """

    label: int
    index: Index
    coordinates: np.ndarray
    region: np.ndarray
    bone_direction: np.ndarray
    theta_deg: np.ndarray | None = None


@dataclass(frozen=True)
class CartilageDivision:
    """Subregions of a knee: the label volume, the geometry that made it, and the plates."""

    regions: Volume
    geometry: DivisionGeometry
    plates: dict[int, Plate] = field(default_factory=dict)


def divide_cartilage(
    labels: Volume,
    variant: str | FemoralVariant | None = None,
    geometry: DivisionGeometry | None = None,
    knee_side: str | None = None,
) -> CartilageDivision:
    """Divide femoral, tibial and patellar cartilage into subregions.

    Parameters
    ----------
    labels : Volume
        3D label map (:data:`~KneeSegLogic.tissues.TISSUES` values).
    variant : {"dosma", "thomas"} or FemoralVariant, optional
        Femoral recipe (a user's from :func:`read_region_spec`); default :data:`DEFAULT_VARIANT`.
        Ignored when ``geometry`` is given.
    geometry : DivisionGeometry, optional
        Boundaries fitted earlier (e.g. on a baseline the labels are registered to); when
        omitted they are fitted to ``labels``.
    knee_side : {"left", "right"}, optional
        Overrides the side inferred from the anatomy.

    Returns
    -------
    CartilageDivision
        ``regions`` is a uint16 volume on the grid of ``labels`` with :data:`REGION_NAMES` values.
    """
    recipe: FemoralVariant | None = None
    if geometry is None:
        if isinstance(variant, FemoralVariant):
            recipe, variant = variant, variant.name
        variant = variant or DEFAULT_VARIANT
        if recipe is None and variant not in VARIANTS:
            raise ValueError(f"unknown region variant {variant!r}; choose one of {sorted(VARIANTS)}")
        femoral_variant = recipe or VARIANTS[variant]
        frame = knee_frame(labels, knee_side)
    else:
        variant, frame, recipe = geometry.variant, geometry.frame, geometry.recipe
        femoral_variant = geometry.femoral_variant
    region_array = np.zeros(labels.array.shape, np.uint16)
    plates: dict[int, Plate] = {}
    fitted: dict[str, Any] = {}
    for label in PLATES:
        index = voxel_index(labels.array == label)
        if index[0].size == 0:
            continue
        coordinates = frame.coordinates(labels, index)
        if label == FEMORAL:
            plate, fitted["circle"], fitted["femoral_split_lr"] = _femoral(
                labels, frame, femoral_variant, index, coordinates, geometry
            )
        elif label == PATELLAR:
            plate, fitted["patellar_split_lr"] = _patellar(labels, frame, index, coordinates, geometry)
        else:
            plate, limits = _tibial(label, frame, index, coordinates, geometry)
            fitted.setdefault("tibial_ap_limits", {})[label] = limits
        region_array[index] = plate.region
        plates[label] = plate
    if geometry is None:
        geometry = DivisionGeometry(
            variant,
            frame,
            fitted.get("circle"),
            fitted.get("femoral_split_lr"),
            fitted.get("tibial_ap_limits", {}),
            fitted.get("patellar_split_lr"),
            recipe,
        )
    return CartilageDivision(labels.with_array(region_array), geometry, plates)


def _medial(lr: np.ndarray, split: float, frame: KneeFrame) -> np.ndarray:
    """True on the medial side of ``split``; voxels on the boundary count as lateral (Thomas)."""
    return (lr - split) * frame.medial_sign > 0


def _lower_half(group: np.ndarray, depth: np.ndarray, fraction: float = 0.5) -> np.ndarray:
    """True where ``depth <= min + fraction (max - min)`` of its group (the half-extent rule at 0.5)."""
    _, inverse = np.unique(group, return_inverse=True)
    low = np.full(inverse.max() + 1, np.inf)
    high = np.full(inverse.max() + 1, -np.inf)
    np.minimum.at(low, inverse, depth)
    np.maximum.at(high, inverse, depth)
    return depth <= low[inverse] + fraction * (high - low)[inverse]


def _in_plane_key(index: tuple[np.ndarray, ...], frame: KneeFrame, shape: tuple[int, ...]) -> np.ndarray:
    """One integer per sagittal-plane position (the two array axes other than LR)."""
    a, b = [axis for axis in range(3) if axis != frame.lr_axis]
    return index[a].astype(np.int64) * shape[b] + index[b]


def _femoral(
    labels: Volume,
    frame: KneeFrame,
    variant: FemoralVariant,
    index: Index,
    coordinates: np.ndarray,
    geometry: DivisionGeometry | None,
) -> tuple[Plate, Circle, tuple[float, float]]:
    """The 12 femoral subregions; returns the plate, its circle and its medial/lateral splits."""
    lr, inferior, posterior = coordinates.T
    # A baseline's geometry (set when it had femoral cartilage) fixes circle and splits.
    fixed_circle = None if geometry is None else geometry.circle
    fixed_split = None if geometry is None else geometry.femoral_split_lr
    if fixed_circle is not None:
        circle = fixed_circle
    else:
        _, first = np.unique(_in_plane_key(index, frame, labels.array.shape), return_index=True)
        circle = fit_circle(coordinates[first][:, 1:])
    d_inferior, d_posterior = inferior - circle.inferior, posterior - circle.posterior
    theta = np.degrees(np.arctan2(d_posterior, d_inferior))
    rho = np.hypot(d_inferior, d_posterior)
    columns = projection.angle_bin(theta)

    if fixed_split is not None:
        split = fixed_split
    elif variant.medial_lateral_split == "centre_of_mass":
        centre = float(lr.mean())
        split = (centre, centre)
    else:
        boundary_column = projection.angle_bin(np.array([variant.central_arc_deg[0]]))[0]
        boundary_slices = np.unique(np.round(lr[columns == boundary_column], 6))
        anterior_split = float(np.median(boundary_slices)) if boundary_slices.size else float(lr.mean())
        split = (anterior_split, _field_of_view_centre_lr(labels, frame))

    lower, upper = variant.central_arc_deg
    third = np.where(theta < lower, 0, np.where(theta < upper, 1, 2))
    medial = np.where(third == 0, _medial(lr, split[0], frame), _medial(lr, split[1], frame))
    deep = _lower_half(
        index[frame.lr_axis].astype(np.int64) * projection.N_ANGLE_BINS + columns, rho, variant.depth_fraction
    )
    region = 101 + 6 * (~medial) + 2 * third + (~deep)
    with np.errstate(invalid="ignore", divide="ignore"):
        toward_centre = -np.stack([np.zeros_like(rho), d_inferior / rho, d_posterior / rho], axis=1)
    plate = Plate(FEMORAL, index, coordinates, region.astype(np.uint16), np.nan_to_num(toward_centre), theta)
    return plate, circle, split


def _field_of_view_centre_lr(labels: Volume, frame: KneeFrame) -> float:
    """lr coordinate (mm) of the middle of the image along its LR axis."""
    n = labels.array.shape[frame.lr_axis]
    ends = [np.zeros(2, np.int64) for _ in range(3)]
    ends[frame.lr_axis] = np.array([0, n - 1])
    return float(frame.coordinates(labels, (ends[0], ends[1], ends[2]))[:, 0].mean())


def _tibial(
    label: int,
    frame: KneeFrame,
    index: Index,
    coordinates: np.ndarray,
    geometry: DivisionGeometry | None,
) -> tuple[Plate, tuple[float, float]]:
    """Anterior/central/posterior thirds of one tibial plate; returns the plate and its AP limits."""
    posterior = coordinates[:, 2]
    if geometry is not None and label in geometry.tibial_ap_limits:
        limits = geometry.tibial_ap_limits[label]
    else:
        limits = (float(posterior.min()), float(posterior.max()))
    fraction = (posterior - limits[0]) / max(limits[1] - limits[0], 1e-9)
    third = np.clip(np.floor(fraction * 3), 0, 2).astype(np.int64)
    side = 0 if label == MEDIAL_TIBIAL else 1
    region = (201 + 3 * side + third).astype(np.uint16)
    return Plate(label, index, coordinates, region, np.array([0.0, 1.0, 0.0])), limits


def _patellar(
    labels: Volume,
    frame: KneeFrame,
    index: Index,
    coordinates: np.ndarray,
    geometry: DivisionGeometry | None,
) -> tuple[Plate, float]:
    """Medial/lateral x deep/superficial patellar regions; returns the plate and its LR split."""
    lr, inferior, posterior = coordinates.T
    split = (
        geometry.patellar_split_lr
        if geometry is not None and geometry.patellar_split_lr is not None
        else float(lr.mean())
    )
    medial = _medial(lr, split, frame)
    in_plane_spacing = min(np.linalg.norm(frame.axis_vector(labels, a)) for a in range(3) if a != frame.lr_axis)
    rows = np.floor(inferior / in_plane_spacing + 0.5).astype(np.int64)
    line = index[frame.lr_axis].astype(np.int64) * (1 << 32) + (rows - rows.min())
    deep = _lower_half(line, posterior)
    region = (301 + 2 * (~medial) + (~deep)).astype(np.uint16)
    return Plate(PATELLAR, index, coordinates, region, np.array([0.0, 0.0, -1.0])), split


def division_thickness(labels: Volume, division: CartilageDivision) -> dict[int, PlateThickness]:
    """Thickness of every plate of a division (see :mod:`KneeSegLogic.thickness`)."""
    bones = {bone: bool(np.any(labels.array == bone)) for bone in set(BONE_OF_PLATE.values())}
    return {
        label: plate_thickness(
            labels,
            division.geometry.frame,
            label,
            BONE_OF_PLATE[label] if bones[BONE_OF_PLATE[label]] else None,
            plate.index,
            plate.coordinates,
            plate.bone_direction,
        )
        for label, plate in division.plates.items()
    }


def _t2_statistics(
    values: np.ndarray, value_max_ms: float = T2_MAX_MS, excluded: np.ndarray | None = None
) -> dict[str, float | int | None]:
    """Mean, median, SD (ddof 1) and count of the values in (0, value_max_ms], less ``excluded``.

    With ``excluded`` the row also says which fraction of the region's voxels it removed.
    """
    usable = valid_relaxation(values, value_max_ms)
    extra: dict[str, float | int | None] = {}
    if excluded is not None:
        extra["fraction_excluded"] = round(float(excluded.mean()), 6) if excluded.size else None
        usable &= ~excluded
    valid = values[usable]
    if valid.size == 0:
        return {"t2_mean_ms": None, "t2_median_ms": None, "t2_sd_ms": None, "t2_voxels": 0, **extra}
    return {
        "t2_mean_ms": float(valid.mean()),
        "t2_median_ms": float(np.median(valid)),
        "t2_sd_ms": float(valid.std(ddof=1)) if valid.size > 1 else 0.0,
        "t2_voxels": int(valid.size),
        **extra,
    }


def region_statistics(
    regions: Volume,
    names: dict[int, str],
    division: CartilageDivision,
    thickness: dict[int, PlateThickness],
    t2: Volume | None,
    value_max_ms: float = T2_MAX_MS,
    excluded: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """One row per region value in ``names``: voxels, volume, mean thickness and T2 statistics.

    ``excluded`` (bool, the grid's shape) marks voxels left out of the T2 statistics (partial
    volume); each row then gives the fraction of its voxels excluded.

    ``regions`` may be the built-in division or user regions on the same grid; a voxel's
    thickness is that of its plate column, and a region's mean thickness counts each column once.
    """
    # Column ids over all plates, looked up by flat voxel index, so one rule serves user regions
    # that span plates or reach outside the cartilage (those voxels have no column).
    voxels_per_plate: list[np.ndarray] = []
    columns_per_plate: list[np.ndarray] = []
    thickness_per_plate: list[np.ndarray] = []
    offset = 0
    for label, plate in division.plates.items():
        columns = thickness[label].voxel_column
        voxels_per_plate.append(np.ravel_multi_index(plate.index, regions.array.shape))
        columns_per_plate.append(np.where(columns >= 0, columns + offset, -1))
        thickness_per_plate.append(thickness[label].column_thickness_mm)
        offset += len(thickness[label].column_thickness_mm)
    plate_voxels = np.concatenate(voxels_per_plate) if voxels_per_plate else np.zeros(0, np.int64)
    order = np.argsort(plate_voxels)
    plate_voxels = plate_voxels[order]
    plate_columns = np.concatenate(columns_per_plate)[order] if columns_per_plate else np.zeros(0, np.int64)
    column_thickness = np.concatenate(thickness_per_plate) if thickness_per_plate else np.zeros(0)

    def columns_of(voxels: np.ndarray) -> np.ndarray:
        position = np.clip(np.searchsorted(plate_voxels, voxels), 0, max(len(plate_voxels) - 1, 0))
        found = plate_voxels[position] == voxels if len(plate_voxels) else np.zeros(len(voxels), bool)
        columns = np.unique(plate_columns[position[found]])
        return columns[columns >= 0]

    flat = regions.array.ravel()
    voxels = np.flatnonzero(flat)
    voxels = voxels[np.argsort(flat[voxels], kind="stable")]
    values, starts = np.unique(flat[voxels], return_index=True)
    groups = dict(zip(values.tolist(), np.split(voxels, starts[1:])))
    rows = []
    for value, name in names.items():
        members = groups.get(value, np.zeros(0, np.int64))
        columns = columns_of(members)
        row: dict[str, Any] = {
            "label_value": int(value),
            "name": name,
            "voxels": int(members.size),
            "volume_mm3": float(members.size * regions.voxel_volume_mm3),
            "thickness_mean_mm": float(column_thickness[columns].mean()) if columns.size else None,
        }
        if t2 is not None:
            dropped = None if excluded is None else excluded.ravel()[members]
            row.update(_t2_statistics(t2.array.ravel()[members].astype(float), value_max_ms, dropped))
        rows.append(row)
    return rows


def plate_statistics(
    division: CartilageDivision,
    thickness: dict[int, PlateThickness],
    t2: Volume | None,
    value_max_ms: float = T2_MAX_MS,
    excluded: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """One row per cartilage plate present: the same columns as :func:`region_statistics`."""
    rows = []
    for label, plate in division.plates.items():
        voxels = plate.index[0].size
        mean_thickness = thickness[label].mean_mm()
        row: dict[str, Any] = {
            "label_value": label,
            "name": tissue(label).key,
            "voxels": int(voxels),
            "volume_mm3": float(voxels * division.regions.voxel_volume_mm3),
            "thickness_mean_mm": None if np.isnan(mean_thickness) else mean_thickness,
        }
        if t2 is not None:
            dropped = None if excluded is None else excluded[plate.index]
            row.update(_t2_statistics(t2.array[plate.index].astype(float), value_max_ms, dropped))
        rows.append(row)
    return rows


CSV_COLUMNS = (
    "level",
    "label_value",
    "name",
    "voxels",
    "volume_mm3",
    "thickness_mean_mm",
    "t2_mean_ms",
    "t2_median_ms",
    "t2_sd_ms",
    "t2_voxels",
)


def write_region_csv(path: Path, plates: list[dict[str, Any]], regions: list[dict[str, Any]]) -> Path:
    """``regions.csv``: plate rows (level "plate") then subregion rows (level "region")."""
    return write_csv(
        path,
        CSV_COLUMNS,
        (
            {"level": level, **{k: _csv_value(v) for k, v in row.items()}}
            for level, rows in (("plate", plates), ("region", regions))
            for row in rows
        ),
    )


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    return round(value, 4) if isinstance(value, float) else value


def femoral_cells(
    labels: Volume, division: CartilageDivision
) -> tuple[projection.ProjectionGrid, np.ndarray, np.ndarray]:
    """Projection grid and the (row, column) cell of every femoral cartilage voxel of ``division``.

    Rows are positions along the LR image axis, lateral first; columns are 5 degree angle bins.
    """
    plate = division.plates[FEMORAL]
    frame = division.geometry.frame
    circle = division.geometry.circle
    # _femoral sets both for every femoral plate; a division built otherwise cannot be projected.
    if circle is None or plate.theta_deg is None:
        raise ValueError("the femoral plate of this division has no circle or angles to project on")
    n_rows = labels.array.shape[frame.lr_axis]
    slice_index = plate.index[frame.lr_axis].astype(np.int64)
    # Rows lateral to medial: index order when increasing index moves medially.
    rows = slice_index if frame.lr_step_sign * frame.medial_sign > 0 else n_rows - 1 - slice_index
    grid = projection.ProjectionGrid(n_rows, labels.spacing[2 - frame.lr_axis], circle.radius)
    return grid, rows, projection.angle_bin(plate.theta_deg)


def femoral_projection_maps(
    labels: Volume,
    division: CartilageDivision,
    thickness: dict[int, PlateThickness],
    t2: Volume | None,
) -> tuple[projection.ProjectionGrid, dict[str, tuple[np.ndarray, np.ndarray]]] | None:
    """Unrolled femoral maps ``{"thickness": (mean, counts), "t2": (mean, counts)}`` and their grid.

    T2 cells average the voxels with a valid T2 (finite, in (0, 100] ms); ``None`` without
    femoral cartilage.
    """
    if FEMORAL not in division.plates:
        return None
    plate = division.plates[FEMORAL]
    grid, rows, columns = femoral_cells(labels, division)
    voxel_thickness = thickness[FEMORAL].voxel_thickness_mm
    defined = np.isfinite(voxel_thickness)
    maps = {"thickness": projection.project_mean(grid, rows[defined], columns[defined], voxel_thickness[defined])}
    if t2 is not None:
        values = t2.array[plate.index].astype(float)
        valid = valid_relaxation(values)
        maps["t2"] = projection.project_mean(grid, rows[valid], columns[valid], values[valid])
    return grid, maps


METHOD_NOTES = {
    "frame": "Knee frame from the volume geometry: LR = image axis closest to patient left-right; "
    "inferior and posterior = LPS -z and +y orthogonalised to it (KneeSegLogic.knee_frame).",
    "medial_side": "Medial = toward the body midline; knee side from medial vs lateral tibial cartilage/menisci, "
    "else the fibula (lateral), else patient coordinates (LPS x < 0 = right knee).",
    "thickness": "Nearest-neighbour distance (mm) from each bone-side surface point (voxel-face centres) to the "
    "articular surface; region means count each column once (KneeSegLogic.thickness).",
    "t2": f"T2 statistics over voxels with a finite T2 in (0, {T2_MAX_MS:g}] ms (T1rho: its kind's upper "
    "bound); SD with ddof=1.",
    "projection": "Femoral cartilage unrolled about the fitted circle: rows = slices along LR, lateral to medial; "
    "columns = 5 deg bins from -180 to 180 deg, 0 = inferior, + posterior; cell = mean; 0 = empty.",
}


def read_region_spec(spec: str | Path | None) -> tuple[str | FemoralVariant | None, Volume | None]:
    """A ``--regions`` value: a built-in recipe name, or a region file.

    Region files:

    - a label volume (``.nrrd``, ``.nii.gz``, ``.mha``; e.g. drawn in Slicer): every non-zero
      value is a region, on any grid (resampled by nearest neighbour);
    - a ``.json`` recipe of angles and depth splits for the femoral regions::

          {"name": "wide-central", "central_arc_deg": [-30, 30],
           "medial_lateral_split": "centre_of_mass", "depth_fraction": 0.5}

      (degrees from inferior, positive posterior; ``medial_lateral_split`` ``"centre_of_mass"``
      or ``"thomas"``; ``depth_fraction`` of the radial extent that is deep).

    Returns ``(variant, user_regions)``: one of them is None.
    """
    if spec is None or str(spec) in VARIANTS:
        return (None if spec is None else str(spec)), None
    path = Path(spec)
    if not path.is_file():
        raise InputError(path, f"is neither a region recipe ({', '.join(VARIANTS)}) nor a region file")
    if path.suffix.lower() == ".json":
        import json

        try:
            recipe = json.loads(path.read_text())
            arc = tuple(float(a) for a in recipe["central_arc_deg"])
            split = str(recipe.get("medial_lateral_split", "centre_of_mass"))
            depth = float(recipe.get("depth_fraction", 0.5))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise InputError(path, f"is not a region recipe: {error}") from None
        if len(arc) != 2 or not -180 <= arc[0] < arc[1] <= 180:
            raise InputError(path, f"central_arc_deg must be [lower, upper] within [-180, 180], got {list(arc)}")
        if split not in ("centre_of_mass", "thomas") or not 0 < depth < 1:
            raise InputError(path, "medial_lateral_split must be centre_of_mass or thomas; depth_fraction in (0, 1)")
        name = str(recipe.get("name", path.stem))
        description = f"user recipe {path.name}: central arc {list(arc)} deg, split {split}, depth fraction {depth:g}"
        return FemoralVariant(name, (arc[0], arc[1]), split, description, depth), None
    from KneeSegLogic.io.scans import read_volume

    regions = read_volume(path)
    if regions.is_multi_echo:
        raise InputError(path, "a region label volume must be 3D")
    return None, regions


def analyse_cartilage(
    labels: Volume,
    t2: Volume | None,
    out_dir: Path,
    variant: str | FemoralVariant | None = None,
    user_regions: Volume | None = None,
    knee_side: str | None = None,
    value_max_ms: float = T2_MAX_MS,
    excluded: np.ndarray | None = None,
) -> dict[str, Any]:
    """Subregions, thickness and T2 statistics of the cartilage, written into ``out_dir``.

    Parameters
    ----------
    labels : Volume
        Label map (:data:`~KneeSegLogic.tissues.TISSUES` values). When ``t2`` lies on another
        grid the labels are resampled onto it (nearest neighbour), so every output overlays T2.
    t2 : Volume or None
        T2 map in ms.
    out_dir : Path
        Existing folder (normally the ``OUT.partial`` of :func:`~KneeSegLogic.outputs.output_folder`).
    variant : str or FemoralVariant, optional
        Femoral recipe (``"dosma"``, ``"thomas"``), or a region file path
        (:func:`read_region_spec`); default :data:`DEFAULT_VARIANT`.
    user_regions : Volume, optional
        Label volume whose non-zero values define the regions instead of the built-in division
        (resampled onto the label grid by nearest neighbour when on another grid).
    knee_side : {"left", "right"}, optional
        Overrides the side inferred from anatomy.
    value_max_ms : float
        Upper end of the values counted in the statistics (100 ms for T2; wider for T1rho).
    excluded : ndarray of bool, optional
        On the grid of ``labels``: voxels left out of the statistics (e.g. the articular-surface
        layer); every row then reports ``fraction_excluded``.

    Writes
    ------
    ``regions.nrrd`` (uint16, the regions used), ``regions.csv``, ``projection_thickness.nrrd/.png``
    and, with ``t2``, ``projection_t2.nrrd/.png``.

    Returns
    -------
    dict
        JSON-able section for ``results.json``: variant, geometry, plate and region rows,
        region names, files written, method notes.
    """
    out_dir = Path(out_dir)
    notes = dict(METHOD_NOTES)
    if isinstance(variant, (str, Path)) and user_regions is None and str(variant) not in VARIANTS:
        variant, user_regions = read_region_spec(variant)
    if t2 is not None and not labels.same_grid(t2):
        labels = resample_to_grid(labels, t2, is_label=True)
        notes["grid"] = "labels resampled onto the T2 grid (nearest neighbour)"
    if not np.isin(labels.array, PLATES).any():
        raise InputError(None, "the segmentation holds no cartilage (labels 1-4); nothing to divide")
    division = divide_cartilage(labels, variant, knee_side=knee_side)
    thickness = division_thickness(labels, division)
    if user_regions is not None:
        if not user_regions.same_grid(labels):
            user_regions = resample_to_grid(user_regions, labels, is_label=True)
        if user_regions.array.ndim != 3 or not np.any(user_regions.array):
            raise InputError(None, "the user region volume is empty or not 3D")
        regions = user_regions.with_array(np.rint(user_regions.array).astype(np.uint16))
        names = {int(v): f"region_{int(v)}" for v in np.unique(regions.array) if v != 0}
        notes["regions"] = "user-supplied region volume (every non-zero value is a region, taken as given)"
    else:
        regions, names = division.regions, dict(REGION_NAMES)
        notes["regions"] = division.geometry.femoral_variant.description
    if excluded is not None and excluded.shape != labels.array.shape:
        raise InputError(None, f"exclusion mask of shape {excluded.shape} does not match the label grid")
    if excluded is not None:
        notes["excluded"] = "voxels of the articular-surface layer left out of the statistics (partial volume)"
    region_rows = region_statistics(regions, names, division, thickness, t2, value_max_ms, excluded)
    plate_rows = plate_statistics(division, thickness, t2, value_max_ms, excluded)

    files = [
        write_volume(regions, out_dir / REGIONS_FILE),
        write_region_csv(out_dir / REGIONS_TABLE, plate_rows, region_rows),
    ]
    maps = femoral_projection_maps(labels, division, thickness, t2)
    if maps is not None:
        grid, mean_maps = maps
        for key, title, unit in (
            ("thickness", "Femoral cartilage thickness", "mm"),
            ("t2", "Femoral cartilage T2", "ms"),
        ):
            if key in mean_maps:
                files += projection.write_projection(
                    out_dir / f"projection_{key}",
                    mean_maps[key][0],
                    grid.row_spacing_mm,
                    projection.ANGLE_BIN_DEG,
                    "deg",
                    title,
                    unit,
                )
    return {
        "variant": division.geometry.variant,
        "user_regions": user_regions is not None,
        "geometry": division.geometry.to_json(),
        "region_names": {str(k): v for k, v in names.items()},
        "plates": plate_rows,
        "regions": region_rows,
        "files": [p.name for p in files],
        "methods": notes,
    }
