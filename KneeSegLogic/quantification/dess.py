"""T2 from a two-echo double-echo steady-state (DESS) scan: the analytic formula.

DESS acquires, every repetition ``TR``, the FISP echo ``S1`` at ``TE`` after the pulse and the
PSIF echo ``S2`` (the echo the unbalanced spoiler refocuses one period later, at ``2 TR - TE``
after the pulse that excited it). Sveinsson et al. (MRI 2017, after Bieri et al.) showed that,
for ``T1 >> TR``, the ratio is::

    S2 / S1 = k exp(-2 (TR - TE) / T2) exp(-c1)
    k  = sin^2(alpha / 2) (1 + E) / (1 - cos(alpha) E),   E = exp(-TR / T1 - TR dk^2 D)
    c1 = (TR - Tg / 3) dk^2 D

with flip angle ``alpha``, assumed tissue ``T1``, diffusion coefficient ``D``, and
``dk = gamma A`` the dephasing (rad/m) of the spoiler gradient of area ``A`` and duration ``Tg``.
Inverted per voxel::

    T2 = -2 (TR - TE) / (log(|S2 / S1| / k) + c1)

Units here: times in ms, ``A`` in mT ms / m, ``D`` in mm^2 / s; converted to SI inside.

Parameters come from the DICOM header where present: ``RepetitionTime``, ``EchoTime`` (of the
first echo), ``FlipAngle``, and GE's private DESS tags (0019,10B6) spoiler area in G us / cm and
(0019,10B7) spoiler duration in us (the tags DOSMA reads). Anything missing must be given as an
option; T1 defaults to 1200 ms (femoral cartilage at 3 T, as DOSMA and pyKNEEr assume) and D to
1.25e-3 mm^2/s (DOSMA's value). Every value used, and where it came from, is recorded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from KneeSegLogic.errors import CancelledError, InputError
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.quantification.relaxometry import DEFAULT_T2_BOUNDS_MS, T2Fit, fittable

#: Proton gyromagnetic ratio, rad / (s T).
GAMMA_RAD_PER_S_T = 2.675221874e8

DEFAULT_T1_MS = 1200.0

DEFAULT_DIFFUSION_MM2_PER_S = 1.25e-3

# GE's private DESS tags and their units (DOSMA's qdess reads the same two).
SPOILER_AREA_TAG = (0x0019, 0x10B6)  # G us / cm

SPOILER_DURATION_TAG = (0x0019, 0x10B7)  # us

# 1 G us / cm = 1e-4 T * 1e-6 s / 1e-2 m = 1e-8 T s / m = 1e-2 mT ms / m.
GAUSS_US_PER_CM_IN_MT_MS_PER_M = 1e-2

#: What a DESS map's times are (``results.json`` ``"times"``): the FISP echo at TE and the PSIF
#: echo, not a spin-echo train.
DESS_TIMES = "echo times (DESS: FISP and PSIF echoes)"


@dataclass(frozen=True)
class DessParameters:
    """Sequence and tissue values the DESS formula needs (ms, degrees, mT ms / m, mm^2 / s).

    ``spoiler_area_mt_ms_per_m`` or ``spoiler_duration_ms`` None (or 0) drop the diffusion
    terms (``dk = 0``). ``sources`` says per field ``"dicom"``, ``"option"`` or ``"default"``.
    """

    repetition_time_ms: float
    echo_time_ms: float
    flip_angle_deg: float
    t1_ms: float = DEFAULT_T1_MS
    spoiler_area_mt_ms_per_m: float | None = None
    spoiler_duration_ms: float | None = None
    diffusion_mm2_per_s: float = DEFAULT_DIFFUSION_MM2_PER_S
    sources: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.echo_time_ms < self.repetition_time_ms:
            raise InputError(
                None, f"DESS needs 0 < TE < TR; got TE {self.echo_time_ms} ms, TR {self.repetition_time_ms} ms"
            )
        if not 0 < self.flip_angle_deg < 180:
            raise InputError(None, f"DESS flip angle must be in (0, 180) degrees, got {self.flip_angle_deg}")
        if not self.t1_ms > 0:
            raise InputError(None, f"assumed T1 must be positive, got {self.t1_ms} ms")

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        values["sources"] = dict(self.sources)
        values["k"], values["c1"] = self.constants()
        return values

    def constants(self) -> tuple[float, float]:
        """``(k, c1)`` of the formula (dimensionless)."""
        tr_s = self.repetition_time_ms * 1e-3
        area = self.spoiler_area_mt_ms_per_m or 0.0
        duration_s = (self.spoiler_duration_ms or 0.0) * 1e-3
        dk = GAMMA_RAD_PER_S_T * area * 1e-6  # rad / m
        attenuation = dk * dk * self.diffusion_mm2_per_s * 1e-6  # 1 / s
        e = math.exp(-self.repetition_time_ms / self.t1_ms - tr_s * attenuation)
        alpha = math.radians(self.flip_angle_deg)
        k = math.sin(alpha / 2) ** 2 * (1 + e) / (1 - math.cos(alpha) * e)
        c1 = (tr_s - duration_s / 3) * attenuation
        return k, c1


def dess_signals(t2_ms: np.ndarray, parameters: DessParameters, s1: float | np.ndarray = 1.0) -> np.ndarray:
    """Echo pairs ``(..., 2)`` the formula maps to ``t2_ms`` (its exact inverse; for tests)."""
    k, c1 = parameters.constants()
    t2 = np.asarray(t2_ms, dtype=float)
    ratio = k * np.exp(-2 * (parameters.repetition_time_ms - parameters.echo_time_ms) / t2 - c1)
    s1 = np.broadcast_to(np.asarray(s1, dtype=float), t2.shape)
    return np.stack([s1, s1 * ratio], axis=-1)


def dess_t2(signal: np.ndarray, parameters: DessParameters) -> np.ndarray:
    """T2 (ms) per voxel of echo pairs ``signal[..., 2]``; NaN where the ratio gives no T2.

    No T2 exists where an echo is not positive, or where ``|S2 / S1| >= k exp(-c1)`` (the PSIF
    echo too bright for any finite T2: noise, flow, or a T1 far from the assumed one).
    """
    k, c1 = parameters.constants()
    s1 = signal[..., 0].astype(np.float64)
    s2 = signal[..., 1].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        denominator = np.log(np.abs(s2 / s1) / k) + c1
        t2 = -2.0 * (parameters.repetition_time_ms - parameters.echo_time_ms) / denominator
    usable = (s1 > 0) & (s2 > 0) & np.isfinite(t2) & (t2 > 0)
    return np.where(usable, t2, np.nan)


def fit_dess_volume(
    volume: Volume,
    parameters: DessParameters,
    mask: Volume | np.ndarray | None = None,
    t2_bounds_ms: tuple[float, float] = DEFAULT_T2_BOUNDS_MS,
) -> T2Fit:
    """DESS T2 of a two-echo :class:`Volume` as a :class:`T2Fit` (model ``"dess"``).

    Closed form, so every fitted voxel is "converged"; ``r2`` is NaN (two points define the
    curve) and ``s0`` holds the FISP echo extrapolated to TE = 0 with that T2. Values outside
    ``t2_bounds_ms`` are flagged and set to NaN, as for the multi-echo fits.
    """
    started = time.perf_counter()
    if not volume.is_multi_echo or volume.array.shape[3] != 2:
        raise InputError(None, f"DESS T2 needs a two-echo scan; got array shape {volume.array.shape}")
    array = volume.array
    spatial = array.shape[:3]
    fitted = fittable(array)
    if mask is not None:
        mask_array = mask.array != 0 if isinstance(mask, Volume) else np.asarray(mask, bool)
        if mask_array.shape != spatial:
            raise InputError(None, f"mask of shape {mask_array.shape} does not match the image grid {spatial}")
        fitted &= mask_array
    t2 = np.full(spatial, np.nan)
    t2[fitted] = dess_t2(array[fitted], parameters)
    defined = fitted & np.isfinite(t2)
    low, high = t2_bounds_ms
    out_of_bounds = fitted & (~defined | (t2 < low) | (t2 > high))
    s0 = np.full(spatial, np.nan)
    s0[defined] = array[..., 0][defined] * np.exp(parameters.echo_time_ms / t2[defined])
    t2 = np.where(fitted & ~out_of_bounds, t2, np.nan)
    return T2Fit(
        t2_ms=t2.astype(np.float32),
        s0=s0.astype(np.float32),
        r2=np.full(spatial, np.nan, np.float32),
        fitted=fitted,
        converged=fitted.copy(),
        out_of_bounds=out_of_bounds,
        low_r2=np.zeros(spatial, bool),
        model="dess",
        echo_times_ms=tuple(volume.echo_times_ms or ()),
        echoes_used=(0, 1),
        sigma=None,
        sigma_source=None,
        channels=1,
        t2_bounds_ms=(float(low), float(high)),
        min_r2=None,
        device="cpu",
        dtype="float64",
        iterations=0,
        seconds=time.perf_counter() - started,
    )


def _first_dicom(path: Path) -> Path | None:
    """The first DICOM file of a folder, or the file itself when it is DICOM; None for NRRD, NIfTI..."""
    if path.is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return None
    import pydicom

    for candidate in candidates:
        try:
            pydicom.dcmread(candidate, stop_before_pixels=True)
        except CancelledError:  # SIGTERM/Ctrl-C raised inside pydicom: a stop, not a non-DICOM file
            raise
        except Exception:  # not DICOM (pydicom raises several types); try the next file
            continue
        return candidate
    return None


def read_dess_parameters(
    scan_path: Path | None,
    echo_times_ms: tuple[float, ...] | None = None,
    **options: float | None,
) -> DessParameters:
    """DESS parameters from the DICOM header of ``scan_path`` where present, ``options`` otherwise.

    ``options`` are :class:`DessParameters` field names; a value given overrides the header
    (e.g. ``t1_ms=1000``). ``echo_times_ms`` (the volume's) supplies TE when the header has none.

    Raises
    ------
    InputError
        When TR, TE or the flip angle are neither in the header nor given.
    """
    values: dict[str, float] = {}
    sources: dict[str, str] = {}
    header = None
    if scan_path is not None:
        from KneeSegLogic.io.outputs import input_location

        dicom_file = _first_dicom(input_location(scan_path))
        if dicom_file is not None:
            import pydicom

            header = pydicom.dcmread(dicom_file, stop_before_pixels=True)
    if header is not None:
        for name, keyword in (
            ("repetition_time_ms", "RepetitionTime"),
            ("echo_time_ms", "EchoTime"),
            ("flip_angle_deg", "FlipAngle"),
        ):
            if header.get(keyword) not in (None, ""):
                values[name], sources[name] = float(header.get(keyword)), "dicom"
        for name, tag, scale in (
            ("spoiler_area_mt_ms_per_m", SPOILER_AREA_TAG, GAUSS_US_PER_CM_IN_MT_MS_PER_M),
            ("spoiler_duration_ms", SPOILER_DURATION_TAG, 1e-3),
        ):
            element = header.get(tag)
            if element is not None and element.value not in (None, ""):
                values[name], sources[name] = float(element.value) * scale, "dicom"
    if echo_times_ms and "echo_time_ms" not in values:
        values["echo_time_ms"], sources["echo_time_ms"] = float(min(echo_times_ms)), "echo_times"
    elif echo_times_ms and "echo_time_ms" in values:
        # The header of the first file read may belong to either echo: the formula needs the first.
        values["echo_time_ms"] = float(min(echo_times_ms))
    for name, value in options.items():
        if value is not None:
            values[name], sources[name] = float(value), "option"
    missing = [n for n in ("repetition_time_ms", "echo_time_ms", "flip_angle_deg") if n not in values]
    if missing:
        raise InputError(
            scan_path,
            f"DESS T2 needs {', '.join(missing)}: not in the DICOM header; give them as options "
            "(--tr, --flip-angle; TE of echo 1 comes from the echo times)",
        )
    for name in ("t1_ms", "diffusion_mm2_per_s"):
        sources.setdefault(name, "default")
    for name in ("spoiler_area_mt_ms_per_m", "spoiler_duration_ms"):
        sources.setdefault(name, "absent (no diffusion term)")
    return DessParameters(**values, sources=sources)
