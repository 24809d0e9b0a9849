"""``kneeseg batch``: cohort runs that record failures, resume, read CSVs and run on Dask."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from KneeSegLogic.commands.main import main
from KneeSegLogic.io.scans import read_volume, write_volume
from KneeSegLogic.io.segfile import read_segmentation
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.segmentation.networks import build_network
from KneeSegLogic.segmentation.package import save_package
from KneeSegLogic.tissues import TISSUES

SAMPLE = Path(__file__).resolve().parents[2] / "Resources" / "SampleData" / "mese_t2_knee.nrrd"
GOOD_CASES = ("knee0", "knee1", "knee2")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """An untrained one-member 2.5D package: fast, and deterministic for given weights."""
    torch.manual_seed(0)
    member = {
        "name": "only",
        "weight": 1.0,
        "architecture": {
            "name": "monai.UNet",
            "args": {
                "spatial_dims": 2,
                "in_channels": 3,
                "out_channels": 1 + len(TISSUES),
                "channels": [4, 8],
                "strides": [2],
            },
        },
        "input": {
            "kind": "2.5d",
            "plane": "sagittal",
            "context_slices": 1,
            "spacing_mm": [2.5, 2.5],
            "slice_spacing_mm": 4.0,
            "normalisation": {"name": "percentile", "low": 1, "high": 99},
        },
    }
    spec = {
        "id": "tiny-batch",
        "version": "0.0.1",
        "description": "untrained, for tests",
        "license": "Apache-2.0",
        "labels": {str(t.label): t.key for t in TISSUES},
        "members": [member],
        "postprocessing": [],
    }
    state = build_network(member["architecture"]["name"], member["architecture"]["args"]).state_dict()
    folder = tmp_path_factory.mktemp("models") / "tiny-batch"
    save_package(folder, spec, [state])
    return folder


def _crop(scan: Volume, k0: int, j0: int, i0: int, size: tuple[int, int, int], step: int = 1) -> Volume:
    """A sub-volume of ``scan`` (every ``step``-th voxel in-plane) keeping its place in LPS space.

    Echo times are not carried over, as a NIfTI file would lose them.
    """
    array = scan.array[k0 : k0 + size[0], j0 : j0 + size[1] * step : step, i0 : i0 + size[2] * step : step]
    origin = np.asarray(scan.origin) + scan.direction @ (np.asarray(scan.spacing) * (i0, j0, k0))
    spacing = (scan.spacing[0] * step, scan.spacing[1] * step, scan.spacing[2])
    return Volume(np.ascontiguousarray(array), spacing, tuple(origin), scan.direction)


def _write_cases(folder: Path) -> Path:
    """Three tiny single-echo scans (echo 2 crops) and one empty file posing as a scan."""
    echo2 = read_volume(SAMPLE).echo(1)
    folder.mkdir()
    for name, (k0, j0) in zip(GOOD_CASES, [(4, 20), (8, 40), (6, 30)]):
        write_volume(_crop(echo2, k0, j0, 30, (12, 48, 48)), folder / f"{name}.nrrd")
    (folder / "broken.nrrd").write_bytes(b"")
    (folder / "notes.txt").write_text("not a scan: ignored")
    return folder


@pytest.fixture
def no_dask(monkeypatch):
    """Make ``from dask import distributed`` fail, as where the batch extra is not installed."""
    monkeypatch.setitem(sys.modules, "dask", None)


def _summary(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.csv", newline="") as stream:
        return {row["case_id"]: row for row in csv.DictReader(stream)}


def _progress_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _check_measurements(row: dict[str, str], case_folder: Path, scan: Path) -> None:
    """Summary values equal those in results.json, which equal voxel counts of the segmentation."""
    results = json.loads((case_folder / "results.json").read_text())
    labels, _ = read_segmentation(case_folder / "segmentation.seg.nrrd")
    assert labels.same_grid(read_volume(scan), atol=1e-5)
    voxel_mm3 = float(np.prod(labels.spacing))
    assert results["volumes_mm3"]
    for tissue in TISSUES:
        cell = row[f"{tissue.key}_volume_mm3"]
        count = np.count_nonzero(labels.array == tissue.label)
        if tissue.key in results["volumes_mm3"]:
            assert float(cell) == results["volumes_mm3"][tissue.key]
            assert float(cell) == pytest.approx(count * voxel_mm3, rel=1e-6)
            assert float(row[f"{tissue.key}_uncertainty"]) == results["uncertainty"]["per_structure"][tissue.key]
        else:
            assert cell == "" and count == 0


def test_folder_batch_records_the_failure_and_resumes(tmp_path, package, no_dask, capsys):
    cases = _write_cases(tmp_path / "cases")
    out = tmp_path / "out"
    command = ["batch", str(cases), "-o", str(out), "--model", str(package), "--no-surfaces", "--device", "cpu"]
    assert main(command) == 1
    captured = capsys.readouterr()
    assert "1 of 4 cases failed" in captured.err and len(captured.err.strip().splitlines()) == 1
    lines = _progress_lines(captured.out)
    assert "Dask is not installed" in lines[0]["message"]
    per_case = [line for line in lines if line["stage"] == "batch" and line["message"].startswith("case ")]
    assert [line["progress"] for line in per_case] == [0.25, 0.5, 0.75, 1.0]

    rows = _summary(out)
    assert list(rows) == ["broken", *GOOD_CASES]  # folder order, notes.txt ignored
    assert rows["broken"]["status"] == "failed" and "broken.nrrd" in rows["broken"]["error"]
    assert rows["broken"]["femur_volume_mm3"] == "" and not (out / "broken").exists()
    for name in GOOD_CASES:
        assert rows[name]["status"] == "ok" and rows[name]["error"] == "" and float(rows[name]["seconds"]) > 0
        _check_measurements(rows[name], out / name, cases / f"{name}.nrrd")
        assert rows[name]["femoral_cartilage_t2_mean_ms"] == ""  # single echo: no T2
    assert (out / "logs" / "knee0.jsonl").read_text().count('"stage": "inference"') >= 1
    record = json.loads((out / "batch.json").read_text())
    assert record["counts"] == {"ok": 3, "failed": 1, "skipped": 0}
    assert record["options"]["model"] == str(package.resolve())

    # The second run skips the finished cases (untouched) and retries the failed one, now readable.
    stamps = {name: (out / name / "results.json").stat().st_mtime_ns for name in GOOD_CASES}
    shutil.copyfile(cases / "knee1.nrrd", cases / "broken.nrrd")
    assert main(command) == 0
    rows_again = _summary(out)
    assert rows_again["broken"]["status"] == "ok"
    assert rows_again["broken"]["femur_volume_mm3"] == rows["knee1"]["femur_volume_mm3"]  # same scan, same answer
    for name in GOOD_CASES:
        assert rows_again[name]["status"] == "skipped" and rows_again[name]["seconds"] == ""
        assert (out / name / "results.json").stat().st_mtime_ns == stamps[name]
        assert rows_again[name]["tibia_volume_mm3"] == rows[name]["tibia_volume_mm3"]
    assert "3 skipped" in _progress_lines(capsys.readouterr().out)[-1]["message"]

    # --overwrite redoes every case.
    assert main([*command, "--overwrite"]) == 0
    assert {row["status"] for row in _summary(out).values()} == {"ok"}
    assert all((out / name / "results.json").stat().st_mtime_ns != stamps[name] for name in GOOD_CASES)


def test_csv_cases_with_ids_echo_times_and_a_missing_scan(tmp_path, package, no_dask, capsys):
    scan = read_volume(SAMPLE)
    # Downsampled in-plane, not cropped: the T2 fit estimates noise from the air around the knee.
    multi_echo = _crop(scan, 6, 0, 0, (12, 64, 64), step=2)
    data = tmp_path / "data"
    data.mkdir()
    write_volume(multi_echo, data / "mese.nii.gz")  # NIfTI keeps no echo times: the CSV gives them
    write_volume(_crop(scan.echo(1), 4, 20, 30, (12, 48, 48)), data / "single.nrrd")
    table = tmp_path / "cases.csv"
    echo_times = ";".join(f"{t:g}" for t in scan.echo_times_ms)
    table.write_text(
        "case_id,path,echo_times\n"
        f"subject-07_left,data/single.nrrd,\n"
        f"subject-07_mese,{data / 'mese.nii.gz'},{echo_times}\n"
        "subject-08,data/absent.nrrd,\n"
    )
    out = tmp_path / "out"
    assert main(["batch", str(table), "-o", str(out), "--model", str(package), "--no-surfaces"]) == 1
    rows = _summary(out)
    assert list(rows) == ["subject-07_left", "subject-07_mese", "subject-08"]
    assert rows["subject-08"]["status"] == "failed" and "no such file" in rows["subject-08"]["error"]
    _check_measurements(rows["subject-07_left"], out / "subject-07_left", data / "single.nrrd")
    mese = json.loads((out / "subject-07_mese" / "results.json").read_text())
    assert mese["inputs"][0]["path"] == str((data / "mese.nii.gz").resolve())
    assert mese["t2"]["echo_times_ms"] == pytest.approx(list(scan.echo_times_ms), abs=1e-3)
    femoral_t2 = mese["t2"]["per_structure"]["femoral_cartilage"]["t2_mean_ms"]
    assert float(rows["subject-07_mese"]["femoral_cartilage_t2_mean_ms"]) == pytest.approx(femoral_t2, abs=1e-4)
    assert 0 < femoral_t2 < 100  # inside the fit's bounds
    assert rows["subject-07_left"]["femoral_cartilage_t2_mean_ms"] == ""


def test_bad_case_lists_are_refused_before_anything_is_written(tmp_path, package, no_dask, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no scans here")
    wrong_columns = tmp_path / "wrong.csv"
    wrong_columns.write_text("id,file\na,b.nrrd\n")
    header_only = tmp_path / "header.csv"
    header_only.write_text("case_id,path\n")
    repeated = tmp_path / "repeated.csv"
    repeated.write_text("case_id,path\na,x.nrrd\na,y.nrrd\n")
    escaping = tmp_path / "escaping.csv"
    escaping.write_text("case_id,path\n../elsewhere,x.nrrd\n")
    expected = {
        tmp_path / "absent": "no such file",
        empty: "no cases found",
        wrong_columns: "lacks column(s) case_id, path",
        header_only: "no cases found",
        repeated: "appears twice",
        escaping: "not a plain folder name",
    }
    out = tmp_path / "out"
    for source, problem in expected.items():
        assert main(["batch", str(source), "-o", str(out), "--model", str(package)]) == 1
        error = capsys.readouterr().err.strip()
        assert problem in error and str(source) in error and len(error.splitlines()) == 1
        assert not out.exists()
    cases = _write_cases(tmp_path / "cases")
    assert main(["batch", str(cases), "-o", str(out), "--model", str(package), "--scheduler", "tcp://127.0.0.1:1"]) == 1
    assert "KneeSegLogic[batch]" in capsys.readouterr().err and not out.exists()


def test_dask_local_cluster_then_an_existing_scheduler(tmp_path, package, capsys):
    distributed = pytest.importorskip("dask.distributed")
    cases = _write_cases(tmp_path / "cases")
    (cases / "knee2.nrrd").unlink()
    out = tmp_path / "out"
    command = ["batch", str(cases), "-o", str(out), "--model", str(package), "--no-surfaces", "--device", "cpu"]
    assert main(command) == 1  # LocalCluster, one worker process
    lines = _progress_lines(capsys.readouterr().out)
    assert "LocalCluster" in lines[0]["message"]
    rows = _summary(out)
    assert {k: r["status"] for k, r in rows.items()} == {"broken": "failed", "knee0": "ok", "knee1": "ok"}
    for name in ("knee0", "knee1"):
        _check_measurements(rows[name], out / name, cases / f"{name}.nrrd")

    # Worker processes give what this process gives.
    reference = tmp_path / "reference"
    here = read_segmentation(_segment_here(cases / "knee0.nrrd", reference, package) / "segmentation.seg.nrrd")[0]
    there = read_segmentation(out / "knee0" / "segmentation.seg.nrrd")[0]
    assert np.mean(here.array == there.array) > 0.999

    # An existing scheduler: only the removed and the failed cases run there.
    shutil.rmtree(out / "knee1")
    shutil.copyfile(cases / "knee0.nrrd", cases / "broken.nrrd")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        assert main([*command, "--scheduler", cluster.scheduler_address]) == 0
    rows = _summary(out)
    assert {k: r["status"] for k, r in rows.items()} == {"broken": "ok", "knee0": "skipped", "knee1": "ok"}
    assert rows["broken"]["femur_volume_mm3"] == rows["knee0"]["femur_volume_mm3"]
    assert cluster.scheduler_address in json.loads((out / "batch.json").read_text())["executor"]


def _segment_here(scan: Path, out: Path, package: Path) -> Path:
    assert (
        main(["segment", str(scan), "-o", str(out), "--model", str(package), "--no-surfaces", "--device", "cpu"]) == 0
    )
    return out


@pytest.mark.parametrize("encoding", ["utf-16", "cp1252", "utf-8-sig"])
def test_csv_as_spreadsheets_save_it(tmp_path, encoding):
    """UTF-16 ("Unicode text") and Windows-1252 CSVs, with ';' between cells as Excel writes them."""
    from KneeSegLogic.pipeline.batch import read_cases

    table = tmp_path / "cases.csv"
    table.write_bytes("case_id;path;echo_times\ngenou_é;scan é.nrrd;10,5\n".encode(encoding))
    (case,) = read_cases(table)
    assert case.case_id == "genou_é" and case.path == str((tmp_path / "scan é.nrrd").resolve())
    assert case.echo_times_ms == (10.0, 5.0)
