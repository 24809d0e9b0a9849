"""The ``kneeseg`` command line: help, ``info``, shared input validation, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import SAMPLE_DATA, rotation, write_dicom_series

from KneeSegLogic.commands import main as cli
from KneeSegLogic.io.scans import read_volume, write_volume
from KneeSegLogic.io.volume import Volume

RESERVED = ("segment", "t2", "t2-change", "surfaces", "evaluate", "train", "demo", "batch")
SAMPLE_SCAN = SAMPLE_DATA / "mese_t2_knee.nrrd"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("info", *RESERVED):
        assert command in out
    assert (
        run(
            capsys,
        )[0]
        == 2
    )  # no command: help, usage exit code


@pytest.mark.parametrize("command", ["info", *RESERVED])
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: kneeseg {command}" in capsys.readouterr().out


def test_info_json_has_exactly_the_contract_keys(capsys):
    code, out, err = run(capsys, "info", SAMPLE_SCAN, "--json")
    assert code == 0 and err == ""
    info = json.loads(out)
    assert set(info) == {"size", "spacing_mm", "origin_mm", "direction", "echo_times_ms", "dtype"}
    volume = read_volume(SAMPLE_SCAN)
    assert info["size"] == [128, 128, 24]
    assert info["spacing_mm"] == list(volume.spacing) and info["origin_mm"] == list(volume.origin)
    assert info["direction"] == volume.direction.ravel().tolist()  # row-major: row r is LPS axis r
    assert info["echo_times_ms"] == pytest.approx([6.312, 12.624, 18.936, 25.248, 31.56, 37.872, 44.184, 50.496])
    assert info["dtype"] == "int16"


def test_info_json_of_a_3d_label_map_has_null_echo_times(capsys):
    info = json.loads(run(capsys, "info", SAMPLE_DATA / "knee_labels.nrrd", "--json")[1])
    assert info["echo_times_ms"] is None and info["size"] == [384, 384, 160] and info["dtype"] == "uint8"


def test_info_text(capsys):
    code, out, _ = run(capsys, "info", SAMPLE_SCAN)
    assert code == 0
    assert "size (i, j, k)   [128, 128, 24]" in out and "echo times (ms)" in out and "orientation" in out


# --- bad input: one line naming the file, non-zero exit, nothing written ----------------------


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments naming the bad input, expected problem text)."""
    root = tmp_path_factory.mktemp("bad")
    nan = np.ones((4, 5, 6), np.float32)
    nan[2, 2, 2] = np.nan
    inf = np.ones((4, 5, 6), np.float32)
    inf[0, 0, 0] = -np.inf
    write_volume(Volume(nan, (1, 1, 1)), root / "nan.nrrd")
    write_volume(Volume(inf, (1, 1, 1)), root / "inf.nii.gz")
    write_volume(Volume(np.zeros((4, 5, 6), np.int16), (1, 1, 1)), root / "empty.nrrd")
    write_volume(Volume(np.ones((1, 5, 6), np.int16), (1, 1, 1)), root / "flat.nrrd")
    four_d = Volume(np.ones((4, 5, 6, 3), np.float32), (1, 1, 1), echo_times_ms=(10, 20, 30))
    write_volume(four_d, root / "echoes.nii.gz")
    (root / "corrupt.nrrd").write_bytes(b"NRRD0004\ntype: what\n\n")
    (root / "empty_folder").mkdir()
    pixels = np.random.default_rng(0).integers(0, 1000, (4, 6, 6, 1)).astype(np.int16)
    # Two series in one folder (sub-folders are not searched: that is a different message).
    write_dicom_series(root / "mixed", pixels, (10.0,), names=[f"a{k}.dcm" for k in range(4)])
    write_dicom_series(
        root / "mixed", pixels, (10.0,), orientation=rotation((0, 1, 0), 90), names=[f"b{k}.dcm" for k in range(4)]
    )
    write_dicom_series(root / "no_echo_time", np.concatenate([pixels, pixels], axis=-1), (10.0, None))
    return {
        "missing": ([root / "absent.nii.gz"], "absent.nii.gz: no such file or folder"),
        "unreadable": ([root / "corrupt.nrrd"], "corrupt.nrrd: cannot be read as an image"),
        "2D": ([root / "flat.nrrd"], "flat.nrrd: is a 2D image"),
        "empty": ([root / "empty.nrrd"], "empty.nrrd: volume is empty"),
        "NaN": ([root / "nan.nrrd"], "nan.nrrd: volume contains 1 NaN or infinite voxels"),
        "inf": ([root / "inf.nii.gz"], "inf.nii.gz: volume contains 1 NaN or infinite voxels"),
        "mixed series": ([root / "mixed"], "mixed: folder mixes 2 DICOM series"),
        "echo times missing (DICOM)": ([root / "no_echo_time"], "no_echo_time: multi-echo series without EchoTime"),
        "echo times missing (4D NIfTI)": ([root / "echoes.nii.gz"], "echoes.nii.gz: holds 3 echoes but no echo times"),
        "echo times not increasing": (
            [root / "echoes.nii.gz", "--echo-times", "30,20,10"],
            r"echoes.nii.gz: echo times are not increasing: [30.0, 20.0, 10.0] ms",
        ),
        "empty folder": ([root / "empty_folder"], "empty_folder: folder holds no DICOM images"),
    }


