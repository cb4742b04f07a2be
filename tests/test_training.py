"""The training loop end to end (resume after SIGKILL and SIGTERM, refusals, logs) and the
train step's contracts (non-finite skip, micro-batches, rasterizer overflow)."""

import json
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import training_fixtures as tf
from flax import nnx
from network_fixtures import FAST_COMPILE

from uika_jax import sharding
from uika_jax.models.avatar import UIKA, build_head
from uika_jax.models.gaussians import mean_anchor_spacing
from uika_jax.render import RasterConfig
from uika_jax.training import train_state as ts
from uika_jax.training.checkpointing import META, STATE, CheckpointMismatchError
from uika_jax.training.loop import CHECKPOINT_DIR, train
from uika_jax.training.metrics_log import METRICS_FILE
from uika_jax.training.optimizer import skipped_update_count
from uika_jax.training.run_data import open_pipeline, prepare_sources
from uika_jax.training.step import StepAssets, make_train_step


@pytest.fixture(scope="session")
def trained(tmp_path_factory, worker_id) -> tf.SharedRun:
    return tf.shared_run(tmp_path_factory, worker_id)


@pytest.fixture
def reap():
    """Registers subprocesses to kill if the test ends while they run (a paused one)."""
    started = []
    yield started.append
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def saved_state(workdir, step: int) -> dict:
    """A checkpoint's train state as NumPy arrays by leaf path."""
    path = (workdir / CHECKPOINT_DIR / str(step) / STATE).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path)
        tree = getattr(metadata, "item_metadata", metadata)
        target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
        state = checkpointer.restore(path, target)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def assert_same_state(want_dir, got_dir, step: int) -> None:
    want, got = saved_state(want_dir, step), saved_state(got_dir, step)
    assert want.keys() == got.keys()
    assert any("params" in k for k in want)
    for key in want:
        assert want[key].dtype == got[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def checkpoint_steps(workdir) -> list[int]:
    folder = workdir / CHECKPOINT_DIR
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def metric_lines(workdir) -> list[dict]:
    text = (workdir / METRICS_FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def train_steps(lines) -> list[int]:
    return [line["step"] for line in lines if "grad_norm" in line]


def eval_steps(lines) -> list[int]:
    return [line["step"] for line in lines if "eval/psnr" in line]


# --- the loop, through subprocess runs --------------------------------------------------


def test_sigkill_then_sigterm_after_resuming_matches_an_uninterrupted_run_bitwise(
    trained, tmp_path, reap
):
    """One run stopped twice (one test: a chain of two processes; every step of the shared
    run is checkpointed, so the preempted run is compared at the step where it stopped)."""
    workdir = tmp_path / "run"
    # SIGKILLed while step 3 (the first of the avatar stage) is being saved: its metrics
    # line is written, its checkpoint is not; the newest checkpoint is the stage boundary's.
    process = tf.start_run(trained.data_root, workdir, pause_before_save=3)
    reap(process)
    tf.wait_paused(process, workdir)
    process.send_signal(signal.SIGKILL)
    assert process.wait(60) == -signal.SIGKILL
    assert checkpoint_steps(workdir) == [1, 2]
    assert train_steps(metric_lines(workdir)) == [1, 2, 3]

    # Resumed at the stage boundary (the state re-split for the avatar stage), then
    # SIGTERM arrives while step 3 is being saved: the loop runs step 4, saves it and
    # returns before the end.
    process = tf.start_run(trained.data_root, workdir, pause_before_save=3)
    reap(process)
    tf.wait_paused(process, workdir)
    process.send_signal(signal.SIGTERM)
    result = tf.finish(process, workdir)
    stopped = tf.ESTIMATOR_STEPS + 2
    assert result["preempted"] and result["step"] == stopped < tf.TOTAL_STEPS
    assert checkpoint_steps(workdir) == list(range(1, stopped + 1))
    for step in (tf.ESTIMATOR_STEPS + 1, stopped):
        assert_same_state(trained.workdir, workdir, step)
    lines = metric_lines(workdir)
    # Step 3's line from the killed run is replaced, not repeated; no evaluation on resuming.
    assert train_steps(lines) == list(range(1, stopped + 1))
    assert eval_steps(lines) == [0]
    assert lines == sorted(lines, key=lambda line: line["step"])


# --- the loop's refusals, in process -------------------------------------------------


def in_process_config(trained):
    """The shared run's config on this process's 8 CPU devices (the batch of 2 replicated)."""
    return trained.config(sharding__mesh_shape=(1, 1, -1))


def copy_last_checkpoint(trained, workdir):
    """The shared run's last checkpoint alone in a new workdir."""
    step = str(tf.TOTAL_STEPS)
    shutil.copytree(trained.workdir / CHECKPOINT_DIR / step, workdir / CHECKPOINT_DIR / step)
    return workdir / CHECKPOINT_DIR / step


def test_train_refuses_a_checkpoint_of_another_head_model(trained, tmp_path):
    checkpoint = copy_last_checkpoint(trained, tmp_path)
    meta_file = checkpoint / META / "metadata"  # orbax's JSON item
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    ours = meta["fingerprint"]
    meta["fingerprint"] = "flame:other-head:01"
    meta_file.write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(CheckpointMismatchError) as error:
        train(in_process_config(trained), tmp_path)
    assert "flame:other-head:01" in str(error.value) and ours in str(error.value)


def test_train_refuses_a_checkpoint_of_other_shapes(trained, tmp_path):
    copy_last_checkpoint(trained, tmp_path)
    config = in_process_config(trained)
    config.model.decoder.mlp_hidden = 24  # 16 in the checkpoint
    leaf = r"'[^']*decoder/[^']*kernel[^']*' is \(16, \d+\) float32 in the checkpoint but \(24,"
    with pytest.raises(CheckpointMismatchError, match=leaf):
        train(config, tmp_path)


# --- the fixture run's logs -----------------------------------------------------------


def test_the_run_logs_every_step_both_stages_and_evaluations(trained):
    assert trained.result["step"] == tf.TOTAL_STEPS and not trained.result["preempted"]
    lines = metric_lines(trained.workdir)
    assert train_steps(lines) == list(range(1, tf.TOTAL_STEPS + 1))
    by_step = {line["step"]: line for line in lines if "grad_norm" in line}
    for step, line in by_step.items():
        if step <= tf.ESTIMATOR_STEPS:
            assert line["stage"] == 0 and {"uv_l1", "mask_bce"} <= line.keys(), line
            assert "l1" not in line
        else:
            assert line["stage"] == 1 and {"l1", "ssim", "reg", "loss"} <= line.keys(), line
            assert line["raster/overflow_frames"] == 0 and line["raster/isects"] > 0
        assert np.isfinite(line["grad_norm"]) and line["skipped_updates"] == 0
    assert eval_steps(lines) == [0, tf.TOTAL_STEPS]
    for line in lines:
        if "eval/psnr" in line:
            for key in ("eval/psnr", "eval/ssim", "eval/psnr_other_sources"):
                assert np.isfinite(line[key]), line
    assert trained.result["last_eval"]["eval/psnr"] == lines[-1]["eval/psnr"]
    config = json.loads((trained.workdir / "config.json").read_text(encoding="utf-8"))
    assert config["optim"]["steps"] == tf.AVATAR_STEPS
    grids = sorted(p.name for p in (trained.workdir / "images").glob("eval_grid_*.png"))
    assert len(grids) == 2, grids
    assert checkpoint_steps(trained.workdir) == list(range(1, tf.TOTAL_STEPS + 1))


# --- the train step, jitted alone ----------------------------------------------------

TINY_CAPACITY = 64
"""Intersection slots a frame: far fewer than the small model's ~270 (overflows)."""


@pytest.fixture(scope="module")
def step_setup(trained):
    """(config, a model, a host batch, assets) on one device, no learning-rate warmup."""
    config = trained.config(optim__warmup_steps=0, estimator_optim__warmup_steps=0)
    head, anchors = build_head(config)
    spacing = mean_anchor_spacing(np.asarray(anchors.positions))
    model = UIKA.from_config(config, rngs=nnx.Rngs(0), anchor_spacing=spacing)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    paths, weights = prepare_sources(config)
    pipeline = open_pipeline(
        config, paths, weights, fingerprint=str(head.fingerprint), mesh=mesh,
        rules=sharding.logical_rules(config), num_steps=1,
    )  # fmt: skip
    batch = jax.device_get(dict(next(iter(pipeline))))
    return config, model, batch, StepAssets(head, anchors)


def fresh_state(step_setup, stage: str) -> ts.TrainState:
    """A new state of `stage` at the stage's first step."""
    config, model, _, _ = step_setup
    first = ts.stage_range(config, stage)[0]
    return ts.state_from_model(model, stage, ts.optimizer_of(config, stage), first)


_COMPILED: dict = {}
"""Jitted steps by (stage, micro-batches), shared by the tests of one process."""


def compiled_step(step_setup, stage: str, micro: int):
    """The jitted step of `stage` with `micro` micro-batches and a tiny rasterizer capacity."""
    if (stage, micro) in _COMPILED:
        return _COMPILED[stage, micro]
    config, model, _, _ = step_setup
    config = config.copy_and_resolve_references()
    ts.stage_optim(config, stage).micro_batches = micro
    raster = RasterConfig(capacity=TINY_CAPACITY, warn_on_overflow=False)
    step = make_train_step(config, nnx.graphdef(model), stage, raster)
    _COMPILED[stage, micro] = jax.jit(step, compiler_options=FAST_COMPILE)
    return _COMPILED[stage, micro]


def test_step_skips_a_non_finite_batch_and_counts_overflow(step_setup):
    _, _, batch, assets = step_setup
    avatar = ts.STAGES[1]
    state = fresh_state(step_setup, avatar)
    step = compiled_step(step_setup, avatar, 1)
    after, metrics = step(state, batch, assets)
    metrics = jax.device_get(metrics)
    # A finite batch updates, and the tiny capacity overflows in every frame.
    assert metrics["skipped_updates"] == 0 and np.isfinite(metrics["loss"])
    assert metrics["raster/isects"] > TINY_CAPACITY and metrics["raster/dropped"] > 0
    assert metrics["raster/overflow_frames"] == np.prod(batch["target_image"].shape[:2])
    assert metrics["raster/overflow_steps"] == 1 == int(after.overflow_steps)
    assert int(after.step) == int(state.step) + 1
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, after.params)
    assert sum(jax.tree.leaves(changed)) > len(jax.tree.leaves(changed)) // 2

    bad = {**batch, "target_image": np.full_like(batch["target_image"], np.nan)}
    skipped, metrics = step(after, bad, assets)
    metrics = jax.device_get(metrics)
    assert np.isnan(metrics["loss"])
    assert metrics["skipped_updates"] == 1 == int(skipped_update_count(skipped.opt_state))
    assert int(skipped.step) == int(after.step) + 1
    for want, got in (
        (after.params, skipped.params),
        (after.opt_state.inner_state, skipped.opt_state.inner_state),  # moments, count
    ):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(want), jax.device_get(got))
    assert metrics["raster/overflow_steps"] == 2 == int(skipped.overflow_steps)


