"""UV decoder, Gaussian head and offset regulariser: shapes, ranges, colour fusion, ablations."""

import dataclasses
import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from network_fixtures import FAST_COMPILE

from uika_jax.head.anchors import Anchors, make_anchors
from uika_jax.models.decoder import UVDecoder, UVDecoderConfig
from uika_jax.models.gaussians import GaussianHead, GaussianHeadConfig, offset_regularizer
from uika_jax.synthetic.head import synthetic_head_model

B, D, SIDE, MAP, K = 2, 32, 4, 16, 50
TINY = UVDecoderConfig(
    in_dim=D,
    token_side=SIDE,
    neck_channels=(8, 16, 24, 32),
    factors=(2, 1, 0.5, 0.25),
    features=16,
    map_size=MAP,
    channels=16,
    mlp_hidden=16,
    mlp_layers=2,
)


@functools.cache
def _anchors() -> Anchors:
    return make_anchors(synthetic_head_model(), MAP, K)


def _decoder(seed: int = 0, head_scale: float = 1.0, **changes) -> UVDecoder:
    """Built abstractly and filled with NumPy noise (every weight nonzero, no per-shape compile).

    The noise replaces the zero-initialised attribute kernels as well: at init those pass
    no gradient to the trunk, so gradient reachability is tested on perturbed weights.
    Each weight's noise is seeded by its path, so it does not depend on the module layout.
    """
    config = dataclasses.replace(TINY, **changes)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: UVDecoder(config, nnx.Rngs(0))))

    def fill(path, x):
        name = jax.tree_util.keystr(path)
        rng = np.random.default_rng((seed, zlib.crc32(name.encode())))
        std = 1.0 / math.sqrt(math.prod(x.shape[:-1])) if x.ndim > 1 else 0.1  # ~ fan-in
        std *= head_scale if "'head'" in name else 1.0
        return jnp.asarray(rng.normal(scale=std, size=x.shape).astype(np.float32))

    model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))
    # Noise around the initial biases for scale and rotation (a scale deep in the soft
    # cap passes only a small gradient).
    model.head.scale.bias[...] += config.head.scale_bias
    model.head.rotation.bias[...] += jnp.array([1.0, 0.0, 0.0, 0.0])
    return model


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _forward_pure(graphdef, state, tokens, anchors, i_aggr, gamma):
    return nnx.merge(graphdef, state)(tokens, anchors, i_aggr, gamma)


def _forward(model, tokens, i_aggr=None, gamma=None):
    graphdef, state = nnx.split(model)
    return _forward_pure(graphdef, state, tokens, _anchors(), i_aggr, gamma)


def _inputs(seed: int = 0):
    """Tokens, I_aggr and gamma with about a third of the texels unobserved (gamma = 0)."""
    rng = np.random.default_rng(seed)
    tokens = [jnp.asarray(rng.normal(size=(B, SIDE * SIDE, D)), jnp.float32) for _ in range(4)]
    i_aggr = rng.random((B, MAP, MAP, 3), np.float32)
    observed = rng.random((B, MAP, MAP, 1)) > 0.35
    gamma = np.where(observed, rng.uniform(0.1, 1.0, (B, MAP, MAP, 1)), 0.0).astype(np.float32)
    return tokens, jnp.asarray(i_aggr * observed), jnp.asarray(gamma)


def _at_texels(maps):
    texels = _anchors().texels
    return np.asarray(maps)[:, texels[:, 0], texels[:, 1]]


def test_head_init_matches_lam():
    """Zero kernels + LAM's biases: opacity 0.1, identity rotation, no offset, scale e^-5."""
    head = GaussianHead(8, GaussianHeadConfig(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    features = rng.normal(size=(B, 5, 8)).astype(np.float32)
    positions = rng.normal(size=(5, 3)).astype(np.float32)
    aggr = rng.random((B, 5, 3), np.float32)
    hit = jnp.array([[True, False, True, True, False]] * B)
    graphdef, state = nnx.split(head)
    g = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a), compiler_options=FAST_COMPILE)(
        state, features, positions, aggr, hit
    )
    for layer in (head.fusion_weight, head.opacity, head.offset, head.scale, head.rotation):
        assert not np.any(np.asarray(layer.kernel[...]))
    assert np.any(np.asarray(head.color.kernel[...]))
    np.testing.assert_allclose(g.opacities(), 0.1, rtol=1e-6)
    np.testing.assert_allclose(g.quats, np.broadcast_to([1.0, 0, 0, 0], (B, 5, 4)))
    np.testing.assert_array_equal(g.offsets, 0.0)
    np.testing.assert_allclose(g.means, np.broadcast_to(positions, (B, 5, 3)))
    np.testing.assert_allclose(g.scales(), math.exp(-5.0), rtol=1e-6)
    np.testing.assert_allclose(g.fusion_weights[..., 0], 0.5 * hit)
    assert g.opacity_logits.shape == (B, 5) and g.fusion_weights.shape == (B, 5, 1)


