"""Intensity normalisation and the canonical frame, shared by training and inference.

A network sees images in the canonical orientation (:data:`CANONICAL_ORIENTATION`) with
intensities normalised as its package says; training uses the same functions so the two agree.
"""

from __future__ import annotations

from typing import overload

import numpy as np
import torch

from KneeSegLogic.errors import KneeSegError

#: Orientation code of the canonical frame: array axes (k, j, i) point to R, I, P (sagittal k).
CANONICAL_ORIENTATION = "PIR"


@overload
def normalise_intensity(image: np.ndarray, low: float = ..., high: float = ...) -> np.ndarray: ...
@overload
def normalise_intensity(image: torch.Tensor, low: float = ..., high: float = ...) -> torch.Tensor: ...
def normalise_intensity(
    image: torch.Tensor | np.ndarray, low: float = 1.0, high: float = 99.0
) -> torch.Tensor | np.ndarray:
    """Map the ``low``-``high`` percentile range to [0, 1] (clipped to [-0.2, 1.5]).

    Used identically in training and inference; robust to scanner units and to outliers.
    """
    as_numpy = isinstance(image, np.ndarray)
    tensor = torch.from_numpy(image) if isinstance(image, np.ndarray) else image
    flat = tensor.reshape(-1).float()
    if flat.numel() > 2_000_000:  # a strided subsample is enough for percentiles
        flat = flat[:: flat.numel() // 1_000_000]
    p_low, p_high = torch.quantile(flat, torch.tensor([low / 100, high / 100]))
    result = ((tensor.float() - p_low) / (p_high - p_low).clamp(min=1e-6)).clamp(-0.2, 1.5)
    return result.numpy() if as_numpy else result


def normalise(array: np.ndarray, normalisation: dict) -> np.ndarray:
    """Intensity normalisation named in a member's input contract."""
    name = normalisation["name"]
    if name == "percentile":
        return normalise_intensity(array.astype(np.float32), normalisation["low"], normalisation["high"])
    values = array.astype(np.float32)
    if name == "zscore":
        foreground = values[values > np.percentile(values, 10)]
        return (values - foreground.mean()) / max(float(foreground.std()), 1e-6)
    if name == "quartile":  # Thomas et al.: median 0, quartiles -1/+1, clipped to the 3rd-97th percentiles
        p3, q1, median, q3, p97 = np.percentile(values, [3, 25, 50, 75, 97])
        values = np.clip(values, p3, p97)
        return (values - median) / max((q3 - q1) / 2, 1e-6)
    raise KneeSegError(f"unknown normalisation {name!r}")
