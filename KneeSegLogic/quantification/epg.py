"""T2 from every echo of a multi-echo spin-echo (CPMG) train with an extended phase graph model.

Refocusing pulses short of 180 degrees (B1 inhomogeneity, slice profiles) turn part of the
magnetisation longitudinal and back, so from echo 2 on stimulated echoes add to the spin echo
and the train is no longer ``S0 exp(-TE / T2)``. The extended phase graph (Hennig 1988; Weigel,
JMRI 2015) follows every dephasing order exactly: per echo spacing ``ESP``

    relax ESP/2 (F *= E2, Z *= E1) -> dephase one order -> refocusing rotation (angle alpha)
    -> relax ESP/2 -> dephase one order -> echo = F0

starting from ``F0 = 1`` after an ideal 90 degree excitation. With the refocusing axis along the
excited magnetisation (the CPMG condition) the configuration states stay real: writing the
longitudinal states as ``Z = i z``, the rotation is::

    F+' = c^2 F+ + s^2 F- + sin(alpha) z
    F-' = s^2 F+ + c^2 F- - sin(alpha) z          c = cos(alpha / 2), s = sin(alpha / 2)
    z'  = -sin(alpha) / 2 (F+ - F-) + cos(alpha) z

Longitudinal recovery towards M0 is left out: it produces only non-CPMG (crushed) coherences.

Per voxel three parameters are fitted, with every echo used: ``S0``, ``T2`` and ``B1`` (the
refocusing angle as a fraction of its nominal value, at most 1: the model is symmetric about 180
degrees). T1 is assumed (default 1000 ms; it only weights the stimulated pathways). The magnitude
noise floor is modelled as in ``ncexp`` (:func:`~KneeSegLogic.quantification.relaxometry.expected_magnitude`),
with sigma from the background unless given. The solver is the vectorised Levenberg-Marquardt of
:mod:`~KneeSegLogic.quantification.relaxometry`, started from the best of a small dictionary of
(T2, B1) curves, so a voxel does not settle in the wrong (T2, B1) valley. Derivatives with respect to T2 and B1
are carried through the recursion beside the states: exact, not differenced.

Slice profile (option): the refocusing angle varies across a 2D slice. Given relative flip
angles ``profile`` at positions across the slice (1 = nominal), the signal is their mean, each
position with excitation ``sin(90 deg p)`` and refocusing ``alpha p``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from KneeSegLogic.errors import InputError, KneeSegError
from KneeSegLogic.quantification.relaxometry import (
    DEFAULT_CHUNK_VOXELS,
    DEFAULT_MAX_ITERATIONS,
    DEFAULT_T2_BOUNDS_MS,
    FIT_T2_LIMITS_MS,
    T2Fit,
    _noise_floor_table,
    estimate_noise_sigma,
    expected_magnitude,
    fittable,
    flagged_fit,
    levenberg_marquardt,
)

DEFAULT_T1_MS = 1000.0

DEFAULT_REFOCUSING_DEG = 180.0

#: Solver box for B1 (fraction of the nominal refocusing angle).
B1_LIMITS = (0.3, 1.0)

# The starting dictionary: B1 and T2 nodes (T2 geometric, ms).
_START_B1 = np.linspace(0.5, 1.0, 11)

_START_T2_MS = np.geomspace(5.0, 300.0, 40)


def echo_spacing_ms(echo_times_ms: Sequence[float] | np.ndarray) -> float:
    """The spacing of an evenly spaced train whose first echo is at one spacing; else InputError."""
    te = np.asarray(echo_times_ms, dtype=float)
    spacing = float(te[0])
    expected = spacing * np.arange(1, te.size + 1)
    if te.size < 3 or not np.allclose(te, expected, rtol=1e-3, atol=1e-3):
        raise InputError(
            None,
            f"the EPG model needs an evenly spaced CPMG train with TE_n = n ESP; got echo times {list(te)} ms",
        )
    return spacing


def cpmg_echoes(
    rate: torch.Tensor,
    b1: torch.Tensor,
    echoes: int,
    spacing_ms: float,
    t1_ms: float,
    refocusing_deg: float,
    derivatives: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """EPG echo amplitudes ``(echoes, voxels)`` for ``F0 = 1`` after excitation.

    ``rate`` is ``ESP / T2`` (dimensionless), ``b1`` the refocusing angle over its nominal value.
    With ``derivatives`` the partial derivatives of the echoes with respect to ``rate`` and ``b1``
    are carried through the recursion alongside the states (product rule at every step; exact).
    """
    half_e2 = torch.exp(-0.5 * rate)
    half_e1 = math.exp(-0.5 * spacing_ms / t1_ms)
    nominal = math.radians(refocusing_deg)
    alpha = b1 * nominal
    c2, s2, sa, ca = torch.cos(alpha / 2).square(), torch.sin(alpha / 2).square(), torch.sin(alpha), torch.cos(alpha)
    orders = 2 * echoes + 2
    state = torch.zeros((3, orders, rate.shape[0]), dtype=rate.dtype, device=rate.device)  # F+, F-, z
    state[0, 0] = 1.0
    d_rate = torch.zeros_like(state) if derivatives else None
    d_b1 = torch.zeros_like(state) if derivatives else None

    def shift(s: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(s)
        out[1, :-1] = s[1, 1:]
        out[0, 1:] = s[0, :-1]
        out[0, 0] = out[1, 0]  # F+_0 <- F-_0 (real states: the conjugate is the state itself)
        out[2] = s[2]
        return out

    def relax(s: torch.Tensor) -> torch.Tensor:
        return torch.stack([s[0] * half_e2, s[1] * half_e2, s[2] * half_e1])

    def rotate(s: torch.Tensor, c2_: torch.Tensor, s2_: torch.Tensor, sa_: torch.Tensor, ca_: torch.Tensor):
        fp, fm, z = s[0], s[1], s[2]
        return torch.stack(
            [c2_ * fp + s2_ * fm + sa_ * z, s2_ * fp + c2_ * fm - sa_ * z, -0.5 * sa_ * (fp - fm) + ca_ * z]
        )

    def half_period(s: torch.Tensor, dr: torch.Tensor | None, db: torch.Tensor | None):
        relaxed = relax(s)
        if dr is not None and db is not None:
            # d(E2 F)/drate = E2 dF/drate - E2 F / 2 on the transverse states
            dr = relax(dr) - 0.5 * torch.cat([relaxed[:2], torch.zeros_like(relaxed[2:])])
            dr, db = shift(dr), shift(relax(db))
        return shift(relaxed), dr, db

    # Derivatives of the rotation's coefficients with respect to b1 (chain rule through alpha).
    dc2, ds2, dsa, dca = -0.5 * sa * nominal, 0.5 * sa * nominal, ca * nominal, -sa * nominal
    out, out_rate, out_b1 = [], [], []
    for _ in range(echoes):
        state, d_rate, d_b1 = half_period(state, d_rate, d_b1)
        if d_rate is not None and d_b1 is not None:
            d_rate = rotate(d_rate, c2, s2, sa, ca)
            d_b1 = rotate(d_b1, c2, s2, sa, ca) + rotate(state, dc2, ds2, dsa, dca)
        state = rotate(state, c2, s2, sa, ca)
        state, d_rate, d_b1 = half_period(state, d_rate, d_b1)
        out.append(state[0, 0])
        if d_rate is not None and d_b1 is not None:
            out_rate.append(d_rate[0, 0])
            out_b1.append(d_b1[0, 0])
    if not derivatives:
        return torch.stack(out), None, None
    return torch.stack(out), torch.stack(out_rate), torch.stack(out_b1)


def _profile_echoes(
    rate: torch.Tensor,
    b1: torch.Tensor,
    echoes: int,
    spacing_ms: float,
    t1_ms: float,
    refocusing_deg: float,
    profile: torch.Tensor | None,
    derivatives: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`cpmg_echoes` averaged over the slice ``profile`` (None: an ideal slice)."""
    if profile is None:
        return cpmg_echoes(rate, b1, echoes, spacing_ms, t1_ms, refocusing_deg, derivatives)
    positions, voxels = profile.shape[0], rate.shape[0]
    wide_b1 = (profile[:, None] * b1[None]).reshape(-1)
    curves = cpmg_echoes(rate.repeat(positions), wide_b1, echoes, spacing_ms, t1_ms, refocusing_deg, derivatives)
    excitation = torch.sin(0.5 * math.pi * profile)[None, :, None]
    value, d_rate, d_b1 = (None if c is None else (c.view(echoes, positions, voxels) * excitation) for c in curves)
    assert value is not None
    mean_b1 = None if d_b1 is None else (d_b1 * profile[None, :, None]).mean(1)  # d(b1 p)/d b1 = p
    return value.mean(1), None if d_rate is None else d_rate.mean(1), mean_b1


