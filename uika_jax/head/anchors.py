"""UV anchors: the Gaussians' home on the head surface, and how they are driven.

An anchor is a texel of the UV map that falls inside the UV layout; it sits on
one triangle of the template at fixed barycentric coordinates, and inherits
everything FLAME attaches to vertices (template position, identity, expression
and pose-corrective blendshapes, skinning weights) by barycentric interpolation.

All those attributes are linear in the per-vertex values, so driving never
materialises them per anchor (at ~130K anchors and 400 blendshapes that would
be 0.6 GB): `deform_anchors` deforms the mesh's per-vertex quantities once and
interpolates the results, which is the same linear map evaluated in another
order. `anchor_attributes` materialises them for inspection and tests.

Each anchor's rotation is the rotation factor (polar decomposition) of its
blended LBS transform, so a Gaussian turns with the surface it sits on.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from uika_jax.head.lbs import (
    FlameParams,
    apply_transforms,
    blend_transforms,
    linear_combination,
    pose_feature,
    posed_skeleton,
)
from uika_jax.head.model import HeadModel
from uika_jax.head.rotations import polar_rotation
from uika_jax.head.uv_raster import uv_rasterize


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Anchors:
    """K points on the template surface.

    Attributes:
      face_ids: triangle of each anchor (K,) int32.
      barycentrics: weights of the triangle's three vertices (K, 3).
      texels: (row, column) of each anchor in the UV map (K, 2) int32; -1 for
        anchors not made from a UV map.
      positions: template positions (K, 3).
      uv_resolution: side of the UV map the texels index (0 if none).
    """

    face_ids: np.ndarray
    barycentrics: np.ndarray
    texels: np.ndarray
    positions: np.ndarray
    uv_resolution: int = dataclasses.field(default=0, metadata={"static": True})

    @property
    def num_anchors(self) -> int:
        """Number of anchors K."""
        return self.face_ids.shape[0]


def _interpolate(model: HeadModel, face_ids, barycentrics, per_vertex):
    """Barycentric interpolation of per-vertex arrays (V, ...) at anchors (K, ...)."""
    corners = per_vertex[model.faces[face_ids]]
    weights = barycentrics.reshape(barycentrics.shape + (1,) * (per_vertex.ndim - 1))
    return (weights * corners).sum(axis=1)


def anchors_at(
    model: HeadModel,
    face_ids: np.ndarray,
    barycentrics: np.ndarray,
    texels: np.ndarray | None = None,
    uv_resolution: int = 0,
) -> Anchors:
    """Builds anchors at given triangles and barycentric coordinates.

    Args:
      model: the head model.
      face_ids: (K,) triangle indices.
      barycentrics: (K, 3) non-negative weights summing to 1.
      texels: optional (K, 2) UV-map (row, column) of each anchor.
      uv_resolution: side of that UV map.
    """
    face_ids = np.asarray(face_ids, np.int32)
    barycentrics = np.asarray(barycentrics, np.float32)
    if face_ids.ndim != 1 or barycentrics.shape != (face_ids.shape[0], 3):
        raise ValueError(
            f"face_ids must be (K,) and barycentrics (K, 3), got {face_ids.shape} and "
            f"{barycentrics.shape}"
        )
    if face_ids.size and (face_ids.min() < 0 or face_ids.max() >= model.faces.shape[0]):
        raise ValueError(f"face_ids outside [0, {model.faces.shape[0]})")
    if texels is None:
        texels = np.full((face_ids.shape[0], 2), -1, np.int32)
    positions = _interpolate(model, face_ids, barycentrics, np.asarray(model.v_template))
    return Anchors(
        face_ids=face_ids,
        barycentrics=barycentrics,
        texels=np.asarray(texels, np.int32),
        positions=positions.astype(np.float32),
        uv_resolution=uv_resolution,
    )


def make_anchors(model: HeadModel, uv_resolution: int, num_anchors: int | None = None) -> Anchors:
    """Places anchors on the texels of the UV map that the layout covers.

    Args:
      model: a head model with a UV layout.
      uv_resolution: side R of the UV map (384 at paper scale).
      num_anchors: K; None takes every covered texel, otherwise K texels evenly
        spaced in raster order over the covered ones (deterministic).

    Returns:
      The anchors, in raster (row-major) order of their texels.

    Raises:
      ValueError: without a UV layout, if the rasterization overflowed, or if
        num_anchors exceeds the covered texel count.
    """
    model.require_uv("make_anchors")
    raster = uv_rasterize(model, uv_resolution)
    if int(raster.overflow):
        raise ValueError(
            f"UV rasterization at {uv_resolution}x{uv_resolution} clipped "
            f"{int(raster.overflow)} triangles; anchors would be missing"
        )
    mask = np.asarray(raster.mask)
    rows, cols = np.nonzero(mask)
    available = rows.shape[0]
    if num_anchors is not None:
        if not 0 < num_anchors <= available:
            raise ValueError(
                f"num_anchors={num_anchors} but the UV layout covers {available} texels at "
                f"resolution {uv_resolution}: raise uv_resolution or lower num_anchors"
            )
        pick = np.round(np.linspace(0, available - 1, num_anchors)).astype(np.int64)
        rows, cols = rows[pick], cols[pick]
    face_ids = np.asarray(raster.face_id)[rows, cols]
    barycentrics = np.asarray(raster.barycentrics)[rows, cols]
    return anchors_at(model, face_ids, barycentrics, np.stack([rows, cols], -1), uv_resolution)


def anchor_attributes(model: HeadModel, anchors: Anchors) -> dict[str, np.ndarray]:
    """Materialises the interpolated per-anchor FLAME attributes (for inspection and tests).

    Returns:
      A dict with positions (K, 3), shapedirs (K, 3, S), exprdirs (K, 3, E),
      posedirs (K, 3, P) and lbs_weights (K, J).
    """
    fields = ("v_template", "shapedirs", "exprdirs", "posedirs", "lbs_weights")
    names = ("positions", "shapedirs", "exprdirs", "posedirs", "lbs_weights")
    return {
        name: _interpolate(
            model, anchors.face_ids, anchors.barycentrics, np.asarray(getattr(model, f))
        )
        for name, f in zip(names, fields, strict=True)
    }


def deform_anchors(
    model: HeadModel, anchors: Anchors, offsets: jnp.ndarray, params: FlameParams
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Drives anchors plus canonical offsets with FLAME blendshapes and LBS.

    The offsets are added in the canonical (template) space, then the point
    receives the interpolated identity, expression and pose-corrective
    displacements and the interpolated skinning of the mesh it sits on.

    Args:
      model: the head model.
      anchors: K anchors.
      offsets: canonical offsets (K, 3).
      params: driving parameters of one frame.

    Returns:
      (means (K, 3), rotations (K, 3, 3)): posed positions and each point's
      rotation (the rotation factor of its blended LBS transform).
    """
    if offsets.shape != (anchors.num_anchors, 3):
        raise ValueError(f"offsets must have shape ({anchors.num_anchors}, 3), got {offsets.shape}")
    shaped, rotations, _, skinning = posed_skeleton(
        model, params.shape, params.expression, params.pose
    )
    displacement = shaped - model.v_template
    displacement = displacement + linear_combination(model.posedirs, pose_feature(rotations))
    blended = blend_transforms(model.lbs_weights, skinning)
    point_displacement = _interpolate(model, anchors.face_ids, anchors.barycentrics, displacement)
    point_transform = _interpolate(model, anchors.face_ids, anchors.barycentrics, blended)
    canonical = anchors.positions + offsets + point_displacement
    means = apply_transforms(point_transform, canonical) + params.translation
    return means, polar_rotation(point_transform[:, :, :3])
