"""Compute devices: the spellings users type, which torch device a run uses, how results.json records it.

Spellings (``--device``): ``auto`` (a CUDA GPU, else an Apple MPS GPU, else the CPU with a
one-line notice), ``cpu``, ``cuda`` or ``gpu`` (the first CUDA GPU), ``cuda:N`` (CUDA GPU
number N), ``mps`` (Apple silicon). torch is imported only when a device is resolved, so
checking the spelling costs nothing at start-up.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, Callable

from KneeSegLogic.errors import KneeSegError

if TYPE_CHECKING:
    import torch


def cpu_cores() -> int:
    """CPU cores this process may run on (its Linux affinity mask, else the machine's count): the
    thread count of the work KneeSeg spreads itself (distance transforms, surfaces, writing)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


#: What ``--device`` accepts, as the help text shows it.
DEVICE_SPELLINGS = "auto, cpu, cuda, cuda:N, gpu, mps"

_SPELLING = re.compile(r"^(auto|cpu|gpu|mps|cuda(:\d+)?)$")


def parse_device(text: str) -> str:
    """Normalise a device spelling (``GPU`` -> ``cuda``, ``cuda:1`` stays); ValueError if unknown."""
    spelled = text.strip().lower()
    if not _SPELLING.match(spelled):
        raise ValueError(f"unknown device {text!r}; use one of {DEVICE_SPELLINGS}")
    return "cuda" if spelled == "gpu" else spelled


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def select_device(requested: str = "auto", notice: Callable[[str], None] | None = None) -> torch.device:
    """The torch device for ``requested`` (any spelling :func:`parse_device` accepts).

    ``auto`` takes CUDA, then MPS, then the CPU; falling back to the CPU calls ``notice`` with one
    line saying so. An explicit GPU that is not there is an error naming what is available.
    """
    import torch

    try:
        spelled = parse_device(requested)
    except ValueError as error:
        raise KneeSegError(f"--device {requested}: {error}") from None
    if spelled == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        if notice is not None:
            notice("no CUDA or MPS GPU found: running on the CPU (slower; --device cpu silences this)")
        return torch.device("cpu")
    if spelled.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise KneeSegError(
                f"--device {requested}: no CUDA GPU is available to PyTorch here; use --device cpu or auto"
            )
        number = int(spelled.split(":")[1]) if ":" in spelled else 0
        if number >= count:
            raise KneeSegError(f"--device {requested}: this machine has {count} CUDA GPU(s), numbered 0-{count - 1}")
    if spelled == "mps" and not _mps_available():
        raise KneeSegError(
            f"--device {requested}: Apple MPS is not available to PyTorch here; use --device cpu or auto"
        )
    return torch.device(spelled)


def describe_device(device: torch.device) -> dict[str, Any]:
    """What results.json records about the device."""
    import torch

    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "index": device.index or 0,
            "name": properties.name,
            "memory_gib": round(properties.total_memory / 2**30, 1),
        }
    if device.type == "mps":
        return {"type": "mps"}
    return {"type": "cpu", "threads": torch.get_num_threads()}
