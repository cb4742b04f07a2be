"""Per-sample pictures of an evaluation: PNG grids and an mp4 per driven sequence.

A sample's grid is one row of square-cornered panels of the prediction's size,
separated and framed by white lines (`GRID_SEPARATOR` pixels, as the training
grids in `uika_jax.training.metrics_log`):

    sources | prediction | ground truth | error heat map

* sources: all of the sample's N source views (any size, N up to 16 or more) tiled
  into one panel, ceil(sqrt(N)) tiles a row, each resized to its tile; a padded
  (absent) view is grey (`PADDED_VIEW_GREY`). One view fills the panel.
* error: the per-pixel absolute error averaged over RGB, from black (0) through
  purple, red and orange to light yellow (`max_error` and above), a perceptually
  ordered colour map (inferno's anchor colours) drawn without matplotlib.

Several target frames of one source set give one row each; the sources panel sits
in the first row, white below. Without a ground truth (cross-reenactment) the row is
sources | prediction. A driven sequence's video shows, frame by frame,
prediction | ground truth | error (or the prediction alone).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from uika_jax.training.metrics_log import GRID_SEPARATOR, PADDED_VIEW_GREY

DEFAULT_MAX_ERROR = 0.2
"""Absolute error (on [0, 1] colours) shown at the top of the heat map's scale."""

HEAT_COLOURS = (
    np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)
    / 255.0
)
"""Anchor colours of the error map at 0, 1/4, ..., 1 of `max_error` (inferno's)."""


def _images(name: str, array: Any, ndim: int) -> np.ndarray:
    """An RGB image array checked for rank and channels, as float32 in [0, 1] (NaN black)."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != ndim or array.shape[-1] != 3 or 0 in array.shape:
        raise ValueError(f"{name} must have {ndim} axes ending in 3 (RGB), got {array.shape}")
    return np.clip(np.nan_to_num(array), 0.0, 1.0)


def error_heat_map(
    prediction: Any, ground_truth: Any, *, max_error: float = DEFAULT_MAX_ERROR
) -> np.ndarray:
    """The mean-over-RGB absolute error of (..., H, W, 3) images as colours (..., H, W, 3).

    Args:
      prediction: images in [0, 1].
      ground_truth: images of the same shape.
      max_error: the error shown as the last colour (larger errors saturate), > 0.
    """
    if max_error <= 0:
        raise ValueError(f"max_error must be > 0, got {max_error}")
    prediction = np.asarray(prediction, np.float32)
    ground_truth = np.asarray(ground_truth, np.float32)
    if prediction.shape != ground_truth.shape:
        raise ValueError(f"prediction {prediction.shape} != ground truth {ground_truth.shape}")
    error = np.nan_to_num(np.abs(prediction - ground_truth).mean(-1), nan=max_error)
    position = np.clip(error / max_error, 0.0, 1.0) * (len(HEAT_COLOURS) - 1)
    low = np.minimum(np.floor(position).astype(np.int32), len(HEAT_COLOURS) - 2)
    fraction = (position - low)[..., None]
    return (1.0 - fraction) * HEAT_COLOURS[low] + fraction * HEAT_COLOURS[low + 1]


def _resized(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """A float image resized with PIL's area-averaging filter (unchanged if it fits)."""
    if image.shape[:2] == (height, width):
        return image
    pixels = Image.fromarray(np.round(image * 255.0).astype(np.uint8))
    return np.asarray(pixels.resize((width, height), Image.Resampling.BOX), np.float32) / 255.0


