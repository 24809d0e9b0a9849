"""Rebuild the bundled sample data from the original MIT-licensed pymskt files.

Run from the repository root with ../shared/data present:
    python Resources/SampleData/make_sample_data.py ../shared/data

- ``mese_t2_knee.nrrd``: the 8-echo MESE knee (GE MR750, 3 T) reduced 2x in-plane by averaging
  2x2 voxel blocks (0.625 -> 1.25 mm, 256 -> 128 pixels), int16, echo times in the header.
  Averaging is done on magnitudes per echo, so each echo's decay is kept.
- ``knee_labels.nrrd``: the OAI-grid knee label map (labels 0-10), unchanged.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

from KneeSegLogic.volume import Volume, read_volume, write_volume

HERE = Path(__file__).resolve().parent


def reduce_in_plane(volume: Volume, factor: int = 2) -> Volume:
    """Average ``factor`` x ``factor`` blocks in the (i, j) plane; geometry follows exactly."""
    k, j, i = volume.array.shape[:3]
    j2, i2 = j // factor, i // factor
    blocks = volume.array[:, : j2 * factor, : i2 * factor].reshape(k, j2, factor, i2, factor, *volume.array.shape[3:])
    array = blocks.mean(axis=(2, 4))
    spacing = (volume.spacing[0] * factor, volume.spacing[1] * factor, volume.spacing[2])
    # The new voxel centre is the centre of the block: half an old voxel less than half a new one.
    shift = np.array([(factor - 1) / 2 * volume.spacing[0], (factor - 1) / 2 * volume.spacing[1], 0.0])
    origin = np.asarray(volume.origin) + volume.direction @ shift
    return Volume(np.round(array).astype(np.int16), spacing, tuple(origin), volume.direction, volume.echo_times_ms)


def main(shared_data: Path) -> None:
    mese = read_volume(shared_data / "mese_t2_knee_pymskt")
    write_volume(reduce_in_plane(mese), HERE / "mese_t2_knee.nrrd")
    shutil.copyfile(
        shared_data / "knee_labels_pymskt" / "SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd",
        HERE / "knee_labels.nrrd",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"))