CASES = [
    "missing",
    "unreadable",
    "2D",
    "empty",
    "NaN",
    "inf",
    "mixed series",
    "echo times missing (DICOM)",
    "echo times missing (4D NIfTI)",
    "echo times not increasing",
    "empty folder",
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", ["info", "segment", "t2"])
def test_bad_input_fails_cleanly(capsys, tmp_path, bad_inputs, case, command):
    arguments, problem = bad_inputs[case]
    out_dir = tmp_path / "OUT"
    argv = [command, *arguments] + ([] if command == "info" else ["-o", out_dir])
    code, out, err = run(capsys, *argv)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(f"kneeseg {command}: error: ")
    assert problem in err
    assert "Traceback" not in out + err
    assert list(tmp_path.iterdir()) == []  # neither OUT nor OUT.partial


def test_console_script_bad_input_has_no_traceback(tmp_path, bad_inputs):
    arguments, problem = bad_inputs["NaN"]
    result = subprocess.run(
        [sys.executable, "-m", "KneeSegLogic", "segment", *map(str, arguments), "-o", str(tmp_path / "OUT")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and problem in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_before_any_work(capsys, tmp_path):
    out_dir = tmp_path / "OUT"
    out_dir.mkdir()
    (out_dir / "mine.txt").write_text("keep")
    code, _, err = run(capsys, "segment", SAMPLE_SCAN, "-o", out_dir)
    assert code == 1 and "OUT: output folder exists; choose another or pass --overwrite" in err
    assert [p.name for p in out_dir.iterdir()] == ["mine.txt"]


def test_bad_echo_times_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["info", str(SAMPLE_SCAN), "--echo-times", "ten,twenty"])
    assert exit_.value.code == 2
    assert "echo times must be comma-separated numbers in ms" in capsys.readouterr().err


# --- dispatch (fake commands, so the real ones do not matter) ------------------------------------


def _no_arguments(parser) -> None:
    parser.add_argument("--flag", action="store_true")


def test_internal_error_is_one_line_exit_3_and_traceback_with_debug(capsys, monkeypatch):
    def buggy(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setitem(cli.COMMANDS, "buggy", cli.Command("a command with a bug", _no_arguments, buggy))
    code, _, err = run(capsys, "buggy")
    assert code == 3 and err.count("\n") == 1
    assert "internal error: ZeroDivisionError: division by zero (rerun with --debug" in err
    # --debug shows the traceback and keeps the exit code of an internal error (3, not 1).
    code, _, err = run(capsys, "--debug", "buggy")
    assert code == 3 and "Traceback (most recent call last)" in err and "ZeroDivisionError: division by zero" in err


def test_handler_return_value_is_the_exit_code(capsys, monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "ok", cli.Command("a command", _no_arguments, lambda args: None))
    assert run(capsys, "ok")[0] == 0


# --- devices, terminal progress, options ----------------------------------------------------------


@pytest.mark.parametrize(
    ("spelled", "normal"), [("auto", "auto"), ("CPU", "cpu"), ("gpu", "cuda"), ("cuda:1", "cuda:1"), ("mps", "mps")]
)
def test_device_spellings(spelled, normal):
    args = cli.build_parser().parse_args(["segment", "x.nrrd", "-o", "out", "--device", spelled])
    assert args.device == normal


def test_unknown_device_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["segment", "x.nrrd", "-o", "out", "--device", "tpu"])
    assert exit_.value.code == 2 and "unknown device 'tpu'" in capsys.readouterr().err


def test_cpu_fallback_notice_and_missing_gpu_refused(monkeypatch):
    import torch

    from KneeSegLogic.device import select_device
    from KneeSegLogic.errors import KneeSegError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    notices: list[str] = []
    assert select_device("auto", notice=notices.append).type == "cpu"
    assert len(notices) == 1 and "running on the CPU" in notices[0]
    with pytest.raises(KneeSegError, match="no CUDA GPU"):
        select_device("cuda:1")


def test_terminal_bar_never_goes_backwards_across_stages():
    import io

    from KneeSegLogic.commands.console import SEGMENT_STAGES, TerminalProgress

    progress = TerminalProgress(SEGMENT_STAGES, stream=io.StringIO())
    reached = []
    for stage, fraction in [
        ("read", 1.0),
        ("inference", 0.0),
        ("inference", 0.5),
        ("inference", 0.25),
        ("fusion", 0.0),
        ("t2_fit", 0.5),
        ("t2", 1.0),
        ("report", 0.5),
    ]:
        progress(stage, fraction)
        reached.append(progress.done)
    assert reached == sorted(reached)
    assert reached[2] == pytest.approx((2 + 45 * 0.5) / 100)  # weights sum to 100
    assert progress.overall("t2_fit", 0.5) == pytest.approx((82 + 10 * 0.35) / 100)
    progress("done", 1.0)
    assert progress.bar.n == 1000


def test_command_constants_match_the_library():
    from KneeSegLogic.commands import segment
    from KneeSegLogic.io.export import FORMATS
    from KneeSegLogic.tissues import BY_KEY

    assert segment.FORMATS == FORMATS and tuple(BY_KEY) == segment.STRUCTURES
    from KneeSegLogic.commands import surfaces as surfaces_command
    from KneeSegLogic.quantification import surfaces

    assert surfaces_command.MESH_RESOLUTION_MM == surfaces.MESH_RESOLUTION_MM
    assert surfaces_command.SMOOTHING_METHODS == surfaces.SMOOTHING_METHODS


def test_roi_subset_and_format_parse_and_unknown_structure_is_refused(capsys):
    args = cli.build_parser().parse_args(
        [
            "segment",
            "x.nrrd",
            "-o",
            "o",
            "--roi-subset",
            "femur",
            "tibia",
            "--format",
            "nifti",
            "dicom-seg",
            "--fast",
            "--no-report",
            "--threads",
            "2",
        ]
    )
    assert args.roi_subset == ["femur", "tibia"] and args.formats == ["nifti", "dicom-seg"]
    assert args.fast and args.no_report and args.threads == 2
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["segment", "x.nrrd", "-o", "o", "--roi-subset", "kneecap"])


# --- start-up: commands import only what they use ------------------------------------------------

HEAVY = ("torch", "monai", "safetensors", "vtkmodules")


def imported_top_level(stderr: str) -> set[str]:
    """Top-level packages named in ``python -X importtime`` output (lines ``... | cumulative | name``)."""
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0] for line in stderr.splitlines() if line.startswith("import time:")
    }


