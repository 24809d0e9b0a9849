"""Segment a knee scan: a Volume in, the whole output folder out (``kneeseg segment`` / ``demo``).

Stages (each timed in results.json and reported as progress lines): read, model, inference (per
member, per slice batch), fusion and uncertainty, post-processing, segmentation file, surfaces,
T2 (multi-echo input: fitted inside the cartilage, with subregions), report.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from KneeSegLogic.errors import KneeSegError
from KneeSegLogic.io.outputs import (
    SEGMENTATION_FILE,
    Progress,
    Results,
    map_file,
    output_folder,
)
from KneeSegLogic.io.scans import write_volume
from KneeSegLogic.io.segfile import write_segmentation
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.segmentation import inference
from KneeSegLogic.segmentation.calibration import decide_labels
from KneeSegLogic.segmentation.uncertainty import (
    entropy,
    foreground_masked,
    most_uncertain_slices,
    mutual_information,
    per_structure,
)
from KneeSegLogic.tissues import BY_LABEL

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

    ``maps`` holds the uncertainty volumes (``uncertainty``, ``uncertainty_foreground`` and, for
    ensembles, ``mutual_information``) as arrays on the input grid.
    """
    from KneeSegLogic.segmentation.postprocess import apply_postprocessing

    log = inference.RunLog()
    member_maps = []
    reference = segmentation_image(volume, None)
    with results.stage("inference", progress):
        for index, member in enumerate(package.members):
            image = segmentation_image(volume, member.echo_index)
            probabilities = inference.member_probabilities(
                package, index, image, device, log, batch_size, flip_tta, progress
            )
            member_maps.append((probabilities, member.weight))
    with results.stage("fusion", progress):
        fused, mean_member_entropy = inference.fuse_on_grid(member_maps, reference)
        del member_maps
        channel_labels = np.asarray(package.tissue_labels, dtype=np.uint8)
        labels = channel_labels[decide_labels(fused, package.decision_offsets)]
        total = entropy(fused)
        maps = {"uncertainty": total}
        if mean_member_entropy is not None:
            maps["mutual_information"] = mutual_information(total, mean_member_entropy)
    with results.stage("postprocessing", progress):
        steps = [dict(step) for step in package.postprocessing]
        if closing_radius_mm is not None:
            steps = [s for s in steps if s["name"] != "closing"]
            if closing_radius_mm > 0:
                steps.append({"name": "closing", "radius_mm": closing_radius_mm})
        # Post-processing reads probabilities indexed by label value (a copy only when the
        # package's channels are not already in label order: it is a full-size array per class).
        if np.array_equal(channel_labels, np.arange(channel_labels.size)):
            by_label = fused
        else:
            by_label = np.zeros((int(channel_labels.max()) + 1, *fused.shape[1:]), np.float32)
            by_label[channel_labels] = fused
        labels_volume = apply_postprocessing(reference.with_array(labels), steps, probabilities=by_label)
        maps["uncertainty_foreground"] = foreground_masked(total, labels_volume.array)
    results["inference_log"] = {"events": log.events, "postprocessing": steps}
    for event in log.events:
        results.warn(event)
    return labels_volume, fused, maps


def structure_volumes(labels: Volume) -> dict[str, float]:
    """Volume of each structure present, in mm^3."""
    counts = np.bincount(labels.array.ravel(), minlength=max(BY_LABEL) + 1)
    return {
        BY_LABEL[v].key: round(float(counts[v]) * labels.voxel_volume_mm3, 2)
        for v in BY_LABEL
        if v < counts.size and counts[v] > 0
    }


@dataclasses.dataclass(frozen=True)
class SegmentOptions:
    """What a ``segment`` run does besides reading the scan (the CLI's options, typed).

    ``model`` is a package id or folder (None: the default package); ``members`` the first N
    ensemble members (0: all); ``closing_radius_mm`` overrides the package's closing step (0: none);
    ``regions`` the femoral subregion recipe for multi-echo T2 (None: ``dosma``).
    """

    model: str | None = None
    device: str = "auto"
    members: int = 0
    flip_tta: bool = False
    closing_radius_mm: float | None = None
    surfaces: bool = True
    regions: str | None = None
    overwrite: bool = False


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
    device = select_device(options.device)
    results["device"] = describe_device(device)
    results["model"] = {**package_summary(package), "sha256": package.sha256}
    with output_folder(out, results, options.overwrite) as folder:
        labels, _, maps = segment_volume(
            volume,
            package,
            device,
            results,
            progress,
            flip_tta=options.flip_tta,
            closing_radius_mm=options.closing_radius_mm,
        )
        with results.stage("write", progress):
            provenance = {"KneeSeg.model": f"{package.id} {package.version}", "KneeSeg.model_sha256": package.sha256}
            write_segmentation(labels, folder / SEGMENTATION_FILE, extra=provenance)
            for name, array in maps.items():
                write_volume(labels.with_array(array.astype(np.float32)), folder / map_file(name))
        results["volumes_mm3"] = structure_volumes(labels)
        results["uncertainty"] = {
            "per_structure": per_structure(maps["uncertainty"], labels.array),
            "most_uncertain_slices": most_uncertain_slices(
                maps["uncertainty"], labels.array, labels.index_to_physical()
            ),
        }
        t2_map = None
        if options.surfaces:
            from KneeSegLogic.quantification.surfaces import build_surfaces

            with results.stage("surfaces", progress):
                results["surfaces"] = build_surfaces(labels, folder, progress=progress)
        if volume.is_multi_echo and volume.array.shape[3] < MIN_ECHOES_FOR_T2:
            results.warn(
                f"T2 not fitted: {volume.array.shape[3]} echoes; a multi-echo spin-echo train of at least "
                f"{MIN_ECHOES_FOR_T2} echoes is needed (two-echo DESS T2 needs an EPG model)"
            )
        elif volume.is_multi_echo:
            from KneeSegLogic.quantification.t2maps import t2_with_regions

            with results.stage("t2", progress):
                t2 = t2_with_regions(
                    volume, labels, folder, results, device=str(device), progress=progress, variant=options.regions
                )
            results["t2"] = t2.section
            t2_map = t2.maps["t2"]
        with results.stage("report", progress):
            from KneeSegLogic.pipeline.report import write_report

            write_report(folder, segmentation_image(volume, None), labels, maps, results, t2=t2_map)
    progress("done", 1.0, f"results in {out}")
    return results
