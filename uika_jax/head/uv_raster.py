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

from uika_jax.head.model import HeadModel
from uika_jax.render.mesh_raster import rasterize_triangles


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UVRaster:
    """The UV layout of a head model rasterized into an R x R map.

    Attributes:
      face_id: (R, R) int32, the face whose UV triangle holds the texel centre, -1 outside.
      barycentrics: (R, R, 3) float32, barycentrics of the texel centre w.r.t. that
        face's corners (in `faces` / `uv_faces` corner order); 0 outside.
      mask: (R, R) bool, whether a face covers the texel centre.
      overflow: int32 scalar, UV triangles clipped by the rasterizer's capacity
        (see `rasterize_triangles`); 0 when capacity is left to None.
    """

    face_id: jax.Array
    barycentrics: jax.Array
    mask: jax.Array
    overflow: jax.Array


def corner_image_uv(model: HeadModel) -> jax.Array:
    """Returns (F, 3, 2) the image UV of every face corner (through `uv_faces`, so seams are exact).

    This is what `uika_jax.render.mesh_render.render_mesh` takes as `corner_uv`.

    Args:
      model: a head model with a UV layout.

    Raises:
      ValueError: if the model has no UV layout.
    """
    model.require_uv("corner_image_uv")
    return uv_to_image_uv(jnp.asarray(model.uv_coords)[jnp.asarray(model.uv_faces)])


def uv_triangles(model: HeadModel, resolution: int) -> jax.Array:
    """Returns (F, 3, 2) the UV triangles of the faces in texel image coordinates.

    Args:
      model: a head model with a UV layout.
      resolution: side R of the UV map.

    Raises:
      ValueError: if the model has no UV layout.
    """
    model.require_uv("uv_triangles")
    return corner_image_uv(model) * resolution


def uv_rasterize(model: HeadModel, resolution: int, *, capacity: int | None = None) -> UVRaster:
    """Rasterizes the model's UV layout into an R x R map (texel centres, see module docstring).

    Where UV triangles overlap the smallest face id wins.

    Args:
      model: a head model with a UV layout.
      resolution: side R of the UV map.
      capacity: rasterizer slots (see `rasterize_triangles`); needed under jit.

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
        capacity=capacity,
    )
    return UVRaster(
        fragments.triangle_id, fragments.barycentrics, fragments.mask, fragments.overflow
    )
