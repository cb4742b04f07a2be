"""Public differentiable Gaussian rasterizer: `rasterization()`.

Mirrors ``gsplat.rasterization`` 1.5.3 (packed=False, pinhole, classic
rasterize mode): project (projection.py), bin into 16x16 tiles in exact
(camera, tile, depth) order (binning.py), composite front to back with the
backend `RasterConfig.backend` names (backends.py; composite.py is the
reference). Inputs may carry leading batch dims (a batch of scenes, each with
its own cameras); they are vmapped and, under a mesh (`jax.set_mesh`), run
inside `jax.shard_map` over the batch axis, so no per-Gaussian array is ever
gathered onto every device.

Precision: Gaussians and cameras are projected and composited in at least
float32 (`projection.compute_dtype`): bfloat16 or float16 inputs are cast up,
float64 inputs stay float64. The outputs keep that compute type (a bfloat16
image would quantise colours to 8 bits); gradients reach the inputs in their
own dtypes.

Capacities are static shapes: `RasterConfig.capacity` intersection slots per
scene and an optional `tile_cap` slots per tile. With ``capacity=None`` a call
on concrete (non-traced) inputs counts its intersections exactly first and
sizes the slots itself (`capacity.round_capacity`), up to what int32 slot
indices and memory allow, beyond which it raises a clear error; under tracing
it cannot count, so it takes the exact bound C * N * n_tiles up to 2^24 and
otherwise asks for a capacity. What does not fit is dropped farthest first:
the farthest intersections beyond `capacity`, the farthest slots of a tile
beyond `tile_cap`. Every call counts what was dropped (`meta`); an overflow
logs a rate-limited warning (`OVERFLOW_WARNING`, from inside jit through
`jax.debug.callback`; `RasterConfig.warn_on_overflow`). ``strict=True``
raises `RasterOverflowError` on eager calls; under a caller's jit the counters
are returned and the caller raises (`check_overflow(meta)` on the fetched
`meta`).

Bad input: in eager calls, non-finite parameters, negative scales, opacities
outside [0, 1], zero quaternions and non-finite or non-positive-focal cameras
raise `ValueError`. Under tracing (jit/vmap/grad) they cannot raise; instead
such Gaussians (or whole cameras) are masked out: they are culled (radii 0),
contribute nothing, get zero gradients, and are counted in
``meta["n_invalid_gaussians"]`` / ``meta["n_invalid_cameras"]``. Non-finite
backgrounds are not masked.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from uika_jax.render import backends, binning, capacity, projection
from uika_jax.render.config import RasterConfig, RasterOverflowError
from uika_kernels.tiles import tile_grid, tiles_to_image

RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
# capacity=None: below this exact bound C * N * n_tiles, the bound itself (no counting pass).
SMALL_BOUND = 2**16
# capacity=None under tracing: the exact bound, up to this many slots.
TRACED_BOUND_LIMIT = 2**24

_LOG = logging.getLogger(__name__)


class RateLimitedWarning:
    """Logs a warning at most once per `interval_s` seconds, counting the ones held back."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forgets the last warning: the next one is logged."""
        self._last = -math.inf
        self.held_back = 0

    def warn(self, message: str) -> None:
        """Logs `message` unless one was logged less than `interval_s` seconds ago."""
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval_s:
                self.held_back += 1
                return
            if self.held_back:
                message += f" ({self.held_back} more overflowing calls since the last warning)"
            self._last, self.held_back = now, 0
        _LOG.warning(message)


OVERFLOW_WARNING = RateLimitedWarning(interval_s=60.0)


