"""``kneeseg segment`` and ``kneeseg demo``: a scan in, the whole output folder out.

Stages (each timed in results.json and reported as progress lines): read, model, inference (per
member, per slice batch), fusion and uncertainty, post-processing, segmentation file, surfaces,
T2 (multi-echo input: fitted inside the cartilage, with subregions), report.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from . import inference
from .calibration import decide_labels
from .errors import KneeSegError
from .models import get_package, package_summary
from .outputs import Progress, Results, output_folder
from .segfile import write_segmentation
from .tissues import BY_LABEL
from .uncertainty import entropy, foreground_masked, most_uncertain_slices, mutual_information, per_structure
from .volume import Volume, read_volume, write_volume

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "Resources" / "SampleData"
DEMO_SCAN = SAMPLE_DATA / "mese_t2_knee.nrrd"

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


def segment_volume(volume: Volume, package, device, results: Results, progress: Progress,
                   batch_size: int = 16, flip_tta: bool = False, closing_radius_mm: float | None = None):
    """Run every member, fuse on the input grid, post-process; return (labels, probabilities, maps).

    ``maps`` holds the uncertainty volumes (``uncertainty``, ``uncertainty_foreground`` and, for
    ensembles, ``mutual_information``) as arrays on the input grid.
    """
    from .postprocess import apply_postprocessing

    log = inference.RunLog()
    member_maps = []
    reference = segmentation_image(volume, None)
    with results.stage("inference", progress):
        for index, member in enumerate(package.members):
            image = segmentation_image(volume, member.echo_index)
            probabilities = inference.member_probabilities(package, index, image, device, log, batch_size,
                                                           flip_tta, progress)
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
    return {BY_LABEL[v].key: round(float(counts[v]) * labels.voxel_volume_mm3, 2)
            for v in BY_LABEL if v < counts.size and counts[v] > 0}


def run_segment(args: argparse.Namespace) -> int:
    progress = Progress()
    results = Results("segment")
    with results.stage("read", progress):
        volume = read_volume(args.input, getattr(args, "echo_times", None))
    results.add_input("scan", args.input)
    package = get_package(getattr(args, "model", None))
    members = getattr(args, "members", 0) or 0
    if members < 0 or members > len(package.members):
        raise KneeSegError(f"--members {members}: the model has {len(package.members)} ensemble members")
    if members:
        package = dataclasses.replace(package, members=package.members[:members])
    device = inference.select_device(getattr(args, "device", "auto"))
    results["device"] = inference.describe_device(device)
    results["model"] = {**package_summary(package), "sha256": package.sha256}
    with output_folder(args.output, results, getattr(args, "overwrite", False)) as out:
        labels, _, maps = segment_volume(volume, package, device, results, progress,
                                         flip_tta=getattr(args, "flip_tta", False),
                                         closing_radius_mm=getattr(args, "closing_radius", None))
        with results.stage("write", progress):
            provenance = {"KneeSeg.model": f"{package.id} {package.version}", "KneeSeg.model_sha256": package.sha256}
            write_segmentation(labels, out / "segmentation.seg.nrrd", extra=provenance)
            for name, array in maps.items():
                write_volume(labels.with_array(array.astype(np.float32)), out / f"{name}.nrrd")
        results["volumes_mm3"] = structure_volumes(labels)
        results["uncertainty"] = {
            "per_structure": per_structure(maps["uncertainty"], labels.array),
            "most_uncertain_slices": most_uncertain_slices(maps["uncertainty"], labels.array,
                                                           labels.index_to_physical()),
        }
        if not getattr(args, "no_surfaces", False):
            from .surfaces import build_surfaces

            with results.stage("surfaces", progress):
                results["surfaces"] = build_surfaces(labels, out, progress=progress)
        if volume.is_multi_echo and volume.array.shape[3] < MIN_ECHOES_FOR_T2:
            results.warn(f"T2 not fitted: {volume.array.shape[3]} echoes; a multi-echo spin-echo train of at least "
                         f"{MIN_ECHOES_FOR_T2} echoes is needed (two-echo DESS T2 needs an EPG model)")
        elif volume.is_multi_echo:
            from .t2_command import t2_with_regions

            with results.stage("t2", progress):
                results["t2"] = t2_with_regions(volume, labels, out, results, device=str(device), progress=progress,
                                                variant=getattr(args, "regions", None))
        with results.stage("report", progress):
            from .report import write_report

            write_report(out, volume, labels, maps, results)
    progress("done", 1.0, f"results in {args.output}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """The main job on the bundled sample: segmentation, uncertainty, T2 with regions, surfaces, report."""
    if not DEMO_SCAN.exists():
        raise KneeSegError(f"{DEMO_SCAN}: bundled sample missing; reinstall KneeSeg from a full clone")
    demo_args = argparse.Namespace(input=DEMO_SCAN, output=args.output, overwrite=getattr(args, "overwrite", False),
                                   echo_times=None, model=None, device=getattr(args, "device", "auto"),
                                   no_surfaces=False, closing_radius=None, flip_tta=False, members=0, regions=None)
    return run_segment(demo_args)
