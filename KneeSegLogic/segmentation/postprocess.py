"""Post-processing of masks and label maps: components, holes, ball closing/opening, MESE refinement.

Functions over arrays in the style of scikit-image. Masks and label maps are indexed in array
order (``array[k, j, i]`` for a :class:`~KneeSegLogic.volume.Volume`); a ``spacing`` argument of
an array function is therefore in *array axis order* (``volume.spacing_kji``), in mm.
:func:`apply_postprocessing` takes a :class:`~KneeSegLogic.volume.Volume` and does that reversal
itself, so a model package can name its steps without caring about axis order::

    steps = [
        {"name": "largest_component", "labels": [5, 6, 7], "components": 1},
        {"name": "fill_holes", "labels": [5, 6, 7]},
        {"name": "closing", "radius_mm": 3.0, "labels": [5, 6, 7]},
    ]
    labels = apply_postprocessing(labels, steps)

Closing
-------
:func:`ball_closing` is the morphological closing with a ball computed through two Euclidean
distance transforms (the multi-threaded ``edt`` package): a voxel is in the dilation when its
squared distance to the mask is <= r^2, and in the closing when its squared distance to the
outside of the dilation is > r^2. With radius ``r`` in voxels this is *identical* to
``skimage.morphology.binary_closing(mask, skimage.morphology.ball(r))`` with scikit-image's
default border mode ``"ignore"`` (outside the image counts as False for the dilation and as True
for the erosion), because ``ball(r)`` holds exactly the offsets with x^2 + y^2 + z^2 <= r^2 and the
EDTs are taken without a black border. With ``spacing`` the ball is a sphere of radius ``r`` mm:
offsets ``d`` (voxels) with sum((d * spacing)^2) <= r^2.
"""

from __future__ import annotations

import inspect
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from scipy import ndimage

from KneeSegLogic.device import cpu_cores
from KneeSegLogic.distances import squared_distances
from KneeSegLogic.errors import KneeSegError
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.tissues import TISSUES

# edt returns float32 squared distances; anisotropic ones carry rounding of ~1e-7 relative, so an
# offset lying exactly on the sphere could land a hair outside. Widen r^2 by this relative amount
# (for integer radii in voxels nothing changes: squared distances are integers).
RADIUS_TOLERANCE = 1e-6

# Which structure keeps a background voxel that the closings of two structures both fill: thin
# tissues first, so a bone's closing cannot take the voxels that make a cartilage plate whole.
CLOSING_PRIORITY: tuple[int, ...] = tuple(
    t.label for group in ("cartilage", "meniscus", "bone") for t in TISSUES if t.group == group
)


def _threads(threads: int | None) -> int:
    return max(1, int(threads)) if threads is not None else cpu_cores()


def _bounding_box(mask: np.ndarray, margin: Sequence[int] | np.ndarray) -> tuple[slice, ...]:
    """Slices of the mask's bounding box widened by ``margin`` voxels per axis, clipped to the array."""
    box = []
    for axis, (size, extra) in enumerate(zip(mask.shape, margin)):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=others))
        box.append(slice(max(int(present[0]) - extra, 0), min(int(present[-1]) + extra + 1, size)))
    return tuple(box)


def _as_spacing(spacing: Sequence[float] | None, ndim: int) -> np.ndarray:
    values = np.ones(ndim) if spacing is None else np.asarray(spacing, dtype=float).reshape(-1)
    if values.size != ndim or np.any(values <= 0):
        raise ValueError(f"spacing must hold {ndim} positive values, got {spacing!r}")
    return values


def _ball_setup(
    name: str, mask: np.ndarray, radius: float, spacing: Sequence[float] | None, threads: int | None
) -> tuple[np.ndarray, np.ndarray, float | None, dict[str, Any]]:
    """Checks and EDT settings shared by the ball morphology functions.

    Returns the boolean mask, the spacing per array axis, the squared radius widened by
    :data:`RADIUS_TOLERANCE` (None when there is nothing to do: radius 0 or an empty mask) and the
    ``edt`` keyword arguments (no black border: the image border is not outside the mask).
    """
    mask = np.asarray(mask, dtype=bool)
    if not 1 <= mask.ndim <= 3:
        raise ValueError(f"{name} works on 1-3 dimensional masks, got {mask.ndim} dimensions")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    step = _as_spacing(spacing, mask.ndim)
    if radius == 0 or not mask.any():
        return mask, step, None, {}
    options = dict(anisotropy=tuple(step), black_border=False, parallel=_threads(threads))
    return mask, step, radius * radius * (1.0 + RADIUS_TOLERANCE), options