def _model(
    echoes: int,
    spacing_ms: float,
    t1_ms: float,
    refocusing_deg: float,
    profile: torch.Tensor | None,
    table: torch.Tensor | None,
) -> Callable:
    def model(params: list[torch.Tensor], _te: torch.Tensor, sigma: torch.Tensor | None):
        amplitude, rate, b1 = params
        curve, d_rate, d_b1 = _profile_echoes(rate, b1, echoes, spacing_ms, t1_ms, refocusing_deg, profile, True)
        assert d_rate is not None and d_b1 is not None
        signal = curve * amplitude
        jacobian = [curve, d_rate * amplitude, d_b1 * amplitude]
        if table is None or sigma is None:
            return signal, jacobian
        value, d_signal = expected_magnitude(signal, sigma, table)
        return value, [d_signal * j for j in jacobian]

    return model


def _dictionary_start(
    y: torch.Tensor, echoes: int, spacing_ms: float, t1_ms: float, refocusing_deg: float, profile: torch.Tensor | None
) -> torch.Tensor:
    """Best (amplitude, rate, B1) per voxel of ``y`` (echoes, voxels) over a small dictionary."""
    b1 = torch.as_tensor(np.repeat(_START_B1, _START_T2_MS.size), dtype=y.dtype, device=y.device)
    rate = torch.as_tensor(np.tile(spacing_ms / _START_T2_MS, _START_B1.size), dtype=y.dtype, device=y.device)
    atoms, _, _ = _profile_echoes(rate, b1, echoes, spacing_ms, t1_ms, refocusing_deg, profile)  # (echoes, atoms)
    norms = atoms.square().sum(0).clamp_min(1e-30)
    projection = atoms.T @ y  # (atoms, voxels)
    best = (projection.square() / norms[:, None]).argmax(0)
    amplitude = (projection.gather(0, best[None])[0] / norms[best]).clamp_min(0.0)
    return torch.stack([amplitude, rate[best], b1[best]])


