"""The UV convention of the project, the rasterized UV layout, and texture sampling.

UV convention (the project's single definition; everything else uses these helpers):

* Texture coordinates (u, v), as stored in `HeadModel.uv_coords`, have v
  pointing up (the OBJ convention), both in [0, 1].
* "Image UV" is (u, 1 - v): both axes in [0, 1], the second pointing down like
  image rows. Correspondence maps store image UV (as Pixel3DMM does).
  `uv_to_image_uv` converts (it is its own inverse).
* A UV map image (texture) of R x R texels has texel (row i, column j) with its
  centre at image UV ((j + 0.5) / R, (i + 0.5) / R), i.e. at
  u = (j + 0.5) / R, v = 1 - (i + 0.5) / R. Image UV times R is therefore an
  image coordinate in the sense of `uika_jax.render.camera` (x = column,
  y = row, pixel centres at half-integers), and the texel containing an
  image-UV point p is (row floor(p[1] * R), column floor(p[0] * R))
  (`image_uv_to_texel`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from uika_jax.head.mesh_raster import rasterize_triangles
from uika_jax.head.model import HeadModel


def uv_to_image_uv(uv: jax.Array) -> jax.Array:
    """Converts texture coordinates (u, v) (..., 2) to image UV (u, 1 - v), and back."""
    uv = jnp.asarray(uv)
    return jnp.stack([uv[..., 0], 1.0 - uv[..., 1]], axis=-1)


def image_uv_to_texel(image_uv: jax.Array, resolution: int) -> tuple[jax.Array, jax.Array]:
    """Returns the texel (rows, columns) containing image-UV points, clamped to the map.

    Args:
      image_uv: (..., 2) image-UV points.
      resolution: side R of the UV map.

    Returns:
      (rows, columns), each (...) int32 in [0, R); index a map as `uv_map[rows, columns]`.
    """
    texel = jnp.clip(jnp.floor(jnp.asarray(image_uv) * resolution), 0, resolution - 1)
    texel = texel.astype(jnp.int32)
    return texel[..., 1], texel[..., 0]


def texel_centers(resolution: int) -> jax.Array:
    """Returns (R, R, 2) image UV of the texel centres: [i, j] = ((j+0.5)/R, (i+0.5)/R)."""
    centres = (jnp.arange(resolution, dtype=jnp.float32) + 0.5) / resolution
    cols, rows = jnp.meshgrid(centres, centres, indexing="xy")
    return jnp.stack([cols, rows], axis=-1)


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UVRaster:
    """The UV layout of a head model rasterized into an R x R map.

    Attributes:
      face_id: (R, R) int32, the face whose UV triangle holds the texel centre, -1 outside.
      barycentrics: (R, R, 3) float32, barycentrics of the texel centre w.r.t. that
        face's corners (in `faces` / `uv_faces` corner order); 0 outside.
      mask: (R, R) bool, whether a face covers the texel centre.
      overflow: int32 scalar, UV triangles larger than the window (see
        `rasterize_triangles`); 0 when max_extent is left to None.
    """

    face_id: jax.Array
    barycentrics: jax.Array
    mask: jax.Array
    overflow: jax.Array


def uv_triangles(model: HeadModel, resolution: int) -> jax.Array:
    """Returns (F, 3, 2) the UV triangles of the faces in texel image coordinates.

    Args:
      model: a head model with a UV layout.
      resolution: side R of the UV map.

    Raises:
      ValueError: if the model has no UV layout.
    """
    model.require_uv("uv_triangles")
    return uv_to_image_uv(jnp.asarray(model.uv_coords)[jnp.asarray(model.uv_faces)]) * resolution


def uv_rasterize(model: HeadModel, resolution: int, *, max_extent: int | None = None) -> UVRaster:
    """Rasterizes the model's UV layout into an R x R map (texel centres, see module docstring).

    Where UV triangles overlap the smallest face id wins.

    Args:
      model: a head model with a UV layout.
      resolution: side R of the UV map.
      max_extent: rasterizer window (see `rasterize_triangles`); needed under jit.

    Returns:
      The `UVRaster`.

    Raises:
      ValueError: if the model has no UV layout.
    """
    model.require_uv("uv_rasterize")
    corners = uv_triangles(model, resolution)
    fragments = rasterize_triangles(
        corners,
        jnp.ones(corners.shape[:2], jnp.float32),
        resolution,
        resolution,
        max_extent=max_extent,
    )
    return UVRaster(
        fragments.triangle_id, fragments.barycentrics, fragments.mask, fragments.overflow
    )
