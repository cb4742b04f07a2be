"""Reconstruction latency and driving speed (`evaluate.py --config.eval.mode=speed`).

Two jitted programs are timed on the default device, each after its compilation
(timed apart) and `warmup` untimed calls, every call ended by `jax.block_until_ready`:

- reconstruction: `UIKA.__call__` on one sample of N source views, (1, N, H, W, 3)
  with an all-valid view mask, to the canonical Gaussians; one program per N (shapes
  are exact, not padded to `model.num_views`, so the time is that of N views).
  Counts above `model.num_views` are skipped with a logged message (and listed in
  the report); weights do not change the time, so a random-init model will do.
- driving: `drive` (LBS to one target frame) + `render` (the tile rasterizer) of the K
  Gaussians into one camera framing the head (`framing_camera`) at the configured
  image size. FPS = 1 / median time per frame. LBS alone is timed too.

The rasterizer's capacity under jit is `render.capacity` when set, else calibrated
on the timed frame itself (`calibrate_capacity`, `render.capacity_headroom`); the
report gives the frame's intersection count and any overflow from the rasterizer's
`meta`. Timings are median and min-max over `repeats` calls. A compile time is a load
from JAX's persistent compilation cache where that cache is on and holds the program.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from uika_jax.head.anchors import Anchors
from uika_jax.head.lbs import FlameParams
from uika_jax.head.model import HeadModel
from uika_jax.models.avatar import UIKA, Rendered, drive, render
from uika_jax.models.gaussians import CanonicalGaussians
from uika_jax.render import RasterConfig, backends
from uika_jax.render.camera import framing_camera
from uika_jax.render.capacity import calibrate_capacity

DEFAULT_VIEWS = (1, 2, 4, 8, 16)
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall times of one jitted program, in milliseconds (compilation in seconds)."""

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    compile_s: float

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def spread(self) -> str:
        """'median (min-max)' in ms."""
        return f"{_ms(self.median_ms)} ({_ms(self.min_ms)}-{_ms(self.max_ms)})"


@dataclasses.dataclass(frozen=True)
class DrivingSpeed:
    """Driving one frame: LBS alone and LBS + render, with the rasterizer's counts.

    Attributes:
      lbs: `drive` alone.
      frame: `drive` + `render` (the driving step).
      fps: 1000 / frame.median_ms.
      backend: the compositing backend that ran.
      capacity: the rasterizer's intersection slots.
      n_isects: the frame's tile intersections.
      isects_dropped: intersections beyond the capacity (0: no overflow).
      tiles_overflow: tiles over capacity or tile_cap.
    """

    lbs: Timing
    frame: Timing
    fps: float
    backend: str
    capacity: int
    n_isects: int
    isects_dropped: int
    tiles_overflow: int

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        out = dataclasses.asdict(self)
        out["lbs"], out["frame"] = self.lbs.to_dict(), self.frame.to_dict()
        return out


@dataclasses.dataclass(frozen=True)
class SpeedReport:
    """What `measure_speed` measured.

    Attributes:
      device: `device_info()`.
      num_gaussians: K.
      image_size: side of the inputs and of the driven frame.
      max_views: the model's `num_views`.
      reconstruction: source view count -> latency (empty when not measured).
      skipped_views: requested counts above `max_views`, not measured.
      driving: the driving step's speed.
      frame: the driven frame (H, W, 3) in [0, 1] (not in `to_dict`).
    """

    device: dict
    num_gaussians: int
    image_size: int
    max_views: int
    reconstruction: dict[int, Timing]
    skipped_views: tuple[int, ...]
    driving: DrivingSpeed
    frame: np.ndarray = dataclasses.field(repr=False, compare=False)

    def to_dict(self) -> dict:
        """A JSON-ready dict for metrics.json (view counts become string keys)."""
        return {
            "device": dict(self.device),
            "num_gaussians": self.num_gaussians,
            "image_size": self.image_size,
            "max_views": self.max_views,
            "reconstruction": {str(n): t.to_dict() for n, t in self.reconstruction.items()},
            "skipped_views": list(self.skipped_views),
            "driving": self.driving.to_dict(),
        }

    def to_markdown(self) -> str:
        """Markdown: a device line, then the reconstruction (per view count) and driving tables."""
        lines = [device_line(self.device, self.num_gaussians, self.image_size), ""]
        if self.reconstruction:
            lines += [
                "| source views N | reconstruction latency, ms ↓ | compile, s |",
                "|---:|---:|---:|",
            ]
            lines += [
                f"| {n} | {t.spread()} | {t.compile_s:.1f} |"
                for n, t in self.reconstruction.items()
            ]
            if self.skipped_views:
                skipped = ", ".join(map(str, self.skipped_views))
                lines.append(
                    f"\nNot measured: N = {skipped} (the model takes {self.max_views} at most)."
                )
            lines.append("")
        return "\n".join(lines) + "\n" + driving_markdown(self.driving)


