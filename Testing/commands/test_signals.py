"""Signals to a running ``kneeseg``, as schedulers and process managers send them (issue 16).

Each test starts ``kneeseg`` in a fresh interpreter on a tiny model and a small scan, waits for
its first progress line (the run is under way: the scan was read) and then signals it. A
cancelled run exits 130 with ONE line on stderr (no traceback from whatever finaliser the signal
landed in) and leaves neither ``OUT`` nor ``OUT.partial``.

``batch`` is signalled once its first case is inside inference (seen in the case's log): the batch
stops with 130 and one line, whether the case runs in the batch's own process (no Dask) or in a
``LocalCluster`` worker process (which the batch stops through the case's stop file); the case
is not recorded as failed and leaves no ``OUT/<case>.partial``.
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

from KneeSegLogic.errors import CancelledError
from KneeSegLogic.io.scans import write_volume

ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}


# ``kneeseg`` as if the batch extra were not installed (``from dask import distributed`` fails).
WITHOUT_DASK = (
    "import sys; sys.modules['dask'] = None; from KneeSegLogic.commands.main import main; sys.exit(main(sys.argv[1:]))"
)


def _start(argv: list[str], home: Path, dask: bool = True) -> subprocess.Popen:
    environment = {**ENVIRONMENT, "KNEESEG_HOME": str(home), "KNEESEG_MODELS_PATH": ""}
    launcher = ["-m", "KneeSegLogic.commands.main"] if dask else ["-c", WITHOUT_DASK]
    return subprocess.Popen(
        [sys.executable, *launcher, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        # As from a terminal: a test run started in the background (``&``, nohup) passes SIGINT on
        # ignored, and Python then keeps ignoring it, as kneeseg must (it never re-enables it).
        preexec_fn=_interruptible,
    )


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


@pytest.fixture(scope="module")
def cases(tiny, tmp_path_factory) -> Path:
    """Two cases large enough that the first is still running when it is signalled."""
    folder = tmp_path_factory.mktemp("batch-cases")
    for name in ("k0", "k1"):
        write_volume(_scan(1, shape=(40, 128, 128)), folder / f"{name}.nrrd")
    return folder


def _wait_for(path: Path, text: str, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.is_file() and text in path.read_text()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never showed {text!r}"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "executor, number",
    [
        pytest.param("in-process", signal.SIGTERM, id="in-process-SIGTERM"),
        pytest.param("in-process", signal.SIGINT, id="in-process-SIGINT"),
        pytest.param("LocalCluster", signal.SIGTERM, id="LocalCluster-SIGTERM"),
    ],
)
def test_a_signal_stops_batch_without_failing_the_running_case(tmp_path, tiny, cases, executor, number):
    if executor == "LocalCluster":
        pytest.importorskip("dask.distributed")
    package, _ = tiny
    out = tmp_path / "OUT"
    argv = ["batch", str(cases), "-o", str(out), "--model", str(package), "--device", "cpu"]
    process = _start(argv, tmp_path, dask=executor == "LocalCluster")
    _wait_for(out / "logs" / "k0.jsonl", '"stage": "inference"', process)
    process.send_signal(number)
    code, lines = _finish(process)
    assert code == 130, lines
    assert lines == ["kneeseg batch: terminated (SIGTERM)" if number == signal.SIGTERM else "kneeseg batch: cancelled"]
    assert not (out / "k0.partial").exists() and not (out / "k1.partial").exists()
    assert not (out / "summary.csv").exists()  # nothing recorded: no case failed, the batch stopped
    assert "failed" not in (out / "logs" / "k0.jsonl").read_text()
    assert not list(out.glob(".kneeseg-stop-*"))
    assert not (out / "k1").exists()  # the batch stopped: the second case never ran


def _cancel(*args, **kwargs):
    raise CancelledError("terminated (SIGTERM)")


def test_a_cancellation_inside_a_wrapped_library_call_stays_a_cancellation(tiny, tmp_path, monkeypatch):
    # SIGTERM's handler raises CancelledError wherever Python is: inside safetensors, nibabel or
    # pydicom, whose many error kinds KneeSeg turns into "bad input" lines. A stop must stay a stop
    # (exit 130), never become a failed case or a corrupt-file error.
    import nibabel
    import pydicom
    import safetensors.torch

    from KneeSegLogic.io.headers import check_image_header
    from KneeSegLogic.io.scans import read_volume
    from KneeSegLogic.quantification import dess
    from KneeSegLogic.segmentation import registry
    from KneeSegLogic.segmentation.package import load_package

    package, scan = tiny
    monkeypatch.setattr(safetensors.torch, "load", _cancel)
    with pytest.raises(CancelledError):
        load_package(package).load_member(0)
    # Package discovery skips a broken package with a warning; a stop while it hashes weights is no such thing.
    monkeypatch.setattr(registry, "load_package", _cancel)
    with pytest.raises(CancelledError):
        registry.find_packages([], verify=True)

    nifti = write_volume(read_volume(scan), tmp_path / "knee.nii.gz")
    monkeypatch.setattr(nibabel.Nifti1Header, "from_fileobj", classmethod(_cancel))
    with pytest.raises(CancelledError):
        check_image_header(nifti)

    folder = tmp_path / "dicom"
    folder.mkdir()
    (folder / "IM0001.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    monkeypatch.setattr(pydicom, "dcmread", _cancel)
    with pytest.raises(CancelledError):
        read_volume(folder)
    with pytest.raises(CancelledError):
        dess._first_dicom(folder)


def test_a_file_left_open_by_the_signal_warns_nothing(tmp_path):
    """A signal between ``open()`` and its ``with`` leaves the file to be closed by the unwinding:
    its ResourceWarning must not add a line to the one that says the run was cancelled."""
    import gc
    import warnings

    from KneeSegLogic.commands import main as cli

    path = tmp_path / "scan.bin"
    path.write_bytes(b"x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        cli._signalled.clear()
        with pytest.raises(CancelledError):
            cli._terminate(signal.SIGTERM, None)
        stream = open(path, "rb")  # noqa: SIM115 - left unclosed on purpose, as the signal leaves it
        del stream
        gc.collect()
    cli._signalled.clear()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
