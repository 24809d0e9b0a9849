"""Segment a knee scan: a Volume in, the whole output folder out (``kneeseg segment`` / ``demo``).

Stages (each timed in results.json and reported as progress lines): read, model, inference (per
member, per slice batch), fusion and uncertainty, post-processing, segmentation file, surfaces,
T2 (multi-echo input: fitted inside the cartilage, with subregions), report.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from KneeSegLogic.errors import KneeSegError
from KneeSegLogic.io.export import write_dicom_seg, write_nifti_labels
from KneeSegLogic.io.outputs import (
    DICOM_SEG_FILE,
    NIFTI_LABELS_FILE,
    SEGMENTATION_FILE,
    Progress,
    Results,
    input_location,
    map_file,
    output_folder,
)
from KneeSegLogic.io.scans import write_volume
from KneeSegLogic.io.segfile import write_segmentation
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.segmentation import inference
from KneeSegLogic.segmentation.uncertainty import (
    UNCERTAINTY_STEP,
    foreground_masked,
    label_sums,
    most_uncertain_slices,
    mutual_information,
    per_structure,
    quantised,
)
from KneeSegLogic.tissues import BY_KEY, BY_LABEL, TISSUES, Tissue

# Without an echo named by the model, segment the second echo of a multi-echo train: Thomas et
# al.'s MESE model reads echo 2 (echo 1 carries the stimulated-echo error, late echoes lack SNR).
# Two-echo scans (DESS) are segmented on the root-sum-of-squares of both echoes, as DOSMA does
# for qDESS: echo 2 alone is too noisy.
DEFAULT_ECHO_INDEX = 1

# T2 needs at least three echoes after echo 1 is skipped.
MIN_ECHOES_FOR_T2 = 4


def segmentation_image(volume: Volume, echo_index: int | None) -> Volume:
    """The 3D image a model sees: the volume itself, one echo, or the RSS of a two-echo scan."""
    if not volume.is_multi_echo:
        return volume
    if echo_index is None and volume.array.shape[3] == 2:
        rss = np.sqrt(np.sum(volume.array.astype(np.float32) ** 2, axis=3))
        return volume.with_array(rss)
    index = DEFAULT_ECHO_INDEX if echo_index is None else echo_index
    if index >= volume.array.shape[3]:
        raise KneeSegError(f"the model reads echo {index + 1} but the scan has {volume.array.shape[3]} echoes")
    return volume.echo(index)


def segment_volume(
    volume: Volume,
    package,
    device,
    results: Results,
    progress: Progress,
    batch_size: int = 16,
    flip_tta: bool = False,
    closing_radius_mm: float | None = None,
):
    """Run every member, fuse on the input grid, post-process; return (labels, probabilities, maps).

    ``probabilities[c]`` is fused channel ``c`` on the input grid, resampled when asked for (see
    :class:`~KneeSegLogic.segmentation.inference.FusedProbabilities`): no C-channel full-size
    array is kept. ``maps`` holds the uncertainty volumes (float32: ``uncertainty``,
    ``uncertainty_foreground`` and, for ensembles, ``mutual_information``) on the input grid.
    """
    from KneeSegLogic.segmentation.postprocess import apply_postprocessing

    log = inference.RunLog()
    member_maps = []
    reference = segmentation_image(volume, None)
    with results.stage("inference", progress):
        n_members = len(package.members)
        for index, member in enumerate(package.members):
            image = segmentation_image(volume, member.echo_index)
            probabilities = inference.member_probabilities(
                package, index, image, device, log, batch_size, flip_tta, _member_share(progress, index, n_members)
            )
            member_maps.append((probabilities, member.weight))
    with results.stage("fusion", progress):
        fusion = inference.fuse_and_decide(
            member_maps,
            reference,
            package.decision_offsets,
            device,
            lambda fraction: progress("fusion", fraction, "fusing the members on the scan's grid"),
        )
        del member_maps
        channel_labels = np.asarray(package.tissue_labels, dtype=np.uint8)
        # Channel index is the label value for the default package: no full-size lookup then.
        identity = np.array_equal(channel_labels, np.arange(channel_labels.size))
        labels = fusion.channel_index if identity else channel_labels[fusion.channel_index]
        total = fusion.entropy
        maps = {"uncertainty": total}
        if fusion.mean_member_entropy is not None:
            maps["mutual_information"] = mutual_information(total, fusion.mean_member_entropy, overwrite=True)
        fusion.mean_member_entropy = None
    with results.stage("postprocessing", progress):
        steps = [dict(step) for step in package.postprocessing]
        if closing_radius_mm is not None:
            steps = [s for s in steps if s["name"] != "closing"]
            if closing_radius_mm > 0:
                steps.append({"name": "closing", "radius_mm": closing_radius_mm})
        # Post-processing reads probabilities indexed by label value, one channel at a time and
        # only when a step needs it (resampled from the working grid then).
        by_label = _ChannelsByLabel(fusion.probabilities, channel_labels, labels.shape)
        labels_volume = apply_postprocessing(reference.with_array(labels), steps, probabilities=by_label)
        maps["uncertainty_foreground"] = foreground_masked(total, labels_volume.array)
    results["inference_log"] = {"events": log.events, "postprocessing": steps}
    for event in log.events:
        results.warn(event)
    return labels_volume, fusion.probabilities, maps


class _ChannelsByLabel:
    """Fused probability maps indexed by label value (zeros for a label no channel predicts)."""

    def __init__(self, probabilities, channel_labels: np.ndarray, shape: tuple[int, ...]) -> None:
        self.probabilities = probabilities
        self.channel_labels = channel_labels
        self.shape = shape

    def __getitem__(self, label: int) -> np.ndarray:
        channels = np.flatnonzero(self.channel_labels == label)
        if not channels.size:
            return np.zeros(self.shape, np.float32)
        return np.asarray(self.probabilities[int(channels[0])])


def _member_share(progress: Progress, index: int, count: int) -> Callable[[str, float, str], None]:
    """Progress of member ``index`` of ``count`` as a fraction of the whole inference stage.

    Each member reports its own 0..1; scaled into its share, the stage never goes backwards
    when the next member starts.
    """

    def report(stage: str, fraction: float, message: str = "") -> None:
        progress(stage, (index + min(max(fraction, 0.0), 1.0)) / count, message)

    return report


def structure_volumes(labels: Volume, counts: np.ndarray | None = None) -> dict[str, float]:
    """Volume of each structure present, in mm^3 (``counts``: the labels' :func:`label_sums`, if known)."""
    counts = label_sums(labels.array) if counts is None else counts
    return {
        BY_LABEL[v].key: round(float(counts[v]) * labels.voxel_volume_mm3, 2)
        for v in BY_LABEL
        if v < counts.size and counts[v] > 0
    }


# gzip level of the uncertainty maps: on quantised maps level 1 is several times faster than 6
# for a file a few percent larger (benchmarks/pipeline.py prints both).
MAP_COMPRESSION_LEVEL = 1


def write_uncertainty_maps(labels: Volume, maps: dict[str, np.ndarray], folder: Path, full: bool = False) -> list[Path]:
    """Write ``uncertainty.nrrd`` (and ``mutual_information.nrrd`` for ensembles) into ``folder``.

    Values are quantised to :data:`~KneeSegLogic.segmentation.uncertainty.UNCERTAINTY_STEP`
    (float32, so Slicer shows them in [0, 1] as before) and are 0 outside the knee box (there
    every member is certain). By default only voxels near predicted structures keep their value
    (``uncertainty_foreground``'s mask); ``full`` writes the maps everywhere. Both facts are in
    the NRRD header (``KneeSeg.quantisation_step``, ``KneeSeg.uncertainty_mask``).
    """
    # Indices of the voxels kept (the masked map's non-zero ones; there it equals the full map):
    # quantising and masking only those is a fraction of a pass over the whole grid.
    near = None if full else np.flatnonzero(maps["uncertainty_foreground"])
    header = {
        "KneeSeg.quantisation_step": f"{UNCERTAINTY_STEP:g}",
        "KneeSeg.uncertainty_mask": "none" if full else "within 2 voxels (city-block) of a predicted structure",
    }
    written = []
    values: np.ndarray | None = None
    for name in ("uncertainty", "mutual_information"):
        if name not in maps:
            continue
        if near is None:
            values = quantised(maps[name])
        else:  # one zero-filled buffer for both maps: they keep the same voxels
            values = np.zeros(maps[name].shape, np.float32) if values is None else values
            values.reshape(-1)[near] = quantised(maps[name].reshape(-1)[near])
        volume = labels.with_array(values)
        written.append(
            write_volume(volume, folder / map_file(name), metadata=header, compression_level=MAP_COMPRESSION_LEVEL)
        )
    return written


@dataclasses.dataclass(frozen=True)
class SegmentOptions:
    """What a ``segment`` run does besides reading the scan (the CLI's options, typed).

    ``model`` is a package id or folder (None: the default package); ``members`` the first N
    ensemble members (0: all); ``closing_radius_mm`` overrides the package's closing step (0: none);
    ``regions`` the femoral subregion recipe for multi-echo T2 (None: ``dosma``); ``fast`` runs
    only the coarsest member, without flip TTA; ``roi_subset`` keeps only these structure keys in
    every output (the network still predicts all of them jointly); ``report`` writes report.png
    and report.html; ``formats`` adds label maps in other formats (see
    :data:`KneeSegLogic.io.export.FORMATS`; ``dicom-seg`` needs DICOM input); surfaces are VTP
    files, and also STL with ``stl``.
    """

    model: str | None = None
    device: str = "auto"
    members: int = 0
    flip_tta: bool = False
    closing_radius_mm: float | None = None
    surfaces: bool = True
    regions: str | None = None
    overwrite: bool = False
    full_uncertainty: bool = False
    fast: bool = False
    roi_subset: tuple[str, ...] = ()
    report: bool = True
    formats: tuple[str, ...] = ()
    stl: bool = False


def _roi_subset(keys: tuple[str, ...]) -> tuple[Tissue, ...]:
    """The structures ``--roi-subset`` names (all when empty); KneeSegError naming the valid keys."""
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown:
        raise KneeSegError(f"--roi-subset {' '.join(unknown)}: unknown structure; known: {', '.join(BY_KEY)}")
    return tuple(t for t in TISSUES if not keys or t.key in keys)


def segment_scan(
    volume: Volume,
    out: Path,
    options: SegmentOptions,
    *,
    scan_path: Path | None = None,
    results: Results | None = None,
    progress: Progress | None = None,
) -> Results:
    """Segment ``volume`` and write the whole output folder ``out`` atomically.

    ``scan_path`` (the file or DICOM folder the volume was read from) is recorded with its sha256
    in results.json; ``results`` may carry stages timed by the caller (e.g. ``read``).
    """
    from KneeSegLogic.device import describe_device, select_device
    from KneeSegLogic.segmentation.package import package_summary
    from KneeSegLogic.segmentation.registry import get_package

    progress = progress or Progress()
    results = results or Results("segment")
    if scan_path is not None:
        results.add_input("scan", scan_path)
    package = get_package(options.model)
    if options.members < 0 or options.members > len(package.members):
        raise KneeSegError(f"--members {options.members}: the model has {len(package.members)} ensemble members")
    if options.members:
        package = dataclasses.replace(package, members=package.members[: options.members])
    if options.fast:  # the coarsest member alone: fewest slices and pixels to predict
        coarsest = max(package.members, key=lambda m: float(np.prod(m.spacing_mm)))
        package = dataclasses.replace(package, members=[coarsest])
    flip_tta = options.flip_tta and not options.fast
    structures = _roi_subset(options.roi_subset)
    if "dicom-seg" in options.formats and not (scan_path is not None and input_location(scan_path).is_dir()):
        raise KneeSegError("--format dicom-seg needs DICOM input (a folder holding the series) to refer to")
    device = select_device(options.device)
    results["device"] = describe_device(device)
    results["options"] = {
        **dataclasses.asdict(options),
        "members_run": [m.name for m in package.members],
        "flip_tta": flip_tta,
        "threads": results["device"].get("threads"),
    }
    results["model"] = {**package_summary(package), "sha256": package.sha256}
    with output_folder(out, results, options.overwrite) as folder:
        labels, _, maps = segment_volume(
            volume,
            package,
            device,
            results,
            progress,
            flip_tta=flip_tta,
            closing_radius_mm=options.closing_radius_mm,
        )
        if options.roi_subset:
            keep = np.zeros(max(BY_LABEL) + 1, bool)
            keep[[t.label for t in structures]] = True
            labels = labels.with_array(np.where(keep[labels.array], labels.array, 0).astype(labels.array.dtype))
        # The files are written (gzip and ITK release the GIL) on a second thread while this one
        # builds the statistics and surfaces; the stage's time is the writer's own.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kneeseg-write") as writer:
            written = writer.submit(
                _write_label_files, labels, maps, folder, options, package, scan_path, results, progress
            )
            try:
                _after_writing(
                    volume, labels, maps, folder, options, structures, scan_path, results, progress, device, written
                )
            except Exception:
                # When both threads fail (a full disk), the label files' error is the one a serial
                # run would have met first, and it names its file: report that one.
                first = written.exception()
                if first is not None:
                    raise first from None
                raise
    progress("done", 1.0, f"results in {out}")
    return results


def _write_label_files(
    labels: Volume,
    maps: dict[str, np.ndarray],
    folder: Path,
    options: SegmentOptions,
    package,
    scan_path: Path | None,
    results: Results,
    progress: Progress,
) -> None:
    """Stage ``write``: the segmentation file, the uncertainty maps and the extra label formats."""
    with results.stage("write", progress):
        provenance = {"KneeSeg.model": f"{package.id} {package.version}", "KneeSeg.model_sha256": package.sha256}
        write_segmentation(labels, folder / SEGMENTATION_FILE, extra=provenance)
        write_uncertainty_maps(labels, maps, folder, full=options.full_uncertainty)
        if "nifti" in options.formats:
            write_nifti_labels(labels, folder / NIFTI_LABELS_FILE)
        if "dicom-seg" in options.formats and scan_path is not None:
            write_dicom_seg(labels, scan_path, folder / DICOM_SEG_FILE, f"{package.id} {package.version}")


def _after_writing(
    volume: Volume,
    labels: Volume,
    maps: dict[str, np.ndarray],
    folder: Path,
    options: SegmentOptions,
    structures: tuple[Tissue, ...],
    scan_path: Path | None,
    results: Results,
    progress: Progress,
    device,
    written: Future,
) -> None:
    """Statistics, surfaces, T2 and the report, while ``written`` (the label files) completes."""
    counts = label_sums(labels.array)  # one pass for the volumes and the mean uncertainties
    results["volumes_mm3"] = structure_volumes(labels, counts)
    results["uncertainty"] = {
        "per_structure": per_structure(maps["uncertainty"], labels.array, counts),
        "most_uncertain_slices": most_uncertain_slices(
            maps["uncertainty"], labels.array, labels.index_to_physical(), masked=maps["uncertainty_foreground"]
        ),
    }
    t2_map = None
    if options.surfaces:
        from KneeSegLogic.quantification.surfaces import build_surfaces

        with results.stage("surfaces", progress):
            formats = ("vtp", "stl") if options.stl else ("vtp",)
            results["surfaces"] = build_surfaces(labels, folder, tissues=structures, progress=progress, formats=formats)
    if volume.is_multi_echo and volume.array.shape[3] == 2 and any(t.group == "cartilage" for t in structures):
        from KneeSegLogic.quantification.t2maps import dess_t2_with_regions

        # Two echoes: DESS, whose T2 follows from the echo ratio (parameters from DICOM).
        with results.stage("t2", progress):
            dess = dess_t2_with_regions(volume, labels, folder, results, scan_path, options.regions, progress)
        if dess is not None:
            results["t2"], t2_map = dess.section, dess.maps["t2"]
    elif volume.is_multi_echo and volume.array.shape[3] < MIN_ECHOES_FOR_T2:
        results.warn(
            f"T2 not fitted: {volume.array.shape[3]} echoes; a multi-echo spin-echo train of at least "
            f"{MIN_ECHOES_FOR_T2} echoes is needed (or a two-echo DESS scan)"
        )
    elif volume.is_multi_echo and not any(t.group == "cartilage" for t in structures):
        results.warn("T2 not fitted: --roi-subset holds no cartilage")
    elif volume.is_multi_echo:
        from KneeSegLogic.quantification.t2maps import t2_with_regions

        with results.stage("t2", progress):
            t2 = t2_with_regions(
                volume, labels, folder, results, device=str(device), progress=progress, variant=options.regions
            )
        results["t2"] = t2.section
        t2_map = t2.maps["t2"]
    if options.report:
        with results.stage("report", progress):
            from KneeSegLogic.pipeline.report import write_report

            write_report(folder, segmentation_image(volume, None), labels, maps, results, t2=t2_map)
    written.result()  # the writer's error, if any, fails the run
