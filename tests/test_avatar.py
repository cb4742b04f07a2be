"""The assembled model (configs/tiny.py shrunk: `small_config`): reconstruct, drive, render.

Renders of the built-in synthetic head are the input; weights are NumPy noise (every
weight nonzero, including the zero-initialised Gaussian attribute kernels, which at
init pass no gradient to the layers before them). One compiled program runs the
reference model (tiny with a frozen ViT) forward and differentiates the training
objective's terms; several tests check its outputs.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from network_fixtures import FAST_COMPILE, noise_filled, small_config

from uika_jax.config import load_config
from uika_jax.head.anchors import anchor_attributes
from uika_jax.head.lbs import FlameParams
from uika_jax.head.rotations import axis_angle_to_matrix
from uika_jax.head.uv_raster import uv_rasterize
from uika_jax.models.avatar import UIKA, build_head, drive, render
from uika_jax.models.correspondence import correspondence_loss
from uika_jax.models.frozen import FrozenParam
from uika_jax.models.gaussians import CanonicalGaussians, offset_regularizer
from uika_jax.models.summary import abstract_model

CONFIG = small_config()
FROZEN = small_config()
FROZEN.model.vit.train = False
"""The reference model's config: configs/tiny.py with a frozen ViT (FrozenParam weights)."""
S = CONFIG.model.image_size
B, N, F = 2, CONFIG.model.num_views, 2
VIEW_MASK = np.array([[True, True, False], [True, True, True]])
YAWS = (-30.0, 0.0, 30.0)


@functools.cache
def _head():
    return build_head(CONFIG)


def _model(config=CONFIG, seed=0) -> UIKA:
    """Built abstractly and filled with NumPy noise (fan-in scaled; norms and scales ~1)."""
    model = noise_filled(abstract_model(config), seed)
    head = model.decoder.head
    head.scale.bias[...] += model.decoder.config.head.init_log_scale
    head.rotation.bias[...] += jnp.array([1.0, 0.0, 0.0, 0.0])
    return model


@functools.cache
def _views():
    """(B, N, S, S, ...) shaded renders of the synthetic head: images, image UV, face masks."""
    from uika_jax.head.uv_raster import corner_image_uv
    from uika_jax.render import camera
    from uika_jax.render.mesh_render import render_mesh

    head, _ = _head()
    v0 = np.asarray(head.v_template)
    centre = (v0.min(0) + v0.max(0)) / 2
    height = float(v0[:, 1].max() - v0[:, 1].min())
    renders = []
    for yaw in YAWS:
        viewmat, K = camera.framing_camera(centre, height, S, yaw_deg=yaw)
        renders.append(
            render_mesh(
                v0,
                head.faces,
                viewmat,
                K,
                S,
                S,
                corner_uv=corner_image_uv(head),
                background=1.0,
            )
        )
    views = [
        np.stack([np.asarray(getattr(r, k)) for r in renders])
        for k in ("image", "image_uv", "mask")
    ]
    return tuple(np.broadcast_to(v, (B, *v.shape)).copy() for v in views)


def _cameras():
    from uika_jax.render import camera

    head, _ = _head()
    v0 = np.asarray(head.v_template)
    centre = (v0.min(0) + v0.max(0)) / 2
    height = float(v0[:, 1].max() - v0[:, 1].min())
    cams = [camera.framing_camera(centre, height, S, yaw_deg=y) for y in (0.0, 20.0)]
    viewmats = np.stack([c[0] for c in cams]).astype(np.float32)
    Ks = np.stack([c[1] for c in cams]).astype(np.float32)
    return np.broadcast_to(viewmats, (B, F, 4, 4)), np.broadcast_to(Ks, (B, F, 3, 3))


def _flame(seed=0, shape_scale=1.0, expression_scale=0.5, pose_scale=0.1, translation=0.0):
    head, _ = _head()
    rng = np.random.default_rng(seed)
    shape = (B, F)
    return FlameParams(
        shape=jnp.asarray(shape_scale * rng.normal(size=(*shape, head.num_shape)), jnp.float32),
        expression=jnp.asarray(
            expression_scale * rng.normal(size=(*shape, head.num_expression)), jnp.float32
        ),
        pose=jnp.asarray(pose_scale * rng.normal(size=(*shape, head.num_joints, 3)), jnp.float32),
        translation=jnp.full((*shape, 3), translation, jnp.float32),
    )


