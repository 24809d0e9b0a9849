"""Where the model is unsure: entropy of the fused softmax, ensemble mutual information.

Maps are normalised by ``log K`` (K classes), so 0 means certain (one-hot) and 1 means uniform
over all classes, whatever the number of structures. With several ensemble members the total
uncertainty H(mean p) splits into the mean member entropy (aleatoric) and the mutual information
H(mean p) - mean H(p_m) (epistemic: members disagree), as in deep-ensemble uncertainty.
"""

from __future__ import annotations

import numpy as np

from KneeSegLogic.tissues import BY_LABEL


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Normalised Shannon entropy over axis 0 of a (C, ...) probability array, in [0, 1]."""
    classes = probabilities.shape[0]
    total = np.zeros(probabilities.shape[1:], np.float32)
    for channel in probabilities:  # one class at a time keeps memory at one extra volume
        p = np.clip(channel, 1e-12, 1.0)
        total -= np.where(channel > 0, channel * np.log(p), 0.0).astype(np.float32)
    return np.clip(total / np.log(classes), 0.0, 1.0)


def mutual_information(fused_entropy: np.ndarray, mean_member_entropy: np.ndarray) -> np.ndarray:
    """Epistemic part of the uncertainty (normalised): H(mean p) - mean H(p_m), clipped at 0."""
    return np.clip(fused_entropy - mean_member_entropy, 0.0, 1.0)


def foreground_masked(uncertainty: np.ndarray, labels: np.ndarray, margin_voxels: int = 2) -> np.ndarray:
    """Uncertainty kept near predicted structures (within ``margin_voxels``), 0 elsewhere.

    Far background is usually certain; masking hides the noise there so the heatmap shows the
    boundaries a corrector should look at.
    """
    from scipy import ndimage

    near = ndimage.binary_dilation(labels > 0, iterations=margin_voxels) if margin_voxels else labels > 0
    return np.where(near, uncertainty, 0.0).astype(np.float32)


def per_structure(uncertainty: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Mean uncertainty over the voxels predicted as each structure (key -> value)."""
    summary = {}
    for label in np.unique(labels):
        if label == 0 or int(label) not in BY_LABEL:
            continue
        summary[BY_LABEL[int(label)].key] = round(float(uncertainty[labels == label].mean()), 5)
    return summary


def most_uncertain_slices(
    uncertainty: np.ndarray, labels: np.ndarray, index_to_physical: np.ndarray, count: int = 5, slice_axis: int = 0
) -> list[dict]:
    """The slices most worth a human look, for the correction workflow.

    Slices along array axis ``slice_axis`` (axis 0 = the scan's own slices) are ranked by the sum
    of uncertainty near predicted structures (so both large unsure areas and many unsure
    boundaries count). Each entry gives the slice index, its score, the mean uncertainty there,
    the structures present and the LPS position (mm) of the slice centre for jumping to it.
    """
    masked = foreground_masked(uncertainty, labels)
    other = tuple(a for a in range(masked.ndim) if a != slice_axis)
    scores = masked.sum(axis=other)
    order = [int(i) for i in np.argsort(scores)[::-1] if scores[i] > 0][:count]
    entries = []
    for index in order:
        selector = [slice(None)] * masked.ndim
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
