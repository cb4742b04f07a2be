"""DPT neck and head (Ranftl et al. 2021) as NNX modules: ViT feature maps -> dense prediction.

The structure follows HF transformers' `DPTNeck` / `DPTDepthEstimationHead`
(`modeling_dpt.py`, 5.24) in NHWC, which the tests check to 1e-5:

1. Reassemble, per tapped level i: the readout (cls) token is ignored, added,
   or concatenated and projected (`Linear(2D -> D)` + exact GELU); a 1x1 conv
   projects D -> `neck_channels[i]`; the map is resampled by `factors[i]`:
   a transposed conv with kernel = stride = f (f > 1, integer), identity (1), or
   a 3x3 conv with stride 1/f and padding 1 (f < 1).
2. A 3x3 conv without bias per level maps `neck_channels[i]` -> `features`.
3. Fusion, from the deepest level to the shallowest: `x = x + rcu1(skip)` (not
   for the deepest level, which has no rcu1), `x = rcu2(x)`, bilinear resize
   (align_corners=True), 1x1 conv. Each RCU is pre-activation:
   `x + conv(relu(conv(relu(x))))` with 3x3 convs (with bias, no batch norm).
   A block resizes its output to the next level's size (the last one doubles
   it); for the usual nested sizes (each level twice the next, e.g. an even
   patch grid with factors 4, 2, 1, 1/2) that is HF's `scale_factor=2`. Where
   sizes do not nest, HF instead resizes the skip; we follow Depth Anything's
   `size=` rule, which never resizes a skip.
4. Head: 3x3 conv `features -> features // 2`, bilinear resize (align_corners
   =True) to the output size (the input image size; HF doubles, which is the
   same for patch 16 with the usual factors), 3x3 conv to `head_channels`,
   ReLU, 1x1 conv to `out_channels`. The head has no output activation (HF's
   depth head ends in a ReLU; callers apply their own).

Everything is generic over the number of levels and their widths, and the neck's
last fused map may be given any size (`output_size`), so other decoders reuse
`DPTNeck` (the UV decoder does).

Weights are created by `vit_layers.make_param` with logical axis names:

    conv kernels    (None, None, "conv_in", "conv_out") (kh, kw, in, out)
    conv biases     ("conv_out",)
    reassemble 1x1  ("embed", "conv_out"): its input is the ViT width
    transposed conv ("conv_in", None, None, "conv_out") (in, f, f, out)
    readout project ("readout", "embed") (2D, D), bias ("embed",)

Init: kernels N(0, 1 / fan-in) (LeCun, untruncated; a transposed conv's fan-in
is its input width, as every output pixel sees one input pixel), zero biases,
readout N(0, 0.02) as in the ViT. Computation runs in the input's dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uika_jax.models import vit_layers
from uika_jax.models.frozen import ParamType

CONV_INIT = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
"""Kernel init of every convolution: N(0, 1 / fan-in), fan-in = kh * kw * in."""


def upsample_init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """Kernel init of the transposed convs (in, f, f, out): N(0, 1 / in) (fan-in = in)."""
    return (jax.random.normal(key, shape, dtype) * (1.0 / np.sqrt(shape[0]))).astype(dtype)


CONV_NAMES = ("conv_in", "conv_out")
"""Logical names of a conv kernel's (in, out) axes."""


