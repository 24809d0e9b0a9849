"""Agreement between a segmentation and a reference, and the choice of a model from such numbers.

Per structure (one label value in both label maps) :func:`evaluate` reports overlap (Dice, IoU,
precision, recall), surface distances in millimetres (HD95, ASSD and the maximum, HD) and the
volume difference; per case it reports the mean over structures and the MIoU.
:func:`choose_model` ranks models by two composite metrics, after Wang et al.

Definitions
-----------
With ``P`` the predicted and ``R`` the reference voxels of a structure:
Dice ``2|P∩R| / (|P|+|R|)``, IoU ``|P∩R| / |P∪R|``, precision ``|P∩R| / |P|``, recall
``|P∩R| / |R|``; volume difference ``V(P) - V(R)`` in mm^3 and ``100 (V(P) - V(R)) / V(R)`` in %.

Surface
    The surface of a mask is its boundary voxels: the voxels of the mask with at least one of
    their 6 face neighbours outside it (the mask minus its erosion by the 6-connected cross).
    Voxels on the edge of the image count as boundary (the image is surrounded by background).
    This is the surface MONAI's ``get_mask_edges`` uses for Hausdorff and surface distances.
Surface distance
    From each boundary voxel of one mask, the Euclidean distance in mm between voxel centres to
    the nearest boundary voxel of the other mask, computed with the voxel spacing of each axis
    (anisotropic distance transform), so it is exact for any spacing. Boundary voxels shared by
    both masks have distance 0.
HD95, ASSD, HD
    The distances of both directions (P to R and R to P) are pooled into one set: HD95 is its
    95th percentile (linear interpolation between order statistics, numpy's default), ASSD its
    mean (each boundary voxel counts once), HD its maximum. Pooling is the MedPy ``hd95``
    convention; MONAI's ``HausdorffDistanceMetric(percentile=95)`` instead takes the larger of
    the two directed 95th percentiles, which is not smaller (up to interpolation) and differs
    when the two directions' distances differ. MONAI's symmetric average surface distance and
    its Hausdorff distance equal the ASSD and HD here (checked in the tests).

Empty structures
----------------
- Empty in both: the structure is absent and correctly so. Dice, IoU, precision and recall are
  0/0 and reported NaN (not 1), so a structure absent from a case does not inflate means;
  distances are NaN; the volume difference is 0 mm^3 and NaN %.
- Empty in the prediction only: Dice = IoU = recall = 0, precision NaN (0/0), distances inf,
  volume difference ``-V(R)`` (-100 %).
- Empty in the reference only: Dice = IoU = precision = 0, recall NaN, distances inf, volume
  difference ``+V(P)`` and NaN %.
Means use only the values that are not NaN; an inf distance makes the mean distance inf (a
missed structure is a failure that no averaging should hide). In JSON, NaN and inf are written
as ``null``; the voxel counts beside them say which case applies.

MIoU
----
Luan et al. report MIoU for their multi-planar fusion; their exact formula was not retrievable
here, so KneeSeg uses the standard semantic-segmentation definition (Long et al., "mean IU"):
the mean of the per-class IoU over all classes **including background** (label 0), classes
absent from both maps left out. The mean IoU over structures without background is reported
beside it as ``mean["iou"]``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage, stats

from KneeSegLogic.device import cpu_cores
from KneeSegLogic.distances import squared_distances
from KneeSegLogic.errors import InputError
from KneeSegLogic.io.volume import Volume, resample_to_grid
from KneeSegLogic.tissues import BY_LABEL

OVERLAP_METRICS = ("dice", "iou", "precision", "recall")

DISTANCE_METRICS = ("hd95_mm", "assd_mm")

SUMMARY_METRICS = OVERLAP_METRICS + DISTANCE_METRICS + ("hd_mm",)

SURFACE_DEFINITION = (
    "boundary voxels (6-connected erosion), voxel-centre distances in mm; HD95 = 95th percentile "
    "(linear) of the distances of both directions pooled; ASSD = their mean"
)

_FACE_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a 3D mask: mask voxels with a face neighbour outside the mask.

    Voxels on the edge of the array are boundary voxels (outside the array is background).
    """
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, structure=_FACE_NEIGHBOURS, border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from the boundary voxels of ``a`` to those of ``b``, and back.

    Parameters
    ----------
    a, b : ndarray of bool, same 3D shape
        Masks, both non-empty.
    spacing : sequence of 3 floats
        Voxel size in mm along the array axes, in array order (``Volume.spacing_kji`` for a
        ``Volume`` array indexed ``[k, j, i]``).

    Returns
    -------
    a_to_b, b_to_a : ndarray of float64
        One distance per boundary voxel of ``a`` (resp. ``b``), to the nearest boundary voxel
        of the other mask, between voxel centres.
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"masks must be 3D and of one shape, got {a.shape} and {b.shape}")
    if not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    # Work inside the bounding box of both masks, padded by one background voxel: every boundary
    # voxel lies inside it, and the padding reproduces the background beyond the image edge.
    box = ndimage.find_objects((a | b).astype(np.uint8))[0]
    a = np.pad(a[box], 1)
    b = np.pad(b[box], 1)
    surface_a, surface_b = surface_voxels(a), surface_voxels(b)
    threads = cpu_cores()
    anisotropy = tuple(float(s) for s in spacing)
    to_b = squared_distances(~surface_b, anisotropy=anisotropy, parallel=threads)[surface_a]
    to_a = squared_distances(~surface_a, anisotropy=anisotropy, parallel=threads)[surface_b]
    return np.sqrt(to_b.astype(np.float64)), np.sqrt(to_a.astype(np.float64))


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def structure_metrics(
    predicted_voxels: int,
    reference_voxels: int,
    common_voxels: int,
    voxel_volume_mm3: float,
    distances: tuple[np.ndarray, np.ndarray] | None,
) -> dict[str, float | int]:
    """Metrics of one structure from voxel counts and its surface distances (see module notes).

    ``distances`` is the pair from :func:`surface_distances`, or None when a mask is empty.
    """
    union = predicted_voxels + reference_voxels - common_voxels
    predicted_mm3 = predicted_voxels * voxel_volume_mm3
    reference_mm3 = reference_voxels * voxel_volume_mm3
    result: dict[str, float | int] = {
        "prediction_voxels": predicted_voxels,
        "reference_voxels": reference_voxels,
        "dice": _ratio(2 * common_voxels, predicted_voxels + reference_voxels),
        "iou": _ratio(common_voxels, union),
        "precision": _ratio(common_voxels, predicted_voxels),
        "recall": _ratio(common_voxels, reference_voxels),
        "prediction_volume_mm3": predicted_mm3,
        "reference_volume_mm3": reference_mm3,
        "volume_difference_mm3": predicted_mm3 - reference_mm3,
        "volume_difference_percent": _ratio(100.0 * (predicted_mm3 - reference_mm3), reference_mm3),
    }
    if distances is not None:
        pooled = np.concatenate(distances)
        result.update(hd95_mm=float(np.percentile(pooled, 95)), assd_mm=float(pooled.mean()), hd_mm=float(pooled.max()))
    else:
        missing = math.nan if union == 0 else math.inf
        result.update(hd95_mm=missing, assd_mm=missing, hd_mm=missing)
    return result


