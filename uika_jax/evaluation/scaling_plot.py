"""The view-count scaling figure: metrics against the number of source views N.

The same subjects reconstructed from N = 1, 2, 4, 8, 16 source views give one mean
per metric and N. This module draws them (with PIL; no matplotlib) and tabulates them:

* `scaling_plot`: a PNG of equal-width panels side by side, one a metric family
  (PSNR; SSIM and SSIM VALID; LPIPS VGG and AlexNet; then any other metric alone),
  each with N on a log2 x axis ticked at the evaluated counts, a y axis with round
  ticks and grid lines, the family's name and direction as its title, and a legend
  when the panel holds more than one series. A missing value (None or NaN) breaks
  the line.
* `scaling_table`: the markdown table, one row per N, metric columns with arrows.
* `psnr_change_sentence`: PSNR(N_max) - PSNR(N_min) in dB with its sign, and whether
  that agrees with the paper's claim that quality rises with N.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from uika_jax.evaluation.report import HEAD_REGION_NOTE, ProtocolResult, footnote_line, metric_spec
from uika_jax.safe_files import atomic_write, write_png

FAMILIES = (
    ("PSNR (dB)", ("psnr",)),
    ("SSIM", ("ssim", "ssim_valid")),
    ("LPIPS", ("lpips_vgg", "lpips_alex")),
)
"""Panels of the plot: a title and the metrics drawn in it."""

SERIES_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))
"""Line colours of a panel's first, second, ... series."""

AXIS_COLOUR, GRID_COLOUR, TEXT_COLOUR = (60, 60, 60), (225, 225, 225), (20, 20, 20)


def _series(views: Sequence[int], metrics: Mapping[str, Sequence[float | None]]):
    """Checked views (ascending, >= 1) and metric values as float arrays (NaN = missing)."""
    views = [int(v) for v in views]
    if not views or any(v < 1 for v in views) or sorted(set(views)) != views:
        raise ValueError(f"views must be distinct ascending counts >= 1, got {views}")
    arrays = {}
    for name, values in metrics.items():
        array = np.array([np.nan if v is None else float(v) for v in values], np.float64)
        if array.shape != (len(views),):
            raise ValueError(f"metric {name!r} has {array.size} values for {len(views)} views")
        arrays[name] = array
    if not arrays:
        raise ValueError("no metrics to plot")
    return views, arrays