def tile_sources(sources: Any, source_mask: Any, height: int, width: int) -> np.ndarray:
    """All source views tiled into one (height, width, 3) panel (module docstring).

    Args:
      sources: (N, Hs, Ws, 3) floats in [0, 1], any size.
      source_mask: (N,) bools, False for padded views (shown grey); None: all real.
      height: the panel's height.
      width: the panel's width.

    Returns:
      (height, width, 3) float32; tiles separated by white lines.
    """
    sources = _images("sources", sources, 4)
    views = sources.shape[0]
    mask = np.ones(views, bool) if source_mask is None else np.asarray(source_mask, bool)
    if mask.shape != (views,):
        raise ValueError(f"source_mask must be ({views},), got {mask.shape}")
    columns = math.ceil(math.sqrt(views))
    rows = math.ceil(views / columns)
    s = GRID_SEPARATOR
    tile_h, tile_w = (height - (rows - 1) * s) // rows, (width - (columns - 1) * s) // columns
    if tile_h < 1 or tile_w < 1:
        raise ValueError(f"{views} source views do not fit a {height}x{width} panel")
    panel = np.ones((height, width, 3), np.float32)
    for index in range(views):
        top, left = (index // columns) * (tile_h + s), (index % columns) * (tile_w + s)
        tile = _resized(sources[index], tile_h, tile_w) if mask[index] else PADDED_VIEW_GREY
        panel[top : top + tile_h, left : left + tile_w] = tile
    return panel


def _row_strip(panels: list[np.ndarray]) -> np.ndarray:
    """Panels of one size side by side with white separators around and between them."""
    height, width = panels[0].shape[:2]
    s = GRID_SEPARATOR
    strip = np.ones((height + 2 * s, len(panels) * (width + s) + s, 3), np.float32)
    for column, panel in enumerate(panels):
        left = s + column * (width + s)
        strip[s : s + height, left : left + width] = panel
    return strip


def _frame_panels(prediction: np.ndarray, ground_truth: np.ndarray | None, max_error: float):
    if ground_truth is None:
        return [prediction]
    return [prediction, ground_truth, error_heat_map(prediction, ground_truth, max_error=max_error)]


def sample_grid(
    sources: Any,
    source_mask: Any,
    prediction: Any,
    ground_truth: Any | None = None,
    *,
    max_error: float = DEFAULT_MAX_ERROR,
) -> np.ndarray:
    """One sample's grid: sources | prediction | ground truth | error (module docstring).

    Args:
      sources: (N, Hs, Ws, 3) source views in [0, 1].
      source_mask: (N,) bools (False: padded view) or None.
      prediction: (H, W, 3) or (F, H, W, 3) predicted frames in [0, 1].
      ground_truth: the same shape as `prediction`, or None (no ground truth and no
        error panel).
      max_error: the error at the top of the heat map's scale.

    Returns:
      uint8 (F*(H+s) + s, P*(W+s) + s, 3) with s = GRID_SEPARATOR and P = 4 panels
      (2 without a ground truth).
    """
    prediction = np.asarray(prediction)
    prediction = _images("prediction", prediction[None] if prediction.ndim == 3 else prediction, 4)
    if ground_truth is not None:
        ground_truth = np.asarray(ground_truth)
        ground_truth = _images(
            "ground_truth", ground_truth[None] if ground_truth.ndim == 3 else ground_truth, 4
        )
        if ground_truth.shape != prediction.shape:
            raise ValueError(f"ground_truth {ground_truth.shape} != prediction {prediction.shape}")
    height, width = prediction.shape[1:3]
    first = tile_sources(sources, source_mask, height, width)
    blank = np.ones_like(first)
    strips = []
    for frame in range(prediction.shape[0]):
        truth = None if ground_truth is None else ground_truth[frame]
        panels = [
            first if frame == 0 else blank,
            *_frame_panels(prediction[frame], truth, max_error),
        ]
        strip = _row_strip(panels)
        strips.append(strip if frame == 0 else strip[GRID_SEPARATOR:])
    return np.round(np.concatenate(strips) * 255.0).astype(np.uint8)


def sequence_frames(
    prediction: Any, ground_truth: Any | None = None, *, max_error: float = DEFAULT_MAX_ERROR
) -> Iterator[np.ndarray]:
    """A driven sequence's video frames: prediction | ground truth | error, uint8.

    Args:
      prediction: (T, H, W, 3) predicted frames in [0, 1].
      ground_truth: (T, H, W, 3) or None (the prediction alone, framed).
      max_error: the error at the top of the heat map's scale.

    Yields:
      T uint8 frames of `_row_strip`'s layout.
    """
    prediction = _images("prediction", prediction, 4)
    if ground_truth is not None:
        ground_truth = _images("ground_truth", ground_truth, 4)
        if ground_truth.shape != prediction.shape:
            raise ValueError(f"ground_truth {ground_truth.shape} != prediction {prediction.shape}")
    for t in range(prediction.shape[0]):
        truth = None if ground_truth is None else ground_truth[t]
        panels = _frame_panels(prediction[t], truth, max_error)
        yield np.round(_row_strip(panels) * 255.0).astype(np.uint8)
