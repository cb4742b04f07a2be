"""The optimizer: schedule values, AdamW's decay mask, clipping, frozen weights, skipped updates."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from uika_jax.config import load_config
from uika_jax.models.frozen import FrozenParam
from uika_jax.training.optimizer import (
    decay_mask,
    learning_rate_schedule,
    make_optimizer,
    skipped_update_count,
)

PEAK, WARMUP, STEPS, FINAL = 1e-3, 10, 110, 0.1


def _optim(**overrides) -> ml_collections.ConfigDict:
    """A small `optim` block: the default config's, with test-sized steps."""
    optim = load_config("configs/default.py").optim
    optim.update(
        dict(peak_lr=PEAK, warmup_steps=WARMUP, steps=STEPS, final_lr_fraction=FINAL) | overrides
    )
    return optim


class _Net(nnx.Module):
    """Every kind of weight the decay mask tells apart, and a frozen one."""

    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.tokens = nnx.Param(jnp.ones((2, 4)))
        self.stacked_bias = nnx.Dict(bias=nnx.Param(jnp.ones((2, 4))))  # as under nnx.scan
        self.frozen = FrozenParam(jnp.linspace(-1.0, 1.0, 4))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.norm(self.dense(x)) + self.tokens[...].sum(0) + self.stacked_bias["bias"][...][0]
        return y * self.frozen[...]


def _loss(model: _Net) -> jax.Array:
    return jnp.sum(model(jnp.arange(6.0).reshape(2, 3)) ** 2)


def _param_grads(model: _Net) -> nnx.State:
    return nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.Param))(model)


def test_schedule_values_match_warmup_and_cosine():
    schedule = learning_rate_schedule(_optim())
    end = FINAL * PEAK

    def cosine(step):
        progress = (step - WARMUP) / (STEPS - WARMUP)
        return end + (PEAK - end) * 0.5 * (1 + math.cos(math.pi * progress))

    expected = {
        0: 0.0,
        WARMUP // 2: PEAK / 2,
        WARMUP: PEAK,
        (WARMUP + STEPS) // 2: (PEAK + end) / 2,
        37: cosine(37),
        STEPS: end,
        STEPS + 500: end,
    }
    for step, value in expected.items():
        np.testing.assert_allclose(float(schedule(step)), value, rtol=1e-6, atol=1e-12)
    tiny = load_config("configs/tiny.py").optim
    np.testing.assert_allclose(
        float(learning_rate_schedule(tiny)(tiny.warmup_steps)), tiny.peak_lr, rtol=1e-6
    )


@pytest.mark.parametrize(
    "field, value",
    [("warmup_steps", STEPS), ("peak_lr", 0.0), ("final_lr_fraction", 1.5), ("weight_decay", -1.0)],
)
def test_out_of_range_fields_are_named(field, value):
    with pytest.raises(ValueError, match=f"optim.{field}"):
        make_optimizer(_optim(**{field: value}))


def test_decay_mask_keeps_biases_norms_and_tokens_undecayed():
    mask = decay_mask(nnx.state(_Net(nnx.Rngs(0)), nnx.Param))
    flat = {
        "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)): bool(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]
    }
    assert flat == {
        "dense/kernel": True,
        "dense/bias": False,
        "norm/scale": False,
        "norm/bias": False,
        "tokens": False,
        "stacked_bias/bias": False,
    }


def test_adamw_decays_only_kernels():
    model = _Net(nnx.Rngs(0))
    before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(
        model, make_optimizer(_optim(warmup_steps=0, weight_decay=0.5)), wrt=nnx.Param
    )
    # A zero gradient gives a zero Adam step, so only the decay moves a weight.
    optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    after = nnx.state(model, nnx.Param)
    np.testing.assert_allclose(
        after["dense"]["kernel"][...], before["dense"]["kernel"] * (1 - PEAK * 0.5), rtol=1e-6
    )
    np.testing.assert_array_equal(after["dense"]["bias"][...], before["dense"]["bias"])
    np.testing.assert_array_equal(after["norm"]["scale"][...], before["norm"]["scale"])
    np.testing.assert_array_equal(after["tokens"][...], before["tokens"])


@pytest.mark.parametrize("scale", [1e3, 1e-3])
def test_clipping_bounds_what_adam_sees(scale):
    optim = _optim(grad_clip=1.0, b1=0.9)
    tx = make_optimizer(optim)
    params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
    grads = {"w": jnp.full((3, 4), scale), "b": jnp.full(4, -scale)}
    norm = float(optax.tree.norm(grads))
    _, state = tx.update(grads, tx.init(params), params)
    first_moment = state.inner_state[1][0].mu
    # After one step Adam's first moment is (1 - b1) times the clipped gradient.
    np.testing.assert_allclose(
        float(optax.tree.norm(first_moment)), (1 - optim.b1) * min(norm, 1.0), rtol=1e-5
    )


def test_frozen_weights_get_no_state_and_stay_bitwise():
    model = _Net(nnx.Rngs(0))
    frozen_before = np.array(model.frozen[...])
    kernel_before = np.array(model.dense.kernel[...])
    optimizer = nnx.Optimizer(model, make_optimizer(_optim(warmup_steps=0)), wrt=nnx.Param)
    state_paths = jax.tree_util.tree_flatten_with_path(optimizer.opt_state)[0]
    assert state_paths
    assert not any("frozen" in jax.tree_util.keystr(path) for path, _ in state_paths)
    grads = _param_grads(model)
    assert "frozen" not in grads
    optimizer.update(model, grads)
    np.testing.assert_array_equal(model.frozen[...], frozen_before)
    assert not np.array_equal(model.dense.kernel[...], kernel_before)


def test_nonfinite_gradient_skips_update_and_counts():
    model = _Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, make_optimizer(_optim(warmup_steps=0)), wrt=nnx.Param)
    optimizer.update(model, _param_grads(model))
    params_before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    moments_before = jax.tree.map(np.array, optimizer.opt_state.inner_state)
    assert int(skipped_update_count(optimizer.opt_state)) == 0

    grads = _param_grads(model)
    grads["dense"]["bias"][...] = grads["dense"]["bias"][...].at[0].set(jnp.nan)
    optimizer.update(model, grads)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), params_before)
    jax.tree.map(np.testing.assert_array_equal, optimizer.opt_state.inner_state, moments_before)
    assert int(skipped_update_count(optimizer.opt_state)) == 1

    optimizer.update(model, _param_grads(model))
    assert int(skipped_update_count(optimizer.opt_state)) == 1
    assert not np.array_equal(model.dense.kernel[...], params_before["dense"]["kernel"])