def test_shapes_and_ranges_under_large_weights():
    """Heads driven far into saturation: every attribute stays in its documented range."""
    config = TINY.head
    tokens, i_aggr, gamma = _inputs()
    g = _forward(_decoder(head_scale=30.0), tokens, i_aggr, gamma)
    shapes = {f.name: getattr(g, f.name).shape for f in dataclasses.fields(g)}
    assert shapes == {
        "means": (B, K, 3),
        "quats": (B, K, 4),
        "log_scales": (B, K, 3),
        "opacity_logits": (B, K),
        "colors": (B, K, 3),
        "offsets": (B, K, 3),
        "fusion_weights": (B, K, 1),
        "pred_colors": (B, K, 3),
        "aggr_colors": (B, K, 3),
    }
    assert all(getattr(g, f.name).dtype == jnp.float32 for f in dataclasses.fields(g))
    opacity = np.asarray(g.opacities())
    assert np.all((opacity >= 0) & (opacity <= 1)) and opacity.std() > 0.1
    offsets = np.asarray(g.offsets)
    assert np.abs(offsets).max() <= config.max_offset_step / 2
    assert np.abs(offsets).max() > 0.4 * config.max_offset_step  # saturating, not tiny
    np.testing.assert_allclose(g.means - _anchors().positions, offsets, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(g.quats, axis=-1), 1.0, rtol=1e-5)
    scales = np.asarray(g.scales())
    assert np.all(scales > 0) and np.all(scales <= config.max_scale * (1 + 1e-6))
    assert np.any(scales > 0.9 * config.max_scale), "the soft cap should be active here"
    assert np.any(scales < 0.5 * config.max_scale)
    for colors in (g.colors, g.pred_colors):
        assert np.all((np.asarray(colors) >= 0) & (np.asarray(colors) <= 1))
    unobserved = _at_texels(gamma)[..., 0] == 0
    assert unobserved.any() and (~unobserved).any()
    np.testing.assert_array_equal(np.asarray(g.fusion_weights)[unobserved], 0.0)
    np.testing.assert_array_equal(g.aggr_colors, _at_texels(i_aggr))


def test_color_fusion_formula_exact():
    """Biases force c_hat = 0.8 and w = 0.25 (kernels zeroed).

    Observed texel:   c = 0.25 * I_aggr[texel] + 0.75 * 0.8 = 0.25 I + 0.6.
    Unobserved texel: w_eff = 0, c = c_hat = 0.8 (I_aggr is 0 there, not a colour).
    """
    model = _decoder()
    for layer, p in ((model.head.color, 0.8), (model.head.fusion_weight, 0.25)):
        layer.kernel[...] = jnp.zeros_like(layer.kernel[...])
        layer.bias[...] = jnp.full_like(layer.bias[...], math.log(p / (1 - p)))
    tokens, i_aggr, gamma = _inputs(1)
    g = _forward(model, tokens, i_aggr, gamma)
    observed = _at_texels(gamma) > 0  # (B, K, 1)
    expected = np.where(observed, 0.25 * _at_texels(i_aggr) + 0.6, 0.8)
    np.testing.assert_allclose(g.colors, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g.pred_colors, 0.8, rtol=1e-6)
    np.testing.assert_allclose(g.fusion_weights, np.where(observed, 0.25, 0.0), rtol=1e-6)


