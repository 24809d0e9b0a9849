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

import hashlib
import json
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from . import __version__
from .errors import CancelledError, KneeSegError

SCHEMA_VERSION = "1.0"
RESULTS_FILE = "results.json"
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


def write_json(data: Any, path: str | Path) -> None:
    """Write JSON atomically (temporary file beside it, then rename)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    temporary.replace(path)


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
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by a crashed run: never trusted
    partial.mkdir(parents=True)
    started = time.perf_counter()
    try:
        yield partial
        results.data["timings_s"]["total"] = round(time.perf_counter() - started, 4)
        write_json(results.data, partial / RESULTS_FILE)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        previous = out.with_name(out.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        out.rename(previous)
        partial.rename(out)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        partial.rename(out)
