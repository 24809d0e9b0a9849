"""Training data on disk: label maps and real (image, label) pairs turned into anatomies."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from KneeSegLogic.errors import InputError
from KneeSegLogic.io.scans import IMAGE_SUFFIXES, read_volume
from KneeSegLogic.io.segfile import read_labels
from KneeSegLogic.training.anatomy import composition_weights, read_bank_record
from KneeSegLogic.training.synthesis import Anatomy


def _case_name(path: Path) -> str:
    """A case's name: the file name without its image or segmentation suffix (``a.seg.nrrd`` -> ``a``)."""
    name = path.name
    if path.is_dir():  # a DICOM series
        return name
    for suffix in (".seg.nrrd", *IMAGE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _cases(folder: Path, allow_folders: bool) -> dict[str, Path]:
    """Case name -> file (or DICOM folder) in ``folder``; hidden entries (partial writes) skipped."""
    cases: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        readable = entry.name.lower().endswith(IMAGE_SUFFIXES) if entry.is_file() else allow_folders
        if entry.name.startswith(".") or not readable:
            continue
        name = _case_name(entry)
        if name in cases:
            raise InputError(
                entry, f"case {name!r} has two files in {folder.name}/ ({cases[name].name} and {entry.name})"
            )
        cases[name] = entry
    return cases


def find_training_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(image, labels) of the pairs layout: ``folder/images/<case>.*`` with ``folder/labels/<case>.*``.

    That is what the Slicer module's "save corrected case" writes (``images/<case>.nrrd``,
    ``labels/<case>.seg.nrrd``). Images are NRRD/NIfTI/MHA files or DICOM folders; labels are
    Slicer segmentations or label volumes with KneeSeg label values. Returns ``[]`` when
    ``folder`` has no ``images/`` and ``labels/`` subfolders.

    Raises
    ------
    InputError
        A case with an image but no labels or the reverse, or two files for one case.
    """
    images_folder, labels_folder = Path(folder) / "images", Path(folder) / "labels"
    if not (images_folder.is_dir() and labels_folder.is_dir()):
        return []
    images, labels = _cases(images_folder, allow_folders=True), _cases(labels_folder, allow_folders=False)
    for name in sorted(set(images) ^ set(labels)):
        path, other = (images[name], "labels") if name in images else (labels[name], "images")
        raise InputError(path, f"case {name!r} has no file of the same name in {other}/")
    return [(images[name], labels[name]) for name in sorted(images)]


def read_training_pair(image_path: Path, label_path: Path) -> Anatomy:
    """An anatomy carrying its real image, from a scan and its label file.

    The image is the scan itself, or its second echo if multi-echo (the echo inference reads);
    labels on another grid are resampled onto the scan's grid by nearest neighbour.
    """
    from KneeSegLogic.pipeline.segment import segmentation_image

    image = segmentation_image(read_volume(image_path), None)
    return Anatomy.from_pair(image, read_labels(label_path, reference=image))


def load_anatomies(paths: Path | Sequence[Path]) -> list[Anatomy]:
    """Training anatomies from label maps (images synthesised) and real (image, label) pairs.

    Each path is a label map file, or a folder holding label maps (NRRD/NIfTI/MHA label volumes
    or Slicer segmentations, KneeSeg label values) and/or the pairs layout of
    :func:`find_training_pairs` (``images/`` and ``labels/`` subfolders); both may be mixed.
    Pairs give anatomies with an ``image``, which synthesis shows with its real intensities
    (:attr:`SynthesisSettings.real_image_probability`). The label maps of an anatomy bank folder
    (one with ``bank.json``) are drawn by composition (:func:`~KneeSegLogic.training.anatomy.composition_weights`,
    as :attr:`Anatomy.draw_weight`, mean 1 over the folder); a file the record does not name, like
    every other knee, with weight 1.
    """
    anatomies = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        path = Path(path)
        if not path.exists():
            raise InputError(path, "no such file or folder")
        if path.is_file():
            label_maps, pairs = [path], []
        else:
            label_maps = sorted(
                p
                for p in path.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_SUFFIXES)
            )
            pairs = find_training_pairs(path)
        if not label_maps and not pairs:
            raise InputError(path, "no label maps (NRRD, NIfTI, MHA) and no images/ + labels/ pairs found")
        maps = [Anatomy.from_volume(read_labels(file)) for file in label_maps]
        record = read_bank_record(path) if path.is_dir() else None
        if record is not None:  # an anatomy bank: knees made the same way share their draws
            weights = composition_weights(record)
            for file, anatomy in zip(label_maps, maps):
                anatomy.draw_weight = weights.get(file.name.split(".")[0], 1.0 / len(label_maps)) * len(label_maps)
        anatomies += maps
        anatomies += [read_training_pair(image, labels) for image, labels in pairs]
    return anatomies


#: Held-out knees of an anatomy bank (:func:`KneeSegLogic.training.anatomy.build_bank`) live in this
#: subfolder: :func:`load_anatomies` never reads them, the builder chooses and reports on them.
HELDOUT_FOLDER = "heldout"


def load_heldout_anatomies(paths: Path | Sequence[Path]) -> list[Anatomy]:
    """Label maps in ``<folder>/heldout/`` of each data folder (whole knees never trained on)."""
    anatomies = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        folder = Path(path) / HELDOUT_FOLDER
        if folder.is_dir():
            anatomies += [
                Anatomy.from_volume(read_labels(file))
                for file in sorted(folder.iterdir())
                if file.is_file() and not file.name.startswith(".") and file.name.lower().endswith(IMAGE_SUFFIXES)
            ]
    return anatomies
