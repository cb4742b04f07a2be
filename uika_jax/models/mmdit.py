"""One MM-attention branch (SD3 MM-DiT joint attention, as in LAM): UV tokens Z and features F.

Z are the learnable UV tokens, F a context stream (screen or UV features).

The block follows LAM's `SD3JointTransformerBlock` (`lam/models/transformer_dit.py`,
aigc3d/LAM), which runs without adaLN:
every weight is modality-specific (Z: `norm1, to_q/k/v, norm_q/k, to_out, norm2, ff`;
F: `norm1_context, add_q/k/v, norm_added_q/k, to_add_out, norm2_context, ff_context`) and
only the softmax is shared. With `a = attention` and pre-norm residuals:

    joint mode (one softmax over the concatenation [Z; F]; padded F keys masked out):
        q = [rms(to_q(LN1(Z))); rms(add_q(LN1c(F)))]   per head, likewise k; v without rms
        [a_z; a_f] = split(attention(q, k, v))
        Z' = Z + to_out(a_z);        dZ = Z' - Z + ff(LN2(Z'))        (returned, not Z')
        F' = F + to_add_out(a_f);    F' = F' + ff_context(LN2c(F'))
    update_context=False (LAM's `context_pre_only`, used in the last block): the F queries,
    `add_q`, `norm_added_q`, `to_add_out` and `ff_context` are dropped (only the Z rows of the
    joint softmax are computed, which are identical) and F is returned unchanged.
    cross mode (Z queries F only; F is never updated, so no F queries or F stream):
        dZ = a + ff(LN2(Z + a)),  a = to_out(attention(rms(to_q(LN1(Z))),
                                                      rms(add_k(LN1c(F))), add_v(LN1c(F))))

LN1 / LN1c: LayerNorm(eps 1e-5, affine); LN2 / LN2c: LayerNorm(eps 1e-6, no affine);
rms: per-head RMSNorm(head_dim, eps 1e-6, learnable scale); ff: Linear D -> 4D, GELU (tanh),
Linear 4D -> D. All projections have biases. The block returns the increment dZ so that the
dual-branch block (`uika_jax.models.transformer`) can sum the increments of its branches.

Residual streams stay in their input dtype (float32); normalised activations are cast to
the compute `dtype` (e.g. bfloat16) before each projection, as under torch autocast.

Logical axis names: embed (D), heads (num_heads * head_dim), kv (head_dim), mlp (hidden).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uika_jax.models.attention import AttentionConfig, attention
from uika_jax.models.frozen import ParamType
from uika_jax.models.vit_layers import Dense, LayerNorm, Mlp, make_param

MODES = ("joint", "cross")


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters over the last axis; float32 statistics."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """Per-head RMSNorm `x / sqrt(mean(x^2) + eps) * scale` over head_dim (scale: ("kv",))."""

    def __init__(self, dim: int, eps: float = 1e-6, *, param_type: ParamType, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = make_param(param_type, rngs, nnx.initializers.ones, (dim,), ("kv",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., head_dim) -> same shape and dtype; statistics in float32."""
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


class JointAttentionBlock(nnx.Module):
    """One MM-attention branch: Z attends over [Z; F] (joint) or over F (cross)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mode: str = "joint",
        update_context: bool = True,
        mlp_ratio: int = 4,
        attention_config: AttentionConfig | None = None,
        dtype: jnp.dtype = jnp.float32,
        param_type: ParamType = nnx.Param,
        rngs: nnx.Rngs,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown attention mode {mode!r}; known: {MODES}")
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.mode = mode
        self.update_context = update_context and mode == "joint"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attention_config = attention_config or AttentionConfig()
        self.dtype = dtype
        kw = dict(param_type=param_type, rngs=rngs)
        joint, upd = mode == "joint", self.update_context

        def dense(din: int, dout: int, names: tuple[str, str]) -> Dense:
            return Dense(din, dout, names, use_bias=True, **kw)

        def mlp() -> Mlp:
            return Mlp(
                dim, mlp_ratio * dim, act="gelu_pytorch_tanh", gated=False, use_bias=True, **kw
            )

        # Z stream.
        self.norm1 = LayerNorm(dim, 1e-5, **kw)
        self.to_q = dense(dim, dim, ("embed", "heads"))
        self.to_k = dense(dim, dim, ("embed", "heads")) if joint else None
        self.to_v = dense(dim, dim, ("embed", "heads")) if joint else None
        self.norm_q = RMSNorm(self.head_dim, **kw)
        self.norm_k = RMSNorm(self.head_dim, **kw) if joint else None
        self.to_out = dense(dim, dim, ("heads", "embed"))
        self.ff = mlp()
        # F stream.
        self.norm1_context = LayerNorm(dim, 1e-5, **kw)
        self.add_q = dense(dim, dim, ("embed", "heads")) if upd else None
        self.add_k = dense(dim, dim, ("embed", "heads"))
        self.add_v = dense(dim, dim, ("embed", "heads"))
        self.norm_added_q = RMSNorm(self.head_dim, **kw) if upd else None
        self.norm_added_k = RMSNorm(self.head_dim, **kw)
        self.to_add_out = dense(dim, dim, ("heads", "embed")) if upd else None
        self.ff_context = mlp() if upd else None

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

    def __call__(
        self, z: jax.Array, f: jax.Array, f_mask: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """One branch.

        Args:
          z: (B, Lz, D) UV tokens (residual stream).
          f: (B, M, D) context tokens (residual stream).
          f_mask: (B, M) bool, False on padded context tokens (never attended to).

        Returns:
          (dZ, F'): the token increment (B, Lz, D) in z's dtype and the updated context
          (B, M, D) (`f` itself unless the context is updated).
        """
        dt = self.dtype
        b, lz, _ = z.shape
        zn = self.norm1(z).astype(dt)
        fn = self.norm1_context(f).astype(dt)
        q = self.norm_q(self._heads(self.to_q(zn)))
        fk = self.norm_added_k(self._heads(self.add_k(fn)))
        fv = self._heads(self.add_v(fn))
        if self.mode == "cross":
            a_z = attention(q, fk, fv, f_mask, config=self.attention_config)
            a_f = None
        else:
            k = jnp.concatenate([self.norm_k(self._heads(self.to_k(zn))), fk], axis=1)
            v = jnp.concatenate([self._heads(self.to_v(zn)), fv], axis=1)
            mask = jnp.concatenate([jnp.ones((b, lz), bool), f_mask.astype(bool)], axis=1)
            if self.update_context:
                q = jnp.concatenate([q, self.norm_added_q(self._heads(self.add_q(fn)))], axis=1)
            a = attention(q, k, v, mask, config=self.attention_config)
            a_z, a_f = a[:, :lz], (a[:, lz:] if self.update_context else None)
        dz = self.to_out(a_z.reshape(b, lz, -1)).astype(z.dtype)
        dz = dz + self.ff(layer_norm(z + dz, 1e-6).astype(dt)).astype(z.dtype)
        if a_f is not None:
            f = f + self.to_add_out(a_f.reshape(*f.shape[:2], -1)).astype(f.dtype)
            f = f + self.ff_context(layer_norm(f, 1e-6).astype(dt)).astype(f.dtype)
        return dz, f
