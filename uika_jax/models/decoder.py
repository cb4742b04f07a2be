"""The UV decoder: UV tokens from several depths -> one canonical Gaussian per anchor (UIKA §3).

Data flow (paper sizes in brackets; every size is a `UVDecoderConfig` field):

1. Token maps. Each tapped (B, side^2, D) token array of `UVTransformer` [4 taps,
   side 96, D 1024] is reshaped row-major to a (B, side, side, D) map. The token grid
   is laid out like the UV map: token (i, j) covers the texels of rows
   [i M / side, (i + 1) M / side) and the matching columns (rows pointing down, as in
   image UV, `uika_jax.head.uv_raster`).
2-3. The DPT neck (`uika_jax.models.dpt.DPTNeck`, readout "ignore"). Reassemble, per
   tap, shallowest first: a 1x1 conv D -> `neck_channels[i]`, then resampling by
   `factors[i]` (a learned transposed conv for f > 1, a strided 3x3 conv for f < 1),
   then a 3x3 conv to `features` channels. The default factors (2, 1, 1/2, 1/4) give a
   pyramid [192, 96, 48, 24]. Fusion, deepest first:
   `x = proj(resize(rcu2(x + rcu1(skip))))`; each block resizes to the next level's
   size and the last one to the decoder map size M [384 = 4 x side] (bilinear,
   align_corners=True; the neck's `output_size`, where DPT doubles the shallowest level).
4. Feature map: ReLU(3x3 conv features -> C) gives the (B, M, M, C) map [C 256].
5. Aggregation (if `aggregation`): I_aggr (3) and gamma (1), (B, M, M, 4) from
   `uika_jax.models.reproject`, are concatenated to the map.
6. Per-texel MLP and Gaussian head: the map is read at the K anchor texels
   (`Anchors.texels`, (row, column) in an M x M map, so the anchors must be made
   at uv_resolution M) and a per-texel MLP (`mlp_layers` x [Linear, SiLU]) feeds the
   attribute layers of `uika_jax.models.gaussians.GaussianHead` (activations,
   ranges, the colour fusion c = w c_aggr + (1 - w) c_hat with w forced to 0 on
   unobserved texels, means = anchor + d_mu).

Reading before the MLP is exact, not an approximation: a per-texel MLP (1x1 convs)
followed by a gather equals the gather followed by the MLP, and it computes only K
rows instead of M^2.

Ablations: `aggregation=False` ("w/o aggr") never reads I_aggr or gamma (they may be
passed and are ignored), so c_aggr is unavailable and colours are c_hat;
`color_fusion=False` keeps I_aggr and gamma as decoder inputs but sets c = c_hat.
The fusion-weight layer exists only when both are on (`fuses_color`).

Weights: the reassemble / fusion convs as in `dpt` (N(0, 1/fan-in), zero biases;
kernels (None, None, "conv_in", "conv_out")); the output conv's kernel (None, None,
"conv_in", "texel"), MLP layers N(0, 1/fan-in) with ("texel", "texel"); the attribute
layers as in `gaussians`. Computation runs in `dtype` up to the feature map; the MLP
and the head run in float32.

Sharding: "texel" (the feature map's channels and everything computed per anchor
texel) is replicated in the configs' rules, so the per-Gaussian activations (B, K, C)
are split only along the batch: a channel split would make XLA all-gather the
per-Gaussian features between the MLP's layers (measured: 6 such gathers in the
sharded train step), whereas the output conv's split input channels are summed by
an all-reduce of the map instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uika_jax.head.anchors import Anchors
from uika_jax.models import dpt, vit_layers
from uika_jax.models.frozen import ParamType
from uika_jax.models.gaussians import CanonicalGaussians, GaussianHead, GaussianHeadConfig

AGGR_CHANNELS = 4
"""I_aggr (3) + gamma (1)."""


def _level_size(side: int, factor: float) -> int:
    """Side of a reassembled level (`dpt.ReassembleLayer` with factor f)."""
    if factor > 1:
        return side * int(factor)
    if factor < 1:
        stride = round(1 / factor)
        return (side + 2 - 3) // stride + 1
    return side


@dataclasses.dataclass(frozen=True)
class UVDecoderConfig:
    """Architecture of the UV decoder (defaults: paper scale).

    Attributes:
      in_dim: token width D.
      token_side: side of the token grid (Lz = side^2).
      neck_channels: reassembled channels per tap, shallowest tap first.
      factors: resampling factor per tap (integer > 1, 1, or 1 / integer).
      features: fusion width.
      map_size: side M of the decoder feature map (= the anchors' uv_resolution).
      channels: C, channels of the feature map.
      mlp_hidden: width of the per-texel MLP.
      mlp_layers: number of [Linear, SiLU] layers of the per-texel MLP (0: none).
      aggregation: feed I_aggr and gamma to the decoder and use c_aggr ("w/o aggr": False).
      color_fusion: fuse c_aggr with c_hat (False: c = c_hat).
      head: ranges and inits of the Gaussian attributes.
      dtype: compute dtype of the reassemble / fusion stages.
    """

    in_dim: int = 1024
    token_side: int = 96
    neck_channels: tuple[int, ...] = (256, 512, 1024, 1024)
    factors: tuple[float, ...] = (2, 1, 0.5, 0.25)
    features: int = 256
    map_size: int = 384
    channels: int = 256
    mlp_hidden: int = 256
    mlp_layers: int = 2
    aggregation: bool = True
    color_fusion: bool = True
    head: GaussianHeadConfig = GaussianHeadConfig()  # noqa: RUF009 (frozen dataclass)
    dtype: str = "float32"

    def __post_init__(self):
        n = len(self.neck_channels)
        if n == 0 or len(self.factors) != n:
            raise ValueError(
                f"need one factor per tap: neck_channels {self.neck_channels}, "
                f"factors {self.factors}"
            )
        for f in self.factors:
            dpt._check_factor(f)
        if min(self.in_dim, self.token_side, self.features, self.map_size, self.channels) < 1:
            raise ValueError(f"sizes must be positive: {self}")
        if self.mlp_layers < 0 or (self.mlp_layers and self.mlp_hidden < 1):
            raise ValueError(f"bad MLP: {self.mlp_layers} layers of width {self.mlp_hidden}")
        if jnp.dtype(self.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype}")

    @property
    def num_taps(self) -> int:
        """Number of tapped token arrays the decoder takes."""
        return len(self.neck_channels)

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """Side of each reassembled level, shallowest tap first."""
        return tuple(_level_size(self.token_side, f) for f in self.factors)

    @property
    def fuses_color(self) -> bool:
        """Whether colours are fused (needs both aggregation and color_fusion)."""
        return self.aggregation and self.color_fusion


TEXEL_NAMES = ("texel", "texel")
"""Logical names of the per-texel MLP's kernels (in, out): replicated (module docstring)."""


class _Linear(nnx.Module):
    """`y = x @ kernel + bias`, kernel N(0, 1 / din), zero bias, names `TEXEL_NAMES`."""

    def __init__(self, din: int, dout: int, *, param_type: ParamType, rngs: nnx.Rngs):
        names = TEXEL_NAMES
        self.kernel = vit_layers.make_param(param_type, rngs, dpt.CONV_INIT, (din, dout), names)
        zeros = nnx.initializers.zeros
        self.bias = vit_layers.make_param(param_type, rngs, zeros, (dout,), names[1:])

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., din) -> (..., dout) in x's dtype."""
        return x @ self.kernel[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


class UVDecoder(nnx.Module):
    """Tapped UV tokens (+ I_aggr, gamma) -> `CanonicalGaussians` at the anchors."""

    def __init__(
        self,
        config: UVDecoderConfig,
        rngs: nnx.Rngs,
        *,
        param_type: ParamType = nnx.Param,
    ):
        """Creates the neck, the feature-map conv, the per-texel MLP and the Gaussian head.

        Args:
          config: the architecture.
          rngs: initialisation keys.
          param_type: weight type (`nnx.Param`: trained).
        """
        c = config
        self.config = c
        kw = dict(param_type=param_type, rngs=rngs)
        neck = dpt.DPTConfig(
            in_dim=c.in_dim, neck_channels=c.neck_channels, factors=c.factors, features=c.features
        )
        self.neck = dpt.DPTNeck(neck, **kw)
        self.out_conv = dpt.Conv2d(c.features, c.channels, 3, names=("conv_in", "texel"), **kw)
        width = c.channels + (AGGR_CHANNELS if c.aggregation else 0)
        layers = []
        for _ in range(c.mlp_layers):
            layers.append(_Linear(width, c.mlp_hidden, **kw))
            width = c.mlp_hidden
        self.mlp = nnx.List(layers)
        self.head = GaussianHead(width, c.head, color_fusion=c.fuses_color, **kw)

    def feature_map(self, tokens: Sequence[jax.Array]) -> jax.Array:
        """Steps 1-4: tapped tokens -> the (B, M, M, C) feature map (in the compute dtype).

        Args:
          tokens: `num_taps` arrays (B, side^2, D), shallowest first.

        Returns:
          (B, M, M, C).
        """
        c = self.config
        self._check_tokens(tokens)
        dtype = jnp.dtype(c.dtype)
        maps = [
            t.reshape(t.shape[0], c.token_side, c.token_side, c.in_dim).astype(dtype)
            for t in tokens
        ]
        fused = self.neck(maps, output_size=(c.map_size, c.map_size))[-1]
        return jax.nn.relu(self.out_conv(fused))

    def _check_tokens(self, tokens: Sequence[jax.Array]) -> None:
        c = self.config
        if len(tokens) != c.num_taps:
            raise ValueError(f"expected {c.num_taps} tapped token arrays, got {len(tokens)}")
        for t in tokens:
            if t.ndim != 3 or t.shape[1:] != (c.token_side**2, c.in_dim):
                raise ValueError(
                    f"expected tokens (B, {c.token_side**2}, {c.in_dim}), got shape {t.shape}"
                )
            if t.shape[0] != tokens[0].shape[0]:
                raise ValueError("all tapped token arrays must share the batch size")

    def _check_anchors(self, anchors: Anchors) -> None:
        m = self.config.map_size
        if anchors.uv_resolution != m:
            raise ValueError(
                f"anchors index a {anchors.uv_resolution}x{anchors.uv_resolution} UV map but the "
                f"decoder map is {m}x{m}: make the anchors with uv_resolution={m}"
            )
        texels, positions = anchors.texels, anchors.positions
        k = texels.shape[0]
        if texels.shape != (k, 2) or positions.shape != (k, 3):
            raise ValueError(
                f"anchors need texels (K, 2) and positions (K, 3), got {texels.shape} and "
                f"{positions.shape}"
            )
        # Values are checked only when concrete (NumPy, or a committed jax.Array); abstract
        # texels (tracers, ShapeDtypeStruct, e.g. closed over under eval_shape) are not
        # (under jit the gather clamps an out-of-range texel).
        concrete = isinstance(texels, np.ndarray) or (
            isinstance(texels, jax.Array) and not isinstance(texels, jax.core.Tracer)
        )
        t = np.asarray(texels) if concrete else None
        if t is not None and k and (t.min() < 0 or t.max() >= m):
            raise ValueError(f"anchor texels outside [0, {m}) (anchors not from a UV map?)")

    def _check_aggregated(self, x: jax.Array | None, channels: int, batch: int, name: str):
        m = self.config.map_size
        if x is None:
            raise ValueError(f"aggregation is on: pass {name} ({batch}, {m}, {m}, {channels})")
        if x.ndim == 3 and channels == 1:
            x = x[..., None]
        if x.shape != (batch, m, m, channels):
            raise ValueError(f"{name} must be ({batch}, {m}, {m}, {channels}), got {x.shape}")
        return x

    def __call__(
        self,
        tokens: Sequence[jax.Array],
        anchors: Anchors,
        i_aggr: jax.Array | None = None,
        gamma: jax.Array | None = None,
    ) -> CanonicalGaussians:
        """Decodes the canonical Gaussians.

        Args:
          tokens: `num_taps` tapped token arrays (B, side^2, D), shallowest first
            (`UVTransformer`'s output).
          anchors: K anchors made at uv_resolution = map_size (`make_anchors`); their
            texels are range-checked when concrete (under `jit` an out-of-range texel
            would be clamped to the border by the gather).
          i_aggr: (B, M, M, 3) aggregated colours, 0 where unobserved (needed when
            aggregation is on, ignored otherwise).
          gamma: (B, M, M, 1) or (B, M, M) confidence in [0, 1], 0 exactly where
            unobserved (needed when aggregation is on, ignored otherwise).

        Returns:
          `CanonicalGaussians` with (B, K, ...) float32 fields.
        """
        c = self.config
        self._check_tokens(tokens)
        self._check_anchors(anchors)
        if c.aggregation:
            b = tokens[0].shape[0]
            i_aggr = self._check_aggregated(i_aggr, 3, b, "i_aggr")
            gamma = self._check_aggregated(gamma, 1, b, "gamma")
        fmap = self.feature_map(tokens)
        rows = jnp.asarray(anchors.texels[:, 0], jnp.int32)
        cols = jnp.asarray(anchors.texels[:, 1], jnp.int32)
        x = fmap[:, rows, cols].astype(jnp.float32)  # (B, K, C)
        aggr_colors = hit = None
        if c.aggregation:
            aggr_colors = i_aggr[:, rows, cols].astype(jnp.float32)  # (B, K, 3)
            gamma_k = gamma[:, rows, cols].astype(jnp.float32)  # (B, K, 1)
            hit = gamma_k[..., 0] > 0
            x = jnp.concatenate([x, aggr_colors, gamma_k], axis=-1)
        for layer in self.mlp:
            x = jax.nn.silu(layer(x))
        return self.head(x, anchors.positions, aggr_colors, hit)
