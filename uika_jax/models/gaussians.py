"""Canonical Gaussians, the Gaussian head (attribute layers + activations), the offset regulariser.

The UV decoder (`uika_jax.models.decoder`) turns the feature of each anchor texel into
one Gaussian. `GaussianHead` holds one linear layer per attribute (LAM's GSLayer in
`lam/models/rendering/gs_renderer.py`, aigc3d/LAM) and applies the activations once;
`CanonicalGaussians` stores the result in the project's conventions (quaternions wxyz,
scales as log, opacity as logit, activated once by the accessors).

Attributes, activations and ranges (v is the raw output of the attribute's layer):

    attribute    k  activation                                  range              init (W, b)
    c_hat        3  sigmoid(v)                                  (0, 1)             N(0, 1/fan-in), 0
    w            1  sigmoid(v)  (only with colour fusion)       (0, 1)             0, logit(0.5)
    opacity      1  stored logit v; opacities() = sigmoid(v)    (0, 1)             0, logit(0.1)
    d_mu         3  (sigmoid(v) - 0.5) * max_offset_step        (-step/2, step/2)  0, 0
    scale        3  stored log s = log m - softplus(log m - v)  (0, max_scale)     0, b_s
                    (m = max_scale); scales() = exp(log s)
    rotation     4  v / max(||v||, 1e-12), wxyz                 unit               0, (1, 0, 0, 0)

Scale: LAM activates with exp and clamps to [0, 0.01] m, which passes no gradient at
the cap. We use a soft cap instead, s = max_scale * sigmoid(v - log max_scale), stored
as its log, log s = log m - softplus(log m - v): the stored value is exactly the log of
the scale the rasterizer gets, s < max_scale always, s ~ exp(v) well below the cap, and
d log s / dv = sigmoid(log m - v) > 0 everywhere (1/2 at v = log m).
The initial scale s0 is either `init_scale` (metres; LAM's exp(-5) = 6.7e-3 m by default)
or, with `init_scale_in_spacings` set, that many times `anchor_spacing`, the mean
distance from an anchor to its nearest neighbour (`mean_anchor_spacing`; filled in by
`GaussianHeadConfig.from_config` from the anchors). LAM's 6.7 mm suits its 20K points,
but the ~130K anchors of a 384 x 384 UV map lie about 1.1 mm apart, where 6.7 mm
Gaussians overlap tens of neighbours and cost the rasterizer about 1.1M intersections
per 512 x 512 view. The bias b_s inverts the soft cap, so the scale at init is s0
exactly (s0 < max_scale is required). max_scale = 0.01 m is LAM's (head units: metres).
d_mu: each component lies in (-max_offset_step / 2, max_offset_step / 2), so LAM's
step 0.2 gives +-0.1 m; at init v = 0 and d_mu = 0 exactly. The fusion weight w (not
in LAM; the paper gives no init) starts at `init_fusion_weight` = 0.5, an even mix where
observed, which the network moves with the confidence gamma it sees as an input.

Zero-initialised layers pass no gradient to the layers before them at init (their
kernel is 0); the shared trunk still learns from the start through c_hat, whose layer
is randomly initialised as in LAM.

Adaptive colour fusion (UIKA §3), per Gaussian k with c_aggr[k] the aggregated colour
I_aggr at the anchor's texel (nearest: the anchor IS a texel of the UV map) and
hit[k] = gamma > 0 at that texel (at least one pixel of some view landed there):

    w_eff[k] = w[k] * hit[k]
    c[k]     = w_eff[k] * c_aggr[k] + (1 - w_eff[k]) * c_hat[k]

Where no pixel was observed, I_aggr is 0 (black, not a colour), so the colour falls
back to the prediction: w is forced to 0 there, and no gradient reaches w from such
Gaussians. Without colour fusion (or without aggregation), c = c_hat and no w layer
exists. `fusion_weights` stores w_eff.

The offset regulariser (the paper's L_reg = ||max(d_mu, eps)||, weight 0.1 in the loss):

    reg = mean_k max(||d_mu_k||_2 - eps, 0)

over the Gaussians selected by an optional mask, with a norm whose gradient at
d_mu = 0 is 0 (not NaN, as d sqrt at 0 would give); d_mu is exactly 0 at init.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.spatial
from flax import nnx

from uika_jax.models import vit_layers
from uika_jax.models.dpt import CONV_INIT
from uika_jax.models.frozen import ParamType

HEAD_NAMES = ("texel", "gaussian_attr")
"""Logical names of an attribute layer's (in, out) axes."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CanonicalGaussians:
    """B sets of K canonical (undeformed) Gaussians, one per anchor.

    Attributes:
      means: (B, K, 3) centres, anchor position + offsets.
      quats: (B, K, 4) unit quaternions, wxyz.
      log_scales: (B, K, 3) natural log of the scales (`scales()` activates).
      opacity_logits: (B, K) logit of the opacities (`opacities()` activates).
      colors: (B, K, 3) RGB in [0, 1] after adaptive colour fusion.
      offsets: (B, K, 3) d_mu, the predicted displacement from the anchor.
      fusion_weights: (B, K, 1) effective fusion weight w * hit (0 without fusion).
      pred_colors: (B, K, 3) c_hat, the network's colour.
      aggr_colors: (B, K, 3) c_aggr, I_aggr at the anchor's texel (0 where unobserved
        or without aggregation).
    """

    means: jax.Array
    quats: jax.Array
    log_scales: jax.Array
    opacity_logits: jax.Array
    colors: jax.Array
    offsets: jax.Array
    fusion_weights: jax.Array
    pred_colors: jax.Array
    aggr_colors: jax.Array

    @property
    def num_gaussians(self) -> int:
        """K."""
        return self.means.shape[-2]

    def scales(self) -> jax.Array:
        """(B, K, 3) linear scales, exp(log_scales), as the rasterizer takes them."""
        return jnp.exp(self.log_scales)

    def opacities(self) -> jax.Array:
        """(B, K) opacities in (0, 1), sigmoid(opacity_logits), as the rasterizer takes them."""
        return jax.nn.sigmoid(self.opacity_logits)