def device_info() -> dict:
    """The default device: name (`device_kind`), platform, count, jax version, host CPU."""
    device = jax.devices()[0]
    return {
        "name": str(device.device_kind),
        "platform": device.platform,
        "count": jax.device_count(),
        "jax_version": jax.__version__,
        "host_cpu": _host_cpu(),
        "host_cores": os.cpu_count() or 0,
    }


def _host_cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def time_jitted(
    fn: Callable,
    args: Sequence[object],
    *,
    repeats: int,
    warmup: int,
    compiler_options: dict | None = None,
) -> tuple[Timing, object]:
    """Compiles `fn` (a `jax.jit` function) for `args`, then times calls of the executable.

    Args:
      fn: the jitted function.
      args: its positional arguments.
      repeats: timed calls (>= 1), each ended by `jax.block_until_ready`.
      warmup: untimed calls before them.
      compiler_options: XLA options for the compilation (None: the defaults).

    Returns:
      (the `Timing`, the last call's output).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    start = time.perf_counter()
    compiled = fn.lower(*args).compile(compiler_options)
    compile_s = time.perf_counter() - start
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(compiled(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        samples.append(1e3 * (time.perf_counter() - start))
    return Timing(statistics.median(samples), min(samples), max(samples), repeats, compile_s), out


def select_views(views: Sequence[int], max_views: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Splits requested view counts into (measured, skipped above `max_views`), sorted.

    Raises:
      ValueError: a count below 1, or none left to measure.
    """
    requested = sorted({int(n) for n in views})
    if not requested or requested[0] < 1:
        raise ValueError(f"views must be positive view counts, got {tuple(views)}")
    kept = tuple(n for n in requested if n <= max_views)
    skipped = tuple(n for n in requested if n > max_views)
    if not kept:
        raise ValueError(f"views {tuple(views)}: the model takes 1 to {max_views} source views")
    if skipped:
        message = "speed: view counts %s exceed the model's num_views=%d; not measured"
        _LOG.warning(message, skipped, max_views)
    return kept, skipped