def _rasterize_scene(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds, *, static):
    """One scene: (N, ...) Gaussians, (C, ...) cameras. Returns (colors, alphas, meta arrays)."""
    width, height, near_plane, far_plane, eps2d, tile_size, render_mode, config = static
    c, n = viewmats.shape[0], means.shape[0]
    tiles_x, tiles_y = tile_grid(width, height, tile_size)
    n_tiles = tiles_x * tiles_y

    colors, viewmats, Ks, gauss_ok, cam_ok = projection.sanitize(
        means, quats, scales, opacities, colors, viewmats, Ks
    )
    valid = cam_ok[:, None] & gauss_ok[None, :]
    proj = projection.project(
        means, quats, scales, opacities, viewmats, Ks, width, height,
        near_plane=near_plane, far_plane=far_plane, eps2d=eps2d,
        radius_rule=config.radius_rule, valid=valid,
    )  # fmt: skip
    bins = binning.bin_gaussians(
        proj.means2d, proj.radii, proj.depths, width, height,
        tile_size=tile_size, capacity=config.capacity,
    )  # fmt: skip

    colors = jnp.broadcast_to(colors, (c, n, colors.shape[-1]))
    depth_feat = jnp.where(proj.radii[..., :1] > 0, proj.depths[..., None], 0.0)
    if render_mode in ("D", "ED"):
        feats = depth_feat
        backgrounds = None
    elif render_mode in ("RGB+D", "RGB+ED"):
        feats = jnp.concatenate([colors, depth_feat], -1)
        if backgrounds is not None:
            backgrounds = jnp.concatenate([backgrounds, jnp.zeros_like(backgrounds[:, :1])], -1)
    else:
        feats = colors
    feats = jnp.where(proj.radii[..., :1] > 0, feats, 0.0)

    acc, t_final, truncated = backends.get_backend(config.backend)(
        proj.means2d, proj.conics, proj.opacities, feats.astype(proj.means2d.dtype),
        bins.flat_ids, bins.tile_start, bins.tile_count, width, height,
        tile_size=tile_size, tile_cap=config.tile_cap,
    )  # fmt: skip
    render = acc
    if backgrounds is not None:
        render = render + t_final[..., None] * backgrounds[:, None, None, :]
    alphas = (1.0 - t_final)[..., None]
    if render_mode in ("ED", "RGB+ED"):
        render = jnp.concatenate(
            [render[..., :-1], render[..., -1:] / jnp.maximum(alphas, 1e-10)], -1
        )

    # Overflow accounting.
    true_count = bins.true_tile_count
    dropped_tile = true_count > bins.tile_count
    capped_tile = (
        true_count > config.tile_cap
        if config.tile_cap is not None
        else jnp.zeros_like(dropped_tile)
    )
    p = tile_size * tile_size
    tile_pix = jnp.broadcast_to(dropped_tile[:, None], (c * n_tiles, p))
    affected = tiles_to_image(tile_pix, c, width, height, tile_size) | truncated
    isects_dropped = jnp.maximum(bins.n_isects - config.capacity, 0)
    tiles_overflow = jnp.sum(dropped_tile | capped_tile).astype(jnp.int32)
    meta = {
        "radii": proj.radii,
        "means2d": proj.means2d,
        "depths": proj.depths,
        "conics": proj.conics,
        "opacities": proj.opacities,
        "tiles_per_gauss": bins.tiles_per_gauss,
        "flatten_ids": bins.flat_ids,
        "isect_offsets": bins.tile_start.reshape(c, tiles_y, tiles_x),
        "n_isects": bins.n_isects,
        "isects_dropped": isects_dropped,
        "max_tile_count": jnp.max(true_count),
        "tiles_overflow": tiles_overflow,
        "pixels_overflow": jnp.sum(affected).astype(jnp.int32),
        "overflow": (isects_dropped > 0) | (tiles_overflow > 0),
        "n_invalid_gaussians": jnp.sum(~gauss_ok).astype(jnp.int32),
        "n_invalid_cameras": jnp.sum(~cam_ok).astype(jnp.int32),
    }
    return render, alphas, meta