def _interp_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
    """The (n_out, n_in) matrix of PyTorch's 1D linear interpolation."""
    out = np.arange(n_out, dtype=np.float64)
    if align_corners:
        src = out * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros_like(out)
    else:
        src = np.maximum((out + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - w1)
    np.add.at(m, (np.arange(n_out), i1), w1)
    return m.astype(np.float32)


def resize_bilinear(x: jax.Array, size: tuple[int, int], *, align_corners: bool) -> jax.Array:
    """Bilinear resize of (B, H, W, C) maps with PyTorch `interpolate` semantics (no antialias).

    Implemented as two small matrix products (exact separable weights), which
    suits every backend. `align_corners=False` clamps source coordinates below 0
    like PyTorch.

    Args:
      x: (B, H, W, C) maps.
      size: output (height, width).
      align_corners: PyTorch's flag.

    Returns:
      (B, height, width, C) in x's dtype.
    """
    h, w = x.shape[1:3]
    oh, ow = size
    if (oh, ow) == (h, w):
        return x
    mh = jnp.asarray(_interp_matrix(h, oh, align_corners), x.dtype)
    mw = jnp.asarray(_interp_matrix(w, ow, align_corners), x.dtype)
    x = jnp.einsum("oh,bhwc->bowc", mh, x)
    return jnp.einsum("pw,bowc->bopc", mw, x)


class Conv2d(nnx.Module):
    """A square-kernel 2D convolution on NHWC maps with PyTorch's symmetric zero padding."""

    def __init__(
        self,
        din: int,
        dout: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int | None = None,
        use_bias: bool = True,
        names: tuple[str, str] = CONV_NAMES,
        param_type: ParamType = nnx.Param,
        rngs: nnx.Rngs,
    ):
        """Creates the weights.

        Args:
          din: input channels.
          dout: output channels.
          kernel_size: kernel side k.
          stride: stride.
          padding: zero padding on each side; default k // 2 ("same" for odd k, stride 1).
          use_bias: add a bias.
          names: logical names of the kernel's (in, out) axes.
          param_type: `nnx.Param` (trainable) or `FrozenParam`.
          rngs: initialisation keys.
        """
        k = kernel_size
        self.stride = stride
        self.padding = k // 2 if padding is None else padding
        shape = (k, k, din, dout)
        self.kernel = vit_layers.make_param(
            param_type, rngs, CONV_INIT, shape, (None, None, *names)
        )
        self.bias = (
            vit_layers.make_param(param_type, rngs, nnx.initializers.zeros, (dout,), names[1:])
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, din) -> (B, H', W', dout) in x's dtype."""
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel[...].astype(x.dtype),
            window_strides=(self.stride, self.stride),
            padding=((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class Upsample(nnx.Module):
    """A transposed conv with kernel = stride = f and no padding (each pixel -> an f x f block).

    The blocks do not overlap, so it is one matrix product and a depth-to-space.
    A PyTorch `ConvTranspose2d` weight (in, out, f, f) is our kernel transposed
    to (in, f, f, out).
    """

    def __init__(
        self,
        din: int,
        dout: int,
        factor: int,
        *,
        param_type: ParamType = nnx.Param,
        rngs: nnx.Rngs,
    ):
        """Creates the kernel (din, f, f, dout) and bias (dout,)."""
        self.factor = factor
        names = (CONV_NAMES[0], None, None, CONV_NAMES[1])
        shape = (din, factor, factor, dout)
        self.kernel = vit_layers.make_param(param_type, rngs, upsample_init, shape, names)
        zeros = nnx.initializers.zeros
        self.bias = vit_layers.make_param(param_type, rngs, zeros, (dout,), CONV_NAMES[1:])

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, din) -> (B, f H, f W, dout)."""
        b, h, w, _ = x.shape
        f = self.factor
        y = jnp.einsum("bhwc,cijo->bhiwjo", x, self.kernel[...].astype(x.dtype))
        y = y.reshape(b, h * f, w * f, -1)
        return y + self.bias[...].astype(x.dtype)


def _check_factor(factor: float) -> None:
    if factor >= 1 and factor != int(factor):
        raise ValueError(f"an upsampling factor must be an integer, got {factor}")
    if 0 < factor < 1 and abs(1 / factor - round(1 / factor)) > 1e-6:
        raise ValueError(f"a downsampling factor must be 1/integer, got {factor}")
    if factor <= 0:
        raise ValueError(f"resampling factors must be positive, got {factor}")


Readout = Literal["ignore", "add", "project"]


class ReassembleLayer(nnx.Module):
    """One level of the reassemble stage: readout, 1x1 projection, resampling."""

    def __init__(
        self,
        in_dim: int,
        channels: int,
        factor: float,
        *,
        readout: Readout = "ignore",
        param_type: ParamType = nnx.Param,
        rngs: nnx.Rngs,
    ):
        """Creates the level.

        Args:
          in_dim: width D of the token map.
          channels: output channels.
          factor: resampling factor: integer > 1, 1, or 1 / integer.
          readout: "ignore", "add" or "project" (how the cls token enters).
          param_type: weight type.
          rngs: initialisation keys.
        """
        _check_factor(factor)
        if readout not in ("ignore", "add", "project"):
            raise ValueError(f"readout must be 'ignore', 'add' or 'project', got {readout!r}")
        kw = dict(param_type=param_type, rngs=rngs)
        self.readout = readout
        self.readout_proj = (
            vit_layers.Dense(2 * in_dim, in_dim, ("readout", "embed"), **kw)
            if readout == "project"
            else None
        )
        self.projection = Conv2d(in_dim, channels, 1, names=("embed", "conv_out"), **kw)
        self.resample: Upsample | Conv2d | None
        if factor > 1:
            self.resample = Upsample(channels, channels, int(factor), **kw)
        elif factor < 1:
            self.resample = Conv2d(channels, channels, 3, stride=round(1 / factor), **kw)
        else:
            self.resample = None

    def __call__(self, x: jax.Array, cls: jax.Array | None = None) -> jax.Array:
        """(B, h, w, D) token map (+ (B, D) cls token) -> (B, h', w', channels)."""
        if self.readout != "ignore":
            if cls is None:
                raise ValueError(f"readout {self.readout!r} needs the cls tokens")
            cls = jnp.broadcast_to(cls[:, None, None, :].astype(x.dtype), x.shape)
            if self.readout == "add":
                x = x + cls
            else:
                x = jax.nn.gelu(self.readout_proj(jnp.concatenate([x, cls], -1)), approximate=False)
        x = self.projection(x)
        return x if self.resample is None else self.resample(x)


class ResidualConvUnit(nnx.Module):
    """Pre-activation residual unit: `x + conv2(relu(conv1(relu(x))))`, 3x3 convs with bias."""

    def __init__(self, features: int, *, param_type: ParamType = nnx.Param, rngs: nnx.Rngs):
        """Creates the two convs (features -> features)."""
        kw = dict(param_type=param_type, rngs=rngs)
        self.conv1 = Conv2d(features, features, 3, **kw)
        self.conv2 = Conv2d(features, features, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, F) -> (B, H, W, F)."""
        return x + self.conv2(jax.nn.relu(self.conv1(jax.nn.relu(x))))


class FusionBlock(nnx.Module):
    """RefineNet-style fusion: `proj(resize(rcu2(x + rcu1(skip))))` (rcu1 only with a skip)."""

    def __init__(
        self,
        features: int,
        *,
        has_skip: bool = True,
        param_type: ParamType = nnx.Param,
        rngs: nnx.Rngs,
    ):
        """Creates the block.

        Args:
          features: channel width F.
          has_skip: whether the block fuses a skip map (False for the deepest level).
          param_type: weight type.
          rngs: initialisation keys.
        """
        kw = dict(param_type=param_type, rngs=rngs)
        self.rcu1 = ResidualConvUnit(features, **kw) if has_skip else None
        self.rcu2 = ResidualConvUnit(features, **kw)
        self.projection = Conv2d(features, features, 1, **kw)

    def __call__(
        self, x: jax.Array, skip: jax.Array | None = None, *, size: tuple[int, int] | None = None
    ) -> jax.Array:
        """Fuses and resizes.

        Args:
          x: (B, H, W, F) the path from deeper levels (or the deepest level's map).
          skip: (B, H, W, F) this level's map; required iff built with has_skip.
          size: output (height, width); default (2H, 2W).

        Returns:
          (B, height, width, F).
        """
        if (skip is None) != (self.rcu1 is None):
            raise ValueError("pass a skip map exactly when the block was built with has_skip")
        if skip is not None:
            if skip.shape != x.shape:
                raise ValueError(f"skip shape {skip.shape} != fused path shape {x.shape}")
            x = x + self.rcu1(skip)
        x = self.rcu2(x)
        size = (2 * x.shape[1], 2 * x.shape[2]) if size is None else size
        return self.projection(resize_bilinear(x, size, align_corners=True))


@dataclasses.dataclass(frozen=True)
class DPTConfig:
    """Architecture of a DPT neck + head (HF `DPTConfig` names in brackets).

    Attributes:
      in_dim: width of the tapped token maps [hidden_size]; an int for all levels
        or one per level.
      neck_channels: reassembled channels per level, shallowest first [neck_hidden_sizes].
      factors: resampling factor per level [reassemble_factors].
      features: fusion width [fusion_hidden_size].
      readout: cls-token handling [readout_type].
      head_channels: hidden width of the head's last 3x3 conv (32 in HF).
      out_channels: output channels of the head.
    """

    in_dim: int | tuple[int, ...]
    neck_channels: tuple[int, ...] = (96, 192, 384, 768)
    factors: tuple[float, ...] = (4, 2, 1, 0.5)
    features: int = 256
    readout: Readout = "ignore"
    head_channels: int = 32
    out_channels: int = 1

    def __post_init__(self):
        n = len(self.neck_channels)
        if n == 0 or len(self.factors) != n or len(self.in_dims) != n:
            raise ValueError(
                f"need one factor and in_dim per level: neck_channels {self.neck_channels}, "
                f"factors {self.factors}, in_dim {self.in_dim}"
            )
        for f in self.factors:
            _check_factor(f)
        if self.features < 2 or self.features % 2:
            raise ValueError(f"features must be even and >= 2, got {self.features}")
        if self.readout not in ("ignore", "add", "project"):
            raise ValueError(f"readout must be 'ignore', 'add' or 'project', got {self.readout!r}")

    @property
    def num_levels(self) -> int:
        """Number of tapped levels."""
        return len(self.neck_channels)

    @property
    def in_dims(self) -> tuple[int, ...]:
        """Input width per level."""
        if isinstance(self.in_dim, int):
            return (self.in_dim,) * len(self.neck_channels)
        return tuple(self.in_dim)


class DPTNeck(nnx.Module):
    """Reassemble + per-level 3x3 convs + fusion (HF `DPTNeck`)."""

    def __init__(self, config: DPTConfig, *, param_type: ParamType = nnx.Param, rngs: nnx.Rngs):
        """Creates the neck for `config.num_levels` levels."""
        c = config
        self.config = c
        kw = dict(param_type=param_type, rngs=rngs)
        self.reassemble = nnx.List(
            [
                ReassembleLayer(d, ch, f, readout=c.readout, **kw)
                for d, ch, f in zip(c.in_dims, c.neck_channels, c.factors, strict=True)
            ]
        )
        self.level_convs = nnx.List(
            [Conv2d(ch, c.features, 3, use_bias=False, **kw) for ch in c.neck_channels]
        )
        # fusion[0] handles the deepest level (no skip), fusion[-1] the shallowest.
        self.fusion = nnx.List(
            [FusionBlock(c.features, has_skip=i > 0, **kw) for i in range(c.num_levels)]
        )

    def __call__(
        self,
        features: Sequence[jax.Array],
        cls_tokens: Sequence[jax.Array] | None = None,
        *,
        output_size: tuple[int, int] | None = None,
    ) -> tuple[jax.Array, ...]:
        """Runs the neck.

        Args:
          features: one (B, h, w, in_dims[i]) token map per level, shallowest first.
          cls_tokens: the matching (B, in_dims[i]) cls tokens (needed unless readout
            is "ignore").
          output_size: (height, width) of the last fused map; default twice the
            shallowest reassembled level's size.

        Returns:
          The fused maps (B, *, *, features), deepest first (HF order); the last one
          (at `output_size`) feeds the head.
        """
        c = self.config
        if len(features) != c.num_levels:
            raise ValueError(f"expected {c.num_levels} feature maps, got {len(features)}")
        if cls_tokens is not None and len(cls_tokens) != c.num_levels:
            raise ValueError(f"expected {c.num_levels} cls tokens, got {len(cls_tokens)}")
        for x, d in zip(features, c.in_dims, strict=True):
            if x.ndim != 4 or x.shape[-1] != d:
                raise ValueError(f"expected a (B, h, w, {d}) feature map, got shape {x.shape}")
        maps = [
            conv(layer(x, None if cls_tokens is None else cls_tokens[i]))
            for i, (layer, conv, x) in enumerate(
                zip(self.reassemble, self.level_convs, features, strict=True)
            )
        ]
        maps = maps[::-1]
        fused, out = None, []
        for i, block in enumerate(self.fusion):
            size = maps[i + 1].shape[1:3] if i + 1 < len(maps) else output_size
            fused = block(maps[i], size=size) if fused is None else block(fused, maps[i], size=size)
            out.append(fused)
        return tuple(out)


class DPTHead(nnx.Module):
    """Conv 3x3 (F -> F/2), resize to the output size, conv 3x3 (-> hidden), ReLU, conv 1x1."""

    def __init__(
        self,
        features: int,
        head_channels: int,
        out_channels: int,
        *,
        param_type: ParamType = nnx.Param,
        rngs: nnx.Rngs,
    ):
        """Creates the three convs."""
        kw = dict(param_type=param_type, rngs=rngs)
        self.conv1 = Conv2d(features, features // 2, 3, **kw)
        self.conv2 = Conv2d(features // 2, head_channels, 3, **kw)
        self.conv3 = Conv2d(head_channels, out_channels, 1, **kw)

    def __call__(
        self,
        x: jax.Array,
        size: tuple[int, int] | None = None,
        *,
        out_dtype: jnp.dtype | None = None,
    ) -> jax.Array:
        """(B, H, W, F) -> (B, height, width, out_channels); size defaults to (2H, 2W).

        `out_dtype`: dtype of the last 1x1 conv's computation and output (None: x's dtype).
        """
        x = self.conv1(x)
        size = (2 * x.shape[1], 2 * x.shape[2]) if size is None else size
        x = jax.nn.relu(self.conv2(resize_bilinear(x, size, align_corners=True)))
        return self.conv3(x if out_dtype is None else x.astype(out_dtype))


class DPT(nnx.Module):
    """DPT neck + head: tapped ViT maps -> (B, H, W, out_channels) at the requested size."""

    def __init__(self, config: DPTConfig, *, param_type: ParamType = nnx.Param, rngs: nnx.Rngs):
        """Creates the neck and the head."""
        self.config = config
        kw = dict(param_type=param_type, rngs=rngs)
        self.neck = DPTNeck(config, **kw)
        self.head = DPTHead(config.features, config.head_channels, config.out_channels, **kw)

    def __call__(
        self,
        features: Sequence[jax.Array],
        cls_tokens: Sequence[jax.Array] | None = None,
        *,
        output_size: tuple[int, int] | None = None,
        out_dtype: jnp.dtype | None = None,
    ) -> jax.Array:
        """Runs neck and head.

        Args:
          features: one (B, h, w, D) map per level, shallowest first.
          cls_tokens: the matching (B, D) cls tokens (unless readout is "ignore").
          output_size: (H, W) of the prediction, usually the input image size;
            default twice the neck output.
          out_dtype: dtype of the head's last 1x1 conv and of the output (None: the
            features' dtype); float32 keeps bfloat16 rounding out of the outputs.

        Returns:
          (B, H, W, out_channels) raw outputs (no activation).
        """
        return self.head(self.neck(features, cls_tokens)[-1], output_size, out_dtype=out_dtype)
