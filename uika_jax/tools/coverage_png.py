"""The picture `uika reconstruct` writes beside an avatar: what was observed, what was guessed.

Two rows on white:

    input 1 | input 2 | ...                    the views as framed and fed to the model
    observed colour | coverage | confidence    UV maps of the head's texture layout

* observed colour: I_aggr, the mean colour the views' face pixels put into each texel
  (black where none did);
* coverage: per texel, the number of input views with at least one face pixel in it
  (`Reprojection.n_views`): 0 ("guessed", drawn `UNSEEN_COLOUR`) to N, on a viridis
  ramp with a swatch legend under the panel;
* confidence: gamma = log1p(views) / log1p(N) in [0, 1] (`Reprojection.gamma`), the
  weight the decoder gives the observed colour, on the same ramp with a colour bar.

Texels outside the head model's UV layout (not on the head at all) are a light grey
checkerboard in all three maps. Each UV map is enlarged by whole texels (nearest) to at
least `MAP_SIDE` pixels; `figure_layout` gives every panel's place, so a reader (or a
test) can find a texel's pixel.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

INPUT_SIDE = 128
"""Pixels per input view."""

MAP_SIDE = 256
"""The least pixels per UV map (enlarged by a whole number of pixels per texel)."""

MARGIN, TITLE_HEIGHT, LABEL_HEIGHT, LEGEND_HEIGHT = 10, 18, 16, 40
"""Spacing, the title band, the label band above each panel, the legend band under the maps."""

UNSEEN_COLOUR = (200, 30, 30)
"""Coverage 0 inside the head's layout: no view saw the texel (its colour is guessed)."""

OFF_LAYOUT = ((236, 236, 236), (214, 214, 214))
"""The checkerboard of texels outside the UV layout."""

MAP_PANELS = ("observed colour", "coverage (views per texel)", "confidence (gamma)")
"""The UV map panels' labels, left to right."""

_VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64
)


@dataclasses.dataclass(frozen=True)
class Box:
    """A panel's place in the figure, in pixels."""

    top: int
    left: int
    height: int
    width: int