def _label_array(volume: Volume, role: str) -> np.ndarray:
    array = volume.array
    if array.ndim != 3:
        raise InputError(None, f"{role} must be a 3D label map, got an array of shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.all(np.mod(array, 1) == 0):
            raise InputError(None, f"{role} holds non-integer values; a label map is needed")
        array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise InputError(None, f"{role} holds negative label values")
    return array


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def _structure_name(label: int) -> str:
    return BY_LABEL[label].key if label in BY_LABEL else f"label_{label}"


def evaluate(
    prediction: Volume,
    reference: Volume,
    labels: Mapping[int, str] | None = None,
    resample: bool = False,
) -> dict[str, Any]:
    """Compare a predicted label map with a reference, structure by structure.

    Parameters
    ----------
    prediction, reference : Volume
        3D label maps; structures are matched by label value. Both must sample one voxel grid.
    labels : mapping of int to str, optional
        Label values to evaluate and their names. By default every non-zero value found in
        either map, named by :data:`~KneeSegLogic.tissues.TISSUES` key (``label_<v>`` if unknown).
    resample : bool
        When the grids differ, resample the prediction onto the reference grid (nearest
        neighbour) and record a warning, instead of raising.

    Returns
    -------
    dict
        ``structures``: name -> metrics (see :func:`structure_metrics`; distances in mm);
        ``mean``: per metric, the mean over structures (NaN left out);
        ``miou``: mean IoU over classes including background; ``spacing_mm`` (i, j, k);
        ``surface``: the surface and HD95 convention; ``warnings``.

    Raises
    ------
    InputError
        Not 3D label maps, or different grids with ``resample=False``.
    """
    warnings_: list[str] = []
    if not prediction.same_grid(reference):
        if not resample:
            raise InputError(
                None,
                f"prediction grid (size {prediction.size}, spacing {prediction.spacing}, origin {prediction.origin}) "
                f"differs from the reference grid (size {reference.size}, spacing {reference.spacing}, "
                f"origin {reference.origin})",
            )
        _label_array(prediction, "prediction")
        prediction = resample_to_grid(prediction, reference, is_label=True)
        warnings_.append("prediction was on another grid; resampled onto the reference grid (nearest neighbour)")
    predicted = _label_array(prediction, "prediction")
    referenced = _label_array(reference, "reference")

    # One pass over the voxels gives every overlap count: the joint histogram of label pairs.
    classes = int(max(predicted.max(initial=0), referenced.max(initial=0))) + 1
    pair_type = np.int32 if classes * classes < 2**31 else np.int64
    pairs = predicted.astype(pair_type) * classes + referenced.astype(pair_type)
    joint = np.bincount(pairs.ravel(), minlength=classes * classes).reshape(classes, classes)
    del pairs
    predicted_counts, reference_counts = joint.sum(axis=1), joint.sum(axis=0)
    if labels is None:
        present = np.flatnonzero(predicted_counts + reference_counts)
        labels = {int(v): _structure_name(int(v)) for v in present if v != 0}
    if any(label <= 0 for label in labels):
        raise ValueError(f"structure label values must be positive, got {sorted(labels)}")
    predicted_boxes = ndimage.find_objects(predicted)
    referenced_boxes = ndimage.find_objects(referenced)

    spacing_kji = reference.spacing_kji
    structures: dict[str, dict[str, float | int]] = {}
    for label, name in labels.items():
        inside = 0 < label < classes
        n_pred = int(predicted_counts[label]) if inside else 0
        n_ref = int(reference_counts[label]) if inside else 0
        n_common = int(joint[label, label]) if inside else 0
        distances = None
        if n_pred and n_ref:
            box = _union_box(predicted_boxes[label - 1], referenced_boxes[label - 1])
            distances = surface_distances(predicted[box] == label, referenced[box] == label, spacing_kji)
        structures[name] = structure_metrics(n_pred, n_ref, n_common, reference.voxel_volume_mm3, distances)

    iou_per_class = [_ratio(int(joint[0, 0]), int(predicted_counts[0] + reference_counts[0] - joint[0, 0]))]
    iou_per_class += [s["iou"] for s in structures.values()]
    return {
        "structures": structures,
        "mean": {m: _nanmean([s[m] for s in structures.values()]) for m in SUMMARY_METRICS},
        "miou": _nanmean(iou_per_class),
        "spacing_mm": list(reference.spacing),
        "surface": SURFACE_DEFINITION,
        "warnings": warnings_,
    }


def _union_box(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(min(s.start, t.start), max(s.stop, t.stop)) for s, t in zip(a, b))


def evaluate_files(prediction_path: str | Path, reference_path: str | Path) -> dict[str, Any]:
    """:func:`evaluate` two segmentation files (``.seg.nrrd`` or label volumes).

    Segments of ``.seg.nrrd`` files are matched to KneeSeg structures by terminology, then by
    name (:func:`KneeSegLogic.segfile.read_labels`), so two files whose label values differ
    still compare the same structures. A prediction on another grid is resampled onto the
    reference grid with a warning.
    """
    from KneeSegLogic.io.segfile import read_labels

    reference = read_labels(reference_path)
    prediction = read_labels(prediction_path)
    result = evaluate(prediction, reference, resample=True)
    result["prediction"] = str(prediction_path)
    result["reference"] = str(reference_path)
    return result


def summarize(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over cases of :func:`evaluate` results: per structure, and of the case means.

    NaN (structure absent in a case) is left out; inf is kept (see the module notes).
    """
    names = sorted({name for r in results for name in r["structures"]})
    structures = {
        name: {
            m: _nanmean([r["structures"][name][m] for r in results if name in r["structures"]]) for m in SUMMARY_METRICS
        }
        for name in names
    }
    return {
        "cases": len(results),
        "structures": structures,
        "mean": {m: _nanmean([r["mean"][m] for r in results]) for m in SUMMARY_METRICS},
        "miou": _nanmean([r["miou"] for r in results]),
    }


@dataclass(frozen=True)
class ModelRank:
    """One model's place in :func:`choose_model`.

    Attributes
    ----------
    model : str
    overlap_composite : float
        Mean of Dice, IoU, precision and recall (higher is better).
    distance_composite : float
        Mean of HD95 and ASSD in mm (lower is better).
    overlap_rank, distance_rank : float
        Rank among the models (1 = best; tied models share the mean of their ranks).
    score : float
        ``overlap_rank + distance_rank``; the lowest score is the best model.
    place : int
        1 for the chosen model.
    """

    model: str
    overlap_composite: float
    distance_composite: float
    overlap_rank: float
    distance_rank: float
    score: float
    place: int


def choose_model(per_model_metrics: Mapping[str, Mapping[str, Any]]) -> list[ModelRank]:
    """Rank models by two composite metrics and pick the best (after Wang et al.).

    Wang et al. build one composite from the overlap metrics and one from the distance
    metrics, rank the models on each and combine the ranks. Their exact formula was not
    retrievable here; this implements the documented form: overlap composite = mean of Dice,
    IoU, precision and recall; distance composite = mean of HD95 and ASSD (mm); each model is
    ranked on each composite (1 = best, ties share the mean rank); score = sum of the two ranks,
    lowest best. Equal scores are ordered by the overlap composite, then the distance
    composite, then the name. A NaN composite ranks last.

    Parameters
    ----------
    per_model_metrics : mapping of model name to metrics
        Either a flat mapping holding ``dice``, ``iou``, ``precision``, ``recall``, ``hd95_mm``
        and ``assd_mm``, or a result of :func:`evaluate` or :func:`summarize` (its ``mean``
        is used).

    Returns
    -------
    list of ModelRank
        Best first.
    """
    if not per_model_metrics:
        raise ValueError("no models to choose from")
    models = list(per_model_metrics)
    overlap, distance = [], []
    for model in models:
        metrics = per_model_metrics[model]
        metrics = metrics.get("mean", metrics)
        missing = [m for m in OVERLAP_METRICS + DISTANCE_METRICS if m not in metrics]
        if missing:
            raise ValueError(f"model {model!r} lacks metrics {missing}")
        overlap.append(float(np.mean([metrics[m] for m in OVERLAP_METRICS])))
        distance.append(float(np.mean([metrics[m] for m in DISTANCE_METRICS])))
    # rankdata ranks ascending: negate the overlap (higher is better); NaN becomes the worst value.
    overlap_rank = stats.rankdata([math.inf if math.isnan(v) else -v for v in overlap])
    distance_rank = stats.rankdata([math.inf if math.isnan(v) else v for v in distance])
    order = sorted(
        range(len(models)),
        key=lambda n: (overlap_rank[n] + distance_rank[n], overlap_rank[n], distance_rank[n], models[n]),
    )
    return [
        ModelRank(
            models[n],
            overlap[n],
            distance[n],
            float(overlap_rank[n]),
            float(distance_rank[n]),
            float(overlap_rank[n] + distance_rank[n]),
            place,
        )
        for place, n in enumerate(order, start=1)
    ]


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN or inf: write them as null (the voxel counts say which case applies)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def to_json(result: Mapping[str, Any]) -> str:
    """One strict JSON object (NaN and inf as null)."""
    return json.dumps(_finite_or_none(result), allow_nan=False)


def _cell(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.{digits}f}")


def format_table(result: Mapping[str, Any]) -> str:
    """A text table: one row per structure, then the mean and the MIoU."""
    columns = (
        ("dice", "Dice", 3),
        ("iou", "IoU", 3),
        ("precision", "Prec", 3),
        ("recall", "Rec", 3),
        ("hd95_mm", "HD95 mm", 2),
        ("assd_mm", "ASSD mm", 2),
        ("volume_difference_mm3", "dV mm3", 0),
        ("volume_difference_percent", "dV %", 1),
    )
    width = max([len(n) for n in result["structures"]] + [len("MIoU (with background)")])
    lines = [f"{'structure':<{width}}" + "".join(f"{title:>10}" for _, title, _ in columns)]
    rows = list(result["structures"].items()) + [("mean", result["mean"])]
    for name, metrics in rows:
        lines.append(
            f"{name:<{width}}"
            + "".join(f"{_cell(metrics[key], digits) if key in metrics else '':>10}" for key, _, digits in columns)
        )
    lines.append(f"{'MIoU (with background)':<{width}}{_cell(result['miou'], 3):>10}")
    lines.append(f"surface: {result['surface']}")
    return "\n".join(lines)
