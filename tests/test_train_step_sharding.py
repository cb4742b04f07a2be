"""The whole sharded train step at paper width: no per-Gaussian all-gathers, kernels in shard_map.

The step is `uika_jax.training.step.make_train_step` jitted as the training loop jits it
(`donate_argnums=0`, the state's shardings as outputs, under `jax.set_mesh`), built
abstractly (nothing allocated) on a 2 x 2 x 2 (data, fsdp, tensor) mesh of fake CPU
devices, for a reduced paper configuration:

    ViT (DINOv3 ViT-L, frozen)   width 1024, 16 heads, 4 blocks (paper 24)
    UV transformer               width 1024, 16 heads, 4 blocks (paper 12), 96 x 96 tokens
    decoder                      384 x 384 x 256 map, K = 20,011 anchors (prime, so no
                                 weight or image dim is a multiple of it)
    images                       512 x 512, N = 2 source views (paper 16), N_d = 8 targets
    batch                        8 samples, 2 micro-batches of 4 (one sample per device
                                 of the data x fsdp axes per micro-step)
    loss                         L1 + SSIM + offset regulariser (LPIPS weight 0: its VGG
                                 would only add compile time)
    rasterizer                   capacity 2^20 slots a frame, tile cap 256, no host callback

The head model's arrays and the anchors are replicated arguments (`StepAssets`); the state's
and the batch's shardings are the training loop's (`train_state_shardings`, the "batch"
rule).

1. All-gathers (`test_avatar_step_gathers_no_gaussians`): the avatar step is compiled
   for XLA:CPU with the tests' fast options, and `gaussian_gathers` parses every
   all-gather of the compiled HLO (`all-gather` and async `all-gather-start`, tuple
   results included): a gather whose result has a dim that is a multiple of K is a
   per-Gaussian gather, whichever dim it gathers: the Gaussians themselves, the batch of
   scenes (a device would hold other devices' Gaussians) or their features (the
   decoder's per-anchor features are replicated, logical axis "texel", so none need
   gathering). The controls run the same checker on small jitted functions that
   replicate batch-sharded Gaussians or gather their channels (both flagged) and on one
   that keeps them local (nothing flagged).
2. Kernels in shard_map (`test_pallas_kernels_lower_inside_shard_map`): the avatar step
   with the "pallas" rasterizer backend (`jax.lax.platform_dependent`: the Triton kernel
   on CUDA, the Mosaic kernel on TPU) is traced once under an abstract 2 x 2 x 2 mesh of
   abstract TPU devices (Mosaic's lowering asks the device for its TPU generation) and
   lowered, not compiled, from this CPU host for CUDA (custom call
   `__gpu$xla.gpu.triton`) and for TPU (`tpu_custom_call`) with
   `.trace(...).lower(lowering_platforms=...)`. `kernels_outside_manual` walks the
   StableHLO module: every function reachable from `main` outside an
   `sdy.manual_computation` region (shard_map's lowering under Shardy) must hold no
   kernel custom call outside such a region; the rasterizer's forward and backward
   kernels (`uika_composite_{fwd,bwd}_{triton,mosaic}`, the calls' kernel names) must be
   there. Attention, which "auto" resolves per platform when traced, is set to
   "chunked" (what "auto" gives on CPU and for float32 on CUDA): the paper's bf16
   "auto" would pick cuDNN on CUDA, and the "cudnn" backend refuses to trace unless
   the JAX backend running the trace is a GPU (`uika_jax.models.attention._cudnn`;
   `jax.nn.dot_product_attention(implementation="cudnn")` checks the local cuDNN too),
   so it cannot be cross-lowered from a CPU host; TPU's "splash" does cross-lower (a
   separate trace of the step with it passed here too, 18 `tpu_custom_call`s all inside
   shard_map), but one trace for both platforms halves this file's time, and
   tests/test_attention.py checks splash's own shard_map. The negative control lowers
   the Triton rasterizer outside any mesh (no shard_map) and must be flagged.

One process traces the model twice (the CPU compile; the cross-lowering, with the batch
as one micro-batch, since the micro-batch scan does not move the rasterizer and tracing
it costs a second trace of the loss); the compiled step comes from the persistent
compilation cache on later runs.
"""

from __future__ import annotations

import functools
import re
import time
from collections import Counter
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import (
    AbstractDevice,
    AbstractMesh,
    AxisType,
    NamedSharding,
    PartitionSpec,
    use_abstract_mesh,
)
from network_fixtures import FAST_COMPILE, ROOT

