"""A textured, shaded mesh renderer with ground-truth UV correspondence maps.

`render_mesh` projects a head mesh with an OpenCV camera
(`uika_jax.render.camera`), rasterizes it with the z-buffer rasterizer
(`uika_jax.render.mesh_raster`) and returns the shaded image together with the
per-pixel image UV, mask, depth, visible face and camera-space normal. It takes
plain arrays (vertices, faces, per-corner image UV, texture), no head model.
`render_mesh_batch` renders many views of one mesh topology (other vertices,
cameras, textures) in one compiled call: a synthetic dataset's frames. The
rasterizer's static `capacity` (slots for the faces' pixel bounding boxes,
about 2 to 3 per image pixel for a face-framed head) comes from
`mesh_capacity` on representative views; overflow is reported, never silent.

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
import math

import jax
import jax.numpy as jnp

from uika_jax.render.camera import project
from uika_jax.render.capacity import round_capacity
from uika_jax.render.mesh_raster import interpolate, needed_capacity, rasterize_triangles

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
      overflow: int32 scalar, faces whose coverage was clipped by the rasterizer's
        `capacity` (0 when it suffices).
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
    sq = x[..., 0:1] ** 2 + x[..., 1:2] ** 2 + x[..., 2:3] ** 2
    return x * jnp.where(sq > 0, jax.lax.rsqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def _rotate(points, viewmat):
    """Applies the rotation of a 4x4 world-to-camera matrix to points (..., 3).

    Multiply-adds rather than a matmul: XLA runs (N, 3) x (3, 3) products slowly on CPU.
    """
    rotation = viewmat[:3, :3]
    return sum(points[..., k : k + 1] * rotation[:, k] for k in range(3))


def _project_faces(vertices, faces, viewmat, K):
    """Returns the face corners in image coordinates (F, 3, 2) and their depths (F, 3)."""
    camera = _rotate(vertices, viewmat) + viewmat[:3, 3]
    return project(camera, K)[faces], camera[:, 2][faces]


def mesh_capacity(
    vertices: jax.Array,
    faces: jax.Array,
    viewmat: jax.Array,
    K: jax.Array,
    height: int,
    width: int,
    *,
    headroom: float = 1.0,
) -> int:
    """Returns a rasterizer capacity that renders these views without overflow (host side).

    The largest exact slot count (`needed_capacity`) over the views, times
    `headroom`, rounded up by `round_capacity` (a few sizes an octave). Use it
    eagerly on representative frames to choose `capacity` for jitted or batched
    renders (a headroom above 1 covers other poses and cameras).

    Args:
      vertices: (V, 3) world positions, or (B, V, 3) for B views.
      faces: (F, 3) vertex indices.
      viewmat: (4, 4) world-to-camera matrix, or (B, 4, 4).
      K: (3, 3) intrinsics, or (B, 3, 3).
      height: image height in pixels.
      width: image width in pixels.
      headroom: factor on the largest count (at least 1).

    Raises:
      ValueError: if headroom < 1 or the batch sizes differ.
    """
    if headroom < 1:
        raise ValueError(f"mesh_capacity: headroom must be at least 1, got {headroom}")
    vertices, viewmat, K = _as_views(vertices, viewmat, K, "mesh_capacity")
    faces = jnp.asarray(faces)
    needed = 0
    for view_vertices, view_viewmat, view_K in zip(vertices, viewmat, K, strict=True):
        corners, depth = _project_faces(view_vertices, faces, view_viewmat, view_K)
        needed = max(needed, needed_capacity(corners, depth, height, width))
    return round_capacity(math.ceil(needed * headroom))


def _as_views(vertices, viewmat, K, caller):
    """Broadcasts one view or a batch of views to (B, V, 3), (B, 4, 4), (B, 3, 3) float32."""
    vertices = jnp.asarray(vertices, jnp.float32)
    viewmat = jnp.asarray(viewmat, jnp.float32)
    K = jnp.asarray(K, jnp.float32)
    sizes = {a.shape[0] for a, rank in ((vertices, 3), (viewmat, 3), (K, 3)) if a.ndim == rank}
    if len(sizes) > 1:
        raise ValueError(
            f"{caller}: vertices {vertices.shape}, viewmat {viewmat.shape} and K {K.shape} "
            "have different batch sizes"
        )
    batch = sizes.pop() if sizes else 1
    return (
        jnp.broadcast_to(vertices, (batch, *vertices.shape[-2:])),
        jnp.broadcast_to(viewmat, (batch, 4, 4)),
        jnp.broadcast_to(K, (batch, 3, 3)),
    )


def _check_surface(faces, corner_uv, texture, caller):
    """Validates the texture inputs against `faces` (shapes only: no device work)."""
    num_faces = jnp.shape(faces)[0]
    if texture is not None and corner_uv is None:
        raise ValueError(f"{caller}: a texture needs corner_uv (the image UV of face corners)")
    if corner_uv is not None and jnp.shape(corner_uv) != (num_faces, 3, 2):
        raise ValueError(
            f"{caller}: corner_uv has shape {jnp.shape(corner_uv)}, "
            f"expected (F, 3, 2) = ({num_faces}, 3, 2)"
        )


def _shading_args(corner_uv, texture, light_dir, ambient, background):
    """The shading inputs as float32 arrays (None stays None)."""
    return (
        None if corner_uv is None else jnp.asarray(corner_uv, jnp.float32),
        None if texture is None else jnp.asarray(texture, jnp.float32),
        jnp.asarray(light_dir, jnp.float32),
        jnp.asarray(ambient, jnp.float32),
        jnp.broadcast_to(jnp.asarray(background, jnp.float32), (3,)),
    )


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
    capacity: int | None = None,
) -> MeshRender:
    """Renders a triangle mesh with an OpenCV camera.

    Jittable and vmappable over vertices / cameras when `capacity` is given
    (`mesh_capacity` helps choose it); height and width are static. For many
    views of one mesh topology, `render_mesh_batch` compiles once per batch shape.

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
      capacity: rasterizer slots (see `rasterize_triangles`); None sizes it from
        the data (eager calls only).

    Returns:
      The `MeshRender`.

    Raises:
      ValueError: if a texture is given without `corner_uv`, if `corner_uv` does
        not match `faces`, or if capacity is None under jit / vmap.
    """
    _check_surface(faces, corner_uv, texture, "render_mesh")
    if capacity is None:
        capacity = mesh_capacity(vertices, faces, viewmat, K, height, width)
    return _render_one(
        vertices, faces, viewmat, K, corner_uv, texture, light_dir, ambient, background,
        height=int(height), width=int(width), capacity=int(capacity),
    )  # fmt: skip


def render_mesh_batch(
    vertices: jax.Array,
    faces: jax.Array,
    viewmats: jax.Array,
    Ks: jax.Array,
    height: int,
    width: int,
    *,
    corner_uv: jax.Array | None = None,
    texture: jax.Array | None = None,
    light_dir: jax.Array | tuple[float, float, float] = DEFAULT_LIGHT_DIR,
    ambient: float = 0.35,
    background: float | jax.Array = 1.0,
    capacity: int | None = None,
) -> MeshRender:
    """Renders B views of one mesh topology in one compiled, vectorised call.

    One program per (B, mesh, texture shape, image size, capacity): calls with
    other vertices, cameras or textures of the same shapes reuse it. Give a
    fixed `capacity` (from `mesh_capacity` on representative views, with
    headroom) to keep it fixed across batches; overflow is reported per view.

    Args:
      vertices: (B, V, 3) world positions.
      faces: (F, 3) vertex indices, shared by the views.
      viewmats: (B, 4, 4) world-to-camera matrices.
      Ks: (B, 3, 3) intrinsics.
      height: image height H in pixels.
      width: image width W in pixels.
      corner_uv: optional (F, 3, 2) image UV of every face corner, shared.
      texture: optional albedo map, (Ht, Wt, 3) shared or (B, Ht, Wt, 3) per view.
      light_dir: (3,) camera-space direction towards the light, shared.
      ambient: ambient fraction in [0, 1], shared.
      background: colour of empty pixels, a scalar or (3,), shared.
      capacity: rasterizer slots per view; None: `mesh_capacity` of this batch.

    Returns:
      The `MeshRender` with a leading batch axis on every field (overflow (B,)).

    Raises:
      ValueError: as `render_mesh`, or if the batch sizes differ.
    """
    _check_surface(faces, corner_uv, texture, "render_mesh_batch")
    shapes = [jnp.shape(a) for a in (vertices, viewmats, Ks)]
    if [len(s) for s in shapes] != [3, 3, 3] or len({s[0] for s in shapes}) != 1:
        raise ValueError(
            "render_mesh_batch: expected vertices (B, V, 3), viewmats (B, 4, 4), Ks (B, 3, 3); "
            f"got {shapes[0]}, {shapes[1]}, {shapes[2]}"
        )
    if capacity is None:
        capacity = mesh_capacity(vertices, faces, viewmats, Ks, height, width)
    return _render_batch(
        vertices, faces, viewmats, Ks, corner_uv, texture, light_dir, ambient, background,
        height=int(height), width=int(width), capacity=int(capacity),
    )  # fmt: skip


def _shade(fragments, vertices, faces, viewmat, corner_uv, texture, light_dir, ambient, background):
    """One view's `MeshRender` from its fragments (vmapped over views)."""
    height, width = fragments.mask.shape
    mask = fragments.mask
    normals_cam = _rotate(vertex_normals(vertices, faces), viewmat)
    normals = _normalize(interpolate(fragments, normals_cam[faces]))

    image_uv = None if corner_uv is None else interpolate(fragments, corner_uv)

    if texture is None:
        albedo = jnp.full((height, width, 3), UNTEXTURED_ALBEDO, jnp.float32)
    else:
        albedo = sample_texture(texture, image_uv)
    light = _normalize(light_dir)
    lambert = jnp.maximum(sum(normals[..., k : k + 1] * light[k] for k in range(3)), 0.0)
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


