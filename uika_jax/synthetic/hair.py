"""Hair as render-only geometry attached to the built-in synthetic head.

Hair is not part of the head model (FLAME has none either: an avatar covers it
with offsets), so anchors, the model arrays and its fingerprint never see it.
`hair_mesh(model, identity_seed)` builds one identity's hair (the style drawn
by `uika_jax.synthetic.identity.identity_traits`, its proportions by
`hairstyle.hair_style`) as a triangle mesh of fixed topology: a pole on the
crown and HAIR_COLUMNS strands of HAIR_ROWS vertices each, running from the
crown down to the hairline (tucked under the skin there) or, for longer
styles, past a release line where they leave the scalp and hang down as a
curtain (a fringe in front). Every vertex is attached to a scalp vertex of
the head: its rest position is stored as an offset in a frame spanned by that
vertex and two scalp neighbours, so `pose_hair(hair, posed_head_vertices)`
carries the hair along with any head pose (the scalp anchors are skinned
wholly to the neck joint, and expressions do not move them).

The rest geometry is built in the head's star-shaped parameterisation: every
skin vertex lies on a ray from `sculpt.RAY_ORIGIN` with a fixed direction
(azimuth, elevation), so the identity's scalp is a radius per direction
(`_ScalpRadius`). The cap lies `thickness` above it; curtain points closer to
the skin than CLEARANCE are pushed out along their rays, so the scalp, ears
and neck never poke through. Bald identities get a mesh whose faces are all
degenerate (they cover no pixel), so every `HairShape` has the same shapes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from uika_jax.head.model import HeadModel
from uika_jax.synthetic import mesh as mesh
from uika_jax.synthetic import sculpt as sculpt
from uika_jax.synthetic.hairstyle import (
    HairStyle,
    hair_style,
    hairline_height,
    ray_direction,
    strand_colours,
)
from uika_jax.synthetic.head import identity_coefficients, synthetic_layout

_DEG = np.pi / 180.0
HAIR_COLUMNS = 96
"""Strands around the head (uniform in azimuth)."""
HAIR_ROWS = 44
"""Vertices along each strand below the crown pole."""
CLEARANCE = 0.003
"""Least distance (metres, along the head's rays) of curtain vertices above the skin."""
TUCK = 0.0015
"""How deep under the skin a strand that ends at the hairline ends."""
EXPRESSION_MOTION = 1e-4
"""Largest expression displacement (metres per unit coefficient) of a skin vertex that may carry
hair."""
POSE_MOTION = 1e-6
"""Largest pose-corrective displacement (metres per unit feature) of a skin vertex that may
carry hair, so that poses move the hair rigidly."""
FRAME_STEP = 2
"""Grid steps (columns, rows) between an anchor and the two neighbours spanning its frame."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HairShape:
    """One identity's hair: static topology and its attachment to the head's vertices.

    Attributes:
      anchors: (H, 3) int32 head vertex indices (a, b, c) spanning each hair vertex's
        frame: origin a, first axis towards b, normal from the cross product with c - a.
      offsets: (H, 3) float32 rest position in that frame (metres).
      faces: (F, 3) int32 hair vertex indices, counter-clockwise seen from outside;
        all rows equal (degenerate, covering no pixel) for a bald identity.
      colours: (H, 3) float32 per-vertex albedo in [0, 1].
      style: the hair style's name (`identity.HAIR_STYLES`).
    """

    anchors: jax.Array
    offsets: jax.Array
    faces: jax.Array
    colours: jax.Array
    style: str = dataclasses.field(metadata={"static": True})


def _frames(vertices, anchors, xp=jnp):
    """Orthonormal frames (..., H, 3, 3) (rows: tangent, bitangent, normal) and their origins.

    `xp` is the array module (jax.numpy, or numpy for float64 rest frames).
    """
    a = vertices[..., anchors[:, 0], :]
    first = vertices[..., anchors[:, 1], :] - a
    second = vertices[..., anchors[:, 2], :] - a
    tangent = first / xp.linalg.norm(first, axis=-1, keepdims=True)
    normal = xp.cross(tangent, second)
    normal = normal / xp.linalg.norm(normal, axis=-1, keepdims=True)
    return xp.stack([tangent, xp.cross(normal, tangent), normal], axis=-2), a


def pose_hair(
    hair: HairShape, posed_head_vertices: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Places the hair on posed head vertices.

    Jittable; leading batch dimensions of the vertices carry through.

    Args:
      hair: from `hair_mesh` (same head model and identity as the vertices).
      posed_head_vertices: (..., V, 3) head vertices after LBS.

    Returns:
      (vertices (..., H, 3) float32, faces (F, 3) int32, colours (H, 3) float32).
    """
    vertices = jnp.asarray(posed_head_vertices, jnp.float32)
    frames, origins = _frames(vertices, hair.anchors)
    placed = origins + jnp.einsum("...hk,...hkc->...hc", hair.offsets, frames)
    return placed, hair.faces, hair.colours


class _ScalpRadius:
    """Distance from `sculpt.RAY_ORIGIN` to the skin by ray direction (bilinear on the grid).

    Args:
      layout: the synthetic mesh structure.
      vertices: (V, 3) head vertices at rest (the template or an identity).
    """

    def __init__(self, layout: mesh.MeshLayout, vertices: np.ndarray) -> None:
        grid = layout.grid
        directions = layout.directions
        self.elevations = np.append(np.arcsin(directions[grid[:, 0], 1]), 0.5 * np.pi)
        azimuths = np.arctan2(directions[grid[0], 0], directions[grid[0], 2])
        order = np.argsort(azimuths)
        self.azimuths = np.concatenate([azimuths[order], [azimuths[order][0] + 2.0 * np.pi]])
        radius = np.linalg.norm(vertices[grid] - sculpt.RAY_ORIGIN, axis=-1)[:, order]
        pole = np.linalg.norm(vertices[layout.pole] - sculpt.RAY_ORIGIN)
        radius = np.concatenate([radius, np.full((1, radius.shape[1]), pole)])
        self.radius = np.concatenate([radius, radius[:, :1]], axis=1)

    def __call__(self, azimuth: np.ndarray, elevation_: np.ndarray) -> np.ndarray:
        """Radius at directions given by azimuth (about +y, 0 = +z) and elevation (radians)."""
        start = self.azimuths[0]
        az = np.mod(np.asarray(azimuth) - start, 2.0 * np.pi) + start
        el = np.clip(elevation_, self.elevations[0], self.elevations[-1])
        j = np.clip(np.searchsorted(self.azimuths, az) - 1, 0, self.azimuths.size - 2)
        i = np.clip(np.searchsorted(self.elevations, el) - 1, 0, self.elevations.size - 2)
        s = (az - self.azimuths[j]) / (self.azimuths[j + 1] - self.azimuths[j])
        t = (el - self.elevations[i]) / (self.elevations[i + 1] - self.elevations[i])
        r = self.radius
        return (1 - t) * ((1 - s) * r[i, j] + s * r[i, j + 1]) + t * (
            (1 - s) * r[i + 1, j] + s * r[i + 1, j + 1]
        )


def _push_out(points: np.ndarray, scalp: _ScalpRadius) -> np.ndarray:
    """Moves points closer than CLEARANCE to the skin (along its rays) out to that distance."""
    rel = points - sculpt.RAY_ORIGIN
    distance = np.linalg.norm(rel, axis=-1)
    azimuth = np.arctan2(rel[..., 0], rel[..., 2])
    elev = np.arcsin(np.clip(rel[..., 1] / np.maximum(distance, 1e-12), -1.0, 1.0))
    least = scalp(azimuth, elev) + CLEARANCE
    scale = np.maximum(least / np.maximum(distance, 1e-12), 1.0)
    return sculpt.RAY_ORIGIN + rel * scale[..., None]


def _hairline_elevation(template: _ScalpRadius, azimuth: np.ndarray, height: np.ndarray):
    """Elevation (per azimuth) where the template's skin reaches the given height."""
    elevations = np.linspace(-70.0 * _DEG, 89.5 * _DEG, 320)
    az, el = np.meshgrid(azimuth, elevations, indexing="ij")
    heights = sculpt.RAY_ORIGIN[1] + template(az, el) * np.sin(el)
    return np.array([np.interp(h, row, elevations) for h, row in zip(height, heights, strict=True)])


def _strands(
    style: HairStyle, scalp: _ScalpRadius, template: _ScalpRadius, fringe_bottom: float
) -> np.ndarray:
    """Rest positions (HAIR_COLUMNS, HAIR_ROWS + 1, 3) of the strands, row 0 on the crown.

    Each strand runs over the scalp from the crown down to the hairline, or, where
    a curtain hangs (`HairStyle.curtain_bottom`), to where it leaves the scalp and
    then straight down to the curtain's bottom, its rows spread evenly over its length.
    """
    azimuth = np.linspace(-np.pi, np.pi, HAIR_COLUMNS, endpoint=False)
    hairline = _hairline_elevation(template, azimuth, hairline_height(style, azimuth))
    leave = np.maximum(hairline, style.release_elevation(azimuth))
    leave_height = sculpt.RAY_ORIGIN[1] + (
        scalp(azimuth, leave) + style.thickness(azimuth, leave)
    ) * np.sin(leave)
    bottom, weight = style.curtain_bottom(azimuth, fringe_bottom)
    curtain = np.maximum(leave_height - bottom, 0.0) * weight
    hangs = sculpt.smoothstep(0.0, 0.02, curtain)
    end = hairline + (leave - hairline) * hangs
    cap_arc = (0.5 * np.pi - end) * scalp(azimuth, 0.5 * (end + 0.5 * np.pi))
    along = (cap_arc + curtain)[:, None] * np.linspace(0.0, 1.0, HAIR_ROWS + 1)[None, :]
    on_cap = along <= cap_arc[:, None]
    az = np.broadcast_to(azimuth[:, None], along.shape)
    elev = 0.5 * np.pi - (0.5 * np.pi - end[:, None]) * np.minimum(along / cap_arc[:, None], 1.0)
    to_end = np.maximum(cap_arc[:, None] - along, 0.0)
    edge = 1.0 - (1.0 - hangs[:, None]) * (1.0 - sculpt.smoothstep(0.0, style.taper, to_end))
    lift = style.thickness(az, elev) * edge - TUCK * (1.0 - edge)
    cap = sculpt.RAY_ORIGIN + (scalp(az, elev) + lift)[..., None] * ray_direction(az, elev)
    release = sculpt.RAY_ORIGIN + (scalp(azimuth, end) + style.thickness(azimuth, end))[
        :, None
    ] * ray_direction(azimuth, end)
    hang = np.maximum(along - cap_arc[:, None], 0.0)
    outward = np.stack([np.sin(az), np.zeros_like(az), np.cos(az)], axis=-1)
    sway = style.curtain_sway(az, hang, curtain[:, None])
    hanging = release[:, None] + hang[..., None] * [0.0, -1.0, 0.0] + sway[..., None] * outward
    return np.where(on_cap[..., None], cap, _push_out(hanging, scalp))


def _anchor_frames(layout: mesh.MeshLayout, model: HeadModel) -> np.ndarray:
    """(A, 3) head vertex triples usable as anchors: rigid scalp vertices and two neighbours."""
    rigid = (
        (layout.part == mesh.SKIN)
        & (model.lbs_weights[:, 1] > 1.0 - 1e-6)
        & (np.abs(model.exprdirs).max(axis=(1, 2)) < EXPRESSION_MOTION)
        & (np.abs(model.posedirs).max(axis=(1, 2)) < POSE_MOTION)
    )
    grid, rows = layout.grid, layout.grid.shape[0]
    r, c = np.meshgrid(np.arange(rows), np.arange(grid.shape[1]), indexing="ij")
    beside = grid[r, (c + FRAME_STEP) % grid.shape[1]]
    above = grid[np.where(r + FRAME_STEP < rows, r + FRAME_STEP, r - FRAME_STEP), c]
    triples = np.stack([grid, beside, above], axis=-1).reshape(-1, 3)
    return triples[rigid[triples].all(axis=1)]


def _faces() -> np.ndarray:
    """Faces (F, 3) of the strand grid: a fan around the crown pole, then quads."""
    columns = np.arange(HAIR_COLUMNS)
    following = (columns + 1) % HAIR_COLUMNS

    def index(row, column):
        return 1 + column * HAIR_ROWS + (row - 1)

    fan = np.stack([np.zeros(HAIR_COLUMNS, np.int64), index(1, following), index(1, columns)], -1)
    row = np.arange(1, HAIR_ROWS)[:, None]
    a, b = index(row, columns), index(row, following)
    c, d = index(row + 1, following), index(row + 1, columns)
    quads = np.concatenate([np.stack([a, b, c], -1), np.stack([a, c, d], -1)]).reshape(-1, 3)
    return np.concatenate([fan, quads]).astype(np.int32)


def hair_mesh(model: HeadModel, identity_seed: int, style: str | None = None) -> HairShape:
    """Builds one identity's hair on the built-in synthetic head.

    Deterministic per seed. The identity's rest head (template plus its shape
    blendshapes, `identity_coefficients`) carries the hair's rest geometry.

    Args:
      model: the built-in synthetic head model (`synthetic_head_model()`).
      identity_seed: identity seed, a non-negative int.
      style: a name from `identity.HAIR_STYLES` to use instead of the identity's own.

    Returns:
      The `HairShape`.

    Raises:
      ValueError: if the model is not the synthetic head's topology, or the style
        is unknown.
    """
    layout, template = synthetic_layout()
    if model.num_vertices != layout.num_vertices:
        raise ValueError(
            f"hair_mesh: the model has {model.num_vertices} vertices, the synthetic head "
            f"{layout.num_vertices}; hair attaches to the built-in synthetic head only"
        )
    look = hair_style(identity_seed, style)
    shape = identity_coefficients(identity_seed, model.num_shape)
    rest = np.asarray(model.v_template, np.float64) + np.asarray(model.shapedirs) @ shape
    eyes = rest[np.isin(layout.part, [mesh.LEFT_EYE, mesh.RIGHT_EYE])]
    strands = _strands(
        look,
        _ScalpRadius(layout, rest),
        _ScalpRadius(layout, template),
        fringe_bottom=float(eyes[:, 1].mean()) + (look.fringe_clearance or 0.0),
    )
    crown = strands[:, 0].mean(axis=0)
    points = np.concatenate([crown[None], strands[:, 1:].reshape(-1, 3)])
    faces = _faces()
    outward = np.cross(
        points[faces[:, 1]] - points[faces[:, 0]], points[faces[:, 2]] - points[faces[:, 0]]
    )
    if np.sum(outward * (points[faces].mean(axis=1) - sculpt.RAY_ORIGIN)) < 0.0:
        faces = faces[:, ::-1]
    if look.bald:
        faces = np.zeros_like(faces)
    triples = _anchor_frames(layout, model)
    candidates = rest[triples[:, 0]]
    nearest = np.argmin(np.sum(candidates**2, axis=1) - 2.0 * points @ candidates.T, axis=1)
    anchors = triples[nearest]
    frames, origins = _frames(rest, anchors, np)
    offsets = np.einsum("hkc,hc->hk", frames, points - origins)
    colours = strand_colours(look, HAIR_COLUMNS, HAIR_ROWS)
    return HairShape(
        anchors=jnp.asarray(anchors, jnp.int32),
        offsets=jnp.asarray(offsets, jnp.float32),
        faces=jnp.asarray(np.ascontiguousarray(faces), jnp.int32),
        colours=jnp.asarray(colours, jnp.float32),
        style=look.name,
    )
