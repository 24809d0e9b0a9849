"""The adversarial corpus of issue 16: every bad input is refused the way the README promises.

Each case builds its inputs in the test (synthetic scans written with the engine's own writer,
DICOM series written with pydicom, pydicom's bundled odd files) and runs one ``kneeseg``
command in this process. It asserts the exact exit code, ONE line on stderr matching the
expected problem, no ``OUT`` and no ``OUT.partial`` left, and every input byte-identical
(sha256 before and after).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from conftest import write_dicom_series

from KneeSegLogic.commands.main import main
from KneeSegLogic.io.scans import read_volume, write_volume
from KneeSegLogic.io.segfile import write_segmentation
from KneeSegLogic.io.volume import Volume


def _digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _scan(echoes: int = 4, shape: tuple[int, int, int] = (8, 16, 16), spacing=(0.6, 0.6, 3.0)) -> Volume:
    rng = np.random.default_rng(0)
    base = 200 + 800 * rng.random(shape)
    if echoes == 1:
        return Volume(base.astype(np.float32), spacing)
    times = tuple(10.0 * (e + 1) for e in range(echoes))
    array = np.stack([base * np.exp(-t / 40) for t in times], axis=-1).astype(np.float32)
    return Volume(array, spacing, echo_times_ms=times)


def _int16_scan() -> Volume:
    return Volume((_scan(1).array).astype(np.int16), (0.6, 0.6, 3.0))


def _labels(shape=(8, 16, 16), origin=(0.0, 0.0, 0.0)) -> Volume:
    labels = np.zeros(shape, np.uint8)
    labels[2:6, 4:12, 4:12] = 1
    labels[3:5, 6:10, 6:10] = 2
    return Volume(labels, (0.6, 0.6, 3.0), origin)


def _truncate(path: Path, fraction: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _dicom(folder: Path, slices: int = 5, **kwargs) -> list[Path]:
    pixels = (np.random.default_rng(1).random((slices, 8, 8, 1)) * 1000).astype(np.int16)
    return write_dicom_series(folder, pixels, (10.0,), **kwargs)


def _edit_dicom(path: Path, **values) -> None:
    import pydicom

    header = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(header, keyword, value)
    header.save_as(path)


def _pydicom_file(name: str, folder: Path) -> Path:
    from pydicom.data import get_testdata_file

    folder.mkdir()
    source = get_testdata_file(name)
    if source is None:
        pytest.skip(f"pydicom's test file {name} is not installed")
    return Path(shutil.copy(source, folder / name))


def _tiny_package(folder: Path, package_id: str = "tiny", default: bool = False, seed: int = 0) -> Path:
    """An untrained one-member 2.5D package (a few kB of safetensors weights)."""
    import torch

    from KneeSegLogic.segmentation.networks import build_network
    from KneeSegLogic.segmentation.package import save_package
    from KneeSegLogic.tissues import TISSUES

    architecture = {
        "name": "monai.UNet",
        "args": {
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": 1 + len(TISSUES),
            "channels": [2, 4],
            "strides": [2],
        },
    }
    member = {
        "name": "only",
        "weight": 1.0,
        "architecture": architecture,
        "input": {"kind": "2d", "plane": "sagittal", "spacing_mm": [2.0, 2.0], "normalisation": {"name": "zscore"}},
    }
    spec = {
        "id": package_id,
        "version": "1.0.0",
        "description": "untrained, for tests",
        "license": "Apache-2.0",
        "default": default,
        "labels": {str(t.label): t.key for t in TISSUES},
        "members": [member],
        "postprocessing": [],
    }
    torch.manual_seed(seed)
    state = build_network(architecture["name"], architecture["args"]).state_dict()
    save_package(folder, spec, [state])
    return folder


def _replace_weights(package: Path, name: str, data: bytes | None) -> None:
    """Swap the member's weights for ``data`` in a file ``name`` (None: a folder), with a matching
    sha256 in model.json, so only the weights' content is wrong, not the checksum."""
    import json

    manifest = json.loads((package / "model.json").read_text())
    member = manifest["members"][0]
    (package / member["weights"]).unlink()
    if data is None:
        (package / name).mkdir()
    else:
        (package / name).write_bytes(data)
        member["sha256"] = hashlib.sha256(data).hexdigest()
    member["weights"] = name
    (package / "model.json").write_text(json.dumps(manifest))