def _panels(names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The families present (in FAMILIES order), then each other metric in a panel alone."""
    panels, used = [], set()
    for title, members in FAMILIES:
        present = [m for m in members if m in names]
        if present:
            panels.append((title, present))
            used.update(present)
    panels += [(metric_spec(m).label, [m]) for m in names if m not in used]
    return panels


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"tick range must be finite, got {low}, {high}")
    if high - low < 1e-12:
        pad = max(abs(low) * 0.05, 1e-3)
        low, high = low - pad, high + pad
    raw = (high - low) / max(count - 1, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    last = math.ceil(high / step) * step
    return [first + i * step for i in range(round((last - first) / step) + 1)]


def _tick_label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:.{decimals}f}"


def _draw_panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    title: str,
    views: list[int],
    series: list[tuple[str, np.ndarray]],
    font: ImageFont.FreeTypeFont,
    line_width: int,
) -> None:
    """One panel inside box = (left, top, right, bottom) of the image."""
    left, top, right, bottom = box
    text_h = font.size
    plot_left = left + int(4.2 * text_h)
    plot_right = right - int(1.2 * text_h)
    plot_top = top + int(2.2 * text_h)
    plot_bottom = bottom - int(3.0 * text_h)
    draw.text(
        ((left + right) / 2, top + 0.4 * text_h), title, fill=TEXT_COLOUR, font=font, anchor="mt"
    )
    known = np.concatenate([v[np.isfinite(v)] for _, v in series])
    ticks = nice_ticks(float(known.min()), float(known.max())) if known.size else [0.0, 1.0]
    y_low, y_high = ticks[0], ticks[-1]
    x_low, x_high = math.log2(views[0]), math.log2(views[-1])
    x_span = max(x_high - x_low, 1e-9)

    def to_pixel(view: int, value: float) -> tuple[float, float]:
        fx = 0.5 if x_high == x_low else (math.log2(view) - x_low) / x_span
        x = plot_left + line_width * 4 + fx * (plot_right - plot_left - line_width * 8)
        y = plot_bottom - (value - y_low) / (y_high - y_low) * (plot_bottom - plot_top)
        return x, y

    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    for tick in ticks:
        _, y = to_pixel(views[0], tick)
        draw.line([(plot_left, y), (plot_right, y)], fill=GRID_COLOUR, width=1)
        label = _tick_label(tick, step)
        draw.text((plot_left - 0.4 * text_h, y), label, fill=TEXT_COLOUR, font=font, anchor="rm")
    for view in views:
        x, _ = to_pixel(view, y_low)
        draw.line([(x, plot_bottom), (x, plot_bottom + 0.3 * text_h)], fill=AXIS_COLOUR, width=1)
        draw.text(
            (x, plot_bottom + 0.5 * text_h), str(view), fill=TEXT_COLOUR, font=font, anchor="mt"
        )
    draw.line(
        [(plot_left, plot_top), (plot_left, plot_bottom), (plot_right, plot_bottom)],
        fill=AXIS_COLOUR,
        width=1,
    )
    draw.text(
        ((plot_left + plot_right) / 2, plot_bottom + 1.8 * text_h),
        "source views N",
        fill=TEXT_COLOUR,
        font=font,
        anchor="mt",
    )
    radius = 2 * line_width
    curves = []
    for (_, values), colour in zip(series, SERIES_COLOURS, strict=False):
        points = [
            to_pixel(v, y) if math.isfinite(y) else None for v, y in zip(views, values, strict=True)
        ]
        curves.append(points)
        for a, b in itertools.pairwise(points):
            if a is not None and b is not None:
                draw.line([a, b], fill=colour, width=line_width)
        for p in points:
            if p is not None:
                draw.ellipse(
                    [p[0] - radius, p[1] - radius, p[0] + radius, p[1] + radius], fill=colour
                )
    if len(series) > 1:
        plot = (plot_left, plot_top, plot_right, plot_bottom)
        _draw_legend(draw, plot, [name for name, _ in series], curves, font, line_width)


def _draw_legend(
    draw: ImageDraw.ImageDraw,
    plot: tuple[int, int, int, int],
    names: list[str],
    curves: list[list[tuple[float, float] | None]],
    font: ImageFont.FreeTypeFont,
    line_width: int,
) -> None:
    """The series' colours and labels in the plot corner the curves cross least."""
    plot_left, plot_top, plot_right, plot_bottom = plot
    text_h = font.size
    labels = [metric_spec(name).label for name in names]
    box_w = 2.0 * text_h + max(font.getlength(label) for label in labels)
    box_h = 1.3 * text_h * len(labels)
    margin = 0.6 * text_h
    corners = [
        (x, y)
        for y in (plot_top + margin, plot_bottom - box_h - margin)
        for x in (plot_left + margin, plot_right - box_w - margin)
    ]
    samples = [
        (a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1]))
        for points in curves
        for a, b in itertools.pairwise(points)
        if a is not None and b is not None
        for t in np.linspace(0.0, 1.0, 25)
    ] + [p for points in curves for p in points if p is not None]

    def crossings(corner: tuple[float, float]) -> int:
        x0, y0 = corner
        return sum(x0 <= x <= x0 + box_w and y0 <= y <= y0 + box_h for x, y in samples)

    x0, y0 = min(corners, key=crossings)
    for index, (label, colour) in enumerate(zip(labels, SERIES_COLOURS, strict=False)):
        y = y0 + (index + 0.5) * 1.3 * text_h
        draw.line([(x0, y), (x0 + 1.6 * text_h, y)], fill=colour, width=line_width)
        draw.text((x0 + 2.0 * text_h, y), label, fill=TEXT_COLOUR, font=font, anchor="lm")