from uika_jax import sharding
from uika_jax.config import load_config
from uika_jax.head.anchors import Anchors
from uika_jax.models.avatar import UIKA
from uika_jax.render import RasterConfig, rasterization
from uika_jax.synthetic.head import synthetic_head_model
from uika_jax.training import train_state as ts
from uika_jax.training.step import StepAssets, abstract_batch, make_train_step

K = 20_011
"""Anchors (Gaussians) per sample: a prime, so no other dim of the program is a multiple."""

STAGE = "avatar"
BATCH, MICRO_BATCHES = 8, 2
MESH_SHAPE = (2, 2, 2)
RASTER = dict(capacity=1 << 20, tile_cap=256, warn_on_overflow=False)
KERNEL_CALLS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
_TPU = AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")


# ----------------------------------------------------------------------------- HLO checks

_SHAPE = re.compile(r"\b[a-z][a-z0-9]*\[([0-9,]*)\]")
_GATHER = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s+"
    r"(?P<op>all-gather(?:-start)?)\((?P<rest>.*)$"
)
_DIMENSIONS = re.compile(r"\bdimensions=\{([0-9,]*)\}")


def all_gathers(hlo: str) -> list[tuple[str, list[tuple[int, ...]], tuple[int, ...]]]:
    """Every all-gather of an HLO module's text: (name, result shapes, gathered dims).

    An async `all-gather-start` returns (operands, results): its result shapes are the
    second half of its tuple.
    """
    found = []
    for line in hlo.splitlines():
        match = _GATHER.match(line)
        if match is None:
            continue
        shapes = [
            tuple(int(d) for d in dims.split(",") if d) for dims in _SHAPE.findall(match["type"])
        ]
        if match["op"] == "all-gather-start":
            shapes = shapes[len(shapes) // 2 :]
        dims = _DIMENSIONS.search(match["rest"])
        if dims is None:
            raise ValueError(f"all-gather without dimensions: {line.strip()[:200]}")
        gathered = tuple(int(d) for d in dims[1].split(",") if d)
        found.append((match["name"], shapes, gathered))
    return found


def gaussian_gathers(hlo: str, k: int) -> list[str]:
    """All-gathers with a per-Gaussian result, as "name shape gathered dims".

    A result dim that is a nonzero multiple of `k` marks a per-Gaussian array (K, or K
    times a batch or channel count flattened into it); gathering it along any dim is a
    fault (module docstring).
    """
    faults = []
    for name, shapes, gathered in all_gathers(hlo):
        for shape in shapes:
            if any(d % k == 0 and d > 0 for d in shape):
                faults.append(f"{name} {shape} gathered {gathered}")
    return faults


_KERNEL_NAME = re.compile(r'\b(?:kernel_)?name = "([\w.\-]+)"')
_FUNC = re.compile(r"^\s*func\.func\s+(?:public\s+|private\s+)?@([\w$.\-]+)\(")
_CALL = re.compile(r"\bcall\s+@([\w$.\-]+)\(")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _braces(line: str) -> int:
    """Net `{` minus `}` of a line outside string literals (kernels' IR blobs hold braces)."""
    code = _STRING.sub('""', line)
    return code.count("{") - code.count("}")


def _functions(stablehlo: str) -> Iterator[tuple[str, list[str]]]:
    """(name, body lines) of every `func.func` of a module's text."""
    name, body, depth = None, [], 0
    for line in stablehlo.splitlines():
        if name is None:
            match = _FUNC.match(line)
            if match is None:
                continue
            name, body, depth = match[1], [], _braces(line)
            continue
        depth += _braces(line)
        if depth <= 0:
            yield name, body
            name = None
        else:
            body.append(line)


def kernels_outside_manual(stablehlo: str, target: str) -> tuple[Counter, list[str]]:
    """(kernel names called in the module, with counts; functions that call one outside
    shard_map).

    `target` is the custom call of the kernels (`KERNEL_CALLS`); a call's kernel name is
    its `kernel_name` (Mosaic) or `name` (Triton) attribute. A line is inside a manual
    region while an `sdy.manual_computation` op's region is open (brace depth). A
    function is reached outside manual regions if `main` calls it there, or such a
    function does; a call from inside a region puts the whole callee inside it.
    """
    outside_calls: dict[str, set[str]] = {}
    outside_kernels: dict[str, int] = {}
    names: Counter = Counter()
    for name, body in _functions(stablehlo):
        calls, kernels, depth, regions = set(), 0, 0, []
        for line in body:
            inside = bool(regions)
            if "sdy.manual_computation" in line:
                regions.append(depth)
            if f"@{target}(" in line:
                kernel = _KERNEL_NAME.search(line)
                names[kernel[1] if kernel else "?"] += 1
                kernels += not inside and not regions
            if not inside and not regions:
                calls.update(_CALL.findall(_STRING.sub('""', line)))
            depth += _braces(line)
            while regions and depth <= regions[-1]:
                regions.pop()
        outside_calls[name], outside_kernels[name] = calls, kernels
    reached, todo = set(), ["main"]
    while todo:
        fn = todo.pop()
        if fn in reached or fn not in outside_calls:
            continue
        reached.add(fn)
        todo.extend(outside_calls[fn])
    return names, sorted(fn for fn in reached if outside_kernels[fn])


# ----------------------------------------------------------------------------- the step


@functools.cache
def _model():
    """(config, graphdef, abstract avatar-stage state, its optimizer), reduced paper size."""
    config = load_config(ROOT / "configs/default.py")
    config.model.vit.overrides = {"num_layers": 4}
    config.model.transformer.depth = 4
    config.model.num_views = 2
    config.model.transformer.attention.backend = "chunked"  # module docstring
    config.loss.lpips = 0.0
    config.optim.micro_batches = MICRO_BATCHES
    spacing = config.model.gaussians.max_scale / 2  # any value passing the range checks
    model = nnx.eval_shape(
        lambda: UIKA.from_config(config, rngs=nnx.Rngs(0), anchor_spacing=spacing)
    )
    graphdef, params, rest = ts.split_model(model, STAGE)
    tx = ts.optimizer_of(config, STAGE)
    abstract = jax.eval_shape(
        lambda p, r: ts.state_from_model(nnx.merge(graphdef, p, r), STAGE, tx), params, rest
    )
    return config, graphdef, abstract, tx


def _inputs(mesh):
    """Abstract (state, batch, assets) on `mesh`, and the state's shardings."""
    config, _, abstract, tx = _model()
    sds = jax.ShapeDtypeStruct
    rules = sharding.logical_rules(config)
    if isinstance(mesh, AbstractMesh):  # the specs resolved on a concrete twin
        twin = ts.train_state_shardings(abstract, tx, sharding.make_mesh(mesh.axis_sizes), rules)
        shardings = jax.tree.map(lambda h: NamedSharding(mesh, h.spec), twin)
    else:
        shardings = ts.train_state_shardings(abstract, tx, mesh, rules)
    state = jax.tree.map(lambda x, h: sds(x.shape, x.dtype, sharding=h), abstract, shardings)
    head = synthetic_head_model()
    along_batch = NamedSharding(mesh, PartitionSpec(sharding.batch_axes(rules)))
    batch = abstract_batch(config, head, BATCH, along_batch)
    anchors = Anchors(
        face_ids=sds((K,), jnp.int32),
        barycentrics=sds((K, 3), jnp.float32),
        texels=sds((K, 2), jnp.int32),
        positions=sds((K, 3), jnp.float32),
        uv_resolution=config.model.decoder.map_size,
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    assets = StepAssets(head, anchors, None)
    assets = jax.tree.map(lambda x: sds(x.shape, x.dtype, sharding=replicated), assets)
    return (state, batch, assets), shardings


def _jitted(raster_backend: str, shardings, mesh, micro_batches=MICRO_BATCHES, **options):
    """The avatar step jitted as `training.loop` jits it, `options` passed to `jax.jit`."""
    config, graphdef, _, _ = _model()
    config = config.copy_and_resolve_references()
    config.optim.micro_batches = micro_batches
    raster = RasterConfig(backend=raster_backend, **RASTER)
    step = make_train_step(config, graphdef, STAGE, raster, None)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, donate_argnums=0, out_shardings=(shardings, replicated), **options)


@functools.cache
def _compiled_avatar_step():
    """(the step compiled for the fake CPU mesh with the reference rasterizer, seconds)."""
    mesh = sharding.make_mesh(MESH_SHAPE)
    args, shardings = _inputs(mesh)
    step = _jitted("reference", shardings, mesh, compiler_options=FAST_COMPILE)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.lower(*args).compile()
    return compiled, time.perf_counter() - start


def _cross_lowered() -> dict[str, str]:
    """The step with the "pallas" rasterizer (the kernel of the platform lowered for),
    traced once under an abstract TPU mesh, lowered for CUDA and TPU: StableHLO texts.

    One micro-batch (no `lax.scan`, whose step traces the loss twice): the scan does not
    move the rasterizer, and the compiled CPU step has it."""
    mesh = AbstractMesh(MESH_SHAPE, sharding.MESH_AXES, (AxisType.Auto,) * 3, abstract_device=_TPU)
    args, shardings = _inputs(mesh)
    with use_abstract_mesh(mesh):
        traced = _jitted("pallas", shardings, mesh, micro_batches=1).trace(*args)
        return {p: traced.lower(lowering_platforms=(p,)).as_text() for p in KERNEL_CALLS}


# ----------------------------------------------------------------------------- tests


def _gaussians_program(mode: str) -> str:
    """Compiled HLO of a loss on batch-sharded (B, K, 8) Gaussians that `mode`:
    "replicate"s them, gathers their "channels" (split over "tensor" first), or keeps
    them "local"."""
    mesh = sharding.make_mesh(MESH_SHAPE)
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    channels = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor"))
    x = jax.ShapeDtypeStruct((4, K, 8), jnp.float32, sharding=batch)

    def loss(x):
        if mode == "replicate":
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec()))
            return jnp.sum(jnp.sin(x) * jnp.flip(x, 0))
        y = jnp.sin(x)
        if mode == "channels":
            y = jax.lax.with_sharding_constraint(y, channels)
            y = jax.lax.with_sharding_constraint(y, batch)
        return jnp.sum(y * jnp.flip(y, -1))

    with jax.set_mesh(mesh):
        return jax.jit(loss, compiler_options=FAST_COMPILE).lower(x).compile().as_text()


