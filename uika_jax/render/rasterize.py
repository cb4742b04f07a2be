"""Public differentiable Gaussian rasterizer: `rasterization()`, `RasterConfig`, capacities.

Mirrors ``gsplat.rasterization`` 1.5.3 (packed=False, pinhole, classic
rasterize mode): project (projection.py), bin into 16x16 tiles in exact
(camera, tile, depth) order (binning.py), composite front to back
(composite.py for the ``reference`` backend). Inputs may carry leading batch
dims (a batch of scenes, each with its own cameras); they are vmapped and,
under a mesh (`jax.set_mesh`), run inside `jax.shard_map` over the batch
axis, so no per-Gaussian array is ever gathered onto every device.

Capacities are static: `RasterConfig.capacity` intersection slots per scene
and an optional `tile_cap` slots per tile. Every call counts what did not fit
(`meta`); ``strict=True`` raises `RasterOverflowError` instead (eagerly, or
from a `jax.debug.callback` under `jax.jit`). Use `calibrate_capacity()` on
sample data to size both.

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
import importlib
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from uika_jax.render import binning, composite, projection

RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
DEFAULT_CAPACITY_LIMIT = 2**24

# A backend composites binned Gaussians; same signature and outputs as `composite.composite`.
_BACKENDS: dict[str, Callable] = {"reference": composite.composite}


class RasterOverflowError(RuntimeError):
    """A static rasterizer capacity was exceeded in strict mode."""


def register_backend(name: str, fn: Callable) -> None:
    """Registers a compositing backend with the signature of `composite.composite`."""
    _BACKENDS[name] = fn


@dataclasses.dataclass(frozen=True)
class RasterConfig:
    """Static rasterizer settings (hashable: part of the jit cache key).

    Attributes:
      backend: compositing backend: "reference", or the Pallas kernels of `uika_kernels`
        ("pallas": Triton on GPU, Mosaic on TPU; "pallas_triton", "pallas_mosaic" and
        their "_interpret" variants), imported on first use.
      capacity: intersection slots per scene; None: the exact bound C * N * n_tiles
        (refused above 2^24: use `calibrate_capacity()`).
      tile_cap: at most this many intersections composited per tile; None: no cap.
      radius_rule: "opacity" (gsplat.rasterization's, default) or "3sigma".
      strict: raise `RasterOverflowError` when a capacity is exceeded.
      sort_key: "exact" (two stable uint32 sorts) or "packed" (one lossy 32-bit key).
      batch_axes: mesh axes the leading batch dim is sharded over under a mesh;
        None: the mesh's non-manual axes, taken greedily in mesh order while the
        batch size stays divisible (scenes are replicated over the others).
    """

    backend: str = "reference"
    capacity: int | None = None
    tile_cap: int | None = None
    radius_rule: str = "opacity"
    strict: bool = False
    sort_key: str = "exact"
    batch_axes: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.backend not in _BACKENDS and self.backend.startswith("pallas"):
            importlib.import_module("uika_kernels")  # registers the Pallas backends
        if self.backend not in _BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; have {sorted(_BACKENDS)}")
        if self.radius_rule not in projection.RADIUS_RULES:
            raise ValueError(f"radius_rule must be one of {projection.RADIUS_RULES}")
        if self.sort_key not in binning.SORT_KEYS:
            raise ValueError(f"sort_key must be one of {binning.SORT_KEYS}")
        for name in ("capacity", "tile_cap"):
            v = getattr(self, name)
            if v is not None and (int(v) != v or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")


def _resolve_capacity(config: RasterConfig, c: int, n: int, n_tiles: int) -> int:
    if config.capacity is not None:
        return int(config.capacity)
    bound = c * n * n_tiles
    if bound > DEFAULT_CAPACITY_LIMIT:
        raise ValueError(
            f"the exact intersection bound C*N*n_tiles = {c}*{n}*{n_tiles} = {bound} exceeds "
            f"2^24; size RasterConfig.capacity (and tile_cap) with calibrate_capacity() on "
            f"sample data"
        )
    return max(bound, 1)


def sanitize(means, quats, scales, opacities, colors, viewmats, Ks):
    """Masks invalid Gaussians / cameras.

    Returns:
      (colors, viewmats, Ks) with non-finite entries replaced by safe values, and the
      masks gauss_ok (N,) and cam_ok (C,).
    """
    gauss_ok = projection.gaussian_validity(means, quats, scales, opacities)
    gauss_ok &= jnp.isfinite(colors).all(-1).reshape(-1, means.shape[0]).all(0)
    cam_ok = jnp.isfinite(viewmats).all((-1, -2)) & jnp.isfinite(Ks).all((-1, -2))
    cam_ok &= (Ks[:, 0, 0] > 0) & (Ks[:, 1, 1] > 0)
    eye_k = jnp.eye(3, dtype=Ks.dtype)
    viewmats = jnp.where(cam_ok[:, None, None], viewmats, jnp.eye(4, dtype=viewmats.dtype))
    Ks = jnp.where(cam_ok[:, None, None], Ks, eye_k)
    colors = jnp.where(jnp.isfinite(colors), colors, 0.0)
    return colors, viewmats, Ks, gauss_ok, cam_ok


def _rasterize_scene(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds, *, static):
    """One scene: (N, ...) Gaussians, (C, ...) cameras. Returns (colors, alphas, meta arrays)."""
    width, height, near_plane, far_plane, eps2d, tile_size, render_mode, config = static
    c, n = viewmats.shape[0], means.shape[0]
    tiles_x, tiles_y = binning.tile_grid(width, height, tile_size)
    n_tiles = tiles_x * tiles_y
    capacity = _resolve_capacity(config, c, n, n_tiles)

    colors, viewmats, Ks, gauss_ok, cam_ok = sanitize(
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
        tile_size=tile_size, capacity=capacity, sort_key=config.sort_key,
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

    acc, t_final, truncated = _BACKENDS[config.backend](
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
    affected = composite.tiles_to_image(tile_pix, c, width, height, tile_size) | truncated
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
        "isects_dropped": jnp.maximum(bins.n_isects - capacity, 0),
        "max_tile_count": jnp.max(true_count),
        "tiles_overflow": jnp.sum(dropped_tile | capped_tile).astype(jnp.int32),
        "pixels_overflow": jnp.sum(affected).astype(jnp.int32),
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


def _overflow_message(meta) -> str | None:
    dropped = int(np.max(meta["isects_dropped"]))
    tiles = int(np.max(meta["tiles_overflow"]))
    if dropped == 0 and tiles == 0:
        return None
    return (
        f"rasterizer overflow: {dropped} intersections beyond capacity (true total "
        f"{int(np.max(meta['n_isects']))}), {tiles} tiles over capacity or tile_cap, "
        f"{int(np.max(meta['pixels_overflow']))} pixels affected; raise "
        f"RasterConfig.capacity / tile_cap (see calibrate_capacity())"
    )


def _raise_on_overflow(dropped, tiles, total, pixels):
    msg = _overflow_message(
        {"isects_dropped": dropped, "tiles_overflow": tiles, "n_isects": total,
         "pixels_overflow": pixels}
    )  # fmt: skip
    if msg is not None:
        raise RasterOverflowError(msg)


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
    fn = functools.partial(_rasterize_scene, static=static)
    if nb == 0:
        return fn(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds)
    batch = means.shape[:nb]
    flat = [
        None if x is None else x.reshape((-1, *x.shape[nb:]))
        for x in (means, quats, scales, opacities, colors, viewmats, Ks, backgrounds)
    ]
    vfn = jax.vmap(fn)
    mesh = jax.sharding.get_abstract_mesh()
    config = static[-1]
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
      near_plane: depth culling, near.
      far_plane: depth culling, far.
      eps2d: added to 2D covariances (zero scales become eps2d-sized points).
      tile_size: tile side in pixels.
      backgrounds: (..., C, D) or (D,) colours behind the Gaussians.
      render_mode: "RGB" (features as given), "D" (accumulated depth), "ED" (depth
        divided by alpha), "RGB+D" / "RGB+ED" (depth appended as the last channel).
      config: `RasterConfig`; None: the defaults (exact capacity bound, no tile cap).

    Returns:
      (render_colors (..., C, H, W, D'), render_alphas (..., C, H, W, 1), meta): meta holds
      per (camera, Gaussian) `radii`, `means2d`, `depths`, `conics`, `opacities`,
      `tiles_per_gauss`; the bins `flatten_ids`, `isect_offsets`; the counters
      `n_isects` (true total), `isects_dropped`, `max_tile_count`, `tiles_overflow`,
      `pixels_overflow`, `n_invalid_gaussians`, `n_invalid_cameras`; and the static
      `isect_capacity`, `tile_cap`, `width`, `height`, `tile_size`, `tile_width`,
      `tile_height`, `n_cameras`.

    Raises:
      ValueError: bad shapes or modes, bad values in an eager call, or a default
        capacity above 2^24.
      RasterOverflowError: a capacity was exceeded with `config.strict`.
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
    tiles_x, tiles_y = binning.tile_grid(width, height, tile_size)
    capacity = _resolve_capacity(config, c, n, tiles_x * tiles_y)
    dtype = means.dtype
    if backgrounds is not None:
        backgrounds = jnp.broadcast_to(backgrounds, (*batch, c, colors.shape[-1])).astype(dtype)
    colors = colors.astype(dtype)
    # `strict` only matters out here: keep it out of the jit cache key.
    core_config = dataclasses.replace(config, strict=False)
    static = (width, height, float(near_plane), float(far_plane), float(eps2d), tile_size,
              render_mode, core_config)  # fmt: skip
    render, alphas, meta = _rasterize_batched(
        means, quats.astype(dtype), scales.astype(dtype), opacities.astype(dtype), colors,
        viewmats.astype(dtype), Ks.astype(dtype), backgrounds, static,
    )  # fmt: skip
    if config.strict:
        if concrete:
            msg = _overflow_message(meta)
            if msg is not None:
                raise RasterOverflowError(msg)
        else:
            jax.debug.callback(
                _raise_on_overflow, meta["isects_dropped"], meta["tiles_overflow"],
                meta["n_isects"], meta["pixels_overflow"],
            )  # fmt: skip
    meta.update(
        isect_capacity=capacity, tile_cap=config.tile_cap, width=width, height=height,
        tile_size=tile_size, tile_width=tiles_x, tile_height=tiles_y, n_cameras=c,
    )  # fmt: skip
    return render, alphas, meta
