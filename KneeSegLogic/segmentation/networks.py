"""Network architectures a model package may name, built from MONAI.

A package's ``model.json`` names an architecture and its arguments; only the names registered
here can be built, so a package cannot make the engine import or run arbitrary code.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from monai.networks.nets import BasicUNet, UNet

ARCHITECTURES: dict[str, Callable[..., torch.nn.Module]] = {
    "monai.UNet": UNet,
    "monai.BasicUNet": BasicUNet,
}


def build_network(name: str, args: dict[str, Any]) -> torch.nn.Module:
    """Construct the architecture ``name`` with keyword ``args`` (as stored in model.json).

    Example
    -------
    >>> net = build_network("monai.UNet", {"spatial_dims": 2, "in_channels": 5, "out_channels": 11,
    ...                                    "channels": [16, 32, 64, 128], "strides": [2, 2, 2]})
    """
    try:
        constructor = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}") from None
    return constructor(**args)
