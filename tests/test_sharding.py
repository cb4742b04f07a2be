"""Mesh, logical axis rules, and the sharded paper-width forward + backward on 8 fake devices.

The compile test builds the paper configuration with reduced depth and views only:

    ViT (DINOv3 ViT-L, frozen)   width 1024, 16 heads, 4 blocks (paper 24)
    UV transformer               width 1024, 16 heads, 4 blocks (paper 12), 96 x 96 tokens
    decoder                      384 x 384 x 256 map, K = 130,000 anchors (as the paper)
    images                       512 x 512, N = 2 views (paper 16), batch 4
    compute dtype                bfloat16 (the config's; weights and residuals float32)

abstractly (nothing allocated), applies the config's shardings on a 2 x 2 x 2
(data, fsdp, tensor) mesh, lowers and compiles the jitted value-and-grad of a loss on
the reconstructed Gaussians, and prints `compiled.memory_analysis()` per device. It compiles
with the tests' fast XLA:CPU options (a fifth of the compile time; the memory figures move
by under 0.01 GiB: temporaries 5.716 GiB against 5.722 with the default options).
"""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from network_fixtures import FAST_COMPILE, ROOT, abstract_uika

from uika_jax import sharding
from uika_jax.config import load_config
from uika_jax.head.anchors import Anchors
from uika_jax.models.summary import abstract_model

LARGE = 1 << 20
"""Weights with at least this many elements must be sharded."""


@pytest.mark.parametrize(
    "spec",
    ["configs/default.py", "configs/tiny.py"],
)
def test_rules_cover_every_logical_axis(spec):
    config, model = abstract_uika(spec)
    state = nnx.state(model)
    rules = sharding.logical_rules(config)
    sharding.check_rules(state, rules)  # raises on a missing name
    for path, v in jax.tree_util.tree_leaves_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    ):
        names = v.get_metadata().get("out_sharding")
        assert names is not None and len(names) == v.ndim, jax.tree_util.keystr(path)
    assert {"embed", "heads", "mlp", "tokens", "layers", "conv_in", "conv_out"} <= (
        sharding.logical_names(state)
    )
    with pytest.raises(ValueError, match=r"without a sharding rule.*embed"):
        sharding.check_rules(state, tuple(r for r in rules if r[0] != "embed"))