TARGET = np.full((B, F, S, S, 3), 0.5, np.float32)
"""The photometric loss's target images."""


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _pipeline(graphdef, params, frozen, rest, images, view_mask, uv_gt, mask_gt, head, anchors):
    """Reconstruct -> drive -> render, and the gradients of the training objective's terms.

    Returns (out, posed, rendered) and, per term, the gradients with respect to
    (params, frozen): the photometric loss (render L1) and the rest (correspondence
    loss + offset regulariser). One reverse pass batched over the two terms.
    """
    flame = _flame(seed=2)
    viewmats, Ks = _cameras()

    def terms(params, frozen):
        out = nnx.merge(graphdef, params, frozen, rest)(images, view_mask, anchors)
        posed = drive(head, anchors, out.gaussians, flame)
        rendered = render(posed, viewmats, Ks, S, S, background=(1.0, 1.0, 1.0))
        photometric = jnp.mean(jnp.abs(rendered.images - TARGET))
        corr, _ = correspondence_loss(out.correspondence, uv_gt, mask_gt, valid=view_mask)
        regularised = corr + 0.1 * offset_regularizer(out.gaussians.offsets)
        return (photometric, regularised), (out, posed, rendered)

    grads, outputs = jax.jacrev(terms, argnums=(0, 1), has_aux=True)(params, frozen)
    return outputs, grads


def _run(model, images):
    """The reference pipeline on `images` (the other inputs fixed)."""
    _, uv_gt, mask_gt = _views()
    head, anchors = _head()
    graphdef, params, frozen, rest = nnx.split(model, nnx.Param, FrozenParam, ...)
    return _pipeline(
        graphdef, params, frozen, rest, images, VIEW_MASK, uv_gt, mask_gt, head, anchors
    )


@functools.cache
def _reference_model() -> UIKA:
    return _model(FROZEN)


@functools.cache
def _reference_run():
    model = _reference_model()
    return model, *_run(model, _views()[0])


def test_reconstruct_drive_render_shapes_and_finite():
    _, (out, posed, rendered), _ = _reference_run()
    _, anchors = _head()
    k = anchors.num_anchors
    g = out.gaussians
    assert g.means.shape == (B, k, 3) and g.quats.shape == (B, k, 4)
    assert g.colors.shape == (B, k, 3) and g.opacity_logits.shape == (B, k)
    assert out.correspondence.uv.shape == (B, N, S, S, 2)
    m = CONFIG.model.decoder.map_size
    assert out.reprojection.i_aggr.shape == (B, m, m, 3)
    assert posed.means.shape == (B, F, k, 3) and posed.quats.shape == (B, F, k, 4)
    assert rendered.images.shape == (B, F, S, S, 3) and rendered.alphas.shape == (B, F, S, S, 1)
    for tree in (out, posed, rendered.images, rendered.alphas):
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(posed.quats), axis=-1), 1.0, atol=1e-5)
    assert float(rendered.alphas.max()) > 0.05  # the avatar is in view
    assert int(np.sum(np.asarray(rendered.meta["isects_dropped"]))) == 0
    # Colour fusion is active on observed texels.
    assert float(jnp.max(g.fusion_weights)) > 0.0


def test_padded_views_have_no_influence():
    """Garbage (NaN, huge values) in a padded view leaves every output Gaussian unchanged
    and every gradient finite."""
    model, (out, _, _), _ = _reference_run()
    images = _views()[0].copy()
    images[0, 2] = np.nan
    images[0, 2, ::2] = 1e6
    images[1, 0] += 0.25  # sample 1 changes: sample 0 must not
    (other, _, _), grads = _run(model, images)
    for a, b in zip(jax.tree.leaves(out.gaussians), jax.tree.leaves(other.gaussians), strict=True):
        np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b)[0])
    assert np.abs(np.asarray(other.gaussians.colors[1] - out.gaussians.colors[1])).max() > 0
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(grads))


