"""Agreement between two sets of paired measurements (e.g. T2 per region, automatic vs manual).

The statistics Thomas et al. (Cartilage, 2021) report for automatic against manual T2:

- **Spearman's rank correlation** (ties get average ranks);
- **mean absolute error** ``mean |measured - reference|``;
- **Bland-Altman** bias ``mean(measured - reference)`` and 95 % limits of agreement
  ``bias +- 1.96 SD(measured - reference)`` (SD with ddof = 1);
- **root-mean-square coefficient of variation** (Gluer et al. 1995): per pair,
  ``CV = SD(pair) / mean(pair)`` with the SD of the two values (ddof = 1, i.e.
  ``|a - b| / sqrt(2)``); ``RMS-CV = sqrt(mean(CV^2))``, in percent.

Pairs with a non-finite value are left out (``n`` says how many were used).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

LIMITS_Z = 1.96


@dataclass(frozen=True)
class Agreement:
    """Agreement of ``measured`` with ``reference`` (units of the measurements; CV in %)."""

    n: int
    spearman_rho: float
    spearman_p: float
    mean_absolute_error: float
    bias: float
    sd_difference: float
    limits_of_agreement: tuple[float, float]
    rms_cv_percent: float

    def to_dict(self) -> dict[str, float | int | list[float]]:
        data = asdict(self)
        data["limits_of_agreement"] = list(self.limits_of_agreement)
        return data


def _paired(
    reference_values: Sequence[float] | np.ndarray, measured_values: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    reference = np.asarray(reference_values, dtype=float).ravel()
    measured = np.asarray(measured_values, dtype=float).ravel()
    if reference.shape != measured.shape:
        raise ValueError(f"paired measurements differ in number: {reference.size} vs {measured.size}")
    finite = np.isfinite(reference) & np.isfinite(measured)
    if finite.sum() < 2:
        raise ValueError("agreement needs at least two finite pairs")
    return reference[finite], measured[finite]


def mean_absolute_error(reference: Sequence[float] | np.ndarray, measured: Sequence[float] | np.ndarray) -> float:
    reference, measured = _paired(reference, measured)
    return float(np.mean(np.abs(measured - reference)))


def bland_altman(
    reference: Sequence[float] | np.ndarray, measured: Sequence[float] | np.ndarray
) -> tuple[float, float, tuple[float, float]]:
    """Bias, SD of the differences and the 95 % limits of agreement (measured minus reference)."""
    reference, measured = _paired(reference, measured)
    difference = measured - reference
    bias = float(difference.mean())
    sd = float(difference.std(ddof=1))
    return bias, sd, (bias - LIMITS_Z * sd, bias + LIMITS_Z * sd)


def rms_cv_percent(reference: Sequence[float] | np.ndarray, measured: Sequence[float] | np.ndarray) -> float:
    """Root-mean-square of the per-pair coefficients of variation, in percent."""
    reference, measured = _paired(reference, measured)
    pair_mean = (reference + measured) / 2
    if np.any(pair_mean <= 0):
        raise ValueError("coefficients of variation need positive measurements")
    pair_sd = np.abs(measured - reference) / np.sqrt(2)
    return float(100 * np.sqrt(np.mean((pair_sd / pair_mean) ** 2)))


def agreement(reference: Sequence[float] | np.ndarray, measured: Sequence[float] | np.ndarray) -> Agreement:
    """All agreement statistics of ``measured`` against ``reference`` (see the module docstring)."""
    reference, measured = _paired(reference, measured)
    rho, p = stats.spearmanr(reference, measured)
    bias, sd, limits = bland_altman(reference, measured)
    return Agreement(
        n=int(reference.size),
        spearman_rho=float(rho),
        spearman_p=float(p),
        mean_absolute_error=mean_absolute_error(reference, measured),
        bias=bias,
        sd_difference=sd,
        limits_of_agreement=limits,
        rms_cv_percent=rms_cv_percent(reference, measured),
    )
