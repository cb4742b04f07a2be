"""One process of `tests/test_multihost.py`: a few steps of the real train step.

The test first generates a small synthetic dataset (`SYNTHETIC`, in the pytest
process), then runs this script once per process (CPU only):

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python tests/multihost_worker.py --data DIR --out OUT.json \
        --coordinator_address 127.0.0.1:PORT --num_processes 2 --process_id I

Without the three distributed flags it is the single-process reference: it reads the
local batches of every one of `--data_processes` pipeline processes itself and puts
them together, so its global batches hold exactly the rows the multi-process run
reads (the pipeline gives each process its own identities).

The computation is the training loop's (`uika_jax.training.loop`): the small network
test config (`network_fixtures.small_config`, LPIPS weight 0, no warm-up), the state
built sharded by `train_state.init_state` over a (data, fsdp, tensor) mesh of every
global device, the global batches of `Pipeline` / `GlobalBatchIterator`, the replicated
`StepAssets` (head model, anchors), and `make_train_step` jitted as the loop jits it
(state donated, the state's shardings as outputs, under `jax.set_mesh`) with a fixed
rasterizer capacity: `--estimator_steps` steps of the estimator stage, `restage` (none
without estimator steps), then `--avatar_steps` steps of the avatar stage. Each process
writes the metrics of every step (global scalars: every process must see the same) to
`--out` as JSON.

Gloo gives a process 30 s (fixed in jax 0.10.2's XLA, not a flag) to find its peers
when a collective first runs: processes that reach it further apart fail with
"Gloo context initialization failed: DEADLINE_EXCEEDED: GetKeyValue() timed out".
So the processes meet at a coordination-service barrier (`distributed.barrier`,
no such limit) once each stage's step is compiled, before it first runs, and the
assets are put on the devices with `jax.make_array_from_callback` (`jax.device_put`
of host values to a multi-process sharding checks with a collective that every
process holds the same value).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

DEFAULT_CACHE = os.path.expanduser("~/.cache/uika_jax/jax_compilation_cache")
"""The compilation cache of the test suite (tests/conftest.py), `UIKA_TEST_CACHE_DIR`."""

SYNTHETIC = dict(
    identities=4, views=3, sequences=1, frames=4, size=32, seed=0, hair=False,
    val_fraction=0.0, test_fraction=0.0,
)  # fmt: skip
"""The test's synthetic dataset (`SynthConfig`): 4 training identities, 3 views of 4 frames."""

CAPACITY = 1024
"""Rasterizer intersection slots a frame (fixed: no calibration; the small model has ~270)."""


def run_config(args: argparse.Namespace):
    """`small_config()` as a run of the worker's steps (LPIPS off, no learning-rate warm-up)."""
    from network_fixtures import small_config

    config = small_config()
    config.loss.lpips = 0.0
    config.optim.batch_size = args.batch_size
    config.optim.steps = args.avatar_steps
    config.optim.warmup_steps = 0
    config.estimator_optim.steps = args.estimator_steps
    config.estimator_optim.warmup_steps = 0
    return config


def share_programs_on_cpu() -> None:
    """Process 0 compiles each program; the others load it (from it or the disk cache).

    jax 0.10.2 on CPU puts a topology fingerprint that differs from process to process
    into the compilation cache key (`jax._src.cache_key._hash_accelerator_config`), so
    with `jax_share_binary_between_hosts` process 1 waits (20 minutes) for a program
    under a key process 0 never writes, and the disk cache, written by process 0 only,
    never serves process 1. Hashing the device kinds instead (jax's own fallback for
    backends without a topology) gives every process the same key.
    """
    import jax
    from jax._src import cache_key

    if hasattr(cache_key, "_hash_accelerator_config") and hasattr(cache_key, "_hash_devices"):
        cache_key._hash_accelerator_config = cache_key._hash_devices
        jax.config.update("jax_share_binary_between_hosts", True)


def log(message: str) -> None:
    """A progress line on stderr (the test shows it when a process fails)."""
    import jax

    print(f"[process {jax.process_index()}] {message}", file=sys.stderr, flush=True)