def viridis(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB on a 5-stop viridis ramp (linear between stops)."""
    position = np.clip(np.asarray(values, np.float64), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    low = np.minimum(np.floor(position).astype(int), len(_VIRIDIS) - 2)
    t = (position - low)[..., None]
    return np.round(_VIRIDIS[low] * (1 - t) + _VIRIDIS[low + 1] * t).astype(np.uint8)


def coverage_colours(views_per_texel: np.ndarray, num_views: int) -> np.ndarray:
    """Coverage counts (R, R) -> uint8 RGB: 0 is `UNSEEN_COLOUR`, 1..N the ramp."""
    counts = np.asarray(views_per_texel)
    ramp = viridis((counts - 1) / max(num_views - 1, 1))
    return np.where(counts[..., None] > 0, ramp, np.array(UNSEEN_COLOUR, np.uint8))


def figure_layout(num_inputs: int, resolution: int) -> tuple[tuple[int, int], dict[str, Box]]:
    """The figure's (height, width) and its panels' boxes.

    Panels: "input 1" .. "input N", then the `MAP_PANELS` names.

    Args:
      num_inputs: views shown in the first row.
      resolution: the UV maps' side R.
    """
    map_side = resolution * math.ceil(MAP_SIDE / resolution)
    boxes = {}
    top = MARGIN + TITLE_HEIGHT + LABEL_HEIGHT
    for k in range(num_inputs):
        boxes[f"input {k + 1}"] = Box(
            top, MARGIN + k * (INPUT_SIDE + MARGIN), INPUT_SIDE, INPUT_SIDE
        )
    top += INPUT_SIDE + MARGIN + LABEL_HEIGHT
    for k, name in enumerate(MAP_PANELS):
        boxes[name] = Box(top, MARGIN + k * (map_side + MARGIN), map_side, map_side)
    width = MARGIN + max(num_inputs * (INPUT_SIDE + MARGIN), len(MAP_PANELS) * (map_side + MARGIN))
    height = top + map_side + LEGEND_HEIGHT + MARGIN
    return (height, width), boxes


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _enlarge(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an (h, w, 3) uint8 image."""
    rows = (np.arange(height) * image.shape[0]) // height
    columns = (np.arange(width) * image.shape[1]) // width
    return image[rows][:, columns]


def _with_layout(colours: np.ndarray, on_layout: np.ndarray, side: int) -> np.ndarray:
    """A UV map enlarged to side x side with off-layout texels checkered per texel."""
    resolution = colours.shape[0]
    big = _enlarge(colours, side, side)
    inside = _enlarge(on_layout[..., None].astype(np.uint8), side, side)[..., 0] > 0
    texel = side // resolution
    yy, xx = np.mgrid[:side, :side]
    checker = ((yy // max(texel // 2, 1)) + (xx // max(texel // 2, 1))) % 2
    off = np.array(OFF_LAYOUT, np.uint8)[checker]
    return np.where(inside[..., None], big, off)


def _legends(draw: ImageDraw.ImageDraw, boxes: dict[str, Box], num_views: int) -> None:
    font = _font(11)
    coverage = boxes[MAP_PANELS[1]]
    y = coverage.top + coverage.height + 6
    swatch = max(8, min(22, (coverage.width - 10) // (num_views + 1) - 4))
    for count in range(num_views + 1):
        x = coverage.left + count * (swatch + 4)
        colour = tuple(int(c) for c in coverage_colours(np.array([[count]]), num_views)[0, 0])
        draw.rectangle([x, y, x + swatch, y + 12], fill=colour)
        draw.text((x, y + 14), str(count), fill=(0, 0, 0), font=font)
    confidence = boxes[MAP_PANELS[2]]
    y = confidence.top + confidence.height + 6
    ramp = viridis(np.linspace(0, 1, confidence.width))
    for x, colour in enumerate(ramp):
        draw.line(
            [confidence.left + x, y, confidence.left + x, y + 12],
            fill=tuple(int(c) for c in colour),
        )
    draw.text((confidence.left, y + 14), "0", fill=(0, 0, 0), font=font)
    draw.text((confidence.left + confidence.width - 8, y + 14), "1", fill=(0, 0, 0), font=font)


def coverage_figure(
    inputs: Sequence[np.ndarray],
    observed: np.ndarray,
    views_per_texel: np.ndarray,
    confidence: np.ndarray,
    on_layout: np.ndarray,
    title: str = "",
) -> np.ndarray:
    """The figure (module docstring) as an (H, W, 3) uint8 image.

    Args:
      inputs: the framed input views, (S, S, 3) uint8 each.
      observed: (R, R, 3) the aggregated colour in [0, 1].
      views_per_texel: (R, R) integer coverage.
      confidence: (R, R) gamma in [0, 1].
      on_layout: (R, R) bool, texels inside the head model's UV layout.
      title: a line drawn at the top left.
    """
    resolution = int(views_per_texel.shape[0])
    num_views = len(inputs)
    (height, width), boxes = figure_layout(num_views, resolution)
    picture = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    font = _font(12)
    for name, box in boxes.items():
        draw.text((box.left, box.top - LABEL_HEIGHT + 2), name, fill=(0, 0, 0), font=font)
    if title:
        draw.text((MARGIN, MARGIN // 2), title, fill=(0, 0, 0), font=_font(13))
    _legends(draw, boxes, num_views)
    figure = np.array(picture)
    for k, view in enumerate(inputs):
        box = boxes[f"input {k + 1}"]
        figure[box.top : box.top + box.height, box.left : box.left + box.width] = np.asarray(
            Image.fromarray(np.asarray(view, np.uint8)).resize(
                (box.width, box.height), Image.Resampling.NEAREST
            )
        )
    maps = (
        np.round(np.clip(np.asarray(observed, np.float64), 0, 1) * 255).astype(np.uint8),
        coverage_colours(views_per_texel, num_views),
        viridis(np.asarray(confidence, np.float64)),
    )
    on_layout = np.asarray(on_layout, bool)
    for name, colours in zip(MAP_PANELS, maps, strict=True):
        box = boxes[name]
        figure[box.top : box.top + box.height, box.left : box.left + box.width] = _with_layout(
            colours, on_layout, box.height
        )
    return figure
