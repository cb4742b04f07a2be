"""Building blocks of the DINOv2 / DINOv3 vision transformers (see `uika_jax.models.vit`).

Pre-norm transformer blocks with LayerScale, multi-head self-attention with
optional 2D RoPE on the patch tokens (DINOv3), plain or gated MLPs, the DINOv2
position-embedding interpolation and the DINOv3 RoPE tables. Semantics follow
HF transformers 5.24 (`modeling_dinov2.py`, `modeling_dinov2_with_registers.py`,
`modeling_dinov3_vit.py`) in eval mode, which the tests check to 1e-5.

Every weight is created by `make_param` with logical axis names (metadata
`out_sharding`, `eager_sharding=False`, so construction needs no mesh):

    embed   the model width D (residual stream, LayerNorm, LayerScale)
    heads   the attention width (num_heads * head_dim) of q/k/v outputs, o input
    mlp     the MLP hidden width
    patch   the flattened patch (patch * patch * channels) input of the patch embedding
    None    small replicated axes (token index of cls / registers / position table)

Computation runs in `dtype` (weights are cast at use; float32 by default).
LayerNorm statistics and the softmax are computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uika_jax.models.frozen import ParamType

Initializer = Callable[..., jax.Array]
INIT_NORMAL = nnx.initializers.normal(stddev=0.02)
"""HF's init, trunc_normal(std 0.02) cut at +-2 absolute, i.e. +-100 std: a plain normal."""

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def make_param(
    param_type: ParamType,
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    names: Sequence[str | None],
) -> nnx.Variable:
    """Creates a float32 weight of `param_type` annotated with logical axis names."""
    if len(names) != len(shape):
        raise ValueError(f"axis names {names} do not match shape {tuple(shape)}")
    init = nnx.with_partitioning(init, tuple(names), eager_sharding=False)
    return param_type(init(rngs.params(), tuple(shape), jnp.float32))


class Dense(nnx.Module):
    """`y = x @ kernel + bias` with kernel (in, out) and logical names (in_name, out_name)."""

    def __init__(
        self,
        din: int,
        dout: int,
        names: tuple[str, str],
        *,
        use_bias: bool = True,
        param_type: ParamType,
        rngs: nnx.Rngs,
    ):
        self.kernel = make_param(param_type, rngs, INIT_NORMAL, (din, dout), names)
        self.bias = (
            make_param(param_type, rngs, nnx.initializers.zeros, (dout,), names[1:])
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., in) -> (..., out) in x's dtype."""
        y = x @ self.kernel[...].astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis (scale, bias: ("embed",)); statistics in float32."""

    def __init__(self, dim: int, eps: float, *, param_type: ParamType, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = make_param(param_type, rngs, nnx.initializers.ones, (dim,), ("embed",))
        self.bias = make_param(param_type, rngs, nnx.initializers.zeros, (dim,), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises the last axis; returns x's dtype."""
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


