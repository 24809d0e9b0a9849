"""Random-contrast training images synthesised from real knee label maps (SynthSeg-style).

No public knee scan with cartilage and meniscus labels can be used here, so a model learns knee
*shape* from real anatomy (label maps) and sees a new, random scanner contrast in every sample:
MESE echoes, DESS, proton density with and without fat saturation, T1, low-field gradient echo,
and fully random intensities. Around the labelled structures, the unlabelled background is split
into air, a body of random pseudo-tissues (muscle/fat/vessel-like blobs) and a subcutaneous fat
shell, so a network cannot learn "anything that is not flat is bone".

All sampling happens in one *canonical box frame*: array axes ``(d, h, w)`` = (left-right,
superior-inferior, anterior-posterior), i.e. sagittal slices along ``d``, with spacing
``(slice_mm, pixel_mm, pixel_mm)``. Inference reorients every scan to the same frame
(:func:`KneeSegLogic.inference.working_grid`), so training and inference agree on orientation.

Anatomy augmentation (per sample, :class:`AnatomySettings`): each bone moves with what it carries
(femur + femoral cartilage; tibia + tibial cartilage, menisci, fibula; patella + patellar cartilage)
by its own similarity transform and smooth deformation within anatomical limits: patella size
0.75-1.4x about its articular surface, patellar height (superior-inferior shift) and tilt, condyle
width (femur scaled along left-right), tibial slope (tibia rotated about left-right about its
plateau) and joint space (femur shifted superior-inferior). Each bone group is sampled through its
own grid and the groups are painted tibia, femur, patella, each only where no earlier group is, so
bones never overlap.

Augmentations (per sample): random rotation, scaling, elastic deformation, left/right mirror
(left knees), field-of-view crops, per-tissue intensities, texture, smooth bias field, gamma,
Gaussian blur, Gaussian or Rician noise, thick slices along a random axis (2D acquisitions in
sagittal, coronal or axial orientation, e.g. 3-4 mm MESE slices), and echo choice for MESE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from KneeSegLogic.io.volume import Volume, reorient
from KneeSegLogic.segmentation.normalisation import (
    CANONICAL_ORIENTATION,
    normalise_intensity,
)
from KneeSegLogic.tissues import TISSUES, tissues_in_group
from KneeSegLogic.training.phantom import TISSUE_PROPERTIES

# Tissue groups that share an intensity in realistic contrasts.
GROUPS = ("cartilage", "marrow", "cortex", "meniscus", "fluid", "muscle", "fat")

#: Relative intensities (cartilage, marrow, cortex, meniscus, fluid, muscle, fat) of the
#: contrasts knee MRI users acquire; each sample jitters them.
CONTRASTS: dict[str, tuple[float, ...]] = {
    "pd_fatsat": (0.50, 0.15, 0.02, 0.06, 0.95, 0.30, 0.10),
    "pd": (0.55, 0.85, 0.02, 0.08, 0.60, 0.35, 0.90),
    "t1": (0.40, 0.90, 0.02, 0.05, 0.20, 0.35, 0.95),
    "dess_we": (0.70, 0.12, 0.02, 0.05, 1.00, 0.30, 0.10),
    "mese_echo2": (0.55, 0.75, 0.02, 0.10, 0.80, 0.40, 0.80),
    "mese_late_echo": (0.35, 0.55, 0.01, 0.03, 0.90, 0.20, 0.60),
    "lowfield_gre": (0.60, 0.70, 0.05, 0.06, 0.70, 0.35, 0.80),
}

#: Name of the physically derived MESE contrast (echo augmentation), drawn like a preset.
MESE_TRAIN = "mese_train"

MESE_ECHO_PROBABILITIES = (0.2, 0.6, 0.2)

#: (proton density, T2 ms) per group, from the phantom's tissue table (fat: as marrow fat).
MESE_PROPERTIES: dict[str, tuple[float, float]] = {
    group: TISSUE_PROPERTIES[key]
    for group, key in (
        ("cartilage", "femoral_cartilage"),
        ("marrow", "femur"),
        ("cortex", "cortex"),
        ("meniscus", "lateral_meniscus"),
        ("fluid", "fluid"),
        ("muscle", "soft_tissue"),
        ("fat", "femur"),
    )
}

_GROUP_OF_LABEL = {t.label: ("marrow" if t.group == "bone" else t.group) for t in TISSUES}


@dataclass
class Anatomy:
    """A label map in the canonical frame with the distance maps synthesis needs.

    Attributes are torch tensors shaped (1, 1, K, J, I) on the label map's grid (canonical
    orientation); ``spacing`` is (k, j, i) in mm. ``image`` is the real scan of a labelled
    (image, label) pair on the same grid, intensities normalised to about [0, 1]; None for a label
    map alone.
    """

    labels: torch.Tensor
    outside_mm: torch.Tensor
    bone_depth_mm: torch.Tensor
    spacing: np.ndarray
    centre_range: tuple[np.ndarray, np.ndarray]
    image: torch.Tensor | None = None
    pivots_mm: dict[str, np.ndarray] = field(default_factory=dict)
    #: Relative chance of being drawn for a training box (1 for each knee by default).
    draw_weight: float = 1.0

    @classmethod
    def from_volume(cls, labels: Volume) -> Anatomy:
        canonical = reorient(labels, CANONICAL_ORIENTATION)
        array = canonical.array.astype(np.uint8)
        spacing = np.asarray(canonical.spacing_kji)
        structures = array > 0
        outside = ndimage.distance_transform_edt(~structures, sampling=spacing).astype(np.float32)
        bones = np.isin(array, [t.label for t in TISSUES if t.group == "bone"])
        depth = ndimage.distance_transform_edt(bones, sampling=spacing).astype(np.float32)
        coordinates = np.argwhere(structures) * spacing
        low, high = coordinates.min(0), coordinates.max(0)
        margin = 0.15 * (high - low)
        return cls(
            pivots_mm=_pivots(array, spacing),
            labels=torch.from_numpy(array)[None, None].float(),
            outside_mm=torch.from_numpy(outside)[None, None],
            bone_depth_mm=torch.from_numpy(depth)[None, None],
            spacing=spacing,
            centre_range=(low + margin, high - margin),
        )

    @classmethod
    def from_pair(cls, image: Volume, labels: Volume) -> Anatomy:
        """A real scan with its label map (both 3D, on the same grid; KneeSeg label values).

        The image is reoriented exactly as the labels (axis permutations and flips only) and
        normalised with :func:`normalise_intensity`, negative values clipped to 0.
        """
        if image.is_multi_echo or not image.same_grid(labels):
            raise ValueError("the image must be a 3D volume on the label map's grid")
        anatomy = cls.from_volume(labels)
        array = reorient(image, CANONICAL_ORIENTATION).array.astype(np.float32)
        normalised = normalise_intensity(torch.from_numpy(array)).clamp(min=0)
        anatomy.image = normalised[None, None].contiguous()
        return anatomy


def _pivots(array: np.ndarray, spacing: np.ndarray) -> dict[str, np.ndarray]:
    """Per bone group present, the centroid (mm, canonical array frame) of its pivot structure."""
    pivots = {}
    for group, keys in _PIVOTS.items():
        for key in keys:
            mask = array == next(t.label for t in TISSUES if t.key == key)
            if key.startswith("medial_tibial"):  # the plateau: both tibial plates together
                mask = np.isin(array, [t.label for t in TISSUES if "tibial" in t.key])
            if mask.any():
                pivots[group] = np.argwhere(mask).mean(0) * spacing
                break
    return pivots


def _smooth_field(shape: tuple[int, ...], coarse: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-mean, unit-ish random field varying over ``coarse`` control points per axis."""
    field = torch.randn((1, 1, coarse, coarse, coarse), generator=generator)
    return F.interpolate(field, size=shape, mode="trilinear", align_corners=True)[0, 0]


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


