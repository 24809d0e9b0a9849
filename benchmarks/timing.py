"""Timing helper shared by the benchmark scripts (run them as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def best_time(function: Callable[[], T], repeats: int = 1) -> tuple[float, T]:
    """Best wall time in seconds of ``repeats`` calls (machines here are shared and noisy), and the result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result  # type: ignore[return-value]