def test_gather_checker_flags_replicated_gaussians_and_gathered_channels():
    for mode in ("replicate", "channels"):
        faults = gaussian_gathers(_gaussians_program(mode), K)
        assert faults and all(f"{K}" in f for f in faults), mode
    assert not gaussian_gathers(_gaussians_program("local"), K)


def test_avatar_step_gathers_no_gaussians():
    compiled, seconds = _compiled_avatar_step()
    hlo = compiled.as_text()
    gathers = all_gathers(hlo)
    faults = gaussian_gathers(hlo, K)
    memory = compiled.memory_analysis()
    gib = 1 << 30
    print(
        f"\navatar step, 2x2x2 mesh, compile {seconds:.0f} s: {len(gathers)} all-gathers; "
        f"per device: "
        f"arguments {memory.argument_size_in_bytes / gib:.3f} GiB, outputs "
        f"{memory.output_size_in_bytes / gib:.3f} GiB, temporaries "
        f"{memory.temp_size_in_bytes / gib:.3f} GiB"
    )
    assert len(gathers) > 100  # the fsdp weight gathers: the parser sees them
    assert re.search(rf"\[(?:[0-9]+,)*{K}[,\]]", hlo)  # per-Gaussian arrays are there
    assert not faults, f"per-Gaussian all-gathers: {faults}"


