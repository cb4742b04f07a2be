"""DINOv2 / DINOv3 ViT backbones (frozen by default) returning chosen intermediate layers.

One module, `ViT`, covers both families through `ViTConfig.family`:

- "dinov2": patch 14, learned absolute position table (cls + n x n patches) resized
  to any patch grid with PyTorch-bicubic semantics (`vit_layers.interpolate_pos_embed`),
  optional register tokens (inserted after cls, after the position embedding).
- "dinov3": patch 16, no position table; axial 2D RoPE on the patch tokens' q/k
  (`vit_layers.rope_tables`), register tokens, optional gated MLP, no k bias.

Both: pre-norm blocks with LayerScale, a final LayerNorm. Presets: `ViTConfig.dinov2`
and `ViTConfig.dinov3` with sizes "s", "b", "l"; `uika_jax.convert.hf_vit` builds a
config from an HF `config.json` and loads HF-layout safetensors.

Input: images (B, H, W, 3), NHWC float, already normalised with the ImageNet mean
and std (`normalize_imagenet` maps [0, 1] RGB to that). HF models take the same
normalised values as NCHW `pixel_values`. H and W: any multiples of the patch size.

Output (`ViTOutput`): the final tokens after the final LayerNorm (cls, registers,
patch map), and for each requested block index the patch tokens as a (B, h, w, D)
map, normed by the final LayerNorm by default (HF `*Backbone.feature_maps` with
`apply_layernorm=True`, DINOv2's `get_intermediate_layers(norm=True)`), plus that
layer's cls token; `ViTOutput.taps` looks them up by block, so one pass can serve
several consumers (the correspondence estimator and the dual encoder share one).
Block indices are 0-based block outputs (negative counts from the end), so HF
backbone stage `k` (`out_indices=[k]`, k >= 1) is our layer `k - 1`; `default_taps`
spaces a consumer's taps evenly.
With `norm_features=False` every tapped layer is raw; HF's DINOv3 backbone still
norms its last stage in that case, DINOv2's `get_intermediate_layers(norm=False)`
does not, and we follow the latter.

Weights: `param_type=FrozenParam` (default; pretrained, outside `wrt=nnx.Param`) or
`nnx.Param` (train from scratch). Logical axis names are listed in
`uika_jax.models.vit_layers`; here: cls_token ("embed",), registers and pos_embed
(None, "embed"), mask_token ("embed",), patch_embed kernel ("patch", "embed").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from uika_jax.models import vit_layers
from uika_jax.models.frozen import FrozenParam, ParamType

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_SIZES = {  # width, depth, heads; MLP 4x
    "s": (384, 12, 6),
    "b": (768, 12, 12),
    "l": (1024, 24, 16),
}


def normalize_imagenet(images: jax.Array) -> jax.Array:
    """RGB in [0, 1], (..., 3) -> `(x - mean) / std` with the ImageNet statistics."""
    if images.shape[-1] != 3:
        raise ValueError(f"expected RGB images (..., 3), got shape {images.shape}")
    mean = jnp.asarray(IMAGENET_MEAN, images.dtype)
    std = jnp.asarray(IMAGENET_STD, images.dtype)
    return (images - mean) / std


def vit_input(images: jax.Array, valid: jax.Array | None = None, *, frozen: bool) -> jax.Array:
    """RGB images in [0, 1] -> the backbone's float32 input, as every consumer prepares it.

    Images whose `valid` entry is False (padded views) are zeroed first, so whatever they
    hold (NaN included) never reaches a weight or a gradient; then ImageNet normalisation.
    For a frozen backbone the result is under `stop_gradient`: the ViT is a constant of
    any gradient, and so are the pixels a consumer feeds elsewhere (the encoder's RGB
    projection), so no gradient reaches the images either.

    Args:
      images: (..., H, W, 3) RGB in [0, 1].
      valid: optional bool array of shape `...`, False for images to zero.
      frozen: whether the backbone is frozen.

    Returns:
      (..., H, W, 3) float32.
    """
    images = jnp.asarray(images, jnp.float32)
    if valid is not None:
        images = jnp.where(jnp.asarray(valid, bool)[..., None, None, None], images, 0.0)
    pixels = normalize_imagenet(images)
    return jax.lax.stop_gradient(pixels) if frozen else pixels


def default_taps(num_layers: int, num_levels: int = 4) -> tuple[int, ...]:
    """Evenly spaced 0-based block indices ending at the last block (DPT's (2, 5, 8, 11) for 12)."""
    if num_layers < 1 or num_levels < 1:
        raise ValueError(f"need >= 1 layer and level, got {num_layers} and {num_levels}")
    return tuple(max(0, round((i + 1) * num_layers / num_levels) - 1) for i in range(num_levels))


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of a DINOv2 / DINOv3 ViT (names follow the HF configs).

    Attributes:
      family: "dinov2" (position table) or "dinov3" (RoPE).
      hidden_size: width D.
      num_layers: number of blocks.
      num_heads: attention heads (head_dim = D / heads).
      mlp_dim: MLP hidden width.
      patch_size: patch side in pixels.
      image_size: dinov2: side of the pretraining image that sets the position table
        (n = image_size // patch_size); dinov3: unused by the model (RoPE).
      num_register_tokens: register tokens after cls.
      layer_norm_eps: epsilon of every LayerNorm.
      layerscale_value: LayerScale init (used when training from scratch).
      hidden_act: "gelu" (exact), "gelu_pytorch_tanh" or "silu".
      gated_mlp: `down(act(gate(x)) * up(x))` instead of `down(act(up(x)))`.
      query_bias: q projection bias (dinov2: `qkv_bias`).
      key_bias: k projection bias (DINOv3's HF checkpoints have none).
      value_bias: v projection bias.
      proj_bias: attention output projection bias.
      mlp_bias: MLP biases.
      rope_theta: dinov3 RoPE base.
      pos_embed_antialias: dinov2: antialias flag of the bicubic resize (HF:
        False for `Dinov2Model`, True for `Dinov2WithRegistersModel`).
      use_mask_token: holds a mask token (HF checkpoints do) for `patch_mask`.
    """

    family: Literal["dinov2", "dinov3"]
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    image_size: int = 224
    num_register_tokens: int = 0
    layer_norm_eps: float = 1e-6
    layerscale_value: float = 1.0
    hidden_act: str = "gelu"
    gated_mlp: bool = False
    query_bias: bool = True
    key_bias: bool = True
    value_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    rope_theta: float = 100.0
    pos_embed_antialias: bool = False
    use_mask_token: bool = True

    def __post_init__(self):
        if self.family not in ("dinov2", "dinov3"):
            raise ValueError(f"family must be 'dinov2' or 'dinov3', got {self.family!r}")
        if self.hidden_act not in vit_layers.ACTIVATIONS:
            raise ValueError(f"unknown hidden_act {self.hidden_act!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_heads}")

    @property
    def pos_grid(self) -> int:
        """Side n of DINOv2's n x n patch position table."""
        return self.image_size // self.patch_size

    @classmethod
    def dinov2(cls, size: str, *, registers: bool = False, **overrides) -> ViTConfig:
        """DINOv2 ViT-S/B/L 14 as in `facebook/dinov2-{small,base,large}` (image_size 518).

        With `registers=True`: `facebook/dinov2-with-registers-*` (4 registers,
        antialiased position resize as HF's `Dinov2WithRegistersModel`).
        """
        d, depth, heads = _SIZES[size]
        kw = dict(family="dinov2", hidden_size=d, num_layers=depth, num_heads=heads)
        kw |= dict(mlp_dim=4 * d, patch_size=14, image_size=518, layer_norm_eps=1e-6)
        if registers:
            kw |= dict(num_register_tokens=4, pos_embed_antialias=True)
        return cls(**(kw | overrides))

    @classmethod
    def dinov3(cls, size: str, **overrides) -> ViTConfig:
        """DINOv3 ViT-S/B/L 16 as in `facebook/dinov3-vit{s,b,l}16-pretrain-lvd1689m`."""
        d, depth, heads = _SIZES[size]
        kw = dict(family="dinov3", hidden_size=d, num_layers=depth, num_heads=heads)
        kw |= dict(mlp_dim=4 * d, patch_size=16, image_size=224, num_register_tokens=4)
        kw |= dict(layer_norm_eps=1e-5, key_bias=False, rope_theta=100.0)
        return cls(**(kw | overrides))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ViTOutput:
    """What `ViT.__call__` returns (a pytree).

    Attributes:
      tokens: (B, 1 + R + h * w, D) final tokens after the final LayerNorm.
      cls: (B, D) final cls token (tokens[:, 0]).
      registers: (B, R, D) final register tokens.
      patches: (B, h, w, D) final patch tokens.
      features: one (B, h, w, D) patch map per requested layer, in request order.
      feature_cls: the matching (B, D) cls tokens (normed like `features`).
      layers: the requested layers, 0-based and non-negative, in request order (static).
    """

    tokens: jax.Array
    cls: jax.Array
    registers: jax.Array
    patches: jax.Array
    features: tuple[jax.Array, ...]
    feature_cls: tuple[jax.Array, ...]
    layers: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    def taps(self, layers: Sequence[int]) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        """The patch maps and cls tokens of `layers` (0-based, non-negative), in that order.

        Raises:
          ValueError: if a layer was not requested from the pass that made this output.
        """
        index = {layer: i for i, layer in enumerate(self.layers)}
        missing = [i for i in layers if i not in index]
        if missing:
            raise ValueError(f"layers {missing} were not tapped (this pass tapped {self.layers})")
        return (
            tuple(self.features[index[i]] for i in layers),
            tuple(self.feature_cls[index[i]] for i in layers),
        )


class ViT(nnx.Module):
    """A DINOv2 / DINOv3 vision transformer (see the module docstring)."""

    def __init__(
        self,
        config: ViTConfig,
        *,
        param_type: ParamType = FrozenParam,
        dtype: jnp.dtype = jnp.float32,
        stop_gradient: bool = False,
        rngs: nnx.Rngs,
    ):
        """Builds the ViT with HF-style random init (load pretrained weights with convert.hf_vit).

        Args:
          config: the architecture.
          param_type: `FrozenParam` (pretrained, frozen) or `nnx.Param` (trainable).
          dtype: computation dtype (weights stay float32).
          stop_gradient: wrap every output in `jax.lax.stop_gradient` (no gradient
            reaches the input either).
          rngs: initialisation keys (`rngs.params()`).
        """
        c = config
        self.config = c
        self.dtype = dtype
        self.stop_gradient = stop_gradient
        kw = dict(param_type=param_type, rngs=rngs)
        d, p = c.hidden_size, c.patch_size
        init = vit_layers.INIT_NORMAL
        self.patch_embed = vit_layers.Dense(3 * p * p, d, ("patch", "embed"), **kw)
        self.cls_token = vit_layers.make_param(param_type, rngs, init, (d,), ("embed",))
        zeros = nnx.initializers.zeros
        self.mask_token = (
            vit_layers.make_param(param_type, rngs, zeros, (d,), ("embed",))
            if c.use_mask_token
            else None
        )
        r = c.num_register_tokens
        self.registers = (
            vit_layers.make_param(param_type, rngs, init, (r, d), (None, "embed")) if r else None
        )
        self.pos_embed = (
            vit_layers.make_param(param_type, rngs, init, (1 + c.pos_grid**2, d), (None, "embed"))
            if c.family == "dinov2"
            else None
        )
        self.blocks = nnx.List(
            [
                vit_layers.Block(
                    d,
                    c.num_heads,
                    c.mlp_dim,
                    eps=c.layer_norm_eps,
                    layerscale=c.layerscale_value,
                    act=c.hidden_act,
                    gated=c.gated_mlp,
                    qkv_bias=(c.query_bias, c.key_bias, c.value_bias),
                    proj_bias=c.proj_bias,
                    mlp_bias=c.mlp_bias,
                    **kw,
                )
                for _ in range(c.num_layers)
            ]
        )
        self.norm = vit_layers.LayerNorm(d, c.layer_norm_eps, **kw)

    def _check_input(self, images: jax.Array, patch_mask: jax.Array | None) -> tuple[int, int]:
        p = self.config.patch_size
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images (B, H, W, 3) NHWC, got shape {images.shape}")
        _, h, w, _ = images.shape
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(f"image size {h}x{w} is not a positive multiple of patch {p}")
        grid = (h // p, w // p)
        if patch_mask is not None:
            if self.mask_token is None:
                raise ValueError("patch_mask needs a model built with use_mask_token=True")
            if patch_mask.shape != (images.shape[0], *grid):
                raise ValueError(
                    f"patch_mask shape {patch_mask.shape} != {(images.shape[0], *grid)}"
                )
        return grid

    def _layer_ids(self, layers: tuple[int, ...]) -> list[int]:
        n = self.config.num_layers
        for i in layers:
            if not -n <= i < n:
                raise ValueError(f"layer index {i} out of range for {n} blocks")
        return [int(i) % n for i in layers]

    def __call__(
        self,
        images: jax.Array,
        *,
        layers: tuple[int, ...] = (),
        norm_features: bool = True,
        patch_mask: jax.Array | None = None,
    ) -> ViTOutput:
        """Runs the ViT.

        Args:
          images: (B, H, W, 3) ImageNet-normalised (see `normalize_imagenet`); H, W
            multiples of the patch size.
          layers: 0-based block indices to tap (negative from the end).
          norm_features: apply the final LayerNorm to the tapped layers.
          patch_mask: optional (B, h, w) bool; True patches are replaced by the mask
            token before position embedding (HF `bool_masked_pos`).

        Returns:
          A `ViTOutput`.
        """
        c = self.config
        gh, gw = self._check_input(images, patch_mask)
        ids = self._layer_ids(tuple(layers))
        b = images.shape[0]
        x = self.patch_embed(vit_layers.patchify(images.astype(self.dtype), c.patch_size))
        x = x.reshape(b, gh * gw, c.hidden_size)
        if patch_mask is not None:
            mask = patch_mask.reshape(b, gh * gw, 1)
            x = jnp.where(mask, self.mask_token[...].astype(x.dtype), x)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, c.hidden_size))
        x = jnp.concatenate([cls, x], axis=1)
        rope = None
        if self.pos_embed is not None:
            pos = vit_layers.interpolate_pos_embed(
                self.pos_embed[...], gh, gw, antialias=c.pos_embed_antialias
            )
            x = x + pos.astype(x.dtype)[None]
        else:
            rope = vit_layers.rope_tables(gh, gw, c.hidden_size // c.num_heads, c.rope_theta)
        n_prefix = 1 + c.num_register_tokens
        if self.registers is not None:
            reg = self.registers[...].astype(x.dtype)
            reg = jnp.broadcast_to(reg, (b, *reg.shape))
            x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)

        taps = {}
        for i, block in enumerate(self.blocks):
            x = block(x, rope)
            if i in ids:
                taps[i] = self.norm(x) if norm_features else x
        tokens = self.norm(x)
        grid = lambda t: t[:, n_prefix:].reshape(b, gh, gw, c.hidden_size)  # noqa: E731
        out = ViTOutput(
            tokens=tokens,
            cls=tokens[:, 0],
            registers=tokens[:, 1:n_prefix],
            patches=grid(tokens),
            features=tuple(grid(taps[i]) for i in ids),
            feature_cls=tuple(taps[i][:, 0] for i in ids),
            layers=tuple(ids),
        )
        return jax.lax.stop_gradient(out) if self.stop_gradient else out


def backbone_vit(
    config: ViTConfig, *, trainable: bool, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs
) -> ViT:
    """A backbone ViT: frozen unless `trainable`.

    Frozen means FrozenParam weights (outside the optimizer's `wrt=nnx.Param`) and
    outputs under stop_gradient; trainable means nnx.Param weights and gradients.
    """
    return ViT(
        config,
        param_type=nnx.Param if trainable else FrozenParam,
        dtype=dtype,
        stop_gradient=not trainable,
        rngs=rngs,
    )