def _check_shapes(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds, mode):
    batch = means.shape[:-2]
    nb = len(batch)
    if means.ndim < 2 or means.shape[-1] != 3 or means.shape[-2] == 0:
        raise ValueError(f"means must be (..., N, 3) with N >= 1, got {means.shape}")
    n = means.shape[-2]
    if viewmats.shape[:nb] != batch or viewmats.shape[nb + 1 :] != (4, 4):
        raise ValueError(f"viewmats must be {(*batch, 'C', 4, 4)}, got {viewmats.shape}")
    c = viewmats.shape[nb]
    if c == 0:
        raise ValueError("need at least one camera")
    expect = {
        "quats": (quats, (*batch, n, 4)),
        "scales": (scales, (*batch, n, 3)),
        "opacities": (opacities, (*batch, n)),
        "Ks": (Ks, (*batch, c, 3, 3)),
    }
    for name, (x, shape) in expect.items():
        if x.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {x.shape}")
    if colors.shape[:-1] not in ((*batch, n), (*batch, c, n)) or colors.ndim < 2:
        raise ValueError(
            f"colors must be {(*batch, n, 'D')} or {(*batch, c, n, 'D')}, got {colors.shape}"
        )
    if mode not in RENDER_MODES:
        raise ValueError(f"render_mode must be one of {RENDER_MODES}, got {mode!r}")
    if backgrounds is not None and backgrounds.shape not in (
        (*batch, c, colors.shape[-1]),
        (colors.shape[-1],),
    ):
        raise ValueError(
            f"backgrounds must be {(*batch, c, colors.shape[-1])} or "
            f"{(colors.shape[-1],)}, got {backgrounds.shape}"
        )
    return batch, n, c


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _check_values(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds):
    checks = [
        ("means", means, None),
        ("quats", quats, None),
        ("scales", scales, "scales must be >= 0"),
        ("opacities", opacities, "opacities must lie in [0, 1]"),
        ("colors", colors, None),
        ("viewmats", viewmats, None),
        ("Ks", Ks, None),
    ]
    if backgrounds is not None:
        checks.append(("backgrounds", backgrounds, None))
    for name, x, _ in checks:
        bad = ~np.isfinite(np.asarray(x))
        if bad.any():
            raise ValueError(f"{name} has {int(bad.sum())} non-finite values")
    if (np.asarray(scales) < 0).any():
        raise ValueError("scales must be >= 0 (linear scales; zero is a point)")
    op = np.asarray(opacities)
    if ((op < 0) | (op > 1)).any():
        raise ValueError("opacities must lie in [0, 1] (activated, not logits)")
    if (np.sum(np.asarray(quats, np.float64) ** 2, -1) == 0).any():
        raise ValueError("quats contains zero quaternions")
    ks = np.asarray(Ks)
    if (ks[..., 0, 0] <= 0).any() or (ks[..., 1, 1] <= 0).any():
        raise ValueError("Ks must have positive focal lengths")


def overflow_message(meta: dict) -> str | None:
    """What overflowed in `meta` (fetched values; batched counters are maxed), or None."""
    dropped = int(np.max(meta["isects_dropped"]))
    tiles = int(np.max(meta["tiles_overflow"]))
    if dropped == 0 and tiles == 0:
        return None
    return (
        f"rasterizer overflow: {dropped} intersections beyond capacity dropped (true total "
        f"{int(np.max(meta['n_isects']))}), {tiles} tiles over capacity or tile_cap (the "
        f"farthest intersections are the ones dropped), {int(np.max(meta['pixels_overflow']))}"
        f" pixels affected; raise RasterConfig.capacity / tile_cap (see calibrate_capacity())"
    )


def check_overflow(meta: dict) -> None:
    """Raises `RasterOverflowError` if `meta` (fetched from a jitted call) shows an overflow.

    For training loops that jit `rasterization()` with ``strict=True``: inside jit the
    error cannot be raised, so the loop calls this on the returned `meta`.
    """
    message = overflow_message(meta)
    if message is not None:
        raise RasterOverflowError(message)


def _warn_on_overflow(dropped, tiles, total, pixels):
    message = overflow_message(
        {"isects_dropped": dropped, "tiles_overflow": tiles, "n_isects": total,
         "pixels_overflow": pixels}
    )  # fmt: skip
    if message is not None:
        OVERFLOW_WARNING.warn(message)


def _reporting_overflow(fn):
    """`fn` (returning render, alphas, meta) that also warns of an overflow from inside jit.

    One `jax.debug.callback` per call on the counters' maxima over the local batch
    (inside `shard_map`, per device: no collective).
    """

    def wrapped(*args):
        render, alphas, meta = fn(*args)
        jax.debug.callback(
            _warn_on_overflow,
            *(jnp.max(meta[k]) for k in ("isects_dropped", "tiles_overflow", "n_isects",
                                         "pixels_overflow")),
        )  # fmt: skip
        return render, alphas, meta

    return wrapped