def scaling_plot(
    views: Sequence[int],
    metrics: Mapping[str, Sequence[float | None]],
    *,
    width: int = 1200,
    height: int = 400,
) -> np.ndarray:
    """The scaling figure (module docstring) as a uint8 (height, width, 3) image.

    Args:
      views: the source-view counts, ascending (e.g. 1, 2, 4, 8, 16).
      metrics: metric name -> one mean per view count (None: not measured).
      width: image width in pixels (panels split it evenly).
      height: image height in pixels.
    """
    views, arrays = _series(views, metrics)
    panels = _panels(list(arrays))
    if width < 160 * len(panels) or height < 160:
        raise ValueError(f"a {width}x{height} image is too small for {len(panels)} panels")
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(10, height // 26))
    line_width = max(2, height // 200)
    panel_width = width // len(panels)
    for index, (title, members) in enumerate(panels):
        direction = (
            "higher is better" if metric_spec(members[0]).higher_is_better else "lower is better"
        )
        box = (index * panel_width, 0, (index + 1) * panel_width, height)
        series = [(m, arrays[m]) for m in members]
        _draw_panel(draw, box, f"{title}, {direction}", views, series, font, line_width)
    return np.asarray(image)


def scaling_table(
    views: Sequence[int],
    metrics: Mapping[str, Sequence[float | None]],
    samples: Sequence[int] | None = None,
) -> str:
    """The markdown table: one row per N, one column per metric (with arrows), n/a if missing.

    Args:
      views: the source-view counts, ascending.
      metrics: metric name -> one mean per view count (None: not measured).
      samples: the number of samples behind each row, shown as a column; None: no column.
    """
    views, arrays = _series(views, metrics)
    if samples is not None and len(samples) != len(views):
        raise ValueError(f"{len(samples)} sample counts for {len(views)} view counts")
    names = [m for _, members in _panels(list(arrays)) for m in members]
    extra = [] if samples is None else ["samples"]
    lines = ["| N | " + " | ".join(extra + [metric_spec(m).header for m in names]) + " |"]
    lines.append("| ---: |" + " ---: |" * (len(extra) + len(names)))
    for row, view in enumerate(views):
        cells = [] if samples is None else [str(int(samples[row]))]
        for name in names:
            value = arrays[name][row]
            cells.append(
                f"{value:.{metric_spec(name).decimals}f}" if math.isfinite(value) else "n/a"
            )
        lines.append(f"| {view} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def psnr_change_sentence(views: Sequence[int], psnr: Sequence[float | None]) -> str:
    """PSNR(N_max) - PSNR(N_min) stated plainly, with its sign and what it says about the claim."""
    views, arrays = _series(views, {"psnr": psnr})
    first, last = arrays["psnr"][0], arrays["psnr"][-1]
    low, high = views[0], views[-1]
    if not (math.isfinite(first) and math.isfinite(last)):
        return f"PSNR({high}) - PSNR({low}) cannot be stated: PSNR is missing at one of them."
    change = last - first
    text = f"PSNR({high}) - PSNR({low}) = {change:+.2f} dB: "
    if round(change, 2) > 0:
        return text + f"quality rises from {low} to {high} source views, as the paper claims."
    if round(change, 2) < 0:
        return text + (
            f"quality falls from {low} to {high} source views, contrary to the paper's claim "
            "that it rises."
        )
    return text + f"no change from {low} to {high} source views (the paper claims a rise)."


def write_scaling_report(
    folder: str | os.PathLike,
    views: Sequence[int],
    metrics: Mapping[str, Sequence[float | None]],
    *,
    rows: Sequence[ProtocolResult] | None = None,
    stem: str = "view_scaling",
    width: int = 1200,
    height: int = 400,
    note: str | None = None,
) -> tuple[Path, Path]:
    """Writes `<stem>.png` (the plot) and `<stem>.md` (table, PSNR sentence, region note).

    Args:
      folder: the output folder (must exist).
      views: the source-view counts, ascending.
      metrics: metric name -> one mean per view count (None: not measured).
      rows: the per-N results the means came from, one per view count; when given, the
        table gets a samples column and the footnote names each metric's backend.
      stem: the files' name without extension.
      width: the plot's width in pixels.
      height: the plot's height in pixels.
      note: a caveat printed under the PSNR sentence (e.g. samples with fewer sources
        than N).

    Returns:
      (png path, markdown path), both written atomically.
    """
    folder = Path(folder)
    samples = None if rows is None else [len(r.sample_ids) for r in rows]
    table = scaling_table(views, metrics, samples)
    png = write_png(
        folder / f"{stem}.png", scaling_plot(views, metrics, width=width, height=height)
    )
    parts = ["## Quality against the number of source views", "", table]
    if "psnr" in metrics:
        parts += [psnr_change_sentence(views, metrics["psnr"]), ""]
    if note:
        parts += [f"Note: {note}.", ""]
    parts += [HEAD_REGION_NOTE, ""]
    if rows is not None:
        parts += [footnote_line(rows, m) for m in metrics] + [""]
    parts += [f"![metrics against N]({png.name})", ""]
    markdown = folder / f"{stem}.md"
    with atomic_write(markdown) as f:
        f.write("\n".join(parts).encode("utf-8"))
    return png, markdown
