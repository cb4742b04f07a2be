"""UVTransformer: masking, view permutation, ablation switch, gradients, remat, dtypes, scan."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from network_fixtures import FAST_COMPILE

from uika_jax.models.attention import AttentionConfig
from uika_jax.models.frozen import FrozenParam
from uika_jax.models.transformer import UVTransformer, UVTransformerConfig

D, HEADS, LZ, N, P, PUV = 32, 4, 16, 3, 6, 5


def random_params(abstract_model: nnx.Module, seed: int) -> nnx.Module:
    """Fills every weight with NumPy noise around its init (1 for norm scales, else 0)."""
    graphdef, state = nnx.split(abstract_model)
    rng = np.random.default_rng(seed)

    def fill(path, x):
        base = 1.0 if "'scale'" in jax.tree_util.keystr(path) else 0.0
        noise = rng.normal(size=x.shape).astype(np.float32)
        return jnp.asarray(base + 0.1 * noise)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


@functools.cache
def _model(**kw) -> UVTransformer:
    """Depth 2 by default: one scanned block plus the last (context_pre_only) block.

    Built abstractly and filled from NumPy: no JAX compilation per weight shape.
    """
    config = UVTransformerConfig(
        **{"dim": D, "num_heads": HEADS, "num_tokens": LZ, "depth": 2, "taps": (1, 2), **kw}
    )
    return random_params(nnx.eval_shape(lambda: UVTransformer(config, rngs=nnx.Rngs(0))), 5)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _forward_pure(graphdef, state, f_s, view_mask, f_uv):
    return nnx.merge(graphdef, state)(f_s, view_mask, f_uv)


def _forward(model, f_s, view_mask, f_uv):
    return _forward_pure(*nnx.split(model), f_s, view_mask, f_uv)


def _inputs(seed=0, b=2):
    rng = np.random.default_rng(seed)
    f_s = jnp.asarray(rng.normal(size=(b, N, P, D)), jnp.float32)
    f_uv = jnp.asarray(rng.normal(size=(b, N, PUV, D)), jnp.float32)
    view_mask = jnp.array([[True, True, False], [True, False, False]])[:b]
    return f_s, view_mask, f_uv


@pytest.mark.parametrize("mode", ["joint", "cross"])
def test_padded_views_have_no_influence(mode):
    model = _model(mode=mode)
    f_s, view_mask, f_uv = _inputs()
    out = _forward(model, f_s, view_mask, f_uv)
    noise_s, noise_uv = _inputs(seed=7)[::2]
    pad = ~view_mask[:, :, None, None]
    out2 = _forward(
        model, jnp.where(pad, 5 * noise_s, f_s), view_mask, jnp.where(pad, noise_uv, f_uv)
    )
    for a, b in zip(out, out2, strict=True):
        np.testing.assert_array_equal(a, b)
    # Padding vs truncation: example 0 with its two valid views only.
    trunc = _forward(model, f_s[:1, :2], view_mask[:1, :2], f_uv[:1, :2])
    for a, b in zip(out, trunc, strict=True):
        np.testing.assert_allclose(a[:1], b, atol=1e-5)


def test_view_permutation_invariance():
    model = _model()
    f_s, _, f_uv = _inputs()
    view_mask = jnp.array([[True, True, True], [True, False, True]])
    perm = jnp.array([2, 0, 1])
    out = _forward(model, f_s, view_mask, f_uv)
    out_p = _forward(model, f_s[:, perm], view_mask[:, perm], f_uv[:, perm])
    for a, b in zip(out, out_p, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_without_uv_attention_ignores_f_uv():
    model = _model(uv_attention=False)
    assert "uv" not in nnx.to_pure_dict(nnx.state(model, nnx.Param))["blocks"]
    f_s, view_mask, f_uv = _inputs()
    out = _forward(model, f_s, view_mask, f_uv)
    for a, b in zip(out, _forward(model, f_s, view_mask, None), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="needs f_uv"):
        _model()(f_s, view_mask)


@functools.cache
def _reference_grads(mode="joint"):
    return _loss_grads(_model(mode=mode), *_inputs())


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _loss_grads_pure(graphdef, params, rest, f_s, view_mask, f_uv):
    def loss(params):
        outs = nnx.merge(graphdef, params, rest)(f_s, view_mask, f_uv)
        weights = [
            jnp.sin(3.0 * i + jnp.arange(o.size).reshape(o.shape)) for i, o in enumerate(outs)
        ]
        return sum(jnp.sum(o * w) for o, w in zip(outs, weights, strict=True))

    return jax.value_and_grad(loss)(params)


def _loss_grads(model, f_s, view_mask, f_uv):
    """Loss and gradients with respect to every `nnx.Param`."""
    return _loss_grads_pure(*nnx.split(model, nnx.Param, ...), f_s, view_mask, f_uv)


@pytest.mark.parametrize("mode", ["joint", "cross"])
def test_gradients_reach_every_parameter(mode):
    model = _model(mode=mode)
    _, grads = _reference_grads(mode)
    flat = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads))
    assert len(flat) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    for path, g in flat:
        g = np.asarray(g)
        per_layer = g.reshape(g.shape[0], -1) if path[0].key == "blocks" else g.reshape(1, -1)
        assert np.all(np.abs(per_layer).max(-1) > 0), jax.tree_util.keystr(path)


def test_remat_gives_identical_outputs_and_gradients():
    """Recomputation may fuse differently: equal to float32 rounding (seen: 1.5e-6 abs)."""
    loss, grads = _reference_grads()
    model = _model(remat="dots_saveable")
    nnx.update(model, nnx.state(_model(), nnx.Param))
    loss_r, grads_r = _loss_grads(model, *_inputs())
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    check = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # noqa: E731
    jax.tree.map(check, grads_r, grads)


def test_bf16_compute_is_close():
    inputs = _inputs()
    model = _model(dtype="bfloat16")
    nnx.update(model, nnx.state(_model(), nnx.Param))
    out, ref = _forward(model, *inputs), _forward(_model(), *inputs)
    for a, b in zip(out, ref, strict=True):
        assert a.dtype == jnp.float32
        rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        assert rel < 2e-2, rel


def test_scan_equals_python_loop():
    scanned, looped = _model(depth=3, taps=(1, 2, 3)), _model(depth=3, taps=(1, 2, 3), scan=False)
    params = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
    loop_params = nnx.to_pure_dict(nnx.state(looped, nnx.Param))
    for i in loop_params["blocks"]:
        loop_params["blocks"][i] = jax.tree.map(lambda x: x[i], params["blocks"])  # noqa: B023
    loop_params.update({k: v for k, v in params.items() if k != "blocks"})
    state = nnx.state(looped, nnx.Param)
    nnx.replace_by_pure_dict(state, loop_params)
    nnx.update(looped, state)
    inputs = _inputs()
    for a, b in zip(_forward(scanned, *inputs), _forward(looped, *inputs), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    "config",
    [AttentionConfig("chunked", chunk_size=7), AttentionConfig("splash", splash_interpret=True)],
    ids=["chunked", "splash"],
)
def test_attention_backends_agree(config):
    model = _model(attention=config)
    nnx.update(model, nnx.state(_model(), nnx.Param))
    inputs = _inputs()
    for a, b in zip(_forward(model, *inputs), _forward(_model(), *inputs), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_default_taps_and_bad_arguments():
    config = UVTransformerConfig(dim=D, num_heads=HEADS, depth=12, num_tokens=4)
    model = nnx.eval_shape(lambda: UVTransformer(config, rngs=nnx.Rngs(0)))
    assert model.taps == config.tap_depths == (3, 6, 9, 12)
    assert UVTransformerConfig(depth=2).tap_depths == (1, 2)
    with pytest.raises(ValueError, match="taps"):
        UVTransformerConfig(depth=3, taps=(2, 4))
    with pytest.raises(ValueError, match="remat"):
        UVTransformerConfig(remat="full")  # one name per policy: "nothing_saveable"
    with pytest.raises(ValueError, match="mode"):
        UVTransformerConfig(mode="self")
    with pytest.raises(ValueError, match="dtype"):
        UVTransformerConfig(dtype="float16")
    f_s, view_mask, f_uv = _inputs()
    with pytest.raises(ValueError, match="f_s must be"):
        _model()(f_s[..., :-1], view_mask, f_uv)
    with pytest.raises(ValueError, match="view_mask"):
        _model()(f_s, view_mask[:, :2], f_uv)


def test_paper_width_shapes_via_eval_shape():
    """D = 1024, 16 heads, 12 blocks, 96 x 96 tokens: traced only (jax.eval_shape), no compute."""
    config = UVTransformerConfig(dtype="bfloat16", remat="nothing_saveable")  # paper sizes
    abstract = nnx.eval_shape(lambda: UVTransformer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    # Per full branch: Z and F sides each 4 D^2 (qkv, out) + 8 D^2 (mlp) + vectors.
    assert 2 * 11 * 2 * 12 * 1024**2 < n_params < 600e6
    f_s = jax.ShapeDtypeStruct((1, 4, 37 * 37, 1024), jnp.bfloat16)
    f_uv = jax.ShapeDtypeStruct((1, 4, 16 * 16, 1024), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((1, 4), bool)
    outs = jax.eval_shape(
        lambda s, a, m, u: nnx.merge(graphdef, s)(a, m, u), state, f_s, mask, f_uv
    )
    assert [o.shape for o in outs] == [(1, 96 * 96, 1024)] * 4
    assert all(o.dtype == jnp.float32 for o in outs)
    q_kernel = nnx.state(abstract, nnx.Param)["blocks"]["screen"]["to_q"]["kernel"]
    assert q_kernel.shape == (11, 1024, 1024)
    assert q_kernel.get_metadata()["out_sharding"] == ("layers", "embed", "heads")
    variables = jax.tree.leaves(
        nnx.state(abstract, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    for var in variables:  # every weight carries one logical axis name per dimension
        names = var.get_metadata()["out_sharding"]
        assert len(names) == len(var.shape) and all(isinstance(n, str) for n in names), names


def test_frozen_param_type():
    config = UVTransformerConfig(dim=D, num_heads=HEADS, depth=2, num_tokens=4)
    model = nnx.eval_shape(lambda: UVTransformer(config, param_type=FrozenParam, rngs=nnx.Rngs(0)))
    assert not jax.tree.leaves(nnx.state(model, nnx.Param))
    assert len(jax.tree.leaves(nnx.state(model, FrozenParam))) > 0