def test_shared_backbone_pass_equals_separate_backbones():
    """One shared ViT pass = each stage running its own copy of the same ViT weights."""
    model, (out, _, _), _ = _reference_run()
    assert model.encoder.vit is model.correspondence.vit
    config = FROZEN.copy_and_resolve_references()
    config.model.share_backbone = False
    separate = abstract_model(config)
    assert separate.encoder.vit is not separate.correspondence.vit
    weights = nnx.to_pure_dict(nnx.state(model))
    weights["encoder"]["vit"] = weights["correspondence"]["vit"]
    graphdef, state = nnx.split(separate)
    nnx.replace_by_pure_dict(state, weights)
    _, anchors = _head()

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def forward(state, images):
        return nnx.merge(graphdef, state)(images, VIEW_MASK, anchors)

    other = forward(state, _views()[0])
    # Padded views too: both modes zero them before the ViT.
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(other), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_gradients_reach_every_trainable_group_and_no_frozen_weight():
    """The reference model: configs/tiny.py with a frozen ViT (vit.train = False).

    The training objective (render L1 + correspondence loss + offset regulariser) gives
    every nnx.Param a nonzero gradient; every FrozenParam gets exactly zero (its outputs
    pass through stop_gradient). The render loss alone does not reach the DPT: the UV
    it predicts enters the reconstruction under stop_gradient.
    """
    model, _, ((g_render, g_frozen_render), (g_rest, g_frozen_rest)) = _reference_run()
    graphdef, params, frozen, rest = nnx.split(model, nnx.Param, FrozenParam, ...)
    assert jax.tree.leaves(frozen)
    leaves = jax.tree_util.tree_leaves_with_path(g_render)
    assert len(leaves) == len(jax.tree.leaves(params))
    reached = jax.tree.map(
        lambda a, b: np.any(np.asarray(a)) or np.any(np.asarray(b)), g_render, g_rest
    )
    dead = [
        jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(reached) if not x
    ]
    assert not dead, f"no gradient reaches {dead}"
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves((g_render, g_rest)))
    for g_frozen in (g_frozen_render, g_frozen_rest):
        for path, x in jax.tree_util.tree_leaves_with_path(g_frozen):
            assert not np.any(np.asarray(x)), f"frozen {jax.tree_util.keystr(path)} got a gradient"
    dpt = nnx.state(nnx.merge(graphdef, g_render, frozen, rest).correspondence.dpt, nnx.Param)
    assert jax.tree.leaves(dpt) and not any(np.any(np.asarray(x)) for x in jax.tree.leaves(dpt))


def _canonical(seed=0):
    _, anchors = _head()
    k = anchors.num_anchors
    rng = np.random.default_rng(seed)
    offsets = jnp.asarray(0.01 * rng.normal(size=(B, k, 3)), jnp.float32)
    q = rng.normal(size=(B, k, 4))
    q = jnp.asarray(q / np.linalg.norm(q, axis=-1, keepdims=True), jnp.float32)
    zeros = jnp.zeros((B, k, 3), jnp.float32)
    return CanonicalGaussians(
        means=jnp.asarray(anchors.positions) + offsets,
        quats=q,
        log_scales=zeros - 5.0,
        opacity_logits=jnp.zeros((B, k)),
        colors=zeros + 0.5,
        offsets=offsets,
        fusion_weights=jnp.zeros((B, k, 1)),
        pred_colors=zeros + 0.5,
        aggr_colors=zeros,
    )


def _quat_to_matrix(q):
    w, x, y, z = np.moveaxis(np.asarray(q, np.float64), -1, 0)
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def test_drive_semantics():
    """Zero pose: canonical means + blendshapes at beta = 0; rotations compose with LBS."""
    head, anchors = _head()
    g = _canonical()
    attrs = anchor_attributes(head, anchors)
    k = anchors.num_anchors
    run = jax.jit(drive, static_argnames="use_shape", compiler_options=FAST_COMPILE)

    # Zero pose, expression and translation; the (nonzero) shape is ignored: canonical.
    params = _flame(seed=3, expression_scale=0.0, pose_scale=0.0)
    posed = run(head, anchors, g, params)
    canonical = np.broadcast_to(np.asarray(g.means)[:, None], posed.means.shape)
    np.testing.assert_allclose(np.asarray(posed.means), canonical, atol=1e-5)
    dots = np.abs(np.sum(np.asarray(posed.quats) * np.asarray(g.quats)[:, None], -1))
    np.testing.assert_allclose(dots, 1.0, atol=1e-5)  # the same rotation (q or -q)

    # Expression only, plus a translation: the template expression blendshapes at beta = 0.
    params = _flame(seed=4, pose_scale=0.0, translation=0.1)
    posed = run(head, anchors, g, params)
    psi = np.asarray(params.expression)
    expected = canonical + np.einsum("kce,bfe->bfkc", attrs["exprdirs"], psi) + 0.1
    np.testing.assert_allclose(np.asarray(posed.means), expected, atol=1e-5)

    # use_shape applies the given beta.
    posed = run(head, anchors, g, params, use_shape=True)
    beta = np.asarray(params.shape)
    expected = expected + np.einsum("kcs,bfs->bfkc", attrs["shapedirs"], beta)
    np.testing.assert_allclose(np.asarray(posed.means), expected, atol=1e-4)

    # A global rotation turns every Gaussian: R(q_posed) = R_global R(q_canonical).
    rotvec = np.array([0.1, 0.5, -0.2], np.float32)
    pose = np.zeros((B, F, head.num_joints, 3), np.float32)
    pose[:, :, 0] = rotvec
    params = dataclasses.replace(_flame(seed=5, expression_scale=0.0), pose=jnp.asarray(pose))
    posed = run(head, anchors, g, params)
    r_global = np.asarray(axis_angle_to_matrix(jnp.asarray(rotvec)), np.float64)
    expected = np.broadcast_to(r_global @ _quat_to_matrix(g.quats)[:, None], (B, F, k, 3, 3))
    np.testing.assert_allclose(_quat_to_matrix(posed.quats), expected, atol=1e-4)


