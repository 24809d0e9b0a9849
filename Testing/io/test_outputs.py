"""The output-folder contract: atomic publish, overwrite rules, results.json, progress lines."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest

from KneeSegLogic.errors import CancelledError, KneeSegError
from KneeSegLogic.io.outputs import (
    RESULTS_FILE,
    SCHEMA_VERSION,
    Progress,
    Results,
    output_folder,
    sha256_of,
    write_json,
)


def test_complete_run_publishes_folder_with_results(tmp_path):
    scan = tmp_path / "scan.nrrd"
    scan.write_bytes(b"voxels" * 100)
    results = Results("segment")
    results.add_input("image", scan)
    out = tmp_path / "OUT"
    with output_folder(out, results) as folder:
        assert folder == tmp_path / "OUT.partial" and not out.exists()
        with results.stage("inference"):
            (folder / "segmentation.seg.nrrd").write_bytes(b"x")
        results.warn("echo 1 skipped")
    assert not (tmp_path / "OUT.partial").exists()
    assert sorted(p.name for p in out.iterdir()) == [RESULTS_FILE, "segmentation.seg.nrrd"]

    data = json.loads((out / RESULTS_FILE).read_text())
    assert data["schema_version"] == SCHEMA_VERSION and data["command"] == "segment"
    assert data["inputs"] == [
        {"role": "image", "path": str(scan.resolve()), "sha256": hashlib.sha256(b"voxels" * 100).hexdigest()}
    ]
    assert data["packages"]["numpy"] == np.__version__ and data["packages"]["SimpleITK"]
    assert set(data["timings_s"]) == {"inference", "total"}
    assert 0 <= data["timings_s"]["inference"] <= data["timings_s"]["total"]
    assert data["warnings"] == ["echo 1 skipped"]
    assert "device" in data


def test_existing_output_refused_without_overwrite(tmp_path):
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "edited.seg.nrrd").write_text("a user's corrections")
    with (
        pytest.raises(KneeSegError, match="OUT: output folder exists; choose another or pass --overwrite"),
        output_folder(out, Results("t2")),
    ):
        pytest.fail("must not start")
    assert (out / "edited.seg.nrrd").read_text() == "a user's corrections"
    assert not (tmp_path / "OUT.partial").exists()

    with output_folder(out, Results("t2"), overwrite=True) as folder:
        (folder / "t2.nrrd").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [RESULTS_FILE, "t2.nrrd"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT"]  # no .partial, no .previous


def test_error_removes_partial_and_keeps_previous_output(tmp_path):
    out = tmp_path / "OUT"
    with pytest.raises(RuntimeError, match="boom"), output_folder(out, Results("segment")) as folder:
        (folder / "half.nrrd").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(CancelledError), output_folder(out, Results("segment"), overwrite=True) as folder:
        (folder / "half.nrrd").write_text("half")
        raise CancelledError("cancelled during inference")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_stale_partial_from_a_crash_is_not_trusted(tmp_path):
    stale = tmp_path / "OUT.partial"
    stale.mkdir()
    (stale / "from_crash.nrrd").write_text("?")
    with output_folder(tmp_path / "OUT", Results("t2")) as folder:
        assert list(folder.iterdir()) == []
    assert [p.name for p in (tmp_path / "OUT").iterdir()] == [RESULTS_FILE]


def test_progress_lines_are_json_and_cancel_stops():
    stream = io.StringIO()
    progress = Progress(stream)
    progress("inference", 0.4213, "slice 67/160")
    progress("t2", 1.7)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines == [
        {"stage": "inference", "progress": 0.4213, "message": "slice 67/160"},
        {"stage": "t2", "progress": 1.0, "message": ""},
    ]
    calls = iter([False, True])
    cancellable = Progress(io.StringIO(), cancel=lambda: next(calls))
    cancellable("inference", 0.1)
    with pytest.raises(CancelledError, match="cancelled during inference"):
        cancellable("inference", 0.2)


def test_stage_reports_start_and_end():
    stream = io.StringIO()
    results = Results("t2")
    with results.stage("fit", Progress(stream)):
        pass
    assert [json.loads(line)["progress"] for line in stream.getvalue().splitlines()] == [0.0, 1.0]
    assert "fit" in results["timings_s"]


def test_sha256_of_folder_sees_names_and_contents(tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"1")
    (folder / "b.dcm").write_bytes(b"2")
    first = sha256_of(folder)
    assert first == sha256_of(folder) and len(first) == 64
    (folder / "b.dcm").write_bytes(b"3")
    changed = sha256_of(folder)
    (folder / "b.dcm").rename(folder / "c.dcm")
    assert len({first, changed, sha256_of(folder)}) == 3


def test_write_json_is_atomic_and_takes_numpy(tmp_path):
    path = tmp_path / "r.json"
    write_json({"volume_mm3": np.float32(1.5), "sizes": np.arange(3), "path": tmp_path}, path)
    assert json.loads(path.read_text()) == {"volume_mm3": 1.5, "sizes": [0, 1, 2], "path": str(tmp_path)}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_live_partial_is_refused_and_a_stale_one_cleaned(tmp_path):
    """Two runs to one OUT: the second is refused while the first holds OUT.partial."""
    import fcntl
    import os

    out = tmp_path / "OUT"
    with output_folder(out, Results("t2")) as folder:
        (folder / "first.txt").write_text("first run")
        with pytest.raises(KneeSegError, match="another kneeseg run is writing"), output_folder(out, Results("t2")):
            pytest.fail("must not start")
        assert (folder / "first.txt").read_text() == "first run"
    assert sorted(p.name for p in out.iterdir()) == ["first.txt", RESULTS_FILE]

    # A partial folder whose run died (nobody holds its lock) is removed by the next run.
    stale = tmp_path / "NEW.partial"
    stale.mkdir()
    (stale / "half.nrrd").write_text("half")
    with output_folder(tmp_path / "NEW", Results("t2")) as folder:
        assert list(folder.iterdir()) == []
    assert [p.name for p in (tmp_path / "NEW").iterdir()] == [RESULTS_FILE]

    # A partial folder locked by another process is refused.
    held = tmp_path / "HELD.partial"
    held.mkdir()
    descriptor = os.open(held, os.O_RDONLY)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    try:
        with (
            pytest.raises(KneeSegError, match="HELD.partial: another kneeseg run"),
            output_folder(tmp_path / "HELD", Results("t2")),
        ):
            pytest.fail("must not start")
    finally:
        os.close(descriptor)
    assert held.is_dir()


def test_output_overlapping_an_input_is_refused_even_with_overwrite(tmp_path):
    scan = tmp_path / "case" / "scan.nrrd"
    scan.parent.mkdir()
    scan.write_bytes(b"voxels")
    for out, where in [(tmp_path / "case", "contains"), (tmp_path / "case" / "scan.nrrd", "is")]:
        results = Results("segment")
        results.add_input("scan", scan)
        with (
            pytest.raises(KneeSegError, match=f"output folder {where} the input"),
            output_folder(out, results, overwrite=True),
        ):
            pytest.fail("must not start")
    assert scan.read_bytes() == b"voxels"


def test_nan_never_reaches_json(tmp_path):
    write_json({"a": float("nan"), "b": [1.0, float("inf")], "c": np.float32("nan")}, tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": None, "b": [1.0, None], "c": None}
