"""`UVTransformer`: learnable UV tokens Z that gather screen and UV features (UIKA §2).

Reading of the paper's "Z += dZ_s + dZ_uv" with LAM's two-stream MM-DiT blocks
(aigc3d/LAM `SD3JointTransformerBlock`; the branch maths is in `uika_jax.models.mmdit`).
Block l holds two independent `JointAttentionBlock` branches, s (screen) and uv, each
with its own weights. Both branches read the same Z (the block input), in parallel, not
one after the other:

    for b in (s, uv):                                     # branch b, context F_b
        [a_z; a_f] = softmax-attention over [LN1(Z); LN1c(F_b)]   (padded F_b keys masked)
        Z_b = Z + a_z;   Z_b = Z_b + MLP_b(LN2(Z_b));   dZ_b = Z_b - Z
        F_b = F_b + a_f; F_b = F_b + MLP_b,ctx(LN2c(F_b))        (two-stream: F_b updated)
    Z = Z + dZ_s + dZ_uv

so each branch is exactly one LAM block applied to (Z, F_b), and Z takes the sum of the
two increments; F_s and F_uv each evolve only in their own branch. The last block does
not update F (LAM's `context_pre_only`), so its F-side weights do not exist. Without UV
attention (`uv_attention=False`, the paper's "w/o uv_attn" ablation) the uv branch does
not exist, F_uv is ignored and Z = Z + dZ_s (each block is then a plain LAM block).
`mode="cross"`: Z queries F only (keys and values from F_b; no attention among the Z
tokens and F is never updated), Z = Z + dZ_s + dZ_uv as above.

Screen and UV features carry no positional encoding here (the encoders add it per view),
so Z is invariant to the order of the views, and padded views (view_mask False) are masked
keys: their tokens never influence Z.

Outputs: Z after each depth in `taps` (1-based block indices; default the last block of
each quarter, e.g. 3, 6, 9, 12), each through the shared final LayerNorm(eps 1e-6) as
DINO's `get_intermediate_layers(norm=True)` does, for the DPT-style UV decoder.

Blocks run in a `nnx.scan` over stacked weights (logical axis "layers") by default, which
compiles one block for all depths; the tapped depths come out of the scan's per-step
outputs (Z after every scanned block, of which the taps are kept). Keeping only the
tapped depths was measured and is not worth it: the most it can save is 0.3 of 13.2 GiB
(transformer alone, paper width, depth 12, batch 1), and every way tried (one scan per
segment between taps, nested scans, a carried buffer of tap slots) raised the sharded
train step's temporaries on XLA:CPU (depth 12: 8.70 GiB as now, 10.0 to 11.3 GiB).
`scan=False` is a Python loop over separate blocks (a different weight layout).
`remat` wraps each block in `nnx.remat` with a policy from `REMAT_POLICIES`. Residual
streams are float32; `dtype` is the compute dtype of the projections and the attention.
The architecture is a `UVTransformerConfig`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from uika_jax.models.attention import AttentionConfig
from uika_jax.models.frozen import ParamType
from uika_jax.models.mmdit import MODES, JointAttentionBlock
from uika_jax.models.vit_layers import INIT_NORMAL, LayerNorm, make_param

REMAT_POLICIES = {
    "none": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
"""Per-block rematerialisation: "none" stores every activation; the others recompute the
block in the backward pass, saving only what the `jax.checkpoint_policies` policy keeps
("nothing_saveable": full recomputation)."""


@dataclasses.dataclass(frozen=True)
class UVTransformerConfig:
    """Architecture of the `UVTransformer` (hashable; defaults: paper scale).

    Attributes:
      dim: token width D (= feature width of F_s and F_uv).
      num_heads: attention heads (head_dim = dim / num_heads).
      depth: number of blocks L.
      num_tokens: Lz, the number of UV tokens (96 * 96 in the paper).
      taps: 1-based block depths whose output Z is returned, ascending; None:
        (L/4, L/2, 3L/4, L) rounded, deduplicated (`tap_depths`).
      mlp_ratio: MLP hidden width / D.
      uv_attention: build the UV branch (False: the "w/o uv_attn" ablation).
      mode: "joint" (MM-DiT joint attention) or "cross" (Z queries F).
      attention: attention backend and its options.
      remat: a key of `REMAT_POLICIES`.
      dtype: compute dtype, "float32" or "bfloat16".
      scan: `nnx.scan` over stacked blocks (True) or a Python loop (False).
    """

    dim: int = 1024
    num_heads: int = 16
    depth: int = 12
    num_tokens: int = 96 * 96
    taps: tuple[int, ...] | None = None
    mlp_ratio: int = 4
    uv_attention: bool = True
    mode: str = "joint"
    attention: AttentionConfig = AttentionConfig()  # noqa: RUF009 (frozen dataclass)
    remat: str = "none"
    dtype: str = "float32"
    scan: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown attention mode {self.mode!r}; known: {MODES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"unknown remat policy {self.remat!r}; known: {sorted(REMAT_POLICIES)}"
            )
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        taps = self.tap_depths
        if not taps or list(taps) != sorted(set(taps)) or taps[0] < 1 or taps[-1] > self.depth:
            raise ValueError(f"taps {taps} must be ascending, unique depths in [1, {self.depth}]")
        if jnp.dtype(self.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype}")

    @property
    def tap_depths(self) -> tuple[int, ...]:
        """The tapped depths, `taps` or its default."""
        if self.taps is None:
            return tuple(sorted({max(1, round(self.depth * i / 4)) for i in range(1, 5)}))
        return tuple(int(t) for t in self.taps)


class DualBranchBlock(nnx.Module):
    """A screen branch and (with UV attention) a UV branch sharing the input Z."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        uv_attention: bool,
        mode: str,
        update_context: bool,
        mlp_ratio: int,
        attention_config: AttentionConfig | None,
        dtype: jnp.dtype,
        param_type: ParamType,
        rngs: nnx.Rngs,
    ):
        kw = dict(
            mode=mode,
            update_context=update_context,
            mlp_ratio=mlp_ratio,
            attention_config=attention_config,
            dtype=dtype,
            param_type=param_type,
            rngs=rngs,
        )
        self.screen = JointAttentionBlock(dim, num_heads, **kw)
        self.uv = JointAttentionBlock(dim, num_heads, **kw) if uv_attention else None

    def __call__(
        self,
        z: jax.Array,
        f_s: jax.Array,
        m_s: jax.Array,
        f_uv: jax.Array | None,
        m_uv: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """Z += dZ_s + dZ_uv; returns (Z, F_s, F_uv) with each F updated in its branch.

        Args:
          z: (B, Lz, D) tokens.
          f_s: (B, M_s, D) screen features.
          m_s: (B, M_s) bool, True on valid screen tokens.
          f_uv: (B, M_uv, D) UV features, or None without the UV branch.
          m_uv: (B, M_uv) bool, True on valid UV tokens, or None.
        """
        dz, f_s = self.screen(z, f_s, m_s)
        if self.uv is not None:
            dz_uv, f_uv = self.uv(z, f_uv, m_uv)
            dz = dz + dz_uv
        return z + dz, f_s, f_uv


class UVTransformer(nnx.Module):
    """Learnable UV tokens refined by L dual-branch MM-attention blocks."""

    def __init__(
        self,
        config: UVTransformerConfig,
        *,
        param_type: ParamType = nnx.Param,
        rngs: nnx.Rngs,
    ):
        """Builds the tokens and blocks.

        Args:
          config: the architecture.
          param_type: `nnx.Param` (trained) or `FrozenParam`.
          rngs: initialisation RNGs.
        """
        c = config
        self.config = c
        self.taps = c.tap_depths
        kw = dict(
            uv_attention=c.uv_attention,
            mode=c.mode,
            mlp_ratio=c.mlp_ratio,
            attention_config=c.attention,
            dtype=jnp.dtype(c.dtype),
            param_type=param_type,
        )
        self.tokens = make_param(
            param_type, rngs, INIT_NORMAL, (c.num_tokens, c.dim), ("tokens", "embed")
        )
        # Joint mode: the last block does not update F (LAM's context_pre_only).
        n_body = c.depth - 1 if c.mode == "joint" else c.depth
        self.last = (
            DualBranchBlock(c.dim, c.num_heads, update_context=False, rngs=rngs, **kw)
            if n_body < c.depth
            else None
        )

        def make(r: nnx.Rngs) -> DualBranchBlock:
            return DualBranchBlock(c.dim, c.num_heads, update_context=True, rngs=r, **kw)

        if n_body == 0:
            self.blocks = None
        elif c.scan:

            @nnx.split_rngs(splits=n_body)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_stack(r: nnx.Rngs) -> DualBranchBlock:
                return make(r)

            self.blocks = make_stack(rngs)
        else:
            self.blocks = nnx.List([make(rngs) for _ in range(n_body)])
        self.n_body = n_body
        self.norm = LayerNorm(c.dim, 1e-6, param_type=param_type, rngs=rngs)

    def _block_fn(self) -> Callable[..., tuple]:
        """`apply(block, (Z, F_s, F_uv), (m_s, m_uv))`, rematerialised per the config's `remat`."""
        remat, scan = self.config.remat, self.config.scan

        def apply(block: DualBranchBlock, carry: tuple, masks: tuple) -> tuple:
            z, f_s, f_uv = block(carry[0], carry[1], masks[0], carry[2], masks[1])
            return (z, f_s, f_uv)

        if remat != "none":
            apply = nnx.remat(apply, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
        return apply

    def __call__(
        self,
        f_s: jax.Array,
        view_mask: jax.Array,
        f_uv: jax.Array | None = None,
    ) -> list[jax.Array]:
        """Runs the blocks.

        Args:
          f_s: (B, N, P, D) screen features of N (padded) views.
          view_mask: (B, N) bool, False for padded views; every example should have at
            least one valid view (in cross mode an example without one gets dZ = 0).
          f_uv: (B, N, P', D) UV features of the same views; required with UV attention,
            ignored without it.

        Returns:
          One (B, Lz, D) float32 array per tap depth (in `taps` order), after the final
          LayerNorm.
        """
        dim = self.config.dim
        if f_s.ndim != 4 or f_s.shape[-1] != dim:
            raise ValueError(f"f_s must be (B, N, P, {dim}), got {f_s.shape}")
        b, n = f_s.shape[:2]
        if view_mask.shape != (b, n):
            raise ValueError(f"view_mask {view_mask.shape} must be (B, N) = {(b, n)}")
        view_mask = view_mask.astype(bool)

        def flatten(f: jax.Array) -> tuple[jax.Array, jax.Array]:
            p = f.shape[2]
            mask = jnp.repeat(view_mask, p, axis=1)  # (B, N * p), view-major like f
            return f.reshape(b, n * p, dim).astype(jnp.float32), mask

        xs, m_s = flatten(f_s)
        if self.config.uv_attention:
            if f_uv is None or f_uv.ndim != 4 or f_uv.shape[:2] != (b, n):
                shape = None if f_uv is None else f_uv.shape
                raise ValueError(f"uv_attention needs f_uv (B={b}, N={n}, P', D), got {shape}")
            if f_uv.shape[-1] != dim:
                raise ValueError(f"f_uv width {f_uv.shape[-1]} != {dim}")
            xuv, m_uv = flatten(f_uv)
        else:
            xuv, m_uv = None, None  # F_uv is ignored entirely
        z = jnp.broadcast_to(self.tokens[...], (b, *self.tokens.shape)).astype(jnp.float32)
        carry, masks = (z, xs, xuv), (m_s, m_uv)
        apply = self._block_fn()
        outs: list[jax.Array] = []
        if self.blocks is not None and self.config.scan:

            @nnx.scan(
                in_axes=(0, nnx.Carry),
                out_axes=(nnx.Carry, 0),
                transform_metadata={nnx.PARTITION_NAME: "layers"},
            )
            def run(block: DualBranchBlock, c):
                c = apply(block, c, masks)
                return c, c[0]

            carry, zs = run(self.blocks, carry)
            outs = [zs[i] for i in range(self.n_body)]
        elif self.blocks is not None:
            for block in self.blocks:
                carry = apply(block, carry, masks)
                outs.append(carry[0])
        if self.last is not None:
            carry = apply(self.last, carry, masks)
            outs.append(carry[0])
        return [self.norm(outs[t - 1]) for t in self.taps]
