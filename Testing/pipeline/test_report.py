"""report.png / report.html on a small synthetic knee, and report.html in a real headless Chromium.

The Chromium test skips cleanly when no chromium is installed (``apt-get install chromium``).
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from KneeSegLogic.io.outputs import Results
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.pipeline.report import SagittalView, region_rows, write_report
from KneeSegLogic.tissues import BY_KEY, TISSUES


def test_structure_colours_differ_perceptually():
    color = pytest.importorskip("skimage.color")
    lab = color.rgb2lab(np.array([t.color for t in TISSUES], float)[None])[0]
    smallest = min(color.deltaE_ciede2000(lab[a], lab[b]) for a, b in itertools.combinations(range(len(TISSUES)), 2))
    assert smallest > 20  # CIEDE2000: ~2 is just noticeable, 20 clearly different hues


def test_sagittal_view_puts_anterior_left_and_superior_up_for_any_axis_order():
    # An axial acquisition in LPS: i = L (x), j = P (y), k = S (z); array[k, j, i].
    shape_kji = (6, 7, 8)
    array = np.zeros(shape_kji, np.uint8)
    array[5, 0, 3] = 1  # most superior slice, most anterior row, i = 3
    grid = Volume(array, (0.5, 0.6, 2.0))
    view = SagittalView(grid)
    assert view.axis == 2 and view.count == 8 and view.pixel_mm == (2.0, 0.6)
    plane = view(array, 3)
    assert plane.shape == (6, 7)
    assert plane[0, 0] == 1  # superior-anterior voxel at the top left


def _synthetic_run(tmp_path: Path) -> tuple:
    rng = np.random.default_rng(0)
    labels = np.zeros((20, 40, 40), np.uint8)  # sagittal: k = L-R
    labels[:, 5:20, 5:35] = BY_KEY["femur"].label
    labels[:, 20:22, 5:35] = BY_KEY["femoral_cartilage"].label
    labels[:, 24:38, 5:35] = BY_KEY["tibia"].label
    direction = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)  # i = P, j = I, k = L
    grid = Volume(labels, (0.5, 0.5, 3.0), direction=direction)
    image = grid.with_array((rng.normal(100, 10, labels.shape) + 50 * (labels > 0)).astype(np.float32))
    t2 = np.where(labels == 1, 40.0, 0.0).astype(np.float32)
    t2[:, 20, 5:10] = 0.0  # not fitted
    results = Results("segment")
    results["inputs"] = [{"role": "scan", "path": "/data/knee_0042.nii.gz", "sha256": "0"}]
    results["model"] = {"id": "test-model", "version": "2.0"}
    results["volumes_mm3"] = {"femoral_cartilage": 1800.0, "femur": 67500.0, "tibia": 63000.0}
    results["uncertainty"] = {"per_structure": {"femoral_cartilage": 0.2, "femur": 0.05, "tibia": 0.04}}
    regions = [
        {"name": f"femoral_region_{n:02d}", "voxels": 10 + n, "thickness_mean_mm": 2.0, "t2_mean_ms": 40.0}
        for n in range(22)
    ]
    results["t2"] = {
        "cartilage": {
            "geometry": {"knee_side": "left"},
            "regions": regions,
            "plates": [
                {
                    "name": "femoral_cartilage",
                    "voxels": 1200,
                    "thickness_mean_mm": 1.0,
                    "t2_mean_ms": 40.0,
                    "t2_median_ms": 40.0,
                }
            ],
        }
    }
    maps = {"uncertainty": rng.uniform(0, 1, labels.shape).astype(np.float32)}
    from PIL import Image

    for name in ("projection_thickness.png", "projection_t2.png"):  # as the T2 stage writes them
        Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(tmp_path / name)
    return tmp_path, image, grid, maps, results, grid.with_array(t2)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out, image, grid, maps, results, t2 = _synthetic_run(tmp_path_factory.mktemp("report"))
    write_report(out, image, grid, maps, results, t2=t2)
    return out


def test_report_png_is_laptop_sized_and_titled(report):
    from PIL import Image

    with Image.open(report / "report.png") as picture:
        assert picture.size == (1600, 1000)
        pixels = np.asarray(picture.convert("RGB"), float)
    # No empty quarter: each quadrant holds drawn content (not only the white background).
    h, w = pixels.shape[0] // 2, pixels.shape[1] // 2
    for quadrant in (pixels[:h, :w], pixels[:h, w:], pixels[h:, :w], pixels[h:, w:]):
        assert (quadrant.min(axis=2) < 200).mean() > 0.02


def test_report_html_is_standalone_with_every_region_row(report):
    page = (report / "report.html").read_text()
    assert "knee_0042.nii.gz" in page and "left knee" in page and "test-model 2.0" in page
    assert len(re.findall(r"femoral_region_\d\d", page)) == 22  # every region row, not the first 16
    assert not re.search(r"(src|href)=['\"](?!data:)", page)  # nothing outside the page
    assert page.count("src='data:image/png;base64,") >= 1
    assert "Femoral cartilage" in page and "1.80" in page  # volume in mL


def test_region_rows_list_plates_then_regions(tmp_path):
    *_, results, _ = _synthetic_run(tmp_path)
    rows = region_rows(results)
    assert len(rows) == 23 and rows[0][:3] == ["femoral_cartilage", "1200", "1.00"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_html_renders_in_headless_chromium(report, tmp_path):
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    page = (report / "report.html").resolve().as_uri()
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for name in ("Femoral cartilage", "Femur", "Tibia", "femoral_region_21"):
        assert name in dom.stdout
    # Images decoded: a script in the page would be needed for naturalWidth; instead the
    # screenshot must show the embedded report picture's colours (not a broken-image icon).
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1400,1000", page],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as picture:
        pixels = np.asarray(picture.convert("RGB"), int)
    tibia = np.array([int(round(255 * c)) for c in BY_KEY["tibia"].color])
    assert (np.abs(pixels - tibia).sum(axis=2) < 30).sum() > 100  # legend swatch and outlines drawn
