"""Run: python train.py --config=configs/tiny.py --workdir=runs/tiny (a CPU-sized UIKA).

Every stage of the paper configuration, every size shrunk. The whole forward pass
(correspondence, reprojection, dual encoder, transformer, decoder, driving, rendering)
runs on a CPU in seconds, and training (a 40-identity synthetic dataset at 64 x 64,
generated on first use, then 600 estimator steps and 450 avatar steps, evaluated on 8
validation identities every 150 steps) takes about ten minutes on 2 cores. It starts
from `configs/default.py` and replaces the sizes; the argument selects the same
ablations.

No pretrained weights are available offline, so the small ViT is trained from
scratch (`vit.train = True`: `nnx.Param` weights, no stop_gradient) and the head is
the built-in synthetic one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections


def _default():
    """configs/default.py, loaded by path (configs are files, not a package)."""
    spec = importlib.util.spec_from_file_location(
        "_uika_default_config", Path(__file__).with_name("default.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The tiny configuration; `arg`: an ablation (see configs/default.py), or None."""
    default = _default()
    config = default.get_config()
    config.name = "tiny"

    m = config.model
    m.image_size = 64
    m.num_views = 4
    m.num_drive = 2
    m.dtype = "float32"

    v = m.vit
    v.family = "dinov3"
    v.size = "s"
    v.overrides = ml_collections.ConfigDict(
        dict(hidden_size=48, num_layers=3, num_heads=3, mlp_dim=96, patch_size=8)
    )
    v.weights = None
    v.train = True  # a small ViT trained from scratch

    c = m.correspondence
    c.neck_channels = (16, 24, 32, 32)
    c.features = 24
    c.head_channels = 16

    m.encoder.dim = 48
    m.encoder.uv_size = 48

    t = m.transformer
    t.dim = 48
    t.num_heads = 3
    t.depth = 4
    t.token_side = 8
    t.remat = "none"
    t.attention.backend = "xla"

    d = m.decoder
    d.neck_channels = (16, 24, 32, 48)
    d.features = 32
    d.map_size = 48  # 1,390 anchors on the built-in head, 8.6 mm apart
    d.channels = 32
    d.mlp_hidden = 32

    # Few, large Gaussians: one anchor spacing at init, capped at 2.5 spacings.
    m.gaussians.max_scale = 0.02
    m.gaussians.init_scale_in_spacings = 1.0

    config.head.model_path = None  # the built-in synthetic head
    config.head.uv_path = None
    config.head.num_anchors = None  # every covered texel of the 48 x 48 map

    # LPIPS VGG costs ~0.5 s a step at 64 x 64 on 2 cores: off in training, reported by
    # the periodic evaluation.
    config.loss.lpips = 0.0

    config.optim.batch_size = 2
    config.optim.micro_batches = 1
    config.optim.steps = 450
    config.optim.warmup_steps = 20
    config.optim.peak_lr = 3e-4
    config.estimator_optim.micro_batches = 1
    config.estimator_optim.steps = 600
    config.estimator_optim.warmup_steps = 20
    config.estimator_optim.peak_lr = 1e-3

    tr = config.train
    tr.log_every = 10
    tr.checkpoint_every = 150

    ev = config.eval
    ev.every = 150
    ev.identities = 8
    ev.batch_size = 4
    ev.lpips = True

    dt = config.data
    dt.synthetic_path = "data/synthetic_tiny"
    dt.synthetic = ml_collections.ConfigDict(
        dict(identities=40, views=9, sequences=1, frames=4, size=64, seed=0, val_fraction=0.2)
    )
    dt.buckets = (4,)  # one padded view count: one compiled step (1 to 4 real views)
    dt.augment = False
    dt.read_threads = 2

    config.sharding.mesh_shape = (-1, 1, 1)

    default.apply_ablation(config, arg)
    return config
