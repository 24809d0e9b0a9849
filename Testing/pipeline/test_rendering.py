"""The report's z-buffer rasteriser against pictures whose pixels are known."""

from __future__ import annotations

import numpy as np

from KneeSegLogic.pipeline.rendering import AMBIENT, DIFFUSE, Mesh, View, render

FRONT = View.of((1.0, 0.0, 0.0), (0.0, 0.0, 1.0))  # screen right = L (x), up = S (z), viewer anterior (-y)


def square(centre_y: float, half: float, color, x0: float = 0.0, z0: float = 0.0) -> Mesh:
    """A square in the plane y = centre_y facing the front view, two triangles."""
    points = np.array(
        [
            [x0 - half, centre_y, z0 - half],
            [x0 + half, centre_y, z0 - half],
            [x0 + half, centre_y, z0 + half],
            [x0 - half, centre_y, z0 + half],
        ]
    )
    return Mesh(points, np.array([[0, 1, 2], [0, 2, 3]]), color)


def sphere(radius: float, subdivisions: int = 4) -> Mesh:
    """An icosphere (closed, outward winding) of the given radius, centred at the origin."""
    t = (1 + 5**0.5) / 2
    points = [(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t)]
    points += [(0, -1, -t), (0, 1, -t), (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)]
    faces = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2)]
    faces += [(10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5)]
    faces += [(2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1)]
    vertices = [np.array(p, float) / np.linalg.norm(p) for p in points]
    for _ in range(subdivisions):
        middle: dict[tuple[int, int], int] = {}

        def halfway(a: int, b: int) -> int:
            key = (min(a, b), max(a, b))
            if key not in middle:
                point = vertices[a] + vertices[b]
                vertices.append(point / np.linalg.norm(point))
                middle[key] = len(vertices) - 1
            return middle[key]

        faces = [
            new
            for a, b, c in faces
            for new in (
                (a, halfway(a, b), halfway(c, a)),
                (b, halfway(b, c), halfway(a, b)),
                (c, halfway(c, a), halfway(b, c)),
                (halfway(a, b), halfway(b, c), halfway(c, a)),
            )
        ]
    return Mesh(np.array(vertices) * radius, np.array(faces), (0.2, 0.4, 0.8))


def test_a_square_facing_the_viewer_fills_its_pixels_in_full_colour():
    picture = render([square(0.0, 10.0, (1.0, 0.5, 0.25))], FRONT, pixels=40, supersample=1)
    assert picture.rgba.shape[:2] == (42, 42)  # 40 pixels plus a one-pixel margin each side
    left, right, bottom, top = picture.extent
    assert np.isclose(right - left, 21.0) and np.isclose(top - bottom, 21.0)  # 0.5 mm pixels
    inside = picture.rgba[..., 3] > 0
    assert inside.sum() == 40 * 40
    assert not inside[0].any() and not inside[-1].any() and not inside[:, 0].any() and not inside[:, -1].any()
    # Facing the viewer: full diffuse light.
    lit = np.array([1.0, 0.5, 0.25]) * (AMBIENT + DIFFUSE)
    np.testing.assert_allclose(picture.rgba[inside][:, :3], np.broadcast_to(lit, (40 * 40, 3)))


def test_the_nearer_surface_hides_the_farther_whatever_the_drawing_order():
    red = square(-5.0, 5.0, (1.0, 0.0, 0.0))  # anterior (y = -5): nearer to a viewer in front
    blue = square(5.0, 10.0, (0.0, 0.0, 1.0))
    for meshes in ([red, blue], [blue, red]):
        picture = render(meshes, FRONT, pixels=40, supersample=1)
        rgba = picture.rgba
        # Screen centre: both squares cover it, the red one is nearer.
        centre = rgba[rgba.shape[0] // 2, rgba.shape[1] // 2]
        assert centre[0] > 0.9 and centre[2] == 0
        # A corner region only the larger blue square covers.
        corner = rgba[3, 3]
        assert corner[2] > 0.9 and corner[0] == 0
        assert (rgba[..., 0] > 0).sum() == 20 * 20  # the red square: 10 mm at 0.5 mm pixels


def test_a_sphere_covers_a_disc_and_is_lit_brightest_where_it_faces_the_viewer():
    radius = 10.0
    picture = render([sphere(radius)], FRONT, pixels=200, supersample=2)
    left, right, bottom, top = picture.extent
    pixel_mm = (right - left) / picture.rgba.shape[1]
    area_mm2 = picture.rgba[..., 3].sum() * pixel_mm**2
    # The icosphere's outline is a polygon slightly inside the circle.
    assert 0.985 * np.pi * radius**2 < area_mm2 < np.pi * radius**2
    middle = picture.rgba[picture.rgba.shape[0] // 2, picture.rgba.shape[1] // 2, 2]
    rim = picture.rgba[picture.rgba.shape[0] // 2, 3, 2]  # near the left edge of the disc
    assert middle > 0.79 and rim < middle


def test_elevation_looks_down_on_the_scene():
    view = View.of((1.0, 0.0, 0.0), (0.0, 0.0, 1.0), elevation_deg=30.0)
    assert np.allclose(view.toward_viewer, [0.0, -np.cos(np.radians(30)), np.sin(np.radians(30))])
    # A horizontal square (in z = 0) is seen from above: a band of height sin(30 deg) x its depth.
    points = np.array([[-5.0, -5.0, 0.0], [5.0, -5.0, 0.0], [5.0, 5.0, 0.0], [-5.0, 5.0, 0.0]])
    picture = render([Mesh(points, np.array([[0, 1, 2], [0, 2, 3]]), (1.0, 1.0, 1.0))], view, pixels=100, supersample=1)
    left, right, bottom, top = picture.extent
    height_mm = top - bottom - 2 * (right - left) / picture.rgba.shape[1]
    assert np.isclose(height_mm, 10 * np.sin(np.radians(30)), atol=0.11)


def test_nothing_to_draw_gives_an_empty_picture():
    picture = render([Mesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64), (1.0, 1.0, 1.0))], FRONT, pixels=10)
    assert picture.rgba[..., 3].sum() == 0
