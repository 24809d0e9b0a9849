"""Euclidean distance transforms of boolean masks (the ``edt`` package), in array order.

One home for every distance map the engine takes: the ball morphology of post-processing and
the surface distances of evaluation.
"""

from __future__ import annotations

from typing import Any

import edt
import numpy as np


def squared_distances(mask: np.ndarray, **options: Any) -> np.ndarray:
    """Squared Euclidean distance of every True voxel of a boolean ``mask`` to the nearest False
    one (0 on False voxels), float32; in mm^2 when ``anisotropy`` is the spacing in mm per array
    axis. ``options`` are edt's (``anisotropy``, ``black_border``: whether the array border counts
    as False, default no; ``parallel``: threads).

    The mask goes to edt as uint8 (a view of the same bytes, same answer): edt 3.1 takes a bool
    array three times slower (1.1 against 0.36 s for the femur box of the 512 x 512 x 286 knee).
    """
    return edt.edtsq(np.ascontiguousarray(mask, dtype=bool).view(np.uint8), **options)