def test_aggregation_off_ignores_aggregated_maps():
    model = _decoder(aggregation=False)
    assert model.head.fusion_weight is None
    assert model.mlp[0].kernel.shape[0] == TINY.channels  # no I_aggr / gamma channels
    tokens, i_aggr, gamma = _inputs()
    base = _forward(model, tokens)
    for other_aggr, other_gamma in ((i_aggr, gamma), (1.0 - i_aggr, gamma + 0.5)):
        other = _forward(model, tokens, other_aggr, other_gamma)
        for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(other), strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(base.colors, base.pred_colors)
    np.testing.assert_array_equal(base.fusion_weights, 0.0)
    np.testing.assert_array_equal(base.aggr_colors, 0.0)


def test_color_fusion_off_uses_predicted_colours():
    model = _decoder(color_fusion=False)
    assert model.head.fusion_weight is None
    tokens, i_aggr, gamma = _inputs()
    g = _forward(model, tokens, i_aggr, gamma)
    np.testing.assert_array_equal(g.colors, g.pred_colors)
    np.testing.assert_array_equal(g.fusion_weights, 0.0)
    np.testing.assert_array_equal(g.aggr_colors, _at_texels(i_aggr))
    # I_aggr and gamma still feed the decoder.
    other = _forward(model, tokens, 1.0 - i_aggr, gamma)
    assert np.abs(np.asarray(other.pred_colors - g.pred_colors)).max() > 1e-4


def test_gradients_reach_every_parameter():
    """Perturbed weights (see `_decoder`): each Param gets a nonzero gradient."""
    model = _decoder(seed=3)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens, i_aggr, gamma = _inputs(2)
    g0 = _forward(model, tokens, i_aggr, gamma)
    rng = np.random.default_rng(4)
    projections = jax.tree.map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), g0
    )  # random linear read-out of every field

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    @jax.grad
    def grads(params):
        out = nnx.merge(graphdef, params, rest)(tokens, _anchors(), i_aggr, gamma)
        return sum(jax.tree.leaves(jax.tree.map(lambda x, q: jnp.sum(x * q), out, projections)))

    g = grads(params)
    leaves = jax.tree_util.tree_leaves_with_path(g)
    assert len(leaves) == len(jax.tree.leaves(params))
    dead = [jax.tree_util.keystr(p) for p, x in leaves if not np.any(np.asarray(x))]
    assert not dead, f"no gradient reaches {dead}"
    assert all(np.all(np.isfinite(np.asarray(x))) for _, x in leaves)


