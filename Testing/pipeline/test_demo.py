"""``kneeseg demo``: the bundled default model on the bundled sample, as a fresh clone runs it.

No expert labels exist for the sample scan, so the model's output is checked for anatomical
plausibility (every structure found, volumes and cartilage thickness in the ranges of adult
knees, femoral cartilage T2 of a 3 T MESE scan) and for the output contract.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from KneeSegLogic.commands.main import main
from KneeSegLogic.io.scans import read_volume
from KneeSegLogic.io.segfile import read_segmentation
from KneeSegLogic.segmentation.registry import get_package
from KneeSegLogic.tissues import TISSUES

SAMPLE = Path(__file__).resolve().parents[2] / "Resources" / "SampleData" / "mese_t2_knee.nrrd"

# Plausible adult-knee volumes (mm^3) inside a knee MRI field of view: wide on purpose, they
# catch a model that misses or floods a structure, not a few percent of boundary.
VOLUME_RANGES_MM3 = {
    "femur": (60e3, 400e3), "tibia": (40e3, 300e3), "patella": (5e3, 30e3), "fibula": (2e3, 30e3),
    "femoral_cartilage": (5e3, 30e3), "medial_tibial_cartilage": (0.8e3, 6e3),
    "lateral_tibial_cartilage": (0.8e3, 6e3), "patellar_cartilage": (0.8e3, 6e3),
    "medial_meniscus": (1e3, 7e3), "lateral_meniscus": (1e3, 7e3),
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo_out"
    assert main(["demo", "-o", str(out)]) == 0
    return out


def test_demo_uses_the_verified_bundled_default_model(demo: Path) -> None:
    package = get_package(None)
    package.verify()  # every weights file matches its sha256
    assert package.default and package.origin == "bundled" and len(package.members) >= 2
    results = json.loads((demo / "results.json").read_text())
    assert results["model"]["id"] == package.id and results["model"]["sha256"] == package.sha256
    assert results["device"]["type"] == "cpu"


def test_demo_writes_the_whole_output_folder_on_the_input_grid(demo: Path) -> None:
    scan = read_volume(SAMPLE)
    for name in ("segmentation.seg.nrrd", "uncertainty.nrrd", "t2.nrrd", "regions.nrrd", "regions.csv",
                 "report.png", "report.html", "results.json"):
        assert (demo / name).is_file(), name
    for name in ("segmentation.seg.nrrd", "uncertainty.nrrd", "t2.nrrd", "regions.nrrd"):
        volume = read_segmentation(demo / name)[0] if name.endswith(".seg.nrrd") else read_volume(demo / name)
        assert volume.same_grid(scan, atol=1e-6), name
    assert len(list((demo / "surfaces").glob("*.vtp"))) == len(TISSUES)
    assert not list((demo / "surfaces").glob("*.stl"))  # STL only with --stl
    assert (demo / "report.png").stat().st_size > 50_000


def test_demo_finds_every_structure_with_a_plausible_volume(demo: Path) -> None:
    volumes = json.loads((demo / "results.json").read_text())["volumes_mm3"]
    assert set(volumes) == set(VOLUME_RANGES_MM3)
    for key, (low, high) in VOLUME_RANGES_MM3.items():
        assert low < volumes[key] < high, (key, volumes[key])
    labels, _ = read_segmentation(demo / "segmentation.seg.nrrd")
    # Anatomical order along superior-inferior (LPS z): femur above tibia, patella in front of femur.
    to_lps = labels.index_to_physical()
    centre_kji = {t.key: np.argwhere(labels.array == t.label).mean(0) for t in TISSUES}
    position = {key: (to_lps @ np.append(c[::-1], 1.0))[:3] for key, c in centre_kji.items()}
    assert position["femur"][2] > position["tibia"][2]
    assert position["femoral_cartilage"][2] > position["medial_tibial_cartilage"][2]
    assert position["patella"][1] < position["femur"][1]  # anterior is -y in LPS


def test_demo_cartilage_thickness_and_t2_are_those_of_a_knee(demo: Path) -> None:
    rows = {row["name"]: row for row in csv.DictReader((demo / "regions.csv").open()) if row["level"] == "plate"}
    # Adult cartilage: about 1.5-3 mm thick (thinner tibial plates, thicker patella); T2 of
    # femoral cartilage at 3 T with MESE about 30-55 ms.
    for plate in ("femoral_cartilage", "medial_tibial_cartilage", "lateral_tibial_cartilage", "patellar_cartilage"):
        assert 1.0 < float(rows[plate]["thickness_mean_mm"]) < 4.0, (plate, rows[plate]["thickness_mean_mm"])
    assert 30.0 < float(rows["femoral_cartilage"]["t2_median_ms"]) < 60.0
