"""Stage 1 of the rasterizer: EWA projection of 3D Gaussians to 2D, as in gsplat 1.5.3.

Plain `jnp`, differentiated by JAX autodiff. For C cameras and N Gaussians it
returns per (camera, Gaussian) the image-space mean, the conic (inverse 2D
covariance, upper triangle), the camera-space depth, the opacity and the
integer tile-culling radii. Conventions (gsplat 1.5.3's CUDA projection):
OpenCV pinhole camera, wxyz quaternions normalised here, linear scales, eps2d
added to the 2D covariance, the Jacobian's x/z and y/z clamped to 1.3x the
field of view (means2d itself is not clamped), near/far culling on depth that
keeps depths exactly at either plane (the CUDA kernel culls
``depth < near || depth > far``; gsplat's torch code also culls the planes
themselves), and one of two radius rules:

* ``"opacity"`` (default; what ``gsplat.rasterization`` does): per axis
  ``ceil(min(3.33, sqrt(2 ln(255 o))) sqrt(cov_ii))``, Gaussians with
  ``o < 1/255`` culled.
* ``"3sigma"``: ``ceil(3.33 sqrt(cov_ii))`` (gsplat's projection without opacities).

A Gaussian is culled (radii 0) when it is invalid (see `valid`), its depth is
outside [near, far], both radii are 0, or its box misses the image. Culled
entries keep finite values everywhere; where the depth is outside [near, far]
their means2d and conics are 0, and they receive zero gradients.

Precision: `rasterization()` projects in `compute_dtype(means.dtype)`, float32
for bfloat16 or float16 Gaussians (whose means would otherwise lose about 2 px
in the projection), float64 for float64 inputs; cameras are cast likewise.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from uika_kernels.tiles import ALPHA_THRESHOLD

RADIUS_RULES = ("opacity", "3sigma")


class Projected(NamedTuple):
    """Projected Gaussians; every array has leading dims (C, N).

    Attributes:
      means2d: image-space means (C, N, 2), pixel centres at +0.5.
      conics: inverse 2D covariances (a, b, c) meaning [[a, b], [b, c]] (C, N, 3).
      depths: camera-space z (C, N).
      opacities: opacities broadcast per camera, 0 where culled (C, N).
      radii: integer tile-culling half extents (C, N, 2) int32, 0 where culled.
    """

    means2d: jax.Array
    conics: jax.Array
    depths: jax.Array
    opacities: jax.Array
    radii: jax.Array


def quat_to_rotmat(quats: jax.Array) -> jax.Array:
    """Rotation matrices (..., 3, 3) from wxyz quaternions (..., 4), normalised here."""
    q = quats / jnp.linalg.norm(quats, axis=-1, keepdims=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    rows = [
        1 - 2 * (y * y + z * z),
        2 * (x * y - w * z),
        2 * (x * z + w * y),
        2 * (x * y + w * z),
        1 - 2 * (x * x + z * z),
        2 * (y * z - w * x),
        2 * (x * z - w * y),
        2 * (y * z + w * x),
        1 - 2 * (x * x + y * y),
    ]
    return jnp.stack(rows, axis=-1).reshape((*quats.shape[:-1], 3, 3))


def covariance(quats: jax.Array, scales: jax.Array) -> jax.Array:
    """World-space covariances R S S R^T (..., 3, 3) from quaternions and linear scales."""
    m = quat_to_rotmat(quats) * scales[..., None, :]
    return m @ jnp.swapaxes(m, -1, -2)


def gaussian_validity(
    means: jax.Array, quats: jax.Array, scales: jax.Array, opacities: jax.Array
) -> jax.Array:
    """Per-Gaussian validity (N,): finite parameters, scales >= 0, opacity in [0, 1], |q| > 0."""
    finite = (
        jnp.isfinite(means).all(-1)
        & jnp.isfinite(quats).all(-1)
        & jnp.isfinite(scales).all(-1)
        & jnp.isfinite(opacities)
    )
    return (
        finite
        & (scales >= 0).all(-1)
        & (opacities >= 0)
        & (opacities <= 1)
        & (jnp.sum(jnp.where(jnp.isfinite(quats), quats, 0.0) ** 2, -1) > 0)
    )


def compute_dtype(dtype) -> jnp.dtype:
    """The float type the rasterizer computes in for inputs of `dtype`: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def sanitize(means, quats, scales, opacities, colors, viewmats, Ks):
    """Masks invalid Gaussians and cameras (for traced inputs, which cannot raise).

    Returns:
      (colors, viewmats, Ks) with non-finite entries replaced by safe values, and the
      masks gauss_ok (N,) and cam_ok (C,).
    """
    gauss_ok = gaussian_validity(means, quats, scales, opacities)
    gauss_ok &= jnp.isfinite(colors).all(-1).reshape(-1, means.shape[0]).all(0)
    cam_ok = jnp.isfinite(viewmats).all((-1, -2)) & jnp.isfinite(Ks).all((-1, -2))
    cam_ok &= (Ks[:, 0, 0] > 0) & (Ks[:, 1, 1] > 0)
    eye_k = jnp.eye(3, dtype=Ks.dtype)
    viewmats = jnp.where(cam_ok[:, None, None], viewmats, jnp.eye(4, dtype=viewmats.dtype))
    Ks = jnp.where(cam_ok[:, None, None], Ks, eye_k)
    colors = jnp.where(jnp.isfinite(colors), colors, 0.0)
    return colors, viewmats, Ks, gauss_ok, cam_ok


