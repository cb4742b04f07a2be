"""Topology, rest geometry and UV layout of the built-in synthetic head.

The mesh has four parts:

* skin: a grid of rays from `synthetic_sculpt.RAY_ORIGIN` (rows of constant
  elevation from the neck base to a pole at the crown, columns of constant
  azimuth, denser on the face) projected onto the sculpted surface. Along the
  mouth line the grid is cut: the lip vertices between the mouth corners exist
  twice, an upper copy for the faces above and a lower copy for those below.
* mouth cavity: a pouch behind that slit (its rim copies the slit's vertices),
  dark in the albedo, so an open mouth shows a dark interior.
* eyeballs: two spheres (pupil pole on +z) in the eye sockets, under lids that
  the sculpt lays over them (`synthetic_sculpt.lid_radius`).

UV layout (the convention of `uika_jax.head.uv_raster`: v up): the skin is a
sinusoidal-like, area-preserving unwrapping of a surface of revolution, the
face in the middle, the seam down the back of the head (seam vertices have two
texture coordinates), with the face magnified (`FACE_UV_MAGNIFICATION`) but
uniformly, so UV areas stay proportional to 3D areas across the face; the
eyeballs are discs (azimuthal, the pupil at the centre, the front widened) and
the cavity a rectangle, in the room the skin leaves free.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from uika_jax.synthetic import sculpt as sculpt

NUM_COLUMNS = 66
"""Skin columns (even: the face's midline and the seam are columns)."""
ROWS_BELOW_MOUTH = 24
ROWS_ABOVE_MOUTH = 48
EYE_RING_ANGLES = np.deg2rad([7, 14, 21, 28, 36, 45, 56, 70, 88, 110, 135, 160])
"""Polar angles of the eyeball's rings from the pupil (the poles are extra vertices)."""
EYE_SEGMENTS = 16
EYE_UV_EXPONENT = 0.6
"""Eyeball disc radius = sin(polar angle / 2) ** this (1 would be equal-area): widens the iris."""
CAVITY_RINGS = 5
CAVITY_DEPTH = 0.03
CAVITY_HEIGHT = 0.009

SKIN, LEFT_EYE, RIGHT_EYE, CAVITY = 0, 1, 2, 3
"""Values of `MeshLayout.part`."""


@dataclasses.dataclass(frozen=True)
class MeshLayout:
    """The fixed structure of the synthetic head mesh.

    Attributes:
      faces: (F, 3) vertex indices, counter-clockwise seen from outside (seen from
        the mouth opening for the cavity).
      uv_coords: (T, 2) texture coordinates.
      uv_faces: (F, 3) indices into uv_coords.
      part: (V,) int8, SKIN / LEFT_EYE / RIGHT_EYE / CAVITY.
      directions: (V, 3) unit ray direction of each skin vertex (0 elsewhere).
      grid: (rows, NUM_COLUMNS) skin vertex indices (upper copies on the slit).
      pole: index of the crown vertex.
      mouth_row: row of the slit in `grid`.
      slit_columns: (n,) grid columns of the slit's interior (the corners excluded).
      lower_lip: (n,) vertex indices of the lower copies, beside those columns.
      lip_side: (V,) float, +1 on the upper side of the slit (upper copies and the
        cavity's upper half), -1 on the lower side, 0 elsewhere and at the corners.
      cavity_rim: (V,) int, for cavity vertices the slit vertex they follow, else -1.
      cavity_depth: (V,) float, 0 at the cavity's rim rising to 1 at its back.
      eye_offsets: (V, 3) eyeball vertex minus its eye centre, on the unit sphere.
    """

    faces: np.ndarray
    uv_coords: np.ndarray
    uv_faces: np.ndarray
    part: np.ndarray
    directions: np.ndarray
    grid: np.ndarray
    pole: int
    mouth_row: int
    slit_columns: np.ndarray
    lower_lip: np.ndarray
    lip_side: np.ndarray
    cavity_rim: np.ndarray
    cavity_depth: np.ndarray
    eye_offsets: np.ndarray

    @property
    def num_vertices(self) -> int:
        """Number of vertices V."""
        return self.part.shape[0]


def _warp(n: int, knots, densities) -> np.ndarray:
    """Returns n samples from knots[0] to knots[-1] whose local density follows `densities`."""
    x = np.linspace(knots[0], knots[-1], 4001)
    density = np.interp(x, knots, densities)
    mass = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(x))])
    return np.interp(np.linspace(0.0, mass[-1], n), mass, x)