class _RunsCode:
    """Unpickling this would run ``touch PWNED``: a malicious "checkpoint"."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------------------------
# Each maker gets the test's folder and returns (arguments after "kneeseg", the inputs to hash, the
# output folder that must not appear or None).


def _t2_on(path: Path, tmp: Path, *extra: str) -> tuple[list[str], list[Path], Path]:
    return ["t2", str(path), "-o", str(tmp / "OUT"), *extra], [path], tmp / "OUT"


def overwrite_dicom_self(tmp):
    _dicom(tmp / "X")
    return ["segment", str(tmp / "X"), "-o", str(tmp / "X"), "--overwrite"], [tmp / "X"], None


def overwrite_parent_of_input(tmp):
    (tmp / "V").mkdir()
    seg = write_segmentation(_labels(), tmp / "V" / "segmentation.seg.nrrd")
    return ["surfaces", str(seg), "-o", str(tmp / "V"), "--overwrite"], [seg], None


def output_inside_input(tmp):
    _dicom(tmp / "X")
    return ["segment", str(tmp / "X"), "-o", str(tmp / "X" / "out")], [tmp / "X"], tmp / "X" / "out"


def truncated_nii_int16(tmp):
    return _t2_on(_truncate(write_volume(_int16_scan(), tmp / "s.nii")), tmp)


def truncated_nii_gz_int16(tmp):
    return _t2_on(_truncate(write_volume(_int16_scan(), tmp / "s.nii.gz")), tmp)


def truncated_nii_float32(tmp):
    return _t2_on(_truncate(write_volume(_scan(1), tmp / "s.nii")), tmp)


def truncated_mha(tmp):
    return _t2_on(_truncate(write_volume(_scan(1), tmp / "s.mha", compress=False)), tmp)


def truncated_nrrd_gzip(tmp):
    return _t2_on(_truncate(write_volume(_scan(), tmp / "s.nrrd")), tmp)


def _nrrd_with(tmp: Path, old: bytes, new: bytes, volume: Volume | None = None) -> Path:
    path = write_volume(volume or _scan(1), tmp / "s.nrrd", compress=False)
    data = path.read_bytes()
    header, _, pixels = data.partition(b"\n\n")
    assert old in header, header
    path.write_bytes(header.replace(old, new, 1) + b"\n\n" + pixels)
    return path


def nan_spacing_nrrd(tmp):
    return _t2_on(_nrrd_with(tmp, b"(0,0,3)", b"(0,0,nan)"), tmp)


def zero_spacing_nrrd(tmp):
    return _t2_on(_nrrd_with(tmp, b"(0,0,3)", b"(0,0,0)"), tmp)


def _nifti_pixdim(tmp: Path, value: float) -> Path:
    import nibabel

    image = nibabel.Nifti1Image(_int16_scan().array.T.copy(), None)
    image.header["pixdim"][1:4] = [value, 0.6, 3.0]
    path = tmp / "s.nii"
    nibabel.save(image, path)
    raw = bytearray(path.read_bytes())
    raw[80:84] = np.float32(value).tobytes()  # pixdim[1], as stored (nibabel would repair it)
    path.write_bytes(bytes(raw))
    return path


def zero_spacing_nifti(tmp):
    return _t2_on(_nifti_pixdim(tmp, 0.0), tmp)


def nan_spacing_nifti(tmp):
    return _t2_on(_nifti_pixdim(tmp, float("nan")), tmp)


def complex_nifti(tmp):
    import nibabel

    path = tmp / "c.nii"
    nibabel.save(nibabel.Nifti1Image((_scan(1).array + 1j).astype(np.complex64), np.eye(4)), path)
    return _t2_on(path, tmp)


def rgb_nifti(tmp):
    import nibabel

    rgb = np.zeros((16, 16, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"], rgb["G"] = 100, 50
    path = tmp / "rgb.nii"
    nibabel.save(nibabel.Nifti1Image(rgb, np.eye(4)), path)
    return _t2_on(path, tmp)


def echo_times_contradict_nrrd(tmp):
    path = write_volume(_scan(), tmp / "me.nrrd")
    return _t2_on(path, tmp, "--echo-times", "5,15,25,35")


def fifo_as_scan(tmp):
    path = tmp / "pipe.nrrd"
    os.mkfifo(path)
    return ["t2", str(path), "-o", str(tmp / "OUT")], [], tmp / "OUT"


def tiny_volume(tmp):
    return _t2_on(write_volume(Volume(np.ones((2, 2, 2), np.float32), (1, 1, 1)), tmp / "s.nrrd"), tmp)


def micro_voxels(tmp):
    return _t2_on(write_volume(Volume(_scan(1).array, (1e-4, 1e-4, 1e-4)), tmp / "s.nrrd"), tmp)


def huge_slices(tmp):
    return _t2_on(write_volume(Volume(_scan(1).array, (0.6, 0.6, 400.0)), tmp / "s.nrrd"), tmp)


def dicom_half_pixel_data(tmp):
    files = _dicom(tmp / "X")
    files[2].write_bytes(files[2].read_bytes()[:-64])  # half of its 8 x 8 x 16-bit pixels
    return _t2_on(tmp / "X", tmp)


def dicom_bits_allocated_changed(tmp):
    files = _dicom(tmp / "X")
    _edit_dicom(files[1], BitsAllocated=32, BitsStored=32, HighBit=31)
    return _t2_on(tmp / "X", tmp)


def dicom_pydicom_truncated(tmp):
    _pydicom_file("MR_truncated.dcm", tmp / "X")
    return _t2_on(tmp / "X", tmp)


def dicom_rt_dose(tmp):
    _pydicom_file("rtdose.dcm", tmp / "X")
    return _t2_on(tmp / "X", tmp)


def dicom_rgb_jpeg(tmp):
    _pydicom_file("SC_rgb_jpeg.dcm", tmp / "X")
    return _t2_on(tmp / "X", tmp)


def dicom_multivalued_echo_numbers(tmp):
    files = _dicom(tmp / "X")
    _edit_dicom(files[0], EchoNumbers=[1, 2])
    return _t2_on(tmp / "X", tmp)


def dicom_text_echo_time(tmp):
    files = _dicom(tmp / "X")
    import pydicom

    header = pydicom.dcmread(files[0])
    header["EchoTime"] = pydicom.DataElement(0x00180081, "LO", "short")
    header.save_as(files[0])
    return _t2_on(tmp / "X", tmp)


def dicom_text_position(tmp):
    files = _dicom(tmp / "X")
    import pydicom

    header = pydicom.dcmread(files[0])
    header["ImagePositionPatient"] = pydicom.DataElement(0x00200032, "LO", "left\\of\\here")
    header.save_as(files[0])
    return _t2_on(tmp / "X", tmp)


def dicom_two_value_position(tmp):
    files = _dicom(tmp / "X")
    _edit_dicom(files[3], ImagePositionPatient=["1.0", "2.0"])
    return _t2_on(tmp / "X", tmp)


def dicom_orientation_wobble(tmp):
    files = _dicom(tmp / "X")
    _edit_dicom(files[2], ImageOrientationPatient=["1", "0.00004", "0", "-0.00004", "1", "0"])
    return _t2_on(tmp / "X", tmp)


def dicom_wrong_echo_time_count(tmp):
    _dicom(tmp / "X")
    return _t2_on(tmp / "X", tmp, "--echo-times", "10,20,30")


def dicom_irregular_slice_named(tmp):
    files = _dicom(tmp / "X", slices=6)
    files[3].unlink()
    return _t2_on(tmp / "X", tmp)


def dicom_several_series(tmp):
    _dicom(tmp / "X", names=[f"a{k}.dcm" for k in range(5)])
    _dicom(tmp / "X", names=[f"b{k}.dcm" for k in range(5)], orientation=np.eye(3)[:, [1, 0, 2]])
    return _t2_on(tmp / "X", tmp)


def dicom_series_in_subfolder_only(tmp):
    _dicom(tmp / "study" / "series1")
    return _t2_on(tmp / "study", tmp)


def dicom_unknown_series_chosen(tmp):
    _dicom(tmp / "X")
    return ["t2", f"{tmp / 'X'}::1.2.3.4", "-o", str(tmp / "OUT")], [tmp / "X"], tmp / "OUT"


def segmentation_zero_space_direction(tmp):
    seg = write_segmentation(_labels(), tmp / "s.seg.nrrd")
    data = seg.read_bytes()
    header, _, pixels = data.partition(b"\n\n")
    header = re.sub(
        rb"space directions: \(([^)]*)\) \(([^)]*)\) \(([^)]*)\)", rb"space directions: (\1) (\2) (0,0,0)", header
    )
    seg.write_bytes(header + b"\n\n" + pixels)
    return ["surfaces", str(seg), "-o", str(tmp / "OUT")], [seg], tmp / "OUT"


def _empty_seg(tmp: Path) -> Path:
    path = tmp / "empty.seg.nrrd"
    path.write_bytes(b"")
    return path


def empty_segmentation_surfaces(tmp):
    seg = _empty_seg(tmp)
    return ["surfaces", str(seg), "-o", str(tmp / "OUT")], [seg], tmp / "OUT"


def empty_segmentation_evaluate(tmp):
    seg = _empty_seg(tmp)
    good = write_segmentation(_labels(), tmp / "good.seg.nrrd")
    return ["evaluate", str(seg), str(good)], [seg, good], None


def empty_segmentation_t2_mask(tmp):
    seg = _empty_seg(tmp)
    scan = write_volume(_scan(), tmp / "me.nrrd")
    return _t2_on(scan, tmp, "--mask", str(seg))[0], [scan, seg], tmp / "OUT"


def t2_mask_not_overlapping(tmp):
    scan = write_volume(_scan(), tmp / "me.nrrd")
    mask = write_segmentation(_labels(origin=(500.0, 500.0, 500.0)), tmp / "far.seg.nrrd")
    return _t2_on(scan, tmp, "--mask", str(mask))[0], [scan, mask], tmp / "OUT"


def _segment_with(tmp: Path, package: Path) -> tuple[list[str], list[Path], Path]:
    scan = write_volume(_scan(1, shape=(12, 24, 24)), tmp / "knee.nrrd")
    argv = ["segment", str(scan), "-o", str(tmp / "OUT"), "--model", str(package), "--device", "cpu"]
    return argv, [scan, package], tmp / "OUT"


def pickled_pt_weights(tmp):
    import pickle

    package = _tiny_package(tmp / "pkg")
    _replace_weights(package, "member0.pt", pickle.dumps({"weight": _RunsCode(tmp / "PWNED")}))
    return _segment_with(tmp, package)


def weights_path_is_a_folder(tmp):
    package = _tiny_package(tmp / "pkg")
    _replace_weights(package, "member0.safetensors", None)
    return _segment_with(tmp, package)


CASES: dict[str, tuple[Callable, int, str]] = {
    "overwrite_dicom_self": (overwrite_dicom_self, 1, r"output folder is the input"),
    "overwrite_parent_of_input": (overwrite_parent_of_input, 1, r"output folder contains the input"),
    "output_inside_input": (output_inside_input, 1, r"output folder lies inside the input"),
    "truncated_nii_int16": (truncated_nii_int16, 1, r"s\.nii: pixel data are truncated"),
    "truncated_nii_gz_int16": (truncated_nii_gz_int16, 1, r"s\.nii\.gz: compressed pixel data are cut short"),
    "truncated_nii_float32": (truncated_nii_float32, 1, r"s\.nii: pixel data are truncated"),
    "truncated_mha": (truncated_mha, 1, r"s\.mha: pixel data are truncated"),
    "truncated_nrrd_gzip": (truncated_nrrd_gzip, 1, r"s\.nrrd: compressed pixel data are cut short"),
    "nan_spacing_nrrd": (nan_spacing_nrrd, 1, r"s\.nrrd: space directions .* not a number"),
    "zero_spacing_nrrd": (zero_spacing_nrrd, 1, r"s\.nrrd: space directions have lengths \[0\.6, 0\.6, 0\.0\]"),
    "zero_spacing_nifti": (zero_spacing_nifti, 1, r"s\.nii: pixdim \(voxel size\) \[0\.0, 0\.6"),
    "nan_spacing_nifti": (nan_spacing_nifti, 1, r"s\.nii: pixdim \(voxel size\) \[nan"),
    "complex_nifti": (complex_nifti, 1, r"c\.nii: holds complex-valued voxels"),
    "rgb_nifti": (rgb_nifti, 1, r"rgb\.nii: is a colour \(RGB\) image"),
    "echo_times_contradict_nrrd": (echo_times_contradict_nrrd, 1, r"echo times given .* differ from the file's header"),
    "fifo_as_scan": (fifo_as_scan, 1, r"pipe\.nrrd: is not a regular file"),
    "tiny_volume": (tiny_volume, 1, r"size \(2, 2, 2\) is too small"),
    "micro_voxels": (micro_voxels, 1, r"finer than any MR scan"),
    "huge_slices": (huge_slices, 1, r"field of view .* larger than an MR scanner's"),
    "dicom_half_pixel_data": (dicom_half_pixel_data, 1, r"IM0003\.dcm: pixel data hold 64 bytes where .* need 128"),
    "dicom_bits_allocated_changed": (dicom_bits_allocated_changed, 1, r"IM0002\.dcm: pixel data hold"),
    "dicom_pydicom_truncated": (dicom_pydicom_truncated, 1, r"MR_truncated\.dcm: pixel data hold"),
    "dicom_rt_dose": (dicom_rt_dose, 1, r"rtdose\.dcm: is a multi-frame DICOM object \(15 frames, RTDOSE\)"),
    "dicom_rgb_jpeg": (dicom_rgb_jpeg, 1, r"SC_rgb_jpeg\.dcm: is a colour DICOM image"),
    "dicom_multivalued_echo_numbers": (dicom_multivalued_echo_numbers, 1, r"IM0001\.dcm: EchoNumbers holds 2 values"),
    "dicom_text_echo_time": (dicom_text_echo_time, 1, r"IM0001\.dcm: EchoTime 'short' is not numeric"),
    "dicom_text_position": (dicom_text_position, 1, r"IM0001\.dcm: ImagePositionPatient .* is not numeric"),
    "dicom_two_value_position": (dicom_two_value_position, 1, r"IM0004\.dcm: ImagePositionPatient holds 2 values"),
    # A 4e-5 wobble of one slice's orientation is rounding: the series is read (t2 then wants echoes).
    "dicom_orientation_wobble": (dicom_orientation_wobble, 1, r"X: is a single 3D volume"),
    "dicom_wrong_echo_time_count": (dicom_wrong_echo_time_count, 1, r"echo times given .*\(a single-echo series\)"),
    "dicom_irregular_slice_named": (dicom_irregular_slice_named, 1, r"slice spacing is irregular .* IM000[34]\.dcm"),
    "dicom_several_series": (dicom_several_series, 1, r"folder mixes 2 DICOM series: .*::SERIES_UID"),
    "dicom_series_in_subfolder_only": (dicom_series_in_subfolder_only, 1, r"sub-folders are not searched: series1"),
    "dicom_unknown_series_chosen": (dicom_unknown_series_chosen, 1, r"holds no series 1\.2\.3\.4; it holds"),
    "segmentation_zero_space_direction": (segmentation_zero_space_direction, 1, r"s\.seg\.nrrd: space directions"),
    "empty_segmentation_surfaces": (empty_segmentation_surfaces, 1, r"empty\.seg\.nrrd: is empty \(0 bytes\)"),
    "empty_segmentation_evaluate": (empty_segmentation_evaluate, 1, r"empty\.seg\.nrrd: is empty \(0 bytes\)"),
    "empty_segmentation_t2_mask": (empty_segmentation_t2_mask, 1, r"empty\.seg\.nrrd: is empty \(0 bytes\)"),
    "t2_mask_not_overlapping": (t2_mask_not_overlapping, 1, r"far\.seg\.nrrd: does not overlap the scan"),
    "pickled_pt_weights": (pickled_pt_weights, 1, r"member0\.pt: refused: not a torch file of tensors only"),
    "weights_path_is_a_folder": (weights_path_is_a_folder, 1, r"member0\.safetensors: is a folder"),
}


@pytest.fixture(autouse=True)
def no_installed_models(tmp_path, monkeypatch):
    """Empty bundled, extra and user model folders: only the packages a case builds are found."""
    from KneeSegLogic.segmentation import registry

    for name in ("bundled", "extra", "home"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(registry, "BUNDLED_MODELS_DIR", tmp_path / "bundled")
    monkeypatch.setenv("KNEESEG_MODELS_PATH", str(tmp_path / "extra"))
    monkeypatch.setenv("KNEESEG_HOME", str(tmp_path / "home"))


def _run(argv: list[str], capsys) -> tuple[int, list[str], str]:
    """Exit code, the non-blank stderr lines and stdout of ``kneeseg ARGV``; no Python warning
    may escape (it would be a second, unpromised line on a user's terminal). Given ``capfd``,
    what C libraries (ITK, VTK) write to the stderr descriptor counts too."""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv)
    captured = capsys.readouterr()
    assert not caught, [str(w.message) for w in caught]
    return code, [line for line in captured.err.splitlines() if line.strip()], captured.out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_cleanly(name, tmp_path, capfd):
    make, code, pattern = CASES[name]
    argv, inputs, out = make(tmp_path)
    before = {str(p): _digest(p) for p in inputs}
    exit_code, lines, _ = _run(argv, capfd)  # capfd: C libraries' messages count as lines too
    assert exit_code == code
    assert len(lines) == 1, lines
    assert re.search(pattern, lines[0]), lines[0]
    assert lines[0].startswith(f"kneeseg {argv[0]}: error: ")
    if out is not None:
        assert not out.exists()
        assert not out.with_name(out.name + ".partial").is_dir()
    assert {str(p): _digest(p) for p in inputs} == before
    assert not (tmp_path / "PWNED").exists()


# ----------------------------------------------------------------------------------------------
# Output folders that cannot be written, for every command that writes one: a read-only folder, a
# path under a file, OUT.partial already a file, a full disk and a nearly full one (a tiny tmpfs;
# skipped where mounting is not allowed), and the file size limit (``ulimit -f``, in a subprocess:
# the limit would also catch pytest's own files). Each: exit 1, one line naming the path, no OUT,
# no OUT.partial folder, inputs unchanged.

WRITERS = ("t2", "segment", "surfaces")


def _writer(command: str, tmp: Path, out: Path) -> tuple[list[str], list[Path]]:
    """``kneeseg COMMAND ... -o OUT`` on small inputs in ``tmp`` and the inputs to hash."""
    if command == "t2":
        scan = write_volume(_scan(), tmp / "me.nrrd")
        return ["t2", str(scan), "-o", str(out), "--model", "loglinear"], [scan]
    if command == "segment":
        package = _tiny_package(tmp / "pkg")
        scan = write_volume(_scan(1, shape=(12, 24, 24)), tmp / "knee.nrrd")
        # No surfaces: VTK's messages on a full disk are the surfaces command's case below.
        argv = ["segment", str(scan), "-o", str(out), "--model", str(package), "--device", "cpu", "--no-surfaces"]
        return argv, [scan, package]
    seg = write_segmentation(_labels(), tmp / "s.seg.nrrd")
    return ["surfaces", str(seg), "-o", str(out)], [seg]


@contextlib.contextmanager
def _tmpfs(where: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (needs root, or CAP_SYS_ADMIN; skipped otherwise)."""
    where.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    try:
        mount = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "kneeseg-test", str(where)], capture_output=True, text=True
        )
    except FileNotFoundError:
        pytest.skip("no mount command")
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` until ``leave`` bytes are free."""
    status = os.statvfs(disk)
    with open(disk / "filler", "wb") as stream:
        stream.write(b"\0" * max(status.f_bavail * status.f_frsize - leave, 0))


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[Path]:
    """A folder this process cannot write into: by permissions, or (root ignores them) a read-only tmpfs."""
    if os.geteuid() == 0:
        with _tmpfs(folder, "64k", read_only=True):
            yield folder
        return
    folder.mkdir()
    folder.chmod(0o555)
    try:
        yield folder
    finally:
        folder.chmod(0o755)


def _file_size_limit(limit: int) -> Callable[[], None]:
    def limited() -> None:  # in the child: writes past ``limit`` bytes fail with EFBIG, not SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return limited


NO_SPACE = r"(OUT\.partial/[\w./]+|OUT): cannot be written \(No space left on device\)"
UNWRITABLE = {
    "read_only": r"ro/OUT\.partial: cannot be written \((Permission denied|Read-only file system)\)",
    "under_a_file": r"afile/OUT(\.partial)?: cannot be written \(Not a directory\)",
    "partial_is_a_file": r"OUT\.partial: exists and is not a folder; remove it",
    "disk_full": NO_SPACE,
    "disk_nearly_full": NO_SPACE,
    "file_size_limit": r"OUT\.partial/[\w./]+: cannot be written \(File too large\)",
}
# Free bytes on the nearly full disk: the run fails part-way (t2 at t2_s0.nrrd; segment in the
# report, whose page is written straight into the folder; surfaces at the first model).
NEARLY_FULL = {"t2": 8192, "segment": 250_000, "surfaces": 8192}


@pytest.mark.parametrize(
    "command, kind",
    [(command, kind) for command in WRITERS for kind in UNWRITABLE],
)
def test_unwritable_output_is_refused_cleanly(command, kind, tmp_path, capfd):
    inputs_folder = tmp_path / "in"
    inputs_folder.mkdir()
    with contextlib.ExitStack() as stack:
        if kind == "read_only":
            out = stack.enter_context(_read_only(tmp_path / "ro")) / "OUT"
        elif kind == "under_a_file":
            (tmp_path / "afile").write_text("x")
            out = tmp_path / "afile" / "OUT"
        elif kind.startswith("disk"):
            disk = stack.enter_context(_tmpfs(tmp_path / "disk", "4m"))
            _fill(disk, 0 if kind == "disk_full" else NEARLY_FULL[command])
            out = disk / "OUT"
        else:
            out = tmp_path / "OUT"
        argv, inputs = _writer(command, inputs_folder, out)
        if kind == "partial_is_a_file":
            (tmp_path / "OUT.partial").write_text("not a folder")
            inputs.append(tmp_path / "OUT.partial")  # the user's file: left as it was
        before = {str(p): _digest(p) for p in inputs}
        if kind == "file_size_limit":
            run = subprocess.run(
                [sys.executable, "-m", "KneeSegLogic.commands.main", *argv],
                capture_output=True,
                text=True,
                timeout=300,
                preexec_fn=_file_size_limit(2000),
            )
            exit_code, lines = run.returncode, [line for line in run.stderr.splitlines() if line.strip()]
        else:
            exit_code, lines, _ = _run(argv, capfd)  # capfd: ITK's and VTK's messages too
        assert exit_code == 1, lines
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"kneeseg {command}: error: "), lines[0]
        assert re.search(UNWRITABLE[kind], lines[0]), lines[0]
        assert not out.exists()
        assert not out.with_name(out.name + ".partial").is_dir()
        assert {str(p): _digest(p) for p in inputs} == before


# ----------------------------------------------------------------------------------------------
# Accepted with a warning: exit 0, the warning on ONE stderr line, and in results.json.


def test_models_warns_of_a_tampered_package_and_lists_it_not(tmp_path, capsys):
    good = _tiny_package(tmp_path / "extra" / "good", package_id="good", default=True)
    bad = _tiny_package(tmp_path / "extra" / "bad", package_id="bad", seed=1)
    weights = bad / "member0.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in a tensor, model.json untouched
    weights.write_bytes(bytes(data))
    before = {**_digest(good), **_digest(bad)}
    code, lines, out = _run(["models"], capsys)
    assert code == 0
    assert len(lines) == 1, lines
    assert re.fullmatch(r"kneeseg models: warning: skipped .*bad/member0\.safetensors: sha256 mismatch.*", lines[0])
    assert re.search(r"^good 1\.0\.0 \(default\)", out, re.M) and not re.search(r"^bad ", out, re.M)
    assert {**_digest(good), **_digest(bad)} == before


def test_models_lists_one_id_and_version_once(tmp_path, capsys):
    # The same package in the extra folder and imported into the user cache: one entry, one default.
    source = _tiny_package(tmp_path / "extra" / "knee", package_id="knee", default=True)
    shutil.copytree(source, tmp_path / "home" / "models" / "knee-1.0.0")
    code, lines, out = _run(["models"], capsys)
    assert code == 0 and lines == []
    assert re.findall(r"^knee 1\.0\.0.*$", out, re.M) == [f"knee 1.0.0 (default)  licence Apache-2.0  [extra] {source}"]
    # Another package under the same id and version: still listed once (the one that runs), and
    # the other is named in one warning line.
    shutil.rmtree(tmp_path / "home" / "models" / "knee-1.0.0")
    other = _tiny_package(tmp_path / "home" / "models" / "knee-1.0.0", package_id="knee", default=True, seed=2)
    code, lines, out = _run(["models"], capsys)
    assert code == 0
    assert len(out.split("(default)")) == 2 and len(re.findall(r"^knee 1\.0\.0", out, re.M)) == 1
    assert len(lines) == 1, lines
    assert lines[0] == (
        f"kneeseg models: warning: skipped {other}: another knee 1.0.0 than {source}, which is used; "
        "give one of them another version"
    )


def test_t2_mask_on_another_grid_is_resampled_with_a_warning(tmp_path, capsys):
    import json

    scan = write_volume(_scan(), tmp_path / "me.nrrd")
    # The mask of a crop of the same scan: same voxels, half the slices, shifted origin.
    labels = _labels()
    cropped = Volume(labels.array[2:6], labels.spacing, (0.0, 0.0, 6.0))
    mask = write_segmentation(cropped, tmp_path / "crop.seg.nrrd")
    before = {**_digest(scan), **_digest(mask)}
    code, lines, _ = _run(
        ["t2", str(scan), "-o", str(tmp_path / "OUT"), "--mask", str(mask), "--model", "loglinear", "--quiet"], capsys
    )
    assert code == 0, lines
    expected = f"{mask}: mask was on another grid; resampled onto the scan grid (nearest neighbour)"
    assert lines == [f"kneeseg t2: warning: {expected}"]
    results = json.loads((tmp_path / "OUT" / "results.json").read_text())
    assert expected in results["warnings"]
    # The crop lies on the scan's voxels, so nearest neighbour puts every label back in place.
    from KneeSegLogic.io.segfile import read_labels

    written = read_labels(tmp_path / "OUT" / "segmentation.seg.nrrd")
    assert written.same_grid(read_volume(scan).echo(0), atol=1e-6)
    np.testing.assert_array_equal(written.array, labels.array)
    assert {**_digest(scan), **_digest(mask)} == before


def test_t2_refuses_bad_input_before_importing_torch(tmp_path):
    """Refusing a bad scan must not wait for torch's import (10-18 s on a loaded machine): checked
    by which modules are loaded at the refusal, in a fresh interpreter, not by seconds."""
    import subprocess
    import sys

    bad = _truncate(write_volume(_scan(), tmp_path / "s.nrrd"))
    probe = (
        "import sys; from KneeSegLogic.commands.main import main; "
        f"code = main(['t2', {str(bad)!r}, '-o', {str(tmp_path / 'OUT')!r}]); "
        "print(code, sorted(m for m in ('torch', 'monai', 'scipy.optimize') if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.stdout.split("\n")[0] == "1 []", run.stdout + run.stderr
    assert re.fullmatch(r"kneeseg t2: error: .*s\.nrrd: compressed pixel data are cut short.*\n", run.stderr)
    assert not (tmp_path / "OUT").exists()
