"""Reprojection of screen images into the shared UV space, and their aggregation.

Given per-pixel image UV (the project's convention, `uika_jax.head.uv_raster`:
(u, 1 - v), rows pointing down) and a face mask for each of N views, every face
pixel is scattered into the texel of an R x R UV map that contains its UV
(nearest texel, `image_uv_to_texel`). No cameras are needed.

Per view (b, n):

    hits[b, n, t]  = number of valid pixels of view n landing in texel t
    i_uv[b, n, t]  = mean colour of those pixels (sum / hits), 0 where hits = 0

Over the sample b (all valid views together):

    n_hit[b, t]    = sum_n hits[b, n, t]      the number of PIXELS in t
    n_views[b, t]  = sum_n [hits[b, n, t] > 0]  the number of VIEWS that see t
    i_aggr[b, t]   = sum_n sum[b, n, t] / n_hit[b, t]   (0 where n_hit = 0)
    gamma[b, t]    = log1p(n_views[b, t]) / log1p(sum_n view_mask[b, n])   in [0, 1]

so I_aggr is the mean of every pixel that landed in the texel, over all views
(a view that sees the texel at a grazing angle, with fewer pixels, weighs
less), and gamma is the paper's confidence Norm(log(1 + n)) with n counted in
views and normalised by its bound, the number of real views (0 everywhere for a
sample without a valid view): 1 where every real view sees the texel, 0 where
none does. The paper does not define n or Norm precisely (assumed). Counting
views rather than pixels keeps gamma independent of image resolution and of how
many pixels squeeze into a texel, and the fixed normaliser makes each texel's
gamma depend on that texel alone: a few outlier texels (saturated UVs piling
thousands of pixels into border texels) cannot squash gamma elsewhere, as a
per-sample maximum of pixel counts would.

A pixel is valid when its view is valid (`view_mask`), it lies on the face
(`face > threshold` for probabilities, the value itself for a bool mask) and
its UV is finite and inside [0, 1]^2 (others are dropped, not clamped onto the
border texels). Invalid pixels, including every pixel of a padded view,
contribute nothing, whatever their values (NaN included).

Gradients: texel indices are integers computed from `stop_gradient(uv)`, and
the validity mask is a comparison, so neither uv nor the face probability
receives a gradient. The colours keep theirs: the scatter is a sum
(`jax.ops.segment_sum`, a linear scatter-add) and the division by the integer
hit counts is a constant scale, so d i_uv / d images and d i_aggr / d images
are the averaging weights.

Static shapes, jittable and vmappable; memory is O(B * N * (H * W + R^2)): a
segment sum per view into R^2 (+ 1 dump) segments, batched over B and N (so a
batch-sharded input stays sharded), never a one-hot over texels x pixels.
Colours are summed in float32 (outputs are float32 whatever the input dtype);
counts are int32 and exact. On GPU, XLA's scatter-add may vary the summation
order between runs (results then differ by rounding only;
`--xla_gpu_deterministic_ops` fixes it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from uika_jax.head.uv_raster import image_uv_to_texel


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Reprojection:
    """Images reprojected into an R x R UV map (see the module docstring).

    Attributes:
      i_uv: (B, N, R, R, 3) per-view mean colour of the pixels in each texel; 0 where none.
      hits: (B, N, R, R) int32, per-view number of valid pixels in each texel.
      i_aggr: (B, R, R, 3) mean colour over all valid views' pixels; 0 where n_hit = 0.
      gamma: (B, R, R, 1) log1p(n_views) / log1p(number of real views), in [0, 1].
      n_hit: (B, R, R) int32, number of valid pixels (over all views) in each texel.
      n_views: (B, R, R) int32, number of valid views with a pixel in each texel.
    """

    i_uv: jax.Array
    hits: jax.Array
    i_aggr: jax.Array
    gamma: jax.Array
    n_hit: jax.Array
    n_views: jax.Array


def _face_mask(face: jax.Array, shape: tuple[int, ...], threshold: float) -> jax.Array:
    """(B, N, H, W[, 1]) probabilities or bools -> (B, N, H, W) bool."""
    if face.ndim == len(shape) + 1:
        if face.shape[-1] != 1:
            raise ValueError(f"face mask must be (B, N, H, W[, 1]), got shape {face.shape}")
        face = face[..., 0]
    if face.shape != shape:
        raise ValueError(f"face mask shape {face.shape} does not match images {shape}")
    if face.dtype == jnp.bool_:
        return face
    return jax.lax.stop_gradient(face) > threshold


def reproject(
    images: jax.Array,
    uv: jax.Array,
    face: jax.Array,
    view_mask: jax.Array | None,
    resolution: int,
    *,
    threshold: float = 0.5,
) -> Reprojection:
    """Scatters every view's face pixels into an R x R UV map and aggregates the views.

    Args:
      images: (B, N, H, W, 3) colours (any range; [0, 1] RGB in the pipeline).
      uv: (B, N, H, W, 2) image UV (u, 1 - v) of each pixel (predicted or ground truth).
      face: (B, N, H, W) or (B, N, H, W, 1): face probability (valid where > threshold)
        or a bool face mask.
      view_mask: (B, N) bool, False for padded views; None means all views are valid.
      resolution: side R of the UV map (static).
      threshold: probability above which a pixel counts as face.

    Returns:
      The `Reprojection` (see the module docstring for the definitions).

    Raises:
      ValueError: on inconsistent shapes or a resolution < 1.
    """
    images, uv, face = jnp.asarray(images), jnp.asarray(uv), jnp.asarray(face)
    if images.ndim != 5 or images.shape[-1] != 3:
        raise ValueError(f"expected images (B, N, H, W, 3), got shape {images.shape}")
    b, n, h, w, _ = images.shape
    if uv.shape != (b, n, h, w, 2):
        raise ValueError(f"uv shape {uv.shape} != {(b, n, h, w, 2)}")
    if view_mask is None:
        view_mask = jnp.ones((b, n), jnp.bool_)
    view_mask = jnp.asarray(view_mask)
    if view_mask.shape != (b, n):
        raise ValueError(f"view_mask shape {view_mask.shape} != {(b, n)}")
    r = int(resolution)
    if r < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")

    uv = jax.lax.stop_gradient(uv.astype(jnp.float32))
    inside = jnp.all(jnp.isfinite(uv) & (uv >= 0.0) & (uv <= 1.0), axis=-1)
    valid = (
        _face_mask(face, (b, n, h, w), threshold) & inside & view_mask.astype(bool)[..., None, None]
    )
    rows, cols = image_uv_to_texel(jnp.where(inside[..., None], uv, 0.0), r)

    colours = jnp.where(valid[..., None], images.astype(jnp.float32), 0.0)
    texel = jnp.where(valid, rows * r + cols, r * r)  # r * r: the dump segment

    def scatter(colours: jax.Array, texel: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One view: (H, W, 3) colours, (H, W) texel ids -> (R, R, 3) sums, (R, R) counts."""
        texel = texel.reshape(-1)
        sums = jax.ops.segment_sum(colours.reshape(-1, 3), texel, num_segments=r * r + 1)
        counts = jax.ops.segment_sum(
            (texel < r * r).astype(jnp.int32), texel, num_segments=r * r + 1
        )
        return sums[:-1].reshape(r, r, 3), counts[:-1].reshape(r, r)

    # Batched per view (vmap), so the scatter keeps B and N as batch dimensions (shardable).
    sums, hits = jax.vmap(jax.vmap(scatter))(colours, texel)

    def mean(total: jax.Array, count: jax.Array) -> jax.Array:
        scale = jnp.where(count > 0, 1.0 / jnp.maximum(count, 1).astype(total.dtype), 0.0)
        return total * scale[..., None]

    n_hit = hits.sum(axis=1)
    n_views = (hits > 0).sum(axis=1, dtype=jnp.int32)
    n_real = view_mask.astype(jnp.int32).sum(axis=1)[:, None, None]
    bound = jnp.log1p(jnp.maximum(n_real, 1).astype(jnp.float32))
    gamma = jnp.log1p(n_views.astype(jnp.float32)) / bound  # n_views = 0 without real views
    return Reprojection(
        i_uv=mean(sums, hits),
        hits=hits,
        i_aggr=mean(sums.sum(axis=1), n_hit),
        gamma=gamma[..., None],
        n_hit=n_hit,
        n_views=n_views,
    )