def test_make_mesh_and_fit_spec():
    mesh = sharding.make_mesh((2, -1, 2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="needs 12 devices"):
        sharding.make_mesh((3, 2, 2))
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh((-1, -1, 2))
    spec = PartitionSpec("fsdp", "tensor")
    assert sharding.fit_spec(spec, (8, 4), mesh) == PartitionSpec("fsdp", "tensor")
    assert sharding.fit_spec(spec, (8, 3), mesh) == PartitionSpec("fsdp", None)
    assert sharding.fit_spec(PartitionSpec("fsdp", "fsdp"), (4, 4), mesh) == PartitionSpec(
        "fsdp", None
    )
    rules = (("batch", ("data", "fsdp")),)
    batch_spec = sharding.batch_sharding(mesh, rules, (4, 3)).spec
    assert batch_spec == PartitionSpec(("data", "fsdp"), None)
    assert sharding.batch_sharding(mesh, rules, (3, 3)).spec == PartitionSpec(None, None)
    batch = sharding.shard_batch({"x": np.zeros((8, 2), np.float32), "s": 1.0}, mesh, rules)
    assert batch["x"].sharding.shard_shape((8, 2)) == (2, 2)
    assert batch["s"].sharding.is_fully_replicated


def _reduced_paper_config():
    config = load_config(ROOT / "configs/default.py")
    config.model.vit.overrides = {"num_layers": 4}
    config.model.transformer.depth = 4
    config.model.num_views = 2
    return config


def test_paper_width_forward_backward_compiles_sharded():
    config = _reduced_paper_config()
    mesh = sharding.make_mesh((2, 2, 2))
    rules = sharding.logical_rules(config)
    graphdef, params, rest = nnx.split(abstract_model(config), nnx.Param, ...)
    param_shardings = sharding.state_shardings(params, mesh, rules)
    rest_shardings = sharding.state_shardings(rest, mesh, rules)

    # Large weights are split across devices, not replicated.
    fractions = sharding.sharded_fraction(param_shardings, params)
    fractions |= sharding.sharded_fraction(rest_shardings, rest)
    sizes = {
        jax.tree_util.keystr(p): math.prod(x.shape)
        for state in (params, rest)
        for p, x in jax.tree_util.tree_leaves_with_path(state)
    }
    large = [k for k, n in sizes.items() if n >= LARGE]
    assert len(large) > 50
    replicated = [k for k in large if fractions[k] == 1.0]
    assert not replicated, f"replicated large weights: {replicated}"

    b, n, s, k = 4, config.model.num_views, config.model.image_size, 130_000
    sds = jax.ShapeDtypeStruct
    replicate = NamedSharding(mesh, PartitionSpec())

    def batched(shape, dtype):
        return sds(shape, dtype, sharding=sharding.batch_sharding(mesh, rules, shape))

    def abstract(state, shardings):
        return jax.tree.map(lambda x, h: sds(x.shape, x.dtype, sharding=h), state, shardings)

    images = batched((b, n, s, s, 3), jnp.float32)
    view_mask = batched((b, n), jnp.bool_)
    anchors = Anchors(
        face_ids=sds((k,), jnp.int32, sharding=replicate),
        barycentrics=sds((k, 3), jnp.float32, sharding=replicate),
        texels=sds((k, 2), jnp.int32, sharding=replicate),
        positions=sds((k, 3), jnp.float32, sharding=replicate),
        uv_resolution=config.model.decoder.map_size,
    )

    def loss_fn(params, rest, images, view_mask, anchors):
        out = nnx.merge(graphdef, params, rest)(images, view_mask, anchors)
        g = out.gaussians
        terms = (g.colors, g.means, g.opacity_logits, g.log_scales, g.quats, g.fusion_weights)
        face = out.correspondence.face_logit
        return sum(jnp.mean(jnp.square(x)) for x in terms) + jnp.mean(jnp.square(face))

    step = jax.jit(
        jax.value_and_grad(loss_fn),
        out_shardings=(replicate, param_shardings),
        compiler_options=FAST_COMPILE,
    )
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = step.lower(
            abstract(params, param_shardings),
            abstract(rest, rest_shardings),
            images,
            view_mask,
            anchors,
        )
    compiled = lowered.compile()
    seconds = time.perf_counter() - start

    # The compiled program keeps the large weights sharded (None: an argument it never reads).
    (in_params, in_rest, in_images, *_), _ = compiled.input_shardings
    checked = 0
    for state, shardings in ((params, in_params), (rest, in_rest)):
        leaves = jax.tree.leaves(shardings, is_leaf=lambda h: h is None)
        for (path, x), h in zip(jax.tree_util.tree_leaves_with_path(state), leaves, strict=True):
            if h is not None and math.prod(x.shape) >= LARGE:
                assert not h.is_fully_replicated, jax.tree_util.keystr(path)
                checked += 1
    assert checked > 50
    assert in_images.shard_shape(images.shape)[0] == 1

    memory = compiled.memory_analysis()
    gib = 1 << 30
    print(
        f"\npaper width, reduced depth, 2x2x2 mesh, compile {seconds:.0f} s; per device: "
        f"arguments {memory.argument_size_in_bytes / gib:.3f} GiB, "
        f"outputs {memory.output_size_in_bytes / gib:.3f} GiB, "
        f"temporaries {memory.temp_size_in_bytes / gib:.3f} GiB"
    )
    assert memory.argument_size_in_bytes > 0 and memory.temp_size_in_bytes > 0


def test_paper_config_traces_at_full_size():
    """configs/default.py as is (bfloat16, 24 + 12 blocks, N = 16 views of 512^2, K = 130K)."""
    config, model = abstract_uika("configs/default.py")
    graphdef, state = nnx.split(model)
    sds = jax.ShapeDtypeStruct
    k, n, s = 130_000, config.model.num_views, config.model.image_size
    anchors = Anchors(
        face_ids=sds((k,), jnp.int32),
        barycentrics=sds((k, 3), jnp.float32),
        texels=sds((k, 2), jnp.int32),
        positions=sds((k, 3), jnp.float32),
        uv_resolution=config.model.decoder.map_size,
    )
    out = jax.eval_shape(
        lambda st, x, m, a: nnx.merge(graphdef, st)(x, m, a),
        state,
        sds((1, n, s, s, 3), jnp.float32),
        sds((1, n), jnp.bool_),
        anchors,
    )
    assert out.gaussians.means.shape == (1, k, 3)
    assert out.gaussians.colors.dtype == jnp.float32
    assert out.correspondence.uv.shape == (1, n, s, s, 2)
