"""Export the bone surfaces of the 26 subjects of a statistical lower-limb shape model for the anatomy bank.

The ``musculoskeletal-models`` package (PyPI, MPL-2.0; Zhang et al.'s LLP26 model, built with
GIAS3) holds a principal-component model of 26 adults' pelvis, femur, patella and tibia-fibula,
rigidly aligned in one lower-limb frame: every subject's bones in their own joint pose, in
millimetres. Each subject is the mean plus the modes weighted by that subject's projected weights
(all 26 modes: the model's training shapes themselves, not random draws). The piecewise-polynomial
(fieldwork) meshes are evaluated on a grid of points per element and triangulated with shared
points merged, which gives closed surfaces; the tibia-fibula mesh is split into its two connected
pieces (the larger is the tibia).

This script needs ``gias3`` and ``musculoskeletal-models``, which KneeSeg does not install (their
pins are their own): run it with a Python that has them, e.g.::

    python3 -m venv /tmp/ssm && /tmp/ssm/bin/pip install gias3 musculoskeletal-models
    /tmp/ssm/bin/python KneeSegLogic/training/shape_model_export.py OUT_FOLDER

It imports nothing of KneeSeg. It writes ``OUT_FOLDER/llp26_subjectNN.npz`` (arrays
``<bone>_points`` (n, 3) mm and ``<bone>_triangles`` (m, 3) for femur, patella, tibia, fibula)
and ``OUT_FOLDER/llp26.json`` (source, licence, counts). ``python -m
KneeSegLogic.training.anatomy BANK --shape-model OUT_FOLDER`` then composes bank knees from them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

#: The right-knee model (left bones mirrored), its parts in the order of the model's parameter
#: vector: (name, mean geometry file, element basis/mesh file stem).
MODEL = "shape_models/LLP26_right_mirrored_from_left_rigid.pc"
PARTS = (
    ("pelvis", "pelvis_combined_cubic_mean_rigid_LLP26", "pelvis_combined_cubic_flat"),
    ("femur", "femur_right_mirrored_from_left_mean_rigid_LLP26", "femur_right_quartic_flat"),
    ("patella", "patella_right_mirrored_from_left_mean_rigid_LLP26", "patella_11_right"),
    ("tibia_fibula", "tibia_fibula_cubic_right_mirrored_from_left_mean_rigid_LLP26", "tibia_fibula_right_cubic_flat"),
)

#: Points per element edge when the fieldwork meshes are triangulated (median edge 2 mm on the femur, 1 mm on the patella).
DISCRETISATION = (24, 24)

SOURCE = {
    "package": "musculoskeletal-models 0.2.4 (PyPI)",
    "model": MODEL,
    "licence": "MPL-2.0",
    "reference": "Zhang J. et al., lower-limb statistical shape model LLP26 (26 adult subjects), GIAS3",
}


def components(mask_triangles: np.ndarray, n_points: int) -> np.ndarray:
    """Connected component index of every point of a triangle mesh (union-find over triangle edges)."""
    parent = np.arange(n_points)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for a, b, c in mask_triangles:
        for u, v in ((a, b), (b, c)):
            ru, rv = root(int(u)), root(int(v))
            if ru != rv:
                parent[ru] = rv
    return np.array([root(i) for i in range(n_points)])


def split_pieces(points: np.ndarray, triangles: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The mesh's connected pieces, largest (most points) first, each with its own point numbering."""
    label = components(triangles, len(points))
    pieces = []
    for value in np.unique(label):
        keep = np.nonzero(label == value)[0]
        renumber = np.full(len(points), -1)
        renumber[keep] = np.arange(len(keep))
        mine = triangles[np.all(np.isin(triangles, keep), axis=1)]
        if len(mine):
            pieces.append((points[keep], renumber[mine]))
    return sorted(pieces, key=lambda piece: -len(piece[0]))


def open_edges(triangles: np.ndarray) -> int:
    """Edges used by one triangle only (0 for a closed surface)."""
    edges = np.sort(np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    return int(np.count_nonzero(counts == 1))


def _numpy_names_in_scipy() -> None:
    """GIAS3 3.0 still calls numpy functions through SciPy (``scipy.dot``...), which SciPy 1.12 removed:
    put the numpy functions back under those names for this process."""
    import scipy

    for name in ("dot", "array", "zeros", "ones", "sqrt", "arange", "hstack", "vstack", "where", "newaxis"):
        if name not in vars(scipy):
            setattr(scipy, name, getattr(np, name))


def export(out: Path) -> dict:
    _numpy_names_in_scipy()
    from gias3.fieldwork.field.geometric_field import load_geometric_field
    from gias3.learning import PCA
    from musculoskeletal.models import get_model_path

    def path(stem: str) -> str:
        return str(get_model_path(stem))

    fields = [
        (
            name,
            load_geometric_field(
                path(f"atlas_meshes/{geof}.geof"), path(f"atlas_meshes/{ens}.ens"), path(f"atlas_meshes/{ens}.mesh")
            ),
        )
        for name, geof, ens in PARTS
    ]
    sizes = [field.get_field_parameters().shape[1] for _, field in fields]
    model = PCA.loadPrincipalComponents(path(MODEL))
    nodes = sum(sizes)
    if model.mean.size != 3 * nodes:
        raise SystemExit(f"the model has {model.mean.size} parameters, the meshes {3 * nodes} (3 x {nodes} nodes)")
    weights = np.asarray(model.projectedWeights)  # (modes, subjects)
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"source": SOURCE, "discretisation": list(DISCRETISATION), "subjects": []}
    for subject in range(weights.shape[1]):
        # Parameters are laid out x of every node, then y, then z.
        shape = (model.mean + model.modes @ weights[:, subject]).reshape(3, nodes)
        arrays: dict[str, Any] = {}
        start = 0
        counts = {}
        for (name, field), size in zip(fields, sizes):
            params = shape[:, start : start + size]
            start += size
            if name == "pelvis":
                continue
            field.set_field_parameters(params[:, :, None])
            points, triangles = field.triangulate(list(DISCRETISATION), merge=True)
            points, triangles = np.asarray(points, float), np.asarray(triangles, np.int64)
            pieces = [(points, triangles)] if name != "tibia_fibula" else split_pieces(points, triangles)[:2]
            names = [name] if name != "tibia_fibula" else ["tibia", "fibula"]
            for bone, (p, t) in zip(names, pieces):
                arrays[f"{bone}_points"], arrays[f"{bone}_triangles"] = p, t
                counts[bone] = {"points": len(p), "triangles": len(t), "open_edges": open_edges(t)}
        file = out / f"llp26_subject{subject:02d}.npz"
        np.savez_compressed(file, **arrays)
        record["subjects"].append({"file": file.name, **counts})
        print(file.name, counts, flush=True)
    (out / "llp26.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    export(parser.parse_args().out)


if __name__ == "__main__":
    main()
