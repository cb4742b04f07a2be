"""Avatars without training: random but plausible Gaussians on a head model's anchors.

head, anchors = builtin_head()
avatar = random_avatar(head, anchors, seed=0)
write_avatar(tmp_path / "avatar.npz", avatar)
"""

from __future__ import annotations

import functools
import types

import numpy as np

from uika_jax.head.anchors import Anchors, make_anchors
from uika_jax.head.model import HeadModel
from uika_jax.synthetic.head import synthetic_head_model
from uika_jax.tools.avatar_file import Avatar, avatar_from_gaussians


@functools.cache
def builtin_head() -> tuple[HeadModel, Anchors]:
    """The built-in head and its anchors on a 48x48 UV map (1390 anchors)."""
    head = synthetic_head_model()
    return head, make_anchors(head, 48, None)


def head_config(model_path: str = "") -> dict:
    """An avatar's config naming its head model ("" for the built-in head)."""
    return {"head": {"model_path": model_path, "uv_path": "", "num_anchors": None}}


def random_avatar(
    head: HeadModel, anchors: Anchors, seed: int = 0, config: dict | None = None
) -> Avatar:
    """K = anchors.num_anchors Gaussians: mm offsets, mm-scale sizes, unit quaternions."""
    rng = np.random.default_rng(seed)
    k = anchors.num_anchors
    offsets = rng.normal(scale=2e-3, size=(k, 3))
    quats = rng.normal(size=(k, 4))
    quats /= np.linalg.norm(quats, axis=-1, keepdims=True)
    batch = types.SimpleNamespace(
        means=(np.asarray(anchors.positions) + offsets)[None],
        offsets=offsets[None],
        quats=quats[None],
        log_scales=rng.uniform(-7.0, -4.5, (1, k, 3)),
        opacity_logits=rng.normal(0.0, 3.0, (1, k)),
        colors=rng.uniform(0.0, 1.0, (1, k, 3)),
    )
    return avatar_from_gaussians(
        batch, 0, anchors, str(head.fingerprint), head_config() if config is None else config
    )
