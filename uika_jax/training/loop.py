"""The training loop: `train(config, workdir)` runs (or resumes) a whole run.

In order:

1. the mesh and logical rules (`config.sharding`), the head model and its anchors,
   the data sources (the synthetic dataset is generated when missing: `run_data`);
2. the state: restored from the newest checkpoint in `workdir/checkpoints` (state,
   data iterator position; refused with a message if it belongs to another head model
   or other shapes), else built fresh, sharded, with the ViT's pretrained weights when
   the config names them;
3. the rasterizer's capacity (`raster_budget`) and the LPIPS weights, once;
4. steps: the estimator stage, then the avatar stage (`train_state`); at the stage
   boundary the state is re-split and gets a fresh optimizer (before the checkpoint of
   that step is written, so a checkpoint's step says its stage);
5. on process 0: metrics every `train.log_every` steps (`metrics.jsonl`, TensorBoard,
   progress bar with steps/s, ETA and data wait), the periodic evaluation at step 0,
   every `eval.every` steps and at the end (`periodic_eval`), an image grid (sources |
   prediction | ground truth) with each evaluation;
6. a checkpoint every `train.checkpoint_every` steps and at the end. SIGTERM (a
   preemption) makes the loop save the current step, wait for the write and return.

Everything the run depends on is in the config and the checkpoint, so a run killed at
any point and restarted with the same command continues with the same batches and
reaches bitwise the same weights (on CPU) as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from uika_jax import sharding
from uika_jax.models.avatar import UIKA, build_head
from uika_jax.models.gaussians import mean_anchor_spacing
from uika_jax.training import train_state as ts
from uika_jax.training.checkpointing import Checkpointer, PreemptionFlag, abstract_like
from uika_jax.training.losses import load_lpips
from uika_jax.training.metrics_log import MetricsLogger, image_grid
from uika_jax.training.periodic_eval import EvalSet, Evaluator
from uika_jax.training.raster_budget import raster_config
from uika_jax.training.run_data import open_pipeline, prepare_sources
from uika_jax.training.step import StepAssets, make_train_step

CHECKPOINT_DIR = "checkpoints"
"""The checkpoints' folder inside the workdir."""


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What `train` ended with.

    Attributes:
      step: the last step run (the checkpoint's).
      preempted: the run stopped early on SIGTERM.
      last_metrics: the last logged training metrics.
      last_eval: the last evaluation's metrics (empty if none ran).
    """

    step: int
    preempted: bool
    last_metrics: dict[str, float]
    last_eval: dict[str, float]


def _make_model_fn(config: ml_collections.ConfigDict, spacing: float):
    seed = int(config.train.seed)
    return lambda: UIKA.from_config(config, rngs=nnx.Rngs(seed), anchor_spacing=spacing)


def _load_backbone(state: ts.TrainState, graphdef: nnx.GraphDef, path: str, stage: str, tx):
    """The state with the pretrained ViT weights of `path` in it (same shardings)."""
    model = nnx.merge(graphdef, state.params, state.rest)
    model.load_backbone(path)
    fresh = ts.state_from_model(model, stage, tx, state.step)
    return jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), fresh, state)


def _fetch(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


class _Run:
    """The state of one `train` call (module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: Path):
        self.config = config
        self.workdir = workdir
        self.mesh = sharding.make_mesh(config.sharding.mesh_shape)
        self.rules = sharding.logical_rules(config)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.head, self.anchors = build_head(config)
        self.fingerprint = str(self.head.fingerprint)
        spacing = mean_anchor_spacing(np.asarray(self.anchors.positions))
        self.make_model = _make_model_fn(config, spacing)
        self.graphdef = nnx.graphdef(nnx.eval_shape(self.make_model))
        self.total = ts.total_steps(config)
        self.paths, self.weights = prepare_sources(config)
        self.pipeline = open_pipeline(
            config, self.paths, self.weights, fingerprint=self.fingerprint, mesh=self.mesh,
            rules=self.rules, num_steps=self.total,
        )  # fmt: skip
        need_lpips = float(config.loss.lpips) > 0 or bool(config.eval.lpips)
        self.lpips_fn, lpips_params = load_lpips() if need_lpips else (None, None)
        self.assets = jax.device_put(
            StepAssets(self.head, self.anchors, lpips_params), self.replicated
        )

    def initial_state(self, checkpointer: Checkpointer, iterator) -> tuple[ts.TrainState, Any]:
        """The restored state (moving `iterator` to its position) or a fresh one."""
        latest = checkpointer.latest_step()
        step = 0 if latest is None else latest
        stage = ts.stage_of_step(self.config, min(step, self.total - 1))
        tx = ts.optimizer_of(self.config, stage)
        if latest is not None:
            abstract = ts.abstract_state(self.make_model, stage, tx)
            shardings = ts.train_state_shardings(abstract, tx, self.mesh, self.rules)
            restored = checkpointer.restore(
                abstract_like(abstract, shardings), data_iterator=iterator
            )
            logging.info("resumed from %s at step %d", checkpointer.directory, restored.step)
            return restored.state, shardings
        state, shardings = ts.init_state(self.make_model, stage, tx, self.mesh, self.rules)
        weights = self.config.model.vit.weights
        if weights:
            state = _load_backbone(state, self.graphdef, weights, stage, tx)
        return state, shardings

    def compiled_step(self, stage: str, shardings: ts.TrainState, raster):
        step = make_train_step(self.config, self.graphdef, stage, raster, self.lpips_fn)
        return jax.jit(step, donate_argnums=0, out_shardings=(shardings, self.replicated))


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> RunResult:
    """Trains (or resumes) the run of `config` in `workdir` (module docstring).

    Args:
      config: the full config (configs/default.py's keys).
      workdir: the run's folder: checkpoints, metrics.jsonl, config.json, TensorBoard
        events, images.

    Returns:
      The `RunResult`.
    """
    workdir = Path(workdir)
    run = _Run(config, workdir)
    c = config.train
    iterator = iter(run.pipeline)
    with (
        Checkpointer(
            workdir / CHECKPOINT_DIR, fingerprint=run.fingerprint,
            max_to_keep=int(c.keep_checkpoints),
        ) as checkpointer,
        PreemptionFlag() as preempted,
    ):  # fmt: skip
        state, shardings = run.initial_state(checkpointer, iterator)
        step = int(state.step)
        restored = checkpointer.latest_step()
        with MetricsLogger(
            workdir, config.to_dict(), total_steps=run.total, restored_step=restored
        ) as logger:
            return _steps(run, state, shardings, step, iterator, checkpointer, preempted, logger)


def _steps(run, state, shardings, step, iterator, checkpointer, preempted, logger) -> RunResult:
    config, c = run.config, run.config.train
    total = run.total
    last_metrics: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    if step >= total:
        return RunResult(step, False, last_metrics, last_eval)
    first_batch = next(iterator)
    raster = raster_config(config, run.head, run.anchors, first_batch)
    eval_set = EvalSet.build(run.pipeline.sources[0], config)
    evaluator = Evaluator(
        eval_set, config, run.graphdef, run.assets, raster, run.mesh, run.rules, run.lpips_fn
    )
    logging.info("periodic evaluation on validation identities %s", eval_set.subjects)

    def evaluate(step: int) -> dict[str, float]:
        metrics, pictures = evaluator(state.params, state.rest)
        logger.write_scalars(step, metrics)
        logger.write_image_grid(step, "eval/grid", image_grid(**pictures))
        logging.info("step %d: %s", step, {k: round(v, 3) for k, v in metrics.items()})
        return metrics

    if step == 0:
        last_eval = evaluate(0)
    stage = ts.stage_of_step(config, step)
    train_step = run.compiled_step(stage, shardings, raster)
    batch = first_batch
    was_preempted = False
    with jax.set_mesh(run.mesh):
        while step < total:
            started = time.perf_counter()
            if batch is None:
                batch = next(iterator)
            waited = time.perf_counter() - started
            state, metrics = train_step(state, batch, run.assets)
            jax.block_until_ready(metrics)  # the step's time, not its dispatch
            batch = None
            step += 1
            if step == ts.stage_range(config, ts.STAGES[0])[1] and step < total:
                stage = ts.stage_of_step(config, step)
                tx = ts.optimizer_of(config, stage)
                state, shardings = ts.restage(state, run.graphdef, stage, tx, run.mesh, run.rules)
                train_step = run.compiled_step(stage, shardings, raster)
            if step % int(c.log_every) == 0 or step == total:
                last_metrics = _fetch(metrics)
                last_metrics["stage"] = float(ts.STAGES.index(ts.stage_of_step(config, step - 1)))
                logger.write_scalars(step, last_metrics)
                if last_metrics.get("raster/overflow_frames", 0) > 0:
                    logging.warning(
                        "step %d: the rasterizer overflowed in %d frames (%d intersections "
                        "dropped); raise render.capacity or render.capacity_headroom", step,
                        last_metrics["raster/overflow_frames"], last_metrics["raster/dropped"],
                    )  # fmt: skip
            logger.report_step(step, waited, time.perf_counter() - started)
            if step % int(config.eval.every) == 0 or step == total:
                last_eval = evaluate(step)
            was_preempted = bool(preempted)
            if step % int(c.checkpoint_every) == 0 or step == total or was_preempted:
                checkpointer.save(step, state, config=config.to_dict(), data_iterator=iterator)
            if was_preempted:
                logging.warning("SIGTERM: saved step %d, stopping", step)
                break
    checkpointer.wait_until_finished()
    return RunResult(step, was_preempted, last_metrics, last_eval)