def test_kernel_checker_flags_a_kernel_outside_shard_map():
    sds = jax.ShapeDtypeStruct
    b, n, c = 2, 64, 1
    shapes = [(b, n, 3), (b, n, 4), (b, n, 3), (b, n), (b, n, 3), (b, c, 4, 4), (b, c, 3, 3)]
    config = RasterConfig(backend="pallas_triton", **RASTER)

    def loss(*args):
        return jnp.sum(rasterization(*args, 32, 32, config=config)[0])

    args = [sds(shape, jnp.float32) for shape in shapes]
    text = jax.jit(jax.grad(loss)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    names, outside = kernels_outside_manual(text, KERNEL_CALLS["cuda"])
    assert set(names) == {"uika_composite_fwd_triton", "uika_composite_bwd_triton"}
    assert outside  # the functions holding the kernels, reached from main directly


def test_pallas_kernels_lower_inside_shard_map():
    # One test for both platforms: one trace, even when pytest-xdist splits the file.
    for platform, text in _cross_lowered().items():
        assert "sdy.manual_computation" in text
        names, outside = kernels_outside_manual(text, KERNEL_CALLS[platform])
        print(f"\n{platform}: {KERNEL_CALLS[platform]} {dict(names)}; outside shard_map: {outside}")
        kernel = {"cuda": "triton", "tpu": "mosaic"}[platform]
        assert {f"uika_composite_{d}_{kernel}" for d in ("fwd", "bwd")} <= set(names), platform
        assert not outside, platform
