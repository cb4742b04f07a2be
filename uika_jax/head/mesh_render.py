"""A textured, shaded mesh renderer with ground-truth UV correspondence maps.

`render_mesh` projects a head mesh with an OpenCV camera
(`uika_jax.render.camera`), rasterizes it with the z-buffer rasterizer
(`uika_jax.head.mesh_raster`) and returns the shaded image together with the
per-pixel image UV (the project's UV convention, see `uika_jax.head.uv_raster`),
mask, depth, visible face and camera-space normal.

Shading: colour = albedo * (ambient + (1 - ambient) * max(0, n . l)), with n the
interpolated, renormalized vertex normal and l the unit light direction, both in
camera space (x right, y down, z forward; l points from the surface towards the
light). The albedo is the texture sampled bilinearly at the pixel's image UV, or
a uniform grey without texture.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from uika_jax.head.mesh_raster import (
    EXTENT_QUANTUM,
    interpolate,
    needed_extent,
    rasterize_triangles,
)
from uika_jax.head.model import HeadModel
from uika_jax.head.uv_raster import sample_texture, uv_to_image_uv
from uika_jax.render.camera import project, world_to_camera

DEFAULT_LIGHT_DIR = (0.3, -0.5, -1.0)
"""Camera-space direction towards the light: from the camera side, upper right."""

UNTEXTURED_ALBEDO = 0.7
"""Grey albedo used when no texture is given."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MeshRender:
    """A rendered mesh (H, W = image height and width).

    Attributes:
      image: (H, W, 3) float32 in [0, 1], shaded colour over the background.
      image_uv: (H, W, 2) float32 image UV of the surface point at each pixel
        (per face corner through `uv_faces`, so seams are exact); 0 where empty.
        None if the model has no UV layout.
      mask: (H, W) bool, whether the mesh covers the pixel.
      depth: (H, W) float32 camera depth; +inf where empty.
      triangle_id: (H, W) int32 visible face, -1 where empty.
      normals: (H, W, 3) float32 unit camera-space normals; 0 where empty.
      overflow: int32 scalar, faces whose coverage was clipped by `max_extent`.
    """

    image: jax.Array
    image_uv: jax.Array | None
    mask: jax.Array
    depth: jax.Array
    triangle_id: jax.Array
    normals: jax.Array
    overflow: jax.Array


def vertex_normals(vertices: jax.Array, faces: jax.Array) -> jax.Array:
    """Returns (V, 3) unit vertex normals, the area-weighted sum of the face normals.

    Faces are counter-clockwise seen from outside, so normals point outwards. A
    vertex in no face (or only in degenerate ones) gets a zero normal.

    Args:
      vertices: (V, 3) positions.
      faces: (F, 3) int vertex indices.
    """
    vertices = jnp.asarray(vertices)
    corners = vertices[jnp.asarray(faces)]
    face_normals = jnp.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    summed = jnp.zeros_like(vertices).at[jnp.asarray(faces)].add(face_normals[:, None, :])
    return _normalize(summed)


