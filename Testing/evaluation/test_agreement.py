"""Agreement statistics against answers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from KneeSegLogic.evaluation.agreement import (
    agreement,
    bland_altman,
    mean_absolute_error,
    rms_cv_percent,
)

REFERENCE = [10.0, 20.0, 30.0]
MEASURED = [12.0, 20.0, 27.0]


def test_mean_absolute_error():
    assert mean_absolute_error(REFERENCE, MEASURED) == pytest.approx((2 + 0 + 3) / 3)


def test_bland_altman():
    # differences 2, 0, -3: bias -1/3; deviations 7/3, 1/3, -8/3 -> variance (49 + 1 + 64) / 9 / 2
    bias, sd, (lower, upper) = bland_altman(REFERENCE, MEASURED)
    assert bias == pytest.approx(-1 / 3)
    assert sd == pytest.approx(math.sqrt(114 / 18))
    assert lower == pytest.approx(-1 / 3 - 1.96 * math.sqrt(114 / 18))
    assert upper == pytest.approx(-1 / 3 + 1.96 * math.sqrt(114 / 18))


def test_rms_cv():
    # pair (10, 12): SD 2/sqrt(2), mean 11; (20, 20): 0; (30, 27): SD 3/sqrt(2), mean 28.5
    cvs = [math.sqrt(2) / 11, 0.0, (3 / math.sqrt(2)) / 28.5]
    expected = 100 * math.sqrt(sum(cv * cv for cv in cvs) / 3)
    assert rms_cv_percent(REFERENCE, MEASURED) == pytest.approx(expected)
    assert expected == pytest.approx(8.5768, abs=1e-3)


def test_spearman_with_ties():
    # ranks x: 1 2 3 4 5; y = (5, 6, 7, 8, 7): ranks 1 2 3.5 5 3.5 -> rho = 8 / sqrt(10 * 9.5)
    result = agreement([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])
    assert result.spearman_rho == pytest.approx(8 / math.sqrt(95))
    assert result.n == 5


def test_perfect_agreement_and_non_finite_pairs():
    result = agreement([30.0, 35.0, np.nan, 41.0], [30.0, 35.0, 33.0, 41.0])
    assert result.n == 3
    assert (result.bias, result.mean_absolute_error, result.rms_cv_percent, result.spearman_rho) == (0, 0, 0, 1)
    assert result.to_dict()["limits_of_agreement"] == [0.0, 0.0]


def test_bad_input():
    with pytest.raises(ValueError, match="differ in number"):
        agreement([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="two finite pairs"):
        agreement([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        rms_cv_percent([0.0, 1.0], [0.0, 1.0])
