"""The optimizer: warm-up + cosine learning rate, global-norm clipping, Adam or AdamW.

Built from the `optim` block of a config (configs/default.py):

- `peak_lr`, `warmup_steps`, `steps`, `final_lr_fraction`: the learning rate rises
  linearly from 0 at step 0 to `peak_lr` at `warmup_steps`, then follows a cosine down
  to `final_lr_fraction * peak_lr` at `steps`, and stays there after.
- `b1`, `b2`: Adam's moment decays.
- `grad_clip`: the gradient is rescaled to this global norm when it is longer (None:
  no clipping).
- `weight_decay` (optional, default 0): 0 gives Adam, as the paper trains; above 0,
  AdamW (decoupled decay, multiplied by the learning rate as optax does) applied only
  where `decay_mask` says.

A gradient with a NaN or an infinity skips the whole update: parameters and every
optimizer moment stay as they were, and the skip is counted in the optimizer state
(`skipped_update_count`). The schedule's step counter lives inside Adam's state, so a
skipped update does not advance the learning rate either: the schedule counts applied
updates.

Frozen weights are kept out of the optimizer by their variable type, not by masking:
build the optimizer with `nnx.Optimizer(model, tx, wrt=nnx.Param)`, so a
`FrozenParam` gets no moments, no gradient and no share of the clipping norm.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

DECAYED_LEAF_NAMES = frozenset({"kernel"})
"""Names of the weights that weight decay applies to (dense and convolution kernels)."""

_NEVER_GIVE_UP = int(jnp.iinfo(jnp.int32).max)


def learning_rate_schedule(optim_config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up from 0 to `peak_lr`, then cosine to `final_lr_fraction * peak_lr`.

    optax's `warmup_cosine_decay_schedule` counts the warm-up inside `decay_steps`, so
    `decay_steps = steps` makes the cosine end exactly at step `steps`.

    Args:
      optim_config: the config's `optim` block (`peak_lr`, `warmup_steps`, `steps`,
        `final_lr_fraction`).

    Returns:
      The learning rate as a function of the number of applied updates.

    Raises:
      ValueError: naming the `optim` field out of range.
    """
    peak_lr = float(optim_config.peak_lr)
    warmup_steps = int(optim_config.warmup_steps)
    steps = int(optim_config.steps)
    final_fraction = float(optim_config.final_lr_fraction)
    if not peak_lr > 0:
        raise ValueError(f"optim.peak_lr must be positive, got {peak_lr}")
    if not 0 <= warmup_steps < steps:
        raise ValueError(
            f"optim.warmup_steps must be in [0, optim.steps = {steps}), got {warmup_steps}"
        )
    if not 0 <= final_fraction <= 1:
        raise ValueError(f"optim.final_lr_fraction must be in [0, 1], got {final_fraction}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=warmup_steps,
        decay_steps=steps,
        end_value=final_fraction * peak_lr,
    )


def _leaf_name(path: tuple[Any, ...]) -> str:
    """The innermost string key of a pytree path (skips NNX's trailing `.value`)."""
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.DictKey) and isinstance(entry.key, str):
            return entry.key
    return ""


def decay_mask(params: Any) -> Any:
    """Which parameters AdamW decays: True for kernels of dense and convolution layers.

    A leaf is decayed when its name (the innermost key of its path) is in
    `DECAYED_LEAF_NAMES` and it has at least two dimensions. Everything else is not:
    biases (`bias`), norm scales (`scale`), layer-scale factors (`gamma`), learned
    tokens and position embeddings (`cls_token`, `mask_token`, `registers`, `tokens`,
    `pos_embed`, `pos`). The name decides rather than the number of dimensions
    alone, because blocks under `nnx.scan` stack their weights on a leading layer
    axis, which makes a stacked bias two-dimensional.

    Args:
      params: a pytree of parameters (an `nnx.State` or nested dicts).

    Returns:
      A pytree of the same structure with a bool per leaf.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: _leaf_name(path) in DECAYED_LEAF_NAMES and jnp.ndim(leaf) >= 2,
        params,
    )


def make_optimizer(optim_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Clipping + Adam (or masked AdamW), skipping any update whose gradient is not finite.

    Args:
      optim_config: the config's `optim` block (see the module docstring for its keys;
        `weight_decay` may be absent, meaning 0).

    Returns:
      The gradient transformation; use it as `nnx.Optimizer(model, tx, wrt=nnx.Param)`.

    Raises:
      ValueError: naming the `optim` field out of range.
    """
    schedule = learning_rate_schedule(optim_config)
    weight_decay = float(optim_config.get("weight_decay", 0.0))
    grad_clip = optim_config.grad_clip
    if weight_decay < 0:
        raise ValueError(f"optim.weight_decay must be >= 0, got {weight_decay}")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"optim.grad_clip must be positive or None, got {grad_clip}")
    adam_args = dict(learning_rate=schedule, b1=float(optim_config.b1), b2=float(optim_config.b2))
    if weight_decay > 0:
        adam = optax.adamw(**adam_args, weight_decay=weight_decay, mask=decay_mask)
    else:
        adam = optax.adam(**adam_args)
    clip = [] if grad_clip is None else [optax.clip_by_global_norm(float(grad_clip))]
    return optax.apply_if_finite(optax.chain(*clip, adam), max_consecutive_errors=_NEVER_GIVE_UP)


def skipped_update_count(opt_state: Any) -> jax.Array:
    """How many updates were skipped for a non-finite gradient since initialisation.

    Args:
      opt_state: the state of `make_optimizer`'s transformation, as optax returns it or
        as `nnx.Optimizer.opt_state` holds it.

    Returns:
      An int32 scalar.
    """
    count = opt_state.total_notfinite
    return jnp.asarray(count[...] if isinstance(count, nnx.Variable) else count)