def _render_views(
    vertices, faces, viewmats, Ks, corner_uv, texture, light_dir, ambient, background, *,
    height, width, capacity,
):  # fmt: skip
    """`render_mesh_batch` after its argument checks (traced).

    The views are rasterized together (the rasterizer's batched path) and shaded
    by `_shade` vmapped over them.
    """
    vertices, viewmats, Ks = (jnp.asarray(a, jnp.float32) for a in (vertices, viewmats, Ks))
    faces = jnp.asarray(faces)
    corner_uv, texture, light_dir, ambient, background = _shading_args(
        corner_uv, texture, light_dir, ambient, background
    )
    corners, depth = jax.vmap(_project_faces, in_axes=(0, None, 0, 0))(
        vertices, faces, viewmats, Ks
    )
    fragments = rasterize_triangles(corners, depth, height, width, capacity=capacity)
    texture_axis = None if texture is None or texture.ndim == 3 else 0
    return jax.vmap(_shade, in_axes=(0, 0, None, 0, None, texture_axis, None, None, None))(
        fragments, vertices, faces, viewmats, corner_uv, texture, light_dir, ambient, background
    )


_render_batch = jax.jit(_render_views, static_argnames=("height", "width", "capacity"))


@functools.partial(jax.jit, static_argnames=("height", "width", "capacity"))
def _render_one(vertices, faces, viewmat, K, *shading, height, width, capacity):
    """`render_mesh` after its argument checks: one view through `_render_views`."""
    views = _render_views(
        jnp.asarray(vertices)[None], faces, jnp.asarray(viewmat)[None], jnp.asarray(K)[None],
        *shading, height=height, width=width, capacity=capacity,
    )  # fmt: skip
    return jax.tree.map(lambda a: a[0], views)
