"""Training logs in the workdir: metrics.jsonl, config.json, TensorBoard, image grids, progress.

The training loop calls one `MetricsLogger`. Only process 0 writes (in a multi-host
run every process builds the logger, and the others get no-ops), so the files are
written once.

- `metrics.jsonl`: one JSON object a line, `{"step": 120, "loss": 0.41, "eval/psnr": 17.2}`;
  appended and flushed on every write. A value that is not a finite number is written
  as `null` with a warning: a NaN metric never stops the run. On resume from a
  checkpoint at step S, lines with a step beyond S are dropped (the file is rewritten
  atomically), so the log matches the restored state; a fresh start drops every line
  of an earlier run in the same workdir.
- `config.json`: the ml_collections config as JSON, written atomically once at start.
  An existing, different config is refused (the message names the keys that differ)
  unless `overwrite_config` is set.
- TensorBoard (`tensorboardX`) under `workdir/tensorboard`: the same scalars, and image
  grids (one row a sample: sources | prediction | ground truth, padded source views
  grey), each grid also saved as `workdir/images/<name>_<step>.png`. A new writer
  purges the events of an earlier run beyond the restored step (all of them on a
  fresh start); its file name ends in the time in nanoseconds, so a restart within
  the same second does not overwrite the earlier file.
- A tqdm progress bar showing steps/s, ETA and the share of time spent waiting for
  data, over a moving window of the last steps (the loop reports each step's
  data-wait and compute durations).

The module is not named `logging` so that it never shadows the standard library's
`logging` in a module that imports both.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np
import tensorboardX
import tqdm
from PIL import Image

from uika_jax.config import flat_items
from uika_jax.safe_files import atomic_write

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
TENSORBOARD_DIR = "tensorboard"
IMAGES_DIR = "images"
PADDED_VIEW_GREY = 0.5
"""Value every pixel of a padded (absent) source view gets in an image grid."""
GRID_SEPARATOR = 2
"""Pixels of white between the cells of an image grid."""


def write_config(workdir: str | os.PathLike, config: Any, *, overwrite: bool = False) -> None:
    """Writes `config` (an ml_collections ConfigDict) as `workdir/config.json`, atomically.

    Args:
      workdir: The run's folder (must exist).
      config: The config; anything with `to_json_best_effort` or a JSON-serialisable mapping.
      overwrite: Replace an existing config.json that differs.

    Raises:
      ValueError: if config.json exists, differs and `overwrite` is False; the message
        names the keys that differ.
    """
    if hasattr(config, "to_json_best_effort"):
        text = config.to_json_best_effort(sort_keys=True, indent=2)
    else:
        text = json.dumps(config, sort_keys=True, indent=2)
    path = Path(workdir) / CONFIG_FILE
    if path.exists():
        old = dict(flat_items(json.loads(path.read_text(encoding="utf-8"))))
        new = dict(flat_items(json.loads(text)))
        differing = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if not differing:
            return
        if not overwrite:
            raise ValueError(
                f"{path} holds a different config (keys that differ: {', '.join(differing)}); "
                "use another workdir or allow overwriting the config"
            )
    with atomic_write(path) as f:
        f.write(text.encode("utf-8"))


def _json_value(name: str, value: Any) -> float | int | None:
    """A scalar metric as a JSON number, or None (with a warning) when it is not finite."""
    array = np.asarray(value)
    real = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if array.size != 1 or not (real or array.dtype == bool):
        raise ValueError(
            f"metric {name!r} must be a numeric scalar, got {array.dtype} {array.shape}"
        )
    scalar = array.reshape(()).item()
    if isinstance(scalar, bool | int):
        return int(scalar)
    if not math.isfinite(scalar):
        warnings.warn(f"metric {name!r} is {scalar}; written as null", RuntimeWarning, stacklevel=3)
        return None
    return float(scalar)


def truncate_metrics(path: str | os.PathLike, last_step: int | None) -> int:
    """Keeps the lines of a metrics.jsonl with `step <= last_step`; rewrites it atomically.

    Args:
      path: The metrics file; nothing happens when it does not exist.
      last_step: The restored step; None (a fresh start) drops every line. Lines that
        are not JSON objects with a step (a line half-written by a crash) are dropped.

    Returns:
      The number of lines dropped.
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, TypeError, KeyError):
            step = None
        if isinstance(step, int) and last_step is not None and step <= last_step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        with atomic_write(path) as f:
            f.write("".join(kept).encode("utf-8"))
    return dropped