def ball_closing(
    mask: np.ndarray, radius: float, spacing: Sequence[float] | None = None, threads: int | None = None
) -> np.ndarray:
    """Morphological closing with a ball, through Euclidean distance transforms.

    Parameters
    ----------
    mask : ndarray of bool, 1-3 dimensions
        Binary mask (non-zero is foreground).
    radius : float
        Ball radius: in voxels when ``spacing`` is None (integer radii reproduce
        ``skimage.morphology.ball(radius)`` exactly), else in mm.
    spacing : sequence of float, optional
        Voxel size in mm per *array axis*; makes the element a sphere in physical space.
    threads : int, optional
        Threads for the EDT (default: the CPUs this process may use).

    Returns
    -------
    ndarray of bool
        The closing, same shape as ``mask``; borders behave as scikit-image's
        ``binary_closing`` (mode ``"ignore"``).

    Notes
    -----
    Only the mask's bounding box widened by the ball's reach plus one voxel is transformed: the
    dilation lies inside the reach, and the one extra voxel layer is outside the dilation, so it
    stands for everything beyond it in the erosion. This is what makes a small structure in a
    large volume cheap.

    Examples
    --------
    >>> mask = np.zeros((9, 9, 9), bool); mask[2:7, 2:7, 2:7] = True; mask[4, 4, 4] = False
    >>> bool(ball_closing(mask, 1)[4, 4, 4])
    True
    """
    mask, step, limit, options = _ball_setup("ball_closing", mask, radius, spacing, threads)
    if limit is None:
        return mask.copy()
    reach = np.floor(radius / step + RADIUS_TOLERANCE).astype(int)
    box = _bounding_box(mask, reach + 1)
    crop = mask[box]
    dilated = squared_distances(np.logical_not(crop), **options) <= limit
    out = np.zeros(mask.shape, dtype=bool)
    out[box] = squared_distances(dilated, **options) > limit
    return out


def ball_opening(
    mask: np.ndarray, radius: float, spacing: Sequence[float] | None = None, threads: int | None = None
) -> np.ndarray:
    """Morphological opening with a ball, through Euclidean distance transforms.

    The erosion keeps voxels farther than ``radius`` from the outside of the mask; the opening
    is every voxel within ``radius`` of the erosion. It removes spurs and bridges thinner than
    the ball (a bone label leaking along a tendon) and leaves thicker parts unchanged. Radius and
    spacing as in :func:`ball_closing`; the image border does not count as outside (scikit-image's
    ``binary_opening`` with ``ball(r)`` erodes from the border too, so the two agree away from it).

    Both transforms run on the voxels themselves: on blocks of about 0.5 mm the opening of the
    512 x 512 x 286 knee's femur was 1.7x faster but kept 43,000 voxels of the 99,000 the exact
    opening rounds off its rims (Dice 0.996 against it), so it was not adopted.
    """
    mask, step, limit, options = _ball_setup("ball_opening", mask, radius, spacing, threads)
    if limit is None:
        return mask.copy()
    box = _bounding_box(mask, np.ones(mask.ndim, dtype=int))
    eroded = squared_distances(mask[box], **options) > limit
    out = np.zeros(mask.shape, dtype=bool)
    if eroded.any():
        # The dilation stays within the ball's reach of the erosion, whose box is often far smaller
        # than the mask's (specks and leaks widen that one, and erode away): transform only there.
        reach = np.floor(radius / step + RADIUS_TOLERANCE).astype(int) + 1
        inner = _bounding_box(eroded, reach)
        region = out[box][inner]  # a view into ``out``
        region[...] = squared_distances(np.logical_not(eroded[inner]), **options) <= limit
    return out


def piece_sizes(pieces: np.ndarray, count: int) -> np.ndarray:
    """Voxels of each piece of an ``ndimage.label`` result, indexed by piece number (0, the
    background, counts 0). A histogram of the int32 pieces: ``np.bincount`` first copies them to
    int64, which took 0.5 s for a femur box of the 512 x 512 x 286 knee."""
    sizes = np.zeros(count + 1, np.int64)
    if count:
        sizes[1:] = ndimage.histogram(pieces, 0.5, count + 0.5, count)
    return sizes


