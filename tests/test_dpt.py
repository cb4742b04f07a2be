"""DPT neck + head: parity with a random-init HF `DPTForDepthEstimation`, resizing, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_oracle
from flax import nnx
from network_fixtures import fast_jit, noise_filled

from uika_jax.models import dpt
from uika_jax.models.dpt import DPT, DPTConfig

TOL = 1e-5
D = 32
NECK = (8, 16, 24, 32)
FEATURES = 16


def _hf_dpt(readout, seed=0):
    """A random-init HF DPTForDepthEstimation with small sizes; biases randomised too."""
    torch = require_oracle("torch")
    transformers = require_oracle("transformers")
    config = transformers.DPTConfig(
        hidden_size=D,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=64,
        patch_size=16,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=list(NECK),
        reassemble_factors=[4, 2, 1, 0.5],
        fusion_hidden_size=FEATURES,
        readout_type=readout,
    )
    torch.manual_seed(seed)
    model = transformers.DPTForDepthEstimation(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("neck.", "head.")):
                fan_in = p[0].numel() if p.ndim > 1 else 10.0
                p.copy_(torch.randn_like(p) / fan_in**0.5)
    return model


def _t(p):
    return p.detach().numpy()


def _set(var, value):
    assert var.get_value().shape == value.shape, (var.get_value().shape, value.shape)
    var.set_value(jnp.asarray(value))


def _conv(ours: dpt.Conv2d, hf):
    _set(ours.kernel, _t(hf.weight).transpose(2, 3, 1, 0))
    if hf.bias is None:
        assert ours.bias is None
    else:
        _set(ours.bias, _t(hf.bias))


def load_hf_dpt(ours: DPT, hf) -> None:
    """Copies an HF DPTForDepthEstimation's neck and head weights into our DPT."""
    neck = hf.neck
    for i, layer in enumerate(ours.neck.reassemble):
        ref = neck.reassemble_stage.layers[i]
        _conv(layer.projection, ref.projection)
        if isinstance(layer.resample, dpt.Upsample):
            _set(layer.resample.kernel, _t(ref.resize.weight).transpose(0, 2, 3, 1))
            _set(layer.resample.bias, _t(ref.resize.bias))
        elif layer.resample is not None:
            _conv(layer.resample, ref.resize)
        if layer.readout_proj is not None:
            lin = neck.reassemble_stage.readout_projects[i][0]
            _set(layer.readout_proj.kernel, _t(lin.weight).T)
            _set(layer.readout_proj.bias, _t(lin.bias))
        _conv(ours.neck.level_convs[i], neck.convs[i])
    for block, ref in zip(ours.neck.fusion, neck.fusion_stage.layers, strict=True):
        _conv(block.projection, ref.projection)
        for rcu, ref_rcu in ((block.rcu1, ref.residual_layer1), (block.rcu2, ref.residual_layer2)):
            if rcu is not None:
                _conv(rcu.conv1, ref_rcu.convolution1)
                _conv(rcu.conv2, ref_rcu.convolution2)
    head = hf.head.head
    _conv(ours.head.conv1, head[0])
    _conv(ours.head.conv2, head[2])
    _conv(ours.head.conv3, head[4])


def _ours(readout):
    # Abstract (no init compiles): every weight is then overwritten from HF.
    config = DPTConfig(in_dim=D, neck_channels=NECK, features=FEATURES, readout=readout)
    return nnx.eval_shape(lambda: DPT(config, rngs=nnx.Rngs(0)))


@pytest.mark.oracle
@pytest.mark.parametrize(
    ("readout", "grid"), [("ignore", (4, 4)), ("project", (4, 6)), ("add", (2, 4))]
)
def test_parity_with_hf_dpt(readout, grid):
    torch = require_oracle("torch")
    hf = _hf_dpt(readout)
    ours = _ours(readout)
    load_hf_dpt(ours, hf)
    assert all(
        isinstance(v.get_value(), jax.Array)
        for v in jax.tree.leaves(nnx.state(ours), is_leaf=lambda x: isinstance(x, nnx.Variable))
    )
    h, w = grid
    rng = np.random.RandomState(1)
    tokens = [rng.randn(2, 1 + h * w, D).astype(np.float32) for _ in range(4)]
    with torch.no_grad():
        ref_fused = hf.neck([torch.from_numpy(t) for t in tokens], h, w)
        ref_out = hf.head.head[:-1](ref_fused[-1])  # without the depth head's final ReLU
    maps = [jnp.asarray(t[:, 1:].reshape(2, h, w, D)) for t in tokens]
    cls = [jnp.asarray(t[:, 0]) for t in tokens]
    fused, out = fast_jit(lambda m, x, c: (m.neck(x, c), m(x, c, output_size=(16 * h, 16 * w))))(
        ours, maps, cls
    )
    assert len(fused) == len(ref_fused)
    for a, b in zip(fused, ref_fused, strict=True):
        np.testing.assert_allclose(np.asarray(a), _t(b).transpose(0, 2, 3, 1), atol=TOL, rtol=0)
    assert out.shape == (2, 16 * h, 16 * w, 1)
    np.testing.assert_allclose(np.asarray(out), _t(ref_out).transpose(0, 2, 3, 1), atol=TOL, rtol=0)