def fit_epg(
    signal: np.ndarray,
    echo_times_ms: Sequence[float],
    sigma: float | None = None,
    noise_correction: bool = True,
    channels: int = 1,
    mask: np.ndarray | None = None,
    t1_ms: float = DEFAULT_T1_MS,
    refocusing_deg: float = DEFAULT_REFOCUSING_DEG,
    slice_profile: Sequence[float] | None = None,
    t2_bounds_ms: tuple[float, float] = DEFAULT_T2_BOUNDS_MS,
    min_r2: float | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS // 4,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    on_chunk: Callable[[int, int], None] | None = None,
) -> T2Fit:
    """Fit T2, S0 and B1 per voxel of a CPMG train with the EPG model, all echoes used.

    Parameters as :func:`~KneeSegLogic.quantification.relaxometry.fit_t2`; besides:
    ``noise_correction`` models the magnitude noise floor (sigma from the background unless
    given); ``t1_ms`` the assumed T1; ``refocusing_deg`` the nominal refocusing angle;
    ``slice_profile`` relative flip angles across the slice (None: ideal). The result's
    ``b1`` holds the fitted refocusing angle over its nominal value.
    """
    started = time.perf_counter()
    signal = np.asarray(signal)
    echo_times = np.asarray(echo_times_ms, dtype=float)
    if signal.ndim < 2 or signal.shape[-1] != echo_times.size:
        raise InputError(
            None, f"signal of shape {signal.shape} does not hold {echo_times.size} echoes on its last axis"
        )
    spacing = echo_spacing_ms(echo_times)
    if echo_times.size < 4:
        raise InputError(None, f"the EPG model fits 3 parameters and needs at least 4 echoes, got {echo_times.size}")
    low, high = float(t2_bounds_ms[0]), float(t2_bounds_ms[1])
    sigma_source = None
    if noise_correction:
        if sigma is None:
            sigma, sigma_source = estimate_noise_sigma(signal, channels), "background"
        else:
            sigma_source = "given"
        if not sigma > 0:
            raise KneeSegError(f"noise sigma must be positive, got {sigma}")
    else:
        sigma = None
    spatial_shape = signal.shape[:-1]
    flat = signal.reshape(-1, echo_times.size)
    fitted = fittable(flat)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != spatial_shape:
            raise InputError(None, f"mask of shape {mask.shape} does not match the image grid {spatial_shape}")
        fitted &= mask.ravel()
    index = np.flatnonzero(fitted)
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise KneeSegError("device 'cuda' was requested but no CUDA GPU is available; use the CPU")
    profile = (
        None
        if slice_profile is None
        else torch.as_tensor(np.asarray(slice_profile, float), dtype=dtype, device=torch_device)
    )
    table = (
        torch.as_tensor(_noise_floor_table(channels), dtype=dtype, device=torch_device) if sigma is not None else None
    )
    echoes = echo_times.size
    model = _model(echoes, spacing, t1_ms, refocusing_deg, profile, table)
    rate_limits = (spacing / FIT_T2_LIMITS_MS[1], spacing / FIT_T2_LIMITS_MS[0])
    lower = torch.tensor([[0.0], [rate_limits[0]], [B1_LIMITS[0]]], dtype=dtype, device=torch_device)
    upper = torch.tensor([[math.inf], [rate_limits[1]], [B1_LIMITS[1]]], dtype=dtype, device=torch_device)
    typical = torch.tensor([[1.0], [0.0], [0.0]], dtype=dtype, device=torch_device)
    te = torch.zeros((echoes, 1), dtype=dtype, device=torch_device)  # unused by the EPG model

    voxels = flat.shape[0]
    t2 = np.full(voxels, np.nan)
    s0 = np.full(voxels, np.nan)
    b1 = np.full(voxels, np.nan)
    r2 = np.full(voxels, np.nan)
    converged = np.zeros(voxels, bool)
    at_limit = np.zeros(voxels, bool)
    iterations = 0
    for begin in range(0, index.size, chunk_voxels):
        chunk = index[begin : begin + chunk_voxels]
        y = torch.as_tensor(np.ascontiguousarray(flat[chunk].T), dtype=dtype, device=torch_device)
        scale = y.amax(0, keepdim=True)
        y = y / scale
        noise = None if sigma is None else sigma / scale
        start = _dictionary_start(y, echoes, spacing, t1_ms, refocusing_deg, profile)
        params, done, steps = levenberg_marquardt(model, y, te, noise, start, lower, upper, typical, max_iterations)
        value, _ = model(list(params), te, noise)
        residual = (y - value).square().sum(0)
        total = (y - y.mean(0, keepdim=True)).square().sum(0)
        r2[chunk] = torch.where(total > 0, 1 - residual / total.clamp_min(1e-30), torch.zeros_like(total)).cpu().numpy()
        rate = params[1].double()
        limit = (rate <= rate_limits[0] * (1 + 1e-5)) | (rate >= rate_limits[1] * (1 - 1e-5))
        t2[chunk] = (spacing / rate).cpu().numpy()
        s0[chunk] = np.where(limit.cpu().numpy(), np.nan, (params[0].double() * scale[0].double()).cpu().numpy())
        b1[chunk] = params[2].double().cpu().numpy()
        converged[chunk], at_limit[chunk] = done.cpu().numpy(), limit.cpu().numpy()
        iterations = max(iterations, steps)
        if on_chunk is not None:
            on_chunk(begin + chunk.size, index.size)

    return flagged_fit(
        t2,
        s0,
        r2,
        fitted,
        converged,
        at_limit,
        spatial_shape,
        model="epg",
        echo_times_ms=tuple(float(t) for t in echo_times),
        echoes_used=tuple(range(echoes)),
        sigma=sigma,
        sigma_source=sigma_source,
        channels=channels,
        t2_bounds_ms=(low, high),
        min_r2=min_r2,
        device=torch_device,
        dtype=dtype,
        iterations=iterations,
        started=started,
        b1=b1,
    )
