"""A textured, shaded mesh renderer with ground-truth UV correspondence maps.

`render_mesh` projects a head mesh with an OpenCV camera
(`uika_jax.render.camera`), rasterizes it with the z-buffer rasterizer
(`uika_jax.render.mesh_raster`) and returns the shaded image together with the
per-pixel image UV, mask, depth, visible face and camera-space normal. It takes
plain arrays (vertices, faces, per-corner image UV, texture), no head model.

Image UV: both axes in [0, 1], the second pointing down like image rows; a
texture of Ht x Wt texels has texel (i, j) centred at image UV
((j + 0.5) / Wt, (i + 0.5) / Ht). (A head model's texture coordinates, v up,
convert with `uika_jax.head.uv_raster.corner_image_uv`.)

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

from uika_jax.render.camera import project, world_to_camera
from uika_jax.render.mesh_raster import (
    EXTENT_QUANTUM,
    interpolate,
    needed_extent,
    rasterize_triangles,
)

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
        None if no `corner_uv` is given.
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


def sample_texture(texture: jax.Array, image_uv: jax.Array) -> jax.Array:
    """Samples a texture bilinearly at image-UV points, clamping to the edge texels.

    Differentiable with respect to the texture and to the points.

    Args:
      texture: (Ht, Wt, C) map; texel (i, j) has its centre at image UV
        ((j + 0.5) / Wt, (i + 0.5) / Ht) (Ht = Wt = R for UV maps).
      image_uv: (..., 2) image-UV points.

    Returns:
      (..., C) sampled values.
    """
    texture = jnp.asarray(texture)
    image_uv = jnp.asarray(image_uv)
    tex_h, tex_w = texture.shape[:2]
    x = image_uv[..., 0] * tex_w - 0.5
    y = image_uv[..., 1] * tex_h - 0.5
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    c0 = jnp.clip(x0, 0, tex_w - 1).astype(jnp.int32)
    c1 = jnp.clip(x0 + 1, 0, tex_w - 1).astype(jnp.int32)
    r0 = jnp.clip(y0, 0, tex_h - 1).astype(jnp.int32)
    r1 = jnp.clip(y0 + 1, 0, tex_h - 1).astype(jnp.int32)
    top = texture[r0, c0] * (1 - fx) + texture[r0, c1] * fx
    bottom = texture[r1, c0] * (1 - fx) + texture[r1, c1] * fx
    return top * (1 - fy) + bottom * fy


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
    faces: jax.Array,
    viewmat: jax.Array,
    K: jax.Array,
    height: int,
    width: int,
    *,
    corner_uv: jax.Array | None = None,
    texture: jax.Array | None = None,
    light_dir: jax.Array | tuple[float, float, float] = DEFAULT_LIGHT_DIR,
    ambient: float = 0.35,
    background: float | jax.Array = 1.0,
    max_extent: int | None = None,
) -> MeshRender:
    """Renders a triangle mesh with an OpenCV camera.

    Jittable and vmappable over vertices / cameras when `max_extent` is given
    (`mesh_extent` helps choose it); height and width are static.

    Args:
      vertices: (V, 3) world positions (e.g. a head model's vertices after LBS).
      faces: (F, 3) vertex indices, counter-clockwise seen from outside.
      viewmat: (4, 4) world-to-camera matrix.
      K: (3, 3) intrinsics.
      height: image height H in pixels.
      width: image width W in pixels.
      corner_uv: optional (F, 3, 2) image UV of every face corner (module docstring);
        needed for `image_uv` and for a texture.
      texture: optional (Ht, Wt, 3) albedo map in [0, 1], sampled at the image UV;
        None renders a uniform grey.
      light_dir: (3,) camera-space direction towards the light (normalized here).
      ambient: ambient fraction in [0, 1]; 1 disables directional shading.
      background: colour of empty pixels, a scalar or (3,).
      max_extent: rasterizer window (see `rasterize_triangles`); None sizes it from
        the data (eager calls only).

    Returns:
      The `MeshRender`.

    Raises:
      ValueError: if a texture is given without `corner_uv`, if `corner_uv` does
        not match `faces`, or if max_extent is None under jit / vmap.
    """
    faces = jnp.asarray(faces)
    if texture is not None and corner_uv is None:
        raise ValueError("render_mesh: a texture needs corner_uv (the image UV of face corners)")
    if corner_uv is not None and jnp.shape(corner_uv) != (faces.shape[0], 3, 2):
        raise ValueError(
            f"render_mesh: corner_uv has shape {jnp.shape(corner_uv)}, "
            f"expected (F, 3, 2) = ({faces.shape[0]}, 3, 2)"
        )
    if max_extent is None:
        max_extent = mesh_extent(
            vertices, faces, viewmat, K, height, width, multiple_of=EXTENT_QUANTUM
        )
    return _render(
        jnp.asarray(vertices, jnp.float32),
        faces,
        None if corner_uv is None else jnp.asarray(corner_uv, jnp.float32),
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
    corner_uv,
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
    """`render_mesh` after its argument checks (jitted)."""
    corners, depth = _project_faces(vertices, faces, viewmat, K)
    fragments = rasterize_triangles(corners, depth, height, width, max_extent=max_extent)
    mask = fragments.mask

    normals_cam = vertex_normals(vertices, faces) @ viewmat[:3, :3].T
    normals = _normalize(interpolate(fragments, normals_cam[faces]))

    image_uv = None if corner_uv is None else interpolate(fragments, corner_uv)

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
