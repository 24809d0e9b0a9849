"""The output-folder contract between the engine and the Slicer module.

A command writes everything into ``OUT.partial/`` and renames it to ``OUT/`` only when complete,
so a reader never sees a half-written folder. An existing ``OUT`` is refused unless
``overwrite=True``; an ``OUT`` that contains an input or lies inside one is always refused (so
``--overwrite`` can never delete an input); on any error the partial folder is removed. The
writing run holds an exclusive lock on ``OUT.partial`` (``flock`` on the folder), so a second run
to the same ``OUT`` is refused instead of deleting the first one's work; an unlocked
``OUT.partial`` was left by a dead process and is cleaned. ``results.json`` records what was
done (schema version, inputs with sha256, package versions, device, timings per stage,
warnings) so a result can be traced and reproduced.

Progress goes to stdout as one JSON object per line::

    {"stage": "inference", "progress": 0.42, "message": "slice 67/160"}
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence, TextIO

from KneeSegLogic import __version__
from KneeSegLogic.errors import CancelledError, KneeSegError, one_line

try:  # POSIX; on Windows folders are not locked (Slicer there runs one engine process at a time)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

SCHEMA_VERSION = "1.0"

# The files of an output folder: the one table every writer and reader uses.
RESULTS_FILE = "results.json"
SEGMENTATION_FILE = "segmentation.seg.nrrd"
NIFTI_LABELS_FILE = "segmentation.nii.gz"  # --format nifti
DICOM_SEG_FILE = "segmentation.dcm"  # --format dicom-seg
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
    """sha256 of a file, or of a folder's files (sorted relative paths and contents).

    A DICOM series chosen as ``FOLDER::SeriesInstanceUID`` is hashed as its folder.
    """
    path = input_location(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


#: Separator of a DICOM folder and the SeriesInstanceUID chosen in it (``FOLDER::UID``).
SERIES_SEPARATOR = "::"


def input_location(path: str | Path) -> Path:
    """The file or folder an input names on disk: ``FOLDER::UID`` is ``FOLDER``."""
    text = str(path)
    return Path(text.split(SERIES_SEPARATOR, 1)[0]) if SERIES_SEPARATOR in text else Path(text)


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

    def __init__(
        self, stream: TextIO | None | Literal["stdout"] = "stdout", cancel: Callable[[], bool] | None = None
    ) -> None:
        # "stdout" is looked up at each report, so redirection after construction is honoured.
        self.stream = stream
        self.cancel = cancel

    def __call__(self, stage: str, progress: float, message: str = "") -> None:
        if self.cancel is not None and self.cancel():
            raise CancelledError(f"cancelled during {stage}")
        stream = sys.stdout if isinstance(self.stream, str) else self.stream
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
        text = str(path)
        series = text.split(SERIES_SEPARATOR, 1)[1] if SERIES_SEPARATOR in text else ""
        resolved = str(input_location(path).resolve()) + (SERIES_SEPARATOR + series if series else "")
        self.data["inputs"].append({"role": role, "path": resolved, "sha256": sha256_of(path)})

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
        try:
            yield temporary
            # Writers that report failure only on stderr (VTK prints "ERR|" and goes on) leave a
            # short file on a full disk: a file system with no block left is a failed write.
            if _disk_full(path.parent):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            os.replace(temporary, path)
        except OSError as error:
            raise write_error(path, error) from None
        except CancelledError:
            raise
        except Exception:
            # C writers (ITK raises RuntimeError, VTK returns 0) say "trouble writing" without an
            # errno: name the cause when the file system shows it (full disk, file size limit).
            cause = _write_limit_reached(path.parent, temporary)
            if cause is None:
                raise
            raise write_error(path, OSError(cause, os.strerror(cause), str(path))) from None
    finally:
        if temporary.exists():
            temporary.unlink()


def _disk_full(folder: Path) -> bool:
    try:
        return os.statvfs(folder).f_bavail == 0
    except (OSError, AttributeError):  # no statvfs on Windows
        return False


def _write_limit_reached(folder: Path, written: Path) -> int | None:
    """``ENOSPC`` when ``folder``'s file system is full, ``EFBIG`` when ``written`` reached this
    process's file size limit (``ulimit -f``, as batch schedulers set it), else None."""
    if _disk_full(folder):
        return errno.ENOSPC
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and written.stat().st_size >= limit:
            return errno.EFBIG
    except (ImportError, OSError):  # no resource module on Windows; the file is gone
        pass
    return None


# Errors of the file system a user can act on (full disk, file too large, no permission, a path under a file).
_WRITE_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,  # the file size limit (ulimit -f)
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EEXIST,
}


#: Of those, the ones only a write can raise (a full disk, a quota, a file size limit, a read-only file system).
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def write_error(path: str | Path, error: OSError) -> Exception:
    """A one-line :class:`KneeSegError` for a failed write the user can fix, else ``error`` itself."""
    if error.errno in _WRITE_ERRNOS:
        return KneeSegError(f"{path}: cannot be written ({error.strerror or one_line(error)})")
    return error


