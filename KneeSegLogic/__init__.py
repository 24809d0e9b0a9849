"""KneeSegLogic: the engine of the KneeSeg 3D Slicer extension.

Pure Python (numpy, SimpleITK, torch, MONAI, VTK, scikit-image); it never imports ``slicer``,
``qt`` or ``ctk``. The Slicer module runs it as a subprocess (``python -m KneeSegLogic``) and
reads the output folder it writes (:mod:`KneeSegLogic.io.outputs`).

The public API, for notebooks and scripts (each name is imported on first use, so importing the
package stays cheap)::

    import KneeSegLogic as ks

    scan = ks.read_volume("knee.nrrd")                      # a Volume: array + LPS geometry
    ks.segment(scan, "out", ks.SegmentOptions(device="cpu"))  # the whole output folder
    labels = ks.read_volume("out/segmentation.seg.nrrd")     # ... or ks.read_labels(...)
    fit = ks.fit_t2_volume(mese_scan, mask=labels)          # T2 per voxel (ms)
    package = ks.get_package(None)                          # the default model package
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> (module, attribute). One home per concept: these are the library's own names.
_API: dict[str, tuple[str, str]] = {
    "Volume": ("KneeSegLogic.io.volume", "Volume"),
    "read_volume": ("KneeSegLogic.io.scans", "read_volume"),
    "write_volume": ("KneeSegLogic.io.scans", "write_volume"),
    "read_labels": ("KneeSegLogic.io.segfile", "read_labels"),
    "write_segmentation": ("KneeSegLogic.io.segfile", "write_segmentation"),
    "SegmentOptions": ("KneeSegLogic.pipeline.segment", "SegmentOptions"),
    "segment": ("KneeSegLogic.pipeline.segment", "segment_scan"),
    "T2Options": ("KneeSegLogic.quantification.t2maps", "T2Options"),
    "t2_scan": ("KneeSegLogic.quantification.t2maps", "t2_scan"),
    "fit_t2": ("KneeSegLogic.quantification.relaxometry", "fit_t2"),
    "fit_t2_volume": ("KneeSegLogic.quantification.relaxometry", "fit_t2_volume"),
    "analyse_cartilage": ("KneeSegLogic.quantification.regions", "analyse_cartilage"),
    "build_surfaces": ("KneeSegLogic.quantification.surfaces", "build_surfaces"),
    "evaluate": ("KneeSegLogic.evaluation.metrics", "evaluate"),
    "load_package": ("KneeSegLogic.segmentation.package", "load_package"),
    "get_package": ("KneeSegLogic.segmentation.registry", "get_package"),
}

__all__ = [
    "SegmentOptions",
    "T2Options",
    "Volume",
    "__version__",
    "analyse_cartilage",
    "build_surfaces",
    "evaluate",
    "fit_t2",
    "fit_t2_volume",
    "get_package",
    "load_package",
    "read_labels",
    "read_volume",
    "segment",
    "t2_scan",
    "write_segmentation",
    "write_volume",
]

if TYPE_CHECKING:
    from KneeSegLogic.evaluation.metrics import evaluate
    from KneeSegLogic.io.scans import read_volume, write_volume
    from KneeSegLogic.io.segfile import read_labels, write_segmentation
    from KneeSegLogic.io.volume import Volume
    from KneeSegLogic.pipeline.segment import SegmentOptions
    from KneeSegLogic.pipeline.segment import segment_scan as segment
    from KneeSegLogic.quantification.regions import analyse_cartilage
    from KneeSegLogic.quantification.relaxometry import fit_t2, fit_t2_volume
    from KneeSegLogic.quantification.surfaces import build_surfaces
    from KneeSegLogic.quantification.t2maps import T2Options, t2_scan
    from KneeSegLogic.segmentation.package import load_package
    from KneeSegLogic.segmentation.registry import get_package


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _API[name]
    except KeyError:
        raise AttributeError(f"module 'KneeSegLogic' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
