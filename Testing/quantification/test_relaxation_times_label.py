"""results.json names the times of a relaxation map per sequence: MESE, DESS, spin-lock, GRE."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from KneeSegLogic.commands.main import main
from KneeSegLogic.io.outputs import Results
from KneeSegLogic.io.scans import write_volume
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.quantification.dess import DESS_TIMES, DessParameters, dess_signals
from KneeSegLogic.quantification.t2maps import KINDS, dess_t2_with_regions, t2_with_regions

torch.set_num_threads(1)

DESS = DessParameters(25.0, 7.48, 30.0)
SHAPE = (4, 5, 6)


def _dess_volume() -> tuple[Volume, np.ndarray]:
    truth = np.linspace(20.0, 60.0, int(np.prod(SHAPE))).reshape(SHAPE)
    signal = dess_signals(truth, DESS, 800.0).astype(np.float32)
    return Volume(signal, (1.0, 1.0, 2.0), echo_times_ms=(7.48, 42.52)), truth


def _mese_volume() -> Volume:
    te = np.arange(1, 9) * 10.0
    t2 = np.full(SHAPE, 40.0)
    signal = (1000.0 * np.exp(-te / t2[..., None])).astype(np.float32)
    return Volume(signal, (1.0, 1.0, 2.0), echo_times_ms=tuple(te))


def test_dess_map_says_dess_not_mese(tmp_path):
    volume, truth = _dess_volume()
    labels = Volume(np.ones(SHAPE, np.uint8), volume.spacing)
    out = tmp_path / "segment-dess"
    out.mkdir()
    # The DESS path of `kneeseg segment` (two-echo scan, sequence parameters given).
    maps = dess_t2_with_regions(
        volume, labels, out, Results("segment"), None, overrides={"repetition_time_ms": 25.0, "flip_angle_deg": 30.0}
    )
    assert maps is not None
    assert maps.section["times"] == DESS_TIMES and "MESE" not in maps.section["times"]
    assert maps.section["model"] == "dess" and maps.section["quantity"] == "T2"
    np.testing.assert_allclose(maps.maps["t2"].array, truth, rtol=1e-4)


@pytest.mark.parametrize("command", ["t2", "relax"])
def test_dess_command_results_label_the_dess_echoes(tmp_path, command, capsys):
    volume, truth = _dess_volume()
    scan = write_volume(volume, tmp_path / "dess.nrrd")
    out = tmp_path / "out"
    args = [
        command,
        str(scan),
        "-o",
        str(out),
        "--model",
        "dess",
        "--tr",
        "25",
        "--flip-angle",
        "30",
        "--device",
        "cpu",
    ]
    if command == "relax":
        args += ["--kind", "t2"]
    assert main(args) == 0, capsys.readouterr().err
    section = json.loads((out / "results.json").read_text())["t2"]
    assert section["times"] == DESS_TIMES
    assert section["dess_parameters"]["repetition_time_ms"] == 25.0
    assert section["echo_times_ms"] == pytest.approx([7.48, 42.52])


def test_other_sequences_keep_their_labels(tmp_path):
    volume = _mese_volume()
    for model in ("ncexp", "epg"):
        out = tmp_path / model
        out.mkdir()
        maps = t2_with_regions(volume, None, out, Results("t2"), model=model, sigma=1.0)
        assert maps.section["times"] == "echo times (MESE)", model
        assert float(np.median(maps.maps["t2"].array)) == pytest.approx(40.0, rel=0.05), model
    assert KINDS["t1rho"].times_for("mono") == "spin-lock times"
    assert KINDS["t2star"].times_for("ncexp") == "echo times (multi-echo GRE)"
    assert KINDS["t2"].times_for("dess") == DESS_TIMES