@dataclasses.dataclass(frozen=True)
class GaussianHeadConfig:
    """Ranges and inits of the Gaussian attributes (module docstring; defaults: LAM's).

    Attributes:
      max_scale: soft upper bound of every scale (metres in head units).
      init_scale: every scale at init (metres), used when `init_scale_in_spacings` is None.
      init_scale_in_spacings: every scale at init in units of `anchor_spacing`, or None.
      anchor_spacing: mean nearest-neighbour distance of the anchors (metres), or None;
        needed with `init_scale_in_spacings`.
      max_offset_step: d_mu components lie in (-max_offset_step / 2, max_offset_step / 2).
      init_opacity: opacity at init (bias logit(init_opacity)).
      init_fusion_weight: fusion weight w at init (bias logit(init_fusion_weight)).
    """

    max_scale: float = 0.01
    init_scale: float = math.exp(-5.0)
    init_scale_in_spacings: float | None = None
    anchor_spacing: float | None = None
    max_offset_step: float = 0.2
    init_opacity: float = 0.1
    init_fusion_weight: float = 0.5

    def __post_init__(self):
        for name in ("max_scale", "init_scale", "max_offset_step"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("init_scale_in_spacings", "anchor_spacing"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")
        if self.init_scale_in_spacings is not None and self.anchor_spacing is None:
            raise ValueError(
                "init_scale_in_spacings needs anchor_spacing (GaussianHeadConfig.from_config "
                "with the anchor positions computes it)"
            )
        for name in ("init_opacity", "init_fusion_weight"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if not self.initial_scale < self.max_scale:
            raise ValueError(
                f"the initial scale {self.initial_scale:.4g} must be below max_scale "
                f"{self.max_scale:.4g}"
            )

    @property
    def initial_scale(self) -> float:
        """Every scale at init (metres)."""
        if self.init_scale_in_spacings is None:
            return self.init_scale
        return self.init_scale_in_spacings * self.anchor_spacing

    @property
    def init_log_scale(self) -> float:
        """Log of every scale at init (the stored `log_scales` at init)."""
        return math.log(self.initial_scale)

    @property
    def scale_bias(self) -> float:
        """Bias of the scale layer: the v whose soft-capped log scale is `init_log_scale`."""
        gap = math.log(self.max_scale) - self.init_log_scale  # > 0
        return math.log(self.max_scale) - (gap + math.log(-math.expm1(-gap)))

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any] | None, anchor_positions: np.ndarray | None = None
    ) -> GaussianHeadConfig:
        """Builds the config from a mapping of field values (e.g. `config.model.gaussians`).

        Args:
          config: field names -> values (an `ml_collections.ConfigDict` works); missing
            fields keep their defaults; None gives the defaults.
          anchor_positions: (K, 3) template anchor positions; with `init_scale_in_spacings`
            set and no `anchor_spacing` given, the spacing is `mean_anchor_spacing` of them.

        Returns:
          The config.

        Raises:
          ValueError: unknown field names, or `init_scale_in_spacings` without anchors.
        """
        values = dict(config or {})
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown Gaussian head config fields: {unknown}")
        needs_spacing = values.get("init_scale_in_spacings") is not None
        if needs_spacing and values.get("anchor_spacing") is None:
            if anchor_positions is None:
                raise ValueError("init_scale_in_spacings needs anchor_positions or anchor_spacing")
            values["anchor_spacing"] = mean_anchor_spacing(anchor_positions)
        return cls(**values)


def mean_anchor_spacing(positions: np.ndarray) -> float:
    """Mean distance from each anchor to its nearest other anchor (host-side, k-d tree).

    Args:
      positions: (K, 3) anchor positions, K >= 2.

    Returns:
      The mean nearest-neighbour distance (units of the positions).
    """
    positions = np.asarray(positions, np.float64)
    if positions.ndim != 2 or positions.shape[1] != 3 or positions.shape[0] < 2:
        raise ValueError(f"anchor positions must be (K >= 2, 3), got shape {positions.shape}")
    distances, _ = scipy.spatial.cKDTree(positions).query(positions, k=2)
    return float(np.mean(distances[:, 1]))


def soft_cap_log_scale(v: jax.Array, max_scale: float) -> jax.Array:
    """Log s with s = max_scale * sigmoid(v - log max_scale): a soft minimum of v and log m.

    Written as log m - softplus(log m - v), stable for any v; its derivative
    sigmoid(log m - v) lies in (0, 1), so the cap never stops the gradient.
    """
    log_max = math.log(max_scale)
    return log_max - jax.nn.softplus(log_max - v)


class AttributeLayer(nnx.Module):
    """`y = x @ kernel + bias` (in, k) with a given kernel init and a constant bias init."""

    def __init__(
        self,
        din: int,
        bias: tuple[float, ...],
        *,
        zero_kernel: bool,
        param_type: ParamType = nnx.Param,
        rngs: nnx.Rngs,
    ):
        """Creates the layer.

        Args:
          din: input width.
          bias: initial bias, one value per output.
          zero_kernel: zero kernel (True) or N(0, 1 / din) (False).
          param_type: weight type.
          rngs: initialisation keys.
        """
        init = nnx.initializers.zeros if zero_kernel else CONV_INIT
        self.kernel = vit_layers.make_param(param_type, rngs, init, (din, len(bias)), HEAD_NAMES)
        values = jnp.asarray(bias, jnp.float32)
        self.bias = vit_layers.make_param(
            param_type, rngs, lambda *_: values, (len(bias),), HEAD_NAMES[1:]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., din) -> (..., k) in float32."""
        x = x.astype(jnp.float32)
        return x @ self.kernel[...] + self.bias[...]


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class GaussianHead(nnx.Module):
    """Per-attribute linear layers + activations: anchor features -> `CanonicalGaussians`."""

    def __init__(
        self,
        din: int,
        config: GaussianHeadConfig = GaussianHeadConfig(),
        *,
        color_fusion: bool = True,
        param_type: ParamType = nnx.Param,
        rngs: nnx.Rngs,
    ):
        """Creates the attribute layers.

        Args:
          din: width of the per-anchor feature.
          config: ranges and inits.
          color_fusion: build the fusion-weight layer and fuse colours (else c = c_hat).
          param_type: weight type.
          rngs: initialisation keys.
        """
        self.config = config
        self.color_fusion = color_fusion
        kw = dict(param_type=param_type, rngs=rngs)
        self.color = AttributeLayer(din, (0.0,) * 3, zero_kernel=False, **kw)
        self.fusion_weight = (
            AttributeLayer(din, (_logit(config.init_fusion_weight),), zero_kernel=True, **kw)
            if color_fusion
            else None
        )
        opacity_bias = (_logit(config.init_opacity),)
        self.opacity = AttributeLayer(din, opacity_bias, zero_kernel=True, **kw)
        self.offset = AttributeLayer(din, (0.0,) * 3, zero_kernel=True, **kw)
        scale_bias = (config.scale_bias,) * 3
        self.scale = AttributeLayer(din, scale_bias, zero_kernel=True, **kw)
        self.rotation = AttributeLayer(din, (1.0, 0.0, 0.0, 0.0), zero_kernel=True, **kw)

    def __call__(
        self,
        features: jax.Array,
        anchor_positions: jax.Array,
        aggr_colors: jax.Array | None = None,
        hit: jax.Array | None = None,
    ) -> CanonicalGaussians:
        """Decodes one Gaussian per anchor feature.

        Args:
          features: (B, K, din) per-anchor features.
          anchor_positions: (K, 3) or (B, K, 3) template positions of the anchors.
          aggr_colors: (B, K, 3) c_aggr (I_aggr at the anchor texels); needed for fusion.
          hit: (B, K) bool, whether the anchor's texel was observed; needed for fusion.

        Returns:
          The canonical Gaussians (float32).
        """
        c = self.config
        b, k = features.shape[:2]
        pred_colors = jax.nn.sigmoid(self.color(features))
        if self.fusion_weight is not None:
            if aggr_colors is None or hit is None:
                raise ValueError("colour fusion needs aggr_colors and hit")
            aggr_colors = aggr_colors.astype(jnp.float32)
            w = jax.nn.sigmoid(self.fusion_weight(features)) * hit[..., None].astype(jnp.float32)
            colors = w * aggr_colors + (1.0 - w) * pred_colors
        else:
            w = jnp.zeros((b, k, 1), jnp.float32)
            colors = pred_colors
            aggr_colors = (
                jnp.zeros((b, k, 3), jnp.float32)
                if aggr_colors is None
                else aggr_colors.astype(jnp.float32)
            )
        offsets = (jax.nn.sigmoid(self.offset(features)) - 0.5) * c.max_offset_step
        means = jnp.asarray(anchor_positions, jnp.float32) + offsets
        log_scales = soft_cap_log_scale(self.scale(features), c.max_scale)
        q = self.rotation(features)
        quats = q / jnp.maximum(_safe_norm(q)[..., None], 1e-12)
        return CanonicalGaussians(
            means=means,
            quats=quats,
            log_scales=log_scales,
            opacity_logits=self.opacity(features)[..., 0],
            colors=colors,
            offsets=offsets,
            fusion_weights=w,
            pred_colors=pred_colors,
            aggr_colors=aggr_colors,
        )


def _safe_norm(x: jax.Array) -> jax.Array:
    """||x||_2 over the last axis, with gradient 0 (not NaN) at x = 0."""
    sq = jnp.sum(jnp.square(x), axis=-1)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def offset_regularizer(
    d_mu: jax.Array, mask: jax.Array | None = None, eps: float = 0.0
) -> jax.Array:
    """mean_k max(||d_mu_k||_2 - eps, 0) over the (masked) Gaussians (eps: the config's).

    Args:
      d_mu: (..., K, 3) offsets.
      mask: optional bool or {0, 1} array broadcastable to d_mu.shape[:-1]; the mean
        runs over the selected Gaussians only (0 if none is selected).
      eps: dead zone (metres): offsets shorter than eps cost nothing.

    Returns:
      A float32 scalar.
    """
    d_mu = jnp.asarray(d_mu, jnp.float32)
    if d_mu.ndim < 1 or d_mu.shape[-1] != 3:
        raise ValueError(f"d_mu must be (..., K, 3), got shape {d_mu.shape}")
    excess = jnp.maximum(_safe_norm(d_mu) - eps, 0.0)
    if mask is None:
        return jnp.mean(excess)
    weights = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), excess.shape)
    return jnp.sum(weights * excess) / jnp.maximum(jnp.sum(weights), 1.0)
