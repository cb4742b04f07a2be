"""`rasterization()` API: batching (leading dims, vmap, grad) and per-camera colours, depth
modes and tile size, bad input (eager errors, masking under jit), overflow accounting,
warnings and strict mode, capacity sizing and calibration, the backward pass's memory,
shard_map under a mesh, backend dispatch.

The tests render the shared `WIDE` scene, so that they reuse its compiled forward program and
`render_value_and_grad` program (see raster_cases)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from network_fixtures import FAST_COMPILE
from raster_cases import KEYS, WIDE, loss_weights, render_value_and_grad, scene_arrays, wide_scene
from render_oracle import random_scene

from uika_jax.render import (
    RasterConfig,
    RasterOverflowError,
    backends,
    calibrate_capacity,
    check_overflow,
    rasterization,
    register_backend,
)
from uika_jax.render import capacity as capacity_module
from uika_jax.render import rasterize as rasterize_module
from uika_jax.render.rasterize import OVERFLOW_WARNING

_, N, W, H, C = WIDE
# Renders that should agree to rounding: within one program (masked Gaussians vs absent ones),
# measured identical; across programs (`FAST_COMPILE` ones against the default-compiled eager
# call, RGB+D against RGB, 8 px against 16 px tiles), measured at most 5.7e-7 apart.
SAME = 1e-7
OTHER_PROGRAM = 5e-6


def _args():
    return scene_arrays(wide_scene())


def _value_and_grad(*args):
    """`render_value_and_grad` (RGB+D, black backgrounds) of 7 `rasterization` arrays on `WIDE`."""
    weights = loss_weights(0, (C, H, W), 4)
    return render_value_and_grad(
        *args[:5], jnp.zeros((C, 3)), *args[5:], *weights, width=W, height=H
    )


def test_vmap_and_per_camera_colors_match_single_scenes():
    """Two scenes with per-camera colours under the caller's jit(vmap(value_and_grad)): each
    image is the single scene's render with that camera's colours. (Leading batch dims, the
    same vmap inside `rasterization()`, are checked against single scenes under a mesh.)"""
    scenes = [_args(), scene_arrays(random_scene(12, *WIDE[1:]))]
    rng = np.random.default_rng(0)
    colors = jnp.asarray(rng.uniform(size=(2, C, N, 3)).astype(np.float32))  # (B, C, N, 3)
    stacked = [jnp.stack([a, b]) for a, b in zip(*scenes, strict=True)]

    def loss(means, colors, quats, scales, opacities, viewmats, ks):
        r, a, meta = rasterization(means, quats, scales, opacities, colors, viewmats, ks, W, H)
        return jnp.sum(r**2), (r, a, meta["n_isects"])

    vmapped = jax.jit(
        jax.vmap(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)),
        compiler_options=FAST_COMPILE,
    )
    (_, (rv, av, n_isects)), grads = vmapped(stacked[0], colors, *stacked[1:4], *stacked[5:])
    assert rv.shape == (2, C, H, W, 3)
    for b, scene in enumerate(scenes):
        for cam in range(C):
            single, alphas, meta = rasterization(*scene[:4], colors[b, cam], *scene[5:], W, H)
            np.testing.assert_allclose(rv[b, cam], single[cam], atol=OTHER_PROGRAM)
        np.testing.assert_allclose(av[b], alphas, atol=OTHER_PROGRAM)
        assert int(n_isects[b]) == int(meta["n_isects"])
    assert np.isfinite(np.asarray(grads[0])).all() and float(jnp.abs(grads[1]).sum()) > 0


@pytest.mark.parametrize(
    "key,index,value,match",
    [
        ("means", (3, 0), np.nan, "means has 1 non-finite"),
        ("scales", (3, 1), -0.1, "scales must be >= 0"),
        ("opacities", (3,), 1.5, "opacities must lie in"),
        ("quats", (3,), 0.0, "zero quaternions"),
        ("Ks", (0, 0, 0), 0.0, "positive focal"),
    ],
)
def test_bad_values_raise_eagerly(key, index, value, match):
    args = dict(zip(KEYS, _args(), strict=True))
    args[key] = args[key].at[index].set(value)
    with pytest.raises(ValueError, match=match):
        rasterization(*args.values(), W, H)


def test_bad_shapes_and_modes_raise():
    args = _args()
    with pytest.raises(ValueError, match="quats must have shape"):
        rasterization(args[0], args[1][:5], *args[2:], W, H)
    with pytest.raises(ValueError, match="colors must be"):
        rasterization(*args[:4], args[4][:5], *args[5:], W, H)
    with pytest.raises(ValueError, match="render_mode"):
        rasterization(*args, W, H, render_mode="XYZ")
    with pytest.raises(ValueError, match="backgrounds must be"):
        rasterization(*args, W, H, backgrounds=jnp.zeros((5, 3)))


def test_invalid_gaussians_are_masked_under_jit():
    """NaN means, negative scales, zero quaternions under jit: culled, no gradient, counted."""
    args = _args()
    clean_ops = args[3].at[3:6].set(0.0)
    (_, (ref, _, _)), _ = _value_and_grad(*args[:3], clean_ops, *args[4:])
    eager, _, _ = rasterization(*args[:3], clean_ops, *args[4:], W, H)
    np.testing.assert_allclose(ref[..., :3], eager, atol=OTHER_PROGRAM)  # jit == eager (no bg)
    means = args[0].at[3].set(jnp.nan)
    scales = args[2].at[4, 0].set(-1.0)
    quats = args[1].at[5].set(0.0)
    (_, (r, _, meta)), grads = _value_and_grad(means, quats, scales, *args[3:])
    assert int(meta["n_invalid_gaussians"]) == 3 and int(meta["n_invalid_cameras"]) == 0
    np.testing.assert_allclose(r, ref, atol=SAME)
    assert (np.asarray(meta["radii"])[:, 3:6] == 0).all()
    for g in grads[:5]:
        assert np.isfinite(np.asarray(g)).all()
        assert float(jnp.abs(g[3:6]).sum()) == 0.0
    bad_cam = args[5].at[1, 0, 0].set(jnp.inf)
    (_, (r, _, meta)), _ = _value_and_grad(*args[:5], bad_cam, args[6])
    assert int(meta["n_invalid_cameras"]) == 1 and float(jnp.abs(r[1]).max()) == 0.0


def test_depth_modes_and_tile_size():
    """RGB+D is RGB plus the accumulated depth; ED (here with 8 px tiles, which visit a subset
    of the same, skipped, Gaussians per pixel) is that depth over alpha."""
    args = _args()
    (_, (rgbd, alpha, meta)), _ = _value_and_grad(*args)
    rgb, _, _ = rasterization(*args, W, H)
    np.testing.assert_allclose(rgbd[..., :3], rgb, atol=OTHER_PROGRAM)
    ed, alpha8, meta8 = rasterization(*args, W, H, render_mode="ED", tile_size=8)
    assert meta8["tile_width"] == 9 and meta8["tile_height"] == 6
    np.testing.assert_allclose(alpha8, alpha, atol=OTHER_PROGRAM)
    # Depths up to 3.1: measured 9.5e-7 (a division and a product apart).
    np.testing.assert_allclose(ed * np.maximum(alpha8, 1e-10), rgbd[..., 3:], atol=1e-5)
    vis = np.asarray(meta["radii"])[..., 0] > 0
    depths = np.asarray(meta["depths"])
    covered = np.asarray(alpha)[..., 0] > 0.5
    e = np.asarray(ed)[..., 0][covered]
    assert e.min() >= depths[vis].min() - 1e-5 and e.max() <= depths[vis].max() + 1e-5


def test_empty_inputs_raise():
    args = _args()
    with pytest.raises(ValueError, match="N >= 1"):
        rasterization(*(a[:0] for a in args[:5]), *args[5:], W, H)
    with pytest.raises(ValueError, match="one camera"):
        rasterization(*args[:5], args[5][:0], args[6][:0], W, H)


def _overflow_logged(caplog, fn):
    """Runs fn with a fresh overflow-warning limiter; returns (fn(), the warnings logged)."""
    OVERFLOW_WARNING.reset()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="uika_jax.render.rasterize"):
        out = jax.block_until_ready(fn())
        jax.effects_barrier()  # the warning comes from a jax.debug.callback
    return out, [r.getMessage() for r in caplog.records]


def test_overflow_is_counted_warned_and_strict_raises(caplog):
    args = _args()
    (_, _, full), logged = _overflow_logged(caplog, lambda: rasterization(*args, W, H))
    total, max_tile = int(full["n_isects"]), int(full["max_tile_count"])
    assert int(full["isects_dropped"]) == 0 and int(full["pixels_overflow"]) == 0
    assert not bool(full["overflow"]) and logged == []
    small = RasterConfig(capacity=total // 2)
    (_, _, meta), logged = _overflow_logged(
        caplog, lambda: rasterization(*args, W, H, config=small)
    )
    assert len(logged) == 1 and f"{total - total // 2} intersections beyond capacity" in logged[0]
    assert int(meta["n_isects"]) == total and int(meta["isects_dropped"]) == total - total // 2
    assert int(meta["tiles_overflow"]) > 0 and int(meta["pixels_overflow"]) > 0
    assert bool(meta["overflow"])
    # The farthest intersections were dropped: none kept lies behind one dropped.
    depths = np.asarray(full["depths"]).reshape(-1)
    all_ids = np.asarray(full["flatten_ids"])[:total]
    kept = np.asarray(meta["flatten_ids"])[: total // 2]
    dropped = np.setdiff1d(all_ids, kept)  # Gaussians with no tile kept
    assert len(dropped) > 0 and depths[kept].max() <= depths[dropped].min()
    # Rate-limited: a second overflowing call within the interval is only counted.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="uika_jax.render.rasterize"):
        jax.block_until_ready(rasterization(*args, W, H, config=small))
        jax.effects_barrier()
    assert caplog.records == [] and OVERFLOW_WARNING.held_back == 1
    strict = RasterConfig(capacity=total // 2, strict=True)
    with pytest.raises(RasterOverflowError, match="calibrate_capacity"):
        rasterization(*args, W, H, config=strict)

    # Under the caller's jit: the counters come back (and a warning), the caller raises.
    # Exactly `total` slots drop nothing; a tile cap equal to some tiles' counts caps only the
    # longer ones (per-tile counts from the offsets of the render that dropped nothing).
    counts = np.diff(np.append(np.asarray(full["isect_offsets"]).reshape(-1), total))
    cap = int(np.sort(counts[counts > 0])[np.count_nonzero(counts) // 2])  # a median count
    assert (counts == cap).any() and (counts > cap).any()
    capped = RasterConfig(capacity=total, tile_cap=cap, strict=True)
    jitted = jax.jit(
        lambda *x: rasterization(*x, W, H, config=capped)[2], compiler_options=FAST_COMPILE
    )
    meta, logged = _overflow_logged(caplog, lambda: jitted(*args))
    assert len(logged) == 1 and "rasterizer overflow" in logged[0]
    assert int(meta["isects_dropped"]) == 0 and bool(meta["overflow"])
    assert int(meta["tiles_overflow"]) == int((counts > cap).sum())
    assert 0 < int(meta["pixels_overflow"]) <= C * W * H
    with pytest.raises(RasterOverflowError, match="tiles over capacity or tile_cap"):
        check_overflow(jax.device_get(meta))
    check_overflow(jax.device_get(full))

    calibrated = calibrate_capacity(*args[:4], *args[5:], W, H, headroom=1.25)
    assert calibrated.capacity >= 1.25 * total and calibrated.tile_cap >= 1.25 * max_tile


def _tiny_gaussians(n, size, seed=0):
    """n Gaussians of about one pixel, spread over a size x size image, one camera."""
    rng = np.random.default_rng(seed)
    focal = float(size)
    xy = rng.uniform(-0.45, 0.45, (n, 2)) * 2.0  # at depth 2: inside the view
    means = np.concatenate([xy, np.full((n, 1), 2.0) + rng.uniform(0, 0.1, (n, 1))], 1)
    k = np.array([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1]])
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return [
        f32(means),
        f32(rng.normal(size=(n, 4))),
        f32(np.full((n, 3), 1e-3)),
        f32(rng.uniform(0.2, 1.0, n)),
        f32(rng.uniform(size=(n, 3))),
        f32(np.eye(4)[None]),
        f32(k[None]),
    ]


def test_concrete_inputs_size_their_own_capacity():
    """The exact bound C*N*n_tiles is far above 2^24 here; concrete calls count instead."""
    n, size = 20_000, 512
    args = _tiny_gaussians(n, size)
    assert n * (size // 16) ** 2 > 2**24
    _, alphas, meta = rasterization(*args, size, size)
    total = int(meta["n_isects"])
    assert total >= n and meta["isect_capacity"] >= total
    assert meta["isect_capacity"] <= 1.3 * total  # a few sizes an octave, not the bound
    assert not bool(meta["overflow"]) and int(meta["pixels_overflow"]) == 0
    assert total == int(np.asarray(meta["tiles_per_gauss"]).sum())
    assert float(jnp.mean(alphas > 0.1)) > 0.05  # the Gaussians were drawn
    with pytest.raises(ValueError, match=r"RasterConfig\(capacity=\.\.\.\).*calibrate"):
        jax.jit(lambda *x: rasterization(*x, size, size)[0])(*args)


def test_capacity_limits_give_clear_errors(monkeypatch):
    args = _args()
    with pytest.raises(ValueError, match="int32 slot indices"):
        capacity_module.round_capacity(2**31 - 1)
    assert capacity_module.round_capacity(1025) == 1280
    assert capacity_module.round_capacity(3 * 2**20 + 1) == 3.5 * 2**20

    def out_of_memory(*_args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1 bytes.")

    monkeypatch.setattr(rasterize_module, "_rasterize_batched", out_of_memory)
    with pytest.raises(MemoryError, match="intersection slots per scene"):
        rasterization(*args, W, H)


def test_gradient_memory_is_linear_in_pixels():
    """Every Gaussian over every tile: a [tiles, pixels, K] float32 tensor of the K slots of the
    longest tile would take `dense` bytes; the custom VJP keeps only O(pixels) + O(capacity)
    residuals (the program of the other `WIDE` tests, these data make its K largest)."""
    args = _args()
    args[0] = args[0] * 0.1  # near the origin, 3 units in front of both cameras
    args[2] = jnp.full_like(args[2], 0.5)
    _, _, meta = rasterization(*args, W, H)
    n_tiles = meta["tile_width"] * meta["tile_height"]
    assert int(meta["max_tile_count"]) > N // 2
    dense = C * n_tiles * 256 * int(meta["max_tile_count"]) * 4
    compiled = render_value_and_grad.lower(
        *args[:5], jnp.zeros((C, 3)), *args[5:], *loss_weights(0, (C, H, W), 4), width=W, height=H
    ).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < dense / 2, (temp, dense)  # measured 2.2 MB against 9 MB


def test_batch_dims_under_a_mesh_match_single_scenes_without_collectives():
    """Four scenes as a leading batch dim on a 4 x 2 mesh: sharded over "data" (greedily,
    while the batch divides), replicated over "model". Each image is its single scene's;
    scenes are independent, so forward and backward have no collective at all (without
    shard_map XLA's partitioner adds all-reduces for the loops' conditions and gathers the
    per-Gaussian arrays)."""
    assert jax.device_count() == 8
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharding = jax.NamedSharding(mesh, jax.P("data"))
    scenes = [_args()] + [scene_arrays(random_scene(seed, *WIDE[1:])) for seed in (12, 13, 14)]
    batch = [jax.device_put(jnp.stack(x), sharding) for x in zip(*scenes, strict=True)]

    def loss(means, quats, scales, opacities, colors, viewmats, ks):
        r, a, meta = rasterization(means, quats, scales, opacities, colors, viewmats, ks, W, H)
        return jnp.sum(r) + jnp.sum(a), (r, a, meta)

    with jax.set_mesh(mesh):
        # The gradient without the loss value (whose sum over scenes needs an all-reduce).
        fn = jax.jit(jax.grad(loss, argnums=(0, 4), has_aux=True), compiler_options=FAST_COMPILE)
        compiled = fn.lower(*batch).compile()
        _, (r, a, meta) = compiled(*batch)
        with pytest.raises(ValueError, match="does not divide"):
            rasterization(*(x[:3] for x in batch), W, H, config=RasterConfig(batch_axes=("data",)))
    hlo = compiled.as_text()
    for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
        assert op not in hlo, op
    assert meta["radii"].shape == (4, C, N, 2) and meta["n_isects"].shape == (4,)
    for b, scene in enumerate(scenes):
        single, alphas, single_meta = rasterization(*scene, W, H)
        np.testing.assert_allclose(r[b], single, atol=OTHER_PROGRAM)
        np.testing.assert_allclose(a[b], alphas, atol=OTHER_PROGRAM)
        assert int(meta["n_isects"][b]) == int(single_meta["n_isects"])


def test_registered_backend_is_dispatched():
    calls = []

    def spy(means2d, conics, opacities, colors, *bins_and_size, tile_size, tile_cap):
        calls.append(tile_cap)
        width, height = bins_and_size[-2:]
        shape = (means2d.shape[0], height, width)
        return (
            jnp.full((*shape, colors.shape[-1]), 0.25),
            jnp.full(shape, 0.5),
            jnp.zeros(shape, bool),
        )

    register_backend("spy", spy)
    try:
        r, a, _ = rasterization(*_args(), W, H, config=RasterConfig(backend="spy"))
    finally:
        backends._BACKENDS.pop("spy")
    assert calls == [None]
    np.testing.assert_array_equal(r, 0.25)
    np.testing.assert_array_equal(a, 0.5)
    with pytest.raises(ValueError, match="unknown backend"):
        RasterConfig(backend="spy")


def test_auto_backend_is_the_reference_until_a_platform_is_verified():
    assert RasterConfig().backend == "auto"
    assert set(backends.auto_choices().values()) == {"reference"}
    assert backends.auto_choices(frozenset({"cuda", "tpu"})) == {
        "cuda": "pallas_triton", "rocm": "reference", "tpu": "pallas_mosaic"
    }  # fmt: skip
    auto, _, _ = rasterization(*_args(), W, H)
    ref, _, _ = rasterization(*_args(), W, H, config=RasterConfig(backend="reference"))
    np.testing.assert_array_equal(auto, ref)
