"""The output-folder contract between the engine and the Slicer module.

A command writes everything into ``OUT.partial/`` and renames it to ``OUT/`` only when complete,
so a reader never sees a half-written folder. An existing ``OUT`` is refused unless
``overwrite=True``; on any error the partial folder is removed. ``results.json`` records what was
done (schema version, inputs with sha256, package versions, device, timings per stage,
warnings) so a result can be traced and reproduced.

Progress goes to stdout as one JSON object per line::

    {"stage": "inference", "progress": 0.42, "message": "slice 67/160"}
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TextIO

from KneeSegLogic import __version__
from KneeSegLogic.errors import CancelledError, KneeSegError

SCHEMA_VERSION = "1.0"

# The files of an output folder: the one table every writer and reader uses.
RESULTS_FILE = "results.json"
SEGMENTATION_FILE = "segmentation.seg.nrrd"
LABELS_FILE = "labels.nrrd"  # a plain label map (a folder may hold one instead of SEGMENTATION_FILE)
T2_FILE = "t2.nrrd"
REGIONS_FILE = "regions.nrrd"
REGIONS_TABLE = "regions.csv"
REPORT_IMAGE = "report.png"
REPORT_PAGE = "report.html"
SURFACES_FOLDER = "surfaces"
T2_CHANGE_TABLE = "t2_change.csv"
FOLLOWUP_T2_FILE = "followup_t2_registered.nrrd"
FOLLOWUP_LABELS_FILE = "followup_labels_registered.nrrd"
BATCH_SUMMARY = "summary.csv"
BATCH_FILE = "batch.json"


def map_file(name: str) -> str:
    """File name of a scalar map written on the input grid (``uncertainty`` -> ``uncertainty.nrrd``)."""
    return f"{name}.nrrd"


PACKAGES = ("numpy", "torch", "monai", "SimpleITK", "vtk", "scikit-image", "scipy", "slicerio", "pydicom")


def sha256_of(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (sorted relative paths and contents)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"KneeSegLogic": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class Progress:
    """Reports progress as JSON lines and checks for cancellation.

    Parameters
    ----------
    stream : text stream, optional
        Where the lines go (stdout by default; ``None`` silences them).
    cancel : callable, optional
        Returns True when the run should stop; checked at every report, so long loops that
        report per slice or per patch are cancellable at that granularity.
    """

    def __init__(self, stream: TextIO | None | str = "stdout", cancel: Callable[[], bool] | None = None) -> None:
        # "stdout" is looked up at each report, so redirection after construction is honoured.
        self.stream = stream
        self.cancel = cancel

    def __call__(self, stage: str, progress: float, message: str = "") -> None:
        if self.cancel is not None and self.cancel():
            raise CancelledError(f"cancelled during {stage}")
        stream = sys.stdout if self.stream == "stdout" else self.stream
        if stream is not None:
            line = {"stage": stage, "progress": round(min(max(progress, 0.0), 1.0), 4), "message": message}
            stream.write(json.dumps(line) + "\n")
            stream.flush()


class Results:
    """Accumulates what goes into ``results.json``: inputs, timings, warnings and sections."""

    def __init__(self, command: str) -> None:
        self.data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "command": command,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "inputs": [],
            "packages": package_versions(),
            "device": None,
            "timings_s": {},
            "warnings": [],
        }

    def add_input(self, role: str, path: str | Path) -> None:
        path = Path(path)
        self.data["inputs"].append({"role": role, "path": str(path.resolve()), "sha256": sha256_of(path)})

    def warn(self, message: str) -> None:
        self.data["warnings"].append(message)

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @contextmanager
    def stage(self, name: str, progress: Progress | None = None) -> Iterator[None]:
        """Time a stage; its duration in seconds goes to ``timings_s[name]``."""
        if progress is not None:
            progress(name, 0.0, "started")
        start = time.perf_counter()
        yield
        self.data["timings_s"][name] = round(time.perf_counter() - start, 4)
        if progress is not None:
            progress(name, 1.0, "done")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that replaces it only when the block succeeds.

    The temporary name keeps the file's extension (``.nii.gz`` included) because writers such as
    ITK and matplotlib choose the format from it. On any error the temporary file is removed and
    ``path`` is left as it was, so a reader never sees a half-written file.
    """
    path = Path(path)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    temporary = path.with_name(f".{path.name}.tmp{suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_json(data: Any, path: str | Path) -> None:
    """Write JSON atomically."""
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write a CSV table atomically: a header of ``columns``, then one line per row (missing keys empty)."""
    with atomic_file(path) as temporary, open(temporary, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(columns), restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


@contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Yield ``FOLDER.partial`` to fill; it becomes ``folder`` only when the block succeeds.

    A stale ``.partial`` (left by a crashed run) is removed first; on any error the partial folder
    is removed and ``folder`` is untouched. An existing ``folder`` is replaced at the end: whether
    that is allowed is the caller's decision, taken before the work starts.
    """
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if folder.exists():
        previous = folder.with_name(folder.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        folder.rename(previous)
        partial.rename(folder)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        partial.rename(folder)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@contextmanager
def output_folder(out: str | Path, results: Results, overwrite: bool = False) -> Iterator[Path]:
    """Yield ``OUT.partial/`` to write into; publish it as ``OUT/`` with ``results.json`` at the end.

    Raises
    ------
    KneeSegError
        ``OUT`` exists and ``overwrite`` is False (nothing is touched), or OUT is a file.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise KneeSegError(f"{out}: output folder exists; choose another or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise KneeSegError(f"{out}: exists and is not a folder")
    started = time.perf_counter()
    with atomic_folder(out) as partial:
        yield partial
        results.data["timings_s"]["total"] = round(time.perf_counter() - started, 4)
        write_json(results.data, partial / RESULTS_FILE)
