"""Pallas compositing kernels (uika_kernels): parity with the reference backend in interpret
mode (Triton `interpret=True`, Mosaic `pltpu.InterpretParams()`) through `rasterization()`,
forward and gradients; cross-lowering of forward and gradient for CUDA (Triton) and TPU
(Mosaic, inside an abstract TPU mesh), so block-shape and lowering errors show without
hardware; and, marked `gpu` / `tpu` (skipped elsewhere), the compiled kernels on the device
against the reference there. Run those on the hardware with
``JAX_PLATFORMS=cuda pytest -m gpu tests/test_pallas_raster.py`` (``tpu`` likewise); a
platform joins `backends.VERIFIED_PALLAS_PLATFORMS` (where "auto" picks its kernel) only
once they pass there."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh
from raster_cases import (
    bin_gaussians,
    composite_value_and_grad,
    loss_weights,
    rel_error,
    render_value_and_grad,
    scene_arrays,
    wide_scene,
)
from render_oracle import random_scene

from uika_jax.render import RasterConfig, backends, camera, composite, rasterization
from uika_kernels import raster

# Interpret mode vs the reference, measured on CPU: forward max |difference| <= 3.1e-7 of the
# image's largest value, gradient relative L2 error <= 9.5e-7 (about 6x below these).
FWD_ATOL = 2e-6
GRAD_RTOL = 5e-6
# Compiled kernels on the device vs the reference there: not yet measured on hardware
# (the device's exp and fused multiply-adds may differ from the CPU's); tighten once run.
DEVICE_FWD_ATOL = 1e-5
DEVICE_GRAD_RTOL = 1e-4


def _scene(seed, n, c, d=3):
    """A small scene: an opaque core (early termination), faint and point Gaussians."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 0.5, (n, 3))
    means[: n // 4] = rng.normal(0.0, 0.05, (n // 4, 3))
    scales = np.exp(rng.uniform(np.log(0.02), np.log(0.3), (n, 3)))
    scales[-2:] = 0.0
    opacities = rng.uniform(0.05, 1.0, n)
    opacities[: n // 8] = rng.uniform(0.95, 1.0, n // 8)
    opacities[-4:-2] = 0.5 / 255.0
    viewmats = np.stack([camera.orbit_viewmat(30.0 * i - 15.0, 10.0 * i, 2.5) for i in range(c)])
    ks = np.array([[40.0, 0.0, 21.0], [0.0, 44.0, 12.0], [0.0, 0.0, 1.0]])
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return {
        "means": f32(means),
        "quats": f32(rng.normal(size=(n, 4))),
        "scales": f32(scales),
        "opacities": f32(opacities),
        "colors": f32(rng.uniform(0.0, 1.0, (n, d))),
        "backgrounds": f32(rng.uniform(0.0, 1.0, (c, d))),
        "viewmats": f32(viewmats),
        "Ks": f32(np.broadcast_to(ks, (c, 3, 3))),
    }


W, H = 40, 24  # 3 x 2 tiles, the last column and row partial
KEYS = ("means", "quats", "scales", "opacities", "colors", "backgrounds")


@functools.cache
def _case(name):
    """(the 10 arrays of `render_value_and_grad`, its static arguments, tile_cap) of a case.

    "wide": the shared scene (RGB+D, backgrounds; its reference program is the one the other
    `WIDE` tests compile). "batched": two small scenes as a leading batch dim, per-camera
    colours. On devices also "wide_capped" (a tile cap) and "dense" (long tile lists).
    """
    if name == "batched":
        scenes = [_scene(seed, 16, 1) for seed in (3, 4)]
        batch = {k: jnp.stack([s[k] for s in scenes]) for k in scenes[0]}
        batch["colors"] = batch["colors"][:, None]  # (B, C, N, D)
        arrays = [batch[k] for k in (*KEYS, "viewmats", "Ks")]
        weights = loss_weights(1, (2, 1, H, W), 3)
        return (*arrays, *weights), {"width": W, "height": H, "render_mode": "RGB"}, None
    scene = random_scene(4, 2000, 128, 96, 2) if name == "dense" else wide_scene()
    c, w, h = len(scene["Ks"]), scene["width"], scene["height"]
    args = scene_arrays(scene)
    bg = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (c, 3)), jnp.float32)
    weights = loss_weights(2, (c, h, w), 4)
    tile_cap = 48 if name == "wide_capped" else None
    return (*args[:5], bg, *args[5:], *weights), {"width": w, "height": h}, tile_cap


@functools.cache
def _reference(name):
    """The reference's ((loss, (render, alphas, meta)), gradients) of a case; a batch of scenes
    scene by scene (the single-scene program, cheaper to compile than the vmapped one)."""
    inputs, static, tile_cap = _case(name)
    if tile_cap is not None:
        static = {**static, "config": RasterConfig(tile_cap=tile_cap)}
    if name != "batched":
        return render_value_and_grad(*inputs, **static)
    scenes = [render_value_and_grad(*(x[b] for x in inputs), **static) for b in range(2)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *scenes)


