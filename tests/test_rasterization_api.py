"""`rasterization()` API: jit/vmap/batching, bad input, overflow and strict mode, shard_map."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from render_oracle import random_scene

from uika_jax.render import (
    RasterConfig,
    RasterOverflowError,
    backends,
    calibrate_capacity,
    check_overflow,
    composite,
    rasterization,
    register_backend,
)
from uika_jax.render import capacity as capacity_module
from uika_jax.render import rasterize as rasterize_module
from uika_jax.render.rasterize import OVERFLOW_WARNING

KEYS = ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")
W, H = 40, 30
# Renders that should agree to rounding (batched vs single scenes, jit vs eager, masked
# Gaussians vs absent ones, per-camera colours, shard_map): measured identical on CPU.
SAME = 1e-7


@pytest.fixture(scope="module")
def scene():
    return random_scene(11, 120, W, H, 2)


def _args(scene):
    return [jnp.asarray(scene[k]) for k in KEYS]


def test_batch_dims_match_single_scenes_vmap_and_grad(scene):
    args = _args(scene)
    r0, _, m0 = rasterization(*args, W, H)
    other = _args(random_scene(12, 120, W, H, 2))
    stacked = [jnp.stack([a, b]) for a, b in zip(args, other, strict=True)]
    rb, ab, mb = rasterization(*stacked, W, H)
    r_other, _, m_other = rasterization(*other, W, H)
    assert rb.shape == (2, 2, H, W, 3) and mb["radii"].shape == (2, 2, 120, 2)
    np.testing.assert_allclose(rb[0], r0, atol=SAME)
    np.testing.assert_allclose(rb[1], r_other, atol=SAME)
    assert list(np.asarray(mb["n_isects"])) == [int(m0["n_isects"]), int(m_other["n_isects"])]

    def loss(means, colors, *rest):
        r, a, _ = rasterization(means, *rest[:3], colors, *rest[3:], W, H)
        return jnp.sum(r**2), (r, a)

    order = (0, 4, 1, 2, 3, 5, 6)
    (_, (rv, av)), g = jax.vmap(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        *(stacked[i] for i in order)
    )
    np.testing.assert_allclose(rv, rb, atol=SAME)
    np.testing.assert_allclose(av, ab, atol=SAME)
    assert np.isfinite(np.asarray(g[0])).all() and float(jnp.abs(g[1]).sum()) > 0


def test_per_camera_colors_and_features(scene):
    args = _args(scene)
    feats = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 120, 7)).astype(np.float32))
    r, _, _ = rasterization(*args[:4], feats, *args[5:], W, H)
    assert r.shape == (2, H, W, 7)
    r_cam0, _, _ = rasterization(*args[:4], feats[0], *args[5:], W, H)
    np.testing.assert_allclose(r[0], r_cam0[0], atol=SAME)


def test_zero_scale_is_an_eps2d_point():
    means = jnp.array([[0.0, 0.0, 2.0]])
    _r, a, meta = rasterization(
        means, jnp.array([[1.0, 0, 0, 0]]), jnp.zeros((1, 3)), jnp.array([0.8]),
        jnp.ones((1, 3)), jnp.eye(4)[None], jnp.array([[[50.0, 0, 20], [0, 50, 15], [0, 0, 1]]]),
        W, H,
    )  # fmt: skip
    # Mean at (20, 15): pixel (14, 19) centre is 0.5 px off in x and y; cov = 0.3 I
    # (measured 2.5e-8 off).
    assert np.allclose(float(a[0, 14, 19, 0]), 0.8 * np.exp(-0.5 * 0.5 / 0.3), rtol=0, atol=2e-7)
    assert tuple(np.asarray(meta["radii"])[0, 0]) == (2, 2)


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
def test_bad_values_raise_eagerly(scene, key, index, value, match):
    args = dict(zip(KEYS, _args(scene), strict=True))
    args[key] = args[key].at[index].set(value)
    with pytest.raises(ValueError, match=match):
        rasterization(*args.values(), W, H)


def test_bad_shapes_and_modes_raise(scene):
    args = _args(scene)
    with pytest.raises(ValueError, match="quats must have shape"):
        rasterization(args[0], args[1][:5], *args[2:], W, H)
    with pytest.raises(ValueError, match="colors must be"):
        rasterization(*args[:4], args[4][:5], *args[5:], W, H)
    with pytest.raises(ValueError, match="render_mode"):
        rasterization(*args, W, H, render_mode="XYZ")
    with pytest.raises(ValueError, match="backgrounds must be"):
        rasterization(*args, W, H, backgrounds=jnp.zeros((5, 3)))


def test_invalid_gaussians_are_masked_under_jit(scene):
    args = _args(scene)
    fn = jax.jit(lambda *x: rasterization(*x, W, H))
    clean_ops = args[3].at[3].set(0.0).at[4].set(0.0).at[5].set(0.0)
    ref, _, _ = fn(*args[:3], clean_ops, *args[4:])
    eager, _, _ = rasterization(*args[:3], clean_ops, *args[4:], W, H)
    np.testing.assert_allclose(ref, eager, atol=SAME)  # jit == eager
    means = args[0].at[3].set(jnp.nan)
    scales = args[2].at[4, 0].set(-1.0)
    quats = args[1].at[5].set(0.0)
    r, _, meta = fn(means, quats, scales, args[3], *args[4:])
    assert int(meta["n_invalid_gaussians"]) == 3 and int(meta["n_invalid_cameras"]) == 0
    np.testing.assert_allclose(r, ref, atol=SAME)
    assert (np.asarray(meta["radii"])[:, 3:6] == 0).all()

    def loss(means, quats, scales):
        return jnp.sum(rasterization(means, quats, scales, *args[3:], W, H)[0])

    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(means, quats, scales)
    for x in g:
        assert np.isfinite(np.asarray(x)).all()
        assert float(jnp.abs(x[3:6]).sum()) == 0.0
    bad_cam = args[5].at[1, 0, 0].set(jnp.inf)
    r, _, meta = fn(*args[:5], bad_cam, args[6])
    assert int(meta["n_invalid_cameras"]) == 1 and float(jnp.abs(r[1]).max()) == 0.0


def _overflow_logged(caplog, fn):
    """Runs fn with a fresh overflow-warning limiter; returns (fn(), the warnings logged)."""
    OVERFLOW_WARNING.reset()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="uika_jax.render.rasterize"):
        out = jax.block_until_ready(fn())
        jax.effects_barrier()  # the warning comes from a jax.debug.callback
    return out, [r.getMessage() for r in caplog.records]


def test_overflow_is_counted_warned_and_strict_raises(scene, caplog):
    args = _args(scene)
    (_, _, full), logged = _overflow_logged(caplog, lambda: rasterization(*args, W, H))
    total = int(full["n_isects"])
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

    capped = RasterConfig(tile_cap=max(1, int(full["max_tile_count"]) // 4))
    _, _, meta = rasterization(*args, W, H, config=capped)
    assert int(meta["isects_dropped"]) == 0 and int(meta["tiles_overflow"]) > 0
    assert 0 < int(meta["pixels_overflow"]) <= 2 * W * H

    strict = RasterConfig(capacity=total // 2, strict=True)
    with pytest.raises(RasterOverflowError, match="calibrate_capacity"):
        rasterization(*args, W, H, config=strict)
    # Under the caller's jit: the counters come back (and a warning), the caller raises.
    jitted = jax.jit(lambda *x: rasterization(*x, W, H, config=strict)[2])
    meta, logged = _overflow_logged(caplog, lambda: jitted(*args))
    assert len(logged) == 1 and "rasterizer overflow" in logged[0]
    assert int(meta["isects_dropped"]) == total - total // 2
    with pytest.raises(RasterOverflowError, match="intersections beyond capacity"):
        check_overflow(jax.device_get(meta))
    ok = RasterConfig(capacity=total, tile_cap=int(full["max_tile_count"]), strict=True)
    check_overflow(rasterization(*args, W, H, config=ok)[2])


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
    render, _, meta = rasterization(*args, size, size)
    total = int(meta["n_isects"])
    assert total >= n and meta["isect_capacity"] >= total
    assert meta["isect_capacity"] <= 1.3 * total  # a few sizes an octave, not the bound
    assert not bool(meta["overflow"])
    explicit = RasterConfig(capacity=total)
    ref, _, ref_meta = rasterization(*args, size, size, config=explicit)
    np.testing.assert_array_equal(render, ref)
    np.testing.assert_array_equal(meta["flatten_ids"][:total], ref_meta["flatten_ids"])
    with pytest.raises(ValueError, match=r"RasterConfig\(capacity=\.\.\.\).*calibrate"):
        jax.jit(lambda *x: rasterization(*x, size, size)[0])(*args)


def test_capacity_limits_give_clear_errors(scene, monkeypatch):
    args = _args(scene)
    with pytest.raises(ValueError, match="int32 slot indices"):
        capacity_module.round_capacity(2**31 - 1)
    assert capacity_module.round_capacity(1025) == 1280
    assert capacity_module.round_capacity(3 * 2**20 + 1) == 3.5 * 2**20

    def out_of_memory(*_args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1 bytes.")

    monkeypatch.setattr(rasterize_module, "_rasterize_batched", out_of_memory)
    with pytest.raises(MemoryError, match="intersection slots per scene"):
        rasterization(*args, W, H)


def test_calibration_fits(scene):
    args = _args(scene)
    cfg = calibrate_capacity(*args[:4], *args[5:], W, H, headroom=1.25)
    _, _, meta = rasterization(*args, W, H, config=dataclasses.replace(cfg, strict=True))
    assert cfg.capacity >= int(meta["n_isects"]) and cfg.tile_cap >= int(meta["max_tile_count"])


def test_shard_map_under_mesh_has_no_all_gather(scene):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = [jnp.stack([a] * 8) for a in _args(scene)]
    sharding = jax.NamedSharding(mesh, jax.P("data"))
    batch = [jax.device_put(x, sharding) for x in batch]
    cfg = RasterConfig()  # single-scene call below is then cached from other tests

    def loss(means, quats, scales, opacities, colors, viewmats, ks):
        r, a, _ = rasterization(
            means, quats, scales, opacities, colors, viewmats, ks, W, H, config=cfg
        )
        return jnp.sum(r) + jnp.sum(a)

    with jax.set_mesh(mesh):
        fwd = jax.jit(lambda *x: rasterization(*x, W, H, config=cfg)[0])
        hlo = fwd.lower(*batch).compile().as_text()
        grad_hlo = jax.jit(jax.grad(loss, argnums=(0, 4))).lower(*batch).compile().as_text()
        r = fwd(*batch)
    # Scenes are independent: no collective at all (without shard_map XLA's partitioner
    # inserts all-reduces for the loops' conditions).
    for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
        assert op not in hlo and op not in grad_hlo, op
    single, _, _ = rasterization(*_args(scene), W, H, config=cfg)
    np.testing.assert_allclose(np.asarray(r)[5], single, atol=1e-6)  # measured 1.2e-7
    # A 2D mesh and a batch of 4: sharded over "data" only, replicated over "model".
    mesh2 = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh2):
        hlo = fwd.lower(*(x[:4] for x in batch)).compile().as_text()
        with pytest.raises(ValueError, match="does not divide"):
            rasterization(*(x[:3] for x in batch), W, H, config=RasterConfig(batch_axes=("data",)))
    for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
        assert op not in hlo, op


def test_depth_modes_and_tile_size(scene):
    args = _args(scene)
    rgbd, alpha, meta = rasterization(*args, W, H, render_mode="RGB+D")
    ed, _, _ = rasterization(*args, W, H, render_mode="ED")
    rgb, _, _ = rasterization(*args, W, H)
    np.testing.assert_allclose(rgbd[..., :3], rgb, atol=SAME)
    d = rgbd[..., 3:]
    # Measured 2.4e-7 relative (one division apart).
    np.testing.assert_allclose(ed, d / np.maximum(alpha, 1e-10), rtol=2e-6, atol=1e-7)
    vis = np.asarray(meta["radii"])[..., 0] > 0
    depths = np.asarray(meta["depths"])
    covered = np.asarray(alpha)[..., 0] > 0.5
    e = np.asarray(ed)[..., 0][covered]
    assert e.min() >= depths[vis].min() - 1e-5 and e.max() <= depths[vis].max() + 1e-5
    # Smaller tiles visit a subset of the same (skipped) Gaussians per pixel: same image.
    r8, _, m8 = rasterization(*args, W, H, tile_size=8)
    np.testing.assert_allclose(r8, rgb, atol=1e-6)  # measured 1.2e-7
    assert m8["tile_width"] == 5 and m8["tile_height"] == 4


def test_empty_inputs_raise(scene):
    args = _args(scene)
    with pytest.raises(ValueError, match="N >= 1"):
        rasterization(*(a[:0] for a in args[:5]), *args[5:], W, H)
    with pytest.raises(ValueError, match="one camera"):
        rasterization(*args[:5], args[5][:0], args[6][:0], W, H)


def test_gradient_memory_is_linear_in_pixels():
    # A [tiles, pixels, K] float32 tensor here would be 144 x 256 x max_tile_count x 4 bytes
    # (~28 MB); the custom VJP keeps only O(pixels) + O(capacity) residuals.
    scene = random_scene(1, 600, 128, 96, 3)
    args = _args(scene)
    cfg = RasterConfig(capacity=8192)

    def loss(*x):
        r, a, _ = rasterization(*x, 128, 96, config=cfg)
        return jnp.sum(r) + jnp.sum(a)

    _, _, meta = rasterization(*args, 128, 96)  # the config of the parity tests: cached
    dense = 3 * 6 * 8 * 256 * int(meta["max_tile_count"]) * 4
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < dense / 2, (temp, dense)


def test_registered_backend_is_dispatched(scene):
    calls = []

    def spy(*a, **kw):
        calls.append(kw["tile_cap"])
        return composite.composite(*a, **kw)

    register_backend("spy", spy)
    try:
        r, _, _ = rasterization(*_args(scene), W, H, config=RasterConfig(backend="spy"))
        ref, _, _ = rasterization(*_args(scene), W, H)
    finally:
        backends._BACKENDS.pop("spy")
    assert calls == [None]
    np.testing.assert_array_equal(r, ref)
    with pytest.raises(ValueError, match="unknown backend"):
        RasterConfig(backend="spy")


def test_auto_backend_is_the_reference_until_a_platform_is_verified(scene):
    assert RasterConfig().backend == "auto"
    assert set(backends.auto_choices().values()) == {"reference"}
    assert backends.auto_choices(frozenset({"cuda", "tpu"})) == {
        "cuda": "pallas_triton", "rocm": "reference", "tpu": "pallas_mosaic"
    }  # fmt: skip
    auto, _, _ = rasterization(*_args(scene), W, H)
    ref, _, _ = rasterization(*_args(scene), W, H, config=RasterConfig(backend="reference"))
    np.testing.assert_array_equal(auto, ref)