@pytest.mark.oracle
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize(("src", "dst"), [((3, 5), (7, 4)), ((4, 4), (8, 8)), ((5, 2), (1, 9))])
def test_resize_bilinear_matches_torch(align_corners, src, dst):
    torch = require_oracle("torch")
    x = np.random.RandomState(0).randn(2, *src, 3).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2),
        size=dst,
        mode="bilinear",
        align_corners=align_corners,
    )
    out = dpt.resize_bilinear(jnp.asarray(x), dst, align_corners=align_corners)
    np.testing.assert_allclose(np.asarray(out), _t(ref).transpose(0, 2, 3, 1), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def model():
    """A DPT with NumPy weights (no init programs to compile) shared by the cheap tests."""
    config = DPTConfig(in_dim=D, neck_channels=NECK, features=FEATURES, readout="project")
    return noise_filled(nnx.eval_shape(lambda: DPT(config, rngs=nnx.Rngs(0))))


def test_patch14_grid_reaches_input_resolution_and_odd_grids_fuse(model):
    # patch 14 at 70 px: a 5 x 5 grid (odd), so the 1/2 level is 3 x 3 and sizes do not nest.
    maps = [jnp.full((1, 5, 5, D), 0.1 * i) for i in range(4)]
    cls = [jnp.ones((1, D))] * 4
    fused, out = fast_jit(lambda m, x, c: (m.neck(x, c), m(x, c, output_size=(70, 70))))(
        model, maps, cls
    )
    assert [f.shape[1:3] for f in fused] == [(5, 5), (10, 10), (20, 20), (40, 40)]
    assert out.shape == (1, 70, 70, 1)
    assert np.isfinite(np.asarray(out)).all()


def test_generic_levels_and_widths():
    config = DPTConfig(in_dim=(12, 20), neck_channels=(6, 10), factors=(2, 1), features=8)
    small = noise_filled(nnx.eval_shape(lambda: DPT(config, rngs=nnx.Rngs(0))))
    maps = [jnp.ones((2, 3, 4, 12)), jnp.ones((2, 3, 4, 20))]
    fused, out, sized, doubled = fast_jit(
        lambda m, x: (
            m.neck(x),
            m(x),
            m.neck(x, output_size=(5, 7)),
            m.neck(x, output_size=(12, 16)),
        )
    )(small, maps)
    assert [f.shape for f in fused] == [(2, 6, 8, 8), (2, 12, 16, 8)]
    assert out.shape == (2, 24, 32, 1)
    # output_size sizes the last fused map only; twice the shallowest level is the default
    assert [f.shape for f in sized] == [(2, 6, 8, 8), (2, 5, 7, 8)]
    np.testing.assert_array_equal(sized[0], fused[0])
    for a, b in zip(doubled, fused, strict=True):
        np.testing.assert_array_equal(a, b)


def test_logical_axis_names(model):
    names = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names[path] = var.get_metadata().get("out_sharding")
        assert names[path] is not None and len(names[path]) == var[...].ndim, path
    assert names[("neck", "reassemble", 0, "projection", "kernel")] == (
        None,
        None,
        "embed",
        "conv_out",
    )
    assert names[("neck", "reassemble", 0, "resample", "kernel")] == (
        "conv_in",
        None,
        None,
        "conv_out",
    )
    assert names[("neck", "reassemble", 0, "readout_proj", "kernel")] == ("readout", "embed")
    assert names[("head", "conv1", "kernel")] == (None, None, "conv_in", "conv_out")
    # the deepest fusion block has no skip, hence no unused rcu1 weights
    assert model.neck.fusion[0].rcu1 is None and model.neck.fusion[1].rcu1 is not None


def test_bad_inputs_raise(model):
    with pytest.raises(ValueError, match="factor"):
        DPTConfig(in_dim=D, factors=(3, 2, 1, 0.4))
    with pytest.raises(ValueError, match="per level"):
        DPTConfig(in_dim=D, factors=(4, 2, 1))
    maps = [jnp.ones((1, 4, 4, D))] * 4
    cls = [jnp.ones((1, D))] * 4
    with pytest.raises(ValueError, match="cls"):
        jax.eval_shape(lambda x: model(x), maps)
    with pytest.raises(ValueError, match="4 feature maps"):
        jax.eval_shape(lambda x, c: model(x, c), maps[:3], cls[:3])
    with pytest.raises(ValueError, match="feature map"):
        jax.eval_shape(lambda x, c: model(x, c), [jnp.ones((1, 4, 4, D + 1))] * 4, cls)
