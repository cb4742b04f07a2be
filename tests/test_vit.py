"""DINOv2 / DINOv3 ViT: parity with HF transformers, interpolation, RoPE, freezing, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_oracle
from flax import nnx
from hf_vit_oracle import CASES, final_norm, hf_config, hf_model, images, run_hf
from network_fixtures import fast_jit, noise_filled

from uika_jax.convert.hf_vit import load_hf_vit, vit_config_from_hf
from uika_jax.models import vit_layers
from uika_jax.models.frozen import FrozenParam
from uika_jax.models.vit import ViT, ViTConfig, default_taps, normalize_imagenet, vit_input

TOL = 1e-5
pytestmark = pytest.mark.oracle


def _load(model, tmp_path, **kwargs):
    model.save_pretrained(tmp_path)
    return load_hf_vit(tmp_path, **kwargs)


def _err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max(initial=0.0))


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_hf_model(case, tmp_path):
    hf = hf_model(case)
    ours = _load(hf, tmp_path)
    x = images(case)
    n = hf.config.num_hidden_layers
    layers = tuple(range(n))
    forward = fast_jit(
        lambda m, x: (m(x, layers=layers), m(x, layers=(0,), norm_features=False).features[0])
    )
    out, raw = forward(ours, jnp.asarray(x))
    ref = run_hf(hf, x, output_hidden_states=True)
    r = ours.config.num_register_tokens
    gh, gw = (s // ours.config.patch_size for s in x.shape[1:3])
    if ours.config.family == "dinov2":  # the position table is resized (and not square)
        assert (gh, gw) != (ours.config.pos_grid,) * 2
    tokens = ref.last_hidden_state.numpy()
    assert out.tokens.shape == tokens.shape == (2, 1 + r + gh * gw, 64)
    assert _err(out.tokens, tokens) < TOL
    assert _err(out.cls, ref.pooler_output.numpy()) < TOL
    assert _err(out.registers, tokens[:, 1 : 1 + r]) < TOL
    assert _err(out.patches, tokens[:, 1 + r :].reshape(2, gh, gw, 64)) < TOL
    assert len(ref.hidden_states) == n + 1  # embeddings, then each block
    norm = final_norm(hf)
    for i, feat, cls in zip(layers, out.features, out.feature_cls, strict=True):
        hs = norm(ref.hidden_states[i + 1]).detach().numpy()
        assert feat.shape == (2, gh, gw, 64)
        assert _err(feat, hs[:, 1 + r :].reshape(2, gh, gw, 64)) < TOL
        assert _err(cls, hs[:, 0]) < TOL
    assert _err(raw, ref.hidden_states[1].numpy()[:, 1 + r :].reshape(raw.shape)) < TOL


@pytest.mark.parametrize(
    ("case", "backbone"),
    [
        ("dinov2", "Dinov2Backbone"),
        ("dinov2_registers", "Dinov2WithRegistersBackbone"),
        ("dinov3", "DINOv3ViTBackbone"),
    ],
)
@pytest.mark.parametrize("apply_layernorm", [True, False])
def test_feature_maps_match_hf_backbone(case, backbone, apply_layernorm, tmp_path):
    n = CASES[case][2]["num_hidden_layers"]
    hf = hf_model(case, backbone, out_indices=[1, n], apply_layernorm=apply_layernorm)
    ours = _load(hf, tmp_path)
    x = images(case, size=(64 if case == "dinov3" else 56, 32 if case == "dinov3" else 70))
    ref = run_hf(hf, x).feature_maps
    out = fast_jit(lambda m, x: m(x, layers=(0, -1), norm_features=apply_layernorm))(
        ours, jnp.asarray(x)
    )
    for i, (feat, fmap) in enumerate(zip(out.features, ref, strict=True)):
        fmap = fmap.permute(0, 2, 3, 1).numpy()
        if case == "dinov3" and not apply_layernorm and i == 1:
            # HF's DINOv3 backbone always norms its last stage; we follow norm_features.
            feat = out.patches
        assert _err(feat, fmap) < TOL


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("grid", [(2, 3), (4, 4), (6, 9), (7, 2)])
def test_interpolate_pos_embed_matches_torch(antialias, grid):
    torch = require_oracle("torch")
    pos = np.random.RandomState(1).randn(1 + 16, 8).astype(np.float32)
    ours = vit_layers.interpolate_pos_embed(jnp.asarray(pos), *grid, antialias=antialias)
    t = torch.from_numpy(pos[1:]).reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    t = torch.nn.functional.interpolate(
        t, size=grid, mode="bicubic", align_corners=False, antialias=antialias
    )
    ref = np.concatenate([pos[:1], t.permute(0, 2, 3, 1).reshape(-1, 8).numpy()])
    assert _err(ours, ref) < TOL  # float32 rounding: ~2e-6 here


def test_rope_tables_match_hf():
    torch = require_oracle("torch")
    transformers = require_oracle("transformers")
    mod = transformers.models.dinov3_vit.modeling_dinov3_vit
    config, _ = hf_config("dinov3")
    rope = mod.DINOv3ViTRopePositionEmbedding(config).eval()
    cos, sin = rope(torch.zeros(1, 3, 48, 80))
    ours = vit_layers.rope_tables(3, 5, 64 // 4, config.rope_theta)
    assert _err(ours[0], cos.numpy()) < 1e-6
    assert _err(ours[1], sin.numpy()) < 1e-6


@pytest.mark.parametrize("case", ["dinov2", "dinov3"])
def test_patch_mask_matches_hf_bool_masked_pos(case, tmp_path):
    torch = require_oracle("torch")
    hf = hf_model(case)
    ours = _load(hf, tmp_path)
    x = images(case)
    gh, gw = (s // ours.config.patch_size for s in x.shape[1:3])
    mask = np.random.RandomState(2).rand(2, gh, gw) < 0.5
    ref = run_hf(hf, x, bool_masked_pos=torch.from_numpy(mask.reshape(2, -1)))
    out = fast_jit(lambda m, x, mask: m(x, patch_mask=mask))(ours, jnp.asarray(x), mask)
    assert _err(out.tokens, ref.last_hidden_state.numpy()) < TOL


def _tiny(param_type=FrozenParam, **kw):
    """A 2-block DINOv3-style ViT of width 32; the same NumPy weights whatever the options."""
    cfg = ViTConfig.dinov3("s", hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
    return noise_filled(
        nnx.eval_shape(lambda: ViT(cfg, param_type=param_type, rngs=nnx.Rngs(0), **kw))
    )


def test_frozen_weights_get_no_gradient_but_input_does():
    model = _tiny()
    assert not nnx.state(model, nnx.Param)
    assert len(nnx.state(model, FrozenParam)) > 0
    x = jnp.asarray(images("dinov3", batch=1))

    def loss(m, x):
        out = m(x, layers=(0,))
        return jnp.sum(out.patches**2) + jnp.sum(out.features[0])

    grads = fast_jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param)))(model, x)
    assert not jax.tree.leaves(grads)
    input_grad = fast_jit(jax.grad(loss, argnums=1))
    gx = input_grad(model, x)
    assert gx.shape == x.shape and float(jnp.abs(gx).max()) > 0
    gx = input_grad(_tiny(stop_gradient=True), x)
    assert float(jnp.abs(gx).max()) == 0.0


def test_trainable_from_scratch():
    model = _tiny(param_type=nnx.Param)
    assert not nnx.state(model, FrozenParam)
    x = jnp.asarray(images("dinov3", batch=1))
    loss = lambda m, x: jnp.sum(m(x).patches ** 2)  # noqa: E731
    grads = fast_jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param)))(model, x)
    flat = dict(nnx.to_flat_state(grads))
    assert float(jnp.abs(flat[("blocks", 0, "attn", "q", "kernel")][...]).max()) > 0


NAMES = {"embed", "heads", "mlp", "patch", None}


@pytest.mark.parametrize("cfg", [ViTConfig.dinov2("s", registers=True), ViTConfig.dinov3("b")])
def test_every_weight_has_logical_axis_names(cfg):
    model = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == len(var.shape) and set(names) <= NAMES, path
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = (("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("patch", None))
    with nnx.logical_axis_rules(rules):
        shardings = nnx.get_named_sharding(nnx.state(model), mesh)
    spec = dict(nnx.to_flat_state(shardings))[("blocks", 0, "mlp", "up", "kernel")]
    assert spec.get_value().spec == jax.P("fsdp", "tensor")


@pytest.mark.parametrize(
    ("family", "size", "hf_kw"),
    [
        ("dinov2", "s", dict(model_type="dinov2", hidden_size=384, num_attention_heads=6)),
        ("dinov2r", "b", dict(model_type="dinov2_with_registers", patch_size=14)),
        (
            "dinov2",
            "l",
            dict(
                model_type="dinov2", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16
            ),
        ),
        ("dinov3", "s", dict(model_type="dinov3_vit", num_register_tokens=4)),
        (
            "dinov3",
            "l",
            dict(
                model_type="dinov3_vit",
                hidden_size=1024,
                num_hidden_layers=24,
                num_attention_heads=16,
                intermediate_size=4096,
                num_register_tokens=4,
            ),
        ),
    ],
)
def test_presets_match_hf_checkpoint_configs(family, size, hf_kw):
    torch = require_oracle("torch")
    transformers = require_oracle("transformers")
    if family == "dinov3":
        preset = ViTConfig.dinov3(size)
    else:
        preset = ViTConfig.dinov2(size, registers=family == "dinov2r")
        hf_kw = hf_kw | dict(image_size=518)
    assert vit_config_from_hf(hf_kw) == preset
    cls = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}
    cls = cls.get(hf_kw["model_type"], "DINOv3ViTModel")
    config_cls = getattr(transformers, cls).config_class
    with torch.device("meta"):
        hf = getattr(transformers, cls)(config_cls(**hf_kw))
    ours = nnx.eval_shape(lambda: ViT(preset, rngs=nnx.Rngs(0)))
    n_ours = sum(v.size for v in jax.tree.leaves(nnx.state(ours)))
    assert n_ours == sum(p.numel() for p in hf.parameters())


def test_bad_inputs_are_refused():
    model = _tiny()
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="multiple of patch 16"):
        model(jnp.zeros((1, 40, 32, 3)))
    with pytest.raises(ValueError, match="out of range"):
        model(jnp.zeros((1, 32, 32, 3)), layers=(2,))
    with pytest.raises(ValueError, match="patch_mask shape"):
        model(jnp.zeros((1, 32, 32, 3)), patch_mask=jnp.zeros((1, 3, 2), bool))
    with pytest.raises(ValueError, match="family"):
        ViTConfig(family="vit", hidden_size=8, num_layers=1, num_heads=1, mlp_dim=8, patch_size=4)


def test_bfloat16_compute_is_close_to_float32():
    x = jnp.asarray(images("dinov3", batch=1))
    patches = fast_jit(lambda m, x: m(x).patches)
    ref = patches(_tiny(), x)
    out = patches(_tiny(dtype=jnp.bfloat16), x)
    assert out.dtype == jnp.bfloat16
    assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) < 0.1


def test_normalize_imagenet():
    x = jnp.ones((2, 4, 4, 3)) * jnp.asarray([0.485, 0.456, 0.406])
    assert float(jnp.abs(normalize_imagenet(x)).max()) < 1e-6
    with pytest.raises(ValueError, match="RGB"):
        normalize_imagenet(jnp.ones((2, 4)))


def test_default_taps():
    assert default_taps(12) == (2, 5, 8, 11)
    assert default_taps(24) == (5, 11, 17, 23)
    assert default_taps(4) == (0, 1, 2, 3)
    assert default_taps(2) == (0, 0, 1, 1)
    with pytest.raises(ValueError, match="layer"):
        default_taps(0)


def test_taps_look_up_layers_of_one_pass():
    """`ViTOutput.taps` returns each requested block's map, whatever the pass's tap order."""
    model = _tiny()
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 32, 32, 3)), jnp.float32)
    out, first = fast_jit(lambda m, x: (m(x, layers=(-1, 0)), m(x, layers=(0,))))(model, x)
    assert out.layers == (model.config.num_layers - 1, 0)
    maps, cls = out.taps((0,))
    np.testing.assert_array_equal(maps[0], first.features[0])
    np.testing.assert_array_equal(cls[0], out.feature_cls[1])
    with pytest.raises(ValueError, match="not tapped"):
        jax.eval_shape(lambda x: model(x, layers=(1,)), x).taps((0,))


def test_vit_input_zeroes_invalid_images_and_stops_gradients():
    images = jnp.full((2, 1, 1, 3), jnp.nan).at[0].set(0.5)
    valid = jnp.array([True, False])
    pixels = np.asarray(vit_input(images, valid, frozen=True))
    np.testing.assert_allclose(pixels[0], np.asarray(normalize_imagenet(images[0])))
    np.testing.assert_allclose(pixels[1], np.asarray(normalize_imagenet(jnp.zeros((1, 1, 3)))))
    for frozen in (True, False):
        grad = jax.grad(lambda x: vit_input(x, valid, frozen=frozen).sum())(jnp.ones((2, 1, 1, 3)))  # noqa: B023
        expected = 0.0 if frozen else 1.0 / np.array([0.229, 0.224, 0.225])
        np.testing.assert_allclose(grad[0, 0, 0], expected, rtol=1e-6)
        np.testing.assert_array_equal(grad[1], 0.0)  # an invalid image gets no gradient
