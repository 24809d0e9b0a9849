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
from collections.abc import Mapping, Sequence
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
from KneeSegLogic.io.volume import Volume, resample_to_grid
from KneeSegLogic.quantification.dess import DESS_TIMES, DessParameters, fit_dess_volume
from KneeSegLogic.quantification.relaxometry import (
    DEFAULT_MODEL,
    DEFAULT_T2_BOUNDS_MS,
    MODELS,
    T2Fit,
    fit_t2_volume,
    t2_volumes,
)
from KneeSegLogic.tissues import BY_LABEL, tissues_in_group

CARTILAGE_LABELS = [t.label for t in tissues_in_group("cartilage")]

#: Every model ``kneeseg t2 --model`` / ``relax --model`` accepts.
T2_MODELS = (*MODELS, "epg", "dess")


@dataclasses.dataclass(frozen=True)
class RelaxationKind:
    """One relaxation time the same solver maps: its name, unit and sequence conventions.

    ``prefix`` names the output files and the results.json section (``t1rho.nrrd``,
    ``"t1rho"``); ``times`` what the fitted times are
    (:meth:`times_for` says it per signal model); ``bounds_ms`` the plausible range
    (reporting bounds; values outside are flagged, as for T2); ``skip_first`` whether the first
    time is left out by default (only MESE trains carry the stimulated-echo error).
    """

    key: str
    quantity: str
    times: str
    bounds_ms: tuple[float, float]
    skip_first: bool

    @property
    def prefix(self) -> str:
        return self.key

    def times_for(self, model: str) -> str:
        """What the fitted times are with ``model``: a DESS scan's two echoes are no MESE train."""
        if self.key == "t2" and model == "dess":
            return DESS_TIMES
        return self.times


#: The kinds ``kneeseg relax --kind`` maps. Cartilage T1rho at 3 T reads 30-60 ms and rises with
#: degeneration, so its reporting range is wider than T2's 0-100 ms.
KINDS: dict[str, RelaxationKind] = {
    "t2": RelaxationKind("t2", "T2", "echo times (MESE)", DEFAULT_T2_BOUNDS_MS, True),
    "t1rho": RelaxationKind("t1rho", "T1rho", "spin-lock times", (0.0, 200.0), False),
    "t2star": RelaxationKind("t2star", "T2*", "echo times (multi-echo GRE)", (0.0, 100.0), False),
}


