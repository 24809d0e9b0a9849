"""Held-out synthetic test scans: whole knees in named contrasts and acquisition orientations.

Training samples are small random boxes; these are whole scans on a native grid, synthesised
with seeds and deformations never used in training, each in one named contrast and acquisition
(e.g. proton density fat-sat with 3 mm sagittal slices, T1 with 3 mm coronal slices), so the
*whole* inference pipeline (working grids, ensemble fusion, mapping back) is measured against
known labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from KneeSegLogic.io.volume import Volume
from KneeSegLogic.segmentation.normalisation import CANONICAL_ORIENTATION
from KneeSegLogic.training.synthesis import Anatomy, AnatomySettings, SynthesisSettings, Synthesizer

# (name, contrast, thick-slice axis of the canonical box or None for 3D, slice thickness mm)
HELDOUT_ACQUISITIONS: tuple[tuple[str, str, int | None, float], ...] = (
    ("pd_fatsat sagittal 3 mm", "pd_fatsat", 0, 3.0),
    ("t1 coronal 3 mm", "t1", 2, 3.0),
    ("dess_we sagittal 3D", "dess_we", None, 0.0),
    ("lowfield_gre axial 4 mm", "lowfield_gre", 1, 4.0),
    ("mese_echo2 sagittal 4 mm", "mese_echo2", 0, 4.0),
)

BOX_SHAPE = (64, 224, 224)

BOX_SPACING_MM = (1.5, 0.6, 0.6)


@dataclass(frozen=True)
class HeldoutCase:
    name: str
    image: Volume
    labels: Volume


def canonical_direction() -> np.ndarray:
    """Direction matrix (columns i, j, k) of the canonical box frame (P, I, R axes)."""
    return np.asarray(sitk.DICOMOrientImageFilter.GetDirectionCosinesFromOrientation(CANONICAL_ORIENTATION)).reshape(
        3, 3
    )


def heldout_cases(
    anatomies: list[Anatomy], seed: int = 90_000, repeats: int = 1, names: list[str] | None = None
) -> list[HeldoutCase]:
    """``repeats`` whole synthetic scans per :data:`HELDOUT_ACQUISITIONS` entry and per anatomy (seeds
    unused in training), each knee as it is (no anatomy augmentation).

    Repeat ``r`` of acquisition ``n`` of anatomy ``a`` uses seed ``seed + 1000 a + 100 r + n``, so the
    first repeat is the same scan whatever ``repeats`` is; repeats after the first are named
    ``"<acquisition> #<r+1>"``; with several anatomies each name starts with the knee's name
    (``names``, default ``knee <a+1>``).
    """
    cases = []
    for index, anatomy in enumerate(anatomies):
        prefix = "" if len(anatomies) == 1 else f"{names[index] if names else f'knee {index + 1}'}: "
        for repeat in range(repeats):
            for number, (name, contrast, axis, thickness) in enumerate(HELDOUT_ACQUISITIONS):
                settings = SynthesisSettings(
                    rotation_deg=5.0,
                    elastic_mm=2.0,
                    random_contrast_probability=0.0,
                    contrast=contrast,
                    thick_slice_probability=1.0 if axis is not None else 0.0,
                    thick_slice_mm=(thickness, thickness),
                    thick_slice_axis=axis,
                    noise_range=(0.02, 0.04),
                    fov_crop_probability=0.0,
                    real_image_probability=0.0,
                    anatomy=AnatomySettings(probability=0.0),
                )
                case_seed = seed + 1000 * index + 100 * repeat + number
                synthesizer = Synthesizer([anatomy], BOX_SHAPE, BOX_SPACING_MM, settings, seed=case_seed)
                # Centre the knee: the middle of the range training centres were drawn from.
                low, high = anatomy.centre_range
                image, labels = synthesizer.sample(centre=(low + high) / 2)
                spacing_ijk = (BOX_SPACING_MM[2], BOX_SPACING_MM[1], BOX_SPACING_MM[0])
                direction = canonical_direction()
                origin = (0.0, 0.0, 0.0)
                cases.append(
                    HeldoutCase(
                        prefix + (name if repeat == 0 else f"{name} #{repeat + 1}"),
                        Volume(image.numpy().astype(np.float32) * 1000, spacing_ijk, origin, direction),
                        Volume(labels.numpy().astype(np.uint8), spacing_ijk, origin, direction),
                    )
                )
    return cases