#: Bone groups moved together by anatomy augmentation (label values), in painting order: a later
#: group never takes a voxel an earlier one holds.
BONE_GROUPS: dict[str, tuple[int, ...]] = {
    "tibia": tuple(
        t.label for t in TISSUES if t.key in ("tibia", "fibula") or "tibial" in t.key or "meniscus" in t.key
    ),
    "femur": tuple(t.label for t in TISSUES if t.key in ("femur", "femoral_cartilage")),
    "patella": tuple(t.label for t in TISSUES if t.key in ("patella", "patellar_cartilage")),
}

#: The structure a group is scaled and rotated about (its articular surface), then its bone if absent.
_PIVOTS = {
    "tibia": ("medial_tibial_cartilage", "lateral_tibial_cartilage", "tibia"),
    "femur": ("femur",),
    "patella": ("patellar_cartilage", "patella"),
}


@dataclass(frozen=True)
class AnatomySettings:
    """Limits of per-bone anatomy augmentation (lengths in mm, angles in degrees, scales as factors).

    Canonical frame axes: d left-right, h superior-inferior, w anterior-posterior.
    """

    probability: float = 0.8
    patella_scale: tuple[float, float] = (0.75, 1.4)
    patella_height_mm: float = 6.0  # patella alta / baja: shift along superior-inferior
    patella_tilt_deg: float = 10.0  # about the superior-inferior axis
    condyle_width: tuple[float, float] = (0.9, 1.1)  # femur scale along left-right
    tibial_slope_deg: float = 5.0  # about the left-right axis, around the plateau
    joint_space_mm: float = 1.0  # femur shift along superior-inferior
    bone_scale: tuple[float, float] = (0.92, 1.08)  # isotropic, femur and tibia independently
    bone_rotation_deg: float = 3.0
    deformation_mm: float = 1.5  # smooth displacement per group
    # Per cartilage plate and meniscus: the chance it is thinned, and that it is thickened, by one
    # box voxel on its free (articular) side. Knees differ most in soft-tissue thickness, and a
    # model that learned one knee's plates predicts that thickness on every knee.
    soft_tissue_thinning: float = 0.25
    soft_tissue_thickening: float = 0.25
    soft_tissue_max_step_mm: float = 1.2  # only box axes this fine are eroded or dilated along


