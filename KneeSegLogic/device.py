"""Compute devices: which torch device a run uses and how it is described in results.json."""

from __future__ import annotations

import torch

from KneeSegLogic.errors import KneeSegError


def select_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise KneeSegError("--device cuda: no CUDA GPU is available to PyTorch here; use --device cpu or auto")
    return torch.device(requested)


def describe_device(device: torch.device) -> dict:
    """What results.json records about the device."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": properties.name, "memory_gib": round(properties.total_memory / 2**30, 1)}
    return {"type": "cpu", "threads": torch.get_num_threads()}
