"""Checkpoints: bitwise round trip, keep-N, resharding 8 -> 4 devices, refusals, data, SIGTERM."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from data_fixtures import tiny_index, write_tiny_dataset
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from uika_jax.data.pipeline import Pipeline, PipelineConfig
from uika_jax.data.sources import FolderSource
from uika_jax.sharding import make_mesh
from uika_jax.training.checkpointing import (
    Checkpointer,
    CheckpointMismatchError,
    PreemptionFlag,
    abstract_like,
)

FINGERPRINT = "synthetic:test:00"
CONFIG = {"optim": {"learning_rate": 1e-3, "batch_size": 8}, "name": "tiny"}


def make_state(seed: int, width: int = 16) -> dict:
    """An NNX model's parameters, its Adam state (one step taken) and a step counter."""
    model = nnx.Linear(8, width, rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5 + seed), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return {
        "params": optax.apply_updates(params, updates),
        "opt": opt_state,
        "step": jnp.int32(seed),
    }


def mesh_of(count: int) -> jax.sharding.Mesh:
    return jax.make_mesh(
        (count,), ("x",), axis_types=(AxisType.Auto,), devices=jax.devices()[:count]
    )


def shard_rows(state, mesh):
    """Each leaf split over its leading axis where it divides the mesh, else replicated."""

    def sharding(leaf):
        split = leaf.ndim and leaf.shape[0] % mesh.size == 0
        return NamedSharding(mesh, P("x") if split else P())

    return jax.tree.map(sharding, state)


def assert_bitwise_equal(want, got):
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), want, got
    )
    assert jax.tree.structure(want) == jax.tree.structure(got)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Steps 1..4 saved on an 8-device mesh, keeping 2; the states by step."""
    directory = tmp_path_factory.mktemp("ckpt")
    mesh = mesh_of(8)
    states = {}
    with Checkpointer(directory, fingerprint=FINGERPRINT, max_to_keep=2) as checkpointer:
        for step in range(1, 5):
            state = make_state(step)
            states[step] = jax.device_put(state, shard_rows(state, mesh))
            checkpointer.save(step, states[step], config={**CONFIG, "step_saved": step})
        checkpointer.wait_until_finished()
    return directory, states


def test_round_trip_is_bitwise_and_keeps_the_newest_steps(saved):
    directory, states = saved
    (directory / "5.orbax-checkpoint-tmp-0").mkdir()  # a save killed before its rename
    with Checkpointer(directory, fingerprint=FINGERPRINT, max_to_keep=2) as checkpointer:
        assert checkpointer.latest_step() == 4
        assert checkpointer.all_steps() == [3, 4]
        assert sorted(p.name for p in directory.iterdir() if p.name.isdigit()) == ["3", "4"]
        target = abstract_like(states[4], jax.tree.map(lambda a: a.sharding, states[4]))
        restored = checkpointer.restore(target)
        older = checkpointer.restore(target, step=3)
        with pytest.raises(FileNotFoundError, match="no checkpoint 1"):
            checkpointer.restore(target, step=1)
    assert restored.step == 4 and restored.config == {**CONFIG, "step_saved": 4}
    assert_bitwise_equal(states[4], restored.state)
    assert_bitwise_equal(states[3], older.state)
    assert isinstance(restored.state["params"], nnx.State)
    assert isinstance(restored.state["opt"][0], optax.ScaleByAdamState)


def test_a_checkpoint_of_8_devices_restores_resharded_onto_4(saved):
    directory, states = saved
    mesh4 = mesh_of(4)
    shardings = shard_rows(states[4], mesh4)
    with Checkpointer(directory, fingerprint=FINGERPRINT) as checkpointer:
        restored = checkpointer.restore(abstract_like(states[4], shardings)).state
    kernel = restored["params"]["kernel"][...]
    assert kernel.sharding == NamedSharding(mesh4, P("x"))
    assert {d.id for d in kernel.sharding.device_set} == {d.id for d in jax.devices()[:4]}
    assert [s.data.shape for s in kernel.addressable_shards] == [(2, 16)] * 4
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding == sharding
    assert_bitwise_equal(states[4], restored)


def test_another_head_model_or_other_shapes_are_refused_saying_which(saved):
    directory, states = saved
    target = jax.eval_shape(lambda: states[4])
    wider = jax.eval_shape(lambda: make_state(0, width=24))
    cases = [
        ("flame:2023:open", target, r"'synthetic:test:00', but this run uses 'flame:2023:open'"),
        (
            FINGERPRINT,
            wider,
            r"'opt/0/mu/bias/value' is \(16,\) float32 in the checkpoint "
            r"but \(24,\) float32 in the target",
        ),
        (
            FINGERPRINT,
            {k: v for k, v in target.items() if k != "step"},
            r"has 'step', which the target lacks",
        ),
        (
            FINGERPRINT,
            {**target, "step": jax.ShapeDtypeStruct((), jnp.float32)},
            r"'step' is \(\) int32 in the checkpoint but \(\) float32",
        ),
    ]
    for fingerprint, wrong_target, message in cases:
        checkpointer = Checkpointer(directory, fingerprint=fingerprint)
        with checkpointer, pytest.raises(CheckpointMismatchError, match=message):
            checkpointer.restore(wrong_target)


def test_the_data_iterator_resumes_with_the_uninterrupted_batches(tmp_path):
    root = tmp_path / "tiny"
    write_tiny_dataset(root, tiny_index(subjects=("a", "b", "c", "d", "e"), frames=3))
    config = PipelineConfig(
        image_size=16, num_drive=1, global_batch_size=8, buckets=(1, 2), read_threads=0
    )
    mesh = make_mesh((-1, 1, 1))
    source = FolderSource(root)

    def take(iterator, steps):
        return [jax.tree.map(np.asarray, next(iterator)) for _ in range(steps)]

    uninterrupted = take(iter(Pipeline([source], config, mesh=mesh)), 4)
    iterator = iter(Pipeline([source], config, mesh=mesh))
    take(iterator, 2)
    state = make_state(2)
    with Checkpointer(tmp_path / "ckpt", fingerprint=FINGERPRINT) as checkpointer:
        checkpointer.save(2, state, config=CONFIG, data_iterator=iterator)
        checkpointer.wait_until_finished()
        fresh = iter(Pipeline([source], config, mesh=mesh))
        restored = checkpointer.restore(jax.eval_shape(lambda: state), data_iterator=fresh)
    assert restored.step == 2
    for want, got in zip(uninterrupted[2:], take(fresh, 2), strict=True):
        jax.tree.map(np.testing.assert_array_equal, want, got)


def test_sigterm_sets_the_preemption_flag_and_the_old_handler_returns():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionFlag() as preempted:
        assert not preempted
        os.kill(os.getpid(), signal.SIGTERM)
        assert preempted.wait(5.0)
        assert preempted and preempted.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