def _capacity(config, arrays, concrete, c, n, static) -> int:
    """Intersection slots per scene for this call (see `RasterConfig.capacity`)."""
    if config.capacity is not None:
        return int(config.capacity)
    width, height, near_plane, far_plane, eps2d, tile_size = static
    tiles_x, tiles_y = tile_grid(width, height, tile_size)
    bound = c * n * tiles_x * tiles_y
    if bound <= SMALL_BOUND:
        return max(bound, 1)
    if concrete:
        means, quats, scales, opacities, _, viewmats, Ks = arrays
        total, _ = capacity.scene_counts(
            means, quats, scales, opacities, viewmats, Ks, width=width, height=height,
            near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, tile_size=tile_size,
            radius_rule=config.radius_rule,
        )  # fmt: skip
        # A 1% margin: the render's own projection is another XLA program, whose rounding
        # may move a radius across a tile edge here and there.
        total = int(np.max(total))
        return min(capacity.round_capacity(total + total // 100 + 1), bound)
    if bound <= TRACED_BOUND_LIMIT:
        return bound
    raise ValueError(
        f"under jit (traced inputs) rasterization() cannot count intersections to size its "
        f"buffers, and the exact bound C*N*n_tiles = {c}*{n}*{tiles_x * tiles_y} = {bound} "
        f"exceeds 2^24: pass config=RasterConfig(capacity=...), e.g. "
        f"calibrate_capacity(means, quats, scales, opacities, viewmats, Ks, width, height) "
        f"on sample data, or call it outside jit"
    )


def _batch_axes(mesh, requested: tuple[str, ...] | None, batch: int) -> tuple[str, ...]:
    """Mesh axes to shard `batch` scenes over (module docstring of `RasterConfig`)."""
    free = [a for a in mesh.axis_names if a not in mesh.manual_axes]
    if requested is not None:
        bad = [a for a in requested if a not in free]
        if bad:
            raise ValueError(f"batch_axes {bad} are not free axes of the mesh {tuple(free)}")
        size = math.prod(mesh.shape[a] for a in requested)
        if batch % size:
            raise ValueError(
                f"batch of {batch} scenes does not divide over mesh axes {requested} "
                f"({size} devices)"
            )
        return tuple(requested)
    axes, size = [], 1
    for a in free:  # greedily, in mesh order, while the batch still divides
        if batch % (size * mesh.shape[a]) == 0:
            axes.append(a)
            size *= mesh.shape[a]
    return tuple(axes)


@functools.partial(jax.jit, static_argnames=("static",))
def _rasterize_batched(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds, static):
    nb = means.ndim - 2
    config = static[-1]
    report = _reporting_overflow if config.warn_on_overflow else lambda fn: fn
    fn = functools.partial(_rasterize_scene, static=static)
    if nb == 0:
        return report(fn)(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds)
    batch = means.shape[:nb]
    flat = [
        None if x is None else x.reshape((-1, *x.shape[nb:]))
        for x in (means, quats, scales, opacities, colors, viewmats, Ks, backgrounds)
    ]
    vfn = report(jax.vmap(fn))
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else _batch_axes(mesh, config.batch_axes, flat[0].shape[0])
    if axes:
        spec = jax.P(axes)
        in_specs = tuple(None if x is None else spec for x in flat)
        # Scenes are independent (no collectives inside), so varying-axis checks are off:
        # the loops' fresh carries would otherwise need pcasts.
        vfn = jax.shard_map(
            vfn, in_specs=in_specs, out_specs=spec, axis_names=set(axes), check_vma=False
        )
    render, alphas, meta = vfn(*flat)
    unflat = lambda x: x.reshape((*batch, *x.shape[1:]))  # noqa: E731
    return unflat(render), unflat(alphas), jax.tree.map(unflat, meta)


def rasterization(
    means: jax.Array,
    quats: jax.Array,
    scales: jax.Array,
    opacities: jax.Array,
    colors: jax.Array,
    viewmats: jax.Array,
    Ks: jax.Array,
    width: int,
    height: int,
    *,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    tile_size: int = 16,
    backgrounds: jax.Array | None = None,
    render_mode: str = "RGB",
    config: RasterConfig | None = None,
) -> tuple[jax.Array, jax.Array, dict]:
    """Renders 3D Gaussians into C cameras (gsplat.rasterization semantics, packed=False).

    Args:
      means: centres (..., N, 3); leading dims are a batch of scenes.
      quats: wxyz rotations (..., N, 4), normalised inside.
      scales: linear scales (..., N, 3), >= 0.
      opacities: activated opacities (..., N) in [0, 1].
      colors: colours or features (..., N, D) or per camera (..., C, N, D).
      viewmats: OpenCV world-to-camera matrices (..., C, 4, 4).
      Ks: intrinsics (..., C, 3, 3).
      width: image width (any size).
      height: image height.
      near_plane: depth culling, near (depths exactly at the plane are kept).
      far_plane: depth culling, far (depths exactly at the plane are kept).
      eps2d: added to 2D covariances (zero scales become eps2d-sized points).
      tile_size: tile side in pixels.
      backgrounds: (..., C, D) or (D,) colours behind the Gaussians.
      render_mode: "RGB" (features as given), "D" (accumulated depth), "ED" (depth
        divided by alpha), "RGB+D" / "RGB+ED" (depth appended as the last channel).
      config: `RasterConfig`; None: the defaults ("auto" backend, capacity sized per
        call, no tile cap).

    Returns:
      (render_colors (..., C, H, W, D'), render_alphas (..., C, H, W, 1), meta), in the
      compute dtype (float32 unless the means are float64): meta holds per (camera,
      Gaussian) `radii`, `means2d`, `depths`, `conics`, `opacities`, `tiles_per_gauss`;
      the bins `flatten_ids`, `isect_offsets`; the counters `n_isects` (true total,
      saturating at 2^31 - 1), `isects_dropped`, `max_tile_count`, `tiles_overflow`,
      `pixels_overflow`, `overflow` (bool), `n_invalid_gaussians`, `n_invalid_cameras`
      (one per scene); and the static `isect_capacity`, `tile_cap`, `width`, `height`,
      `tile_size`, `tile_width`, `tile_height`, `n_cameras`.

    Raises:
      ValueError: bad shapes or modes, bad values in an eager call, more intersections
        than int32 slots address, or (under tracing) capacity=None with an exact bound
        above 2^24.
      MemoryError: the device ran out of memory (the message names the capacity).
      RasterOverflowError: a capacity was exceeded with `config.strict` in an eager call.
    """
    config = config or RasterConfig()
    width, height, tile_size = int(width), int(height), int(tile_size)
    if width < 1 or height < 1 or tile_size < 1:
        raise ValueError(
            f"width, height, tile_size must be positive, got {width, height, tile_size}"
        )
    arrays = [jnp.asarray(x) for x in (means, quats, scales, opacities, colors, viewmats, Ks)]
    means, quats, scales, opacities, colors, viewmats, Ks = arrays
    if backgrounds is not None:
        backgrounds = jnp.asarray(backgrounds)
    batch, n, c = _check_shapes(
        means, quats, scales, opacities, colors, viewmats, Ks, backgrounds, render_mode
    )
    concrete = _is_concrete(*arrays, backgrounds)
    if concrete:
        _check_values(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds)
    dtype = projection.compute_dtype(means.dtype)
    arrays = [x.astype(dtype) for x in arrays]
    if backgrounds is not None:
        backgrounds = jnp.broadcast_to(backgrounds, (*batch, c, colors.shape[-1])).astype(dtype)
    geometry = (width, height, float(near_plane), float(far_plane), float(eps2d), tile_size)
    slots = _capacity(config, arrays, concrete, c, n, geometry)
    # `strict` only matters out here: keep it out of the jit cache key; "auto" resolved
    # here shares the reference's cache entries while no platform's kernel is verified.
    core_config = dataclasses.replace(
        config, backend=backends.resolve(config.backend), capacity=slots, strict=False
    )
    try:
        render, alphas, meta = _rasterize_batched(
            *arrays, backgrounds, (*geometry, render_mode, core_config)
        )
        message = overflow_message(meta) if concrete and config.strict else None
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise MemoryError(
            f"rasterization() ran out of device memory with {slots} intersection slots per "
            f"scene ({math.prod(batch)} scenes x {c} cameras, {n} Gaussians, {width}x{height}):"
            f" render fewer scenes or cameras per call, or fewer or smaller Gaussians"
        ) from e
    if config.strict and message is not None:
        raise RasterOverflowError(message)
    tiles_x, tiles_y = tile_grid(width, height, tile_size)
    meta.update(
        isect_capacity=slots, tile_cap=config.tile_cap, width=width, height=height,
        tile_size=tile_size, tile_width=tiles_x, tile_height=tiles_y, n_cameras=c,
    )  # fmt: skip
    return render, alphas, meta