def _check_parity(backend, name, fwd_atol, grad_rtol):
    """`backend` against the reference through `rasterization()`: images, overflow, gradients."""
    inputs, static, tile_cap = _case(name)
    (_, (render, alphas, meta)), grads = _reference(name)
    assert np.max(meta["max_tile_count"]) > 7
    if tile_cap is None:
        assert float(alphas.max()) > 0.99  # some pixels terminate early
    else:
        assert np.max(meta["pixels_overflow"]) > 0
    config = RasterConfig(backend=backend, tile_cap=tile_cap)
    (_, (p_render, p_alphas, p_meta)), p_grads = render_value_and_grad(
        *inputs, **static, config=config
    )
    scale = max(1.0, float(jnp.abs(render).max()))  # depth channels reach about 3
    assert float(jnp.abs(p_render - render).max()) <= fwd_atol * scale
    assert float(jnp.abs(p_alphas - alphas).max()) <= fwd_atol
    np.testing.assert_array_equal(p_meta["pixels_overflow"], meta["pixels_overflow"])
    for k, g, pg in zip(KEYS, grads, p_grads, strict=True):
        assert float(jnp.linalg.norm(g)) > 0, k
        assert rel_error(pg, g) <= grad_rtol, (k, rel_error(pg, g))


@pytest.mark.parametrize(
    "backend,case", [("pallas", "wide"), ("pallas_mosaic_interpret", "batched")]
)
def test_interpret_matches_reference(backend, case):
    """ "pallas" on CPU runs platform_dependent's default branch, the Triton kernel in interpret
    mode; Mosaic in interpret mode (slow) runs a batch of small scenes (a vmapped pallas_call
    with scalar prefetch). Tile caps: `test_kernels_walk_chunks_caps_and_early_exits`."""
    _check_parity(backend, case, FWD_ATOL, GRAD_RTOL)


# On the device: the cases above, a tile cap, and a denser scene (long tile lists).
DEVICE_CASES = ["wide", "wide_capped", "batched", "dense"]


@pytest.mark.gpu
@pytest.mark.parametrize("case", DEVICE_CASES)
def test_triton_on_gpu_matches_reference(case):
    _check_parity("pallas_triton", case, DEVICE_FWD_ATOL, DEVICE_GRAD_RTOL)


@pytest.mark.tpu
@pytest.mark.parametrize("case", DEVICE_CASES)
def test_mosaic_on_tpu_matches_reference(case):
    _check_parity("pallas_mosaic", case, DEVICE_FWD_ATOL, DEVICE_GRAD_RTOL)


CHUNK_W, CHUNK_H, CHUNK_CAP = 20, 18, 10  # 2 x 2 tiles, the last column and row partial


@functools.cache
def _chunk_case():
    """Tile 0 holds 16 opaque Gaussians in front of the 16 faint ones that cover all tiles."""
    rng = np.random.default_rng(3)
    n = 16
    m2 = np.concatenate([rng.uniform(5, 11, (n, 2)), rng.uniform(0, (20, 18), (n, 2))])
    faint = np.stack([rng.uniform(0.01, 0.1, n), rng.uniform(-0.005, 0.005, n),
                      rng.uniform(0.01, 0.1, n)], -1)  # fmt: skip
    con = np.concatenate([np.tile([0.0005, 0.0, 0.0005], (n, 1)), faint])
    op = np.concatenate([np.full(n, 0.99), rng.uniform(0.05, 0.6, n)])
    radii = np.concatenate([np.full((n, 2), 4), np.full((n, 2), 20)])  # tile 0 only; all
    depths = np.concatenate([rng.uniform(1, 1.5, n), rng.uniform(1.5, 2, n)])
    f32 = lambda x: jnp.asarray(x[None], jnp.float32)  # noqa: E731
    bins = bin_gaussians(
        f32(m2), jnp.asarray(radii[None], jnp.int32), f32(depths), CHUNK_W, CHUNK_H,
        capacity=2 * n * 4,
    )  # fmt: skip
    col = rng.uniform(0, 1, (2 * n, 3))
    wc, wt = rng.normal(size=(CHUNK_H, CHUNK_W, 3)), rng.normal(size=(CHUNK_H, CHUNK_W))
    return f32(m2), f32(con), f32(op), f32(col), bins, f32(wc), f32(wt)


MOSAIC_CHUNK_4 = functools.partial(raster.composite, kernel="mosaic", interpret=True, chunk=4)
TRITON_INTERPRET = functools.partial(raster.composite, kernel="triton", interpret=True)


@functools.cache
def _chunk_walk(compositor):
    *arrays, bins, wc, wt = _chunk_case()
    return composite_value_and_grad(
        *arrays, bins, wc, wt, compositor=compositor, width=CHUNK_W, height=CHUNK_H,
        tile_cap=CHUNK_CAP,
    )  # fmt: skip


