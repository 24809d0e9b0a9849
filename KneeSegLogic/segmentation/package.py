"""Model packages: the trained networks KneeSeg runs, their contract (model.json) and checksums.

A model package is a folder (or a zip of one) holding ``model.json``, one weights file per
ensemble member (safetensors, or a torch state dict read with ``weights_only=True``) and
``MODEL_CARD.md``. ``model.json`` (format version 1) says everything inference needs::

    {
      "format_version": 1,
      "id": "kneeseg-knee-2p5d", "version": "1.0.0", "description": "...",
      "license": "Apache-2.0",
      "default": true,                               # optional: the package `segment` uses
      "labels": {"1": "femoral_cartilage", "2": "medial_tibial_cartilage", ...},
      "members": [
        {"name": "sagittal-0.6mm",
         "weights": "member0.safetensors", "sha256": "<hex>",
         "architecture": {"name": "monai.UNet", "args": {...}},
         "input": {"kind": "2.5d", "plane": "sagittal", "context_slices": 2,
                   "spacing_mm": [0.6, 0.6], "normalisation": {"name": "quartile"},
                   "echo_index": 1},
         "weight": 1.0}
      ],
      "decision_offsets": [0.0, -0.4, ...],          # optional: one per channel, see below
      "postprocessing": [{"name": "largest_component"}, {"name": "closing", "radius_mm": 2.0}],
      "training": {...}, "metrics": {...}
    }

Labels: the keys are the network's output channels ``1..N`` (channel 0 is background) and the
values are structure keys of :data:`KneeSegLogic.tissues.BY_KEY`; the label map KneeSeg writes
uses the tissue table's label values, so a package may order its channels as it was trained.

Members form an ensemble whose softmax maps are fused by their weighted mean on one grid
(``weight``; for multi-planar fusion these are the plane weights of Luan et al.). Input kinds:
``2d`` (one slice), ``2.5d`` (``2k+1`` adjacent slices as channels, ``k = context_slices``) along
``plane``, with in-plane working spacing ``spacing_mm`` (2 values, mm); ``3d`` (sliding window of
``patch_size`` voxels at ``spacing_mm``, 3 values, mm, in (x, y, z) order). ``echo_index`` is the
0-based echo of a multi-echo scan the member reads (default: the first).

``decision_offsets`` (optional, default all 0) are added to the log of the fused probabilities
before the label decision, one per channel including background (natural-log units; see
:mod:`KneeSegLogic.calibration`, which chooses them on calibration scans).

Every weights file's sha256 is recorded in ``model.json`` and checked before the file is
deserialised: a mismatch is refused. The sha256 of ``model.json`` itself therefore identifies
the whole package (:attr:`ModelPackage.sha256`).

The registry looks, in this order, in the bundled ``Resources/Models/``, in the folders listed in
``KNEESEG_MODELS_PATH`` (``os.pathsep``-separated) and in the user cache
``$KNEESEG_HOME/models`` (``~/.kneeseg/models`` by default). Each place may hold package folders
and package zips; zips are unpacked once into ``$KNEESEG_HOME/unpacked/<sha256 of the zip>``.

Example
-------
>>> package = get_package(None)                       # doctest: +SKIP
>>> network = package.load_member(0, "cpu")           # doctest: +SKIP
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NoReturn

from KneeSegLogic.errors import CancelledError, InputError, KneeSegError, one_line
from KneeSegLogic.io.outputs import atomic_folder, sha256_of, write_json
from KneeSegLogic.resources import kneeseg_home
from KneeSegLogic.segmentation.networks import ARCHITECTURES, build_network, signature
from KneeSegLogic.tissues import BY_KEY

if TYPE_CHECKING:
    import torch

# torch and safetensors are imported where weights are read or written: reading and checking
# model.json (find_packages, `kneeseg models`) does not pay seconds for them.

FORMAT_VERSION = 1

MANIFEST = "model.json"

MODEL_CARD = "MODEL_CARD.md"

INPUT_KINDS = ("2d", "2.5d", "3d")

PLANES = ("sagittal", "coronal", "axial")

# Intensity normalisations and the parameters each accepts (name -> required parameters).
NORMALISATIONS: dict[str, tuple[str, ...]] = {
    "quartile": (),  # Thomas et al.: median 0, quartiles -1/+1, clipped to the 3rd-97th percentiles
    "zscore": (),
    "percentile": ("low", "high"),  # percentiles (0-100) mapped to 0 and 1
}

WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth")

_TOP_KEYS = {
    "format_version",
    "id",
    "version",
    "description",
    "license",
    "default",
    "labels",
    "members",
    "decision_offsets",
    "postprocessing",
    "training",
    "metrics",
}

_MEMBER_KEYS = {"name", "weights", "sha256", "architecture", "input", "weight"}

_INPUT_KEYS = {
    "kind",
    "plane",
    "context_slices",
    "spacing_mm",
    "slice_spacing_mm",
    "patch_size",
    "normalisation",
    "echo_index",
}

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

_VERSION = re.compile(r"(\d+(?:\.\d+)*)(?:[-+][0-9A-Za-z.-]+)?")

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class MemberSpec:
    """One network of a package's ensemble and the input it expects.

    Attributes
    ----------
    name : str
        Member name, e.g. ``sagittal-0.6mm``.
    weights : str
        Weights file, relative to the package folder.
    sha256 : str
        Expected sha256 of the weights file (lower-case hex).
    architecture : str
        A name in :data:`KneeSegLogic.networks.ARCHITECTURES`.
    architecture_args : dict
        Keyword arguments of that architecture.
    kind : str
        ``2d``, ``2.5d`` or ``3d``.
    plane : str or None
        ``sagittal``, ``coronal`` or ``axial`` for 2d/2.5d; None for 3d.
    context_slices : int
        k: a 2.5d member sees 2k+1 adjacent slices as channels (0 for 2d and 3d).
    spacing_mm : tuple of float
        Working spacing in mm: in-plane (2 values) for 2d/2.5d, (x, y, z) for 3d.
    patch_size : tuple of 3 int or None
        Sliding-window patch in voxels (x, y, z) for 3d; None otherwise.
    normalisation : dict
        ``{"name": ...}`` plus its parameters (see :data:`NORMALISATIONS`).
    echo_index : int or None
        0-based echo of a multi-echo input this member reads; None for the first.
    weight : float
        Blending weight of this member's softmax in the ensemble mean (> 0).
    slice_spacing_mm : float or None
        2d/2.5d: spacing in mm the slices are resampled to along the plane's normal (so the 2k+1
        context slices always span the same distance); None keeps the scan's own spacing.
    """

    name: str
    weights: str
    sha256: str
    architecture: str
    architecture_args: dict[str, Any]
    kind: str
    plane: str | None
    context_slices: int
    spacing_mm: tuple[float, ...]
    patch_size: tuple[int, int, int] | None
    normalisation: dict[str, Any]
    echo_index: int | None
    weight: float
    slice_spacing_mm: float | None = None

    @property
    def in_channels(self) -> int:
        """Input channels the network takes: 2k+1 slices for 2.5d, else 1."""
        return 2 * self.context_slices + 1

    @property
    def spatial_dims(self) -> int:
        return 3 if self.kind == "3d" else 2


@dataclass
class ModelPackage:
    """A validated model package.

    Attributes
    ----------
    path : Path
        Folder holding ``model.json`` (for a zip, its unpacked copy in the cache).
    source : Path
        What was loaded: the folder or the zip.
    id, version, description, license : str
        As in ``model.json``.
    labels : dict of int to str
        Output channel (1..N) -> structure key in the tissue table; 0 (background) implied.
    members : list of MemberSpec
        The ensemble, at least one member.
    decision_offsets : list of float
        Per channel (background first), added to the log-probabilities before the argmax.
    postprocessing : list of dict
        Steps ``{"name": ..., parameters}`` applied in order after fusion.
    training, metrics : dict
        Free-form summaries (shown in listings and results).
    default : bool
        Whether ``model.json`` marks this package as the default.
    raw : dict
        ``model.json`` as read.
    origin : str
        Where the registry found it: ``bundled``, ``extra`` (KNEESEG_MODELS_PATH), ``user`` or
        ``path`` (loaded directly).
    """

    path: Path
    source: Path
    id: str
    version: str
    description: str
    license: str
    labels: dict[int, str]
    members: list[MemberSpec]
    decision_offsets: list[float]
    postprocessing: list[dict[str, Any]]
    training: dict[str, Any]
    metrics: dict[str, Any]
    default: bool
    raw: dict[str, Any] = field(repr=False)
    origin: str = "path"

    @property
    def sha256(self) -> str:
        """sha256 of ``model.json``; as it records every weights file's sha256, it names the package."""
        return sha256_of(self.path / MANIFEST)

    @property
    def tissue_labels(self) -> list[int]:
        """Tissue-table label value of each output channel (index 0, background, is 0)."""
        return [0] + [BY_KEY[self.labels[channel]].label for channel in sorted(self.labels)]

    def weights_path(self, index: int) -> Path:
        return self.path / self.members[index].weights

    def verify(self) -> None:
        """Check every member's weights file against its recorded sha256 (raises if one fails)."""
        for index in range(len(self.members)):
            _read_verified(self.weights_path(index), self.members[index].sha256)

    def load_member(self, index: int, device: str | torch.device = "cpu") -> torch.nn.Module:
        """Build member ``index`` with its weights, in eval mode, on ``device``.

        The weights file is read once, its sha256 compared with ``model.json`` and only then
        deserialised (safetensors; ``.pt``/``.pth`` through ``torch.load(weights_only=True)``),
        so a tampered or corrupted file is never parsed.

        Raises
        ------
        KneeSegError
            The file is missing, its sha256 differs (refused), it cannot be read as weights, or
            its tensors do not fit the architecture exactly.
        """
        import safetensors.torch
        import torch

        member = self.members[index]
        path = self.weights_path(index)
        data = _read_verified(path, member.sha256)
        try:
            if path.suffix == ".safetensors":
                state = safetensors.torch.load(data)
            else:
                # torch warns about pickle protocols and explains weights_only at length (advising
                # to turn it off): the user gets one line of ours instead.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise KneeSegError(
                f"{path}: refused: not a torch file of tensors only (a pickle of other objects is never "
                "unpickled, as it could run code); save the weights as .safetensors"
            ) from None
        except CancelledError:  # SIGTERM/Ctrl-C raised while reading: a stop, not unreadable weights
            raise
        except Exception as error:  # safetensors, the unpickler and torch each raise their own kinds
            raise KneeSegError(f"{path}: cannot be read as weights ({one_line(error)})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise KneeSegError(f"{path}: expected a flat state dict of tensors")
        network = build_network(member.architecture, member.architecture_args)
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise KneeSegError(
                f"{path}: weights do not fit {member.architecture} {member.architecture_args} ({one_line(error)})"
            ) from None
        return network.to(device).eval()


def load_package(path: str | Path) -> ModelPackage:
    """Read and validate a package folder or zip.

    A zip is unpacked once into ``$KNEESEG_HOME/unpacked/<sha256 of the zip>``; its
    ``model.json`` may sit at the top or inside one top-level folder. Weights are not read here
    (see :meth:`ModelPackage.load_member` and :meth:`ModelPackage.verify`).

    Raises
    ------
    InputError
        Not a folder/zip, ``model.json`` missing or invalid (the message names the field).
    """
    path = Path(path)
    if path.is_dir():
        folder = path
    elif path.is_file() and zipfile.is_zipfile(path):
        folder = _unpack_zip(path)
    elif not path.exists():
        raise InputError(path, "no such model package (a folder holding model.json, or a .zip)")
    else:
        raise InputError(path, "not a model package: expected a folder holding model.json, or a .zip")
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise InputError(path, f"not a model package: {MANIFEST} missing")
    try:
        raw = json.loads(manifest.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(manifest, f"not valid JSON ({error})") from None
    return _parse(raw, folder, path, manifest)


def _parse(raw: Any, folder: Path, source: Path, manifest: Path) -> ModelPackage:
    def fail(where: str, problem: str) -> NoReturn:
        raise InputError(manifest, f"{where}: {problem}")

    if not isinstance(raw, dict):
        fail("top level", "must be a JSON object")
    _only(raw, _TOP_KEYS, "top level", fail)
    if raw.get("format_version") != FORMAT_VERSION:
        fail(
            "format_version",
            f"must be {FORMAT_VERSION} (found {raw.get('format_version')!r}); this KneeSeg reads format 1 only",
        )
    package_id = _get(raw, "id", str, "id", fail)
    if not _ID.fullmatch(package_id):
        fail("id", f"{package_id!r} must be letters, digits, '.', '_' or '-'")
    version = _get(raw, "version", str, "version", fail)
    if not _VERSION.fullmatch(version):
        fail("version", f"{version!r} must look like 1.0.0")
    license_name = _get(raw, "license", str, "license", fail)
    description = _get(raw, "description", str, "description", fail, default="")
    default = _get(raw, "default", bool, "default", fail, default=False)
    labels = _parse_labels(_get(raw, "labels", dict, "labels", fail), fail)
    members_raw = _get(raw, "members", list, "members", fail)
    if not members_raw:
        fail("members", "at least one member is needed")
    members = [_parse_member(m, f"members[{i}]", len(labels) + 1, fail) for i, m in enumerate(members_raw)]
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        fail("members", f"member names must be unique, found {names}")
    offsets = _get(raw, "decision_offsets", list, "decision_offsets", fail, default=[0.0] * (len(labels) + 1))
    if len(offsets) != len(labels) + 1 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in offsets
    ):
        fail("decision_offsets", f"must be {len(labels) + 1} finite numbers (background and each label)")
    postprocessing = _get(raw, "postprocessing", list, "postprocessing", fail, default=[])
    for i, step in enumerate(postprocessing):
        if not isinstance(step, dict) or not isinstance(step.get("name"), str):
            fail(f"postprocessing[{i}]", 'each step must be an object with a "name"')
    return ModelPackage(
        path=folder,
        source=source,
        id=package_id,
        version=version,
        description=description,
        license=license_name,
        labels=labels,
        members=members,
        decision_offsets=[float(v) for v in offsets],
        postprocessing=postprocessing,
        training=_get(raw, "training", dict, "training", fail, default={}),
        metrics=_get(raw, "metrics", dict, "metrics", fail, default={}),
        default=default,
        raw=raw,
    )


def _parse_labels(raw: dict[str, Any], fail: Any) -> dict[int, str]:
    if not raw:
        fail("labels", "at least one structure is needed")
    labels: dict[int, str] = {}
    for text, key in raw.items():
        if not (text.isdigit() and text == str(int(text)) and int(text) >= 1):
            fail("labels", f"keys are output channels 1, 2, ... (0 is background); found {text!r}")
        if key not in BY_KEY:
            fail(f"labels[{text}]", f"{key!r} is not in the tissue table; known: {sorted(BY_KEY)}")
        labels[int(text)] = key
    if sorted(labels) != list(range(1, len(labels) + 1)):
        fail("labels", f"channels must be 1..{len(labels)} without gaps, found {sorted(labels)}")
    if len(set(labels.values())) != len(labels):
        fail("labels", "each structure may appear once")
    return labels


def _parse_member(raw: Any, where: str, out_channels: int, fail: Any) -> MemberSpec:
    if not isinstance(raw, dict):
        fail(where, "must be an object")
    _only(raw, _MEMBER_KEYS, where, fail)
    name = _get(raw, "name", str, f"{where}.name", fail)
    weights = _get(raw, "weights", str, f"{where}.weights", fail)
    relative = PurePosixPath(weights)
    if relative.is_absolute() or ".." in relative.parts or "\\" in weights or not relative.parts:
        fail(f"{where}.weights", f"{weights!r} must be a file name inside the package")
    if relative.suffix not in WEIGHTS_SUFFIXES:
        fail(f"{where}.weights", f"{weights!r} must end with one of {WEIGHTS_SUFFIXES}")
    sha256 = _get(raw, "sha256", str, f"{where}.sha256", fail).lower()
    if not _SHA256.fullmatch(sha256):
        fail(f"{where}.sha256", "must be 64 hexadecimal digits")
    weight = _get(raw, "weight", (int, float), f"{where}.weight", fail, default=1.0)
    if not weight > 0:
        fail(f"{where}.weight", f"must be > 0, found {weight}")

    spec_in = _get(raw, "input", dict, f"{where}.input", fail)
    at = f"{where}.input"
    _only(spec_in, _INPUT_KEYS, at, fail)
    kind = _get(spec_in, "kind", str, f"{at}.kind", fail)
    if kind not in INPUT_KINDS:
        fail(f"{at}.kind", f"{kind!r} is not one of {INPUT_KINDS}")
    planar = kind != "3d"
    plane = _get(spec_in, "plane", str, f"{at}.plane", fail, default=None)
    if planar and plane not in PLANES:
        fail(f"{at}.plane", f"{kind} needs a plane, one of {PLANES} (found {plane!r})")
    if not planar and plane is not None:
        fail(f"{at}.plane", "a 3d member has no plane")
    context = _get(spec_in, "context_slices", int, f"{at}.context_slices", fail, default=0)
    if kind == "2.5d" and context < 1:
        fail(f"{at}.context_slices", f"2.5d needs k >= 1 (2k+1 slices), found {context}")
    if kind != "2.5d" and context != 0:
        fail(f"{at}.context_slices", f"only 2.5d members take context slices, found {context}")
    spacing = _numbers(spec_in, "spacing_mm", 2 if planar else 3, float, f"{at}.spacing_mm", fail)
    slice_spacing = _get(spec_in, "slice_spacing_mm", (int, float), f"{at}.slice_spacing_mm", fail, default=None)
    if slice_spacing is not None and (not planar or not slice_spacing > 0):
        fail(f"{at}.slice_spacing_mm", "only 2d/2.5d members take a slice spacing, and it must be > 0")
    patch = None
    if planar and "patch_size" in spec_in:
        fail(f"{at}.patch_size", "only 3d members take a patch size")
    if not planar:
        patch = _numbers(spec_in, "patch_size", 3, int, f"{at}.patch_size", fail)
    normalisation = _get(spec_in, "normalisation", dict, f"{at}.normalisation", fail)
    method = normalisation.get("name")
    if method not in NORMALISATIONS:
        fail(f"{at}.normalisation.name", f"{method!r} is not one of {sorted(NORMALISATIONS)}")
    _only(normalisation, {"name", *NORMALISATIONS[method]}, f"{at}.normalisation", fail)
    for parameter in NORMALISATIONS[method]:
        _get(normalisation, parameter, (int, float), f"{at}.normalisation.{parameter}", fail)
    if method == "percentile" and not 0 <= normalisation["low"] < normalisation["high"] <= 100:
        fail(f"{at}.normalisation", "needs 0 <= low < high <= 100")
    echo_index = _get(spec_in, "echo_index", int, f"{at}.echo_index", fail, default=None)
    if echo_index is not None and echo_index < 0:
        fail(f"{at}.echo_index", f"must be >= 0 (0-based), found {echo_index}")

    shape = {"spatial_dims": 2 if planar else 3, "in_channels": 2 * context + 1, "out_channels": out_channels}
    architecture, args = _parse_architecture(raw, shape, f"{where}.architecture", fail)
    return MemberSpec(
        name=name,
        weights=weights,
        sha256=sha256,
        architecture=architecture,
        architecture_args=args,
        kind=kind,
        plane=plane,
        context_slices=context,
        spacing_mm=tuple(spacing),
        patch_size=None if patch is None else tuple(patch),
        normalisation=dict(normalisation),
        echo_index=echo_index,
        weight=float(weight),
        slice_spacing_mm=None if slice_spacing is None else float(slice_spacing),
    )


def _parse_architecture(
    raw: dict[str, Any], shape: dict[str, int], where: str, fail: Any
) -> tuple[str, dict[str, Any]]:
    """Check the architecture exists, its arguments bind, and ``shape`` (dims, channels) matches them."""
    spec = _get(raw, "architecture", dict, where, fail)
    _only(spec, {"name", "args"}, where, fail)
    name = _get(spec, "name", str, f"{where}.name", fail)
    if name not in ARCHITECTURES:
        fail(f"{where}.name", f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    args = _get(spec, "args", dict, f"{where}.args", fail)
    try:
        bound = signature(name).bind(**args)
    except TypeError as error:
        fail(f"{where}.args", f"do not fit {name}: {error}")
    bound.apply_defaults()
    for argument, value in shape.items():
        if argument in bound.arguments and bound.arguments[argument] != value:
            fail(
                f"{where}.args.{argument}",
                f"is {bound.arguments[argument]!r} but the member's input and the package's labels need {value}",
            )
    return name, dict(args)


def _get(
    obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, fail: Any, default: Any = ...
) -> Any:
    """obj[key] checked against ``kind`` (bool is not accepted as a number)."""
    if key not in obj:
        if default is ...:
            fail(where, "missing")
        return default
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)
        fail(where, f"must be {names}, found {json.dumps(value)}")
    return value


_JSON_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true/false",
    dict: "an object",
    list: "a list",
}


