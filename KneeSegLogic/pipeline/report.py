"""``report.png`` and ``report.html``: the picture a person reads after a run.

Sagittal slices of the input with the segmentation outlined, the uncertainty heatmap, the T2
map inside the cartilage, a 3D view of the surfaces, and tables of volumes, uncertainty and
region T2. Slices are shown in the canonical sagittal orientation (anterior left, superior up)
whatever the scan's own axis order.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from skimage.segmentation import find_boundaries

from KneeSegLogic.io.outputs import REPORT_IMAGE, REPORT_PAGE, Results
from KneeSegLogic.io.volume import Volume, reorient
from KneeSegLogic.segmentation.normalisation import CANONICAL_ORIENTATION
from KneeSegLogic.tissues import BY_LABEL, TISSUES

matplotlib.use("Agg")


REPORT_DIVISIONS = 40

LABEL_COLOURS = ListedColormap(
    [(0, 0, 0, 0)] + [(*BY_LABEL[v].color, 1.0) if v in BY_LABEL else (1, 1, 1, 1) for v in range(1, max(BY_LABEL) + 1)]
)


def _sagittal(volume: Volume) -> np.ndarray:
    """(k, j, i) array with k = right, j = inferior, i = posterior; flipped for display (anterior left)."""
    return reorient(volume, CANONICAL_ORIENTATION).array


def representative_slices(labels: np.ndarray, count: int = 3) -> list[int]:
    """Slices at the 20th, 50th and 80th percentile of the structures' left-right extent."""
    per_slice = (labels > 0).reshape(labels.shape[0], -1).sum(1)
    present = np.flatnonzero(per_slice)
    if present.size == 0:
        return [labels.shape[0] // 2]
    return sorted({int(present[int(q * (present.size - 1))]) for q in np.linspace(0.2, 0.8, count)})


def _outline(ax, image: np.ndarray, labels: np.ndarray, title: str) -> None:
    ax.imshow(image, cmap="gray", vmin=np.percentile(image, 1), vmax=np.percentile(image, 99.5))
    edges = np.where(find_boundaries(labels, mode="inner"), labels, 0)
    ax.imshow(edges, cmap=LABEL_COLOURS, vmin=0, vmax=max(BY_LABEL), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def _surfaces_3d(ax, surfaces_dir: Path) -> None:
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkFiltersCore import vtkQuadricClustering
    from vtkmodules.vtkIOXML import vtkXMLPolyDataReader

    points_all = []
    for tissue in TISSUES:
        path = surfaces_dir / f"{tissue.key}.vtp"
        if not path.exists():
            continue
        reader = vtkXMLPolyDataReader()
        reader.SetFileName(str(path))
        # Vertex clustering on a coarse grid: a thumbnail needs a few thousand triangles, and
        # clustering is linear time (quadric decimation of a full-resolution bone takes seconds).
        decimate = vtkQuadricClustering()
        decimate.SetInputConnection(reader.GetOutputPort())
        decimate.SetNumberOfDivisions(REPORT_DIVISIONS, REPORT_DIVISIONS, REPORT_DIVISIONS)
        decimate.Update()
        mesh = decimate.GetOutput()
        if mesh.GetNumberOfPoints() == 0:
            continue
        points = vtk_to_numpy(mesh.GetPoints().GetData())
        triangles = vtk_to_numpy(mesh.GetPolys().GetConnectivityArray()).reshape(-1, 3)
        ax.add_collection3d(Poly3DCollection(points[triangles], facecolor=tissue.color, edgecolor="none", alpha=0.9))
        points_all.append(points)
    if points_all:
        allpoints = np.concatenate(points_all)
        centre, half = allpoints.mean(0), np.ptp(allpoints, 0).max() / 2
        for setter, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre):
            setter(c - half, c + half)
        ax.view_init(elev=10, azim=-60)
    ax.set_title("surfaces (LPS mm)", fontsize=9)
    ax.axis("off")


def _tables(results: Results) -> list[tuple[str, list[list[str]]]]:
    tables = []
    volumes = results.data.get("volumes_mm3", {})
    unsure = results.data.get("uncertainty", {}).get("per_structure", {})
    if volumes:
        rows = [[key, f"{value:,.0f}", f"{unsure.get(key, float('nan')):.3f}"] for key, value in volumes.items()]
        tables.append(("structure  |  volume mm3  |  mean uncertainty", rows))
    regions = (results.data.get("t2") or {}).get("cartilage", {}).get("regions", [])
    if regions:
        rows = [
            [
                str(r.get("name")),
                str(r.get("voxels", "")),
                f"{r['t2_mean_ms']:.1f}" if isinstance(r.get("t2_mean_ms"), (int, float)) else "-",
            ]
            for r in regions[:16]
        ]
        tables.append(("region  |  voxels  |  T2 mean ms", rows))
    return tables


def write_report(
    out: Path, image: Volume, labels: Volume, maps: dict[str, np.ndarray], results: Results, t2: Volume | None = None
) -> Path:
    """Write ``report.png`` and ``report.html`` into the output folder ``out``.

    ``image`` is the 3D image the model segmented; ``t2`` the T2 map in ms (0 = not fitted) when
    one was fitted. All volumes share the grid of ``labels``.
    """
    picture = _sagittal(image).astype(np.float32)
    label_array = _sagittal(labels)
    uncertainty = _sagittal(labels.with_array(maps["uncertainty"]))
    t2 = _sagittal(t2) if t2 is not None else None
    slices = representative_slices(label_array)
    middle = slices[len(slices) // 2]

    figure = plt.figure(figsize=(16, 9))
    grid = figure.add_gridspec(2, 4)
    for column, index in enumerate(slices[:3]):
        _outline(figure.add_subplot(grid[0, column]), picture[index], label_array[index], f"slice {index} (sagittal)")
    ax = figure.add_subplot(grid[1, 0])
    ax.imshow(picture[middle], cmap="gray")
    shown = ax.imshow(uncertainty[middle], cmap="inferno", vmin=0, vmax=1, alpha=0.6)
    figure.colorbar(shown, ax=ax, fraction=0.046, label="normalised entropy")
    ax.set_title("uncertainty", fontsize=9)
    ax.axis("off")
    ax = figure.add_subplot(grid[1, 1])
    ax.imshow(picture[middle], cmap="gray")
    if t2 is not None:
        cartilage = np.isin(label_array[middle], [t.label for t in TISSUES if t.group == "cartilage"])
        shown = ax.imshow(np.where(cartilage, t2[middle], np.nan), cmap="jet", vmin=0, vmax=100)
        figure.colorbar(shown, ax=ax, fraction=0.046, label="T2 (ms)")
        ax.set_title("T2 in cartilage", fontsize=9)
    else:
        ax.set_title("T2 not fitted: " + ("too few echoes" if image.is_multi_echo else "single-echo input"), fontsize=9)
    ax.axis("off")
    _surfaces_3d(figure.add_subplot(grid[1, 2], projection="3d"), out / "surfaces")
    ax = figure.add_subplot(grid[:, 3])
    ax.axis("off")
    text = []
    for header, rows in _tables(results):
        text.append(header)
        text.extend("  ".join(row) for row in rows)
        text.append("")
    ax.text(0, 1, "\n".join(text) or "no structures found", va="top", family="monospace", fontsize=7)
    model = results.data.get("model", {})
    figure.suptitle(f"KneeSeg - {model.get('id', '')} {model.get('version', '')}", fontsize=12)
    figure.tight_layout()
    png = out / REPORT_IMAGE
    figure.savefig(png, dpi=80)
    plt.close(figure)
    _write_html(out / REPORT_PAGE, results)
    return png


def _write_html(path: Path, results: Results) -> None:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>KneeSeg report</title>",
        "<h1>KneeSeg report</h1><img src='{REPORT_IMAGE}' style='max-width:100%'>",
    ]
    for header, rows in _tables(results):
        columns = [html.escape(c.strip()) for c in header.split("|")]
        parts.append("<table border='1' cellpadding='3'><tr>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr>")
        parts.extend("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        parts.append("</table>")
    warnings: list[Any] = results.data.get("warnings", [])
    if warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(str(w))}</li>" for w in warnings) + "</ul>")
    path.write_text("\n".join(parts), encoding="utf-8")
