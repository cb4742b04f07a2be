"""The rasterizer's static settings (`RasterConfig`) and its overflow error."""

from __future__ import annotations

import dataclasses

from uika_jax.render import backends, projection

# Intersection slots are int32 indices and the intersection total saturates at 2^31 - 1,
# so a capacity below that always shows a saturated total as dropped intersections.
MAX_CAPACITY = 2**31 - 2


class RasterOverflowError(RuntimeError):
    """A static rasterizer capacity was exceeded in strict mode."""


@dataclasses.dataclass(frozen=True)
class RasterConfig:
    """Static rasterizer settings (hashable: part of the jit cache key).

    Attributes:
      backend: compositing backend. "auto" (default): per platform, the Pallas kernel
        (Triton on CUDA/ROCm GPUs, Mosaic on TPU) once that platform is listed in
        `backends.VERIFIED_PALLAS_PLATFORMS`, which happens only after its gpu- or
        tpu-marked parity test passed on real hardware; until then, and on CPU, the
        reference. No platform is verified yet, so "auto" is the reference everywhere.
        "reference", or a Pallas kernel by name: "pallas" (the platform's kernel; Triton
        in interpret mode on CPU), "pallas_triton", "pallas_mosaic" and their
        "_interpret" variants, imported on first use.
      capacity: intersection slots per scene (at most `MAX_CAPACITY`). None: sized per
        call: on concrete inputs from the exact intersection count (rounded up, see
        `capacity.round_capacity`); under tracing (jit, grad, vmap) the exact bound
        C * N * n_tiles, refused above 2^24 (then set it, e.g. with
        `calibrate_capacity()`).
      tile_cap: at most this many intersections composited per tile; None: no cap.
      radius_rule: "opacity" (gsplat.rasterization's, default) or "3sigma".
      strict: on eager calls raise `RasterOverflowError` when a capacity is exceeded;
        under a caller's jit the overflow counters in `meta` are returned as always and
        the caller raises (`rasterize.check_overflow(meta)` on the fetched values).
      warn_on_overflow: log a rate-limited warning when a capacity is exceeded, from
        inside jit through a `jax.debug.callback`. Turn it off to lower for another
        platform than the host's (ahead-of-time cross-compilation: host callbacks need
        the host's backend) or to keep host callbacks out of a step.
      batch_axes: mesh axes the leading batch dim is sharded over under a mesh;
        None: the mesh's non-manual axes, taken greedily in mesh order while the
        batch size stays divisible (scenes are replicated over the others).
    """

    backend: str = "auto"
    capacity: int | None = None
    tile_cap: int | None = None
    radius_rule: str = "opacity"
    strict: bool = False
    warn_on_overflow: bool = True
    batch_axes: tuple[str, ...] | None = None

    def __post_init__(self):
        backends.get_backend(self.backend)  # raises for unknown names
        if self.radius_rule not in projection.RADIUS_RULES:
            raise ValueError(f"radius_rule must be one of {projection.RADIUS_RULES}")
        for name in ("capacity", "tile_cap"):
            v = getattr(self, name)
            if v is not None and (int(v) != v or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        if self.capacity is not None and self.capacity > MAX_CAPACITY:
            raise ValueError(f"capacity must be at most {MAX_CAPACITY}, got {self.capacity}")
