"""Where the model is unsure: entropy of the fused softmax, ensemble mutual information.

Maps are normalised by ``log K`` (K classes), so 0 means certain (one-hot) and 1 means uniform
over all classes, whatever the number of structures. With several ensemble members the total
uncertainty H(mean p) splits into the mean member entropy (aleatoric) and the mutual information
H(mean p) - mean H(p_m) (epistemic: members disagree), as in deep-ensemble uncertainty.
"""

from __future__ import annotations

import numpy as np
import torch

from KneeSegLogic.tissues import BY_LABEL

#: Step of the uncertainty maps as written (NRRD header ``KneeSeg.quantisation_step``).
UNCERTAINTY_STEP = 1e-3


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Normalised Shannon entropy over axis 0 of a (C, ...) probability array, float32 in [0, 1]."""
    classes = probabilities.shape[0]
    total = np.zeros(probabilities.shape[1:], np.float32)
    term = np.empty(probabilities.shape[1:], np.float32)
    for channel in probabilities:  # one class at a time keeps memory at two extra volumes
        # p log p -> 0 as p -> 0: clipping p inside the log only makes that limit exact.
        np.log(np.clip(channel, 1e-12, 1.0), out=term, dtype=np.float32, casting="unsafe")
        term *= channel
        total -= term
    total *= np.float32(1 / np.log(classes))
    return np.clip(total, 0.0, 1.0, out=total)


def entropy_tensor(probabilities: torch.Tensor) -> torch.Tensor:
    """:func:`entropy` in torch, on the tensor's device: over dim 0 of a (C, ...) tensor."""
    classes = probabilities.shape[0]
    total = torch.zeros(probabilities.shape[1:], dtype=torch.float32, device=probabilities.device)
    for channel in probabilities:  # xlogy: p log p, 0 at p = 0, in one pass
        total -= torch.special.xlogy(channel, channel)
    return (total / float(np.log(classes))).clamp_(0.0, 1.0)


def mutual_information(
    fused_entropy: np.ndarray, mean_member_entropy: np.ndarray, overwrite: bool = False
) -> np.ndarray:
    """Epistemic part of the uncertainty (normalised): H(mean p) - mean H(p_m), clipped at 0.

    It is at most ``fused_entropy`` <= 1, so only the lower clip acts. ``overwrite=True`` reuses
    ``mean_member_entropy``'s memory for the result (a full-size float32 array less at peak).
    """
    out = mean_member_entropy if overwrite else None
    difference = np.subtract(fused_entropy, mean_member_entropy, out=out, dtype=np.float32)
    return np.maximum(difference, np.float32(0), out=difference)


