"""The UV correspondence estimator U(I): frozen ViT + DPT head -> per-pixel UV and face mask.

Pixel3DMM-style (SimonGiebenhain/pixel3dmm), with a DPT head as the paper's stage 1 asks
instead of Pixel3DMM's attention + transposed-conv head:

    images (..., H, W, 3) in [0, 1]   (padded views zeroed, `view_mask`)
      -> ImageNet normalisation -> ViT, tapping `layers` (normed patch maps + cls)
      -> DPT neck + head at the input resolution, 3 channels of logits
      -> uv = sigmoid(logits[..., 0:2])  image UV (u, 1 - v) in [0, 1]^2
         face_prob = sigmoid(logits[..., 2:3])

Image UV is the project's convention (`uika_jax.head.uv_raster`), the same
(u, 1 - v) layout as Pixel3DMM's uv_images; Pixel3DMM regresses 2 uv - 1
without an output activation, we keep [0, 1] with a sigmoid.

The backbone is frozen by default: its weights are `FrozenParam` (outside
`nnx.Optimizer(..., wrt=nnx.Param)` and `nnx.DiffState(0, nnx.Param)`) and its
outputs pass through `stop_gradient`, so no gradient is computed for it.
`train_backbone=True` makes it `nnx.Param` (the tiny config trains a small ViT
from scratch, as no pretrained weights are available offline).

Sharing the ViT pass: `backbone(images, extra_layers=...)` runs the ViT once, tapping
the DPT's layers and a second consumer's (the dual encoder's), and `__call__(...,
backbone=that)` predicts from it without a second pass.

Loss (`correspondence_loss`): `uv * L1 + mask * BCE` where L1 is the mean
absolute image-UV error per coordinate over ground-truth face pixels (pooled
over the batch; zero when no pixel is in the mask) and BCE the mean binary
cross-entropy of the face logit against the mask over all pixels. Default
weights: uv 10 (Pixel3DMM's uv weight), mask 1. Pixel3DMM's L1 is in [-1, 1]
units, twice ours, so its weighting of the same error is 20 in our units; it
also up-weights facial regions (weight mask + 0.2), which needs per-region
masks the synthetic data do not have yet.

Test-time flip averaging (`flip_averaged`, Pixel3DMM's inference trick) needs
the UV layout's mirror axis: u -> 2 c - u maps a surface point to its mirror
image. `SYNTHETIC_MIRROR_U` (the built-in synthetic head: frontal renders of
its ground-truth UV are mirror-symmetric about u = 0.5, median error 3e-5)
and `FLAME_MIRROR_U` (Pixel3DMM's -u + 2 * 0.0075 in [-1, 1] units for the
FLAME texture layout) are provided.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from uika_jax.models.dpt import DPT, DPTConfig
from uika_jax.models.vit import ViTConfig, ViTOutput, backbone_vit, default_taps, vit_input

SYNTHETIC_MIRROR_U = 0.5
"""Mirror axis u = c of the built-in synthetic head's UV layout."""

FLAME_MIRROR_U = 0.50375
"""Mirror axis of the FLAME texture layout as Pixel3DMM uses it (u' = 1.0075 - u)."""