@dataclass(frozen=True)
class SynthesisSettings:
    """Ranges of the random augmentations (angles in degrees, lengths in mm)."""

    rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    elastic_mm: float = 3.0
    mirror_probability: float = 0.5
    random_contrast_probability: float = 0.35
    thick_slice_probability: float = 0.5
    thick_slice_mm: tuple[float, float] = (2.0, 5.0)
    thick_slice_axis: int | None = None  # None: a random axis (sagittal, axial or coronal acquisition)
    noise_range: tuple[float, float] = (0.005, 0.08)
    blur_px: tuple[float, float] = (0.0, 1.0)
    fov_crop_probability: float = 0.25
    # For anatomies with a real image: the chance a sample shows the scan's own intensities
    # (spatial and acquisition augmentation still apply) rather than a synthetic contrast.
    real_image_probability: float = 0.7
    effusion_probability: float = 0.5
    contrast: str | None = None  # a name in CONTRASTS; None: a random one per sample
    anatomy: AnatomySettings = AnatomySettings()


class Synthesizer:
    """Draws (image, label) boxes in the canonical frame from one or more anatomies.

    Parameters
    ----------
    anatomies : list of Anatomy
        Real label maps to draw shapes from.
    box_shape : (D, H, W)
        Output box size in voxels.
    spacing_mm : (slice, pixel, pixel)
        Output voxel size along (d, h, w).
    """

    def __init__(
        self,
        anatomies: list[Anatomy],
        box_shape: tuple[int, int, int],
        spacing_mm: tuple[float, float, float],
        settings: SynthesisSettings = SynthesisSettings(),
        seed: int = 0,
    ) -> None:
        self.anatomies = anatomies
        weights = np.asarray([a.draw_weight for a in anatomies], dtype=float)
        self.draw_chances = weights / weights.sum()
        self.box_shape = box_shape
        self.spacing = np.asarray(spacing_mm, dtype=float)
        self.settings = settings
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def _sampling_grid(self, anatomy: Anatomy, centre: np.ndarray | None = None) -> torch.Tensor:
        """Where each box voxel samples the anatomy: (D, H, W, 3) mm in the anatomy's array frame."""
        s = self.settings
        shape = np.asarray(self.box_shape)
        axes = [(np.arange(n) - (n - 1) / 2) * sp for n, sp in zip(shape, self.spacing)]
        box_mm = np.stack(np.meshgrid(*axes, indexing="ij"), -1)  # (D, H, W, 3) in box mm
        if self.rng.random() < s.mirror_probability:
            box_mm[..., 0] *= -1  # a left knee: mirror left-right
        rotation = _rotation(np.deg2rad(self.rng.uniform(-s.rotation_deg, s.rotation_deg, 3)))
        scale = np.diag(self.rng.uniform(*s.scale_range, 3))
        if centre is None:
            centre = self.rng.uniform(*anatomy.centre_range)
        source_mm = box_mm @ (rotation @ scale).T + centre
        source = torch.from_numpy(source_mm).float()
        if s.elastic_mm > 0:
            source = source + self._displacement(float(self.rng.uniform(0, s.elastic_mm)))
        return source

    def _displacement(self, amplitude_mm: float) -> torch.Tensor:
        """A smooth random displacement field (D, H, W, 3) of about ``amplitude_mm``."""
        shape = tuple(self.box_shape)
        return torch.stack([_smooth_field(shape, 5, self.generator) for _ in range(3)], -1) * amplitude_mm

    def bone_transforms(self, anatomy: Anatomy) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """One random similarity per bone group present: ``(matrix, translation_mm)`` taking an original
        point ``x`` (mm, canonical array frame) to ``matrix @ (x - pivot) + pivot + translation``."""
        a = self.settings.anatomy
        rng = self.rng

        def small_rotation() -> np.ndarray:
            return _rotation(np.deg2rad(rng.uniform(-a.bone_rotation_deg, a.bone_rotation_deg, 3)))

        transforms = {}
        for group in anatomy.pivots_mm:
            translation = np.zeros(3)
            if group == "patella":
                tilt = np.deg2rad(rng.uniform(-a.patella_tilt_deg, a.patella_tilt_deg))
                matrix = rng.uniform(*a.patella_scale) * _rotation(np.array([0.0, tilt, 0.0]))
                translation[1] = rng.uniform(-a.patella_height_mm, a.patella_height_mm)
            elif group == "femur":
                width = np.diag([rng.uniform(*a.condyle_width), 1.0, 1.0])
                matrix = rng.uniform(*a.bone_scale) * small_rotation() @ width
                translation[1] = rng.uniform(-a.joint_space_mm, a.joint_space_mm)
            else:
                slope = np.deg2rad(rng.uniform(-a.tibial_slope_deg, a.tibial_slope_deg))
                matrix = rng.uniform(*a.bone_scale) * _rotation(np.array([slope, 0.0, 0.0])) @ small_rotation()
            transforms[group] = (matrix, translation)
        return transforms

    def _augment_anatomy(
        self, anatomy: Anatomy, source: torch.Tensor, padding: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels and bone depth of the box with every bone group moved by its own transform.

        Each group is sampled through the inverse of its transform plus its own smooth deformation;
        groups are painted in :data:`BONE_GROUPS` order, each only on voxels no earlier group holds.
        """
        a = self.settings.anatomy
        labels = torch.zeros(source.shape[:3], dtype=torch.long)
        depth = torch.zeros(source.shape[:3])
        transforms = self.bone_transforms(anatomy)
        for group, values in BONE_GROUPS.items():
            if group not in transforms:
                continue
            matrix, translation = transforms[group]
            pivot = anatomy.pivots_mm[group]
            inverse = torch.from_numpy(np.linalg.inv(matrix)).float()
            offset = torch.from_numpy(pivot + translation).float()
            moved = (source - offset) @ inverse.T + torch.from_numpy(pivot).float()
            if a.deformation_mm > 0:
                moved = moved + self._displacement(float(self.rng.uniform(0, a.deformation_mm)))
            grid = _normalised(anatomy, moved)
            group_labels = _sample(anatomy.labels, grid, "nearest", padding).long()
            group_depth = _sample(anatomy.bone_depth_mm, grid, "bilinear", padding)
            take = torch.isin(group_labels, torch.as_tensor(values)) & (labels == 0)
            labels[take] = group_labels[take]
            depth[take] = group_depth[take]
        return labels, depth

    def _intensities(self) -> dict[str, float]:
        if self.rng.random() < self.settings.random_contrast_probability:
            return {g: float(self.rng.uniform(0, 1)) for g in GROUPS}
        names = [*CONTRASTS, MESE_TRAIN]
        name = self.settings.contrast or names[self.rng.integers(len(names))]
        base = self._mese_echo() if name == MESE_TRAIN else np.asarray(CONTRASTS[name])
        jittered = np.clip(base * self.rng.uniform(0.75, 1.25, base.size) + self.rng.normal(0, 0.03, base.size), 0, 1)
        return dict(zip(GROUPS, jittered))

    def _mese_echo(self) -> np.ndarray:
        """Group intensities of one echo of a MESE train, from proton density and T2.

        Thomas et al.'s echo augmentation: echo 1, 2 or 3 with probabilities 20/60/20 %, at a
        random echo spacing of 8-12 ms, so a model reading echo 2 tolerates its neighbours.
        """
        echo = 1 + int(self.rng.choice(3, p=MESE_ECHO_PROBABILITIES))
        echo_time = echo * self.rng.uniform(8.0, 12.0)
        properties = np.asarray([MESE_PROPERTIES[group] for group in GROUPS])
        signal = properties[:, 0] * np.exp(-echo_time / properties[:, 1])
        return signal / signal.max()

    def draw(self) -> int:
        """Index of the anatomy the next box shows, drawn by :attr:`Anatomy.draw_weight`."""
        return int(self.rng.choice(len(self.draw_chances), p=self.draw_chances))

    def sample(self, centre: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One (image, labels) box: float32 image normalised to about [0, 1], int64 labels.

        ``centre`` (mm, in the anatomy's canonical array frame) fixes where the box is centred;
        by default it is drawn within the anatomy's ``centre_range``.
        """
        s = self.settings
        anatomy = self.anatomies[self.draw()]
        source = self._sampling_grid(anatomy, centre)
        grid = _normalised(anatomy, source)
        # A label map alone is extended beyond its field of view by repeating its border: the
        # femoral and tibial shafts it cuts run on to the box edge, as they do in real scans
        # (a blank band where bone stops abruptly taught over-long bones on real images).
        # A real scan cannot be extended, so its pairs keep the blank band instead.
        padding = "border" if anatomy.image is None else "zeros"
        outside = _sample(anatomy.outside_mm, grid, "bilinear", "border")
        # Anatomy augmentation moves bones against each other, which a real scan's image cannot follow.
        vacated = None
        if anatomy.image is None and anatomy.pivots_mm and self.rng.random() < s.anatomy.probability:
            labels, depth = self._augment_anatomy(anatomy, source, padding)
            labels, vacated = self._soft_tissue_thickness(labels)
        else:
            labels = _sample(anatomy.labels, grid, "nearest", padding).long()
            depth = _sample(anatomy.bone_depth_mm, grid, "bilinear", padding)
        shape = tuple(labels.shape)
        if anatomy.image is not None and self.rng.random() < s.real_image_probability:
            # A real scan: its own intensities, moved by the same grid as its labels.
            image = F.grid_sample(anatomy.image, grid, mode="bilinear", align_corners=True)[0, 0]
        else:
            image = self._synthetic_image(labels, outside, depth, vacated)
        if anatomy.image is not None:
            # Beyond a real scan's field of view nothing is known: zero signal, background label.
            outside_fov = (grid.abs() > 1).any(-1)[0]
            image[outside_fov] = 0
            labels[outside_fov] = 0
        image = self._acquisition(image, (shape[0], shape[1], shape[2]))
        if self.rng.random() < s.fov_crop_probability:
            image, labels = self._fov_crop(image, labels)
        return image.float(), labels

    def _soft_tissue_thickness(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each cartilage plate and meniscus thinned or thickened by one voxel on its free side
        (:class:`AnatomySettings`); returns the labels and the voxels a thinning vacated.

        Thinning removes the structure's voxels that touch (face neighbours along the box axes no
        coarser than ``soft_tissue_max_step_mm``) a voxel neither of the structure nor of bone, so
        the bone side stays; the vacated voxels become background and are shown as joint fluid.
        Thickening adds background voxels touching the structure along those axes.
        """
        a = self.settings.anatomy
        axes = [axis for axis, step in enumerate(self.spacing) if step <= a.soft_tissue_max_step_mm]
        vacated = torch.zeros(labels.shape, dtype=torch.bool)
        if not axes:
            return labels, vacated
        bone = torch.isin(labels, torch.as_tensor(_BONE_LABELS))
        for value in _SOFT_LABELS:
            draw = self.rng.random()
            if draw >= a.soft_tissue_thinning + a.soft_tissue_thickening:
                continue
            mask = labels == value
            if not mask.any():
                continue
            if draw < a.soft_tissue_thinning:
                free = ~mask & ~bone
                edge = mask & _touches(free, axes)
                labels[edge] = 0
                vacated |= edge
            else:
                grow = (labels == 0) & _touches(mask, axes)
                labels[grow] = value
                vacated &= ~grow
        return labels, vacated

    def _synthetic_image(
        self, labels: torch.Tensor, outside: torch.Tensor, depth: torch.Tensor, vacated: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Random tissue intensities for a box of labels, with background and texture.

        ``outside`` is the distance (mm) from the labelled structures, ``depth`` the depth (mm)
        inside bone, both sampled on the box; ``vacated`` voxels (soft tissue thinned away) are
        joint fluid.
        """
        shape = tuple(labels.shape)
        values = self._intensities()
        image = torch.zeros(shape)
        # Background: body of pseudo-tissues, subcutaneous fat shell, air outside.
        body_radius = self.rng.uniform(15, 45)
        edge = body_radius + 6 * _smooth_field(shape, 4, self.generator)
        body = outside < edge
        pseudo = _smooth_field(shape, int(self.rng.integers(4, 9)), self.generator)
        thresholds = np.sort(self.rng.uniform(-1, 1, int(self.rng.integers(1, 4))))
        classes = torch.bucketize(pseudo, torch.as_tensor(thresholds, dtype=torch.float32))
        palette = [values["muscle"], values["fat"], values["fluid"] * 0.8, float(self.rng.uniform(0, 1))]
        palette_tensor = torch.as_tensor(
            [palette[i % len(palette)] for i in range(len(thresholds) + 1)], dtype=torch.float32
        )
        image[body] = palette_tensor[classes[body]]
        fat_shell = body & (outside > edge - self.rng.uniform(2, 10))
        image[fat_shell] = values["fat"]
        # Joint fluid: a thin film next to cartilage and menisci inside the body, and sometimes
        # an effusion or bursa: fluid pockets around the joint (bright on fluid-sensitive scans,
        # where they set the upper percentile of the normalisation).
        film = joint_fluid_film(labels, self.spacing, float(self.rng.uniform(0.3, 1.5))) & body
        image[film] = values["fluid"]
        if vacated is not None:
            image[vacated] = values["fluid"]
        if self.rng.random() < self.settings.effusion_probability:
            pockets = _smooth_field(shape, int(self.rng.integers(3, 7)), self.generator) > self.rng.uniform(0.0, 0.8)
            effusion = pockets & body & (outside > 0) & (outside < self.rng.uniform(3, 15))
            image[effusion] = values["fluid"]
        for tissue in TISSUES:
            mask = labels == tissue.label
            if mask.any():
                image[mask] = values[_GROUP_OF_LABEL[tissue.label]] * float(self.rng.uniform(0.9, 1.1))
        # Marrow is not uniform (red/yellow marrow, oedema-like patches). Only on bone labels:
        # depth is sampled bilinearly, so it is above 0 up to a voxel beyond the bone (on the
        # background or the cartilage there), which would put cortex where the labels say not bone.
        marrow = (depth > 0) & torch.isin(labels, torch.as_tensor(_BONE_LABELS, dtype=labels.dtype))
        patches = 1 + float(self.rng.uniform(0, 0.35)) * _smooth_field(shape, 8, self.generator)
        image[marrow] = image[marrow] * patches[marrow]
        cortex = marrow & (depth < self.rng.uniform(0.6, 1.8))
        image[cortex] = values["cortex"]
        # Texture within tissues (trabecular bone, muscle fibres): multiplicative fine noise.
        texture = 1 + float(self.rng.uniform(0, 0.15)) * _smooth_field(shape, 24, self.generator)
        image = image * texture
        return image

    def _acquisition(self, image: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        s = self.settings
        bias = torch.exp(float(self.rng.uniform(0, 0.5)) * _smooth_field(shape, 3, self.generator))
        image = image * bias
        sigma = float(self.rng.uniform(*s.blur_px))
        if sigma > 0.1:
            image = torch.from_numpy(ndimage.gaussian_filter(image.numpy(), sigma))
        if self.rng.random() < s.thick_slice_probability:
            axis = int(self.rng.integers(3)) if s.thick_slice_axis is None else s.thick_slice_axis
            factor = float(self.rng.uniform(*s.thick_slice_mm)) / self.spacing[axis]
            if factor > 1.2:
                image = _thick_slices(image, axis, factor)
        noise = float(self.rng.uniform(*s.noise_range)) * float(image.max().clamp(min=1e-3))
        real = image + noise * torch.randn(shape, generator=self.generator)
        if self.rng.random() < 0.5:  # Rician magnitude (single coil)
            image = torch.sqrt(real**2 + (noise * torch.randn(shape, generator=self.generator)) ** 2)
        else:
            image = real.clamp(min=0)
        gamma = float(np.exp(self.rng.normal(0, 0.25)))
        image = (image / image.max().clamp(min=1e-6)) ** gamma
        return normalise_intensity(image)

    def _fov_crop(self, image: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Blank a random border strip: scans often cut the knee at the field of view."""
        axis = int(self.rng.integers(1, 3))
        n = image.shape[axis]
        cut = int(self.rng.uniform(0.1, 0.35) * n)
        index = [slice(None)] * 3
        index[axis] = slice(0, cut) if self.rng.random() < 0.5 else slice(n - cut, n)
        image, labels = image.clone(), labels.clone()
        image[tuple(index)] = 0
        labels[tuple(index)] = 0
        return image, labels


_BONE_LABELS = [t.label for t in tissues_in_group("bone")]
#: Cartilage and menisci: what synovial fluid lies against.
_SOFT_LABELS = [t.label for group in ("cartilage", "meniscus") for t in tissues_in_group(group)]


def _touches(mask: torch.Tensor, axes: list[int]) -> torch.Tensor:
    """Voxels with a face neighbour in ``mask`` along any of ``axes`` (outside the box: not in it)."""
    found = torch.zeros_like(mask)
    for axis in axes:
        n = mask.shape[axis]
        found.narrow(axis, 1, n - 1).logical_or_(mask.narrow(axis, 0, n - 1))
        found.narrow(axis, 0, n - 1).logical_or_(mask.narrow(axis, 1, n - 1))
    return found


def _normalised(anatomy: Anatomy, source_mm: torch.Tensor) -> torch.Tensor:
    """Sampling positions (mm, array frame) as the (1, D, H, W, 3) grid ``grid_sample`` takes."""
    size_mm = (np.asarray(anatomy.labels.shape[2:]) - 1) * anatomy.spacing
    normalised = 2 * source_mm / torch.from_numpy(size_mm).float() - 1
    return normalised.flip(-1)[None]  # grid_sample wants (x, y, z) = (i, j, k)


def _sample(volume: torch.Tensor, grid: torch.Tensor, mode: str, padding: str) -> torch.Tensor:
    """One (1, 1, K, J, I) tensor sampled on a normalised grid: the (D, H, W) box."""
    return F.grid_sample(volume, grid, mode=mode, align_corners=True, padding_mode=padding)[0, 0]


def joint_fluid_film(labels: torch.Tensor, spacing_mm: np.ndarray, thickness_mm: float) -> torch.Tensor:
    """Unlabelled voxels within ``thickness_mm`` of cartilage or a meniscus: the joint's fluid film.

    Only the joint space: a film around every labelled structure (as training images had until
    1.3.0) wrapped the bone shafts in fluid, bright in most contrasts, so a model learned that
    bone ends where fluid begins; against muscle-dark surroundings it then put the femoral and
    tibial boundaries about a voxel (0.34 mm median) inside the cortex (``boundary_bias.py``).
    ``labels`` (d, h, w) on a grid of ``spacing_mm`` per array axis.
    """
    surface = torch.isin(labels, torch.as_tensor(_SOFT_LABELS, dtype=labels.dtype)).numpy()
    if not surface.any():
        return torch.zeros(labels.shape, dtype=torch.bool)
    distance = ndimage.distance_transform_edt(~surface, sampling=spacing_mm)
    return torch.from_numpy(distance <= thickness_mm) & (labels == 0)


def _thick_slices(image: torch.Tensor, axis: int, factor: float) -> torch.Tensor:
    """Simulate a 2D acquisition with slices ``factor`` voxels thick along ``axis``."""
    moved = image.movedim(axis, 0)[None, None]
    size = moved.shape[2:]
    coarse = max(2, int(round(size[0] / factor)))
    low = F.interpolate(moved, size=(coarse, *size[1:]), mode="area")
    back = F.interpolate(low, size=size, mode="trilinear", align_corners=False)
    return back[0, 0].movedim(0, axis)