@pytest.mark.parametrize("stage", ts.STAGES)
def test_two_micro_batches_update_like_one_batch(step_setup, stage):
    """Two half batches accumulate the whole batch's update.

    The avatar losses are plain means; the estimator's divide by pixel counts, taken
    from the whole batch (`losses.correspondence_counts`), not from each half.
    """
    _, _, batch, assets = step_setup
    state = fresh_state(step_setup, stage)
    one, metrics_one = jax.device_get(compiled_step(step_setup, stage, 1)(state, batch, assets))
    two, metrics_two = jax.device_get(compiled_step(step_setup, stage, 2)(state, batch, assets))
    terms = ("l1", "ssim", "reg") if stage == "avatar" else ("uv_l1", "mask_bce")
    for key in ("loss", *terms, "grad_norm"):
        np.testing.assert_allclose(metrics_two[key], metrics_one[key], rtol=1e-5, err_msg=key)
    # Maxima and counts over the whole batch, not means of the micro-batches'.
    for key in ("raster/isects", "raster/dropped", "raster/overflow_frames"):
        assert metrics_two.get(key) == metrics_one.get(key), key
    # The first moment after one step is (1 - b1) times the clipped mean gradient.
    mu_one = jax.tree.leaves(optax.tree_utils.tree_get(one.opt_state, "mu"))
    mu_two = jax.tree.leaves(optax.tree_utils.tree_get(two.opt_state, "mu"))
    scale = max(float(np.abs(m).max()) for m in mu_one)
    for a, b in zip(mu_one, mu_two, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * scale)
    # Adam's first step moves a weight by about the learning rate whatever its gradient,
    # so a gradient near 0 may turn either way: 1% of the learning rate is allowed.
    atol = 0.01 * float(ts.stage_optim(step_setup[0], stage).peak_lr)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=atol)