OUT_CHANNELS = 3
"""DPT output channels: image UV (2) and the face logit (1)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CorrespondenceOutput:
    """Per-pixel correspondence (leading dims `...` as the input images).

    Attributes:
      uv: (..., H, W, 2) image UV (u, 1 - v) in [0, 1].
      face_prob: (..., H, W, 1) probability that the pixel shows the head surface.
      face_logit: (..., H, W, 1) its logit (use it for losses).
    """

    uv: jax.Array
    face_prob: jax.Array
    face_logit: jax.Array


class CorrespondenceEstimator(nnx.Module):
    """Frozen ViT + DPT head predicting image UV and a face mask (see the module docstring)."""

    def __init__(
        self,
        vit_config: ViTConfig,
        dpt_config: DPTConfig | None = None,
        *,
        layers: tuple[int, ...] | None = None,
        train_backbone: bool = False,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        """Builds the estimator (random init; load pretrained ViT weights with convert.hf_vit).

        Args:
          vit_config: the backbone.
          dpt_config: the head; `in_dim` must be the ViT width and `out_channels` 3.
            Default: `DPTConfig(in_dim=vit_config.hidden_size, out_channels=3)`.
          layers: ViT blocks to tap, one per DPT level, shallowest first (negative
            from the end; kept 0-based); default `default_taps(num_layers, num_levels)`.
          train_backbone: make the ViT weights `nnx.Param` (trainable) instead of
            `FrozenParam` + stop_gradient.
          dtype: computation dtype of the ViT and the DPT (weights stay float32;
            the DPT's last conv, hence UV and face logits, computes in float32).
          rngs: initialisation keys.
        """
        d = vit_config.hidden_size
        if dpt_config is None:
            dpt_config = DPTConfig(in_dim=d, out_channels=OUT_CHANNELS)
        if dpt_config.out_channels != OUT_CHANNELS:
            raise ValueError(f"dpt_config.out_channels must be 3, got {dpt_config.out_channels}")
        if any(i != d for i in dpt_config.in_dims):
            raise ValueError(f"dpt_config.in_dim {dpt_config.in_dim} != ViT width {d}")
        if layers is None:
            layers = default_taps(vit_config.num_layers, dpt_config.num_levels)
        layers = tuple(int(i) for i in layers)
        if len(layers) != dpt_config.num_levels:
            raise ValueError(f"{len(layers)} tapped layers for {dpt_config.num_levels} DPT levels")
        n = vit_config.num_layers
        if any(not -n <= i < n for i in layers):
            raise ValueError(f"tapped layers {layers} out of range for {n} blocks")
        self.layers = tuple(i % n for i in layers)
        self.train_backbone = train_backbone
        self.vit = backbone_vit(vit_config, trainable=train_backbone, dtype=dtype, rngs=rngs)
        self.dpt = DPT(dpt_config, rngs=rngs)

    def backbone(
        self,
        images: jax.Array,
        view_mask: jax.Array | None = None,
        *,
        extra_layers: tuple[int, ...] = (),
    ) -> ViTOutput:
        """The ViT pass of `__call__`, which another consumer may share.

        Args:
          images: (..., H, W, 3) RGB in [0, 1] (at least one leading dim); H, W
            multiples of the ViT patch size.
          view_mask: optional bool of shape `...`, False for padded views (zeroed).
          extra_layers: blocks to tap besides the DPT's (0-based, negative from the end).

        Returns:
          The `ViTOutput` of the flattened (prod(...), H, W, 3) images, tapping the
          union of the DPT's layers and `extra_layers`.
        """
        if images.ndim < 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images (..., H, W, 3) RGB, got shape {images.shape}")
        if view_mask is not None and jnp.shape(view_mask) != images.shape[:-3]:
            raise ValueError(
                f"view_mask shape {jnp.shape(view_mask)} != leading image dims {images.shape[:-3]}"
            )
        h, w = images.shape[-3:-1]
        pixels = vit_input(images, view_mask, frozen=not self.train_backbone)
        return self.vit(pixels.reshape(-1, h, w, 3), layers=(*self.layers, *extra_layers))

    def __call__(
        self,
        images: jax.Array,
        view_mask: jax.Array | None = None,
        *,
        backbone: ViTOutput | None = None,
    ) -> CorrespondenceOutput:
        """Predicts image UV and the face mask.

        Args:
          images: (..., H, W, 3) RGB in [0, 1] (at least one leading dim); H, W
            multiples of the ViT patch size.
          view_mask: optional bool of shape `...`, False for padded views (zeroed
            before the ViT; their predictions are those of a black image).
          backbone: `self.backbone(images, view_mask, ...)` computed by the caller (a
            pass it shares); None: run it here.

        Returns:
          A `CorrespondenceOutput` at the input resolution, float32.
        """
        if backbone is None:
            backbone = self.backbone(images, view_mask)
        lead, (h, w) = images.shape[:-3], images.shape[-3:-1]
        features, cls = backbone.taps(self.layers)
        readout = None if self.dpt.config.readout == "ignore" else cls
        # The last conv runs in float32 whatever the compute dtype: bfloat16 logits would
        # quantise UV (up to 0.31 texel at a 384 map).
        logits = self.dpt(features, readout, output_size=(h, w), out_dtype=jnp.float32)
        logits = logits.reshape(*lead, h, w, OUT_CHANNELS)
        face_logit = logits[..., 2:3]
        return CorrespondenceOutput(
            uv=jax.nn.sigmoid(logits[..., :2]),
            face_prob=jax.nn.sigmoid(face_logit),
            face_logit=face_logit,
        )


def flip_averaged(
    model: CorrespondenceEstimator, images: jax.Array, *, mirror_u: float
) -> CorrespondenceOutput:
    """Averages the prediction with the mirrored prediction of the flipped image.

    One batched pass over the images and their horizontal flips; the flipped
    pass is flipped back and its u mirrored (u -> 2 mirror_u - u). UV is averaged
    in image-UV space, the face logits are averaged (face_prob = their sigmoid).

    Args:
      model: the estimator.
      images: (..., H, W, 3) RGB in [0, 1].
      mirror_u: the UV layout's mirror axis (`SYNTHETIC_MIRROR_U`, `FLAME_MIRROR_U`).
    """
    both = model(jnp.stack([images, images[..., ::-1, :]]))
    a = jax.tree.map(lambda t: t[0], both)
    b = jax.tree.map(lambda t: t[1][..., ::-1, :], both)
    uv_b = jnp.concatenate([2.0 * mirror_u - b.uv[..., :1], b.uv[..., 1:]], axis=-1)
    face_logit = 0.5 * (a.face_logit + b.face_logit)
    return CorrespondenceOutput(
        uv=0.5 * (a.uv + uv_b), face_prob=jax.nn.sigmoid(face_logit), face_logit=face_logit
    )


@dataclasses.dataclass(frozen=True)
class CorrespondenceLossWeights:
    """Weights of `correspondence_loss`.

    Attributes:
      uv: weight of the masked image-UV L1 (Pixel3DMM: 10).
      mask: weight of the face-mask BCE.
    """

    uv: float = 10.0
    mask: float = 1.0


def correspondence_loss(
    pred: CorrespondenceOutput,
    uv_gt: jax.Array,
    mask_gt: jax.Array,
    weights: CorrespondenceLossWeights = CorrespondenceLossWeights(),
    *,
    valid: jax.Array | None = None,
    counts: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The estimator's training loss: `uv * L1_uv + mask * BCE_mask`.

    Args:
      pred: the estimator's output, uv (..., H, W, 2) and face_logit (..., H, W, 1).
      uv_gt: (..., H, W, 2) ground-truth image UV (`render_mesh(...).image_uv`).
      mask_gt: (..., H, W) ground-truth face mask (bool or {0, 1}).
      weights: the term weights.
      valid: optional (...) per-image weights in {0, 1} (0 for padded views).
      counts: (mask pixels, pixels of valid images) to divide by instead of this
        call's own: a whole batch's counts over the number of micro-batches, so that
        the mean of the micro-batches' losses is the batch's loss.

    Returns:
      (loss, terms): the scalar loss and {"uv_l1", "mask_bce"} (unweighted).
      uv_l1 is sum over mask pixels of the mean |uv - uv_gt| over the 2
      coordinates, divided by the number of mask pixels (max 1); mask_bce is the
      mean BCE over the pixels of valid images.
    """
    if pred.uv.shape != uv_gt.shape:
        raise ValueError(f"uv_gt shape {uv_gt.shape} != predicted uv shape {pred.uv.shape}")
    if mask_gt.shape != pred.uv.shape[:-1]:
        raise ValueError(f"mask_gt shape {mask_gt.shape} != {pred.uv.shape[:-1]}")
    lead = pred.uv.shape[:-3]
    if valid is None:
        valid = jnp.ones(lead, jnp.float32)
    elif valid.shape != lead:
        raise ValueError(f"valid shape {valid.shape} != leading image dims {lead}")
    v = jnp.asarray(valid, jnp.float32)[..., None, None]
    y = jnp.asarray(mask_gt, jnp.float32)
    m = y * v
    err = jnp.abs(pred.uv - jnp.asarray(uv_gt, jnp.float32)).mean(-1)
    z = pred.face_logit[..., 0]
    bce = jnp.logaddexp(0.0, z) - y * z
    if counts is None:
        counts = (jnp.sum(m), jnp.sum(jnp.broadcast_to(v, bce.shape)))
    uv_l1 = jnp.sum(m * err) / jnp.maximum(counts[0], 1.0)
    mask_bce = jnp.sum(v * bce) / jnp.maximum(counts[1], 1.0)
    loss = weights.uv * uv_l1 + weights.mask * mask_bce
    return loss, {"uv_l1": uv_l1, "mask_bce": mask_bce}