def largest_components(mask: np.ndarray, components: int = 1, connectivity: int | None = None) -> np.ndarray:
    """Keep the ``components`` largest connected components of a binary mask.

    Parameters
    ----------
    mask : ndarray of bool
    components : int
        How many components to keep (ties keep the one met first in array order).
    connectivity : int, optional
        Neighbourhood as in ``scipy.ndimage.generate_binary_structure``: 1 faces only, up to
        ``mask.ndim`` (default) faces, edges and corners (26-connectivity in 3D).

    Returns
    -------
    ndarray of bool
    """
    mask = np.asarray(mask, dtype=bool)
    if components < 1:
        raise ValueError(f"components must be >= 1, got {components}")
    out = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return out
    box = _bounding_box(mask, [0] * mask.ndim)
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity or mask.ndim)
    labelled, count = ndimage.label(mask[box], structure=structure)
    if count <= components:
        out[box] = mask[box]
        return out
    sizes = piece_sizes(labelled, count)
    keep = np.argsort(-sizes, kind="stable")[:components]
    out[box] = labelled == keep[0] if components == 1 else np.isin(labelled, keep)
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a binary mask: background not 6-connected (in 3D) to the array border.

    Parameters
    ----------
    mask : ndarray of bool

    Returns
    -------
    ndarray of bool
    """
    mask = np.asarray(mask, dtype=bool)
    out = mask.copy()
    if not mask.any():
        return out
    # Outside the bounding box all is background and reaches the border, so cropping is exact.
    # Holes are the background pieces (face-connected, as binary_fill_holes's default) that do not
    # reach the border: one labelling of the background, bordered by one background layer so that
    # everything touching the border is one piece (several times faster than binary_fill_holes,
    # which propagates from the border one dilation at a time).
    box = _bounding_box(mask, [0] * mask.ndim)
    background = np.pad(np.logical_not(mask[box]), 1, constant_values=True)
    pieces, _ = ndimage.label(background)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    out[box] |= pieces[inner] != pieces[(0,) * mask.ndim]
    return out


#: ``scipy.ndimage.find_objects`` of a label map: per label value ``v`` at index ``v - 1`` its
#: bounding box, or None. A box that holds every voxel of its label (a *superset*, as after steps
#: that only remove voxels) gives every per-structure step the same voxels as the tight one.
Boxes = Sequence["tuple[slice, ...] | None"]


def _label_boxes(
    labels: np.ndarray,
    label_values: Sequence[int] | None,
    margin: Sequence[int] | np.ndarray | int = 0,
    found: Boxes | None = None,
) -> list[tuple[int, tuple[slice, ...]]]:
    """``(value, bounding box)`` of each label value present, from one pass over the map (none when
    the caller passes the map's ``found`` boxes, see :data:`Boxes`).

    Values are ``label_values`` in their order (default: every non-zero value present, ascending);
    each box is widened by ``margin`` voxels per axis and clipped to the array. Working inside
    these boxes instead of the whole volume is what keeps post-processing cheap on large scans.
    """
    labels = np.asarray(labels)
    if found is None:
        found = ndimage.find_objects(labels if labels.dtype.kind in "iu" else labels.astype(np.int64))
    boxes = {value + 1: box for value, box in enumerate(found) if box is not None}
    wanted = sorted(boxes) if label_values is None else [int(v) for v in label_values]
    extra = np.broadcast_to(np.asarray(margin, dtype=int), (labels.ndim,))
    return [
        (
            value,
            tuple(
                slice(max(b.start - int(e), 0), min(b.stop + int(e), n))
                for b, e, n in zip(boxes[value], extra, labels.shape)
            ),
        )
        for value in wanted
        if value in boxes
    ]


def _per_structure(
    labels: np.ndarray,
    label_values: Sequence[int] | None,
    compute: Callable[[np.ndarray], Any],
    margin: Sequence[int] | np.ndarray | int = 0,
    found: Boxes | None = None,
) -> Iterator[tuple[int, tuple[slice, ...], np.ndarray, Any]]:
    """``(value, box, mask, compute(mask))`` per structure of :func:`_label_boxes`, where ``mask`` is
    ``labels[box] == value``.

    The structures are computed on a thread pool (scipy's labelling and the distance transforms
    release the GIL, so two cores take two structures at once) but yielded in the order of the
    values: callers apply each result to their output as the serial loop did, so the voxels are
    the same whatever finishes first. ``found``: the map's :data:`Boxes` when the caller has them.
    """
    boxes = _label_boxes(labels, label_values, margin, found)

    def work(item: tuple[int, tuple[slice, ...]]) -> tuple[int, tuple[slice, ...], np.ndarray, Any]:
        value, box = item
        mask = labels[box] == value
        return value, box, mask, compute(mask)

    with ThreadPoolExecutor(max_workers=max(1, min(cpu_cores(), len(boxes)))) as pool:
        yield from pool.map(work, boxes)


def _present(labels: np.ndarray, label_values: Sequence[int] | None) -> list[int]:
    """Label values present in ``labels``: ``label_values`` in their order (default: all non-zero)."""
    return [value for value, _ in _label_boxes(labels, label_values)]


def keep_largest_components(
    labels: np.ndarray,
    components: int = 1,
    label_values: Sequence[int] | None = None,
    connectivity: int | None = None,
    boxes: Boxes | None = None,
) -> np.ndarray:
    """Per label value, keep the largest connected component(s); other voxels of it become 0.

    Parameters
    ----------
    labels : ndarray of int
        Label map.
    components : int
        Components kept per label value.
    label_values : sequence of int, optional
        Labels to treat (default: every non-zero label present).
    connectivity : int, optional
        See :func:`largest_components`.
    boxes : optional
        The map's :data:`Boxes`, when the caller has them.
    """
    out = np.array(labels, copy=True)
    largest = partial(largest_components, components=components, connectivity=connectivity)
    for _, box, mask, kept in _per_structure(labels, label_values, largest, found=boxes):
        out[box][mask & ~kept] = 0
    return out


def fill_label_holes(
    labels: np.ndarray, label_values: Sequence[int] | None = None, boxes: Boxes | None = None
) -> np.ndarray:
    """Per label value, fill its holes; only background (0) voxels are filled, never other labels.
    ``boxes``: the map's :data:`Boxes`, when the caller has them."""
    out = np.array(labels, copy=True)
    for value, box, _, filled in _per_structure(labels, label_values, fill_holes, found=boxes):
        region = out[box]  # a view: filling it fills ``out``
        region[filled & (region == 0)] = value
    return out


def close_labels(
    labels: np.ndarray,
    radius: float,
    spacing: Sequence[float] | None = None,
    label_values: Sequence[int] | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Ball closing of each structure of a label map, without structures overwriting each other.

    Each label value is closed on its own (from the input map), and its closing fills only
    voxels that are background in the input and not yet taken: when closings of two
    structures reach the same background voxel, the one earlier in ``label_values`` keeps it.

    Parameters
    ----------
    labels : ndarray of int
        Label map.
    radius : float
        Ball radius, voxels without ``spacing``, mm with it (see :func:`ball_closing`).
    spacing : sequence of float, optional
        Voxel size in mm per array axis.
    label_values : sequence of int, optional
        Labels to close, in priority order (default :data:`CLOSING_PRIORITY`: cartilage, menisci,
        then bones; labels not in the table follow in ascending order).
    """
    if label_values is None:
        present = set(_present(labels, None))
        label_values = [v for v in CLOSING_PRIORITY if v in present] + sorted(present - set(CLOSING_PRIORITY))
    out = np.array(labels, copy=True)
    # The closing reaches ``radius`` beyond a structure; one more voxel stands for the outside
    # (as inside ball_closing), so each box gives the same voxels as the whole volume.
    reach = np.floor(radius / _as_spacing(spacing, np.ndim(labels)) + RADIUS_TOLERANCE).astype(int) + 1
    closing = partial(ball_closing, radius=radius, spacing=spacing, threads=threads)
    # Applied in priority order: an earlier structure's closing takes a contested voxel first.
    for value, box, _, closed in _per_structure(labels, label_values, closing, reach):
        region = out[box]
        region[closed & (region == 0)] = value
    return out


def open_labels(
    labels: np.ndarray,
    radius: float,
    spacing: Sequence[float] | None = None,
    label_values: Sequence[int] | None = None,
    threads: int | None = None,
    boxes: Boxes | None = None,
) -> np.ndarray:
    """Ball opening of each structure of a label map; what an opening removes becomes background.
    ``boxes``: the map's :data:`Boxes`, when the caller has them."""
    out = np.array(labels, copy=True)
    # One voxel of margin: the erosion must see the background around the structure (the array's
    # own border does not count as outside).
    opening = partial(ball_opening, radius=radius, spacing=spacing, threads=threads)
    for _, box, mask, opened in _per_structure(labels, label_values, opening, 1, found=boxes):
        out[box][mask & ~opened] = 0
    return out


def mese_candidates(probability: np.ndarray, candidate_threshold: float = 0.01) -> np.ndarray:
    """Voxels worth a T2 fit before refinement (Thomas et al.): probability > ``candidate_threshold``."""
    return np.asarray(probability) > candidate_threshold


def refine_mese_cartilage(
    probability: np.ndarray,
    t2_ms: np.ndarray | None = None,
    *,
    candidate_threshold: float = 0.01,
    t2_range_ms: tuple[float, float] = (0.0, 100.0),
    threshold: float = 0.501,
    min_voxels_per_slice: int = 425,
    slice_axis: int = 0,
) -> np.ndarray:
    """Cartilage mask refinement of Thomas et al. (MESE T2 model).

    Steps: candidates ``p > candidate_threshold``; voxels whose T2 is outside ``t2_range_ms``
    (inclusive bounds) or not finite are dropped when a T2 map is given; the rest is binarised at
    ``p >= threshold``; slices along ``slice_axis`` with fewer than ``min_voxels_per_slice``
    voxels left are emptied (the published count, 425, is for their 0.3 mm in-plane sagittal
    grid: scale it with the in-plane voxel area on other grids).

    Parameters
    ----------
    probability : ndarray of float
        The cartilage probability map, values in [0, 1].
    t2_ms : ndarray of float, optional
        T2 map in ms on the same grid.
    slice_axis : int
        Array axis across slices (0 = ``k`` for a :class:`~KneeSegLogic.volume.Volume`, the
        sagittal slice axis of a sagittal MESE scan).

    Returns
    -------
    ndarray of bool
    """
    probability = np.asarray(probability)
    mask = mese_candidates(probability, candidate_threshold) & (probability >= threshold)
    if t2_ms is not None:
        t2_ms = np.asarray(t2_ms)
        if t2_ms.shape != probability.shape:
            raise ValueError(f"T2 map shape {t2_ms.shape} differs from probability shape {probability.shape}")
        with np.errstate(invalid="ignore"):
            mask &= (t2_ms >= t2_range_ms[0]) & (t2_ms <= t2_range_ms[1])
    others = tuple(a for a in range(mask.ndim) if a != slice_axis)
    sparse = mask.sum(axis=others) < min_voxels_per_slice
    index = [slice(None)] * mask.ndim
    index[slice_axis] = sparse
    mask[tuple(index)] = False
    return mask


# Each step: (label map array, its Volume, context with optional inputs, **options) -> array.
Context = Mapping[str, Any]


def _largest_component_step(
    label_map: np.ndarray,
    volume: Volume,
    context: Context,
    *,
    labels: Sequence[int] | None = None,
    components: int = 1,
    connectivity: int | None = None,
) -> np.ndarray:
    return keep_largest_components(label_map, components, labels, connectivity, context.get("boxes"))


def _fill_holes_step(
    label_map: np.ndarray, volume: Volume, context: Context, *, labels: Sequence[int] | None = None
) -> np.ndarray:
    return fill_label_holes(label_map, labels, context.get("boxes"))


def _closing_step(
    label_map: np.ndarray,
    volume: Volume,
    context: Context,
    *,
    radius_mm: float,
    labels: Sequence[int] | None = None,
) -> np.ndarray:
    return close_labels(label_map, float(radius_mm), volume.spacing_kji, labels)


def _opening_step(
    label_map: np.ndarray,
    volume: Volume,
    context: Context,
    *,
    radius_mm: float,
    labels: Sequence[int] | None = None,
) -> np.ndarray:
    return open_labels(label_map, float(radius_mm), volume.spacing_kji, labels, boxes=context.get("boxes"))


def _mese_refinement_step(
    label_map: np.ndarray,
    volume: Volume,
    context: Context,
    *,
    label: int = 1,
    candidate_threshold: float = 0.01,
    t2_range_ms: Sequence[float] = (0.0, 100.0),
    threshold: float = 0.501,
    min_voxels_per_slice: int = 425,
    slice_axis: int = 0,
) -> np.ndarray:
    probabilities = context.get("probabilities")
    if probabilities is None:
        raise KneeSegError("post-processing step 'mese_refinement' needs the class probability maps")
    refined = refine_mese_cartilage(
        probabilities[label],
        context.get("t2_ms"),
        candidate_threshold=candidate_threshold,
        t2_range_ms=(float(t2_range_ms[0]), float(t2_range_ms[1])),
        threshold=threshold,
        min_voxels_per_slice=min_voxels_per_slice,
        slice_axis=slice_axis,
    )
    out = np.where(label_map == label, 0, label_map).astype(label_map.dtype)
    out[refined & (out == 0)] = label
    return out


# --------------------------------------------------------------------------------------------
# Anatomical consistency: one piece per plate, medial and lateral on their own side, nothing on
# the fibula. These act on predicted label maps whose medial/lateral labels may be partly wrong, so
# each rule decides from the majority of the prediction, never from one voxel.
# --------------------------------------------------------------------------------------------

_SOFT_LABELS: tuple[int, ...] = tuple(t.label for t in TISSUES if t.group in ("cartilage", "meniscus"))

_FIBULA_LABEL = next(t.label for t in TISSUES if t.key == "fibula")

#: (medial, lateral) label pairs that are the same structure on the two sides of the knee.
SIDE_PAIRS: tuple[tuple[int, int], ...] = tuple(
    (
        next(t.label for t in TISSUES if t.key == f"medial_{name}"),
        next(t.label for t in TISSUES if t.key == f"lateral_{name}"),
    )
    for name in ("tibial_cartilage", "meniscus")
)


def keep_major_components(
    labels: np.ndarray,
    label_values: Sequence[int] | None = None,
    min_fraction: float = 0.1,
    connectivity: int | None = None,
    boxes: Boxes | None = None,
) -> np.ndarray:
    """Per label value, keep its connected pieces of at least ``min_fraction`` of its largest piece.

    A cartilage plate split by partial volume keeps its big pieces; specks away from it go (become 0).
    ``connectivity`` as in :func:`largest_components` (default: full, 26-connected in 3D);
    ``boxes``: the map's :data:`Boxes`, when the caller has them.
    """
    out = np.array(labels, copy=True)
    structure = ndimage.generate_binary_structure(labels.ndim, connectivity or labels.ndim)

    def minor_pieces(mask: np.ndarray) -> np.ndarray | None:
        pieces, count = ndimage.label(mask, structure)
        if count < 2:
            return None
        sizes = piece_sizes(pieces, count)[1:]
        return np.isin(pieces, np.flatnonzero(sizes < min_fraction * sizes.max()) + 1)

    # Each label's pieces all lie inside its bounding box: label there, not in the whole volume.
    for _, box, _, minor in _per_structure(labels, label_values, minor_pieces, found=boxes):
        if minor is not None:
            out[box][minor] = 0
    return out


def left_right_coordinates(volume: Volume, mask: np.ndarray) -> np.ndarray:
    """Position (mm) along the scan's left-right axis of every voxel of ``mask`` (array order).

    The axis is the image axis closest to the patient's left-right (LPS x) axis, as in
    :func:`KneeSegLogic.quantification.knee_frame.knee_frame` (sagittal knee scans are prescribed
    along the condyles); coordinates increase toward the patient's left.
    """
    return _left_right_at(volume, np.nonzero(mask))


def _left_right_at(volume: Volume, index: tuple[np.ndarray, ...]) -> np.ndarray:
    """:func:`left_right_coordinates` of the voxels at array ``index`` (k, j, i)."""
    x_component = volume.direction[0]
    itk_axis = int(np.argmax(np.abs(x_component)))
    left = volume.direction[:, itk_axis] * (1.0 if x_component[itk_axis] > 0 else -1.0)
    # Only the left-right component is needed: one dot product per voxel, not a full transform.
    per_axis = (volume.direction.T @ left) * np.asarray(volume.spacing)  # mm per i, j, k step
    k, j, i = index
    return i * per_axis[0] + j * per_axis[1] + k * per_axis[2] + float(np.asarray(volume.origin) @ left)


def _voxels_by_label(
    array: np.ndarray, label_values: Sequence[int], boxes: Boxes | None = None
) -> dict[int, tuple[np.ndarray, ...]]:
    """Array indices of each label value present, found inside its bounding box (large scans)."""
    found = {}
    for value, box in _label_boxes(array, label_values, found=boxes):
        local = np.nonzero(array[box] == value)
        found[value] = tuple(axis + part.start for axis, part in zip(local, box))
    return found


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of 1D values: the split that maximises the between-class variance."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    mean_low = np.cumsum(counts * centres) / np.maximum(weight_low, 1)
    mean_high = (np.sum(counts * centres) - np.cumsum(counts * centres)) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def medial_lateral_split(
    labels: Volume, voxels: dict[int, tuple[np.ndarray, ...]] | None = None
) -> tuple[float, int] | None:
    """Where the knee's medial and lateral compartments divide along the left-right axis.

    Returns ``(boundary_mm, medial_sign)``: the boundary is Otsu's threshold of the left-right
    positions of all tibial cartilage and meniscus voxels (the two compartments, whatever side
    each voxel is labelled, with the intercondylar gap between them); ``medial_sign`` is +1 when
    medial lies toward increasing left-right position, decided by where most medially labelled
    voxels lie. None when the map lacks voxels of either side. ``voxels`` are the indices of the
    side labels when the caller has them (:func:`_voxels_by_label`).
    """
    if voxels is None:
        voxels = _voxels_by_label(labels.array, [label for pair in SIDE_PAIRS for label in pair])
    medial = [_left_right_at(labels, voxels[m]) for m, _ in SIDE_PAIRS if m in voxels]
    lateral = [_left_right_at(labels, voxels[lat]) for _, lat in SIDE_PAIRS if lat in voxels]
    if not medial or not lateral:
        return None
    medial_mm, lateral_mm = np.concatenate(medial), np.concatenate(lateral)
    boundary = _otsu(np.concatenate([medial_mm, lateral_mm]))
    # Majority vote: the share of medial-labelled voxels above the boundary against lateral ones.
    medial_sign = 1 if np.mean(medial_mm > boundary) > np.mean(lateral_mm > boundary) else -1
    return boundary, medial_sign


def enforce_medial_lateral_sides(labels: Volume, boxes: Boxes | None = None) -> np.ndarray:
    """Medial and lateral tibial cartilage and menisci moved to the label of the side they lie on.

    A voxel labelled medial on the lateral side of :func:`medial_lateral_split` takes the lateral
    label of the same structure, and the reverse. Returns the new array (array order).
    ``boxes``: the map's :data:`Boxes`, when the caller has them.
    """
    array = labels.array
    voxels = _voxels_by_label(array, [label for pair in SIDE_PAIRS for label in pair], boxes)
    split = medial_lateral_split(labels, voxels)
    out = np.array(array, copy=True)
    if split is None:
        return out
    boundary, medial_sign = split
    for medial_label, lateral_label in SIDE_PAIRS:
        for label, other, medial_side in ((medial_label, lateral_label, True), (lateral_label, medial_label, False)):
            if label not in voxels:
                continue
            on_medial_side = (_left_right_at(labels, voxels[label]) - boundary) * medial_sign > 0
            wrong = on_medial_side != medial_side
            out[tuple(axis[wrong] for axis in voxels[label])] = other
    return out


def clear_fibula_contact(
    labels: np.ndarray, spacing: Sequence[float] | None = None, distance_mm: float = 1.0, boxes: Boxes | None = None
) -> np.ndarray:
    """No cartilage or meniscus on the fibula: their voxels within ``distance_mm`` of the fibula become 0,
    and any piece of them that touched it and is not the largest piece of its label goes entirely.

    ``spacing`` in mm per array axis. The fibular head carries no cartilage or meniscus a knee
    segmentation labels (its tibiofibular facet is not segmented), so a prediction there is a leak.
    ``boxes``: the map's :data:`Boxes`, when the caller has them.
    """
    out = np.array(labels, copy=True)
    fibula = labels == _FIBULA_LABEL
    if not fibula.any():
        return out
    step = _as_spacing(spacing, labels.ndim)
    # The distance is needed only around the fibula: its box widened by the distance, a few percent
    # of a knee scan.
    box = _bounding_box(fibula, [int(np.ceil(distance_mm / s)) + 1 for s in step])
    near = np.zeros(labels.shape, bool)
    near[box] = ndimage.distance_transform_edt(~fibula[box], sampling=step) <= distance_mm
    structure = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
    for value, own in _label_boxes(labels, _SOFT_LABELS, found=boxes):
        mask = labels[own] == value
        touching = mask & near[own]
        if not touching.any():
            continue
        pieces, count = ndimage.label(mask, structure)
        largest = int(np.argmax(piece_sizes(pieces, count)))
        contact = np.unique(pieces[touching])
        out[own][np.isin(pieces, contact[contact != largest])] = 0
        out[own][touching] = 0
    return out


def _major_components_step(
    label_map: np.ndarray,
    volume: Volume,
    context: Context,
    *,
    labels: Sequence[int] | None = None,
    min_fraction: float = 0.1,
    connectivity: int | None = None,
) -> np.ndarray:
    return keep_major_components(label_map, labels, float(min_fraction), connectivity, context.get("boxes"))


def _medial_lateral_step(label_map: np.ndarray, volume: Volume, context: Context) -> np.ndarray:
    return enforce_medial_lateral_sides(volume.with_array(label_map), context.get("boxes"))


def _fibula_contact_step(
    label_map: np.ndarray, volume: Volume, context: Context, *, distance_mm: float = 1.0
) -> np.ndarray:
    return clear_fibula_contact(label_map, volume.spacing_kji, float(distance_mm), context.get("boxes"))


#: Anatomical consistency after the bone steps: cartilage and menisci touching the fibula go, each
#: plate and meniscus keeps its major piece(s) (>= 10 % of the largest), and medial/lateral
#: structures are put on their own side of the knee. The side rule comes last: its boundary is
#: computed from the voxels left, so no later step may move it.
CONSISTENCY_STEPS: list[dict[str, Any]] = [
    {"name": "fibula_contact", "distance_mm": 1.0},
    {
        "name": "major_components",
        "labels": list(_SOFT_LABELS),
        "min_fraction": 0.1,
    },
    {"name": "medial_lateral_sides"},
]

#: Steps after which every label's old bounding box still holds all its voxels (they remove voxels,
#: or fill holes, which lie inside the box): the next step reuses the boxes (find_objects is one
#: pass over the map, 30-60 ms per step on the 384 x 384 x 160 benchmark knee).
_KEEP_BOXES = frozenset({"largest_component", "fill_holes", "opening", "major_components", "fibula_contact"})

#: Steps that take the boxes from the context.
_READS_BOXES = _KEEP_BOXES | {"medial_lateral_sides"}

STEPS: dict[str, Callable[..., np.ndarray]] = {
    "largest_component": _largest_component_step,
    "fill_holes": _fill_holes_step,
    "closing": _closing_step,
    "opening": _opening_step,
    "mese_refinement": _mese_refinement_step,
    "major_components": _major_components_step,
    "medial_lateral_sides": _medial_lateral_step,
    "fibula_contact": _fibula_contact_step,
}


def apply_postprocessing(
    labels: Volume,
    steps: Sequence[Mapping[str, Any]],
    probabilities: Any = None,
    t2_ms: np.ndarray | None = None,
) -> Volume:
    """Run named post-processing steps on a label map, in order.

    Parameters
    ----------
    labels : Volume
        3D label map (label values of :data:`~KneeSegLogic.tissues.TISSUES`).
    steps : sequence of dict
        Each ``{"name": ..., options}``; ``"labels"`` (a list of label values) limits a step to
        those structures, in priority order for ``closing``:

        - ``{"name": "largest_component", "components": 1, "connectivity": 3}``
        - ``{"name": "fill_holes"}``
        - ``{"name": "closing", "radius_mm": 3.0}`` (ball in mm, from the volume's spacing)
        - ``{"name": "opening", "radius_mm": 1.5}`` (removed voxels become background)
        - ``{"name": "mese_refinement", "label": 1, "candidate_threshold": 0.01,
          "t2_range_ms": [0, 100], "threshold": 0.501, "min_voxels_per_slice": 425,
          "slice_axis": 0}`` (needs ``probabilities``; uses ``t2_ms`` when given)
        - ``{"name": "major_components", "min_fraction": 0.1}`` (pieces of at least that share of the
          largest piece of each label)
        - ``{"name": "medial_lateral_sides"}`` (medial/lateral tibial cartilage and menisci
          relabelled to the side of the knee they lie on)
        - ``{"name": "fibula_contact", "distance_mm": 1.0}`` (no cartilage or meniscus on the fibula)
    probabilities : ndarray, shape (classes, k, j, i), or indexable by label value, optional
        Class probability maps, channel index = label value; anything whose ``[label]`` gives that
        label's (k, j, i) map will do (segment passes maps resampled on demand).
    t2_ms : ndarray, shape (k, j, i), optional
        T2 map in ms on the same grid.

    Returns
    -------
    Volume
        A new label map on the same grid; the input is not modified.

    Raises
    ------
    KneeSegError
        An unknown step name or option, or a step that lacks its inputs.
    """
    context: dict[str, Any] = {"probabilities": probabilities, "t2_ms": t2_ms}
    named = []
    for number, step in enumerate(steps, start=1):
        options = dict(step)
        name = options.pop("name", None)
        if name not in STEPS:
            raise KneeSegError(f"post-processing step {number}: unknown name {name!r}; known: {sorted(STEPS)}")
        try:
            inspect.signature(STEPS[name]).bind(labels.array, labels, context, **options)
        except TypeError as error:
            raise KneeSegError(f"post-processing step {number} ({name}): {error}") from None
        named.append((name, STEPS[name], options))
    box = _working_box(labels, steps)
    region = labels if box is None else labels.region(box)
    array = region.array
    for name, function, options in named:
        if context.get("boxes") is None and name in _READS_BOXES:
            context["boxes"] = ndimage.find_objects(array if array.dtype.kind in "iu" else array.astype(np.int64))
        array = function(array, region, context, **options)
        if name not in _KEEP_BOXES:
            context["boxes"] = None
    if box is None:
        return labels.with_array(array)
    out = np.zeros_like(labels.array)
    out[box] = array
    return labels.with_array(out)


# Steps that may read inputs or reach voxels far from the labelled structures (post-processing
# then runs on the whole grid).
_WHOLE_GRID_STEPS = frozenset({"mese_refinement"})


def _working_box(labels: Volume, steps: Sequence[Mapping[str, Any]]) -> tuple[slice, ...] | None:
    """The bounding box of every labelled voxel widened by the farthest any step reaches (its
    radius or distance in mm, plus two voxels), or None when post-processing must see the whole
    grid (an empty map, a step of :data:`_WHOLE_GRID_STEPS`).

    Outside that box the map is background and every step leaves it so: running the steps on the
    box gives the same labels as on the whole grid, without each step's passes over a field of view
    that is mostly air (the knee's box was 56 % of the 512 x 512 x 286 benchmark scan)."""
    if any(step.get("name") in _WHOLE_GRID_STEPS for step in steps) or not labels.array.any():
        return None
    reach_mm = max([float(step.get(key, 0.0)) for step in steps for key in ("radius_mm", "distance_mm")], default=0.0)
    margin = np.ceil(reach_mm / np.asarray(labels.spacing_kji)).astype(int) + 2
    return _bounding_box(labels.array, margin)
