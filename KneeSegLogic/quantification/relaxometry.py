"""T2 relaxation maps from multi-echo spin-echo (MESE) magnitude images.

Every voxel is fitted at once with a vectorised Levenberg-Marquardt solver in torch (CPU or CUDA),
instead of one ``scipy.optimize.curve_fit`` call per voxel (DOSMA, Thomas et al.), which costs
0.1-0.3 ms per voxel per core.

Signal models (``TE`` echo time in ms, ``R = 1/T2`` in 1/ms)
-----------------------------------------------------------
``"loglinear"``
    Straight line through ``log S`` (pyKNEEr's linear method); closed form, no iterations. Biased
    towards long T2 where the decay reaches the noise floor, because ``log`` of a Rician magnitude
    is not the log of the signal.
``"mono"``
    ``S = S0 exp(-TE R)``, least squares on the magnitudes (DOSMA, Thomas et al.).
``"mono-offset"``
    ``S = S0 exp(-TE R) + C`` with ``C >= 0`` (Milford et al., PLoS ONE 2015): the offset absorbs
    the noise floor and part of the stimulated-echo error.
``"ncexp"`` (default)
    Noise-corrected mono-exponential (Raya et al., MRM 2010): the expected value of the magnitude
    of a signal ``A = S0 exp(-TE R)`` received on ``N`` channels with Gaussian noise of SD
    ``sigma`` per channel (Rician for ``N = 1``, non-central chi for ``N > 1``)::

        E[S] = sigma sqrt(2) Gamma(N + 1/2) / Gamma(N) 1F1(-1/2; N; -A^2 / (2 sigma^2))

    The often-quoted ``sqrt(A^2 + 2 N sigma^2)`` is the root of the expected *squared* magnitude,
    not the expected magnitude; fitted to magnitudes it over-corrects by as much as the
    uncorrected model under-corrects (T2 too short by about as much as ``"mono"`` makes it too
    long), so it is not used. ``E[S]`` is evaluated through ``E[S]^2 = A^2 + sigma^2 q(A^2/sigma^2)``
    with ``q`` interpolated from a table built once per ``N`` with :func:`scipy.special.hyp1f1`
    (error below 1e-6 sigma).

Echo 1 is skipped by default: in a spin-echo train the refocusing pulses are not exactly 180
degrees, so from echo 2 on stimulated echoes add to the signal; echo 1 has none and falls below
the curve through the later echoes (by a median 6 % in the brighter tissue of the bundled GE MESE
sample), which pulls a mono-exponential fit towards the wrong T2.

Noise ``sigma`` for ``"ncexp"`` comes from the image background unless given; see
:func:`estimate_noise_sigma`.

Fit bounds and rejected voxels
------------------------------
The solver keeps ``S0 >= 0``, ``C >= 0`` and ``T2`` within :data:`FIT_T2_LIMITS_MS` (projected
steps). The reporting bounds ``t2_bounds_ms`` (default 0-100 ms) are *not* imposed on the fit: a
voxel whose fitted T2 falls outside them (or on a solver limit) is flagged ``out_of_bounds``, one
whose ``R^2`` is below ``min_r2`` is flagged ``low_r2``, one that did not converge keeps
``converged = False``; all three get ``T2 = NaN`` in :class:`T2Fit` (nothing is clipped). On disk
(:func:`t2_volumes`) NaN becomes 0, which no real T2 takes, and ``t2_flags`` records why.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from KneeSegLogic.errors import InputError, KneeSegError
from KneeSegLogic.io.checks import check_echo_times
from KneeSegLogic.io.volume import Volume

MODELS = ("loglinear", "mono", "mono-offset", "ncexp")

DEFAULT_MODEL = "ncexp"

DEFAULT_T2_BOUNDS_MS = (0.0, 100.0)

#: The solver's own box for T2 (ms): wide enough that any voxel outside the reporting bounds is
#: seen there, not stuck on them. A voxel ending on this box is flagged out of bounds.
FIT_T2_LIMITS_MS = (0.1, 1.0e5)

#: Bit values of the flag map (:attr:`T2Fit.flags`, ``t2_flags.nrrd``).
FLAG_FITTED = 1

FLAG_CONVERGED = 2

FLAG_OUT_OF_BOUNDS = 4

FLAG_LOW_R2 = 8

DEFAULT_CHUNK_VOXELS = 1 << 18

DEFAULT_MAX_ITERATIONS = 50

# Levenberg-Marquardt settings. Convergence: the Gauss-Newton step changes every parameter by
# less than XTOL of its value plus its typical size (amplitudes are in units of the voxel's
# brightest echo), or a barely damped step lowers the cost by less than FTOL of it. Rounding
# leaves the step at about sqrt(eps) relative, so float32 stops at 1.7e-4 (0.007 ms at 40 ms).
XTOL = 1e-6

FTOL = 1e-10

LAMBDA_START = 1e-3

LAMBDA_DOWN = 0.2

LAMBDA_UP = 10.0

LAMBDA_MAX = 1e8


@dataclass(frozen=True)
class T2Fit:
    """A fitted T2 map and how far to trust each voxel.

    Arrays have the spatial shape of the signal (the signal shape without its echo axis).

    Attributes
    ----------
    t2_ms : ndarray of float32
        T2 in ms; NaN where not fitted, not converged, out of bounds or below ``min_r2``.
    s0 : ndarray of float32
        Fitted signal at TE = 0 (signal units); NaN where not fitted or T2 is on a solver limit.
    r2 : ndarray of float32
        Coefficient of determination of the fitted curve on the echoes used, on the linear
        (signal) scale; NaN where not fitted, 0 where the signal is constant.
    fitted : ndarray of bool
        Inside the mask with a usable (finite, not all zero) decay.
    converged : ndarray of bool
        The solver met its convergence test (always True for fitted ``"loglinear"`` voxels).
    out_of_bounds : ndarray of bool
        Fitted T2 outside ``t2_bounds_ms`` or on a solver limit.
    low_r2 : ndarray of bool
        ``R^2 < min_r2``.
    model : str
    echo_times_ms : tuple of float
        Echo times of the echoes used in the fit.
    echoes_used : tuple of int
        0-based indices of those echoes in the input.
    sigma : float or None
        Noise SD per receiver channel used by ``"ncexp"`` (signal units).
    sigma_source : str or None
        ``"given"`` or ``"background"`` (estimated by :func:`estimate_noise_sigma`).
    channels : int
    t2_bounds_ms : tuple of float
    min_r2 : float or None
    device : str
    dtype : str
    iterations : int
        Largest number of solver iterations any voxel took.
    seconds : float
        Wall time of the fit.
    b1 : ndarray of float32 or None
        EPG model only: fitted refocusing angle over its nominal value (NaN where not fitted).
    """

    t2_ms: np.ndarray
    s0: np.ndarray
    r2: np.ndarray
    fitted: np.ndarray
    converged: np.ndarray
    out_of_bounds: np.ndarray
    low_r2: np.ndarray
    model: str
    echo_times_ms: tuple[float, ...]
    echoes_used: tuple[int, ...]
    sigma: float | None
    sigma_source: str | None
    channels: int
    t2_bounds_ms: tuple[float, float]
    min_r2: float | None
    device: str
    dtype: str
    iterations: int
    seconds: float
    b1: np.ndarray | None = None

    @property
    def valid(self) -> np.ndarray:
        """Voxels with a T2 value: fitted, converged, within bounds and ``R^2 >= min_r2``."""
        return np.isfinite(self.t2_ms)

    @property
    def flags(self) -> np.ndarray:
        """uint8 bit map: :data:`FLAG_FITTED`, :data:`FLAG_CONVERGED`, :data:`FLAG_OUT_OF_BOUNDS`, :data:`FLAG_LOW_R2`."""
        flags = self.fitted.astype(np.uint8) * FLAG_FITTED
        flags |= self.converged.astype(np.uint8) * FLAG_CONVERGED
        flags |= self.out_of_bounds.astype(np.uint8) * FLAG_OUT_OF_BOUNDS
        flags |= self.low_r2.astype(np.uint8) * FLAG_LOW_R2
        return flags

    def summary(self, region: np.ndarray | None = None) -> dict:
        """Counts, fractions and T2 statistics (ms) over ``region`` (default: fitted voxels)."""
        region = self.fitted if region is None else (np.asarray(region, bool) & self.fitted)
        fitted = int(region.sum())
        values = self.t2_ms[region & self.valid].astype(np.float64)

        def fraction(flag: np.ndarray) -> float | None:
            return round(float((flag & region).sum()) / fitted, 6) if fitted else None

        stats: dict = {
            "voxels_fitted": fitted,
            "voxels_valid": int(values.size),
            "fraction_converged": fraction(self.converged),
            "fraction_out_of_bounds": fraction(self.out_of_bounds),
            "fraction_low_r2": fraction(self.low_r2),
            "fraction_valid": round(values.size / fitted, 6) if fitted else None,
        }
        if values.size:
            stats.update(
                t2_mean_ms=float(values.mean()),
                t2_sd_ms=float(values.std(ddof=1)) if values.size > 1 else 0.0,
                t2_median_ms=float(np.median(values)),
                t2_p05_ms=float(np.percentile(values, 5)),
                t2_p95_ms=float(np.percentile(values, 95)),
                r2_median=float(np.median(self.r2[region & self.valid])),
            )
        return stats


def fittable(signal: np.ndarray) -> np.ndarray:
    """Voxels of ``signal`` (echoes on the last axis) worth a fit: every echo finite, one above 0.

    The one rule of every relaxation fit (multi-echo, EPG, DESS); the result has the shape of
    ``signal`` without its last axis.
    """
    return np.all(np.isfinite(signal), axis=-1) & np.any(signal > 0, axis=-1)


def estimate_noise_sigma(signal: np.ndarray, channels: int = 1) -> float:
    """Noise SD per receiver channel from the signal-free background of a magnitude image.

    Method: per voxel, the mean over echoes of the squared magnitude, ``m2``. In air a magnitude
    on ``N`` channels is pure noise, ``S^2 ~ sigma^2 chi^2(2N)``, so ``m2`` over ``E`` echoes is
    ``sigma^2 chi^2(2 N E) / E``: tightly spread around ``2 N sigma^2``, far below tissue.
    Background voxels are those below Otsu's threshold on ``log m2`` (exact zeros, which scanners
    write outside the reconstructed field of view, are left out); then
    ``sigma = sqrt(median(m2) E / median(chi^2(2 N E)))``, the value for which the background
    median is the expected one. The median and the log scale keep ghosts and partial-volume
    tissue in the class from pulling the estimate up.

    Parameters
    ----------
    signal : ndarray, shape (..., echoes)
        Magnitude images of the echoes to be fitted (the whole field of view, not a tissue mask).
    channels : int
        Number of receiver channels ``N`` of the magnitude combination (1: Rician).

    Raises
    ------
    InputError
        When there is no background, i.e. the darkest class still decays from the first to the
        last echo like tissue, or holds too few voxels; pass ``sigma`` explicitly then.
    """
    from scipy.stats import chi2
    from skimage.filters import threshold_otsu

    echoes = signal.shape[-1]
    flat = signal.reshape(-1, echoes)
    m2 = np.einsum("ve,ve->v", flat, flat, dtype=np.float64) / echoes
    usable = np.flatnonzero(np.isfinite(m2) & (m2 > 0))
    if usable.size < 100:
        raise InputError(None, "too few non-zero voxels to estimate the noise from the background; give sigma")
    log_m2 = np.log(m2[usable])
    background = usable[log_m2 <= threshold_otsu(log_m2)]
    if background.size < 100:
        raise InputError(None, "no image background to estimate the noise from; give sigma")
    # Air does not decay: a 'background' whose first echo is much brighter than its last is tissue.
    first = np.median(np.square(flat[background, 0], dtype=np.float64))
    last = np.median(np.square(flat[background, -1], dtype=np.float64))
    if last <= 0 or first / last > 2.0:
        raise InputError(
            None,
            f"the darkest voxels decay like tissue (echo power ratio first/last {first / max(last, 1e-30):.1f}); "
            "no signal-free background to estimate the noise from; give sigma",
        )
    dof = 2 * channels * echoes
    return float(math.sqrt(np.median(m2[background]) * echoes / chi2.median(dof)))


# q(t) = E[S]^2 / sigma^2 - t, t = A^2 / sigma^2, is tabulated on s = t / (t + T_SCALE) in [0, 1]
# and interpolated linearly: dense where q changes (A within a few sigma); s = 1 holds the limit
# t -> inf. The derivative used is that of the interpolant itself, so the Jacobian is exact for
# the function evaluated.
_TABLE_INTERVALS = 4096

_T_SCALE = 4.0


@lru_cache(maxsize=8)
def _noise_floor_table(channels: int) -> np.ndarray:
    """Rows ``[q at the nodes, q difference over each interval]`` for ``N = channels``."""
    from scipy.special import gammaln, hyp1f1

    s = np.linspace(0.0, 1.0, _TABLE_INTERVALS + 1)[:-1]
    t = _T_SCALE * s / (1.0 - s)
    h = math.sqrt(2.0) * math.exp(gammaln(channels + 0.5) - gammaln(channels)) * hyp1f1(-0.5, channels, -t / 2)
    q = np.append(h * h - t, 2 * channels - 1.0)  # t -> inf: E[S]^2 -> A^2 + (2N - 1) sigma^2
    return np.stack([q, np.append(np.diff(q), 0.0)])


def expected_magnitude(
    amplitude: torch.Tensor, sigma: torch.Tensor, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``E[S]`` and ``dE[S]/dA`` for true amplitude ``A`` and noise ``sigma`` (same units).

    ``table`` is :func:`_noise_floor_table` as a tensor on the device of ``amplitude``.
    """
    t = (amplitude / sigma).square_()
    denominator = t + _T_SCALE
    position = t / denominator * _TABLE_INTERVALS
    index = position.long().clamp_(max=_TABLE_INTERVALS - 1).view(-1)
    fraction = position.sub_(index.view_as(position))
    # index_select is several times faster than advanced indexing on CPU.
    slope = table[1].index_select(0, index).view_as(t)
    q = table[0].index_select(0, index).view_as(t).addcmul_(fraction, slope)
    # d(E^2/sigma^2)/dt = 1 + dq/ds ds/dt with dq/ds = slope * intervals, ds/dt = T_SCALE / (t + T_SCALE)^2
    w = slope.mul_(_TABLE_INTERVALS * _T_SCALE).div_(denominator.square_()).add_(1.0)
    root = q.add_(t).sqrt_()
    # dE/dA = sigma w (dt/dA) / (2 root) with dt/dA = 2 A / sigma^2
    derivative = w.mul_(amplitude).div_(root * sigma)
    return root.mul_(sigma), derivative