def write_json(data: Any, path: str | Path) -> None:
    """Write JSON atomically."""
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(_finite(data), indent=2, default=_json_default, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None: JSON has no NaN, and readers reject it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _finite(value.tolist())
    return value


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

    The partial folder is locked (``flock``) while it is filled: a second run to the same folder
    is refused, and a stale, unlocked ``.partial`` (left by a killed run) is removed first. On any
    error the partial folder is removed, with SIGINT/SIGTERM held back meanwhile so that a second
    signal cannot interrupt the clean-up, and ``folder`` is untouched. An existing ``folder`` is
    replaced at the end: whether that is allowed is the caller's decision, taken before the work
    starts.

    Raises
    ------
    KneeSegError
        Another run holds ``FOLDER.partial``; ``FOLDER.partial`` is a file; the folder cannot be
        created (read-only, under a file, disk full).
    """
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    lock: int | None = None
    claimed = False
    try:
        # Claimed with signals held: a SIGTERM between creating the folder and recording it as
        # ours would otherwise leave it behind (the clean-up below removes it only once claimed).
        with _signals_held():
            lock = _claim_partial(partial)
            ACTIVE.add(partial)
            claimed = True
        try:
            yield partial
        except OSError as error:
            # A writer that wrote straight into the folder (not through atomic_file) on a full
            # disk: one line naming the file, or the folder when the error names none.
            if error.errno not in _FULL_ERRNOS:
                raise
            raise KneeSegError(f"{error.filename or folder}: cannot be written ({error.strerror})") from None
        # Published with signals held: a signal between the two renames would lose the old folder.
        with _signals_held():
            try:
                _publish(partial, folder)
            except OSError as error:
                raise write_error(folder, error) from None
            PUBLISHED.add(folder.resolve())
    except BaseException:
        if claimed:
            with _signals_held():
                shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        ACTIVE.discard(partial)
        if lock is not None:
            os.close(lock)


def _publish(partial: Path, folder: Path) -> None:
    """Rename ``partial`` to ``folder``, replacing an existing ``folder`` (removed only afterwards)."""
    if folder.exists():
        previous = folder.with_name(folder.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        folder.rename(previous)
        partial.rename(folder)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        partial.rename(folder)


#: Folders published by this process (so the CLI knows a late Ctrl-C came after a complete run).
PUBLISHED: set[Path] = set()

#: Partial folders this process is filling now.
ACTIVE: set[Path] = set()


def remove_partials() -> None:
    """Remove the partial folders this process is filling (the CLI's last act on a late signal)."""
    for partial in list(ACTIVE):
        shutil.rmtree(partial, ignore_errors=True)


def _claim_partial(partial: Path) -> int | None:
    """Create ``partial`` and lock it; returns the locked descriptor (None where locks are absent)."""
    for _attempt in range(2):
        if partial.is_symlink() or (partial.exists() and not partial.is_dir()):
            raise KneeSegError(f"{partial}: exists and is not a folder; remove it or choose another output folder")
        if partial.exists():
            stale = _lock(partial)
            if stale is False:
                raise KneeSegError(
                    f"{partial}: another kneeseg run is writing this output folder; "
                    "wait for it to finish or choose another output folder"
                )
            # Unlocked: its run died. Remove it while holding its lock, so no other run takes it meanwhile.
            shutil.rmtree(partial, ignore_errors=True)
            if isinstance(stale, int):
                os.close(stale)
        try:
            partial.mkdir(parents=True)
        except FileExistsError:
            continue  # another run created it just now: look again (its lock decides)
        except OSError as error:
            raise write_error(partial, error) from None
        lock = _lock(partial)
        if lock is False:
            raise KneeSegError(f"{partial}: another kneeseg run is writing this output folder; choose another")
        if isinstance(lock, int) and (not partial.is_dir() or os.stat(partial).st_ino != os.fstat(lock).st_ino):
            # Another run took our new folder for a stale one and replaced it before we locked it.
            os.close(lock)
            raise KneeSegError(f"{partial}: another kneeseg run is writing this output folder; choose another")
        return lock if isinstance(lock, int) else None
    raise KneeSegError(f"{partial}: another kneeseg run is writing this output folder; choose another")


def _lock(folder: Path) -> int | bool:
    """An exclusive, non-blocking ``flock`` on ``folder``: its descriptor, False when another
    process holds it, True where folders cannot be locked (no fcntl, or a file system without locks).
    """
    if fcntl is None:
        return True
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return False
    except OSError:  # e.g. a network file system without flock: run unlocked, as before
        os.close(descriptor)
        return True
    return descriptor


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (delivered after the block) where the platform allows it."""
    held = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def check_output_location(out: str | Path, inputs: Iterable[str | Path], overwrite: bool = False) -> None:
    """Refuse an output folder that would lose data, before any work starts.

    Raises
    ------
    KneeSegError
        ``out`` is (or contains, or lies inside) one of ``inputs``: publishing or ``--overwrite``
        would delete or change the input; ``out`` exists and ``overwrite`` is False; ``out`` is a file.
    """
    out = Path(out)
    target = out.resolve()
    for given in inputs:
        source = input_location(given).resolve()
        if target == source or target in source.parents or source in target.parents:
            where = "is" if target == source else "contains" if target in source.parents else "lies inside"
            raise KneeSegError(
                f"{out}: output folder {where} the input {given}; writing there could delete or change "
                "the input, choose another output folder"
            )
    if out.exists() and not out.is_dir():
        raise KneeSegError(f"{out}: exists and is not a folder")
    if out.exists() and not overwrite:
        raise KneeSegError(f"{out}: output folder exists; choose another or pass --overwrite")


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
        ``OUT`` exists and ``overwrite`` is False (nothing is touched), OUT is a file, OUT is,
        contains or lies inside an input recorded in ``results`` (see :func:`check_output_location`),
        another run is writing OUT, or OUT cannot be written.
    """
    out = Path(out)
    check_output_location(out, [entry["path"] for entry in results.data["inputs"]], overwrite)
    started = time.perf_counter()
    with atomic_folder(out) as partial:
        yield partial
        results.data["timings_s"]["total"] = round(time.perf_counter() - started, 4)
        write_json(results.data, partial / RESULTS_FILE)
