"""Surface materials of the built-in head, baked into a UV map: shininess and ambient occlusion.

`synthetic_material_map(resolution)` returns an (R, R, 3) map in the layout of
`synthetic_head_model()` (the convention of `uika_jax.head.uv_raster`) whose
channels the shading (`uika_jax.synthetic.lighting.shade`) reads per pixel at the
image UV:

0. specular strength and 1. Blinn-Phong exponent: `SKIN_SPECULAR` on the skin,
   `EYE_SPECULAR` on the eyeballs (a small, bright catch light),
   `CAVITY_SPECULAR` inside the mouth;
2. ambient occlusion in [0, 1]: the cosine-weighted fraction of the directions
   above each point of the neutral template that no part of the head blocks,
   estimated with `OCCLUSION_DIRECTIONS` shadow maps (Fibonacci directions over
   the sphere, `uika_jax.synthetic.lighting.shadow_maps` and
   `shadow_visibility`) per vertex, interpolated over the faces. It darkens
   the eye sockets, the nostrils, the ear folds, the mouth's corners and the
   neck under the jaw. It is baked once for the mean shape with the mouth
   closed, so it does not follow expressions or identities (a fair
   approximation: the creases stay where they are).

Texels outside every UV chart take the value of the nearest texel inside one,
so bilinear lookups along a chart's border never mix in foreign values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from uika_jax.head.uv_raster import uv_rasterize
from uika_jax.render.mesh_render import vertex_normals
from uika_jax.synthetic import mesh as mesh
from uika_jax.synthetic.head import synthetic_head_model, synthetic_layout
from uika_jax.synthetic.lighting import shadow_maps, shadow_visibility

SKIN_SPECULAR = (0.07, 18.0)
"""Specular (strength, Blinn-Phong exponent) of skin."""
EYE_SPECULAR = (0.9, 400.0)
"""Specular (strength, exponent) of the eyeballs."""
CAVITY_SPECULAR = (0.0, 1.0)
"""Specular (strength, exponent) inside the mouth."""
OCCLUSION_DIRECTIONS = 48
"""Directions sampled for the ambient occlusion."""
OCCLUSION_MAP_SIZE = 128
"""Shadow map side used for the ambient occlusion."""


def fibonacci_directions(count: int) -> np.ndarray:
    """Returns (count, 3) unit vectors spread evenly over the sphere (a Fibonacci lattice)."""
    index = np.arange(count) + 0.5
    height = 1.0 - 2.0 * index / count
    angle = np.pi * (3.0 - np.sqrt(5.0)) * index
    ring = np.sqrt(1.0 - height**2)
    return np.stack([ring * np.cos(angle), height, ring * np.sin(angle)], -1).astype(np.float32)


@functools.partial(jax.jit, static_argnames="map_size")
def _vertex_occlusion(vertices, faces, directions, map_size):
    normals = vertex_normals(vertices, faces)
    maps = shadow_maps(vertices, faces, directions, map_size, 4 * map_size**2)[:4]
    visible = shadow_visibility(vertices, normals, *maps)
    weight = jnp.maximum(normals @ directions.T, 0.0)
    return jnp.sum(visible * weight, axis=-1) / jnp.maximum(jnp.sum(weight, axis=-1), 1e-6)


def vertex_occlusion(
    vertices: np.ndarray,
    faces: np.ndarray,
    directions: int = OCCLUSION_DIRECTIONS,
    map_size: int = OCCLUSION_MAP_SIZE,
) -> np.ndarray:
    """Returns (V,) the ambient occlusion of each vertex of a mesh (module docstring).

    Args:
      vertices: (V, 3) positions.
      faces: (F, 3) vertex indices, counter-clockwise seen from outside.
      directions: how many directions to sample.
      map_size: side of their shadow maps.
    """
    return np.asarray(
        _vertex_occlusion(
            jnp.asarray(vertices),
            jnp.asarray(faces),
            jnp.asarray(fibonacci_directions(directions)),
            map_size=int(map_size),
        )
    )


def _fill_outside(values: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Copies into every texel outside `inside` the value of the nearest texel inside."""
    nearest = ndimage.distance_transform_edt(~inside, return_distances=False, return_indices=True)
    return values[nearest[0], nearest[1]]


@functools.lru_cache(maxsize=4)
def synthetic_material_map(resolution: int) -> np.ndarray:
    """Returns the built-in head's (R, R, 3) material map (module docstring); cached, read-only.

    Args:
      resolution: side R of the map.
    """
    model = synthetic_head_model()
    layout = synthetic_layout()[0]
    raster = uv_rasterize(model, int(resolution))
    inside = np.asarray(raster.mask)
    corners = np.asarray(model.faces)[np.maximum(np.asarray(raster.face_id), 0)]
    bary = np.asarray(raster.barycentrics)
    occlusion = vertex_occlusion(np.asarray(model.v_template), np.asarray(model.faces))
    part = layout.part[corners[..., 0]]
    materials = np.empty((*inside.shape, 3), np.float32)
    materials[..., :2] = SKIN_SPECULAR
    materials[(part == mesh.LEFT_EYE) | (part == mesh.RIGHT_EYE), :2] = EYE_SPECULAR
    materials[part == mesh.CAVITY, :2] = CAVITY_SPECULAR
    materials[..., 2] = np.sum(bary * occlusion[corners], axis=-1)
    materials = _fill_outside(materials, inside)
    materials.flags.writeable = False
    return materials