def _dilate_faces(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Binary dilation by the face-connected cross, ``iterations`` times (outside the array: False).

    The same voxels as ``scipy.ndimage.binary_dilation(mask, iterations=...)`` with its default
    structure, by shifted ORs of whole slabs (a few passes over the array instead of a neighbourhood
    loop per voxel).
    """
    for _ in range(iterations):
        grown = mask.copy()
        for axis in range(mask.ndim):
            before = [slice(None)] * mask.ndim
            after = [slice(None)] * mask.ndim
            before[axis], after[axis] = slice(None, -1), slice(1, None)
            grown[tuple(after)] |= mask[tuple(before)]
            grown[tuple(before)] |= mask[tuple(after)]
        mask = grown
    return mask


def foreground_masked(uncertainty: np.ndarray, labels: np.ndarray, margin_voxels: int = 2) -> np.ndarray:
    """Uncertainty kept near predicted structures (within ``margin_voxels``), 0 elsewhere.

    "Near" is the dilation of the foreground by the face-connected cross ``margin_voxels`` times
    (city-block distance <= ``margin_voxels``). Far background is usually certain; masking hides the
    noise there so the heatmap shows the boundaries a corrector should look at.
    """
    from scipy import ndimage

    foreground = labels > 0
    out = np.zeros(uncertainty.shape, np.float32)
    boxes = ndimage.find_objects(foreground.view(np.uint8))
    if not boxes or boxes[0] is None:
        return out
    # Only the foreground's bounding box widened by the margin can be near a structure.
    box = tuple(
        slice(max(0, b.start - margin_voxels), min(n, b.stop + margin_voxels)) for b, n in zip(boxes[0], labels.shape)
    )
    near = _dilate_faces(foreground[box], margin_voxels)
    np.copyto(out[box], uncertainty[box], where=near)
    return out


def quantised(values: np.ndarray, step: float = UNCERTAINTY_STEP) -> np.ndarray:
    """``values`` rounded to multiples of ``step`` (float32): what the written maps hold.

    Runs of equal values compress several times better than full float32 mantissas; the error is
    at most ``step / 2`` (plus float32 rounding, ~1e-7).
    """
    out = np.multiply(values, np.float32(1 / step), dtype=np.float32)
    np.rint(out, out=out)
    out *= np.float32(step)
    return out


def label_sums(labels: np.ndarray, weights: np.ndarray | None = None, slab_voxels: int = 1 << 21) -> np.ndarray:
    """Per label value (index), the number of its voxels, or the sum of ``weights`` over them (float64).

    ``np.bincount`` over slabs of about ``slab_voxels``: over the whole array it first copies the
    labels to int64 (600 MB for the 512 x 512 x 286 knee), in slabs the copy is a few MB reused;
    on uint8 label maps this is twice as fast as ``ndimage.histogram`` (the int32 piece maps of
    ``ndimage.label`` are the other way round: :func:`~KneeSegLogic.segmentation.postprocess.piece_sizes`).
    """
    flat = np.asarray(labels).reshape(-1)
    values = None if weights is None else np.asarray(weights).reshape(-1)
    size = int(flat.max(initial=0)) + 1
    sums = np.zeros(size, np.float64 if values is not None else np.int64)
    for start in range(0, flat.size, slab_voxels):
        part = slice(start, start + slab_voxels)
        sums += np.bincount(flat[part], None if values is None else values[part], minlength=size)
    return sums


def per_structure(uncertainty: np.ndarray, labels: np.ndarray, counts: np.ndarray | None = None) -> dict[str, float]:
    """Mean uncertainty over the voxels predicted as each structure (key -> value); ``counts`` are
    the labels' :func:`label_sums` when the caller has them already."""
    counts = label_sums(labels) if counts is None else counts
    sums = label_sums(labels, uncertainty)
    return {
        BY_LABEL[label].key: round(float(sums[label] / counts[label]), 5)
        for label in range(1, counts.size)
        if counts[label] and label in BY_LABEL
    }


def most_uncertain_slices(
    uncertainty: np.ndarray,
    labels: np.ndarray,
    index_to_physical: np.ndarray,
    count: int = 5,
    slice_axis: int = 0,
    masked: np.ndarray | None = None,
) -> list[dict]:
    """The slices most worth a human look, for the correction workflow.

    Slices along array axis ``slice_axis`` (axis 0 = the scan's own slices) are ranked by the sum
    of uncertainty near predicted structures (so both large unsure areas and many unsure
    boundaries count). Each entry gives the slice index, its score, the mean uncertainty there,
    the structures present and the LPS position (mm) of the slice centre for jumping to it.
    ``masked`` is :func:`foreground_masked` of the inputs when the caller has it already.
    """
    if masked is None:
        masked = foreground_masked(uncertainty, labels)
    other = tuple(a for a in range(masked.ndim) if a != slice_axis)
    scores = masked.sum(axis=other)
    order = [int(i) for i in np.argsort(scores)[::-1] if scores[i] > 0][:count]
    entries = []
    for index in order:
        selector: list[slice | int] = [slice(None)] * masked.ndim
        selector[slice_axis] = index
        slice_labels = labels[tuple(selector)]
        present = [BY_LABEL[int(v)].key for v in np.unique(slice_labels) if v and int(v) in BY_LABEL]
        centre_kji = [(n - 1) / 2 for n in masked.shape]
        centre_kji[slice_axis] = index
        centre_ijk = np.array([centre_kji[2], centre_kji[1], centre_kji[0], 1.0])
        position = index_to_physical @ centre_ijk
        nonzero = masked[tuple(selector)]
        entries.append(
            {
                "slice_index": index,
                "axis": "k" if slice_axis == 0 else ("j" if slice_axis == 1 else "i"),
                "score": round(float(scores[index]), 3),
                "mean_uncertainty": round(float(nonzero[nonzero > 0].mean()), 4) if np.any(nonzero > 0) else 0.0,
                "structures": present,
                "position_lps_mm": [round(float(v), 3) for v in position[:3]],
            }
        )
    return entries
