"""What a run is built from: the stages' weight split, the rasterizer's budget, the data sources.

* Stage filters: the estimator stage trains exactly the `correspondence` weights
  (including the shared ViT when it is trainable), the avatar stage every other trained
  weight; frozen weights are never trained; both stages' weights partition the model.
* The calibrated rasterizer capacity holds every Gaussian at the head's largest scale,
  and Gaussians 4 times larger (beyond the soft cap) overflow it and are counted (one
  compiled render for both); a configured capacity is taken as it is.
* The data sources: `no_synthetic_data` without real data is refused naming the flags.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from network_fixtures import FAST_COMPILE, abstract_uika, small_config

from uika_jax.config import load_config
from uika_jax.models.avatar import build_head, drive, render
from uika_jax.models.frozen import FrozenParam
from uika_jax.render.camera import framing_camera
from uika_jax.training import train_state as ts
from uika_jax.training.raster_budget import largest_gaussians, raster_config
from uika_jax.training.run_data import prepare_sources
from uika_jax.training.step import target_params


def _paths(state) -> set[str]:
    return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)}


@pytest.mark.parametrize("spec", ["configs/tiny.py", "configs/default.py"])
def test_stages_split_the_weights_between_estimator_and_avatar(spec):
    config, model = abstract_uika(spec)
    everything = _paths(nnx.state(model))
    frozen = _paths(nnx.state(model, FrozenParam))
    _, estimator, estimator_rest = ts.split_model(model, "estimator")
    _, avatar, avatar_rest = ts.split_model(model, "avatar")
    estimator, avatar = _paths(estimator), _paths(avatar)
    assert estimator and avatar and not estimator & avatar
    assert all("correspondence" in p for p in estimator)
    assert not any("'correspondence'" in p for p in avatar)
    assert not (estimator | avatar) & frozen
    assert estimator | avatar | frozen == everything
    assert _paths(estimator_rest) == everything - estimator
    assert _paths(avatar_rest) == everything - avatar
    if config.model.vit.train:  # tiny: the shared ViT is trained in stage 1 only
        assert any("'vit'" in p for p in estimator)
    else:  # the paper's ViT is frozen throughout
        assert any("'vit'" in p for p in frozen)


def test_stage_ranges_and_optimizer_blocks():
    config = load_config("configs/tiny.py")
    e, a = config.estimator_optim.steps, config.optim.steps
    assert ts.stage_range(config, "estimator") == (0, e)
    assert ts.stage_range(config, "avatar") == (e, e + a)
    assert ts.total_steps(config) == e + a
    assert ts.stage_of_step(config, e - 1) == "estimator"
    assert ts.stage_of_step(config, e) == "avatar"
    assert ts.stage_optim(config, "estimator").peak_lr == config.estimator_optim.peak_lr
    with pytest.raises(ValueError, match="unknown stage"):
        ts.stage_optim(config, "decoder")


def _frontal_batch(config, count: int = 2):
    size = config.model.image_size
    cams = [framing_camera(np.zeros(3), 0.22, size, yaw, 0.0) for yaw in (-30.0, 20.0)]
    head, _ = build_head(config)
    f = len(cams)
    return {
        "target_pose": np.zeros((count, f, 5, 3), np.float32),
        "target_expression": np.zeros((count, f, head.num_expression), np.float32),
        "target_translation": np.zeros((count, f, 3), np.float32),
        "shape": np.zeros((count, head.num_shape), np.float32),
        "target_viewmat": np.broadcast_to(np.stack([v for v, _ in cams]), (count, f, 4, 4)),
        "target_intrinsics": np.broadcast_to(np.stack([k for _, k in cams]), (count, f, 3, 3)),
        "target_image": np.zeros((count, f, size, size, 3), np.float32),
    }


OVERSIZE = 4.0
"""Scale factor beyond the soft cap of the Gaussians that must overflow the capacity."""

IMAGE_SIZE = 64
"""16 tiles a frame: at 32 x 32 (4 tiles) the calibrated capacity with its headroom can
exceed the most intersections any Gaussians of the small model make."""


def test_calibrated_capacity_holds_the_largest_gaussians_and_counts_larger_ones():
    config = small_config()
    config.model.image_size = IMAGE_SIZE
    head, anchors = build_head(config)
    batch = _frontal_batch(config)
    raster = raster_config(config, head, anchors, batch)
    assert raster.capacity is not None and not raster.warn_on_overflow
    fixed = small_config()
    fixed.render.capacity = 64
    assert raster_config(fixed, head, anchors, batch).capacity == 64
    size = config.model.image_size
    jbatch = jax.tree.map(jnp.asarray, batch)
    at_cap = largest_gaussians(anchors, 2, float(config.model.gaussians.max_scale))

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def rendered_meta(log_scale_gain):
        g = dataclasses.replace(at_cap, log_scales=at_cap.log_scales + log_scale_gain)
        posed = drive(head, anchors, g, target_params(jbatch))
        return render(
            posed, jbatch["target_viewmat"], jbatch["target_intrinsics"], size, size, config=raster
        ).meta

    held = rendered_meta(0.0)
    assert int(np.max(held["isects_dropped"])) == 0 and not bool(np.any(held["overflow"]))
    assert int(np.max(held["n_isects"])) * 1.5 <= raster.capacity * 1.01
    # The same program (the scales' gain is an argument) with the calibrated capacity.
    over = rendered_meta(float(np.log(OVERSIZE)))
    assert int(np.sum(over["isects_dropped"])) > 0 and bool(np.all(over["overflow"]))


def test_no_synthetic_data_without_real_data_is_refused_naming_the_flags():
    config = load_config("configs/tiny.py:no_synthetic_data")
    assert config.data.synthetic_weight == 0
    with pytest.raises(ValueError, match=r"data\.real_paths"):
        prepare_sources(config)
    config.data.real_paths = ("a", "b")
    config.data.real_weights = (1.0,)
    with pytest.raises(ValueError, match="one weight per path"):
        prepare_sources(config)
    config.data.real_weights = (1.0, 0.5)
    assert prepare_sources(config) == (["a", "b"], [1.0, 0.5])