class LayerScale(nnx.Module):
    """Per-channel residual-branch scale `x * gamma` (gamma: ("embed",))."""

    def __init__(self, dim: int, value: float, *, param_type: ParamType, rngs: nnx.Rngs):
        init = nnx.initializers.constant(value)
        self.gamma = make_param(param_type, rngs, init, (dim,), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Scales the channels."""
        return x * self.gamma[...].astype(x.dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


class Attention(nnx.Module):
    """Multi-head self-attention; RoPE (if given) rotates q and k of the trailing patch tokens."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: tuple[bool, bool, bool],
        proj_bias: bool,
        param_type: ParamType,
        rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        kw = dict(param_type=param_type, rngs=rngs)
        self.q = Dense(dim, dim, ("embed", "heads"), use_bias=qkv_bias[0], **kw)
        self.k = Dense(dim, dim, ("embed", "heads"), use_bias=qkv_bias[1], **kw)
        self.v = Dense(dim, dim, ("embed", "heads"), use_bias=qkv_bias[2], **kw)
        self.o = Dense(dim, dim, ("heads", "embed"), use_bias=proj_bias, **kw)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """(B, T, D) -> (B, T, D); rope: (cos, sin), each (P, head_dim), for the last P tokens."""
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if rope is not None:
            cos, sin = (a[:, None, :].astype(x.dtype) for a in rope)  # (P, 1, head_dim)
            n_prefix = t - cos.shape[0]

            def rotate(y: jax.Array) -> jax.Array:
                pre, patches = y[:, :n_prefix], y[:, n_prefix:]
                patches = patches * cos + _rotate_half(patches) * sin
                return jnp.concatenate([pre, patches], axis=1)

            q, k = rotate(q), rotate(k)
        out = jax.nn.dot_product_attention(q, k, v)  # (B, T, N, H); softmax in float32
        return self.o(out.reshape(b, t, d))


class Mlp(nnx.Module):
    """`down(act(up(x)))`, or gated `down(act(gate(x)) * up(x))` (SwiGLU with act = silu)."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        act: str,
        gated: bool,
        use_bias: bool,
        param_type: ParamType,
        rngs: nnx.Rngs,
    ):
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; known: {sorted(ACTIVATIONS)}")
        self.act = act
        kw = dict(use_bias=use_bias, param_type=param_type, rngs=rngs)
        self.gate = Dense(dim, hidden, ("embed", "mlp"), **kw) if gated else None
        self.up = Dense(dim, hidden, ("embed", "mlp"), **kw)
        self.down = Dense(hidden, dim, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., D) -> (..., D)."""
        act = ACTIVATIONS[self.act]
        h = act(self.gate(x)) * self.up(x) if self.gate is not None else act(self.up(x))
        return self.down(h)


class Block(nnx.Module):
    """Pre-norm block: `x += ls1(attn(norm1(x)))`, `x += ls2(mlp(norm2(x)))`."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        *,
        eps: float,
        layerscale: float,
        act: str,
        gated: bool,
        qkv_bias: tuple[bool, bool, bool],
        proj_bias: bool,
        mlp_bias: bool,
        param_type: ParamType,
        rngs: nnx.Rngs,
    ):
        kw = dict(param_type=param_type, rngs=rngs)
        self.norm1 = LayerNorm(dim, eps, **kw)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, **kw)
        self.ls1 = LayerScale(dim, layerscale, **kw)
        self.norm2 = LayerNorm(dim, eps, **kw)
        self.mlp = Mlp(dim, mlp_dim, act=act, gated=gated, use_bias=mlp_bias, **kw)
        self.ls2 = LayerScale(dim, layerscale, **kw)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """(B, T, D) -> (B, T, D); `rope` as in `Attention`."""
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


def rope_tables(grid_h: int, grid_w: int, head_dim: int, theta: float) -> tuple[jax.Array, ...]:
    """DINOv3's axial 2D RoPE (HF eval mode: no shift / jitter / rescale).

    Patch centres are normalised per axis to [-1, 1] (`(i + 0.5) / n * 2 - 1`);
    frequencies are `theta ** -(4 j / head_dim)`, j < head_dim / 4; the angles
    `2 pi coord freq` are laid out [y freqs, x freqs] and tiled twice.

    Returns:
      (cos, sin), each (grid_h * grid_w, head_dim) float32, row-major patch order.
    """
    if head_dim % 4:
        raise ValueError(f"RoPE needs head_dim divisible by 4, got {head_dim}")
    inv_freq = 1.0 / theta ** (jnp.arange(head_dim // 4, dtype=jnp.float32) * (4.0 / head_dim))
    cy = (jnp.arange(grid_h, dtype=jnp.float32) + 0.5) / grid_h
    cx = (jnp.arange(grid_w, dtype=jnp.float32) + 0.5) / grid_w
    yy, xx = jnp.meshgrid(cy, cx, indexing="ij")
    coords = 2.0 * jnp.stack([yy.reshape(-1), xx.reshape(-1)], axis=-1) - 1.0  # (P, 2)
    angles = 2.0 * math.pi * coords[:, :, None] * inv_freq[None, None, :]  # (P, 2, hd/4)
    angles = jnp.tile(angles.reshape(angles.shape[0], -1), (1, 2))  # (P, hd)
    return jnp.cos(angles), jnp.sin(angles)


def interpolate_pos_embed(
    pos_embed: jax.Array, grid_h: int, grid_w: int, *, antialias: bool
) -> jax.Array:
    """Resizes DINOv2's square patch position table to (grid_h, grid_w) as HF does.

    HF resizes the (n, n) table with `torch.nn.functional.interpolate(size=(grid_h, grid_w),
    mode="bicubic", align_corners=False, antialias=...)` in float32 (`Dinov2Model`:
    antialias False; `Dinov2WithRegistersModel`: True), and skips the resize when the
    grid already is (n, n). `jax.image.resize(method="bicubic-pytorch")` reproduces
    both: without antialias it is PyTorch's Keys a = -0.75 kernel with edge-clamped
    taps, with antialias PIL's a = -0.5 kernel with in-bounds weights renormalised.

    Args:
      pos_embed: (1 + n * n, D): the cls position, then the patch grid row-major.
      grid_h: target patch rows.
      grid_w: target patch columns.
      antialias: HF's antialias flag for this model family.

    Returns:
      (1 + grid_h * grid_w, D) in pos_embed's dtype.
    """
    n = round(math.sqrt(pos_embed.shape[0] - 1))
    if n * n != pos_embed.shape[0] - 1:
        raise ValueError(f"position table of {pos_embed.shape[0] - 1} patches is not square")
    if (grid_h, grid_w) == (n, n):
        return pos_embed
    grid = pos_embed[1:].astype(jnp.float32).reshape(n, n, -1)
    grid = jax.image.resize(
        grid, (grid_h, grid_w, grid.shape[-1]), method="bicubic-pytorch", antialias=antialias
    )
    grid = grid.reshape(grid_h * grid_w, -1).astype(pos_embed.dtype)
    return jnp.concatenate([pos_embed[:1], grid], axis=0)


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p, W/p, p * p * C), each patch flattened in (row, column, channel)."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // patch, w // patch, patch * patch * c)


def conv_to_patch_kernel(weight: np.ndarray) -> np.ndarray:
    """A torch Conv2d patch-embedding weight (D, C, p, p) as our (p * p * C, D) kernel."""
    d = weight.shape[0]
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)).reshape(-1, d))