@pytest.mark.parametrize(
    "argv, needed",
    [
        (["--help"], set()),
        (["segment", "--help"], set()),
        (["t2", "--help"], set()),
        (["models", "--json"], set()),
        (["info", str(SAMPLE_SCAN), "--json"], {"numpy", "SimpleITK"}),
    ],
)
def test_listing_commands_do_not_import_torch(tmp_path, argv, needed):
    environment = {**os.environ, "KNEESEG_HOME": str(tmp_path / "home")}
    environment.pop("KNEESEG_MODELS_PATH", None)
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "KneeSegLogic", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    modules = imported_top_level(result.stderr)
    assert "KneeSegLogic" in modules and needed <= modules
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    if argv[0] == "models":  # the bundled package is listed all the same, read from model.json alone
        assert [p["origin"] for p in json.loads(result.stdout)["packages"]] == ["bundled"]


@pytest.mark.parametrize("name", ["monai.UNet", "monai.BasicUNet"])
def test_recorded_architecture_signatures_are_monai_s(name):
    """model.json is checked against signatures recorded without importing MONAI: they must be MONAI's."""
    import inspect

    from monai.networks import nets

    from KneeSegLogic.segmentation.networks import ARCHITECTURES, signature

    actual = inspect.signature(getattr(nets, ARCHITECTURES[name][0]))
    assert [(p.name, p.default) for p in signature(name).parameters.values()] == [
        (p.name, p.default) for p in actual.parameters.values()
    ]
