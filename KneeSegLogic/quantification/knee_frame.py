"""The knee's anatomical frame in a scan: left-right (slice) axis, inferior, posterior, medial side.

Region division, thickness and projection maps work in millimetres in this frame, never in
array order, so they give the same answer for any acquisition orientation and for left and right
knees.

Axes
----
- **Left-right (LR) axis**: the image axis whose direction is closest to the patient's left-right
  axis (LPS x). Sagittal knee scans are prescribed along the knee's own anatomy (the condyles), so
  this image axis follows the knee better than the scanner x axis; for a sagittal scan it is the
  slice axis and projection maps keep one row per slice. ``lr`` coordinates increase toward the
  patient's left.
- **Inferior** and **posterior**: LPS -z and +y made orthogonal to the LR axis (Gram-Schmidt),
  so together with LR they form an orthonormal frame; the sagittal plane is (inferior, posterior).

Medial side
-----------
Medial is toward the body midline. Which way along LR that is follows from the knee's side, decided
from the anatomy in the label map, strongest evidence first:

1. labelled medial structures (medial tibial cartilage 2, medial meniscus 10) against lateral ones
   (lateral tibial cartilage 3, lateral meniscus 9): medial is the side of the medial centroid;
2. the fibula (8), which is lateral: medial is away from the fibula, relative to the tibia (6)
   (else the femur 5, else the femoral cartilage 1);
3. patient coordinates: scanner x = 0 lies near the body midline, so a knee centred at LPS x < 0
   (patient right) is a right knee, whose medial side is toward +x. This is the weakest rule
   (off-centre table positions break it) and is reported as such.

An explicit ``knee_side`` ("left"/"right") overrides all three.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from KneeSegLogic.io.volume import Volume, as_triple
from KneeSegLogic.tissues import tissue

KNEE_SIDES = ("left", "right")

_MEDIAL = (tissue("medial_tibial_cartilage").label, tissue("medial_meniscus").label)

_LATERAL = (tissue("lateral_tibial_cartilage").label, tissue("lateral_meniscus").label)

_FIBULA = tissue("fibula").label

_FIBULA_REFERENCES = (tissue("tibia").label, tissue("femur").label, tissue("femoral_cartilage").label)


@dataclass(frozen=True)
class KneeFrame:
    """Orthonormal anatomical axes of a knee scan and the side of the knee.

    Attributes
    ----------
    lr_axis : int
        Array axis (0 = k, 1 = j, 2 = i of ``Volume.array``) that runs left-right.
    lr_step_sign : int
        +1 when increasing the index along ``lr_axis`` moves toward the patient's left.
    left, inferior, posterior : ndarray, shape (3,)
        LPS unit vectors of the frame.
    knee_side : str
        ``"left"`` or ``"right"``.
    side_evidence : str
        Which rule decided the side (see the module docstring).
    lr_obliquity_deg : float
        Angle between the LR image axis and the patient's left-right axis.
    """

    lr_axis: int
    lr_step_sign: int
    left: np.ndarray
    inferior: np.ndarray
    posterior: np.ndarray
    knee_side: str
    side_evidence: str
    lr_obliquity_deg: float

    @property
    def medial_sign(self) -> int:
        """+1 when medial is toward increasing ``lr`` (toward the patient's left): a right knee."""
        return 1 if self.knee_side == "right" else -1

    def coordinates(self, volume: Volume, index: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
        """Frame coordinates (mm) of voxels given by array indices ``(k, j, i)``.

        Returns
        -------
        ndarray, shape (n, 3)
            Columns ``lr`` (toward patient left), ``inferior``, ``posterior``, each the dot product
            of the voxel's LPS position with the frame axis.
        """
        basis = np.stack([self.left, self.inferior, self.posterior])  # rows: frame axes in LPS
        # index (i, j, k) -> LPS is origin + direction @ (spacing * ijk); fold the basis in once.
        linear = basis @ volume.direction @ np.diag(volume.spacing)
        offset = basis @ np.asarray(volume.origin)
        k, j, i = index
        ijk = np.stack([i, j, k], axis=1).astype(float)
        return ijk @ linear.T + offset

    def axis_vector(self, volume: Volume, array_axis: int) -> np.ndarray:
        """Frame components (lr, inferior, posterior) of one voxel step along ``array_axis``, in mm."""
        itk_axis = 2 - array_axis
        step = volume.direction[:, itk_axis] * volume.spacing[itk_axis]
        return np.array([self.left @ step, self.inferior @ step, self.posterior @ step])


def knee_frame(labels: Volume, knee_side: str | None = None) -> KneeFrame:
    """The anatomical frame of a knee label map (see the module docstring for the rules).

    Parameters
    ----------
    labels : Volume
        3D label map with :data:`~KneeSegLogic.tissues.TISSUES` label values.
    knee_side : {"left", "right"}, optional
        Known side of the knee; when given, the anatomy is not consulted.
    """
    x_component = labels.direction[0]  # LPS x component of each ITK axis
    itk_axis = int(np.argmax(np.abs(x_component)))
    lr_step_sign = 1 if x_component[itk_axis] > 0 else -1
    left = labels.direction[:, itk_axis] * lr_step_sign
    inferior = _orthogonalised(np.array([0.0, 0.0, -1.0]), [left])
    posterior = _orthogonalised(np.array([0.0, 1.0, 0.0]), [left, inferior])
    obliquity = float(np.degrees(np.arccos(min(1.0, abs(x_component[itk_axis])))))
    if knee_side is not None:
        if knee_side not in KNEE_SIDES:
            raise ValueError(f"knee_side must be one of {KNEE_SIDES}, got {knee_side!r}")
        side, evidence = knee_side, "given by the user"
    else:
        side, evidence = infer_knee_side(labels, left)
    return KneeFrame(2 - itk_axis, lr_step_sign, left, inferior, posterior, side, evidence, obliquity)


def _orthogonalised(vector: np.ndarray, against: list[np.ndarray]) -> np.ndarray:
    for unit in against:
        vector = vector - (vector @ unit) * unit
    return vector / np.linalg.norm(vector)


def infer_knee_side(labels: Volume, left: np.ndarray) -> tuple[str, str]:
    """Side of the knee ("left"/"right") from its anatomy, and the rule that decided it.

    ``left`` is the LPS unit vector of the frame's LR axis; centroids are compared along it.
    """
    # Every second voxel along each axis: the same geometry, an eighth of the work (the bones
    # are millions of voxels), centroids good to a fraction of a millimetre.
    sparse = Volume(
        labels.array[::2, ::2, ::2], as_triple([2 * s for s in labels.spacing]), labels.origin, labels.direction
    )
    centroids = label_centroids(sparse)
    medial = [centroids[v] for v in _MEDIAL if v in centroids]
    lateral = [centroids[v] for v in _LATERAL if v in centroids]
    if medial and lateral:
        medial_toward_left = (np.mean(medial, axis=0) - np.mean(lateral, axis=0)) @ left > 0
        return ("right" if medial_toward_left else "left"), "medial vs lateral tibial cartilage/menisci"
    reference = next((v for v in _FIBULA_REFERENCES if v in centroids), None)
    if _FIBULA in centroids and reference is not None:
        fibula_toward_left = (centroids[_FIBULA] - centroids[reference]) @ left > 0
        return ("left" if fibula_toward_left else "right"), "fibula (lateral) relative to " + tissue(reference).key
    centre = np.mean(list(centroids.values()), axis=0) if centroids else np.zeros(3)
    return ("right" if centre[0] < 0 else "left"), "patient coordinates (knee at LPS x < 0 is a right knee)"


def label_centroids(labels: Volume) -> dict[int, np.ndarray]:
    """LPS centroid (mm) of every non-zero label value present."""
    flat = np.flatnonzero(labels.array)
    values = labels.array.ravel()[flat].astype(np.int64)
    counts = np.bincount(values)
    k, j, i = np.unravel_index(flat, labels.array.shape)
    present = np.flatnonzero(counts)
    mean_index = (
        np.stack([np.bincount(values, weights=axis)[present] for axis in (i, j, k)], axis=1) / counts[present, None]
    )
    lps = np.asarray(labels.origin) + (mean_index * np.asarray(labels.spacing)) @ labels.direction.T
    return {int(value): point for value, point in zip(present, lps)}
