"""T2 maps from a multi-echo scan, with cartilage region statistics from a mask (``kneeseg t2``).

Writes into the output folder (all maps on the input's 3D grid, float32 unless said):

- ``t2.nrrd``: T2 in ms; 0 where there is no valid value (see ``t2_flags``);
- ``t2_r2.nrrd``: R^2 of the fit (linear scale); ``t2_s0.nrrd``: fitted S0 (signal units);
- ``t2_flags.nrrd``: uint8 bits 1 fitted, 2 converged, 4 out of bounds, 8 R^2 below the cut
  (:mod:`KneeSegLogic.relaxometry`);
- with ``--mask``: the files of :func:`KneeSegLogic.regions.analyse_cartilage` (``regions.nrrd``,
  ``regions.csv``, projection maps);
- ``results.json``: section ``"t2"`` (model, echoes used, sigma, fractions converged / out of
  bounds, T2 statistics, timings, device) with the region analysis under ``"cartilage"``, the
  layout ``kneeseg segment`` uses for multi-echo scans.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from KneeSegLogic.errors import InputError
from KneeSegLogic.io.outputs import (
    SEGMENTATION_FILE,
    Progress,
    Results,
    map_file,
    output_folder,
)
from KneeSegLogic.io.scans import write_volume
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.quantification.relaxometry import (
    DEFAULT_MODEL,
    DEFAULT_T2_BOUNDS_MS,
    T2Fit,
    fit_t2_volume,
    t2_volumes,
)
from KneeSegLogic.tissues import BY_LABEL, tissues_in_group

CARTILAGE_LABELS = [t.label for t in tissues_in_group("cartilage")]


def _fit_section(fit: T2Fit, volume: Volume) -> dict[str, Any]:
    return {
        "model": fit.model,
        "echo_times_ms": list(volume.echo_times_ms or ()),
        "echoes_used": [e + 1 for e in fit.echoes_used],  # 1-based, as scanners number echoes
        "echo_times_used_ms": list(fit.echo_times_ms),
        "noise_sigma": fit.sigma,
        "noise_sigma_source": fit.sigma_source,
        "receiver_channels": fit.channels,
        "t2_bounds_ms": list(fit.t2_bounds_ms),
        "min_r2": fit.min_r2,
        "device": fit.device,
        "precision": fit.dtype,
        "iterations_max": fit.iterations,
        "fit_seconds": round(fit.seconds, 3),
        "all_fitted_voxels": fit.summary(),
    }


@dataclasses.dataclass(frozen=True)
class T2Maps:
    """What :func:`t2_with_regions` produced: the results.json section and the maps (``t2`` in ms, 0 = not fitted; ``t2_r2``, ``t2_s0``, ``t2_flags``) on the 3D scan grid."""

    section: dict[str, Any]
    maps: dict[str, Volume]


@dataclasses.dataclass(frozen=True)
class T2Options:
    """How ``kneeseg t2`` fits (see :func:`KneeSegLogic.quantification.relaxometry.fit_t2`).

    ``sigma`` is the noise SD per receiver channel in signal units (None: from the background);
    ``min_r2`` rejects poorer fits; ``regions`` the femoral subregion recipe (None: ``dosma``).
    """

    model: str = DEFAULT_MODEL
    skip_first_echo: bool = True
    sigma: float | None = None
    channels: int = 1
    min_r2: float | None = None
    regions: str | None = None
    device: str = "auto"
    overwrite: bool = False


def t2_with_regions(
    volume: Volume,
    labels: Volume | None,
    out: Path,
    results: Results,
    device: str = "cpu",
    model: str = DEFAULT_MODEL,
    skip_first_echo: bool = True,
    sigma: float | None = None,
    channels: int = 1,
    min_r2: float | None = None,
    t2_bounds_ms: tuple[float, float] = DEFAULT_T2_BOUNDS_MS,
    variant: str | None = None,
    progress: Progress | None = None,
) -> T2Maps:
    """Fit T2 in ``labels`` (or everywhere), write the maps into ``out``, divide the cartilage.

    Parameters
    ----------
    volume : Volume
        Multi-echo magnitude scan with echo times.
    labels : Volume or None
        Label map on the grid of ``volume``: the fit is limited to its non-zero voxels, and the
        cartilage in it is divided into regions (:func:`KneeSegLogic.regions.analyse_cartilage`).
    out : Path
        Folder being written (the ``OUT.partial`` of :func:`~KneeSegLogic.outputs.output_folder`).
    results : Results
        Receives stage timings and warnings.
    device : str
        Torch device, already resolved (``"cpu"``, ``"cuda"``).
    model, skip_first_echo, sigma, channels, min_r2, t2_bounds_ms
        See :func:`KneeSegLogic.relaxometry.fit_t2`.
    variant : str, optional
        Femoral region recipe (``"dosma"``, ``"thomas"``); the regions module's default if None.
    progress : Progress, optional
        Progress lines (and cancellation) per stage and per chunk of voxels.

    Returns
    -------
    T2Maps
        The ``"t2"`` section of ``results.json`` and the maps written.
    """
    if labels is not None and not labels.same_grid(volume):
        raise InputError(None, f"label map grid (size {labels.size}) differs from the scan grid (size {volume.size})")

    def on_chunk(done: int, total: int) -> None:
        if progress is not None:
            progress("t2_fit", done / max(total, 1), f"{done:,}/{total:,} voxels")

    with results.stage("t2_fit", progress):
        fit = fit_t2_volume(
            volume,
            mask=labels,
            model=model,
            skip_first_echo=skip_first_echo,
            sigma=sigma,
            channels=channels,
            min_r2=min_r2,
            t2_bounds_ms=t2_bounds_ms,
            device=device,
            on_chunk=on_chunk,
        )
    section = _fit_section(fit, volume)
    converged = section["all_fitted_voxels"]["fraction_converged"]
    if converged is not None and converged < 0.99:
        results.warn(f"the T2 fit converged in only {100 * converged:.1f} % of the fitted voxels")
    maps = t2_volumes(fit, volume)
    with results.stage("t2_write", progress):
        section["files"] = [write_volume(map_volume, out / map_file(name)).name for name, map_volume in maps.items()]
    outcome = T2Maps(section, maps)
    if labels is None:
        return outcome
    section["per_structure"] = {
        BY_LABEL[int(label)].key: fit.summary(labels.array == label)
        for label in np.unique(labels.array)
        if int(label) in BY_LABEL
    }
    from KneeSegLogic.quantification.regions import analyse_cartilage

    if not np.isin(labels.array, CARTILAGE_LABELS).any():
        results.warn(f"cartilage regions skipped: the mask holds no cartilage (labels {CARTILAGE_LABELS})")
        return outcome
    with results.stage("t2_regions", progress):
        t2_map = volume.echo(0).with_array(fit.t2_ms)  # NaN where no valid T2
        section["cartilage"] = analyse_cartilage(labels, t2_map, out, variant=variant)
    return outcome


def _read_mask(path: Path, volume: Volume) -> Volume:
    """The label map in ``path`` on the scan grid (nearest-neighbour resampling when needed)."""
    from KneeSegLogic.io.segfile import read_labels

    return read_labels(path, reference=volume.echo(0))


def t2_scan(
    volume: Volume,
    out: Path,
    options: T2Options,
    *,
    scan_path: Path | None = None,
    mask_path: Path | None = None,
    results: Results | None = None,
    progress: Progress | None = None,
) -> Results:
    """Fit T2 maps of a multi-echo ``volume`` into the output folder ``out`` (written atomically).

    With ``mask_path`` (a segmentation or label map) the fit is limited to its structures, the
    cartilage is divided into regions, and the mask is written beside the maps as the folder's
    segmentation, so ``kneeseg t2-change`` finds it there.
    """
    from KneeSegLogic.device import describe_device, select_device
    from KneeSegLogic.io.segfile import write_segmentation

    progress = progress or Progress()
    results = results or Results("t2")
    if not volume.is_multi_echo:
        raise InputError(scan_path, f"is a single 3D volume (size {volume.size}); T2 needs a multi-echo scan")
    labels = _read_mask(mask_path, volume) if mask_path is not None else None
    device = select_device(options.device)
    results["device"] = describe_device(device)
    if scan_path is not None:
        results.add_input("scan", scan_path)
    if mask_path is not None:
        results.add_input("mask", mask_path)
    with output_folder(out, results, options.overwrite) as folder:
        if labels is not None:
            write_segmentation(labels, folder / SEGMENTATION_FILE)
        results["t2"] = t2_with_regions(
            volume,
            labels,
            folder,
            results,
            device=str(device),
            model=options.model,
            skip_first_echo=options.skip_first_echo,
            sigma=options.sigma,
            channels=options.channels,
            min_r2=options.min_r2,
            variant=options.regions,
            progress=progress,
        ).section
    progress("done", 1.0, f"results in {out}")
    return results
