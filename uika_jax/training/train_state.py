"""The train state: the two stages, what each trains, and building the state sharded.

Training runs two stages in one step count (the staging is assumed: the paper does not
say how its correspondence estimator was trained):

    estimator  steps [0, estimator_optim.steps)      the correspondence estimator alone,
                                                     on ground-truth UV maps and masks
    avatar     the next optim.steps steps            everything else, the estimator frozen

A stage trains the `nnx.Param` weights its filter selects (`trainable_filter`: inside
`correspondence` for the estimator stage, outside it for the avatar stage; with a shared
backbone the ViT lives at `correspondence.vit`, so the avatar stage keeps it frozen, as
the paper keeps its pretrained ViT). `FrozenParam` weights are never trained.

`TrainState` is a pytree: the global step, the trained weights (`params`), every other
variable (`rest`), the optimizer state of `params`, and the count of steps whose
rasterizer overflowed. Its shardings follow the config's logical axis rules
(`uika_jax.sharding.state_shardings`); the optimizer moments take their parameter's
sharding (`optax.tree_map_params`), and scalars are replicated. `init_state` builds the
state inside `jax.jit` with those output shardings, so no device ever holds a whole
sharded weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from uika_jax import sharding
from uika_jax.models.avatar import UIKA
from uika_jax.training.optimizer import make_optimizer

STAGES = ("estimator", "avatar")
"""The training stages, in order."""

ESTIMATOR_SCOPE = "correspondence"
"""The module attribute holding the correspondence estimator (and the shared ViT)."""


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes (a pytree; checkpointed whole).

    Attributes:
      step: the global step (both stages), int32.
      params: the weights this stage trains (`nnx.State`).
      rest: every other variable of the model (`nnx.State`).
      opt_state: the optimizer state of `params`.
      overflow_steps: steps whose rasterizer dropped intersections or tiles, int32.
    """

    step: jax.Array
    params: nnx.State
    rest: nnx.State
    opt_state: Any
    overflow_steps: jax.Array


def total_steps(config: ml_collections.ConfigDict) -> int:
    """Steps of both stages."""
    return int(config.estimator_optim.steps) + int(config.optim.steps)


def stage_of_step(config: ml_collections.ConfigDict, step: int) -> str:
    """The stage that step `step` (0-based, global) belongs to."""
    return STAGES[0] if step < int(config.estimator_optim.steps) else STAGES[1]


def stage_range(config: ml_collections.ConfigDict, stage: str) -> tuple[int, int]:
    """(first step, one past the last step) of a stage."""
    first = int(config.estimator_optim.steps)
    return (0, first) if _check_stage(stage) == STAGES[0] else (first, total_steps(config))


def stage_optim(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    """The optimizer block of a stage (`estimator_optim` or `optim`)."""
    return config.estimator_optim if _check_stage(stage) == STAGES[0] else config.optim


def _check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
    return stage


def trainable_filter(stage: str) -> nnx.filterlib.Filter:
    """The `nnx` filter of the weights a stage trains (module docstring)."""
    inside = nnx.PathContains(ESTIMATOR_SCOPE)
    if _check_stage(stage) == STAGES[0]:
        return nnx.All(nnx.Param, inside)
    return nnx.All(nnx.Param, nnx.Not(inside))


def split_model(model: UIKA, stage: str) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, the stage's trained weights, everything else)."""
    return nnx.split(model, trainable_filter(stage), ...)


def optimizer_of(config: ml_collections.ConfigDict, stage: str) -> optax.GradientTransformation:
    """The stage's gradient transformation (`uika_jax.training.optimizer.make_optimizer`)."""
    return make_optimizer(stage_optim(config, stage))


def state_from_model(
    model: UIKA, stage: str, tx: optax.GradientTransformation, step: jax.Array | int = 0
) -> TrainState:
    """A fresh state of `stage` for `model`'s current weights (a new optimizer state)."""
    _, params, rest = split_model(model, stage)
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        rest=rest,
        opt_state=tx.init(params),
        overflow_steps=jnp.zeros((), jnp.int32),
    )


def train_state_shardings(
    state: TrainState,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules,
) -> TrainState:
    """The `NamedSharding` of every leaf of a (possibly abstract) state (module docstring)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = sharding.state_shardings(state.params, mesh, rules)
    opt_state = optax.tree_map_params(
        tx,
        lambda _, shard: shard,
        state.opt_state,
        params,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return TrainState(
        step=replicated,
        params=params,
        rest=sharding.state_shardings(state.rest, mesh, rules),
        opt_state=opt_state,
        overflow_steps=replicated,
    )


def init_state(
    make_model: Callable[[], UIKA],
    stage: str,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules,
    *,
    step: int = 0,
) -> tuple[TrainState, TrainState]:
    """Builds a fresh state sharded on `mesh` (inside jit: nothing is replicated first).

    Args:
      make_model: builds the randomly initialised model (deterministic).
      stage: the stage whose weights are trained.
      tx: the stage's optimizer.
      mesh: the device mesh.
      rules: the config's logical axis rules.
      step: the state's step.

    Returns:
      (state, its shardings).
    """

    def make() -> TrainState:
        return state_from_model(make_model(), stage, tx, step)

    shardings = train_state_shardings(jax.eval_shape(make), tx, mesh, rules)
    with jax.set_mesh(mesh):
        state = jax.jit(make, out_shardings=shardings)()
    return state, shardings


def restage(
    state: TrainState,
    graphdef: nnx.GraphDef,
    stage: str,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules,
) -> tuple[TrainState, TrainState]:
    """The state re-split for `stage` (same weights, same step, a fresh optimizer state).

    Returns:
      (state, its shardings).
    """

    def move(state: TrainState) -> TrainState:
        model = nnx.merge(graphdef, state.params, state.rest)
        moved = state_from_model(model, stage, tx, state.step)
        return moved.replace(overflow_steps=state.overflow_steps)

    shardings = train_state_shardings(jax.eval_shape(move, state), tx, mesh, rules)
    with jax.set_mesh(mesh):
        moved = jax.jit(move, out_shardings=shardings)(state)
    return moved, shardings


def abstract_state(
    make_model: Callable[[], UIKA], stage: str, tx: optax.GradientTransformation
) -> TrainState:
    """The state's shapes and dtypes (`jax.eval_shape`; nothing allocated)."""
    return jax.eval_shape(lambda: state_from_model(make_model(), stage, tx))
