"""The dual encoder: a frozen ViT + light trainable CNNs -> screen and UV feature tokens.

UIKA §2 encodes the N screen images and the N per-view reprojected UV maps
(`uika_jax.models.reproject`, `Reprojection.i_uv`) with one frozen pretrained
ViT (DINOv3 / DINOv2), then fuses shallow and deep ViT layers with a light
trainable CNN per stream:

    screen images (B, N, H, W, 3) in [0, 1]        UV maps (B, N, R', R', 3) in [0, 1]
      (padded views zeroed)                          resized to uv_size x uv_size
      -> ImageNet normalisation -> shared frozen ViT, tapping `layers`
      -> per stream: FusionCNN                      (separate weights per stream)
           x = sum_i proj_i(layer_i) [+ rgb_proj(patchify(image))]
           x = x + conv3x3(gelu(x))
           x = x + pos                               learned, per patch, shared by views
      -> zeroed for padded views
      -> F_s (B, N, P, D), F_uv (B, N, P', D)       P = (H/p)(W/p), P' = (uv_size/p)^2

`proj_i` are 1x1 convs from the ViT width to D, `rgb_proj` a kernel = stride = patch
conv on the normalised RGB (the shallowest input; `use_rgb`), `pos` a learned
position embedding: the transformer adds none (`uika_jax.models.transformer`),
and the UV grid is a canonical frame where absolute position is meaningful.
Views are processed independently (no op mixes views), so a padded view never
changes a valid view's tokens, and the tokens of padded views are exactly 0.

UV maps: each view's reprojected map is resized bilinearly with antialiasing
(`jax.image.resize(..., "linear")`) from R' x R' to `uv_size` x `uv_size`, the
ViT input side (a multiple of the patch; e.g. 384 -> 256 at patch 16 gives a
16 x 16 grid); no resize when R' = uv_size. Texels without a hit are 0 (black).
Without UV maps (`uv_maps=None`, the "w/o uv_attn" ablation) the UV stream is not
computed at all.

Shared ViT pass: a caller that already ran the ViT on the screen images (the
correspondence estimator's `backbone`, tapping these layers too) passes that output
as `screen_backbone`, and the screen stream reuses it instead of a second pass.

Frozen backbone: the ViT's weights are `FrozenParam` (outside
`nnx.Optimizer(..., wrt=nnx.Param)` and `nnx.DiffState(0, nnx.Param)`), and
both its inputs and its outputs pass through `stop_gradient`, so a gradient
computation never differentiates through it (no ViT backward, no ViT weight
gradient; the RGB input of the CNNs is the same stopped tensor, so no gradient
reaches the input images or UV maps either). `train_backbone=True` makes the ViT
weights `nnx.Param` and drops the stop_gradients (for the tiny config, which
trains a small ViT from scratch).

Logical axis names of the trainable weights: proj_i kernels (None, None, "embed",
"conv_out") (input: the ViT width), rgb_proj kernel ("patch", "conv_out"), the
3x3 conv (None, None, "conv_in", "conv_out"), biases ("conv_out",), pos
(None, "conv_out"); "conv_out" is the token width D.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from uika_jax.models import vit_layers
from uika_jax.models.dpt import Conv2d
from uika_jax.models.vit import ViT, ViTConfig, ViTOutput, backbone_vit, default_taps, vit_input


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """The light fusion CNNs of the dual encoder.

    Attributes:
      dim: token width D of F_s and F_uv.
      layers: 0-based ViT blocks tapped, shallowest first (negative from the end);
        None: up to 4 evenly spaced blocks ending at the last (`default_taps`).
      use_rgb: add the patchified RGB input as the shallowest level.
      pos_embed: add a learned per-patch position embedding (shared by the views).
    """

    dim: int
    layers: tuple[int, ...] | None = None
    use_rgb: bool = True
    pos_embed: bool = True

    def taps(self, num_layers: int) -> tuple[int, ...]:
        """The tapped blocks for a ViT of `num_layers` blocks (0-based, non-negative)."""
        if self.layers is None:
            return tuple(sorted(set(default_taps(num_layers, min(4, num_layers)))))
        if not self.layers:
            raise ValueError("FusionConfig.layers must tap at least one block")
        if any(not -num_layers <= i < num_layers for i in self.layers):
            raise ValueError(f"tapped layers {self.layers} out of range for {num_layers} blocks")
        return tuple(int(i) % num_layers for i in self.layers)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DualEncoderOutput:
    """Screen and UV feature tokens per view (token k of view n is patch k, row-major).

    Attributes:
      screen: (B, N, P, D) screen features F_s per view; 0 for padded views.
      uv: (B, N, P', D) UV features F_uv per view, 0 for padded views; None when the UV
        stream was not computed (no UV maps given).
      view_mask: (B, N) bool, False for padded views.
    """

    screen: jax.Array
    uv: jax.Array | None
    view_mask: jax.Array


class FusionCNN(nnx.Module):
    """One stream's light CNN: fuses tapped ViT maps (and the RGB) into D-wide tokens."""

    def __init__(
        self,
        vit_dim: int,
        num_levels: int,
        config: FusionConfig,
        *,
        patch_size: int,
        grid: tuple[int, int],
        rngs: nnx.Rngs,
    ):
        """Creates the weights.

        Args:
          vit_dim: width of the ViT maps.
          num_levels: number of tapped ViT maps.
          config: the fusion configuration.
          patch_size: the ViT patch side (for the RGB patchification).
          grid: (h, w) patch grid, for the position embedding.
          rngs: initialisation keys.
        """
        d = config.dim
        self.patch_size = patch_size
        self.grid = tuple(grid)
        self.proj = nnx.List(
            [
                Conv2d(vit_dim, d, 1, names=("embed", "conv_out"), rngs=rngs)
                for _ in range(num_levels)
            ]
        )
        self.rgb_proj = (
            vit_layers.Dense(
                3 * patch_size**2, d, ("patch", "conv_out"), param_type=nnx.Param, rngs=rngs
            )
            if config.use_rgb
            else None
        )
        self.mix = Conv2d(d, d, 3, rngs=rngs)
        self.pos = (
            vit_layers.make_param(
                nnx.Param, rngs, vit_layers.INIT_NORMAL, (grid[0] * grid[1], d), (None, "conv_out")
            )
            if config.pos_embed
            else None
        )

    def __call__(self, features: tuple[jax.Array, ...], rgb: jax.Array | None) -> jax.Array:
        """Fuses the maps.

        Args:
          features: tapped ViT maps, each (B, h, w, vit_dim).
          rgb: (B, h * p, w * p, 3) the normalised ViT input (used with `use_rgb`).

        Returns:
          (B, h, w, D) fused features.
        """
        if len(features) != len(self.proj):
            raise ValueError(f"{len(features)} feature maps for {len(self.proj)} projections")
        x = sum(proj(f) for proj, f in zip(self.proj, features, strict=True))
        if self.rgb_proj is not None:
            x = x + self.rgb_proj(vit_layers.patchify(rgb.astype(x.dtype), self.patch_size))
        x = x + self.mix(jax.nn.gelu(x, approximate=False))
        if self.pos is not None:
            _, h, w, d = x.shape
            if (h, w) != self.grid:
                raise ValueError(f"patch grid {(h, w)} != the position embedding's {self.grid}")
            x = x + self.pos[...].reshape(1, h, w, d).astype(x.dtype)
        return x


class DualEncoder(nnx.Module):
    """Frozen shared ViT + per-stream fusion CNNs -> F_s and F_uv (see the module docstring)."""

    def __init__(
        self,
        vit_config: ViTConfig,
        fusion_config: FusionConfig,
        *,
        image_size: int,
        uv_size: int,
        train_backbone: bool = False,
        dtype: jnp.dtype = jnp.float32,
        vit: ViT | None = None,
        rngs: nnx.Rngs,
    ):
        """Builds the encoder (random init; load pretrained ViT weights with convert.hf_vit).

        Args:
          vit_config: the shared backbone.
          fusion_config: the fusion CNNs (one per stream, separate weights).
          image_size: side H = W of the screen images (a multiple of the patch).
          uv_size: side of the UV maps as the ViT sees them (a multiple of the patch).
          train_backbone: make the ViT weights `nnx.Param` instead of `FrozenParam`
            + stop_gradient.
          dtype: computation dtype of the ViT (weights stay float32; outputs float32).
          vit: an existing ViT to use (e.g. the correspondence estimator's, shared) instead
            of building one; its config must be `vit_config` and its stop_gradient
            `not train_backbone`.
          rngs: initialisation keys.
        """
        p = vit_config.patch_size
        for name, size in (("image_size", image_size), ("uv_size", uv_size)):
            if size <= 0 or size % p:
                raise ValueError(f"{name} {size} is not a positive multiple of the patch {p}")
        self.image_size = int(image_size)
        self.uv_size = int(uv_size)
        self.layers = fusion_config.taps(vit_config.num_layers)
        self.train_backbone = train_backbone
        if vit is None:
            vit = backbone_vit(vit_config, trainable=train_backbone, dtype=dtype, rngs=rngs)
        elif vit.config != vit_config or vit.stop_gradient != (not train_backbone):
            raise ValueError(
                "the given vit does not match vit_config / train_backbone "
                f"(stop_gradient={vit.stop_gradient}, train_backbone={train_backbone})"
            )
        self.vit = vit
        kw = dict(patch_size=p, rngs=rngs)
        d, n = vit_config.hidden_size, len(self.layers)
        self.screen_cnn = FusionCNN(d, n, fusion_config, grid=(image_size // p,) * 2, **kw)
        self.uv_cnn = FusionCNN(d, n, fusion_config, grid=(uv_size // p,) * 2, **kw)

    def __call__(
        self,
        images: jax.Array,
        uv_maps: jax.Array | None,
        view_mask: jax.Array | None = None,
        *,
        screen_backbone: ViTOutput | None = None,
    ) -> DualEncoderOutput:
        """Encodes screen images and per-view UV maps.

        Args:
          images: (B, N, H, W, 3) screen images in [0, 1], H = W = image_size.
          uv_maps: (B, N, R', R', 3) per-view reprojected UV maps in [0, 1]
            (`Reprojection.i_uv`), resized to uv_size here; None: no UV stream.
          view_mask: (B, N) bool, False for padded views; None: all valid.
          screen_backbone: the ViT's output on the B * N screen images with padded views
            zeroed (`CorrespondenceEstimator.backbone` of the shared ViT, tapping at least
            `layers`); None: this encoder runs its ViT on them.

        Returns:
          The `DualEncoderOutput` (float32).
        """
        if images.ndim != 5 or images.shape[-1] != 3:
            raise ValueError(f"expected images (B, N, H, W, 3), got shape {images.shape}")
        b, n, h, w, _ = images.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"images are {h}x{w}, the encoder expects {self.image_size}^2")
        if uv_maps is not None:
            if uv_maps.ndim != 5 or uv_maps.shape[:2] != (b, n) or uv_maps.shape[-1] != 3:
                raise ValueError(f"expected uv_maps (B={b}, N={n}, R, R, 3), got {uv_maps.shape}")
            if uv_maps.shape[3] != uv_maps.shape[2]:
                raise ValueError(f"uv_maps must be square, got {uv_maps.shape[2:4]}")
        if view_mask is None:
            view_mask = jnp.ones((b, n), jnp.bool_)
        view_mask = jnp.asarray(view_mask).astype(bool)
        if view_mask.shape != (b, n):
            raise ValueError(f"view_mask shape {view_mask.shape} != {(b, n)}")
        frozen = not self.train_backbone
        screen_pixels = vit_input(images, view_mask, frozen=frozen).reshape(b * n, h, w, 3)
        if screen_backbone is None:
            screen_backbone = self.vit(screen_pixels, layers=self.layers)
        screen = self._stream(self.screen_cnn, screen_backbone, screen_pixels, view_mask)
        if uv_maps is None:
            return DualEncoderOutput(screen=screen, uv=None, view_mask=view_mask)

        # Padded views are zeroed before the resize (which mixes texels, never views).
        uv_maps = jnp.where(view_mask[:, :, None, None, None], uv_maps.astype(jnp.float32), 0.0)
        s = self.uv_size
        if uv_maps.shape[2] != s:
            uv_maps = jax.image.resize(uv_maps, (b, n, s, s, 3), method="linear", antialias=True)
        uv_pixels = vit_input(uv_maps, frozen=frozen).reshape(b * n, s, s, 3)
        uv_backbone = self.vit(uv_pixels, layers=self.layers)
        uv = self._stream(self.uv_cnn, uv_backbone, uv_pixels, view_mask)
        return DualEncoderOutput(screen=screen, uv=uv, view_mask=view_mask)

    def _stream(
        self, cnn: FusionCNN, backbone: ViTOutput, pixels: jax.Array, view_mask: jax.Array
    ) -> jax.Array:
        """One stream's fusion CNN on its ViT maps -> (B, N, P, D), padded views 0."""
        maps, _ = backbone.taps(self.layers)
        fused = cnn(tuple(f.astype(jnp.float32) for f in maps), pixels)
        b, n = view_mask.shape
        fused = fused.reshape(b, n, -1, fused.shape[-1])
        return jnp.where(view_mask[:, :, None, None], fused, 0.0)