def measure_reconstruction(
    model: UIKA,
    anchors: Anchors,
    views: Sequence[int],
    *,
    repeats: int,
    warmup: int,
    seed: int = 0,
    compiler_options: dict | None = None,
) -> tuple[dict[int, Timing], CanonicalGaussians]:
    """Times `UIKA.__call__` on one sample of N random source images for each N in `views`.

    Args:
      model: the network (random init or trained).
      anchors: its anchors (`build_head`).
      views: view counts, each within 1..model.config.num_views (see `select_views`).
      repeats: timed calls per count.
      warmup: untimed calls per count.
      seed: the images' seed.
      compiler_options: XLA options (`time_jitted`).

    Returns:
      (view count -> `Timing`, the Gaussians reconstructed from the smallest count).
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, images, view_mask, anchors):
        return nnx.merge(graphdef, state)(images, view_mask, anchors).gaussians

    size = model.config.image_size
    rng = np.random.default_rng(seed)
    timings, first = {}, None
    for n in views:
        images = jnp.asarray(rng.uniform(size=(1, n, size, size, 3)), jnp.float32)
        args = (state, images, jnp.ones((1, n), bool), anchors)
        timings[n], gaussians = time_jitted(
            step, args, repeats=repeats, warmup=warmup, compiler_options=compiler_options
        )
        first = gaussians if first is None else first
    return timings, first


def driving_inputs(
    head: HeadModel, image_size: int, seed: int = 0
) -> tuple[FlameParams, jax.Array, jax.Array]:
    """One target frame (B = F = 1): a mild expression and pose, and a framing camera.

    The camera frames the template head (its bounding box) per the project's face
    framing, 10 degrees off frontal.

    Returns:
      (FlameParams with leading dims (1, 1), viewmats (1, 1, 4, 4), Ks (1, 1, 3, 3)).
    """
    rng = np.random.default_rng(seed)
    pose = 0.05 * rng.normal(size=(1, 1, head.num_joints, 3))
    params = FlameParams(
        shape=jnp.zeros((1, 1, head.num_shape), jnp.float32),
        expression=jnp.asarray(0.5 * rng.normal(size=(1, 1, head.num_expression)), jnp.float32),
        pose=jnp.asarray(pose, jnp.float32),
        translation=jnp.zeros((1, 1, 3), jnp.float32),
    )
    vertices = np.asarray(head.v_template)
    centre = 0.5 * (vertices.min(0) + vertices.max(0))
    height = float(np.ptp(vertices[:, 1]))
    viewmat, K = framing_camera(centre, height, image_size, yaw_deg=10.0)
    return params, jnp.asarray(viewmat)[None, None], jnp.asarray(K)[None, None]


def driving_raster_config(
    config: ml_collections.ConfigDict,
    head: HeadModel,
    anchors: Anchors,
    gaussians: CanonicalGaussians,
    inputs: tuple[FlameParams, jax.Array, jax.Array],
) -> RasterConfig:
    """`render.backend` with `render.capacity`, else a capacity calibrated on this frame."""
    r = config.render
    base = RasterConfig(backend=r.backend, tile_cap=r.tile_cap, warn_on_overflow=False)
    if r.capacity is not None:
        return dataclasses.replace(base, capacity=int(r.capacity))
    params, viewmats, Ks = inputs
    posed = drive(head, anchors, gaussians, params)
    size = int(config.model.image_size)
    return calibrate_capacity(
        posed.means, posed.quats, posed.scales(), posed.opacities(), viewmats[..., None, :, :],
        Ks[..., None, :, :], size, size, headroom=float(r.capacity_headroom),
        with_tile_cap=False, base=base,
    )  # fmt: skip


def measure_driving(
    config: ml_collections.ConfigDict,
    head: HeadModel,
    anchors: Anchors,
    gaussians: CanonicalGaussians,
    *,
    repeats: int,
    warmup: int,
    seed: int = 0,
    compiler_options: dict | None = None,
) -> tuple[DrivingSpeed, Rendered]:
    """Times LBS alone and LBS + render of one frame of `gaussians` (B = 1).

    Args:
      config: the full config (`model.image_size`, `render`).
      head: the head model.
      anchors: the Gaussians' anchors.
      gaussians: canonical Gaussians (1, K, ...).
      repeats: timed calls of each program.
      warmup: untimed calls before them.
      seed: the target frame's seed (`driving_inputs`).
      compiler_options: XLA options (`time_jitted`).

    Returns:
      (the `DrivingSpeed`, the driving step's output for the frame).
    """
    size = int(config.model.image_size)
    head, anchors = jax.tree.map(jnp.asarray, (head, anchors))
    inputs = driving_inputs(head, size, seed)
    raster_config = driving_raster_config(config, head, anchors, gaussians, inputs)
    timing = dict(repeats=repeats, warmup=warmup, compiler_options=compiler_options)
    background = tuple(config.render.background)

    @jax.jit
    def step(head, anchors, gaussians, params, viewmats, Ks) -> Rendered:
        posed = drive(head, anchors, gaussians, params)
        return render(posed, viewmats, Ks, size, size, background=background, config=raster_config)

    lbs, _ = time_jitted(jax.jit(drive), (head, anchors, gaussians, inputs[0]), **timing)
    frame, rendered = time_jitted(step, (head, anchors, gaussians, *inputs), **timing)
    meta = rendered.meta
    backend = raster_config.backend
    if backend == "auto":
        platform_name = jax.devices()[0].platform
        backend = f"auto ({backends.auto_choices().get(platform_name, 'reference')})"
    speed = DrivingSpeed(
        lbs=lbs,
        frame=frame,
        fps=1e3 / frame.median_ms,
        backend=backend,
        capacity=int(raster_config.capacity),
        n_isects=int(np.max(meta["n_isects"])),
        isects_dropped=int(np.max(meta["isects_dropped"])),
        tiles_overflow=int(np.max(meta["tiles_overflow"])),
    )
    return speed, rendered


def measure_speed(
    model: UIKA,
    config: ml_collections.ConfigDict,
    head: HeadModel,
    anchors: Anchors,
    *,
    views: Sequence[int] = DEFAULT_VIEWS,
    repeats: int = 10,
    warmup: int = 2,
    gaussians: CanonicalGaussians | None = None,
    compiler_options: dict | None = None,
) -> SpeedReport:
    """Reconstruction latency per view count and driving speed on the default device.

    Args:
      model: the network (a checkpoint's or random init: weights do not change the time).
      config: the full config the model was built from.
      head: the head model (`build_head(config)`).
      anchors: its anchors.
      views: source view counts; those above `model.config.num_views` are skipped with
        a logged message; empty: driving only (then `gaussians` is required).
      repeats: timed calls per program.
      warmup: untimed calls per program, after compilation.
      gaussians: canonical Gaussians (1, K, ...) to drive; None: the reconstruction's
        from the fewest views.
      compiler_options: XLA options for every timed program (None: the defaults; tests
        pass faster-compiling ones, which change the timings).

    Returns:
      The `SpeedReport`.
    """
    max_views = int(model.config.num_views)
    reconstruction: dict[int, Timing] = {}
    skipped: tuple[int, ...] = ()
    if views:
        kept, skipped = select_views(views, max_views)
        reconstruction, reconstructed = measure_reconstruction(
            model, anchors, kept, repeats=repeats, warmup=warmup,
            compiler_options=compiler_options,
        )  # fmt: skip
        gaussians = reconstructed if gaussians is None else gaussians
    elif gaussians is None:
        raise ValueError("measure_speed with no views needs the Gaussians to drive")
    driving, rendered = measure_driving(
        config, head, anchors, gaussians, repeats=repeats, warmup=warmup,
        compiler_options=compiler_options,
    )  # fmt: skip
    return SpeedReport(
        device=device_info(),
        num_gaussians=int(gaussians.means.shape[-2]),
        image_size=int(config.model.image_size),
        max_views=max_views,
        reconstruction=reconstruction,
        skipped_views=skipped,
        driving=driving,
        frame=np.asarray(rendered.images[0, 0]),
    )


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 10 else f"{value:.0f}"


def device_line(device: dict, num_gaussians: int, image_size: int) -> str:
    """One sentence naming the device, K and the image size, and how times are given."""
    d = device
    return (
        f"Device: {d['name']} ({d['platform']}, {d['count']} device(s); host {d['host_cpu']}, "
        f"{d['host_cores']} cores), jax {d['jax_version']}. K = {num_gaussians} Gaussians, "
        f"{image_size}x{image_size} px. Times: median (min-max) over the timed calls after "
        "warm-up; compilation apart."
    )


def driving_markdown(driving: DrivingSpeed) -> str:
    """The driving table (LBS, LBS + render) and a line on the rasterizer's counts."""
    v = driving
    overflow = "none"
    if v.isects_dropped or v.tiles_overflow:
        overflow = f"{v.isects_dropped} intersections dropped, {v.tiles_overflow} tiles"
    lines = [
        "| driving (1 frame) | ms ↓ | FPS ↑ | compile, s |",
        "|---|---:|---:|---:|",
        f"| LBS | {v.lbs.spread()} | {1e3 / v.lbs.median_ms:.0f} | {v.lbs.compile_s:.1f} |",
        f"| LBS + render | {v.frame.spread()} | {v.fps:.1f} | {v.frame.compile_s:.1f} |",
        "",
        f"Rasterizer: backend {v.backend}, {v.n_isects} tile intersections "
        f"(capacity {v.capacity}), overflow: {overflow}.",
    ]
    return "\n".join(lines) + "\n"
