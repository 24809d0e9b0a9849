"""Signals to a running ``kneeseg``, as schedulers and process managers send them (issue 16).

Each test starts ``kneeseg`` in a fresh interpreter on a tiny model and a small scan, waits for
its first progress line (the run is under way: the scan was read) and then signals it. A
cancelled run exits 130 with ONE line on stderr (no traceback from whatever finaliser the signal
landed in) and leaves neither ``OUT`` nor ``OUT.partial``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_corpus import _scan, _tiny_package

from KneeSegLogic.io.scans import write_volume

ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}


def _start(argv: list[str], home: Path) -> subprocess.Popen:
    environment = {**ENVIRONMENT, "KNEESEG_HOME": str(home), "KNEESEG_MODELS_PATH": ""}
    return subprocess.Popen(
        [sys.executable, "-m", "KneeSegLogic.commands.main", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )


def _signal_at_first_line(process: subprocess.Popen, signals: list[int], gap_s: float = 0.05) -> None:
    """Wait for the first progress line on stdout, then send ``signals`` ``gap_s`` apart."""
    assert process.stdout is not None
    first = process.stdout.readline()
    assert first.startswith("{"), first + (process.stderr.read() if process.stderr else "")
    for number in signals:
        process.send_signal(number)
        time.sleep(gap_s)


def _finish(process: subprocess.Popen, timeout_s: float = 60.0) -> tuple[int, list[str]]:
    _, err = process.communicate(timeout=timeout_s)
    return process.returncode, [line for line in err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model package and a small single-echo scan."""
    folder = tmp_path_factory.mktemp("signals")
    package = _tiny_package(folder / "pkg")
    scan = write_volume(_scan(1, shape=(24, 64, 64)), folder / "knee.nrrd")
    return package, scan


@pytest.mark.parametrize("signals", [[signal.SIGTERM, signal.SIGTERM], [signal.SIGINT, signal.SIGTERM]])
def test_a_second_signal_during_segment_leaves_nothing(tmp_path, tiny, signals):
    package, scan = tiny
    out = tmp_path / "OUT"
    process = _start(["segment", str(scan), "-o", str(out), "--model", str(package), "--device", "cpu"], tmp_path)
    _signal_at_first_line(process, signals)
    code, lines = _finish(process)
    assert code == 130, lines
    assert len(lines) == 1, lines
    assert lines[0] in ("kneeseg segment: terminated (SIGTERM)", "kneeseg segment: cancelled"), lines
    assert not out.exists() and not (tmp_path / "OUT.partial").exists()