def project(
    means: jax.Array,
    quats: jax.Array,
    scales: jax.Array,
    opacities: jax.Array,
    viewmats: jax.Array,
    Ks: jax.Array,
    width: int,
    height: int,
    *,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    radius_rule: str = "opacity",
    valid: jax.Array | None = None,
) -> Projected:
    """Projects N Gaussians into C cameras.

    Args:
      means: world-space centres (N, 3).
      quats: wxyz rotations (N, 4), any non-zero norm.
      scales: linear scales (N, 3), >= 0.
      opacities: opacities in [0, 1] (N,).
      viewmats: world-to-camera matrices (C, 4, 4).
      Ks: intrinsics (C, 3, 3).
      width: image width in pixels.
      height: image height in pixels.
      near_plane: Gaussians with depth < near_plane are culled.
      far_plane: Gaussians with depth > far_plane are culled.
      eps2d: added to the 2D covariance's diagonal.
      radius_rule: "opacity" or "3sigma" (module docstring).
      valid: optional (N,) or (C, N) mask; False entries are culled and their
        parameters replaced by safe values (no NaN reaches values or gradients).

    Returns:
      The `Projected` Gaussians, in `compute_dtype(means.dtype)` (every input is cast to
      it, so bfloat16 Gaussians are projected in float32).
    """
    if radius_rule not in RADIUS_RULES:
        raise ValueError(f"radius_rule must be one of {RADIUS_RULES}, got {radius_rule!r}")
    dtype = compute_dtype(means.dtype)
    means, quats, scales, opacities, viewmats, Ks = (
        x.astype(dtype) for x in (means, quats, scales, opacities, viewmats, Ks)
    )
    n = means.shape[0]
    c = viewmats.shape[0]
    if valid is None:
        valid = jnp.ones((c, n), bool)
    valid = jnp.broadcast_to(valid, (c, n))
    gauss_ok = valid.any(0)
    # Safe parameters for invalid Gaussians (double-where keeps gradients NaN-free).
    means = jnp.where(gauss_ok[:, None], means, 0.0)
    quats = jnp.where(gauss_ok[:, None], quats, jnp.array([1.0, 0.0, 0.0, 0.0], dtype))
    scales = jnp.where(gauss_ok[:, None], scales, 0.0)
    opacities = jnp.where(gauss_ok, opacities, 0.0)

    rot = viewmats[:, :3, :3]
    trans = viewmats[:, :3, 3]
    means_c = jnp.einsum("cij,nj->cni", rot, means) + trans[:, None, :]
    cov_c = jnp.einsum("cij,njk,clk->cnil", rot, covariance(quats, scales), rot)

    depths = means_c[..., 2]
    in_depth = valid & (depths >= near_plane) & (depths <= far_plane)
    tz = jnp.where(in_depth, depths, 1.0)
    tx, ty = means_c[..., 0], means_c[..., 1]
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    txc = tz * jnp.clip(tx / tz, -lim_x_neg, lim_x_pos)
    tyc = tz * jnp.clip(ty / tz, -lim_y_neg, lim_y_pos)
    zero = jnp.zeros_like(tz)
    jac = jnp.stack(
        [fx / tz, zero, -fx * txc / (tz * tz), zero, fy / tz, -fy * tyc / (tz * tz)], axis=-1
    ).reshape((c, n, 2, 3))
    cov2d = jac @ cov_c @ jnp.swapaxes(jac, -1, -2)
    a = cov2d[..., 0, 0] + eps2d
    b = 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0])
    d = cov2d[..., 1, 1] + eps2d
    det = jnp.maximum(a * d - b * b, 1e-10)
    conics = jnp.stack([d / det, -b / det, a / det], axis=-1)
    means2d = jnp.stack([fx * tx / tz + cx, fy * ty / tz + cy], axis=-1)

    # Integer radii and culling: no gradient.
    a_s, d_s = jax.lax.stop_gradient(a), jax.lax.stop_gradient(d)
    op_s = jax.lax.stop_gradient(jnp.broadcast_to(opacities, (c, n)))
    m2_s = jax.lax.stop_gradient(means2d)
    if radius_rule == "opacity":
        op32 = op_s.astype(jnp.float32)
        ratio = jnp.maximum(op32 / jnp.float32(ALPHA_THRESHOLD), 1.0)
        extend = jnp.minimum(3.33, jnp.sqrt(2.0 * jnp.log(ratio))).astype(dtype)
        keep = op32 >= jnp.float32(ALPHA_THRESHOLD)
    else:
        extend = jnp.asarray(3.33, dtype)
        keep = jnp.ones((c, n), bool)
    rx = jnp.ceil(extend * jnp.sqrt(jnp.maximum(a_s, 0.0)))
    ry = jnp.ceil(extend * jnp.sqrt(jnp.maximum(d_s, 0.0)))
    keep &= in_depth & ((rx > 0) | (ry > 0))
    keep &= (m2_s[..., 0] + rx > 0) & (m2_s[..., 0] - rx < width)
    keep &= (m2_s[..., 1] + ry > 0) & (m2_s[..., 1] - ry < height)
    radii = jnp.minimum(jnp.stack([rx, ry], -1), 2.0**30)  # int32-safe
    radii = jnp.where(keep[..., None], radii, 0).astype(jnp.int32)

    means2d = jnp.where(in_depth[..., None], means2d, 0.0)
    conics = jnp.where(in_depth[..., None], conics, 0.0)
    opacities = jnp.where(keep, jnp.broadcast_to(opacities, (c, n)), 0.0)
    return Projected(means2d, conics, depths, opacities, radii)
