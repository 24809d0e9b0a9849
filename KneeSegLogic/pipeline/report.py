"""``report.png`` and ``report.html``: the page a radiologist reads after a run, without the README.

report.png (1600 x 1000 px, readable at 100 % on a laptop) holds: a title with the input file
name, date, knee side and model; a legend of structure colours with their volumes; three
sagittal slices with the segmentation outlined (orientation letters, a 10 mm scale bar, the
slice number in the scan's own array numbering); the uncertainty and the T2 map on the middle
slice (T2 shown only where it was fitted: 0 ms, "not fitted", is transparent); the cartilage
thickness and T2 projection maps; the surfaces from two viewpoints. report.html is standalone
(the picture and projection maps embedded as data URIs, no external links) and adds every
table: structures, and every cartilage region row with thickness and T2.

Slices are taken from the label grid by array views (axis choice, transposes and flips read
from the direction matrix), never by reorienting whole volumes: display anterior left,
superior up, whatever the scan's own axis order.
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from KneeSegLogic.io.outputs import REPORT_IMAGE, REPORT_PAGE, SURFACES_FOLDER, Results
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.tissues import BY_KEY, BY_LABEL, TISSUES

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.colors import ListedColormap

#: Vertex-clustering cell of the surface thumbnails, mm (so a meniscus gets fewer triangles than a
#: femur): on the 512 x 512 x 286 knee 26,000 triangles per view, about 5 pixels across in the
#: 320-pixel thumbnail; a fixed 48 cells per structure gave four times as many for a picture one
#: cannot tell apart.
REPORT_CELL_MM = 2.5

#: Length of the scale bar on the slices, mm.
SCALE_BAR_MM = 10.0

#: zlib level of report.png: 3 encodes the 1600 x 1000 picture in half the time of PIL's default 6
#: for the same size (641 against 642 kB on the 384 benchmark knee's report).
PNG_COMPRESSION = 3

#: Height of every panel title (axes fraction). Given, matplotlib skips its automatic placement,
#: which measures every axis's tick labels at each draw (a fifth of the report's time) to keep
#: titles clear of top tick labels that these panels do not have.
TITLE_Y = 1.0

#: Pixels of report.png: 16 x 10 inches at 100 dpi.
FIGURE_INCHES, FIGURE_DPI = (16.0, 10.0), 100

LABEL_COLOURS = ListedColormap(
    [(0, 0, 0, 0)] + [(*BY_LABEL[v].color, 1.0) if v in BY_LABEL else (1, 1, 1, 1) for v in range(1, max(BY_LABEL) + 1)]
)

# Projection maps the T2/regions stage writes beside the report (shown when present).
PROJECTION_IMAGES = (("projection_thickness.png", "cartilage thickness"), ("projection_t2.png", "cartilage T2"))


class SagittalView:
    """Sagittal slices of arrays on one grid, by views: rows superior -> inferior, columns anterior -> posterior.

    ``axis`` is the array axis (of ``array[k, j, i]``) nearest the left-right direction; slice
    ``n`` is index ``n`` along that axis, the scan's own numbering. Pixel sizes are in mm.
    """

    def __init__(self, grid: Volume) -> None:
        # Column c of the direction matrix is array axis (i, j, k)[c] in LPS; array axes are (k, j, i).
        direction = np.asarray(grid.direction, float).reshape(3, 3)
        spacing_ijk = np.asarray(grid.spacing, float)
        lps_of_array_axis = {2 - c: direction[:, c] for c in range(3)}
        self.axis = max(range(3), key=lambda a: abs(lps_of_array_axis[a][0]))
        rest = [a for a in range(3) if a != self.axis]
        # Superior is +z in LPS, anterior is -y: the row axis is the one nearest z.
        row = max(rest, key=lambda a: abs(lps_of_array_axis[a][2]))
        column = next(a for a in rest if a != row)
        self.flip_row = lps_of_array_axis[row][2] > 0  # index grows superior: flip so superior is up
        self.flip_column = lps_of_array_axis[column][1] < 0  # index grows anterior: flip so anterior is left
        self.order = (row, column)
        self.pixel_mm = (float(spacing_ijk[2 - row]), float(spacing_ijk[2 - column]))
        self.count = grid.array.shape[self.axis]

    def __call__(self, array: np.ndarray, index: int) -> np.ndarray:
        plane = np.take(array[..., 0] if array.ndim == 4 else array, index, axis=self.axis)
        # After removing self.axis, the remaining axes keep their order.
        remaining = [a for a in range(3) if a != self.axis]
        plane = plane if remaining.index(self.order[0]) == 0 else plane.T
        if self.flip_row:
            plane = plane[::-1]
        if self.flip_column:
            plane = plane[:, ::-1]
        return plane

    def extent(self, shape: tuple[int, ...]) -> tuple[float, float, float, float]:
        """imshow extent in mm (left, right, bottom, top) so pixels keep their true aspect."""
        return (0.0, shape[1] * self.pixel_mm[1], shape[0] * self.pixel_mm[0], 0.0)


def representative_slices(labels: np.ndarray, axis: int, count: int = 3) -> list[int]:
    """Slices at the 20th, 50th and 80th percentile of the structures' extent along ``axis``."""
    other = tuple(a for a in range(3) if a != axis)
    per_slice = (labels > 0).sum(axis=other)
    present = np.flatnonzero(per_slice)
    if present.size == 0:
        return [labels.shape[axis] // 2]
    return sorted({int(present[int(q * (present.size - 1))]) for q in np.linspace(0.2, 0.8, count)})


def _decorate(ax, view: SagittalView, shape: tuple[int, ...], title: str) -> None:
    """Orientation letters, a scale bar and a title on a slice panel."""
    width, height = shape[1] * view.pixel_mm[1], shape[0] * view.pixel_mm[0]
    style = {"color": "white", "fontsize": 11, "fontweight": "bold", "ha": "center", "va": "center"}
    ax.text(0.03 * width, height / 2, "A", **style)
    ax.text(0.97 * width, height / 2, "P", **style)
    ax.text(width / 2, 0.04 * height, "S", **style)
    ax.text(width / 2, 0.96 * height, "I", **style)
    x0, y0 = 0.06 * width, 0.9 * height
    ax.plot([x0, x0 + SCALE_BAR_MM], [y0, y0], color="white", linewidth=3)
    ax.text(x0 + SCALE_BAR_MM / 2, y0 - 0.03 * height, f"{SCALE_BAR_MM:g} mm", color="white", fontsize=9, ha="center")
    ax.set_title(title, fontsize=11, y=TITLE_Y)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")


def _grey(ax, view: SagittalView, plane: np.ndarray) -> None:
    low, high = np.percentile(plane, (1, 99.5)) if plane.size else (0, 1)
    ax.imshow(plane, cmap="gray", vmin=low, vmax=max(high, low + 1e-6), extent=view.extent(plane.shape))


def _outline(ax, view: SagittalView, image: np.ndarray, labels: np.ndarray, index: int) -> None:
    from skimage.segmentation import find_boundaries

    plane, label_plane = view(image, index), view(labels, index)
    _grey(ax, view, plane)
    edges = np.where(find_boundaries(label_plane, mode="inner"), label_plane, 0)
    ax.imshow(
        edges, cmap=LABEL_COLOURS, vmin=0, vmax=max(BY_LABEL), interpolation="nearest", extent=view.extent(plane.shape)
    )
    _decorate(ax, view, plane.shape, f"sagittal slice {index} (scan slices 0-{view.count - 1})")


def _legend(ax, results: Results) -> None:
    """Colour swatches with names and volumes (mL) of the structures found."""
    volumes = results.data.get("volumes_mm3", {})
    ax.axis("off")
    ax.set_title("structures (volume mL)", fontsize=11, loc="left", y=TITLE_Y)
    shown = [t for t in TISSUES if t.key in volumes] or list(TISSUES)
    for row, tissue in enumerate(shown):
        y = 1 - (row + 0.5) / len(shown)
        ax.add_patch(plt.Rectangle((0.0, y - 0.035), 0.1, 0.07, color=tissue.color, transform=ax.transAxes))
        volume = volumes.get(tissue.key)
        text = tissue.name + (f"  {volume / 1000:.2f}" if volume is not None else "  not found")
        ax.text(0.14, y, text, fontsize=11, va="center", transform=ax.transAxes)


#: The two thumbnail views: title, screen right and up (LPS), elevation (deg). From the front the
#: patient's left is on the viewer's right; from the side (the patient's left) anterior is left.
SURFACE_VIEWS = (
    ("surfaces, from the front", (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), 5.0),
    ("from the side", (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), 5.0),
)

#: Longer side of a surface thumbnail, pixels (the panel is about 350 x 300 px of report.png).
THUMBNAIL_PIXELS = 320


def _surfaces(axes: list, surfaces_dir: Path) -> None:
    """The surfaces from the front (anterior) and the side, drawn by the z-buffer rasteriser."""
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkFiltersCore import vtkQuadricClustering
    from vtkmodules.vtkIOXML import vtkXMLPolyDataReader

    from KneeSegLogic.pipeline.rendering import Mesh, View, render

    meshes = []
    for tissue in TISSUES:
        path = surfaces_dir / f"{tissue.key}.vtp"
        if not path.exists():
            continue
        reader = vtkXMLPolyDataReader()
        reader.SetFileName(str(path))
        # Vertex clustering on a coarse grid: linear time (quadric decimation of a bone takes seconds).
        cluster = vtkQuadricClustering()
        cluster.SetInputConnection(reader.GetOutputPort())
        # Origin and spacing given: VTK computes the number of cells from the mesh's bounds.
        cluster.SetDivisionOrigin(0.0, 0.0, 0.0)
        cluster.SetDivisionSpacing(REPORT_CELL_MM, REPORT_CELL_MM, REPORT_CELL_MM)
        cluster.Update()
        mesh = cluster.GetOutput()
        if mesh.GetNumberOfPoints() == 0:
            continue
        points = vtk_to_numpy(mesh.GetPoints().GetData()).astype(np.float64)
        triangles = vtk_to_numpy(mesh.GetPolys().GetConnectivityArray()).reshape(-1, 3)
        meshes.append(Mesh(points, triangles, tissue.color))
    for ax, (title, right, up, elevation) in zip(axes, SURFACE_VIEWS):
        ax.set_title(title, fontsize=11, y=TITLE_Y)
        ax.axis("off")
        if not meshes:
            ax.text(0.5, 0.5, "no surfaces", ha="center", transform=ax.transAxes)
            continue
        picture = render(meshes, View.of(right, up, elevation), THUMBNAIL_PIXELS)
        ax.imshow(picture.rgba, extent=picture.extent, interpolation="antialiased")


def _projections(axes: list, out: Path) -> None:
    for ax, (name, title) in zip(axes, PROJECTION_IMAGES):
        ax.axis("off")
        path = out / name
        if path.exists():
            ax.imshow(plt.imread(path))
            ax.set_title(f"{title} (projection)", fontsize=11, y=TITLE_Y)
        else:
            ax.set_title(f"{title}: not computed", fontsize=11, y=TITLE_Y)
            ax.text(0.5, 0.5, "needs multi-echo input\nand cartilage", ha="center", va="center", transform=ax.transAxes)


def region_rows(results: Results) -> list[list[str]]:
    """Every cartilage region: name, voxels, thickness mean (mm), T2 mean and median (ms)."""

    def number(value: Any, digits: int) -> str:
        return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"

    cartilage = (results.data.get("t2") or {}).get("cartilage") or {}
    return [
        [
            str(r.get("name")),
            str(r.get("voxels", "")),
            number(r.get("thickness_mean_mm"), 2),
            number(r.get("t2_mean_ms"), 1),
            number(r.get("t2_median_ms"), 1),
        ]
        for r in [*cartilage.get("plates", []), *cartilage.get("regions", [])]
    ]


REGION_COLUMNS = ["region", "voxels", "thickness (mm)", "T2 mean (ms)", "T2 median (ms)"]
STRUCTURE_COLUMNS = ["structure", "volume (mL)", "mean uncertainty"]


def structure_rows(results: Results) -> list[list[str]]:
    volumes = results.data.get("volumes_mm3", {})
    unsure = results.data.get("uncertainty", {}).get("per_structure", {})
    rows = []
    for key, value in volumes.items():
        u = unsure.get(key)
        mean = u.get("mean") if isinstance(u, dict) else u
        rows.append([BY_KEY[key].name if key in BY_KEY else key, f"{value / 1000:.2f}", _fmt(mean, 3)])
    return rows


def _fmt(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def _title(results: Results) -> str:
    model = results.data.get("model") or {}
    inputs = results.data.get("inputs") or []
    scan = Path(inputs[0]["path"]).name if inputs else "?"
    side = (((results.data.get("t2") or {}).get("cartilage") or {}).get("geometry") or {}).get("knee_side")
    created = str(results.data.get("created", time.strftime("%Y-%m-%dT%H:%M:%S")))[:16].replace("T", " ")
    knee = f"{side} knee" if side else "knee side not determined"
    return (
        f"KneeSeg report: {scan}  |  {created}  |  {knee}  |  model {model.get('id', '?')} {model.get('version', '')}"
    )


def write_report(
    out: Path, image: Volume, labels: Volume, maps: dict[str, np.ndarray], results: Results, t2: Volume | None = None
) -> Path:
    """Write ``report.png`` and ``report.html`` into the output folder ``out``.

    ``image`` is the 3D image the model segmented; ``t2`` the T2 map in ms (0 = not fitted) when
    one was fitted. All volumes share the grid of ``labels``.
    """
    view = SagittalView(labels)
    picture = np.asarray(image.array, np.float32)
    slices = representative_slices(labels.array, view.axis)
    middle = slices[len(slices) // 2]

    figure = plt.figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
    grid = figure.add_gridspec(3, 4, height_ratios=(1, 1, 1), hspace=0.25, wspace=0.08)
    for column, index in enumerate(slices[:3]):
        _outline(figure.add_subplot(grid[0, column]), view, picture, labels.array, index)
    _legend(figure.add_subplot(grid[0, 3]), results)

    ax = figure.add_subplot(grid[1, 0])
    plane = view(picture, middle)
    _grey(ax, view, plane)
    shown = ax.imshow(
        view(maps["uncertainty"], middle), cmap="inferno", vmin=0, vmax=1, alpha=0.6, extent=view.extent(plane.shape)
    )
    figure.colorbar(shown, ax=ax, fraction=0.046, label="normalised entropy")
    _decorate(ax, view, plane.shape, f"uncertainty, slice {middle}")

    ax = figure.add_subplot(grid[1, 1])
    _grey(ax, view, plane)
    if t2 is not None:
        t2_plane = view(np.asarray(t2.array, np.float32), middle)
        cartilage = np.isin(view(labels.array, middle), [t.label for t in TISSUES if t.group == "cartilage"])
        # 0 ms marks voxels not fitted: transparent, not "very short T2".
        masked = np.ma.masked_where(~cartilage | (t2_plane <= 0), t2_plane)
        shown = ax.imshow(masked, cmap="viridis", vmin=0, vmax=100, extent=view.extent(plane.shape))
        figure.colorbar(shown, ax=ax, fraction=0.046, label="T2 (ms); not fitted: no colour")
        _decorate(ax, view, plane.shape, f"T2 in cartilage, slice {middle}")
    else:
        why = "too few echoes" if image.is_multi_echo else "single-echo input"
        _decorate(ax, view, plane.shape, f"T2 not fitted: {why}")
    _projections([figure.add_subplot(grid[1, 2]), figure.add_subplot(grid[1, 3])], out)

    surface_axes = [figure.add_subplot(grid[2, c]) for c in (0, 1)]
    _surfaces(surface_axes, out / SURFACES_FOLDER)
    _table(figure.add_subplot(grid[2, 2:]), results)
    figure.suptitle(_title(results), fontsize=14, x=0.01, ha="left")
    figure.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.02)
    png = out / REPORT_IMAGE
    figure.savefig(png, dpi=FIGURE_DPI, pil_kwargs={"compress_level": PNG_COMPRESSION})
    plt.close(figure)
    write_html(out / REPORT_PAGE, results, png, [out / name for name, _ in PROJECTION_IMAGES])
    return png


def _table(ax, results: Results) -> None:
    """Cartilage plates with thickness and T2 (every region row is in report.html and regions.csv)."""
    ax.axis("off")
    rows = [[BY_KEY[r[0]].name, *r[1:]] for r in region_rows(results) if r[0] in BY_KEY]
    if not rows:
        rows = structure_rows(results)
        columns = STRUCTURE_COLUMNS
        ax.set_title("structures", fontsize=11, loc="left", y=TITLE_Y)
    else:
        columns = REGION_COLUMNS
        regions = len(region_rows(results)) - len(rows)
        ax.set_title(
            f"cartilage plates ({regions} subregions in report.html and regions.csv)",
            fontsize=11,
            loc="left",
            y=TITLE_Y,
        )
    if not rows:
        ax.text(0, 0.5, "no structures found", fontsize=12)
        return
    widths = [0.36] + [0.64 / (len(columns) - 1)] * (len(columns) - 1)
    table = ax.table(cellText=rows, colLabels=columns, loc="upper left", cellLoc="right", colWidths=widths)
    table.auto_set_font_size(False)
    table.set_fontsize(11)
    table.scale(1, 1.6)
    for (row, column), cell in table.get_celld().items():
        if column == 0:
            cell.get_text().set_horizontalalignment("left")
        if row == 0:
            cell.set_facecolor("#eeeeee")


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1650px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.5em; }
img.report { width: 100%; max-width: 1600px; border: 1px solid #ccc; }
.maps img { max-width: 48%; margin-right: 1%; border: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; }
th { background: #eee; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 1em; height: 1em; vertical-align: middle; margin-right: 0.4em; }
"""


def _html_table(columns: list[str], rows: list[list[str]], swatch: bool = False) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for number, cell in enumerate(row):
            text = html.escape(cell)
            if number == 0 and swatch:
                tissue = next((t for t in TISSUES if t.name == cell), None)
                if tissue is not None:
                    rgb = ",".join(str(int(round(255 * c))) for c in tissue.color)
                    text = f"<span class='swatch' style='background:rgb({rgb})'></span>{text}"
            cells.append(f"<td class='n'>{text}</td>" if number else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def write_html(path: Path, results: Results, png: Path, extra_images: list[Path]) -> None:
    """report.html: standalone (images as data URIs, no external links), every table in full."""
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(_title(results))}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(_title(results))}</h1>",
        f"<img class='report' alt='KneeSeg report' src='{_data_uri(png)}'>",
        "<h2>Structures</h2>",
        _html_table(STRUCTURE_COLUMNS, structure_rows(results), swatch=True),
    ]
    rows = region_rows(results)
    if rows:
        parts += ["<h2>Cartilage plates and regions</h2>", _html_table(REGION_COLUMNS, rows)]
    shown = [p for p in extra_images if p.exists()]
    if shown:
        parts.append("<h2>Projection maps</h2><div class='maps'>")
        parts += [f"<img alt='{html.escape(p.stem)}' src='{_data_uri(p)}'>" for p in shown]
        parts.append("</div>")
    warnings: list[Any] = results.data.get("warnings", [])
    if warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(str(w))}</li>" for w in warnings) + "</ul>")
    parts.append("<p>All numbers are also in results.json and regions.csv beside this page.</p></body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
