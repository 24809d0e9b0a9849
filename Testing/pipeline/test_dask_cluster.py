"""``kneeseg batch --scheduler`` on a real Dask cluster: a ``dask scheduler`` and two ``dask worker``
processes on 127.0.0.1, started as a user would start them.

Three small cases on a tiny model: one good, one unreadable (its failure is recorded), and a copy
of the good one whose worker is killed with SIGKILL while it runs the case (Dask reschedules it on
a live worker, where it succeeds and gives the good case's segmentation). A rerun resumes:
finished cases are skipped, the failed one is retried. summary.csv has a row per case; the
workers shut down without "still alive ... killing" warnings.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_batch import _summary
from test_corpus import _scan, _tiny_package

from KneeSegLogic.io.scans import write_volume
from KneeSegLogic.io.segfile import read_segmentation

distributed = pytest.importorskip("dask.distributed")

DASK = [sys.executable, "-m", "distributed.cli"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(arguments: list[str], log: Path) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    stream = open(log, "w")  # noqa: SIM115  (closed with the process)
    return subprocess.Popen(arguments, stdout=stream, stderr=subprocess.STDOUT, env=environment)


@pytest.fixture
def cluster(tmp_path):
    """Scheduler and two single-threaded workers (each under a nanny, which restarts a killed one)."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    scheduler = _start(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-address",
            ":0",
        ],
        logs / "scheduler.log",
    )
    workers = [
        _start(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_worker",
                address,
                "--nthreads",
                "1",
                "--nworkers",
                "1",
                "--name",
                f"w{n}",
                "--no-dashboard",
                "--death-timeout",
                "30",
            ],
            logs / f"worker{n}.log",
        )
        for n in range(2)
    ]
    with distributed.Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=60)

    def stop() -> None:  # workers first (together), then the scheduler, as an operator would
        for group in (workers, [scheduler]):
            for process in group:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in group:
                process.wait(timeout=30)

    yield address, logs, stop
    for process in [*workers, scheduler]:
        if process.poll() is None:
            process.kill()
            process.wait()


def _kill_worker_running(address: str, case_id: str, started: Path, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the worker process running ``case_id`` (found by the task key batch gives it) once
    the case has started (``run_case`` opens its log file ``started`` first)."""
    with distributed.Client(address, timeout=30) as client:
        while not stop.is_set() and not killed:
            for worker, keys in client.processing().items():
                if started.exists() and any(f"kneeseg-case-{case_id}-" in str(key) for key in keys):
                    pids = client.run(os.getpid, workers=[worker])
                    os.kill(pids[worker], signal.SIGKILL)
                    killed.append(pids[worker])
                    return
            time.sleep(0.05)


@pytest.fixture
def cases(tmp_path) -> Path:
    folder = tmp_path / "cases"
    folder.mkdir()
    write_volume(_scan(1, shape=(12, 32, 32)), folder / "good.nrrd")
    shutil.copyfile(folder / "good.nrrd", folder / "victim.nrrd")
    (folder / "broken.nrrd").write_bytes(b"")
    return folder


def test_batch_on_a_real_cluster_survives_a_killed_worker_and_resumes(tmp_path, cases, cluster):
    address, logs, stop_cluster = cluster
    package = _tiny_package(tmp_path / "tiny")
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "KneeSegLogic.commands.main",
        "batch",
        str(cases),
        "-o",
        str(out),
        "--scheduler",
        address,
        "--model",
        str(package),
        "--no-surfaces",
        "--device",
        "cpu",
    ]

    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(
        target=_kill_worker_running, args=(address, "victim", out / "logs" / "victim.jsonl", killed, stop)
    )
    killer.start()
    run = subprocess.run(
        command, capture_output=True, text=True, timeout=150, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    stop.set()
    killer.join()
    assert killed, "the victim case was never seen running"
    assert run.returncode == 1, run.stderr
    assert run.stderr.strip().splitlines()[-1].endswith("rerun the same command to retry them")
    assert "1 of 3 cases failed" in run.stderr

    rows = _summary(out)
    assert list(rows) == ["broken", "good", "victim"]
    assert rows["broken"]["status"] == "failed" and "broken.nrrd" in rows["broken"]["error"]
    for name in ("good", "victim"):
        assert rows[name]["status"] == "ok", rows[name]
        assert (out / name / "results.json").is_file() and not (out / f"{name}.partial").exists()
    # The victim was retried after its worker died, and gives what the same scan gives elsewhere.
    victim = read_segmentation(out / "victim" / "segmentation.seg.nrrd")[0].array
    np.testing.assert_array_equal(victim, read_segmentation(out / "good" / "segmentation.seg.nrrd")[0].array)
    same = [c for c in rows["good"] if c not in ("case_id", "seconds")]
    assert [rows["victim"][c] for c in same] == [rows["good"][c] for c in same]

    # Rerun: finished cases are skipped (untouched), the failed one is retried (and fails again).
    stamps = {name: (out / name / "results.json").stat().st_mtime_ns for name in ("good", "victim")}
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1, again.stderr
    assert {name: row["status"] for name, row in _summary(out).items()} == {
        "broken": "failed",
        "good": "skipped",
        "victim": "skipped",
    }
    assert {name: (out / name / "results.json").stat().st_mtime_ns for name in stamps} == stamps

    stop_cluster()
    for log in logs.glob("worker*.log"):
        assert "still alive after" not in log.read_text(), log.read_text()[-2000:]
