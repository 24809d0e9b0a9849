"""The anatomy bank (mesh voxelisation, similarity ICP, grown cartilage, composed knees) and per-bone
anatomy augmentation, with numbers against known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import vtk
from conftest import SAMPLE_DATA, rotation, shared_data
from scipy import ndimage

from KneeSegLogic.io.scans import read_volume
from KneeSegLogic.io.volume import Volume, resample_to_spacing
from KneeSegLogic.tissues import tissue
from KneeSegLogic.training import anatomy as bank
from KneeSegLogic.training.synthesis import Anatomy, AnatomySettings, SynthesisSettings, Synthesizer

torch.set_num_threads(1)

PATELLA, FEMUR = tissue("patella").label, tissue("femur").label

TEST_ICP = bank.IcpSettings(coarse_points=200, coarse_iterations=20, fine_points=3000, tolerance_mm=1e-4)


def sphere(radius: float, centre=(0.0, 0.0, 0.0)) -> vtk.vtkPolyData:
    source = vtk.vtkSphereSource()
    source.SetRadius(radius)
    source.SetCenter(*centre)
    source.SetThetaResolution(120)
    source.SetPhiResolution(120)
    source.Update()
    return source.GetOutput()


def oblique_grid(shape=(60, 60, 60), spacing=(0.8, 0.7, 0.9)) -> Volume:
    direction = rotation((1.0, 2.0, 0.5), 30.0)
    origin = -direction @ (np.asarray(shape[::-1]) * np.asarray(spacing) / 2)
    return Volume(np.zeros(shape, np.uint8), spacing, origin, direction)


def test_voxelised_sphere_has_the_sphere_volume_on_an_oblique_grid():
    grid = oblique_grid()
    mask = bank.voxelise(sphere(15.0), grid)
    assert bank.open_edge_count(sphere(15.0)) == 0
    volume = mask.sum() * grid.voxel_volume_mm3
    assert volume == pytest.approx(4 / 3 * np.pi * 15.0**3, rel=0.02)


def test_cartilage_grown_along_normals_has_the_shell_volume():
    grid = oblique_grid()
    bone = sphere(15.0)
    cartilage = bank.grown_cartilage(bone, np.full(bone.GetNumberOfPoints(), 2.5), grid)
    volume = cartilage.sum() * grid.voxel_volume_mm3
    assert volume == pytest.approx(4 / 3 * np.pi * (17.5**3 - 15.0**3), rel=0.05)


def test_icp_recovers_a_known_similarity_from_a_real_patella():
    labels = read_volume(SAMPLE_DATA / "knee_labels.nrrd")
    points = bank.surface_points(labels.array == PATELLA, labels, limit=4000)
    truth = bank.Similarity(1.15 * rotation((0.3, 1.0, -0.4), 50.0), np.array([12.0, -30.0, 5.0]))
    rng = np.random.default_rng(1)
    target = truth.apply(points[rng.permutation(len(points))[:3000]])
    # Fewer coarse points and iterations than the bank uses (the coarse stage only picks the start)
    # and a 1e-4 mm convergence tolerance: the same answer, about 3x faster.
    result = bank.register_surfaces(points, target, settings=TEST_ICP)
    assert result.transform.scale == pytest.approx(1.15, abs=0.01)
    assert not result.transform.mirrored
    moved = result.transform.apply(points)
    assert np.sqrt(np.mean(np.sum((moved - truth.apply(points)) ** 2, axis=1))) < 0.3


def test_composed_knees_from_the_shared_anatomy():
    anatomy = shared_data("anatomy")
    composer = bank.Composer(read_volume(SAMPLE_DATA / "knee_labels.nrrd"), spacing_mm=1.5, icp=TEST_ICP)
    femur_knee = bank.femur_on_host(composer, anatomy, 2)
    record = femur_knee.record()
    assert record["registrations"]["femur"]["rms_mm"] < 2.0
    assert record["licences"] == ["MIT"]
    # Femoral cartilage grown from the thickness array: a few cm^3, like the host knee's 11.9 cm^3.
    assert 5000 < record["volumes_mm3"]["femoral_cartilage"] < 20000
    assert record["collisions_mm3"]["femur"] < 100
    jam = bank.jam_on_host(composer, anatomy).record()
    assert set(jam["licences"]) == {"MIT", "Apache-2.0"}
    for key in ("lateral_meniscus", "medial_meniscus", "medial_tibial_cartilage", "lateral_tibial_cartilage"):
        assert jam["volumes_mm3"][key] > 400
    clinical = bank.clinical_knee(anatomy)
    counts = np.bincount(clinical.labels.array.ravel(), minlength=8)
    assert (counts[FEMUR], counts[PATELLA], counts[tissue("tibia").label]) == (167620, 18506, 118635)
    assert clinical.role == "heldout"


@pytest.fixture(scope="module")
def knee_anatomy() -> Anatomy:
    """The bundled knee at 1 mm, cropped to its labelled structures plus 4 mm (a third fewer voxels)."""
    volume = resample_to_spacing(read_volume(SAMPLE_DATA / "knee_labels.nrrd"), (1.0,) * 3, True)
    box = tuple(slice(max(int(a.min()) - 4, 0), int(a.max()) + 5) for a in np.nonzero(volume.array))
    origin = np.asarray(volume.origin) + volume.direction @ (np.array([b.start for b in box[::-1]]) * 1.0)
    return Anatomy.from_volume(Volume(volume.array[box], volume.spacing, tuple(origin), volume.direction))


def _whole_knee(anatomy: Anatomy, settings: AnatomySettings, seed: int = 0) -> torch.Tensor:
    plain = SynthesisSettings(
        rotation_deg=0.0,
        scale_range=(1.0, 1.0),
        elastic_mm=0.0,
        mirror_probability=0.0,
        fov_crop_probability=0.0,
        anatomy=settings,
    )
    shape = tuple(int(n) | 1 for n in anatomy.labels.shape[2:])
    synthesizer = Synthesizer([anatomy], shape, (1.0, 1.0, 1.0), plain, seed=seed)
    centre = (np.asarray(anatomy.labels.shape[2:]) - 1) / 2 * anatomy.spacing
    return synthesizer.sample(centre=centre)[1]


FIXED = dict(
    probability=1.0,
    patella_height_mm=0.0,
    patella_tilt_deg=0.0,
    condyle_width=(1.0, 1.0),
    tibial_slope_deg=0.0,
    joint_space_mm=0.0,
    bone_scale=(1.0, 1.0),
    bone_rotation_deg=0.0,
    deformation_mm=0.0,
)


@pytest.fixture(scope="module")
def unchanged_knee(knee_anatomy) -> torch.Tensor:
    return _whole_knee(knee_anatomy, AnatomySettings(probability=0.0))


@pytest.mark.parametrize("scale", [0.75, 1.4])
def test_patella_scaled_to_its_limits_has_the_cubed_volume_and_never_takes_the_femur(
    knee_anatomy, unchanged_knee, scale
):
    original = unchanged_knee
    scaled = _whole_knee(knee_anatomy, AnatomySettings(patella_scale=(scale, scale), **FIXED))
    ratio = float((scaled == PATELLA).sum()) / float((original == PATELLA).sum())
    assert ratio == pytest.approx(scale**3, rel=0.08)
    # The femur is painted before the patella: growing the patella never removes femur voxels.
    assert int((scaled == FEMUR).sum()) == int((original == FEMUR).sum())


def test_random_bone_transforms_stay_within_the_anatomical_limits(knee_anatomy):
    limits = AnatomySettings()
    synthesizer = Synthesizer([knee_anatomy], (9, 9, 9), (1.0, 1.0, 1.0), seed=5)
    for _ in range(50):
        transforms = synthesizer.bone_transforms(knee_anatomy)
        assert set(transforms) == {"femur", "tibia", "patella"}
        matrix, translation = transforms["patella"]
        size = abs(np.linalg.det(matrix)) ** (1 / 3)
        assert limits.patella_scale[0] - 1e-9 <= size <= limits.patella_scale[1] + 1e-9
        assert abs(translation[1]) <= limits.patella_height_mm and translation[[0, 2]].tolist() == [0, 0]
        femur, femur_shift = transforms["femur"]
        assert abs(femur_shift[1]) <= limits.joint_space_mm
        # Condyle width x isotropic scale bounds the femur's left-right stretch.
        stretch = np.linalg.norm(femur[:, 0])
        assert limits.condyle_width[0] * limits.bone_scale[0] - 1e-9 <= stretch
        assert stretch <= limits.condyle_width[1] * limits.bone_scale[1] + 1e-9


def _subject_file(composer: bank.Composer, folder) -> tuple:
    """A shape-model subject file made of the host's own bones (the patella thickened), each moved
    by its own known similarity (a rotation about the long axis z, a scale and a shift):
    registering them back must give the host knee."""
    from KneeSegLogic.quantification.surfaces import extract_surface

    grid = composer.grid
    arrays = {}
    moves = {"femur": (1.1, 25.0, (40.0, -10.0, 300.0)), "tibia": (0.9, -30.0, (-20.0, 15.0, -200.0))}
    moves["patella"] = (1.2, 60.0, (5.0, 50.0, 120.0))
    for key in bank.SHAPE_MODEL_BONES:
        mask = composer.host == tissue(key).label
        if key == "patella":
            # Another shape (3 mm thicker all round): no similarity fits it into the host's patella,
            # so the registered bone reaches into the patellar cartilage somewhere.
            mask = ndimage.binary_dilation(mask, iterations=2)
        points, triangles = extract_surface(mask, grid.index_to_physical())
        scale, angle, shift = moves["tibia" if key == "fibula" else key]
        move = bank.Similarity(scale * rotation((0.0, 0.0, 1.0), angle), np.asarray(shift))
        arrays[f"{key}_points"], arrays[f"{key}_triangles"] = move.apply(points), triangles
    path = folder / "llp26_subject07.npz"
    np.savez(path, **arrays)
    return path


def test_shape_model_knee_registers_each_bone_back_onto_the_host(tmp_path):
    composer = bank.Composer(read_volume(SAMPLE_DATA / "knee_labels.nrrd"), spacing_mm=1.5, icp=TEST_ICP)
    knee = bank.shape_model_knee(composer, _subject_file(composer, tmp_path))
    record = knee.record()
    assert knee.name == "llp26_subject07" and knee.role == "train"
    assert record["licences"] == ["MIT", "MPL-2.0"]
    # Each bone's own similarity undone: scales 1/1.1, 1/0.9, 1/1.2.
    for key, scale in (("femur", 1 / 1.1), ("tibia", 1 / 0.9)):
        assert record["registrations"][key]["scale"] == pytest.approx(scale, rel=0.01)
        # Point to nearest point between two random samples of 1.5 mm meshes of one surface.
        assert record["registrations"][key]["rms_mm"] < 1.5
    # Cartilage and menisci are the host's, voxel for voxel, whatever the new bones' size.
    for key in ("femoral_cartilage", "medial_tibial_cartilage", "patellar_cartilage", "lateral_meniscus"):
        value = tissue(key).label
        assert np.array_equal(knee.labels.array == value, composer.host == value), key
    # The label map is the host's again (voxelised surfaces of 1.5 mm voxels: boundary voxels differ).
    for key in ("femur", "tibia", "fibula", "femoral_cartilage", "medial_meniscus"):
        value = tissue(key).label
        a, b = knee.labels.array == value, composer.host == value
        assert 2 * np.count_nonzero(a & b) / (a.sum() + b.sum()) > 0.9, key


def test_gap_under_cartilage_is_filled_with_bone_only_near_the_cartilage():
    spacing = np.array([1.0, 1.0, 1.0])
    host = np.zeros((1, 1, 12), np.uint8)
    host[0, 0, :8] = FEMUR
    host[0, 0, 8:10] = tissue("femoral_cartilage").label
    labels = host.copy()
    labels[0, 0, :8] = 0
    labels[0, 0, :3] = FEMUR  # the new femur is 5 voxels shorter: voxels 3-7 are a gap
    filled = bank.fill_gaps(labels, host, spacing)
    # Within 2 mm of the cartilage (voxels 6 and 7) become bone; 3-5 stay background.
    assert filled == 2
    assert labels[0, 0].tolist() == [FEMUR] * 3 + [0] * 3 + [FEMUR] * 2 + [host[0, 0, 8]] * 2 + [0, 0]


def test_exported_tibia_fibula_mesh_splits_into_its_two_closed_pieces():
    from KneeSegLogic.training.shape_model_export import open_edges, split_pieces

    source = vtk.vtkSphereSource()
    source.SetRadius(5.0)
    source.SetCenter(60.0, 0.0, 0.0)
    source.Update()  # 8 x 8 resolution: fewer points than the big sphere's 120 x 120
    big, small = sphere(20.0), source.GetOutput()
    points_big, triangles_big = bank.points_of(big), bank._triangles(big)
    points_small, triangles_small = bank.points_of(small), bank._triangles(small)
    points = np.concatenate([points_small, points_big])
    triangles = np.concatenate([triangles_small, triangles_big + len(points_small)])
    pieces = split_pieces(points, triangles)
    assert len(pieces) == 2
    assert np.allclose(pieces[0][0], points_big) and np.array_equal(pieces[0][1], triangles_big)
    assert np.allclose(pieces[1][0], points_small)
    assert open_edges(pieces[0][1]) == 0 and open_edges(triangles_big[:-1]) == 3
