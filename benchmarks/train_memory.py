"""Per-device memory of the whole paper train step, compiled abstractly on fake CPU devices.

    python benchmarks/train_memory.py [--config=configs/default.py[:arg]]
        [--mesh 8,1,1 --mesh 2,4,1] [--per-device 1 2] [--anchors 130000]
        [--capacity 1048576] [--remat POLICY] [--chunk-size N] [--full-opt]

(about 2-5 minutes a row on 2 busy cores; it sets its own 8 fake CPU devices.)

The step is the avatar stage's `uika_jax.training.step.make_train_step`, jitted as the
training loop jits it (`donate_argnums=0`, the state's shardings as outputs, under
`jax.set_mesh`) and compiled from abstract inputs (`jax.ShapeDtypeStruct`s with
shardings: nothing is allocated) for each mesh and each micro-batch size:

- the config as is (configs/default.py: the frozen DINOv3 ViT-L with 24 blocks shared by
  the estimator and the encoder, the correspondence estimator's DPT, the dual encoder,
  the UV transformer of 12 blocks at width 1024 over 96 x 96 tokens with its remat
  policy, the 384 x 384 x 256 decoder, the rasterizer at 512^2, bf16 compute, LPIPS VGG
  in the loss), N_ref = 16 source views and N_d = 8 driven frames a sample, K =
  `--anchors` (130,000, the paper's ~130K) abstract anchors on the built-in synthetic
  head (the head's arrays and the LPIPS weights are replicated arguments);
- the global batch `optim.batch_size` (32) split into `optim.micro_batches` =
  batch / (devices along the batch axes x samples per device) micro-batches, so one
  micro-step holds `--per-device` samples on each device (the config's 4 micro-batches
  on 8 devices are one sample per device);
- the rasterizer with `--capacity` intersection slots a frame (2^20: training calibrates
  its own; with no data there is nothing to calibrate), the config's tile cap, no host
  callback;
- attention: the config's "auto", which is the chunked scan (chunk
  `transformer.attention.chunk_size`) on CPU; on a GPU it would be cuDNN, on a TPU
  splash, whose memory differs;
- XLA:CPU compile options: the tests' fast ones (`tests/network_fixtures.FAST_COMPILE`:
  no LLVM optimisation, loop emitters; the buffer assignment, which is what is measured,
  barely moves: 5.716 against 5.722 GiB of temporaries in tests/test_sharding.py), or
  XLA's defaults with `--full-opt`.

The table gives `compiled.memory_analysis()` per device in GiB: arguments (the state's
shard, the global batch's shard, the assets), outputs (the new state and the metrics),
aliased (outputs written into the donated state's buffers), temporaries, and total =
arguments + outputs - aliased + temporaries. These are XLA:CPU's buffer-assignment
figures for the program as compiled for CPU: a proxy for a GPU or TPU, whose compilers
fuse, schedule and rematerialise differently (and whose attention kernels differ), not
a measurement on one.

Measured (2 cores shared with other jobs; the config as is unless the row says; GiB per
device; "compile": seconds of wall time under that load; per-dev: samples a device holds per
micro-step; micro: `optim.micro_batches`; remat: the transformer's policy, "dots" the
config's dots_with_no_batch_dims_saveable; chunk: the chunked attention's chunk size):

| mesh | per-dev | micro | remat | chunk | arguments | outputs | aliased | temp | total | compile |
|---|---|---|---|---|---|---|---|---|---|---|
| 8,1,1 | 1 | 4 | dots | 1024 | 9.01 | 8.63 | 8.63 | 48.53 | 57.54 | 197 |
| 8,1,1 | 2 | 2 | dots | 1024 | 9.01 | 8.63 | 8.63 | 90.60 | 99.61 | 225 |
| 2,4,1 | 1 | 4 | dots | 1024 | 2.56 | 2.19 | 2.19 | 52.66 | 55.23 | 332 |
| 2,4,1 | 2 | 2 | dots | 1024 | 2.56 | 2.19 | 2.19 | 101.49 | 104.05 | 160 |
| 8,1,1 | 1 | 4 | nothing | 1024 | 9.01 | 8.63 | 8.63 | 40.73 | 49.73 | 103 |
| 8,1,1 | 2 | 2 | nothing | 1024 | 9.01 | 8.63 | 8.63 | 75.24 | 84.25 | 55 |
| 8,1,1 | 2 | 2 | nothing | 512 | 9.01 | 8.63 | 8.63 | 71.99 | 81.00 | 60 |
| 2,4,1 | 2 | 2 | nothing | 512 | 2.56 | 2.19 | 2.19 | 69.43 | 71.99 | 51 |

(rows 5-8: `--remat nothing_saveable [--chunk-size 512] --mesh M --per-device P`.)

Where row 1's 57.5 GiB go (`XLA_FLAGS=--xla_dump_to=DIR`, the module's
`cpu_after_optimizations-memory-usage-report.txt`): the largest allocations hold
the chunked attention's key masks broadcast to (chunks, B, H, T, chunk) booleans,
pred[25,1,16,25600,1024] and pred[18,1,16,18432,1024] (9.8 and 5.1 GiB buffers). They
are not in the program JAX emits (before optimisation the masks are pred[25,8,1024]):
XLA:CPU's passes hoist the broadcast out of the chunk loop, so a GPU (cuDNN) or TPU
(splash) program has no such buffers and this proxy overstates them. Next come the
transformer blocks' saved activations stacked over the scanned blocks, in float32
(f32[11,1,16384,4096], f32[11,1,9216,4096], f32[11,1,16384,1024], ...: 0.4-2.8 GiB
each), which "nothing_saveable" drops (rows 5-6).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from uika_jax import sharding
from uika_jax.config import load_config
from uika_jax.head.anchors import Anchors
from uika_jax.models.avatar import UIKA
from uika_jax.render import RasterConfig
from uika_jax.synthetic.head import synthetic_head_model
from uika_jax.training import train_state as ts
from uika_jax.training.losses import load_lpips
from uika_jax.training.step import StepAssets, abstract_batch, make_train_step

ROOT = Path(__file__).resolve().parents[1]
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
"""tests/network_fixtures.FAST_COMPILE (not imported: the tests folder is no package)."""
GIB = float(1 << 30)
STAGE = "avatar"


def compile_step(config, mesh_shape, per_device: int, anchors: int, capacity: int, options):
    """(compiled step, micro-batches, compile seconds) of the config on a fake mesh."""
    mesh = sharding.make_mesh(mesh_shape)
    rules = sharding.logical_rules(config)
    along_batch = 1
    for axis in sharding.batch_axes(rules):
        along_batch *= mesh.shape[axis]
    batch = int(config.optim.batch_size)
    if batch % (along_batch * per_device):
        raise SystemExit(f"batch {batch} does not split into {along_batch} x {per_device}")
    config.optim.micro_batches = batch // (along_batch * per_device)
    spacing = float(config.model.gaussians.max_scale) / 2  # a shape-only stand-in

    def make():
        return UIKA.from_config(config, rngs=nnx.Rngs(0), anchor_spacing=spacing)

    tx = ts.optimizer_of(config, STAGE)
    abstract = ts.abstract_state(make, STAGE, tx)
    graphdef = nnx.graphdef(nnx.eval_shape(make))
    shardings = ts.train_state_shardings(abstract, tx, mesh, rules)
    sds = jax.ShapeDtypeStruct
    state = jax.tree.map(lambda x, h: sds(x.shape, x.dtype, sharding=h), abstract, shardings)
    replicated = NamedSharding(mesh, PartitionSpec())
    head = synthetic_head_model()
    spec = PartitionSpec(sharding.batch_axes(rules))
    inputs = abstract_batch(config, head, batch, NamedSharding(mesh, spec))
    lpips_fn, lpips_params = load_lpips() if float(config.loss.lpips) > 0 else (None, None)
    k = anchors
    assets = StepAssets(
        head,
        Anchors(
            face_ids=sds((k,), jnp.int32),
            barycentrics=sds((k, 3), jnp.float32),
            texels=sds((k, 2), jnp.int32),
            positions=sds((k, 3), jnp.float32),
            uv_resolution=config.model.decoder.map_size,
        ),
        lpips_params,
    )
    assets = jax.tree.map(lambda x: sds(jnp.shape(x), x.dtype, sharding=replicated), assets)
    r = config.render
    raster = RasterConfig(
        backend=r.backend, capacity=capacity, tile_cap=r.tile_cap, warn_on_overflow=False
    )
    step = make_train_step(config, graphdef, STAGE, raster, lpips_fn)
    jitted = jax.jit(
        step, donate_argnums=0, out_shardings=(shardings, replicated), compiler_options=options
    )
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jitted.lower(state, inputs, assets).compile()
    return compiled, int(config.optim.micro_batches), time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    """Compiles each (mesh, samples per device) and prints the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs/default.py"))
    parser.add_argument("--mesh", action="append", help="data,fsdp,tensor (repeatable)")
    parser.add_argument("--per-device", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--anchors", type=int, default=130_000)
    parser.add_argument("--capacity", type=int, default=1 << 20)
    parser.add_argument("--remat", default=None, help="transformer.remat policy override")
    parser.add_argument("--chunk-size", type=int, default=None, help="attention chunk size")
    parser.add_argument("--full-opt", action="store_true", help="XLA's default options")
    args = parser.parse_args(argv)
    meshes = [tuple(int(x) for x in m.split(",")) for m in args.mesh or ["8,1,1", "2,4,1"]]

    def load():
        config = load_config(args.config)
        if args.remat is not None:
            config.model.transformer.remat = args.remat
        if args.chunk_size is not None:
            config.model.transformer.attention.chunk_size = args.chunk_size
        return config

    base = load()
    t = base.model.transformer
    print(
        f"{base.name}: K = {args.anchors}, N_ref = {base.model.num_views}, N_d = "
        f"{base.model.num_drive}, {base.model.image_size}^2, {base.model.dtype}, remat "
        f"{t.remat}, attention {t.attention.backend} (chunk {t.attention.chunk_size}), "
        f"capacity {args.capacity}, global batch {base.optim.batch_size}, "
        f"{'default' if args.full_opt else 'fast'} XLA:CPU options",
        flush=True,
    )
    rows = []
    for mesh_shape in meshes:
        for per_device in args.per_device:
            compiled, micro, seconds = compile_step(
                load(), mesh_shape, per_device, args.anchors, args.capacity,
                None if args.full_opt else FAST_COMPILE,
            )  # fmt: skip
            m = compiled.memory_analysis()
            a, o = m.argument_size_in_bytes / GIB, m.output_size_in_bytes / GIB
            alias, tmp = m.alias_size_in_bytes / GIB, m.temp_size_in_bytes / GIB
            row = (
                f"| {','.join(map(str, mesh_shape))} | {per_device} | {micro} | {a:.2f} | "
                f"{o:.2f} | {alias:.2f} | {tmp:.2f} | {a + o - alias + tmp:.2f} | {seconds:.0f} |"
            )
            print(row, flush=True)
            rows.append(row)
    print(
        "\n| mesh (data,fsdp,tensor) | samples/device/micro-step | micro_batches | "
        "arguments GiB | outputs GiB | aliased GiB | temporaries GiB | total GiB | "
        "compile s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
