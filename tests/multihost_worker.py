"""One process of `tests/test_multihost.py`: a few sharded SGD steps of the tiny UIKA.

The test first writes the initial weights, the head model and its anchors once
(`save_initial_state`, in the pytest process), then runs this script once per process
(CPU only):

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python tests/multihost_worker.py --init INIT --data DIR --out OUT.json \
        --coordinator_address 127.0.0.1:PORT --num_processes 2 --process_id I

Without the three distributed flags it is the single-process reference: it reads the
local batches of every one of `--data_processes` pipeline processes itself and puts
them together, so its global batches hold exactly the rows the multi-process run
reads (the pipeline gives each process its own identities).

The computation, a stand-in for the real train step: the tiny config's UIKA, its state
sharded over a (data, fsdp, tensor) mesh of every global device, the global batches
of `Pipeline` / `GlobalBatchIterator`, and per step a jitted loss (the predicted
Gaussians' colours against the mean colour of the sample's target heads, plus the
offset regulariser) and a plain SGD update. Each process writes the losses it saw
(global scalars: every process must see the same) to `--out` as JSON.

Gloo gives a process 30 s (fixed in jax 0.10.2's XLA, not a flag) to find its peers
when a collective first runs: processes that reach it further apart fail with
"Gloo context initialization failed: DEADLINE_EXCEEDED: GetKeyValue() timed out".
So the processes meet at a coordination-service barrier (`distributed.barrier`,
no such limit) before the first collective, and the state is put on the devices with
`jax.make_array_from_callback` (`jax.device_put` of host values to a multi-process
sharding checks with a collective that every process holds the same value).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "tiny.py"
DEFAULT_CACHE = os.path.expanduser("~/.cache/uika_jax/jax_compilation_cache")
"""The compilation cache of the test suite (tests/conftest.py), `UIKA_TEST_CACHE_DIR`."""


def make_model(uika, config, anchors):
    """The tiny UIKA (with the anchors' spacing where this version of the model takes it)."""
    import inspect

    import numpy as np
    from flax import nnx

    from uika_jax.models.gaussians import mean_anchor_spacing

    kwargs = {}
    if "anchor_spacing" in inspect.signature(uika.from_config).parameters:
        kwargs["anchor_spacing"] = mean_anchor_spacing(np.asarray(anchors.positions))
    return uika.from_config(config, rngs=nnx.Rngs(0), **kwargs)


def save_initial_state(out: Path) -> None:
    """Writes the tiny UIKA's initial weights, the head model and its anchors under `out`."""
    import jax
    import numpy as np
    from flax import nnx

    from uika_jax.config import load_config
    from uika_jax.models.avatar import UIKA, build_head

    config = load_config(CONFIG)
    head, anchors = build_head(config)
    state = nnx.state(make_model(UIKA, config, anchors))
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "state.npz", *[np.asarray(x) for x in jax.tree.leaves(state)])
    (out / "head.pkl").write_bytes(pickle.dumps((head, anchors)))


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", required=True, help="folder of save_initial_state")
    parser.add_argument("--data", required=True, help="the tiny dataset folder")
    parser.add_argument("--out", required=True, help="JSON file of this process's losses")
    parser.add_argument("--coordinator_address", default=None)
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument("--data_processes", type=int, default=2,
                        help="pipeline processes whose rows a single process reads")  # fmt: skip
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=0.5)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    from uika_jax.training import distributed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    if jax.process_count() > 1:  # process 0 compiles, the others receive its program
        share_programs_on_cpu()
    cache = os.environ.get("UIKA_TEST_CACHE_DIR", DEFAULT_CACHE)
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    from uika_jax.config import load_config
    from uika_jax.data.global_batches import GlobalBatchIterator
    from uika_jax.data.pipeline import Pipeline, PipelineConfig
    from uika_jax.models.avatar import UIKA
    from uika_jax.sharding import logical_rules, make_mesh, state_shardings
    from uika_jax.training.losses import offset_regularizer

    config = load_config(CONFIG)
    mesh = make_mesh(config.sharding.mesh_shape)
    rules = logical_rules(config)
    pipeline_config = PipelineConfig(
        image_size=config.model.image_size,
        num_drive=config.model.num_drive,
        global_batch_size=args.batch_size,
        buckets=(1,),  # one shape: one compilation
        read_threads=0,
        prefetch_batches=1,
    )
    if jax.process_count() > 1:
        batches = iter(Pipeline.open([args.data], pipeline_config, mesh=mesh, rules=rules))
    else:  # the reference: every pipeline process's rows, read here and put together
        parts = [
            Pipeline.open(
                [args.data], pipeline_config, mesh=mesh, rules=rules,
                process_index=p, process_count=args.data_processes,
            ).local_iterator()
            for p in range(args.data_processes)
        ]  # fmt: skip
        together = (
            {k: np.concatenate([b[k] for b in bs]) for k in bs[0]}
            for bs in zip(*parts, strict=True)
        )
        batches = GlobalBatchIterator(together, mesh, rules, args.batch_size, args.batch_size)

    init = Path(args.init)
    _, anchors = pickle.loads((init / "head.pkl").read_bytes())
    anchors = jax.tree.map(jnp.asarray, anchors)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: make_model(UIKA, config, anchors)))
    with np.load(init / "state.npz") as stored:
        leaves = [stored[f"arr_{i}"] for i in range(len(stored.files))]
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.tree.unflatten(
        jax.tree.structure(abstract),
        [
            jax.make_array_from_callback(x.shape, s, lambda index, x=x: x[index])
            for x, s in zip(leaves, jax.tree.leaves(shardings), strict=True)
        ],
    )
    params, rest = nnx.split_state(state, nnx.Param, ...)

    def loss_fn(params, rest, batch):
        avatar = nnx.merge(graphdef, params, rest)
        gaussians = avatar(batch["source_image"], batch["view_mask"], anchors).gaussians
        # Each sample's target colour: the mean colour of its target frames' heads.
        mask = batch["target_mask"][..., None]
        target = jnp.sum(batch["target_image"] * mask, axis=(1, 2, 3)) / (
            jnp.sum(mask, axis=(1, 2, 3)) + 1e-6
        )
        colour = jnp.mean(jnp.square(gaussians.colors - target[:, None]))
        return colour + 0.1 * offset_regularizer(gaussians.offsets)

    @jax.jit
    def step(params, rest, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, batch)
        params = jax.tree.map(lambda p, g: p - args.learning_rate * g, params, grads)
        return params, loss

    setup = time.perf_counter() - start
    log(f"set up in {setup:.1f} s")
    losses = []
    with jax.set_mesh(mesh):
        batch = next(batches)
        compiled = step.lower(params, rest, batch).compile()
        log(f"compiled at {time.perf_counter() - start:.1f} s")
        # Every process has its program: the first collective now comes at once.
        distributed.barrier("multihost_worker: compiled")
        for i in range(args.steps):
            params, loss = compiled(params, rest, batch if i == 0 else next(batches))
            losses.append(float(loss))
            log(f"step {i}: loss {losses[-1]} at {time.perf_counter() - start:.1f} s")
    result = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "losses": losses,
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
