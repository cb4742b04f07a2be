"""Run: python -m uika_jax.models.summary --config=configs/tiny.py (a CPU-sized UIKA).

Every stage of the paper configuration, every size shrunk. The whole forward pass
(correspondence, reprojection, dual encoder, transformer, decoder, driving, rendering)
runs on a CPU in seconds. It starts from `configs/default.py` and replaces the sizes;
the argument selects the same ablations.

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
    m.image_size = 32
    m.num_views = 3
    m.num_drive = 2
    m.dtype = "float32"

    v = m.vit
    v.family = "dinov3"
    v.size = "s"
    v.overrides = ml_collections.ConfigDict(
        dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, patch_size=8)
    )
    v.weights = None
    v.train = True  # a small ViT trained from scratch

    c = m.correspondence
    c.neck_channels = (8, 16, 32, 32)
    c.features = 16
    c.head_channels = 8

    m.encoder.dim = 32
    m.encoder.uv_size = 16

    t = m.transformer
    t.dim = 32
    t.num_heads = 2
    t.depth = 4
    t.token_side = 4
    t.remat = "none"
    t.attention.backend = "xla"

    d = m.decoder
    d.neck_channels = (8, 16, 24, 32)
    d.features = 16
    d.map_size = 16
    d.channels = 16
    d.mlp_hidden = 16

    config.head.model_path = None  # the built-in synthetic head
    config.head.uv_path = None
    config.head.num_anchors = None  # every covered texel of the 16 x 16 map

    config.optim.batch_size = 2
    config.optim.steps = 200
    config.optim.warmup_steps = 20

    config.sharding.mesh_shape = (-1, 1, 1)

    default.apply_ablation(config, arg)
    return config
