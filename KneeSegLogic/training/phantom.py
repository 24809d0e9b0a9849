"""Synthetic multi-echo knee images from a label map, with the true T2 map.

Used by the T2 and segmentation tests (known answers) and as a building block of training-data
synthesis. Signal model per voxel: ``S(TE) = PD * exp(-TE / T2)``, then Rician noise (complex
Gaussian noise of SD ``sigma`` per channel, magnitude taken), as a single-coil magnitude MESE.

Tissue values are literature-typical at 3 T (MESE, mono-exponential T2): articular cartilage
30-45 ms, menisci 10-20 ms, muscle about 35 ms, marrow fat about 60 ms (MESE lengthens fat T2
through J-coupling), cortical bone a few ms, joint fluid several hundred ms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from KneeSegLogic.io.volume import Volume
from KneeSegLogic.tissues import BY_KEY

#: Default echo times (ms): an OAI-like 7-echo train at 10 ms steps (the first dropped by fits).
DEFAULT_ECHO_TIMES_MS: tuple[float, ...] = (10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0)

#: (proton density, T2 in ms) per structure key; ``soft_tissue`` fills the body around them,
#: ``cortex`` the outer millimetre of each bone, ``fluid`` a thin layer in the joint space.
TISSUE_PROPERTIES: dict[str, tuple[float, float]] = {
    "femoral_cartilage": (0.80, 40.0),
    "medial_tibial_cartilage": (0.78, 33.0),
    "lateral_tibial_cartilage": (0.78, 35.0),
    "patellar_cartilage": (0.82, 42.0),
    "femur": (0.95, 60.0),
    "tibia": (0.95, 60.0),
    "patella": (0.95, 60.0),
    "fibula": (0.95, 60.0),
    "lateral_meniscus": (0.35, 15.0),
    "medial_meniscus": (0.35, 14.0),
    "soft_tissue": (0.55, 35.0),
    "cortex": (0.05, 5.0),
    "fluid": (1.00, 300.0),
}

BODY_MARGIN_MM = 15.0

CORTEX_MM = 1.0


@dataclass(frozen=True)
class Phantom:
    """A synthetic multi-echo scan and its ground truth.

    Attributes
    ----------
    image : Volume
        4D magnitude image ``array[k, j, i, echo]`` with ``echo_times_ms``, on the label grid.
    t2_ms : ndarray
        True T2 (ms) per voxel; 0 in air.
    proton_density : ndarray
        True S0 per voxel (signal at TE = 0).
    sigma : float
        Noise SD per channel (the Rician ``sigma``).
    """

    image: Volume
    t2_ms: np.ndarray
    proton_density: np.ndarray
    sigma: float


def tissue_maps(
    labels: Volume, properties: Mapping[str, tuple[float, float]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Proton-density and T2 (ms) maps for a knee label map (labels as in :mod:`tissues`)."""
    properties = {**TISSUE_PROPERTIES, **(properties or {})}
    label_array = labels.array
    spacing = np.asarray(labels.spacing_kji)
    proton_density = np.zeros(label_array.shape, np.float32)
    t2 = np.zeros(label_array.shape, np.float32)

    structures = label_array > 0
    distance_outside = ndimage.distance_transform_edt(~structures, sampling=spacing)
    body = distance_outside <= BODY_MARGIN_MM
    proton_density[body], t2[body] = properties["soft_tissue"]

    for key, tissue in BY_KEY.items():
        mask = label_array == tissue.label
        if not mask.any():
            continue
        pd, t2_value = properties[key]
        proton_density[mask], t2[mask] = pd, t2_value
        if tissue.group == "bone":
            depth = ndimage.distance_transform_edt(mask, sampling=spacing)
            # At least the outermost voxel layer, also on grids coarser than the cortex.
            cortex = mask & (depth <= max(CORTEX_MM, float(spacing.max())))
            proton_density[cortex], t2[cortex] = properties["cortex"]
    # Joint fluid: a thin film of background touching cartilage (within one voxel).
    cartilage = np.isin(label_array, [t.label for t in BY_KEY.values() if t.group == "cartilage"])
    film = ndimage.binary_dilation(cartilage) & (label_array == 0)
    proton_density[film], t2[film] = properties["fluid"]
    return proton_density, t2


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of ``signal`` plus complex Gaussian noise of SD ``sigma`` per channel."""
    real = signal + rng.normal(0.0, sigma, signal.shape)
    imaginary = rng.normal(0.0, sigma, signal.shape)
    return np.hypot(real, imaginary)


def synthesize_mese(
    labels: Volume,
    echo_times_ms: Sequence[float] = DEFAULT_ECHO_TIMES_MS,
    snr: float = 40.0,
    scale: float = 1000.0,
    first_echo_factor: float = 1.0,
    properties: Mapping[str, tuple[float, float]] | None = None,
    seed: int = 0,
) -> Phantom:
    """A multi-echo spin-echo image of the anatomy in ``labels`` with known T2.

    Parameters
    ----------
    labels : Volume
        3D knee label map (label values as in :data:`KneeSegLogic.tissues.TISSUES`).
    echo_times_ms : sequence of float
        Echo times in ms, increasing.
    snr : float
        Signal of proton density 1 at TE = 0 divided by the noise SD ``sigma``.
    scale : float
        Signal of proton density 1 at TE = 0 (arbitrary scanner units).
    first_echo_factor : float
        Multiplies echo 1 (before noise): values other than 1 mimic the stimulated-echo error of
        real MESE trains, which is why fits skip echo 1.
    properties : mapping, optional
        Overrides of :data:`TISSUE_PROPERTIES`.
    seed : int
        Seed of the noise generator.
    """
    echo_times = np.asarray(echo_times_ms, dtype=float)
    proton_density, t2 = tissue_maps(labels, properties)
    s0 = proton_density * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        decay = np.where(t2[..., None] > 0, np.exp(-echo_times / np.maximum(t2[..., None], 1e-6)), 0.0)
    signal = s0[..., None] * decay
    signal[..., 0] *= first_echo_factor
    sigma = scale / snr
    noisy = rician(signal, sigma, np.random.default_rng(seed)).astype(np.float32)
    image = Volume(noisy, labels.spacing, labels.origin, labels.direction, tuple(echo_times))
    return Phantom(image=image, t2_ms=t2, proton_density=s0, sigma=sigma)
