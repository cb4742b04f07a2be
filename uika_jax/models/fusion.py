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
from uika_jax.models.correspondence import default_taps
from uika_jax.models.dpt import Conv2d
from uika_jax.models.vit import ViT, ViTConfig, backbone_vit, normalize_imagenet


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
    """Screen and UV feature tokens, view-major (token n * P + k is patch k of view n).

    Attributes:
      screen: (B, N, P, D) screen features per view; 0 for padded views.
      uv: (B, N, P', D) UV features per view; 0 for padded views.
      view_mask: (B, N) bool, False for padded views.
    """

    screen: jax.Array
    uv: jax.Array
    view_mask: jax.Array

    @property
    def f_s(self) -> jax.Array:
        """(B, N * P, D) screen tokens F_s."""
        b, n, p, d = self.screen.shape
        return self.screen.reshape(b, n * p, d)

    @property
    def f_uv(self) -> jax.Array:
        """(B, N * P', D) UV tokens F_uv."""
        b, n, p, d = self.uv.shape
        return self.uv.reshape(b, n * p, d)

    @property
    def screen_mask(self) -> jax.Array:
        """(B, N * P) bool token mask of F_s."""
        return jnp.repeat(self.view_mask, self.screen.shape[2], axis=1)

    @property
    def uv_mask(self) -> jax.Array:
        """(B, N * P') bool token mask of F_uv."""
        return jnp.repeat(self.view_mask, self.uv.shape[2], axis=1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BackboneFeatures:
    """What the frozen ViT gives the fusion CNNs (B' = B * N views, padded views zeroed).

    Attributes:
      screen: tapped ViT maps of the screen images, each (B', h, w, D_vit).
      screen_pixels: (B', H, W, 3) the ImageNet-normalised screen images.
      uv: tapped ViT maps of the UV maps, each (B', h', w', D_vit).
      uv_pixels: (B', uv_size, uv_size, 3) the normalised, resized UV maps.
      view_mask: (B, N) bool.
    """

    screen: tuple[jax.Array, ...]
    screen_pixels: jax.Array
    uv: tuple[jax.Array, ...]
    uv_pixels: jax.Array
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
        self.dtype = dtype
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

    def backbone(
        self,
        images: jax.Array,
        uv_maps: jax.Array,
        view_mask: jax.Array | None = None,
    ) -> BackboneFeatures:
        """Runs the frozen ViT on both streams (the first half of `__call__`).

        Args: as `__call__`.

        Returns:
          The `BackboneFeatures` of the B * N screen images and UV maps.
        """
        if images.ndim != 5 or images.shape[-1] != 3:
            raise ValueError(f"expected images (B, N, H, W, 3), got shape {images.shape}")
        b, n, h, w, _ = images.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"images are {h}x{w}, the encoder expects {self.image_size}^2")
        if uv_maps.ndim != 5 or uv_maps.shape[:2] != (b, n) or uv_maps.shape[-1] != 3:
            raise ValueError(f"expected uv_maps (B={b}, N={n}, R, R, 3), got {uv_maps.shape}")
        r = uv_maps.shape[2]
        if uv_maps.shape[3] != r:
            raise ValueError(f"uv_maps must be square, got {uv_maps.shape[2:4]}")
        if view_mask is None:
            view_mask = jnp.ones((b, n), jnp.bool_)
        view_mask = jnp.asarray(view_mask).astype(bool)
        if view_mask.shape != (b, n):
            raise ValueError(f"view_mask shape {view_mask.shape} != {(b, n)}")

        valid = view_mask[:, :, None, None, None]
        # Padded views are zeroed first: whatever they hold (NaN included) never reaches
        # a weight or its gradient.
        images = jnp.where(valid, images.astype(jnp.float32), 0.0)
        uv_maps = jnp.where(valid, uv_maps.astype(jnp.float32), 0.0)
        if r != self.uv_size:
            uv_maps = jax.image.resize(
                uv_maps, (b, n, self.uv_size, self.uv_size, 3), method="linear", antialias=True
            )
        screen_pixels = normalize_imagenet(images.reshape(b * n, h, w, 3))
        uv_pixels = normalize_imagenet(uv_maps.reshape(b * n, self.uv_size, self.uv_size, 3))
        if not self.train_backbone:  # the ViT is a constant of any gradient
            screen_pixels = jax.lax.stop_gradient(screen_pixels)
            uv_pixels = jax.lax.stop_gradient(uv_pixels)

        def run(x: jax.Array) -> tuple[jax.Array, ...]:
            features = self.vit(x.astype(self.dtype), layers=self.layers).features
            return tuple(f.astype(jnp.float32) for f in features)

        return BackboneFeatures(
            screen=run(screen_pixels),
            screen_pixels=screen_pixels,
            uv=run(uv_pixels),
            uv_pixels=uv_pixels,
            view_mask=view_mask,
        )

    def fuse(self, features: BackboneFeatures) -> DualEncoderOutput:
        """Runs the two fusion CNNs on the backbone features (the second half of `__call__`)."""
        b, n = features.view_mask.shape
        token_valid = features.view_mask[:, :, None, None]

        def stream(cnn: FusionCNN, maps: tuple[jax.Array, ...], pixels: jax.Array) -> jax.Array:
            fused = cnn(maps, pixels)
            fused = fused.reshape(b, n, -1, fused.shape[-1])
            return jnp.where(token_valid, fused, 0.0)

        return DualEncoderOutput(
            screen=stream(self.screen_cnn, features.screen, features.screen_pixels),
            uv=stream(self.uv_cnn, features.uv, features.uv_pixels),
            view_mask=features.view_mask,
        )

    def __call__(
        self,
        images: jax.Array,
        uv_maps: jax.Array,
        view_mask: jax.Array | None = None,
    ) -> DualEncoderOutput:
        """Encodes screen images and per-view UV maps: `fuse(backbone(...))`.

        Args:
          images: (B, N, H, W, 3) screen images in [0, 1], H = W = image_size.
          uv_maps: (B, N, R', R', 3) per-view reprojected UV maps in [0, 1]
            (`Reprojection.i_uv`), resized to uv_size here.
          view_mask: (B, N) bool, False for padded views; None: all valid.

        Returns:
          The `DualEncoderOutput` (float32).
        """
        return self.fuse(self.backbone(images, uv_maps, view_mask))