@pytest.mark.parametrize("kernel", [MOSAIC_CHUNK_4, TRITON_INTERPRET], ids=["mosaic", "triton"])
def test_kernels_walk_chunks_caps_and_early_exits(kernel):
    """Against the reference at the compositor level, with a tile cap of 10. Tile 0 (32 slots):
    its pixels stop within the first 2 Mosaic chunks of 4 slots (an early exit with a prefetch
    in flight), none truncated by the cap. The other tiles walk 10 of their 16 faint slots
    (double buffering, a partial last chunk): every pixel there is truncated."""
    np.testing.assert_array_equal(_chunk_case()[4].tile_count, [32, 16, 16, 16])
    (_, (acc, tr, trunc)), grads = _chunk_walk(composite.composite)
    assert float(tr[0, :16, :16].max()) <= 1e-2  # stopped: T (1 - alpha) <= 1e-4 next
    assert not bool(trunc[0, :16, :16].any())
    assert bool(trunc[0, 16:].all()) and bool(trunc[0, :, 16:].all())
    (_, (p_acc, p_tr, p_trunc)), p_grads = _chunk_walk(kernel)
    assert float(jnp.abs(p_acc - acc).max()) <= FWD_ATOL
    assert float(jnp.abs(p_tr - tr).max()) <= FWD_ATOL
    np.testing.assert_array_equal(p_trunc, trunc)
    for g, pg in zip(grads, p_grads, strict=True):
        assert rel_error(pg, g) <= GRAD_RTOL


def test_bad_tile_size_is_refused():
    z = jnp.zeros
    args = (z((1, 2, 2)), z((1, 2, 3)), z((1, 2)), z((1, 2, 3)), z((4,), int), z((1,), int))
    with pytest.raises(ValueError, match="power-of-two"):
        raster.composite(*args, z((1,), int), 12, 12, tile_size=12)
    with pytest.raises(ValueError, match="128"):
        raster.composite(*args, z((1,), int), 8, 8, tile_size=8, kernel="mosaic")


def _lower(backend, platform, mesh=None, batched=False):
    """StableHLO text of a loss of the render and of its gradient, lowered for `platform`.

    batched: a leading batch of 2 scenes (vmapped kernels; under `mesh`, inside shard_map).
    """
    scene = _scene(0, 16, 2)
    if batched:
        scene = {k: jnp.stack([v, v]) for k, v in scene.items()}
    config = RasterConfig(backend=backend, warn_on_overflow=False)  # no host callback
    *batch, c, d = scene["backgrounds"].shape
    weights = (jnp.zeros((*batch, c, H, W, d)), jnp.zeros((*batch, c, H, W, 1)))
    arrays = [scene[k] for k in (*KEYS, "viewmats", "Ks")] + list(weights)
    args = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in arrays]

    def loss(means, quats, scales, opacities, colors, backgrounds, viewmats, ks, wc, wa):
        render, alphas, _ = rasterization(
            means, quats, scales, opacities, colors, viewmats, ks, W, H,
            backgrounds=backgrounds, config=config,
        )  # fmt: skip
        return jnp.sum(render * wc) + jnp.sum(alphas * wa)

    # Fresh jits: `backends.VERIFIED_PALLAS_PLATFORMS` may be patched between calls.
    programs = [jax.jit(loss), jax.jit(jax.grad(loss, argnums=tuple(range(6))))]
    texts = []
    for fn in programs:
        with use_abstract_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            lowered = fn.trace(*args).lower(lowering_platforms=(platform,))
        texts.append(lowered.as_text())
    return texts


@pytest.mark.parametrize("batched", [False, True])
def test_lowers_for_cuda(batched):
    """ "pallas" lowers to the Triton kernel ("pallas_triton" itself: the next test)."""
    fwd, bwd = _lower("pallas", "cuda", batched=batched)
    assert fwd.count("__gpu$xla.gpu.triton") == 1
    assert bwd.count("__gpu$xla.gpu.triton") == 2


def test_auto_lowers_to_triton_only_once_cuda_is_verified(monkeypatch):
    fwd, bwd = _lower("auto", "cuda")
    assert "triton" not in fwd and "triton" not in bwd  # the reference, while unverified
    monkeypatch.setattr(backends, "VERIFIED_PALLAS_PLATFORMS", frozenset({"cuda"}))
    fwd, bwd = _lower("auto", "cuda")
    assert fwd.count("__gpu$xla.gpu.triton") == 1
    assert bwd.count("__gpu$xla.gpu.triton") == 2


# Mosaic's lowering asks the current device for its TPU generation; on a machine without a
# TPU, an abstract mesh carrying an abstract TPU device answers instead.
_TPU = AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")


@pytest.mark.parametrize(
    "backend,x64,batched",
    [("pallas", False, False), ("pallas", False, True), ("pallas_mosaic", True, False)],
)
def test_lowers_for_tpu(backend, x64, batched):
    """x64: Mosaic has no 64-bit types, so no python literal may become one in the kernels."""
    mesh = AbstractMesh((1,), ("x",), (AxisType.Auto,), abstract_device=_TPU)
    with jax.enable_x64(x64):
        fwd, bwd = _lower(backend, "tpu", mesh, batched)
    assert fwd.count("tpu_custom_call") == 1
    assert bwd.count("tpu_custom_call") == 2
