"""Run: python -m uika_jax.models.summary --config=configs/default.py (the paper's UIKA).

The paper configuration of UIKA (CVPR 2026, arXiv 2601.07603); an ablation:

    python -m uika_jax.models.summary --config=configs/default.py:no_uv_attention

Paper values: L = 12 transformer blocks of width D = 1024 with 16 heads, Lz = 96 x 96 UV
tokens, a 384 x 384 x 256 decoder map, ~130K anchors, N_ref = 16 source and N_d = 8
driven frames, 512 x 512 images, a frozen DINOv3 ViT-L, Adam with warm-up + cosine for
150K steps, loss 1.0 L1 + 0.1 (1 - SSIM) + 1.0 LPIPS + 0.1 reg. Every value the paper does
not state is marked `# assumed`.

Files the user supplies (never shipped, never fetched at run time):

- `vit.weights`: DINOv3 ViT-L/16 from the Hugging Face repository
  `facebook/dinov3-vitl16-pretrain-lvd1689m` (gated: accept the DINOv3 licence there,
  then `huggingface-cli download facebook/dinov3-vitl16-pretrain-lvd1689m
  --local-dir assets/dinov3-vitl16`); the directory or its `model.safetensors`.
- `head.model_path` / `head.uv_path`: FLAME 2023 (`flame2023.pkl`) and its UV layout
  (`FLAME_texture.npz` or `head_template.obj`) from https://flame.is.tue.mpg.de.
  `head.model_path = None` uses the built-in synthetic head instead.

The argument selects one of the paper's ablations (Table 4): `no_uv_attention`
("w/o uv_attn"), `no_aggregation` ("w/o aggr": the decoder never sees I_aggr and gamma,
so colours are predicted only), `no_color_fusion` (I_aggr and gamma still feed the
decoder, c = c_hat) and `no_synthetic_data` ("w/o synth": trains on `data.real_paths`
only).

Train: python train.py --config=configs/default.py --workdir=runs/uika
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

ABLATIONS = ("no_uv_attention", "no_aggregation", "no_color_fusion", "no_synthetic_data")


def apply_ablation(config: ml_collections.ConfigDict, arg: str | None) -> None:
    """Turns off the switch named by `arg` (one of `ABLATIONS`; None or "" changes nothing).

    The config's name becomes `name:arg` (e.g. "default:no_uv_attention"), as the
    command line spells it.
    """
    if not arg:
        return
    if arg not in ABLATIONS:
        raise ValueError(f"unknown config argument {arg!r}; known: {ABLATIONS}")
    if arg == "no_synthetic_data":
        config.data.synthetic_weight = 0.0
    else:
        setattr(config.model, arg.removeprefix("no_"), False)
    config.name = f"{config.name}:{arg}"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The paper configuration; `arg`: an ablation from `ABLATIONS`, or None."""
    config = ml_collections.ConfigDict()
    config.name = "default"

    m = config.model = ml_collections.ConfigDict()
    m.image_size = 512
    m.num_views = 16  # N_max = N_ref: views are padded to this many (view_mask)
    m.num_drive = 8  # N_d driven frames per sample
    m.dtype = "bfloat16"  # assumed: compute dtype (weights and residual streams float32)
    # Ablation switches (the paper's full model: all on).
    m.uv_attention = True
    m.aggregation = True
    m.color_fusion = True
    # One frozen ViT serves the correspondence estimator and the dual encoder (assumed:
    # the paper names a frozen pretrained encoder for both; sharing halves its memory and
    # runs it once on the screen images).
    m.share_backbone = True

    v = m.vit = ml_collections.ConfigDict()
    v.family = "dinov3"
    v.size = "l"
    v.overrides = ml_collections.ConfigDict()  # ViTConfig fields replacing the preset's
    v.weights = "assets/dinov3-vitl16"  # local HF snapshot (see the module docstring)
    v.train = False  # frozen (FrozenParam + stop_gradient)

    c = m.correspondence = ml_collections.ConfigDict()
    c.layers = None  # ViT blocks tapped by the DPT: None = evenly spaced (5, 11, 17, 23)
    c.neck_channels = (256, 512, 1024, 1024)  # assumed: DPT-Large / Depth Anything L neck
    c.factors = (4, 2, 1, 0.5)
    c.features = 256
    c.readout = "ignore"
    c.head_channels = 32
    c.threshold = 0.5  # face probability above which a pixel is reprojected

    e = m.encoder = ml_collections.ConfigDict()
    e.dim = 1024  # = transformer width D
    e.uv_size = 384  # assumed: the ViT sees the 384 x 384 reprojected maps unresized
    e.layers = None  # None: (5, 11, 17, 23)
    e.use_rgb = True
    e.pos_embed = True

    t = m.transformer = ml_collections.ConfigDict()
    t.dim = 1024
    t.num_heads = 16
    t.depth = 12
    t.token_side = 96  # Lz = 96 x 96 = 9216
    t.mlp_ratio = 4  # assumed
    t.mode = "joint"
    t.taps = None  # None: the last block of each quarter (3, 6, 9, 12)
    # assumed: per-block remat keeping the weight matmuls (uika_jax.models.transformer
    # REMAT_POLICIES: none, nothing_saveable, dots_saveable, ..., everything_saveable)
    t.remat = "dots_with_no_batch_dims_saveable"
    t.scan = True
    t.attention = ml_collections.ConfigDict()
    # "auto": cuDNN on NVIDIA GPUs in bf16/fp16, splash on TPU, the portable chunked
    # scan elsewhere (uika_jax.models.attention.resolve_backend).
    t.attention.backend = "auto"
    t.attention.chunk_size = 1024

    d = m.decoder = ml_collections.ConfigDict()
    d.neck_channels = (256, 512, 1024, 1024)  # assumed (DPT-Large widths)
    d.factors = (2, 1, 0.5, 0.25)
    d.features = 256
    d.map_size = 384  # 384 x 384 x 256 feature map; also the reprojection resolution
    d.channels = 256
    d.mlp_hidden = 256  # assumed
    d.mlp_layers = 2  # assumed

    # Gaussian attributes (uika_jax.models.gaussians.GaussianHeadConfig). LAM's defaults
    # (initial scale exp(-5) = 6.7 mm, cap 10 mm) suit its 20K points; anchors here are
    # ~1.1 mm apart at 384, so the initial scale is one anchor spacing and the soft cap
    # 3 mm (both assumed: the paper gives neither).
    g = m.gaussians = ml_collections.ConfigDict()
    g.max_scale = 0.003  # assumed
    g.init_scale_in_spacings = 1.0  # assumed
    g.anchor_spacing = ml_collections.FieldReference(None, field_type=float)  # None: measured
    g.max_offset_step = 0.2
    g.init_opacity = 0.1
    g.init_fusion_weight = 0.5

    h = config.head = ml_collections.ConfigDict()
    h.model_path = "assets/flame/flame2023.pkl"  # None: the built-in synthetic head
    h.uv_path = "assets/flame/FLAME_texture.npz"
    # Anchors: None = every texel the head's UV layout covers at decoder.map_size (the
    # paper's "~130K" at 384 with FLAME, assumed to mean all of them; the built-in head
    # covers 88,464); an int K <= that count keeps K texels evenly spaced.
    h.num_anchors = None
    h.use_dataset_shape = False  # drive with beta = 0 (True: the dataset's beta)

    r = config.render = ml_collections.ConfigDict()
    r.background = (1.0, 1.0, 1.0)  # assumed
    r.backend = "auto"  # uika_jax.render.RasterConfig.backend
    # Intersection slots per rendered frame; None: calibrated at the start of training
    # for the largest Gaussians the head can produce (every scale at max_scale, opaque,
    # on the template anchors, through the first batch's cameras) with `capacity_headroom`.
    r.capacity = ml_collections.FieldReference(None, field_type=int)
    r.tile_cap = ml_collections.FieldReference(None, field_type=int)
    r.capacity_headroom = 1.5

    loss = config.loss = ml_collections.ConfigDict()
    loss.l1 = 1.0
    loss.ssim = 0.1
    loss.lpips = 1.0
    loss.reg = 0.1
    loss.reg_eps = 0.0

    o = config.optim = ml_collections.ConfigDict()
    o.steps = 150_000  # the avatar stage's steps
    o.batch_size = 32  # assumed: global batch (the paper gives none)
    # Gradient accumulation: each step's batch is split into this many micro-batches run
    # one after another (one update a step), so a device holds batch_size / (devices
    # along the batch axes * micro_batches) samples at a time. At paper scale one sample
    # of the train step needs tens of GiB (README's memory table): 32 samples on 8 devices
    # of 80 GB as 4 micro-batches of one sample each.
    o.micro_batches = 4
    o.peak_lr = 1e-4  # assumed
    o.warmup_steps = 3_000  # assumed
    o.final_lr_fraction = 0.0  # assumed
    o.b1 = 0.9
    o.b2 = 0.999  # assumed (Adam defaults)
    o.grad_clip = 1.0  # assumed
    o.weight_decay = 0.0  # Adam, as the paper; > 0: AdamW on kernels only

    # Stage 1 (assumed: the paper does not say how its estimator was trained): the
    # correspondence estimator alone on ground-truth UV maps and masks, before the avatar
    # stage, which then keeps it frozen. Same keys as `optim`; steps 0 skips the stage.
    e1 = config.estimator_optim = ml_collections.ConfigDict(o.to_dict())
    del e1["batch_size"]  # one data pipeline: both stages take optim.batch_size samples
    e1.steps = 10_000  # assumed
    e1.warmup_steps = 500  # assumed

    tr = config.train = ml_collections.ConfigDict()
    tr.seed = 0
    # Teacher forcing: the avatar stage reprojects the ground-truth UV maps and head masks
    # instead of the estimator's (False: the estimator's, as at test time).
    tr.teacher_forcing = False
    # Randomly coloured backgrounds behind the targets and the renders (False: the
    # fixed `render.background`).
    tr.random_background = False  # assumed
    tr.log_every = 100
    tr.checkpoint_every = 2_000
    tr.keep_checkpoints = 3

    ev = config.eval = ml_collections.ConfigDict()
    # Periodic evaluation on a fixed set of validation identities (train.py); the test
    # split is for evaluate.py.
    ev.every = 5_000
    ev.identities = 16  # the first this many validation identities (by subject id)
    ev.batch_size = 4
    ev.seed = 0  # which frames of each identity are sources and targets
    ev.lpips = True
    # evaluate.py (`uika_jax.evaluation.runner`): what it runs, on which frames.
    ev.mode = "metrics"  # metrics | scaling | ablations | speed
    ev.split = "test"
    ev.protocol = "all"  # or comma-separated: self_mono,self_multi,cross_mono,cross_multi
    ev.dataset = placeholder(str)  # None: the run's first data source
    ev.subjects = 100  # the most subjects per protocol
    ev.num_sources = placeholder(int)  # None: model.num_views
    ev.num_targets = placeholder(int)  # None: model.num_drive
    ev.manifest = placeholder(
        str
    )  # a manifest.json to reuse (the same frames as another evaluation)
    ev.out = placeholder(str)  # None: WORKDIR/eval-SPLIT
    ev.scaling_views = (1, 2, 4, 8, 16)
    ev.ablation_workdirs = ()  # eval.mode=ablations: the runs to compare
    ev.face_metrics = True  # CSIM, AKD, APD, AED (the `eval` extra's face models)
    ev.identity_model = placeholder(str)  # an ArcFace ONNX file for CSIM; None: dlib's ResNet
    ev.expression_regressor = placeholder(str)  # an ONNX expression regressor for AED; None: n/a
    ev.landmark_embedding = placeholder(str)  # the head model's 68 landmarks (FLAME); APD needs it
    ev.grids = placeholder(int)  # per-sample picture grids per protocol; None: every sample
    ev.videos = placeholder(int)  # driven-sequence videos per protocol; None: every sample
    ev.video_frames = 64
    ev.video_fps = 25

    dt = config.data = ml_collections.ConfigDict()
    # The synthetic dataset (`uika synth`), generated there by train.py when missing.
    dt.synthetic_path = "data/synthetic"
    dt.synthetic_weight = 1.0  # 0: no synthetic data ("no_synthetic_data")
    dt.synthetic = ml_collections.ConfigDict(
        dict(identities=2_000, views=9, sequences=2, frames=16, size=512, seed=0)  # assumed
    )
    # Real datasets (folders of the format, or `uika pack` shard sets) and their weights.
    dt.real_paths = ()
    dt.real_weights = ()
    dt.buckets = (1, 4, 16)  # padded source view counts (the last is model.num_views)
    dt.monocular_probability = 0.5  # assumed
    dt.augment = True
    dt.workers = 0
    dt.read_threads = 8

    s = config.sharding = ml_collections.ConfigDict()
    s.mesh_shape = (-1, 1, 1)  # (data, fsdp, tensor); -1: every remaining device
    # Logical axis name -> mesh axis (None: replicated). Every name a weight uses must
    # appear here (`uika_jax.sharding.check_rules`). "batch" shards activations.
    s.rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("kv", None),  # head_dim (per-head RMSNorm scales)
        ("layers", None),
        ("tokens", None),
        ("patch", None),
        ("readout", "tensor"),
        ("conv_in", "fsdp"),
        ("conv_out", "tensor"),
        ("gaussian_attr", None),
        ("texel", None),  # per-anchor features: replicated (split, XLA all-gathers them)
    )

    apply_ablation(config, arg)
    return config