def _columns() -> np.ndarray:
    """Column azimuths (NUM_COLUMNS,) from -pi; column NUM_COLUMNS // 2 is the midline."""
    half = _warp(NUM_COLUMNS // 2 + 1, [0, 40, 75, 180], [3.0, 3.0, 1.2, 0.9])
    return np.deg2rad(np.concatenate([-half[::-1][:-1], half[:-1]]))


def _mouth_elevation(params: dict[str, float]) -> float:
    """Elevation of the ray through the lips' crease on the midline (a groove: nearest exit)."""
    phi = np.deg2rad(np.linspace(-40.0, -12.0, 561))
    dirs = np.stack([np.zeros_like(phi), np.sin(phi), np.cos(phi)], axis=-1)
    t = sculpt.project_rays(dirs, params)
    grooves = np.nonzero((t[1:-1] < t[:-2]) & (t[1:-1] <= t[2:]))[0] + 1
    if grooves.size == 0:
        raise RuntimeError("synthetic head: no crease between the lips on the midline")
    mouth_height = params["mouth_y"] - sculpt.RAY_ORIGIN[1]
    best = grooves[np.argmin(np.abs(t[grooves] * np.sin(phi[grooves]) - mouth_height))]
    return float(np.rad2deg(phi[best]))


def _rows(mouth_deg: float) -> np.ndarray:
    """Row elevations in degrees, bottom (neck base) to top; the pole is extra."""
    below = _warp(
        ROWS_BELOW_MOUTH + 1,
        [-74, -70, -65, -60, -55, -50, mouth_deg],
        [6.6, 4.3, 2.8, 2.0, 1.6, 1.5, 3.2],
    )
    above = _warp(
        ROWS_ABOVE_MOUTH + 1,
        [mouth_deg, -10, 2, 8, 22, 36, 88],
        [3.2, 2.6, 2.4, 3.6, 3.6, 1.4, 0.7],
    )
    return np.concatenate([below, above[1:]])


def _sphere_directions(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Unit vectors for azimuth theta about +y (0 = +z, pi/2 = +x) and elevation phi."""
    theta, phi = np.broadcast_arrays(theta, phi)
    return np.stack(
        [np.cos(phi) * np.sin(theta), np.sin(phi), np.cos(phi) * np.cos(theta)], axis=-1
    )


class _Builder:
    """Accumulates vertices, faces and texture coordinates."""

    def __init__(self) -> None:
        self.part: list[int] = []
        self.directions: list[np.ndarray] = []
        self.faces: list[tuple[int, int, int]] = []
        self.uv_faces: list[tuple[int, int, int]] = []
        self.uv: list[np.ndarray] = []

    def add_vertices(self, n: int, part: int, directions: np.ndarray | None = None) -> np.ndarray:
        start = len(self.part)
        self.part += [part] * n
        self.directions += list(np.zeros((n, 3)) if directions is None else directions)
        return np.arange(start, start + n)

    def add_uv(self, uv: np.ndarray) -> np.ndarray:
        start = len(self.uv)
        self.uv += list(np.asarray(uv, np.float64).reshape(-1, 2))
        return np.arange(start, len(self.uv))

    def add_face(self, vertices, uvs) -> None:
        self.faces.append(tuple(int(v) for v in vertices))
        self.uv_faces.append(tuple(int(t) for t in uvs))


def _skin_uv_metric(skin: np.ndarray, grid: np.ndarray, pole: int, theta: np.ndarray):
    """Unwraps the skin grid in metres: (grid uv (rows, C + 1, 2), pole uv (2,)).

    Each row r keeps its mean radius rho_r (perimeter / 2 pi) and the meridian
    coordinate s_r (mean arc length from the neck base): (u, v) = (rho_r theta,
    s_r). Area is exactly preserved on a surface of revolution and roughly on
    the head; the seam at theta = +-pi falls down the back of the head.
    """
    rings = skin[grid]
    perimeter = np.linalg.norm(rings - np.roll(rings, -1, axis=1), axis=-1).sum(axis=1)
    rho = perimeter / (2.0 * np.pi)
    step = np.linalg.norm(rings[1:] - rings[:-1], axis=-1).mean(axis=1)
    s = np.concatenate([[0.0], np.cumsum(step)])
    s_pole = s[-1] + np.linalg.norm(skin[pole] - rings[-1], axis=-1).mean()
    full_theta = np.concatenate([theta, [np.pi]])
    uv = np.stack(np.broadcast_arrays(rho[:, None] * full_theta[None, :], s[:, None]), axis=-1)
    return uv, np.array([0.0, s_pole])


SKIN_UV_BOX = (0.02, 0.15, 0.98, 0.99)
"""(u0, v0, u1, v1): the skin chart is scaled into this box (u centred at 0.5)."""
EYE_UV_CHARTS = ((0.915, 0.075, 0.065), (0.085, 0.075, 0.065))
"""(u, v, radius) of the left (+x) and right eyeball discs."""
CAVITY_UV_BOX = (0.36, 0.01, 0.64, 0.12)
FACE_UV_HALF_EXTENT = (0.075, 0.11)
"""Half width and height (metres of the unwrap) of the face region that the UV magnifies."""
FACE_UV_CENTRE_HEIGHT = 0.0
"""The face region is centred on the midline skin at this height (the nose)."""
FACE_UV_MAGNIFICATION = 2.5
"""How much more the face is magnified than the rest of the head (a length ratio)."""


def _magnify_face(uv: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Radially magnifies the face in the metric unwrap, compressing the rest of the head.

    The map d -> d f(r) / r (r the elliptic radius of d = uv - centre in units
    of FACE_UV_HALF_EXTENT) scales the face uniformly (f(r) = r for r < 1, so
    UV areas stay proportional to 3D areas there) and grows more slowly
    beyond; f is smooth and increasing, so no triangles fold over.
    """
    d = uv - centre
    r = np.linalg.norm(d / FACE_UV_HALF_EXTENT, axis=-1, keepdims=True)
    sharpness = 4.0
    softplus = np.logaddexp(0.0, sharpness * (r - 1.0)) / sharpness
    f = r - (1.0 - 1.0 / FACE_UV_MAGNIFICATION) * softplus
    return centre + d * np.where(r > 1e-12, f / np.maximum(r, 1e-12), 1.0)


def _place_skin_uv(
    grid_uv: np.ndarray, pole_uv: np.ndarray, centre: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Magnifies the face and scales the unwrap into SKIN_UV_BOX.

    Separate u and v scales keep ratios of areas.
    """
    grid_uv, pole_uv = _magnify_face(grid_uv, centre), _magnify_face(pole_uv, centre)
    u0, v0, u1, v1 = SKIN_UV_BOX
    low = np.minimum(grid_uv.reshape(-1, 2).min(axis=0), pole_uv)
    high = np.maximum(grid_uv.reshape(-1, 2).max(axis=0), pole_uv)
    half_u = np.maximum(np.abs(low[0]), np.abs(high[0]))
    scale = np.array([(u1 - u0) / (2.0 * half_u), (v1 - v0) / (high[1] - low[1])])
    offset = np.array([0.5, v0 - scale[1] * low[1]])
    return grid_uv * scale + offset, pole_uv * scale + offset


def _add_skin(b: _Builder, params: dict[str, float]) -> dict:
    """Adds the skin grid, its slit and faces; returns the skin's indices and positions."""
    theta = _columns()
    rows = _rows(_mouth_elevation(params))
    num_rows, half = rows.shape[0], NUM_COLUMNS // 2
    dirs = _sphere_directions(theta[None, :], np.deg2rad(rows)[:, None])
    grid = b.add_vertices(dirs[..., 0].size, SKIN, dirs.reshape(-1, 3)).reshape(dirs.shape[:2])
    pole = int(b.add_vertices(1, SKIN, np.array([[0.0, 1.0, 0.0]]))[0])
    directions = np.asarray(b.directions)
    skin = sculpt.RAY_ORIGIN + sculpt.project_rays(directions, params)[:, None] * directions

    mouth_row = ROWS_BELOW_MOUTH
    mouth_z = skin[grid[mouth_row, half], 2] - sculpt.RAY_ORIGIN[2]
    corner = int(np.argmin(np.abs(theta[half:] - np.arctan2(params["mouth_w"], mouth_z))))
    if corner < 2:
        raise RuntimeError("synthetic head: the mouth spans fewer than two columns")
    slit_columns = np.arange(half - corner + 1, half + corner)
    lower_lip = b.add_vertices(slit_columns.size, SKIN, dirs[mouth_row, slit_columns])
    skin = np.concatenate([skin, skin[grid[mouth_row, slit_columns]]])

    metric_uv, metric_pole = _skin_uv_metric(skin, grid, pole, theta)
    midline = grid[:, half]
    face_row = np.argmin(
        np.abs(skin[midline, 1] - FACE_UV_CENTRE_HEIGHT) + (skin[midline, 2] < 0.05)
    )
    grid_uv, pole_uv = _place_skin_uv(metric_uv, metric_pole, metric_uv[face_row, half])
    uv_grid = b.add_uv(grid_uv).reshape(num_rows, NUM_COLUMNS + 1)
    uv_pole = int(b.add_uv(pole_uv)[0])
    below_mouth = grid.copy()
    below_mouth[mouth_row, slit_columns] = lower_lip
    for r in range(num_rows - 1):
        lower = grid[r]
        upper = below_mouth[r + 1] if r + 1 == mouth_row else grid[r + 1]
        for c in range(NUM_COLUMNS):
            c1 = (c + 1) % NUM_COLUMNS
            quad = (lower[c], lower[c1], upper[c1], upper[c])
            tex = (uv_grid[r, c], uv_grid[r, c + 1], uv_grid[r + 1, c + 1], uv_grid[r + 1, c])
            b.add_face((quad[0], quad[1], quad[2]), (tex[0], tex[1], tex[2]))
            b.add_face((quad[0], quad[2], quad[3]), (tex[0], tex[2], tex[3]))
    for c in range(NUM_COLUMNS):
        c1 = (c + 1) % NUM_COLUMNS
        b.add_face((grid[-1, c], grid[-1, c1], pole), (uv_grid[-1, c], uv_grid[-1, c + 1], uv_pole))
    left, right = grid[mouth_row, half - corner], grid[mouth_row, half + corner]
    rim = np.concatenate([[left], grid[mouth_row, slit_columns], [right], lower_lip[::-1]])
    return {
        "positions": skin,
        "grid": grid,
        "pole": pole,
        "mouth_row": mouth_row,
        "slit_columns": slit_columns,
        "lower_lip": lower_lip,
        "rim": rim,
    }


def _add_eyeball(b: _Builder, part: int, chart: tuple[float, float, float]) -> np.ndarray:
    """Adds a unit-sphere eyeball (pupil pole on +z); returns its vertices' offsets (n, 3)."""
    alpha = EYE_RING_ANGLES
    beta = 2.0 * np.pi * np.arange(EYE_SEGMENTS) / EYE_SEGMENTS
    ring = np.stack(
        np.broadcast_arrays(
            np.sin(alpha)[:, None] * np.cos(beta)[None, :],
            np.sin(alpha)[:, None] * np.sin(beta)[None, :],
            np.cos(alpha)[:, None],
        ),
        axis=-1,
    )
    offsets = np.concatenate([[[0.0, 0.0, 1.0]], ring.reshape(-1, 3), [[0.0, 0.0, -1.0]]])
    index = b.add_vertices(offsets.shape[0], part)
    front, rings, back = index[0], index[1:-1].reshape(alpha.size, EYE_SEGMENTS), index[-1]

    cu, cv, radius = chart
    seam_beta = np.concatenate([beta, [2.0 * np.pi]])
    ring_r = radius * np.sin(alpha / 2.0) ** EYE_UV_EXPONENT
    ring_uv = np.stack(
        np.broadcast_arrays(
            cu + ring_r[:, None] * np.cos(seam_beta)[None, :],
            cv + ring_r[:, None] * np.sin(seam_beta)[None, :],
        ),
        axis=-1,
    )
    uv_rings = b.add_uv(ring_uv).reshape(alpha.size, EYE_SEGMENTS + 1)
    uv_front = int(b.add_uv(np.array([cu, cv]))[0])
    mid = beta + np.pi / EYE_SEGMENTS
    uv_back = b.add_uv(np.stack([cu + radius * np.cos(mid), cv + radius * np.sin(mid)], -1))
    for s in range(EYE_SEGMENTS):
        s1 = (s + 1) % EYE_SEGMENTS
        b.add_face(
            (front, rings[0, s], rings[0, s1]), (uv_front, uv_rings[0, s], uv_rings[0, s + 1])
        )
        for k in range(alpha.size - 1):
            quad = (rings[k, s], rings[k + 1, s], rings[k + 1, s1], rings[k, s1])
            tex = (uv_rings[k, s], uv_rings[k + 1, s], uv_rings[k + 1, s + 1], uv_rings[k, s + 1])
            b.add_face((quad[0], quad[1], quad[2]), (tex[0], tex[1], tex[2]))
            b.add_face((quad[0], quad[2], quad[3]), (tex[0], tex[2], tex[3]))
        b.add_face(
            (rings[-1, s], back, rings[-1, s1]), (uv_rings[-1, s], uv_back[s], uv_rings[-1, s + 1])
        )
    return offsets


def _add_cavity(b: _Builder, rim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Adds the mouth pouch behind the slit.

    Args:
      b: the builder.
      rim: (L,) skin vertices around the slit (left corner, upper copies, right
        corner, lower copies).

    Returns:
      (the skin vertex each cavity vertex follows (n,), depth fraction (n,)).
    """
    loop = rim.shape[0]
    rings = b.add_vertices(loop * (CAVITY_RINGS + 1), CAVITY).reshape(CAVITY_RINGS + 1, loop)
    centre = int(b.add_vertices(1, CAVITY)[0])
    u0, v0, u1, v1 = CAVITY_UV_BOX
    us = np.linspace(u0, u1, loop + 1)
    vs = np.linspace(v1, v0, CAVITY_RINGS + 2)
    uv = b.add_uv(np.stack(np.meshgrid(us, vs[:-1]), axis=-1)).reshape(CAVITY_RINGS + 1, loop + 1)
    uv_centre = b.add_uv(np.stack([0.5 * (us[1:] + us[:-1]), np.full(loop, v0)], axis=-1))
    for i in range(loop):
        i1 = (i + 1) % loop
        for k in range(CAVITY_RINGS):
            quad = (rings[k, i], rings[k + 1, i], rings[k + 1, i1], rings[k, i1])
            tex = (uv[k, i], uv[k + 1, i], uv[k + 1, i + 1], uv[k, i + 1])
            b.add_face((quad[0], quad[1], quad[2]), (tex[0], tex[1], tex[2]))
            b.add_face((quad[0], quad[2], quad[3]), (tex[0], tex[2], tex[3]))
        b.add_face((rings[-1, i], centre, rings[-1, i1]), (uv[-1, i], uv_centre[i], uv[-1, i + 1]))
    follows = np.concatenate([np.tile(rim, CAVITY_RINGS + 1), [rim[0]]])
    depth = np.concatenate(
        [np.repeat(np.arange(CAVITY_RINGS + 1) / (CAVITY_RINGS + 1), loop), [1.0]]
    )
    return follows, depth


def attached_positions(
    layout: MeshLayout, skin: np.ndarray, params: dict[str, float]
) -> np.ndarray:
    """Returns all vertices (V, 3): the skin's as given, eyeballs and cavity placed from them.

    Args:
      layout: the mesh structure.
      skin: (V, 3) positions whose skin rows are used (other rows are ignored).
      params: sculpt parameters (eye centres and radius, mouth line).
    """
    out = np.array(skin, np.float64)
    centres = sculpt.eye_centres(params)
    for part, centre in ((LEFT_EYE, centres[0]), (RIGHT_EYE, centres[1])):
        sel = layout.part == part
        out[sel] = centre + params["eye_r"] * layout.eye_offsets[sel]
    sel = np.nonzero(layout.part == CAVITY)[0]
    rim = out[layout.cavity_rim[sel]]
    f = layout.cavity_depth[sel][:, None]
    side = layout.lip_side[sel][:, None]
    corner_x = np.abs(rim[:, 0]).max()
    opening = np.sin(np.pi * np.minimum(f, 1.0)) * (1.0 - (rim[:, :1] / corner_x) ** 2)
    x = rim[:, :1] * (1.0 - 0.4 * f)
    y = params["mouth_y"] + (rim[:, 1:2] - params["mouth_y"]) * (1.0 - f)
    y = y + side * CAVITY_HEIGHT * opening
    z = rim[:, 2:] - CAVITY_DEPTH * f
    out[sel] = np.concatenate([x, y, z], axis=-1)
    back = sel[layout.cavity_depth[sel] == 1.0]
    out[back] = [0.0, params["mouth_y"], rim[:, 2].mean() - CAVITY_DEPTH]
    return out


def build_layout(params: dict[str, float]) -> tuple[MeshLayout, np.ndarray]:
    """Builds the mesh structure and its rest vertices for a sculpt.

    The topology depends only on the module constants and on where the sculpt's
    lips meet (which row the slit takes): call it with the base parameters.

    Args:
      params: sculpt parameters (`synthetic_sculpt.BASE_PARAMS`).

    Returns:
      (layout, rest vertices (V, 3) float64).
    """
    b = _Builder()
    skin = _add_skin(b, params)
    eye_offsets = [
        _add_eyeball(b, part, chart)
        for part, chart in ((LEFT_EYE, EYE_UV_CHARTS[0]), (RIGHT_EYE, EYE_UV_CHARTS[1]))
    ]
    follows, depth = _add_cavity(b, skin["rim"])
    num_vertices = len(b.part)
    part = np.asarray(b.part, np.int8)

    lip_side = np.zeros(num_vertices)
    lip_side[skin["grid"][skin["mouth_row"], skin["slit_columns"]]] = 1.0
    lip_side[skin["lower_lip"]] = -1.0
    cavity_rim = np.full(num_vertices, -1)
    cavity_rim[part == CAVITY] = follows
    cavity_depth = np.zeros(num_vertices)
    cavity_depth[part == CAVITY] = depth
    lip_side[part == CAVITY] = np.where(depth < 1.0, lip_side[follows], 0.0)
    offsets = np.zeros((num_vertices, 3))
    offsets[part == LEFT_EYE] = eye_offsets[0]
    offsets[part == RIGHT_EYE] = eye_offsets[1]
    layout = MeshLayout(
        faces=np.asarray(b.faces, np.int32),
        uv_coords=np.asarray(b.uv, np.float32),
        uv_faces=np.asarray(b.uv_faces, np.int32),
        part=part,
        directions=np.asarray(b.directions),
        grid=skin["grid"],
        pole=skin["pole"],
        mouth_row=skin["mouth_row"],
        slit_columns=skin["slit_columns"],
        lower_lip=skin["lower_lip"],
        lip_side=lip_side,
        cavity_rim=cavity_rim,
        cavity_depth=cavity_depth,
        eye_offsets=offsets,
    )
    positions = np.zeros((num_vertices, 3))
    positions[: skin["positions"].shape[0]] = skin["positions"]
    return layout, attached_positions(layout, positions, params)