# Each model maps its parameters (rows: amplitude at time 0, rate[, offset]) to the fitted signal
# and its partial derivatives; times, rates and noise come in the solver's units (_ChunkSolver).
ModelFunction = Callable[
    [list[torch.Tensor], torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, list[torch.Tensor]]
]


def _mono(
    params: list[torch.Tensor], te: torch.Tensor, _: torch.Tensor | None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    amplitude, rate = params
    decay = torch.exp(te * -rate)
    value = decay * amplitude
    return value, [decay, value * -te]


def _mono_offset(
    params: list[torch.Tensor], te: torch.Tensor, _: torch.Tensor | None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    amplitude, rate, offset = params
    decay = torch.exp(te * -rate)
    signal = decay * amplitude
    return signal + offset, [decay, signal * -te, torch.ones_like(decay)]


def _make_ncexp(table: torch.Tensor) -> ModelFunction:
    def ncexp(
        params: list[torch.Tensor], te: torch.Tensor, sigma: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if sigma is None:
            raise ValueError("the ncexp model needs the noise sigma")
        amplitude, rate = params
        decay = torch.exp(te * -rate)
        signal = decay * amplitude
        value, d_signal = expected_magnitude(signal, sigma, table)
        return value, [d_signal * decay, d_signal.mul_(signal).mul_(-te)]

    return ncexp


def _solve_damped(
    hessian: list[list[torch.Tensor]], gradient: list[torch.Tensor], damping: torch.Tensor
) -> list[torch.Tensor]:
    """Solve ``(H + damping diag(H)) x = g`` per voxel by Gaussian elimination on P x P systems.

    ``H`` is symmetric positive semi-definite; a tiny floor on the diagonal keeps voxels whose
    Jacobian column vanishes (S0 = 0) solvable.
    """
    size = len(gradient)
    a = [list(row) for row in hessian]
    b = list(gradient)
    for r in range(size):
        a[r][r] = hessian[r][r] * (1 + damping) + 1e-12 * (1 + hessian[r][r])
    for pivot in range(size):
        for r in range(pivot + 1, size):
            factor = a[r][pivot] / a[pivot][pivot]
            for c in range(pivot, size):
                a[r][c] = a[r][c] - factor * a[pivot][c]
            b[r] = b[r] - factor * b[pivot]
    x: list[torch.Tensor] = [b[-1]] * size
    for r in reversed(range(size)):
        total = b[r]
        for c in range(r + 1, size):
            total = total - a[r][c] * x[c]
        x[r] = total / a[r][r]
    return x


def _hold(
    hessian: list[list[torch.Tensor]], gradient: list[torch.Tensor], held: torch.Tensor
) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Normal equations in which the ``held`` (parameters, voxels) parameters get a zero step."""
    size = len(gradient)
    hessian = [
        [
            torch.where(held[r] | held[c], torch.full_like(hessian[r][c], float(r == c)), hessian[r][c])
            for c in range(size)
        ]
        for r in range(size)
    ]
    gradient = [torch.where(held[r], torch.zeros_like(gradient[r]), gradient[r]) for r in range(size)]
    return hessian, gradient


def _normal_equations(
    jacobian: list[torch.Tensor], residual: torch.Tensor
) -> tuple[list[list[torch.Tensor]], list[torch.Tensor], torch.Tensor]:
    size = len(jacobian)
    hessian = [[torch.empty(0)] * size for _ in range(size)]
    for r in range(size):
        for c in range(r, size):
            hessian[r][c] = hessian[c][r] = (jacobian[r] * jacobian[c]).sum(0)
    gradient = [(j * residual).sum(0) for j in jacobian]
    return hessian, gradient, residual.square().sum(0)


def levenberg_marquardt(
    model: ModelFunction,
    y: torch.Tensor,
    te: torch.Tensor,
    sigma: torch.Tensor | None,
    start: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    typical: torch.Tensor,
    max_iterations: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Projected Levenberg-Marquardt with one damping factor per voxel.

    Voxels leave the working set as soon as they converge, so late iterations cost little.

    Parameters
    ----------
    y : tensor (echoes, voxels)
    te : tensor (echoes, 1)
    sigma : tensor (1, voxels) or None
    start : tensor (parameters, voxels)
    lower, upper : tensor (parameters, 1)
        Box of the parameters; steps are projected onto it.
    typical : tensor (parameters, 1)
        Convergence when every step is below ``xtol * (|p| + typical)``.

    Returns
    -------
    params : tensor (parameters, voxels)
    converged : bool tensor (voxels,)
    iterations : int
    """
    xtol = max(XTOL, 0.5 * math.sqrt(torch.finfo(y.dtype).eps))
    ftol = max(FTOL, 10 * torch.finfo(y.dtype).eps)
    result = start.clone()
    converged = torch.zeros(y.shape[1], dtype=torch.bool, device=y.device)
    index = torch.arange(y.shape[1], device=y.device)
    params = start.clone()
    damping = torch.full((y.shape[1],), LAMBDA_START, dtype=y.dtype, device=y.device)

    def evaluate(p: torch.Tensor):
        value, jacobian = model(list(p), te, sigma)
        return _normal_equations(jacobian, y - value)

    hessian, gradient, cost = evaluate(params)
    iteration = 0
    while index.numel() and iteration < max_iterations:
        iteration += 1
        # A parameter on its bound with the descent direction pointing outwards is held there.
        gradient_rows = torch.stack(gradient)
        held = ((params <= lower) & (gradient_rows < 0)) | ((params >= upper) & (gradient_rows > 0))
        system_h, system_g = _hold(hessian, gradient, held) if bool(held.any()) else (hessian, gradient)
        # Converged when the undamped (Gauss-Newton) step is negligible: a stationary point.
        newton = torch.stack(_solve_damped(system_h, system_g, torch.zeros_like(damping)))
        done = (newton.abs() <= xtol * (params.abs() + typical)).all(0) | (cost == 0)
        step = torch.stack(_solve_damped(system_h, system_g, damping))
        trial = torch.maximum(torch.minimum(params + step, upper), lower)
        hessian_t, gradient_t, cost_t = evaluate(trial)
        accept = (cost_t < cost) & ~done
        # Or when a barely damped step no longer lowers the cost: along a flat valley (a decay
        # seen in one echo only, T2 -> 0) the Newton step stays large while nothing changes.
        done |= accept & (damping <= 1.0) & (cost - cost_t <= ftol * cost)
        params = torch.where(accept, trial, params)
        damping = torch.where(accept, damping * LAMBDA_DOWN, damping * LAMBDA_UP).clamp_(1e-12, LAMBDA_MAX)
        hessian = [[torch.where(accept, ht, h) for ht, h in zip(row_t, row)] for row_t, row in zip(hessian_t, hessian)]
        gradient = [torch.where(accept, gt, g) for gt, g in zip(gradient_t, gradient)]
        cost = torch.where(accept, cost_t, cost)
        # No decrease even along a tiny, gradient-like step: a minimum within rounding.
        done |= ~accept & (damping >= LAMBDA_MAX)
        if bool(done.any()):
            finished = index[done]
            result[:, finished] = params[:, done]
            converged[finished] = True
            keep = torch.nonzero(~done).squeeze(1)
            index, params, damping, cost = index[keep], params[:, keep], damping[keep], cost[keep]
            y = y.index_select(1, keep)
            sigma = None if sigma is None else sigma.index_select(1, keep)
            hessian = [[h[keep] for h in row] for row in hessian]
            gradient = [g[keep] for g in gradient]
    result[:, index] = params
    return result, converged, iteration


def _loglinear(y: torch.Tensor, te: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted least-squares line through ``log y`` per voxel: ``(S0, R)``."""
    floor = y.amax(0, keepdim=True) * 1e-6
    log_y = torch.log(torch.maximum(y, floor))
    centred = te - te.mean()
    slope = (centred * log_y).sum(0) / centred.square().sum()
    intercept = log_y.mean(0) - slope * te.mean()
    return torch.exp(intercept), -slope


class _ChunkSolver:
    """Fits one chunk of voxels on the device.

    The solver's parameters are the amplitude ``A`` at the first fitted echo, in units of the
    voxel's brightest fitted echo, and the rate in units of 1 / (echo span), with time counted
    from the first fitted echo. Every parameter is then of order 1, which keeps the normal
    equations well conditioned (float32 too) and the damping and convergence test scale-free;
    and a decay seen in its first echo only (least-squares minimum at T2 -> 0 with S0 -> inf)
    runs straight to the T2 limit instead of creeping along a curved valley in (S0, T2).
    """

    def __init__(
        self, model: str, echo_times_ms: np.ndarray, channels: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        self.first_echo_ms = float(echo_times_ms[0])
        self.span_ms = float(echo_times_ms[-1] - echo_times_ms[0])
        self.te = torch.as_tensor((echo_times_ms - self.first_echo_ms) / self.span_ms, dtype=dtype, device=device)[
            :, None
        ]
        self.rate_limits = (self.span_ms / FIT_T2_LIMITS_MS[1], self.span_ms / FIT_T2_LIMITS_MS[0])
        if model == "ncexp":
            table = torch.as_tensor(_noise_floor_table(channels), dtype=dtype, device=device)
            self.function: ModelFunction | None = _make_ncexp(table)
        else:
            self.function = {"mono": _mono, "mono-offset": _mono_offset}.get(model)
        # Box and convergence scale per parameter: (lower, upper, typical size).
        box = [(0.0, math.inf, 1.0), (*self.rate_limits, 0.0)] + (
            [(0.0, math.inf, 1.0)] if model == "mono-offset" else []
        )
        self.lower, self.upper, self.typical = (
            torch.tensor(column, dtype=dtype, device=device)[:, None] for column in zip(*box)
        )

    def __call__(self, signal: np.ndarray, sigma: float | None, max_iterations: int):
        """T2 (ms), S0, R^2, converged, on a solver limit, iterations for ``signal`` (voxels, echoes)."""
        y = torch.as_tensor(np.ascontiguousarray(signal.T), dtype=self.dtype, device=self.device)
        scale = y.amax(0, keepdim=True)
        y = y / scale
        start_amplitude, start_rate = _loglinear(y, self.te)
        start = torch.stack([start_amplitude, start_rate.clamp(*self.rate_limits)])
        noise = None if sigma is None else sigma / scale
        iterations = 0
        if self.function is None:
            params, converged = start, torch.ones(y.shape[1], dtype=torch.bool, device=self.device)
            value, _ = _mono(list(params), self.te, None)
        else:
            if self.model == "mono-offset":
                start = torch.cat([start, torch.zeros_like(start[:1])])
            params, converged, iterations = levenberg_marquardt(
                self.function, y, self.te, noise, start, self.lower, self.upper, self.typical, max_iterations
            )
            value, _ = self.function(list(params), self.te, noise)
        residual = (y - value).square().sum(0)
        total = (y - y.mean(0, keepdim=True)).square().sum(0)
        r2 = torch.where(
            total > 0, 1 - residual / total.clamp_min(torch.finfo(self.dtype).tiny), torch.zeros_like(total)
        )
        amplitude, rate = params[0].double(), params[1].double()
        at_limit = (rate <= self.rate_limits[0] * (1 + 1e-5)) | (rate >= self.rate_limits[1] * (1 - 1e-5))
        s0 = amplitude * scale[0].double() * torch.exp(rate * (self.first_echo_ms / self.span_ms))
        # Extrapolating a T2 of a fraction of a ms back to TE = 0 gives no usable S0.
        s0 = torch.where(at_limit | (s0 > np.finfo(np.float32).max), torch.nan, s0)
        return (
            (self.span_ms / rate).cpu().numpy(),
            s0.cpu().numpy(),
            r2.cpu().numpy(),
            converged.cpu().numpy(),
            at_limit.cpu().numpy(),
            iterations,
        )


def fit_t2(
    signal: np.ndarray,
    echo_times_ms: Sequence[float],
    model: str = DEFAULT_MODEL,
    skip_first_echo: bool = True,
    sigma: float | None = None,
    channels: int = 1,
    mask: np.ndarray | None = None,
    t2_bounds_ms: tuple[float, float] = DEFAULT_T2_BOUNDS_MS,
    min_r2: float | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    on_chunk: Callable[[int, int], None] | None = None,
) -> T2Fit:
    """Fit T2 to every voxel of a multi-echo magnitude image.

    Parameters
    ----------
    signal : ndarray, shape (..., echoes)
        Magnitude signal, echoes on the last axis (e.g. ``Volume.array`` of a 4D volume).
    echo_times_ms : sequence of float
        Echo time of each entry of the last axis, in ms, increasing.
    model : {"ncexp", "mono", "mono-offset", "loglinear"}
        Signal model (see the module docstring).
    skip_first_echo : bool
        Leave echo 1 out (default; right for spin-echo trains, see the module docstring).
    sigma : float, optional
        Noise SD per receiver channel for ``"ncexp"``, in signal units. Estimated from the
        background of ``signal`` (:func:`estimate_noise_sigma`) when not given.
    channels : int
        Receiver channels ``N`` of the magnitude combination, for ``"ncexp"``.
    mask : ndarray of bool, optional
        Spatial shape of ``signal``: voxels to fit (default: all).
    t2_bounds_ms : (float, float)
        Plausible T2 range; fitted values outside are flagged and set to NaN.
    min_r2 : float, optional
        Voxels with a lower ``R^2`` are flagged and set to NaN (DOSMA uses 0.9).
    device : str or torch.device
        Where to compute (``"cpu"``, ``"cuda"``; callers resolve ``"auto"`` with
        :func:`KneeSegLogic.inference.select_device`).
    dtype : torch.dtype
        Solver precision. float32 (default) is twice as fast as float64 on CPU and agrees with
        it to about 0.01 ms: the fit works in units where every parameter is of order 1.
    chunk_voxels : int
        Voxels per chunk, bounding memory (about 30 tensors of ``echoes x chunk_voxels``).
    max_iterations : int
        Levenberg-Marquardt iterations at most; voxels not converged by then are flagged.
    on_chunk : callable, optional
        Called as ``on_chunk(voxels_done, voxels_to_fit)`` after each chunk (progress, cancel).

    Returns
    -------
    T2Fit
    """
    started = time.perf_counter()
    if model not in MODELS:
        raise KneeSegError(f"unknown T2 model {model!r}; choose one of {', '.join(MODELS)}")
    signal = np.asarray(signal)
    echo_times = np.asarray(echo_times_ms, dtype=float)
    if signal.ndim < 2 or signal.shape[-1] != echo_times.size:
        raise InputError(
            None, f"signal of shape {signal.shape} does not hold {echo_times.size} echoes on its last axis"
        )
    # Spin-lock times (T1rho) start at 0; echo times are positive: both are times >= 0, increasing.
    check_echo_times((echo_times[1:] if echo_times.size > 1 and echo_times[0] == 0 else echo_times).tolist())
    echoes_used = tuple(range(1 if skip_first_echo else 0, echo_times.size))
    parameters = 3 if model == "mono-offset" else 2
    if len(echoes_used) < parameters + 1:
        raise InputError(
            None,
            f"model {model!r} needs at least {parameters + 1} echoes, "
            f"{len(echoes_used)} are left{' after skipping echo 1' if skip_first_echo else ''}",
        )
    if channels < 1:
        raise KneeSegError(f"channels must be 1 or more, got {channels}")
    low, high = float(t2_bounds_ms[0]), float(t2_bounds_ms[1])
    if not low < high:
        raise KneeSegError(f"T2 bounds must be increasing, got {t2_bounds_ms}")
    spatial_shape = signal.shape[:-1]
    used = signal[..., list(echoes_used)]
    sigma_source = None
    if model == "ncexp":
        if sigma is None:
            sigma, sigma_source = estimate_noise_sigma(used, channels), "background"
        else:
            sigma_source = "given"
        if not sigma > 0:
            raise KneeSegError(f"noise sigma must be positive, got {sigma}")
    else:
        sigma = None

    flat = used.reshape(-1, len(echoes_used))
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
    voxels = flat.shape[0]
    t2 = np.full(voxels, np.nan, np.float64)
    s0 = np.full(voxels, np.nan, np.float64)
    r2 = np.full(voxels, np.nan, np.float64)
    converged = np.zeros(voxels, bool)
    at_limit = np.zeros(voxels, bool)
    iterations = 0
    solver = _ChunkSolver(model, echo_times[list(echoes_used)], channels, torch_device, dtype)
    for begin in range(0, index.size, chunk_voxels):
        chunk = index[begin : begin + chunk_voxels]
        t2[chunk], s0[chunk], r2[chunk], converged[chunk], at_limit[chunk], steps = solver(
            flat[chunk], sigma, max_iterations
        )
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
        model=model,
        echo_times_ms=tuple(float(echo_times[e]) for e in echoes_used),
        echoes_used=echoes_used,
        sigma=sigma,
        sigma_source=sigma_source,
        channels=channels,
        t2_bounds_ms=(low, high),
        min_r2=min_r2,
        device=torch_device,
        dtype=dtype,
        iterations=iterations,
        started=started,
    )


def flagged_fit(
    t2: np.ndarray,
    s0: np.ndarray,
    r2: np.ndarray,
    fitted: np.ndarray,
    converged: np.ndarray,
    at_limit: np.ndarray,
    spatial_shape: tuple[int, ...],
    *,
    model: str,
    echo_times_ms: tuple[float, ...],
    echoes_used: tuple[int, ...],
    sigma: float | None,
    sigma_source: str | None,
    channels: int,
    t2_bounds_ms: tuple[float, float],
    min_r2: float | None,
    device: torch.device,
    dtype: torch.dtype,
    iterations: int,
    started: float,
    b1: np.ndarray | None = None,
) -> T2Fit:
    """Per-voxel fit results (flat over the fitted voxels' grid) flagged and shaped as a :class:`T2Fit`.

    A voxel's T2 is kept (else NaN) when it was fitted, converged, lies within ``t2_bounds_ms``
    and off the solver's rate limits, and reaches ``min_r2``; every fit model shares this rule.
    """
    low, high = t2_bounds_ms
    out_of_bounds = fitted & ((t2 < low) | (t2 > high) | at_limit)
    low_r2 = fitted & (r2 < min_r2) if min_r2 is not None else np.zeros(fitted.shape, bool)
    valid = fitted & converged & ~out_of_bounds & ~low_r2

    def shaped(array: np.ndarray, dtype_out: type = np.float32) -> np.ndarray:
        return array.astype(dtype_out).reshape(spatial_shape)

    return T2Fit(
        t2_ms=shaped(np.where(valid, t2, np.nan)),
        s0=shaped(s0),
        r2=shaped(r2),
        fitted=shaped(fitted, bool),
        converged=shaped(converged, bool),
        out_of_bounds=shaped(out_of_bounds, bool),
        low_r2=shaped(low_r2, bool),
        model=model,
        echo_times_ms=echo_times_ms,
        echoes_used=echoes_used,
        sigma=None if sigma is None else float(sigma),
        sigma_source=sigma_source,
        channels=channels,
        t2_bounds_ms=(low, high),
        min_r2=min_r2,
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        iterations=iterations,
        seconds=time.perf_counter() - started,
        **({} if b1 is None else {"b1": shaped(np.where(fitted, b1, np.nan))}),
    )


def fit_t2_volume(volume: Volume, mask: Volume | np.ndarray | None = None, **options) -> T2Fit:
    """Fit T2 to a multi-echo :class:`Volume` (echo times from the volume).

    Parameters
    ----------
    volume : Volume
        4D magnitude scan ``array[k, j, i, echo]`` with ``echo_times_ms``.
    mask : Volume or ndarray of bool, optional
        Voxels to fit, on the grid of ``volume`` (a label Volume counts as non-zero labels).
    **options
        Passed to :func:`fit_t2` (``model``, ``skip_first_echo``, ``sigma``, ``t2_bounds_ms``,
        ``min_r2``, ``device``, ...).

    Returns
    -------
    T2Fit
        Arrays indexed ``[k, j, i]`` on the grid of ``volume``; see :func:`t2_volumes`.
    """
    if not volume.is_multi_echo or volume.echo_times_ms is None:
        raise InputError(
            None, f"a multi-echo scan with echo times is needed for T2; got a 3D volume of size {volume.size}"
        )
    if isinstance(mask, Volume):
        if not mask.same_grid(volume):
            raise InputError(
                None, f"mask grid (size {mask.size}) differs from the scan grid (size {volume.size}); resample it first"
            )
        mask_array: np.ndarray | None = mask.array != 0
    else:
        mask_array = mask
    return fit_t2(volume.array, volume.echo_times_ms, mask=mask_array, **options)


def t2_volumes(fit: T2Fit, grid: Volume) -> dict[str, Volume]:
    """The maps of ``fit`` as 3D volumes on ``grid``, in the on-disk conventions.

    Returns ``{"t2": T2 in ms (float32, 0 where no valid value), "t2_r2": R^2 (float32, 0 where
    not fitted), "t2_s0": S0 (float32, 0 where not fitted), "t2_flags": uint8 bit map}``, and for
    the EPG model ``"t2_b1"`` (refocusing angle over nominal, 0 where not fitted).
    """

    def zero_filled(array: np.ndarray) -> np.ndarray:
        return np.nan_to_num(array, nan=0.0).astype(np.float32)

    reference = grid.echo(0) if grid.is_multi_echo else grid
    maps = {
        "t2": reference.with_array(zero_filled(fit.t2_ms)),
        "t2_r2": reference.with_array(zero_filled(fit.r2)),
        "t2_s0": reference.with_array(zero_filled(fit.s0)),
        "t2_flags": reference.with_array(fit.flags),
    }
    if fit.b1 is not None:
        maps["t2_b1"] = reference.with_array(zero_filled(fit.b1))
    return maps
