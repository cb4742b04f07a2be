"""What several network tests share: fast XLA:CPU compiles, random weights without
compiling, and the abstract paper model.

Test programs compile far longer than they run, so the heavy `jax.jit`s of the network
tests pass `FAST_COMPILE`. The paper configuration's abstract model takes seconds to
trace (Flax reads the sharding of every traced RNG count it updates, and JAX answers
with a search over the whole trace), so it is built once per process.
"""

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from uika_jax.config import load_config
from uika_jax.models.avatar import UIKA
from uika_jax.models.summary import abstract_model

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (config paths below are relative to it)."""

ModuleT = TypeVar("ModuleT", bound=nnx.Module)

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
"""XLA:CPU compile options for tests: same maths, a third to a fifth of the compile time.

LLVM without optimisation and the loop emitters instead of the MLIR fusion emitters:
most of a test program's compile time is code generation for its many small kernels.
"""


def small_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """configs/tiny.py[:arg] shrunk further for the network tests (seconds to compile).

    32 x 32 images, 3 views, a 16 x 16 UV map (156 anchors on the built-in head), widths
    of 8 to 32, and LAM's Gaussian ranges (cap 10 mm, initial scale exp(-5)).
    """
    config = load_config(f"{ROOT / 'configs/tiny.py'}" + (f":{arg}" if arg else ""))
    m = config.model
    m.image_size, m.num_views, m.num_drive = 32, 3, 2
    m.vit.overrides = ml_collections.ConfigDict(
        dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, patch_size=8)
    )
    c = m.correspondence
    c.neck_channels, c.features, c.head_channels = (8, 16, 32, 32), 16, 8
    m.encoder.dim, m.encoder.uv_size = 32, 16
    t = m.transformer
    t.dim, t.num_heads, t.depth, t.token_side = 32, 2, 4, 4
    d = m.decoder
    d.neck_channels, d.features, d.map_size, d.channels, d.mlp_hidden = (
        (8, 16, 24, 32),
        16,
        16,
        16,
        16,
    )
    m.gaussians.max_scale, m.gaussians.init_scale_in_spacings = 0.01, None
    config.data.buckets = (3,)
    return config


@functools.cache
def abstract_uika(spec: str) -> tuple[ml_collections.ConfigDict, UIKA]:
    """The config of `spec` (a path under the repository root, `:ablation` allowed) and its
    abstract model (ShapeDtypeStruct weights, `nnx.eval_shape`), cached; do not mutate."""
    config = load_config(f"{ROOT / spec}")
    return config, abstract_model(config)


def noise_filled(abstract: ModuleT, seed: int = 0) -> ModuleT:
    """An abstract module (`nnx.eval_shape`) with every weight drawn by NumPy (no compile).

    Matrices and kernels: normal with std 1/sqrt(fan-in), fan-in being every axis but the
    last (and but the first of stacked "layers" weights). Vectors: 1 for norm scales and
    LayerScale ("scale", "gamma"), else 0, plus normal noise of std 0.1. Every weight is
    nonzero, including those initialised to zero, which would pass no gradient.
    """
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def fill(path: tuple, variable: nnx.Variable) -> nnx.Variable:
        shape = variable.shape
        if len(shape) > 1:
            stacked = (variable.get_metadata().get("out_sharding") or (None,))[0] == "layers"
            std = 1.0 / math.sqrt(math.prod(shape[1 if stacked else 0 : -1]))
            value = rng.normal(scale=std, size=shape)
        else:
            base = 1.0 if path[-1].key in ("scale", "gamma") else 0.0
            value = base + rng.normal(scale=0.1, size=shape)
        return variable.replace(jnp.asarray(value, variable.dtype))

    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state, is_leaf=is_variable))


def fast_jit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn(module, *args)` compiled with `FAST_COMPILE` (`nnx.jit` takes no compile options).

    The module goes in as its graph definition (static) and state; `fn` must not change it.
    """

    @functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
    def pure(graphdef: nnx.GraphDef, state: nnx.State, *args: Any) -> Any:
        return fn(nnx.merge(graphdef, state), *args)

    return lambda module, *args: pure(*nnx.split(module), *args)