def test_offset_regularizer_hand_computed():
    """Offsets with norms 5, 0, 3, 1 (3-4-0, 0, 1-2-2, 0-0.6-0.8).

    eps 0:              (5 + 0 + 3 + 1) / 4 = 2.25
    eps 2:              (3 + 0 + 1 + 0) / 4 = 1.0
    mask (T, F, T, F):  eps 0: (5 + 3) / 2 = 4.0;  eps 2: (3 + 1) / 2 = 2.0
    batched (2, 4, 3), second row all zero: eps 0: (9 + 0) / 8 = 1.125
    """
    d = jnp.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 2.0], [0.0, 0.6, 0.8]])
    mask = jnp.array([True, False, True, False])
    np.testing.assert_allclose(offset_regularizer(d), 2.25, rtol=1e-6)
    np.testing.assert_allclose(offset_regularizer(d, eps=2.0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(offset_regularizer(d, mask), 4.0, rtol=1e-6)
    np.testing.assert_allclose(offset_regularizer(d, mask, eps=2.0), 2.0, rtol=1e-6)
    np.testing.assert_allclose(offset_regularizer(d, mask.astype(jnp.float32), 2.0), 2.0)
    batched = jnp.stack([d, jnp.zeros_like(d)])
    np.testing.assert_allclose(offset_regularizer(batched), 1.125, rtol=1e-6)
    np.testing.assert_allclose(offset_regularizer(batched, mask), 2.0, rtol=1e-6)  # (5+3)/4
    assert float(offset_regularizer(d, jnp.zeros(4, bool))) == 0.0
    # d_mu is exactly 0 at init: the gradient there must be finite (0), not NaN.
    grad = jax.grad(offset_regularizer)(d)
    np.testing.assert_array_equal(grad[1], 0.0)
    np.testing.assert_allclose(grad[0], np.array([3.0, 4.0, 0.0]) / 5 / 4, rtol=1e-6)
    with pytest.raises(ValueError, match="d_mu"):
        offset_regularizer(d[:, :2])


def test_errors():
    model = _decoder(aggregation=False)
    tokens, i_aggr, gamma = _inputs()
    with pytest.raises(ValueError, match="tapped token arrays"):
        model(tokens[:3], _anchors())
    with pytest.raises(ValueError, match="expected tokens"):
        model([t[:, :-1] for t in tokens], _anchors())
    with pytest.raises(ValueError, match="uv_resolution=16"):
        model(tokens, dataclasses.replace(_anchors(), uv_resolution=32))
    bad = dataclasses.replace(_anchors(), texels=np.full((K, 2), -1, np.int32))
    with pytest.raises(ValueError, match="outside"):
        model(tokens, bad)
    with_aggr = _decoder()
    with pytest.raises(ValueError, match="pass i_aggr"):
        with_aggr(tokens, _anchors())
    with pytest.raises(ValueError, match="gamma must be"):
        with_aggr(tokens, _anchors(), i_aggr, gamma[:, :8])
    with pytest.raises(ValueError, match="one factor per tap"):
        dataclasses.replace(TINY, factors=(2, 1))
    with pytest.raises(ValueError, match="max_scale"):
        GaussianHeadConfig(max_scale=0.0)


def test_anchor_check_skips_abstract_texels():
    """Abstract texels (closed-over ShapeDtypeStruct, tracers) skip the value check only."""
    model = nnx.eval_shape(lambda: UVDecoder(TINY, nnx.Rngs(0)))
    sds = jax.ShapeDtypeStruct
    abstract = dataclasses.replace(
        _anchors(), texels=sds((K, 2), jnp.int32), positions=sds((K, 3), jnp.float32)
    )
    jax.eval_shape(lambda: model._check_anchors(abstract))  # closed over
    jax.eval_shape(lambda a: model._check_anchors(a), _anchors())  # traced
    with pytest.raises(ValueError, match="texels"):  # shapes are still checked
        model._check_anchors(dataclasses.replace(abstract, texels=sds((K, 3), jnp.int32)))
    for bad in (np.full((K, 2), MAP, np.int32), jnp.full((K, 2), -1, jnp.int32)):
        with pytest.raises(ValueError, match="outside"):  # concrete values are still checked
            model._check_anchors(dataclasses.replace(_anchors(), texels=bad))


def test_paper_size_via_eval_shape():
    """D 1024, 96 x 96 tokens from 4 taps, 384 x 384 x 256 map, K = 130K: traced only."""
    config = UVDecoderConfig()
    abstract = nnx.eval_shape(lambda: UVDecoder(config, nnx.Rngs(0)))
    assert config.level_sizes == (192, 96, 48, 24)
    graphdef, state = nnx.split(abstract)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert 20e6 < n_params < 60e6, n_params
    k = 130_000
    sds = jax.ShapeDtypeStruct
    anchors = Anchors(
        face_ids=sds((k,), jnp.int32),
        barycentrics=sds((k, 3), jnp.float32),
        texels=sds((k, 2), jnp.int32),
        positions=sds((k, 3), jnp.float32),
        uv_resolution=384,
    )
    tokens = [sds((1, 96 * 96, 1024), jnp.float32)] * 4
    maps = sds((1, 384, 384, 3), jnp.float32), sds((1, 384, 384, 1), jnp.float32)
    fmap = jax.eval_shape(lambda s, t: nnx.merge(graphdef, s).feature_map(t), state, tokens)
    assert fmap.shape == (1, 384, 384, 256) and fmap.dtype == jnp.float32
    bf16 = nnx.split(
        nnx.eval_shape(lambda: UVDecoder(UVDecoderConfig(dtype="bfloat16"), nnx.Rngs(0)))
    )
    fmap = jax.eval_shape(lambda s, t: nnx.merge(bf16[0], s).feature_map(t), bf16[1], tokens)
    assert fmap.shape == (1, 384, 384, 256) and fmap.dtype == jnp.bfloat16
    out = jax.eval_shape(
        lambda s, t, a, m: nnx.merge(graphdef, s)(t, a, *m), state, tokens, anchors, maps
    )
    assert out.means.shape == (1, k, 3) and out.quats.shape == (1, k, 4)
    assert out.opacity_logits.shape == (1, k) and out.fusion_weights.shape == (1, k, 1)
    variables = jax.tree.leaves(
        nnx.state(abstract, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    for var in variables:  # one logical axis name (or None) per dimension
        assert len(var.get_metadata()["out_sharding"]) == len(var.shape)