def _as_images(name: str, array: Any, ndim: int) -> np.ndarray:
    """Checks an RGB image array's rank and channels; returns it as float32 clipped to [0, 1]."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != ndim or array.shape[-1] != 3:
        raise ValueError(f"{name} must have {ndim} axes ending in 3 (RGB), got {array.shape}")
    return np.clip(np.nan_to_num(array), 0.0, 1.0)


def image_grid(sources: Any, source_mask: Any, prediction: Any, ground_truth: Any) -> np.ndarray:
    """Lays out one row a sample: its N source views | F predictions | F ground truths.

    Args:
      sources: (B, N, H, W, 3) floats in [0, 1] (clipped; NaN shown black).
      source_mask: (B, N) bools, False for padded views, which are shown grey.
      prediction: (B, H, W, 3) or (B, F, H, W, 3) floats in [0, 1] (F target frames).
      ground_truth: the same shape as `prediction`.

    Returns:
      uint8 (B*H + (B+1)*s, (N+2F)*W + (N+2F+1)*s, 3) with s = GRID_SEPARATOR white
      pixels between and around the cells (F = 1 for 4-axis predictions).
    """
    sources = _as_images("sources", sources, 5)
    prediction = np.asarray(prediction)
    frames_axis = prediction.ndim == 5
    prediction = _as_images("prediction", prediction, 5 if frames_axis else 4)
    ground_truth = _as_images("ground_truth", ground_truth, prediction.ndim)
    if not frames_axis:
        prediction, ground_truth = prediction[:, None], ground_truth[:, None]
    batch, views, height, width, _ = sources.shape
    frames = prediction.shape[1]
    source_mask = np.asarray(source_mask, dtype=bool)
    if source_mask.shape != (batch, views):
        raise ValueError(f"source_mask must be {(batch, views)}, got {source_mask.shape}")
    for name, image in (("prediction", prediction), ("ground_truth", ground_truth)):
        if image.shape != (batch, frames, height, width, 3):
            got = image.shape if frames_axis else image.shape[:1] + image.shape[2:]
            raise ValueError(f"{name} must be like the sources' images, got {got}")
    shown = np.where(source_mask[..., None, None, None], sources, PADDED_VIEW_GREY)
    cells = np.concatenate([shown, prediction, ground_truth], axis=1)
    columns = cells.shape[1]
    s = GRID_SEPARATOR
    grid = np.ones((batch * (height + s) + s, columns * (width + s) + s, 3), np.float32)
    for row in range(batch):
        for column in range(columns):
            top, left = s + row * (height + s), s + column * (width + s)
            grid[top : top + height, left : left + width] = cells[row, column]
    return np.round(grid * 255.0).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Throughput:
    """Speed over the moving window: steps a second, seconds left, share waiting for data."""

    steps_per_second: float
    eta_seconds: float
    data_wait_share: float


class ProgressBar:
    """A tqdm bar with steps/s, ETA and the data-wait share over the last `window` steps."""

    def __init__(
        self,
        total_steps: int,
        *,
        initial_step: int = 0,
        window: int = 50,
        enabled: bool = True,
        file: TextIO | None = None,
    ):
        """Opens the bar at `initial_step` of `total_steps`; `enabled=False` shows nothing."""
        self.total_steps = total_steps
        self.step = initial_step
        self._durations: collections.deque[tuple[float, float]] = collections.deque(maxlen=window)
        self._bar = tqdm.tqdm(
            total=total_steps,
            initial=initial_step,
            disable=not enabled,
            file=file if file is not None else sys.stderr,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
            dynamic_ncols=True,
        )

    def update(self, step: int, data_wait_seconds: float, step_seconds: float) -> Throughput:
        """Records `step` as done after `data_wait_seconds` for data and `step_seconds` of work."""
        self._durations.append((data_wait_seconds, step_seconds))
        self._bar.update(step - self.step)
        self.step = step
        speed = self.throughput()
        self._bar.set_postfix_str(
            f"{speed.steps_per_second:.2f} steps/s, "
            f"ETA {tqdm.tqdm.format_interval(speed.eta_seconds)}, "
            f"data wait {speed.data_wait_share:.0%}",
            refresh=False,
        )
        return speed

    def throughput(self) -> Throughput:
        """The speed over the moving window (zeros before the first step)."""
        waiting = sum(wait for wait, _ in self._durations)
        total = waiting + sum(compute for _, compute in self._durations)
        if total <= 0.0:
            return Throughput(0.0, 0.0, 0.0)
        rate = len(self._durations) / total
        return Throughput(rate, max(self.total_steps - self.step, 0) / rate, waiting / total)

    def close(self) -> None:
        """Closes the bar."""
        self._bar.close()


class MetricsLogger:
    """Writes a run's metrics, config, TensorBoard events, image grids and progress (process 0)."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        config: Any,
        *,
        total_steps: int,
        restored_step: int | None = None,
        overwrite_config: bool = False,
        process_index: int | None = None,
        progress_window: int = 50,
        progress_file: TextIO | None = None,
    ):
        """Opens the logs in `workdir` (created if missing).

        Args:
          workdir: The run's folder.
          config: The run's ml_collections config, written to config.json.
          total_steps: The step the run ends at (for the progress bar's ETA).
          restored_step: The step of the restored checkpoint; None for a fresh start.
            Metric lines and TensorBoard events beyond it are dropped.
          overwrite_config: Replace a different existing config.json instead of refusing.
          process_index: This process's index; defaults to `jax.process_index()`. Only
            process 0 writes anything.
          progress_window: Steps in the progress bar's moving window.
          progress_file: Where the bar is drawn (default stderr).

        Raises:
          ValueError: if config.json exists and differs (see `write_config`).
        """
        if process_index is None:
            process_index = jax.process_index()
        self.active = process_index == 0
        self.workdir = Path(workdir)
        first_step = 0 if restored_step is None else restored_step
        self.progress = ProgressBar(
            total_steps,
            initial_step=first_step,
            window=progress_window,
            enabled=self.active,
            file=progress_file,
        )
        if not self.active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_config(self.workdir, config, overwrite=overwrite_config)
        truncate_metrics(self.workdir / METRICS_FILE, restored_step)
        (self.workdir / IMAGES_DIR).mkdir(exist_ok=True)
        self._metrics = open(self.workdir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        self._tensorboard = tensorboardX.SummaryWriter(
            logdir=str(self.workdir / TENSORBOARD_DIR),
            purge_step=first_step if restored_step is None else restored_step + 1,
            filename_suffix=f".{time.time_ns()}",
        )

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Appends `{"step": step, **scalars}` to metrics.jsonl and logs the scalars to TensorBoard.

        Values are Python, NumPy or 0-d JAX numbers; a non-finite one becomes null
        (with a warning) and is left out of TensorBoard.

        Raises:
          ValueError: if a value is not a numeric scalar (the message names it).
        """
        if not self.active:
            return
        values = {name: _json_value(name, value) for name, value in scalars.items()}
        record = {"step": int(step), **values}
        self._metrics.write(json.dumps(record, allow_nan=False) + "\n")
        self._metrics.flush()
        for name, value in values.items():
            if value is not None:
                self._tensorboard.add_scalar(name, value, int(step))
        self._tensorboard.flush()

    def write_image_grid(self, step: int, name: str, grid: np.ndarray) -> Path | None:
        """Logs a uint8 (H, W, 3) grid (see `image_grid`) to TensorBoard and as a PNG.

        Returns:
          The PNG's path, `workdir/images/<name>_<step>.png` (`/` in the name becomes
          `_`), or None on a process other than 0.
        """
        if not self.active:
            return None
        self._tensorboard.add_image(name, grid, int(step), dataformats="HWC")
        self._tensorboard.flush()
        path = self.workdir / IMAGES_DIR / f"{name.replace('/', '_')}_{int(step):08d}.png"
        buffer = io.BytesIO()
        Image.fromarray(grid).save(buffer, format="PNG")
        with atomic_write(path) as f:
            f.write(buffer.getvalue())
        return path

    def report_step(self, step: int, data_wait_seconds: float, step_seconds: float) -> Throughput:
        """Advances the progress bar to `step`; returns the speed over its moving window."""
        return self.progress.update(step, data_wait_seconds, step_seconds)

    def close(self) -> None:
        """Flushes and closes every output."""
        self.progress.close()
        if self.active:
            self._metrics.close()
            self._tensorboard.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
