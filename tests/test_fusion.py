"""Tests for the dual encoder (frozen shared ViT + per-stream fusion CNNs)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from network_fixtures import fast_jit, noise_filled

from uika_jax.models.frozen import FrozenParam
from uika_jax.models.fusion import DualEncoder, FusionConfig
from uika_jax.models.vit import ViT, ViTConfig, vit_input

VIT = ViTConfig(
    family="dinov3",
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    mlp_dim=64,
    patch_size=16,
    num_register_tokens=1,
)
FUSION = FusionConfig(dim=24)
IMAGE = 32  # 2 x 2 screen patches
UV = 48  # 3 x 3 UV patches
UV_IN = 40  # reprojected map side, resized to UV


def _rngs():
    # rbg keys: random init compiles per weight shape, and threefry costs ~2.5x the CPU time.
    return nnx.Rngs(jax.random.key(0, impl="rbg"))


def _encoder(**kw):
    return DualEncoder(VIT, FUSION, image_size=IMAGE, uv_size=UV, rngs=_rngs(), **kw)


@pytest.fixture(scope="module")
def encoder():
    """The encoder with NumPy weights (no init programs to compile)."""
    return noise_filled(nnx.eval_shape(_encoder))


def _inputs(seed, b, n, uv_side=UV_IN):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.random((b, n, IMAGE, IMAGE, 3), np.float32))
    uv_maps = jnp.asarray(rng.random((b, n, uv_side, uv_side, 3), np.float32))
    return images, uv_maps


def _stream_loss(screen, uv):
    return jnp.sum(screen**2) + jnp.sum(uv * jnp.sin(uv))


def _loss(out):
    return _stream_loss(out.screen, out.uv)


def test_default_taps_and_config_errors():
    assert FUSION.taps(2) == (0, 1)
    assert FUSION.taps(12) == (2, 5, 8, 11)
    assert FusionConfig(dim=8, layers=(0, -1)).taps(12) == (0, 11)
    with pytest.raises(ValueError, match="out of range"):
        FusionConfig(dim=8, layers=(12,)).taps(12)
    with pytest.raises(ValueError, match="patch"):
        DualEncoder(VIT, FUSION, image_size=30, uv_size=UV, rngs=_rngs())


def test_given_vit_is_used_not_rebuilt():
    """`vit=` reuses the module (no second ViT); a mismatched one is refused."""

    def build():
        vit = ViT(VIT, stop_gradient=True, rngs=_rngs())
        return vit, DualEncoder(VIT, FUSION, image_size=IMAGE, uv_size=UV, vit=vit, rngs=_rngs())

    vit, enc = nnx.eval_shape(build)
    assert enc.vit is vit
    own = nnx.eval_shape(_encoder)
    sizes = [sum(x.size for x in jax.tree.leaves(nnx.state(m))) for m in (enc, own)]
    assert sizes[0] == sizes[1]
    with pytest.raises(ValueError, match="does not match"):  # trained ViT, frozen encoder
        nnx.eval_shape(
            lambda: DualEncoder(
                VIT, FUSION, image_size=IMAGE, uv_size=UV, vit=ViT(VIT, rngs=_rngs()), rngs=_rngs()
            )
        )


@pytest.mark.parametrize("n", [1, 3])
def test_shapes_and_view_masks(encoder, n):
    images, uv_maps = _inputs(n, 2, n)
    view_mask = np.ones((2, n), bool)
    view_mask[1, -1] = False  # with n = 1, a sample without any valid view
    uv_at_size = jax.image.resize(uv_maps, (2, n, UV, UV, 3), "linear")
    # a UV map given at the ViT side is used as is
    out, same = fast_jit(lambda m, a, b, c, v: (m(a, b, v), m(a, c, v)))(
        encoder, images, uv_maps, uv_at_size, view_mask
    )
    p, p_uv = (IMAGE // 16) ** 2, (UV // 16) ** 2
    assert out.screen.shape == (2, n, p, 24) and out.uv.shape == (2, n, p_uv, 24)
    for tokens in (out.screen, out.uv):
        tokens = np.asarray(tokens)
        assert np.all(tokens[~view_mask] == 0.0)
        assert np.all(np.abs(tokens[view_mask]).sum(-1) > 0)
    assert out.screen.dtype == out.uv.dtype == jnp.float32
    assert same.uv.shape == out.uv.shape


def test_padded_views_change_no_valid_token(encoder):
    images, uv_maps = _inputs(7, 2, 3)
    view_mask = jnp.array([[True, False, True], [True, True, False]])
    fn = fast_jit(lambda m, *a: m(*a))
    out = fn(encoder, images, uv_maps, view_mask)
    garbage = jnp.where(~view_mask[:, :, None, None, None], jnp.nan, images)
    uv_garbage = jnp.where(~view_mask[:, :, None, None, None], 5.0, uv_maps)
    other = fn(encoder, garbage, uv_garbage, view_mask)
    np.testing.assert_array_equal(np.asarray(out.screen), np.asarray(other.screen))
    np.testing.assert_array_equal(np.asarray(out.uv), np.asarray(other.uv))
    # changing a valid view changes its own tokens only
    moved = fn(encoder, images.at[0, 2].multiply(0.5), uv_maps, view_mask)
    diff = np.abs(np.asarray(moved.screen - out.screen)).max(axis=(2, 3))
    assert diff[0, 2] > 0 and np.all(np.delete(diff.reshape(-1), 2) == 0)
    # and NaN in a padded view never reaches a gradient
    grads = fast_jit(nnx.grad(lambda m, *a: _loss(m(*a))))(encoder, garbage, uv_garbage, view_mask)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_separate_stream_weights_and_logical_axes(encoder):
    params = nnx.state(encoder, nnx.Param)
    frozen = nnx.state(encoder, FrozenParam)
    paths = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(params)}
    assert paths and not any(p.startswith("vit") for p in paths)
    assert {p.split("/")[0] for p in paths} == {"screen_cnn", "uv_cnn"}
    assert len(jax.tree.leaves(frozen)) > 0
    assert all(str(p[0]) == "vit" for p, _ in nnx.to_flat_state(frozen))
    for path, var in nnx.to_flat_state(params):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var[...].ndim, path
    s, u = encoder.screen_cnn, encoder.uv_cnn
    assert s.mix.kernel is not u.mix.kernel
    assert not np.array_equal(s.mix.kernel[...], u.mix.kernel[...])


def test_optimizer_holds_no_vit_leaves(encoder):
    opt = nnx.Optimizer(encoder, optax.adam(1e-3), wrt=nnx.Param)
    n_params = len(jax.tree.leaves(nnx.state(encoder, nnx.Param)))
    leaves = nnx.to_flat_state(nnx.state(opt.opt_state))
    assert not any("vit" in map(str, path) for path, _ in leaves)
    assert sum(np.ndim(v[...]) > 0 for _, v in leaves) == 2 * n_params  # adam mu, nu
    vit_sizes = {np.shape(v) for v in jax.tree.leaves(nnx.state(encoder.vit))}
    param_sizes = {np.shape(v) for v in jax.tree.leaves(nnx.state(encoder, nnx.Param))}
    assert vit_sizes - param_sizes  # the ViT has shapes no trainable weight has


def _op_counts(text: str) -> dict[str, int]:
    return {op: text.count(f"stablehlo.{op}") for op in ("dot_general", "convolution")}


def _hlo_counts(model):
    """StableHLO op counts of: the jitted gradient, the gradient of the CNNs alone, the ViT."""
    images, uv_maps = _inputs(3, 1, 2, uv_side=UV)  # at the ViT side: no resize
    view_mask = jnp.array([[True, False]])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # The encoder's ViT inputs: 2 views of each stream.
    screen_pixels = jnp.zeros((2, IMAGE, IMAGE, 3))
    uv_pixels = jnp.zeros((2, UV, UV, 3))

    def full_loss(params, rest, images, uv_maps):
        return _loss(nnx.merge(graphdef, params, rest)(images, uv_maps, view_mask))

    def vit_forward(params, rest, screen_pixels, uv_pixels):
        m = nnx.merge(graphdef, params, rest)
        return m.vit(screen_pixels, layers=m.layers), m.vit(uv_pixels, layers=m.layers)

    def cnn_loss(params, rest, screen_pixels, uv_pixels, screen_vit, uv_vit):
        m = nnx.merge(graphdef, params, rest)
        return _stream_loss(
            m.screen_cnn(screen_vit.features, screen_pixels),
            m.uv_cnn(uv_vit.features, uv_pixels),
        )

    pixels = (screen_pixels, uv_pixels)
    maps = jax.eval_shape(vit_forward, params, rest, *pixels)
    full = jax.jit(jax.grad(full_loss)).lower(params, rest, images, uv_maps).as_text()
    cnns = jax.jit(jax.grad(cnn_loss)).lower(params, rest, *pixels, *maps).as_text()
    vit = jax.jit(vit_forward).lower(params, rest, *pixels).as_text()
    return _op_counts(full), _op_counts(cnns), _op_counts(vit)


def test_gradient_hlo_has_no_vit_backward():
    """The jitted gradient computes the ViT forward and nothing more of the ViT.

    The check: in the lowered (pre-optimisation, so nothing is dead-code
    eliminated yet) StableHLO of `jax.jit(jax.grad(loss))`, the matrix products
    and convolutions must be exactly those of the gradient of the fusion CNNs
    alone (on the ViT features given as inputs) plus those of one ViT forward
    per stream. Any ViT
    backward (weight or input gradient) adds about two products per forward
    product; the same model with `train_backbone=True` shows that the check sees
    it. The gradient pytree holds only the fusion CNNs' `nnx.Param`s.
    """
    full, cnns, vit = _hlo_counts(nnx.eval_shape(_encoder))
    assert vit["dot_general"] > 0 and cnns["convolution"] > 0
    for op in full:
        assert full[op] == cnns[op] + vit[op], (op, full, cnns, vit)
    trainable = nnx.eval_shape(lambda: _encoder(train_backbone=True))
    trainable_full, trainable_cnns, trainable_vit = _hlo_counts(trainable)
    assert (
        trainable_full["dot_general"]
        > trainable_cnns["dot_general"] + 2 * trainable_vit["dot_general"]
    )
    grads = nnx.eval_shape(
        nnx.grad(lambda m: _loss(m(*_inputs(0, 1, 1)))), nnx.eval_shape(_encoder)
    )
    assert {str(p[0]) for p, _ in nnx.to_flat_state(grads)} == {"screen_cnn", "uv_cnn"}


def test_shape_errors(encoder):
    images, uv_maps = _inputs(0, 1, 2)
    with pytest.raises(ValueError, match="images"):
        encoder(images[0], uv_maps)
    with pytest.raises(ValueError, match="expects"):
        encoder(images[:, :, :16], uv_maps)
    with pytest.raises(ValueError, match="uv_maps"):
        encoder(images, uv_maps[:, :1])
    with pytest.raises(ValueError, match="square"):
        encoder(images, uv_maps[:, :, :32])
    with pytest.raises(ValueError, match="view_mask"):
        encoder(images, uv_maps, jnp.ones((1, 3), bool))


def test_shared_screen_pass_and_no_uv_stream(encoder):
    """A given screen ViT pass replaces the encoder's own; without UV maps no UV stream runs."""
    images, uv_maps = _inputs(5, 2, 2)
    view_mask = jnp.array([[True, False], [True, True]])

    @fast_jit
    def run(m, images, uv_maps, view_mask):
        pixels = vit_input(images, view_mask, frozen=True).reshape(4, IMAGE, IMAGE, 3)
        shared = m.vit(pixels, layers=(1, 0, 1))  # more taps, any order
        return m(images, uv_maps, view_mask), m(images, None, view_mask, screen_backbone=shared)

    own, given = run(encoder, images, uv_maps, view_mask)
    np.testing.assert_array_equal(np.asarray(given.screen), np.asarray(own.screen))
    assert given.uv is None
    # a pass that lacks a tapped layer is refused
    pixels = jax.ShapeDtypeStruct((4, IMAGE, IMAGE, 3), jnp.float32)
    partial = jax.eval_shape(lambda p: encoder.vit(p, layers=(0,)), pixels)
    with pytest.raises(ValueError, match="not tapped"):
        jax.eval_shape(lambda x: encoder(x, None, view_mask, screen_backbone=partial), images)