def _normalize(x: jax.Array) -> jax.Array:
    """Scales vectors (..., 3) to unit length; zero vectors stay zero (with zero gradient)."""
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jnp.where(sq > 0, jax.lax.rsqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def _project_faces(vertices, faces, viewmat, K):
    """Returns the face corners in image coordinates (F, 3, 2) and their depths (F, 3)."""
    corner_cam = world_to_camera(vertices, viewmat)[faces]
    return project(corner_cam, K), corner_cam[..., 2]


def mesh_extent(
    vertices: jax.Array,
    faces: jax.Array,
    viewmat: jax.Array,
    K: jax.Array,
    height: int,
    width: int,
    *,
    multiple_of: int = 1,
) -> int:
    """Returns the rasterizer window that renders this mesh view without overflow (host side).

    Use it eagerly on a representative view to choose `max_extent` for jitted
    `render_mesh` calls (add a margin for other poses and cameras).

    Args:
      vertices: (V, 3) world positions.
      faces: (F, 3) vertex indices.
      viewmat: (4, 4) world-to-camera matrix.
      K: (3, 3) intrinsics.
      height: image height in pixels.
      width: image width in pixels.
      multiple_of: round the result up to a multiple of this.
    """
    corners, depth = _project_faces(
        jnp.asarray(vertices, jnp.float32),
        jnp.asarray(faces),
        jnp.asarray(viewmat, jnp.float32),
        jnp.asarray(K, jnp.float32),
    )
    return needed_extent(corners, depth, height, width, multiple_of=multiple_of)


def render_mesh(
    vertices: jax.Array,
    model: HeadModel,
    viewmat: jax.Array,
    K: jax.Array,
    height: int,
    width: int,
    *,
    texture: jax.Array | None = None,
    light_dir: jax.Array | tuple[float, float, float] = DEFAULT_LIGHT_DIR,
    ambient: float = 0.35,
    background: float | jax.Array = 1.0,
    max_extent: int | None = None,
) -> MeshRender:
    """Renders a posed head mesh with an OpenCV camera.

    Jittable and vmappable over vertices / cameras when `max_extent` is given
    (`mesh_extent` helps choose it); height and width are static.

    Args:
      vertices: (V, 3) world positions of the model's vertices (e.g. after LBS).
      model: the head model (faces; uv_coords / uv_faces for image UV and texture).
      viewmat: (4, 4) world-to-camera matrix.
      K: (3, 3) intrinsics.
      height: image height H in pixels.
      width: image width W in pixels.
      texture: optional (R, R, 3) albedo UV map in [0, 1] (see `uika_jax.head.uv_raster`
        for the texel layout); None renders a uniform grey.
      light_dir: (3,) camera-space direction towards the light (normalized here).
      ambient: ambient fraction in [0, 1]; 1 disables directional shading.
      background: colour of empty pixels, a scalar or (3,).
      max_extent: rasterizer window (see `rasterize_triangles`); None sizes it from
        the data (eager calls only).

    Returns:
      The `MeshRender`.

    Raises:
      ValueError: if a texture is given and the model has no UV layout, or if
        max_extent is None under jit / vmap.
    """
    if texture is not None:
        model.require_uv("render_mesh with a texture")
    if max_extent is None:
        max_extent = mesh_extent(
            vertices, model.faces, viewmat, K, height, width, multiple_of=EXTENT_QUANTUM
        )
    return _render(
        jnp.asarray(vertices, jnp.float32),
        model.faces,
        model.uv_coords,
        model.uv_faces,
        jnp.asarray(viewmat, jnp.float32),
        jnp.asarray(K, jnp.float32),
        None if texture is None else jnp.asarray(texture, jnp.float32),
        jnp.asarray(light_dir, jnp.float32),
        jnp.asarray(ambient, jnp.float32),
        jnp.broadcast_to(jnp.asarray(background, jnp.float32), (3,)),
        height=int(height),
        width=int(width),
        max_extent=int(max_extent),
    )


@functools.partial(jax.jit, static_argnames=("height", "width", "max_extent"))
def _render(
    vertices,
    faces,
    uv_coords,
    uv_faces,
    viewmat,
    K,
    texture,
    light_dir,
    ambient,
    background,
    height,
    width,
    max_extent,
):
    """`render_mesh` on the arrays it needs (not the whole model: no blendshape transfers)."""
    corners, depth = _project_faces(vertices, faces, viewmat, K)
    fragments = rasterize_triangles(corners, depth, height, width, max_extent=max_extent)
    mask = fragments.mask

    normals_cam = vertex_normals(vertices, faces) @ viewmat[:3, :3].T
    normals = _normalize(interpolate(fragments, normals_cam[faces]))

    image_uv = None
    if uv_coords is not None:
        corner_uv = uv_to_image_uv(uv_coords[uv_faces])
        image_uv = interpolate(fragments, corner_uv)

    if texture is None:
        albedo = jnp.full((height, width, 3), UNTEXTURED_ALBEDO, jnp.float32)
    else:
        albedo = sample_texture(texture, image_uv)
    lambert = jnp.maximum(normals @ _normalize(light_dir), 0.0)[..., None]
    shade = ambient + (1.0 - ambient) * lambert
    image = jnp.where(mask[..., None], jnp.clip(albedo * shade, 0.0, 1.0), background)
    return MeshRender(
        image=image,
        image_uv=image_uv,
        mask=mask,
        depth=fragments.depth,
        triangle_id=fragments.triangle_id,
        normals=normals,
        overflow=fragments.overflow,
    )