def _fit_section(fit: T2Fit, volume: Volume) -> dict[str, Any]:
    return {
        "model": fit.model,
        "unit": "ms",
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
    ``min_r2`` rejects poorer fits; ``regions`` the femoral subregion recipe or a region file
    (:func:`~KneeSegLogic.quantification.regions.read_region_spec`; None: ``dosma``). ``kind`` is a
    key of :data:`KINDS`; ``model`` may also be ``"epg"`` (all echoes, T2 with B1) or ``"dess"``
    (two-echo DESS; ``dess`` holds :class:`~KneeSegLogic.quantification.dess.DessParameters`
    overrides such as ``repetition_time_ms``, ``flip_angle_deg``, ``t1_ms``). ``epg_t1_ms`` and
    ``slice_profile`` tune the EPG model. ``exclude_surface`` drops the articular-surface voxel
    layer (partial volume with joint fluid) from region statistics.
    """

    model: str = DEFAULT_MODEL
    skip_first_echo: bool = True
    sigma: float | None = None
    channels: int = 1
    min_r2: float | None = None
    regions: str | None = None
    device: str = "auto"
    overwrite: bool = False
    kind: str = "t2"
    dess: Mapping[str, float | None] = dataclasses.field(default_factory=dict)
    epg_t1_ms: float | None = None
    slice_profile: Sequence[float] | None = None
    exclude_surface: bool = False


def fit_map(
    volume: Volume,
    labels: Volume | None,
    model: str,
    device: str,
    on_chunk,
    *,
    skip_first_echo: bool,
    sigma: float | None,
    channels: int,
    min_r2: float | None,
    t2_bounds_ms: tuple[float, float],
    dess_parameters: DessParameters | None = None,
    epg_t1_ms: float | None = None,
    slice_profile: Sequence[float] | None = None,
) -> T2Fit:
    """Fit one relaxation map of ``volume`` inside ``labels`` with ``model`` (any of :data:`T2_MODELS`)."""
    if model == "dess":
        if dess_parameters is None:
            raise InputError(None, "DESS T2 needs the sequence parameters (TR, TE, flip angle)")
        return fit_dess_volume(volume, dess_parameters, mask=labels, t2_bounds_ms=t2_bounds_ms)
    if model == "epg":
        from KneeSegLogic.quantification.epg import DEFAULT_T1_MS, fit_epg

        return fit_epg(
            volume.array,
            volume.echo_times_ms or (),
            sigma=sigma,
            channels=channels,
            mask=None if labels is None else labels.array != 0,
            t1_ms=epg_t1_ms or DEFAULT_T1_MS,
            slice_profile=slice_profile,
            t2_bounds_ms=t2_bounds_ms,
            min_r2=min_r2,
            device=device,
            on_chunk=on_chunk,
        )
    return fit_t2_volume(
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


def surface_layer(labels: Volume) -> np.ndarray:
    """Cartilage voxels face-adjacent to a voxel that is neither cartilage nor bone (fluid, fat).

    This is the articular-surface layer, one voxel deep, where thick slices mix cartilage with
    joint fluid (partial volume). The bone side is not part of it.
    """
    from scipy import ndimage

    cartilage = np.isin(labels.array, CARTILAGE_LABELS)
    bone = np.isin(labels.array, [t.label for t in tissues_in_group("bone")])
    outside = ~cartilage & ~bone
    return cartilage & ndimage.binary_dilation(outside, structure=ndimage.generate_binary_structure(3, 1))


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
    *,
    kind: str = "t2",
    dess_parameters: DessParameters | None = None,
    epg_t1_ms: float | None = None,
    slice_profile: Sequence[float] | None = None,
    exclude_surface: bool = False,
) -> T2Maps:
    """Fit a relaxation map in ``labels`` (or everywhere), write the maps into ``out``, divide the cartilage.

    Parameters
    ----------
    volume : Volume
        Multi-echo magnitude scan with echo (or spin-lock) times.
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
        See :func:`KneeSegLogic.relaxometry.fit_t2`; ``model`` also ``"epg"`` or ``"dess"``.
    variant : str, optional
        Femoral region recipe (``"dosma"``, ``"thomas"``) or region file; the default if None.
    progress : Progress, optional
        Progress lines (and cancellation) per stage and per chunk of voxels.
    kind : str
        Key of :data:`KINDS`: names the maps (``t1rho.nrrd`` ...) and the quantity recorded.
    dess_parameters, epg_t1_ms, slice_profile
        Model settings for ``"dess"`` and ``"epg"``.
    exclude_surface : bool
        Leave the articular-surface layer (:func:`surface_layer`) out of region statistics.

    Returns
    -------
    T2Maps
        The results.json section and the maps written (keys ``t2``, ``t2_r2`` ... for kind t2;
        ``t1rho``, ``t1rho_r2`` ... otherwise).
    """
    if labels is not None and not labels.same_grid(volume):
        raise InputError(None, f"label map grid (size {labels.size}) differs from the scan grid (size {volume.size})")
    relaxation = KINDS[kind]

    def on_chunk(done: int, total: int) -> None:
        if progress is not None:
            progress("t2_fit", done / max(total, 1), f"{done:,}/{total:,} voxels")

    with results.stage("t2_fit", progress):
        fit = fit_map(
            volume,
            labels,
            model,
            device,
            on_chunk,
            skip_first_echo=skip_first_echo,
            sigma=sigma,
            channels=channels,
            min_r2=min_r2,
            t2_bounds_ms=t2_bounds_ms,
            dess_parameters=dess_parameters,
            epg_t1_ms=epg_t1_ms,
            slice_profile=slice_profile,
        )
    section = _fit_section(fit, volume)
    section["quantity"] = relaxation.quantity
    section["times"] = relaxation.times_for(model)
    if dess_parameters is not None and model == "dess":
        section["dess_parameters"] = dess_parameters.to_json()
    converged = section["all_fitted_voxels"]["fraction_converged"]
    if converged is not None and converged < 0.99:
        results.warn(f"the {relaxation.quantity} fit converged in only {100 * converged:.1f} % of the fitted voxels")
    maps = {relaxation.prefix + name[2:]: volume_ for name, volume_ in t2_volumes(fit, volume).items()}
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
        t2_map = volume.echo(0).with_array(fit.t2_ms)  # NaN where no valid value
        excluded = surface_layer(labels) if exclude_surface else None
        section["cartilage"] = analyse_cartilage(
            labels, t2_map, out, variant=variant, value_max_ms=t2_bounds_ms[1], excluded=excluded
        )
        section["cartilage"]["surface_layer_excluded"] = exclude_surface
    return outcome


def dess_t2_with_regions(
    volume: Volume,
    labels: Volume,
    out: Path,
    results: Results,
    scan_path: Path | None,
    variant: str | None = None,
    progress: Progress | None = None,
    overrides: Mapping[str, float | None] | None = None,
) -> T2Maps | None:
    """DESS T2 for ``kneeseg segment`` on a two-echo scan; None (with a warning) without TR/flip angle."""
    from KneeSegLogic.quantification.dess import read_dess_parameters

    try:
        parameters = read_dess_parameters(scan_path, volume.echo_times_ms, **(overrides or {}))
    except InputError as error:
        results.warn(f"DESS T2 not fitted: {error}")
        return None
    return t2_with_regions(
        volume, labels, out, results, model="dess", variant=variant, progress=progress, dess_parameters=parameters
    )


def _read_mask(path: Path, volume: Volume, results: Results) -> Volume:
    """The label map in ``path`` on the scan grid.

    A mask on another grid (e.g. cropped in Slicer, or of another scan) is resampled by
    nearest neighbour, with a warning in ``results``: region statistics then rest on labels
    moved by up to half a mask voxel, which the reader of results.json must know.
    """
    from KneeSegLogic.io.segfile import read_labels

    reference = volume.echo(0)
    labels = read_labels(path)
    if not labels.same_grid(reference, atol=1e-6):
        labels = resample_to_grid(labels, reference, is_label=True)
        results.warn(f"{path}: mask was on another grid; resampled onto the scan grid (nearest neighbour)")
    if not labels.array.any():  # a mask of another scan: fitting 0 voxels would "succeed"
        raise InputError(path, "does not overlap the scan: no voxel of its structures lies inside the scan's grid")
    return labels


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
        raise InputError(
            scan_path, f"is a single 3D volume (size {volume.size}); a relaxation map needs a multi-echo scan"
        )
    labels = _read_mask(mask_path, volume, results) if mask_path is not None else None
    device = select_device(options.device)
    results["device"] = describe_device(device)
    if scan_path is not None:
        results.add_input("scan", scan_path)
    if mask_path is not None:
        results.add_input("mask", mask_path)
    if options.kind not in KINDS:
        raise InputError(None, f"unknown relaxation kind {options.kind!r}; choose one of {', '.join(KINDS)}")
    relaxation = KINDS[options.kind]
    dess_parameters = None
    if options.model == "dess":
        from KneeSegLogic.quantification.dess import read_dess_parameters

        dess_parameters = read_dess_parameters(scan_path, volume.echo_times_ms, **dict(options.dess))
    with output_folder(out, results, options.overwrite) as folder:
        if labels is not None:
            write_segmentation(labels, folder / SEGMENTATION_FILE)
        results[relaxation.prefix] = t2_with_regions(
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
            t2_bounds_ms=relaxation.bounds_ms,
            variant=options.regions,
            progress=progress,
            kind=options.kind,
            dess_parameters=dess_parameters,
            epg_t1_ms=options.epg_t1_ms,
            slice_profile=options.slice_profile,
            exclude_surface=options.exclude_surface,
        ).section
    progress("done", 1.0, f"results in {out}")
    return results