def replicate(tree, sharding):
    """Host arrays as global arrays of a replicated sharding, without a collective."""
    import jax
    import numpy as np

    def put(x):
        x = np.asarray(x, jax.dtypes.canonicalize_dtype(np.asarray(x).dtype))
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the synthetic dataset folder")
    parser.add_argument("--out", required=True, help="JSON file of this process's metrics")
    parser.add_argument("--coordinator_address", default=None)
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument("--data_processes", type=int, default=2,
                        help="pipeline processes whose rows a single process reads")  # fmt: skip
    parser.add_argument("--estimator_steps", type=int, default=1)
    parser.add_argument("--avatar_steps", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--capacity", type=int, default=CAPACITY)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    from uika_jax.training import distributed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)

    import jax
    import numpy as np
    from absl import flags
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    flags.FLAGS.mark_as_parsed()
    if jax.process_count() > 1:  # process 0 compiles, the others receive its program
        share_programs_on_cpu()
    cache = os.environ.get("UIKA_TEST_CACHE_DIR", DEFAULT_CACHE)
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    from uika_jax.data.global_batches import GlobalBatchIterator
    from uika_jax.data.pipeline import Pipeline
    from uika_jax.models.avatar import UIKA, build_head
    from uika_jax.models.gaussians import mean_anchor_spacing
    from uika_jax.render import RasterConfig
    from uika_jax.sharding import logical_rules, make_mesh
    from uika_jax.training import train_state as ts
    from uika_jax.training.run_data import pipeline_config
    from uika_jax.training.step import StepAssets, make_train_step

    config = run_config(args)
    total = ts.total_steps(config)
    mesh = make_mesh(config.sharding.mesh_shape)
    rules = logical_rules(config)
    replicated = NamedSharding(mesh, PartitionSpec())
    head, anchors = build_head(config)
    spacing = mean_anchor_spacing(np.asarray(anchors.positions))
    seed = int(config.train.seed)

    def make_model() -> UIKA:
        return UIKA.from_config(config, rngs=nnx.Rngs(seed), anchor_spacing=spacing)

    graphdef = nnx.graphdef(nnx.eval_shape(make_model))
    assets = replicate(StepAssets(head, anchors, None), replicated)
    raster = RasterConfig(capacity=args.capacity, warn_on_overflow=False)

    data_config = dataclasses.replace(
        pipeline_config(config, [1.0], total), workers=0, read_threads=0, prefetch_batches=1
    )
    opened = dict(fingerprint=str(head.fingerprint), mesh=mesh, rules=rules)
    if jax.process_count() > 1:
        batches = iter(Pipeline.open([args.data], data_config, **opened))
    else:  # the reference: every pipeline process's rows, read here and put together
        parts = [
            Pipeline.open(
                [args.data], data_config, **opened,
                process_index=p, process_count=args.data_processes,
            ).local_iterator()
            for p in range(args.data_processes)
        ]  # fmt: skip
        together = (
            {k: np.concatenate([b[k] for b in bs]) for k in bs[0]}
            for bs in zip(*parts, strict=True)
        )
        batches = GlobalBatchIterator(together, mesh, rules, args.batch_size, args.batch_size)

    stage = ts.stage_of_step(config, 0)
    state, shardings = ts.init_state(make_model, stage, ts.optimizer_of(config, stage), mesh, rules)
    setup = time.perf_counter() - start
    log(f"set up in {setup:.1f} s")
    steps = []
    with jax.set_mesh(mesh):
        for step in range(total):
            batch = next(batches)
            if 0 < step == ts.stage_range(config, ts.STAGES[0])[1]:  # as loop.py: restage
                stage = ts.stage_of_step(config, step)
                tx = ts.optimizer_of(config, stage)
                state, shardings = ts.restage(state, graphdef, stage, tx, mesh, rules)
            if step == ts.stage_range(config, stage)[0]:
                jitted = jax.jit(
                    make_train_step(config, graphdef, stage, raster, None),
                    donate_argnums=0,
                    out_shardings=(shardings, replicated),
                )
                train_step = jitted.lower(state, batch, assets).compile()
                log(f"{stage} step compiled at {time.perf_counter() - start:.1f} s")
                # Every process has its program: the first collective now comes at once.
                distributed.barrier(f"multihost_worker: {stage} step compiled")
            state, metrics = train_step(state, batch, assets)
            steps.append({"stage": stage, **{k: float(v) for k, v in metrics.items()}})
            log(f"step {step} ({stage}): {steps[-1]} at {time.perf_counter() - start:.1f} s")
    result = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "steps": steps,
        "setup_seconds": setup,
        "seconds": time.perf_counter() - start,
    }
    Path(args.out).write_text(json.dumps(result))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        # Exit at once: a failed process would otherwise wait minutes in the
        # distributed runtime's shutdown for its peers.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