@pytest.mark.parametrize("ablation", ["no_uv_attention", "no_aggregation", "no_color_fusion"])
def test_ablations_build_and_trace(ablation):
    config = small_config(ablation)
    model = abstract_model(config)
    graphdef, state = nnx.split(model)
    _, anchors = _head()
    images = jax.ShapeDtypeStruct((B, N, S, S, 3), jnp.float32)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, VIEW_MASK, anchors), state, images)
    assert out.gaussians.means.shape == (B, anchors.num_anchors, 3)
    blocks = model.transformer.blocks
    assert (getattr(blocks, "uv", None) is None) == (ablation == "no_uv_attention")
    fuses = ablation not in ("no_aggregation", "no_color_fusion")
    assert (model.decoder.head.fusion_weight is not None) == fuses
    assert model.decoder.config.aggregation == (ablation != "no_aggregation")


def test_errors():
    model = _reference_model()
    _, anchors = _head()
    with pytest.raises(ValueError, match="model expects"):
        model(jnp.zeros((1, 1, S + 8, S + 8, 3)), None, anchors)
    with pytest.raises(ValueError, match="1 to 3"):
        model(jnp.zeros((1, 4, S, S, 3)), None, anchors)
    with pytest.raises(ValueError, match="view_mask shape"):
        model(jnp.zeros((1, 2, S, S, 3)), jnp.ones((1, 3), bool), anchors)
    head, anchors = _head()
    g = _canonical()
    with pytest.raises(ValueError, match="pose must be"):
        drive(head, anchors, g, jax.tree.map(lambda x: x[:, 0], _flame()))
    posed = jax.eval_shape(lambda p: drive(head, anchors, g, p), _flame())
    viewmats, Ks = _cameras()
    with pytest.raises(ValueError, match="one camera per"):
        render(posed, viewmats[:, :1], Ks, S, S)


def test_default_config_anchors_fit_either_head():
    """num_anchors None (configs/default.py) takes every covered texel of the built-in head;
    a count above the coverage is refused naming the config key (map 32: cheap)."""
    config = load_config("configs/default.py")
    assert config.head.num_anchors is None
    config.head.model_path = None
    config.model.decoder.map_size = 32
    head, anchors = build_head(config)
    covered = int(np.asarray(uv_rasterize(head, 32).mask).sum())
    assert anchors.num_anchors == covered > 0
    config.head.num_anchors = covered + 1
    with pytest.raises(ValueError, match=r"head.num_anchors=\d+ does not fit the built-in"):
        build_head(config)


def test_separate_backbones_without_uv_attention_run():
    """share_backbone = False and the "w/o uv_attn" ablation, concretely."""
    config = small_config("no_uv_attention")
    config.model.share_backbone = False
    model = _model(config, seed=4)
    assert model.encoder.vit is not model.correspondence.vit
    graphdef, state = nnx.split(model)
    _, anchors = _head()

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def forward(state, images):
        return nnx.merge(graphdef, state)(images, VIEW_MASK, anchors).gaussians

    images = _views()[0]
    g = forward(state, images)
    assert g.means.shape == (B, anchors.num_anchors, 3)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(g))
    garbage = images.copy()
    garbage[0, 2] = np.nan
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(forward(state, garbage)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.oracle
def test_load_backbone_fills_every_vit(tmp_path):
    """HF DINOv3 weights (random-init transformers model) load into the shared or both ViTs."""
    from hf_vit_oracle import hf_model

    from uika_jax.convert.hf_vit import load_hf_vit

    hf = hf_model("dinov3")
    hf.save_pretrained(tmp_path)
    c = hf.config
    reference = jax.tree.leaves(nnx.state(load_hf_vit(tmp_path), FrozenParam))
    for share in (True, False):
        config = small_config()
        config.model.vit.overrides = dict(
            hidden_size=c.hidden_size,
            num_heads=c.num_attention_heads,
            num_layers=c.num_hidden_layers,
            mlp_dim=c.intermediate_size,
            patch_size=c.patch_size,
        )
        config.model.vit.train = False
        config.model.share_backbone = share
        model = _model(config)
        model.load_backbone(str(tmp_path))
        for vit in (model.correspondence.vit, model.encoder.vit):
            loaded = jax.tree.leaves(nnx.state(vit, FrozenParam))
            assert len(loaded) == len(reference)
            for a, b in zip(loaded, reference, strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert (model.encoder.vit is model.correspondence.vit) == share
