"""The assembled UIKA model: pose-free images -> canonical Gaussians -> driven -> rendered.

One forward pass (`UIKA.__call__`), each stage called through its own module:

    images (B, N, H, W, 3) in [0, 1], view_mask (B, N)       N <= num_views (padded)
      -> correspondence estimator (frozen ViT + DPT)  uv (B, N, H, W, 2), face_prob
      -> reproject at the decoder map size M          i_uv (B, N, M, M, 3), I_aggr, gamma
         (uv under stop_gradient: no gradient of the reconstruction reaches the DPT)
      -> dual encoder (frozen ViT + fusion CNNs)      F_s (B, N, P, D), F_uv (B, N, P', D)
      -> UV transformer                               tapped tokens, each (B, Lz, D)
      -> UV decoder at the anchors                    CanonicalGaussians (B, K, ...)

then, functionally, `drive(head, anchors, gaussians, flame_params)` poses them for
(B, F) target frames and `render(posed, viewmats, Ks, width, height)` rasterizes them
through `uika_jax.render.rasterization`.

Shared backbone (`share_backbone`, the default): the correspondence estimator and the
dual encoder use ONE frozen ViT (the same NNX module, so its weights exist once in the
state and in checkpoints), and the screen images go through it once
(`CorrespondenceEstimator.backbone`, tapping the union of the blocks both consumers
read, handed to both); the UV maps go through it a second time. Padded views are
zeroed before the ViT (their tokens never matter: reproject drops their pixels and
the encoder zeroes their features). Both ViTs need the same architecture, so sharing
is the only mode when the config names one ViT; `share_backbone=False` gives each
consumer its own copy (e.g. to fine-tune one of them).

The head model and the anchors are NOT module state: they are built once from the
config (`build_head`) and passed to `UIKA.__call__` / `drive` as pytree arguments. So the
licensed FLAME arrays never enter a checkpoint, no optimizer or gradient sees them,
and under `jax.jit` they are ordinary (replicated) arguments rather than constants
folded into the program.

Driving: the target frame's expression, jaw / neck / eye / global pose
and translation are applied with identity shape beta = 0 (the identity lives in the
predicted offsets d_mu); `use_shape=True` applies the given beta instead (a dataset's
fitted shape). Each Gaussian is driven as a point of the surface it sits on
(`uika_jax.head.anchors.deform_anchors`: canonical mean = anchor + d_mu, plus the
interpolated blendshape displacements, then the interpolated LBS transform), and its
rotation is the rotation factor (polar decomposition) of that blended LBS transform
composed with its canonical rotation: q_posed = q_lbs * q_canonical (Hamilton
product, wxyz). Scales, opacities and colours do not change.

Ablations (config `model.*`): `uv_attention=False` removes the transformer's UV branch
(the encoder is then given no UV maps, so its UV stream is not computed),
`aggregation=False` keeps I_aggr and gamma away from the decoder, `color_fusion=False`
keeps them as decoder inputs but uses the predicted colours.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from uika_jax.head.anchors import Anchors, deform_anchors, make_anchors
from uika_jax.head.io import load_head_model
from uika_jax.head.lbs import FlameParams
from uika_jax.head.model import HeadModel
from uika_jax.head.rotations import matrix_to_quaternion, quaternion_multiply
from uika_jax.models.attention import AttentionConfig
from uika_jax.models.correspondence import (
    OUT_CHANNELS,
    CorrespondenceEstimator,
    CorrespondenceOutput,
)
from uika_jax.models.decoder import UVDecoder, UVDecoderConfig
from uika_jax.models.dpt import DPTConfig
from uika_jax.models.fusion import DualEncoder, FusionConfig
from uika_jax.models.gaussians import CanonicalGaussians, GaussianHeadConfig
from uika_jax.models.reproject import Reprojection, reproject
from uika_jax.models.transformer import UVTransformer, UVTransformerConfig
from uika_jax.models.vit import ViTConfig
from uika_jax.render import RasterConfig, rasterization
from uika_jax.synthetic.head import synthetic_head_model


@dataclasses.dataclass(frozen=True)
class AvatarConfig:
    """The architecture of `UIKA` (hashable; built from a config's `model` by `from_config`).

    Attributes:
      image_size: side of the square input images.
      num_views: N_max, the most views one sample may hold.
      vit: the frozen (or trained) backbone.
      train_backbone: `nnx.Param` ViT weights without stop_gradient (tiny config).
      share_backbone: one ViT for the correspondence estimator and the dual encoder.
      correspondence: the estimator's DPT.
      correspondence_layers: ViT blocks its DPT taps (None: evenly spaced).
      face_threshold: face probability above which a pixel is reprojected.
      fusion: the dual encoder's fusion CNNs.
      uv_size: side of the UV maps as the encoder's ViT sees them.
      transformer: the UV transformer.
      decoder: the UV decoder (its map_size is also the reprojection resolution).
      dtype: compute dtype of the ViT, the DPT and the transformer.
    """

    image_size: int
    num_views: int
    vit: ViTConfig
    train_backbone: bool
    share_backbone: bool
    correspondence: DPTConfig
    correspondence_layers: tuple[int, ...] | None
    face_threshold: float
    fusion: FusionConfig
    uv_size: int
    transformer: UVTransformerConfig
    decoder: UVDecoderConfig
    dtype: str = "float32"


def _tuple(x: object) -> tuple | None:
    return None if x is None else tuple(x)


def _gaussian_head_config(
    model: ml_collections.ConfigDict, anchor_spacing: float | None
) -> GaussianHeadConfig:
    values = dict(model.get("gaussians") or {})
    if values.get("init_scale_in_spacings") is not None and values.get("anchor_spacing") is None:
        if anchor_spacing is None:
            raise ValueError(
                "model.gaussians.init_scale_in_spacings sets the initial Gaussian scale from "
                "the anchor spacing: build the model with UIKA.from_config(config, "
                "anchor_spacing=mean_anchor_spacing(anchors.positions)) or set "
                "model.gaussians.anchor_spacing"
            )
        values["anchor_spacing"] = float(anchor_spacing)
    return GaussianHeadConfig.from_config(values)


def avatar_config(
    model: ml_collections.ConfigDict, anchor_spacing: float | None = None
) -> AvatarConfig:
    """Builds the `AvatarConfig` from a config's `model` section (see configs/default.py).

    Args:
      model: the config's `model` block.
      anchor_spacing: mean nearest-neighbour distance of the anchors (metres), needed
        when `model.gaussians.init_scale_in_spacings` sets the initial scale from it
        (`gaussians.mean_anchor_spacing(anchors.positions)`).
    """
    v = model.vit
    preset = ViTConfig.dinov3 if v.family == "dinov3" else ViTConfig.dinov2
    vit = preset(v.size, **dict(v.overrides or {}))
    c, e, t, d = model.correspondence, model.encoder, model.transformer, model.decoder
    dpt = DPTConfig(
        in_dim=vit.hidden_size,
        neck_channels=tuple(c.neck_channels),
        factors=tuple(c.factors),
        features=c.features,
        readout=c.readout,
        head_channels=c.head_channels,
        out_channels=OUT_CHANNELS,
    )
    if e.dim != t.dim:
        raise ValueError(f"encoder.dim {e.dim} must equal transformer.dim {t.dim}")
    transformer = UVTransformerConfig(
        dim=t.dim,
        num_heads=t.num_heads,
        depth=t.depth,
        num_tokens=t.token_side**2,
        taps=_tuple(t.taps),
        mlp_ratio=t.mlp_ratio,
        uv_attention=bool(model.uv_attention),
        mode=t.mode,
        attention=AttentionConfig(backend=t.attention.backend, chunk_size=t.attention.chunk_size),
        remat=t.remat,
        dtype=jnp.dtype(model.dtype).name,
        scan=t.scan,
    )
    decoder = UVDecoderConfig(
        in_dim=t.dim,
        token_side=t.token_side,
        neck_channels=tuple(d.neck_channels),
        factors=tuple(d.factors),
        features=d.features,
        map_size=d.map_size,
        channels=d.channels,
        mlp_hidden=d.mlp_hidden,
        mlp_layers=d.mlp_layers,
        aggregation=bool(model.aggregation),
        color_fusion=bool(model.color_fusion),
        head=_gaussian_head_config(model, anchor_spacing),
        dtype=jnp.dtype(model.dtype).name,
    )
    return AvatarConfig(
        image_size=model.image_size,
        num_views=model.num_views,
        vit=vit,
        train_backbone=bool(v.train),
        share_backbone=bool(model.share_backbone),
        correspondence=dpt,
        correspondence_layers=_tuple(c.layers),
        face_threshold=float(c.threshold),
        fusion=FusionConfig(
            dim=e.dim, layers=_tuple(e.layers), use_rgb=e.use_rgb, pos_embed=e.pos_embed
        ),
        uv_size=e.uv_size,
        transformer=transformer,
        decoder=decoder,
        dtype=jnp.dtype(model.dtype).name,
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AvatarOutput:
    """Everything one forward pass produces (a pytree).

    Attributes:
      gaussians: the canonical Gaussians (B, K, ...).
      correspondence: the estimator's uv / face_prob / face_logit, (B, N, H, W, ...);
        None under teacher forcing.
      reprojection: the UV maps (i_uv, hits, I_aggr, gamma, n_hit) at the decoder size.
    """

    gaussians: CanonicalGaussians
    correspondence: CorrespondenceOutput | None
    reprojection: Reprojection


class UIKA(nnx.Module):
    """Correspondence -> reproject -> dual encoder -> UV transformer -> UV decoder."""

    def __init__(self, config: AvatarConfig, *, rngs: nnx.Rngs):
        """Builds the network (random init; `load_backbone` loads pretrained ViT weights).

        Args:
          config: the architecture.
          rngs: initialisation keys.
        """
        self.config = config
        dtype = jnp.dtype(config.dtype)
        self.correspondence = CorrespondenceEstimator(
            config.vit,
            config.correspondence,
            layers=config.correspondence_layers,
            train_backbone=config.train_backbone,
            dtype=dtype,
            rngs=rngs,
        )
        self.encoder = DualEncoder(
            config.vit,
            config.fusion,
            image_size=config.image_size,
            uv_size=config.uv_size,
            train_backbone=config.train_backbone,
            dtype=dtype,
            # Shared: one module, referenced twice (built once).
            vit=self.correspondence.vit if config.share_backbone else None,
            rngs=rngs,
        )
        self.transformer = UVTransformer(config.transformer, rngs=rngs)
        taps = len(self.transformer.taps)
        if taps != config.decoder.num_taps:
            raise ValueError(
                f"the transformer taps {self.transformer.taps} ({taps} depths) but the decoder "
                f"takes {config.decoder.num_taps}: give decoder.neck_channels one entry per tap"
            )
        self.decoder = UVDecoder(config.decoder, rngs)

    @classmethod
    def from_config(
        cls,
        config: ml_collections.ConfigDict,
        *,
        rngs: nnx.Rngs,
        anchor_spacing: float | None = None,
    ) -> UIKA:
        """Builds the model of a full config (`config.model`).

        Args:
          config: the full config.
          rngs: initialisation keys.
          anchor_spacing: the anchors' mean spacing (metres), which sets the initial
            Gaussian scale when `model.gaussians.init_scale_in_spacings` is set.
        """
        return cls(avatar_config(config.model, anchor_spacing), rngs=rngs)

    def _check_inputs(self, images: jax.Array, view_mask: jax.Array | None) -> jax.Array:
        c = self.config
        if images.ndim != 5 or images.shape[-1] != 3:
            raise ValueError(f"expected images (B, N, H, W, 3), got shape {images.shape}")
        b, n, h, w, _ = images.shape
        if (h, w) != (c.image_size, c.image_size):
            raise ValueError(f"images are {h}x{w}, the model expects {c.image_size}^2")
        if not 1 <= n <= c.num_views:
            raise ValueError(f"{n} views per sample, the model takes 1 to {c.num_views}")
        if view_mask is None:
            return jnp.ones((b, n), bool)
        view_mask = jnp.asarray(view_mask)
        if view_mask.shape != (b, n):
            raise ValueError(f"view_mask shape {view_mask.shape} != (B, N) = {(b, n)}")
        return view_mask.astype(bool)

    def __call__(
        self,
        images: jax.Array,
        view_mask: jax.Array | None,
        anchors: Anchors,
        *,
        teacher: tuple[jax.Array, jax.Array] | None = None,
    ) -> AvatarOutput:
        """The full forward pass with its intermediate results.

        Args:
          images: (B, N, H, W, 3) RGB in [0, 1], H = W = image_size, 1 <= N <= num_views.
          view_mask: (B, N) bool, False for padded views (each sample needs one valid
            view); None: all valid.
          anchors: K anchors made at uv_resolution = the decoder map size (`build_head`).
          teacher: teacher forcing: (uv (B, N, H, W, 2), face probability (B, N, H, W))
            reprojected instead of the estimator's (e.g. the ground-truth UV maps and
            head masks); the estimator's head is then not run and the output's
            `correspondence` is None. None: the estimator's own (the paper).

        Returns:
          The `AvatarOutput`.
        """
        view_mask = self._check_inputs(images, view_mask)
        c = self.config
        screen_backbone = None
        if c.share_backbone:  # one ViT pass over the screen images serves both stages
            screen_backbone = self.correspondence.backbone(
                images, view_mask, extra_layers=self.encoder.layers
            )
        if teacher is None:
            correspondence = self.correspondence(images, view_mask, backbone=screen_backbone)
            uv, face_prob = correspondence.uv, correspondence.face_prob
        else:
            correspondence = None
            uv, face_prob = teacher
        reprojection = reproject(
            images,
            jax.lax.stop_gradient(uv),
            jax.lax.stop_gradient(face_prob),
            view_mask,
            resolution=c.decoder.map_size,
            threshold=c.face_threshold,
        )
        encoded = self.encoder(
            images,
            reprojection.i_uv if c.transformer.uv_attention else None,
            view_mask,
            screen_backbone=screen_backbone,
        )
        tokens = self.transformer(encoded.screen, encoded.view_mask, encoded.uv)
        gaussians = self.decoder(tokens, anchors, reprojection.i_aggr, reprojection.gamma)
        return AvatarOutput(gaussians, correspondence, reprojection)

    def load_backbone(self, path: str) -> None:
        """Loads pretrained HF DINOv2 / DINOv3 weights (local safetensors) into the ViT(s)."""
        from uika_jax.convert.hf_vit import load_hf_vit_weights, read_safetensors

        tensors = read_safetensors(_safetensors_file(path))
        load_hf_vit_weights(self.correspondence.vit, tensors, source=str(path))
        if not self.config.share_backbone:
            load_hf_vit_weights(self.encoder.vit, tensors, source=str(path))


def _safetensors_file(path: str) -> str:
    from pathlib import Path

    p = Path(path).expanduser()
    return str(p / "model.safetensors") if p.is_dir() else str(p)


# --------------------------------------------------------------------------- head assets


def build_head(config: ml_collections.ConfigDict) -> tuple[HeadModel, Anchors]:
    """The head model and its anchors at the decoder map size, once, from a full config.

    Returns:
      (head model, anchors): pytrees of NumPy arrays, to pass to `UIKA.__call__` and `drive`.
    """
    h = config.head
    head = load_head_model(h.model_path, h.uv_path) if h.model_path else synthetic_head_model()
    try:
        return head, make_anchors(head, config.model.decoder.map_size, h.num_anchors)
    except ValueError as error:
        source = h.model_path or "the built-in synthetic head"
        raise ValueError(
            f"config head.num_anchors={h.num_anchors} does not fit {source} at "
            f"model.decoder.map_size={config.model.decoder.map_size}: {error}; "
            "head.num_anchors=None takes every covered texel"
        ) from error


# --------------------------------------------------------------------------- driving


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PosedGaussians:
    """Gaussians posed for target frames; leading dims `...` = (B, F) for `drive`'s output.

    Attributes:
      means: (..., K, 3) world positions.
      quats: (..., K, 4) unit quaternions, wxyz.
      log_scales: (..., K, 3) log scales (unchanged by driving).
      opacity_logits: (..., K) opacity logits.
      colors: (..., K, 3) RGB in [0, 1].
    """

    means: jax.Array
    quats: jax.Array
    log_scales: jax.Array
    opacity_logits: jax.Array
    colors: jax.Array

    def scales(self) -> jax.Array:
        """(..., K, 3) linear scales."""
        return jnp.exp(self.log_scales)

    def opacities(self) -> jax.Array:
        """(..., K) opacities in (0, 1)."""
        return jax.nn.sigmoid(self.opacity_logits)


def drive(
    head: HeadModel,
    anchors: Anchors,
    gaussians: CanonicalGaussians,
    params: FlameParams,
    *,
    use_shape: bool = False,
) -> PosedGaussians:
    """Poses B canonical avatars for F target frames each (see the module docstring).

    Args:
      head: the head model the anchors were made on.
      anchors: the K anchors of the Gaussians.
      gaussians: canonical Gaussians (B, K, ...), `UIKA.__call__(...).gaussians`.
      params: target FLAME parameters with leading dims (B, F): shape (B, F, S),
        expression (B, F, E), pose (B, F, J, 3), translation (B, F, 3).
      use_shape: apply `params.shape`; False (default) drives with beta = 0.

    Returns:
      `PosedGaussians` with leading dims (B, F).
    """
    b, k = gaussians.means.shape[:2]
    if k != anchors.num_anchors:
        raise ValueError(f"{k} Gaussians for {anchors.num_anchors} anchors")
    pose = jnp.asarray(params.pose)
    if pose.ndim != 4 or pose.shape[0] != b:
        raise ValueError(f"params.pose must be (B={b}, F, J, 3), got {pose.shape}")
    f = pose.shape[1]
    params = jax.tree.map(jnp.asarray, params)
    if not use_shape:
        params = dataclasses.replace(params, shape=jnp.zeros_like(params.shape))
    # jnp arrays throughout (the anchors' face ids index the model's faces).
    head, anchors = jax.tree.map(jnp.asarray, (head, anchors))

    def one(offsets: jax.Array, p: FlameParams) -> tuple[jax.Array, jax.Array]:
        return deform_anchors(head, anchors, offsets, p)

    means, rotations = jax.vmap(jax.vmap(one, in_axes=(None, 0)))(gaussians.offsets, params)
    quats = quaternion_multiply(matrix_to_quaternion(rotations), gaussians.quats[:, None])
    expand = lambda x: jnp.broadcast_to(x[:, None], (b, f, *x.shape[1:]))  # noqa: E731
    return PosedGaussians(
        means=means,
        quats=quats,
        log_scales=expand(gaussians.log_scales),
        opacity_logits=expand(gaussians.opacity_logits),
        colors=expand(gaussians.colors),
    )


# --------------------------------------------------------------------------- rendering


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rendered:
    """Rendered frames (leading dims `...` as the posed Gaussians').

    Attributes:
      images: (..., H, W, 3) colour over the background.
      alphas: (..., H, W, 1) accumulated opacity.
      meta: the rasterizer's per-call information (overflow counters etc.).
    """

    images: jax.Array
    alphas: jax.Array
    meta: dict


def render(
    posed: PosedGaussians,
    viewmats: jax.Array,
    Ks: jax.Array,
    width: int,
    height: int,
    *,
    background: jax.Array | tuple[float, float, float] | None = None,
    config: RasterConfig | None = None,
) -> Rendered:
    """Renders each posed frame with its camera through `rasterization`.

    Args:
      posed: `PosedGaussians` with leading dims `...` (e.g. (B, F)).
      viewmats: (..., 4, 4) OpenCV world-to-camera matrices, one per frame.
      Ks: (..., 3, 3) intrinsics.
      width: image width.
      height: image height.
      background: (3,) colour behind the Gaussians; None: black.
      config: the rasterizer's `RasterConfig`.

    Returns:
      The `Rendered` frames.
    """
    lead = posed.means.shape[:-2]
    if viewmats.shape != (*lead, 4, 4) or Ks.shape != (*lead, 3, 3):
        raise ValueError(
            f"expected viewmats {(*lead, 4, 4)} and Ks {(*lead, 3, 3)} (one camera per "
            f"frame), got {viewmats.shape} and {Ks.shape}"
        )
    backgrounds = None if background is None else jnp.asarray(background, jnp.float32)
    colors, alphas, meta = rasterization(
        posed.means,
        posed.quats,
        posed.scales(),
        posed.opacities(),
        posed.colors,
        viewmats[..., None, :, :],
        Ks[..., None, :, :],
        width,
        height,
        backgrounds=backgrounds,
        config=config,
    )
    return Rendered(images=colors[..., 0, :, :, :], alphas=alphas[..., 0, :, :, :], meta=meta)
