"""Network architectures a model package may name, built from MONAI.

A package's ``model.json`` names an architecture and its arguments; only the names registered
here can be built, so a package cannot make the engine import or run arbitrary code.

torch and MONAI are imported only when a network is built: checking a ``model.json`` (and so
``kneeseg models``) binds its arguments to the constructor signatures recorded here instead,
which ``Testing/commands/test_cli.py`` checks against the installed MONAI's own.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

REQUIRED = inspect.Parameter.empty

#: name -> (class in ``monai.networks.nets``, constructor parameters in order with their
#: defaults; :data:`REQUIRED` marks one without a default), as MONAI 1.x declares them.
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "monai.UNet": (
        "UNet",
        {
            "spatial_dims": REQUIRED,
            "in_channels": REQUIRED,
            "out_channels": REQUIRED,
            "channels": REQUIRED,
            "strides": REQUIRED,
            "kernel_size": 3,
            "up_kernel_size": 3,
            "num_res_units": 0,
            "act": "PRELU",
            "norm": "INSTANCE",
            "dropout": 0.0,
            "bias": True,
            "adn_ordering": "NDA",
        },
    ),
    "monai.BasicUNet": (
        "BasicUNet",
        {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 2,
            "features": (32, 32, 64, 128, 256, 32),
            "act": ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
            "norm": ("instance", {"affine": True}),
            "bias": True,
            "dropout": 0.0,
            "upsample": "deconv",
        },
    ),
}


def signature(name: str) -> inspect.Signature:
    """The constructor signature of architecture ``name`` (KeyError when it is not registered)."""
    _, parameters = ARCHITECTURES[name]
    return inspect.Signature(
        [inspect.Parameter(key, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=v) for key, v in parameters.items()]
    )


def build_network(name: str, args: dict[str, Any]) -> torch.nn.Module:
    """Construct the architecture ``name`` with keyword ``args`` (as stored in model.json).

    Example
    -------
    >>> net = build_network("monai.UNet", {"spatial_dims": 2, "in_channels": 5, "out_channels": 11,
    ...                                    "channels": [16, 32, 64, 128], "strides": [2, 2, 2]})
    """
    try:
        class_name, _ = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}") from None
    from monai.networks import nets

    constructor: Any = getattr(nets, class_name)
    network: torch.nn.Module = constructor(**args)
    return network