def _numbers(obj: dict[str, Any], key: str, count: int, kind: type, where: str, fail: Any) -> list[Any]:
    values = _get(obj, key, list, where, fail)
    accepted = (int, float) if kind is float else (int,)
    if len(values) != count or not all(isinstance(v, accepted) and not isinstance(v, bool) and v > 0 for v in values):
        fail(
            where, f"must be {count} positive {'numbers' if kind is float else 'integers'}, found {json.dumps(values)}"
        )
    return [kind(v) for v in values]


def _only(obj: dict[str, Any], allowed: set[str], where: str, fail: Any) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        fail(where, f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")


def _read_verified(path: Path, expected: str) -> bytes:
    """The file's bytes, after checking their sha256 against ``expected``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KneeSegError(f"{path}: weights file missing from the model package") from None
    except IsADirectoryError:
        raise KneeSegError(f"{path}: is a folder; the model package's weights must be a file") from None
    except OSError as error:
        raise KneeSegError(f"{path}: weights file cannot be read ({one_line(error)})") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise KneeSegError(f"{path}: sha256 mismatch, weights refused (expected {expected}, found {actual})")
    return data


def save_package(
    folder: str | Path,
    spec: dict[str, Any],
    state_dicts: list[dict[str, torch.Tensor]],
    model_card: str | None = None,
    overwrite: bool = False,
) -> ModelPackage:
    """Write a model package: safetensors weights, ``model.json`` with their sha256, model card.

    Parameters
    ----------
    folder : path
        Package folder to create. It is written as ``<folder>.partial`` and renamed when
        complete, so a reader never sees half a package.
    spec : dict
        ``model.json`` content; each member's ``weights`` (default ``member<i>.safetensors``)
        and ``sha256`` are filled in, ``format_version`` defaults to 1.
    state_dicts : list of dict
        One state dict per member, in the order of ``spec["members"]``.
    model_card : str, optional
        Markdown for ``MODEL_CARD.md``; by default one is written from ``spec``.
    overwrite : bool
        Replace an existing package folder.

    Returns
    -------
    ModelPackage
        The written package, read back; every member has been loaded once to prove it fits.
    """
    import safetensors.torch

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise KneeSegError(f"{folder}: exists; choose another folder or pass overwrite=True")
    spec = copy.deepcopy({"format_version": FORMAT_VERSION, **spec})
    members = spec.get("members")
    if not isinstance(members, list) or len(members) != len(state_dicts):
        raise KneeSegError(
            f"save_package: {len(state_dicts)} state dicts for "
            f"{len(members) if isinstance(members, list) else 'no'} members"
        )
    with atomic_folder(folder) as partial:
        for index, (member, state) in enumerate(zip(members, state_dicts)):
            if not isinstance(member, dict):
                raise KneeSegError(f"save_package: members[{index}] must be a dict")
            name = member.setdefault("weights", f"member{index}.safetensors")
            if not str(name).endswith(".safetensors"):
                raise KneeSegError(
                    f"save_package: members[{index}].weights {name!r}: packages are written as .safetensors"
                )
            # Copies, because safetensors refuses tensors that share memory or are not contiguous.
            tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}
            safetensors.torch.save_file(tensors, str(partial / name), metadata={"package": str(spec.get("id"))})
            member["sha256"] = sha256_of(partial / name)
        write_json(spec, partial / MANIFEST)
        package = load_package(partial)
        for index in range(len(package.members)):
            package.load_member(index, "cpu")
        (partial / MODEL_CARD).write_text(
            model_card if model_card is not None else default_model_card(package), encoding="utf-8"
        )
    return load_package(folder)


def default_model_card(package: ModelPackage) -> str:
    """A model card in Markdown from what ``model.json`` says."""
    lines = [
        f"# {package.id} {package.version}",
        "",
        package.description or "(no description)",
        "",
        f"Licence: {package.license}",
        "",
        "## Structures (output channel: structure)",
        "",
    ]
    lines += [f"- {channel}: {BY_KEY[key].name}" for channel, key in sorted(package.labels.items())]
    lines += ["", "## Members", "", "| name | input | spacing (mm) | architecture | weight |", "|---|---|---|---|---|"]
    for m in package.members:
        lines.append(
            f"| {m.name} | {describe_input(m)} | {' x '.join(f'{s:g}' for s in m.spacing_mm)} | {m.architecture} | {m.weight:g} |"
        )
    for title, section in (("Training", package.training), ("Metrics", package.metrics)):
        lines += ["", f"## {title}", "", "```json", json.dumps(section, indent=2), "```"]
    return "\n".join(lines) + "\n"


def describe_input(member: MemberSpec) -> str:
    """``2.5d sagittal (5 slices)``, ``2d axial``, ``3d patches 96x96x96``."""
    if member.kind == "3d":
        return "3d patches " + "x".join(str(n) for n in member.patch_size or ())
    slices = f" ({member.in_channels} slices)" if member.kind == "2.5d" else ""
    return f"{member.kind} {member.plane}{slices}"


def package_summary(package: ModelPackage) -> dict[str, Any]:
    """What `kneeseg models --json` prints for one package."""
    return {
        "id": package.id,
        "version": package.version,
        "license": package.license,
        "description": package.description,
        "default": package.default,
        "origin": package.origin,
        "location": str(package.source),
        "sha256": package.sha256,
        "labels": {str(channel): key for channel, key in sorted(package.labels.items())},
        "members": [
            {
                "name": m.name,
                "kind": m.kind,
                "plane": m.plane,
                "context_slices": m.context_slices,
                "spacing_mm": list(m.spacing_mm),
                "architecture": m.architecture,
                "weight": m.weight,
            }
            for m in package.members
        ],
        "decision_offsets": package.decision_offsets,
    }


def _unpack_zip(archive: Path) -> Path:
    """Unpack a package zip once into the cache; returns the folder holding model.json."""
    target = kneeseg_home() / "unpacked" / sha256_of(archive)
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".partial", dir=target.parent))
        try:
            with zipfile.ZipFile(archive) as zipped:
                for name in zipped.namelist():
                    parts = PurePosixPath(name)
                    if parts.is_absolute() or ".." in parts.parts or "\\" in name or ":" in name:
                        raise InputError(archive, f"unsafe path {name!r} inside the zip; refused")
                zipped.extractall(staging)
        except zipfile.BadZipFile as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise InputError(archive, f"damaged zip ({error})") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            staging.rename(target)
        except OSError:  # another process unpacked the same zip meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    if (target / MANIFEST).is_file():
        return target
    inner = [p for p in target.iterdir() if (p / MANIFEST).is_file()]
    if len(inner) != 1:
        raise InputError(
            archive, f"not a model package: no {MANIFEST} at the top of the zip or in one top-level folder"
        )
    return inner[0]
