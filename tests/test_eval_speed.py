"""The speed measurement (`uika_jax.evaluation.speed`): report structure and the timed work.

No timing assertions: the tests check that the timed programs compute the real
reconstruction and the real driven frame, and that the report is complete.
"""

import functools
import json
import logging
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from network_fixtures import FAST_COMPILE, small_config

from uika_jax.evaluation import speed
from uika_jax.models.avatar import UIKA, build_head, drive, render
from uika_jax.models.gaussians import CanonicalGaussians, mean_anchor_spacing
from uika_jax.render import RasterConfig


@functools.cache
def _setup():
    config = small_config()
    head, anchors = build_head(config)
    spacing = mean_anchor_spacing(anchors.positions)
    model = UIKA.from_config(config, rngs=nnx.Rngs(0), anchor_spacing=spacing)
    return config, head, anchors, model, _gaussians(anchors, spacing)


def _gaussians(anchors, spacing: float) -> CanonicalGaussians:
    """Random Gaussians (1, K) about one anchor spacing in size, on the anchors."""
    rng = np.random.default_rng(1)
    shape = (1, anchors.num_anchors)
    offsets = 0.2 * spacing * rng.normal(size=(*shape, 3))
    colors = rng.uniform(size=(*shape, 3))
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return CanonicalGaussians(
        means=f32(anchors.positions[None] + offsets),
        quats=f32(rng.normal(size=(*shape, 4))),
        log_scales=f32(np.log(spacing) + 0.3 * rng.normal(size=(*shape, 3))),
        opacity_logits=f32(rng.normal(size=shape) + 1.0),
        colors=f32(colors),
        offsets=f32(offsets),
        fusion_weights=f32(np.zeros((*shape, 1))),
        pred_colors=f32(colors),
        aggr_colors=f32(np.zeros((*shape, 3))),
    )


@pytest.fixture(scope="module")
def measured():
    """One measurement: views 1 and 7 (above the model's 3), random Gaussians driven."""
    config, head, anchors, model, gaussians = _setup()
    logger = logging.getLogger(speed.__name__)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        report = speed.measure_speed(
            model, config, head, anchors, views=(7, 1), repeats=2, warmup=1,
            gaussians=gaussians, compiler_options=FAST_COMPILE,
        )  # fmt: skip
    finally:
        logger.removeHandler(handler)
    return report, [r.getMessage() for r in records]


def _timing_ok(t: dict) -> None:
    for key in ("median_ms", "min_ms", "max_ms", "compile_s"):
        assert math.isfinite(t[key]) and t[key] > 0, (key, t)
    assert t["min_ms"] <= t["median_ms"] <= t["max_ms"]
    assert t["repeats"] == 2


def test_report_structure(measured):
    report, _ = measured
    config, _, anchors, _, _ = _setup()
    out = json.loads(json.dumps(report.to_dict()))  # JSON-ready
    assert out["num_gaussians"] == anchors.num_anchors
    assert out["image_size"] == config.model.image_size
    assert out["max_views"] == config.model.num_views
    assert sorted(out["reconstruction"]) == ["1"]
    for timing in out["reconstruction"].values():
        _timing_ok(timing)
    driving = out["driving"]
    _timing_ok(driving["lbs"])
    _timing_ok(driving["frame"])
    assert driving["fps"] == pytest.approx(1e3 / driving["frame"]["median_ms"])
    assert driving["n_isects"] > 0 and driving["capacity"] >= driving["n_isects"]
    assert driving["isects_dropped"] == 0 and driving["tiles_overflow"] == 0
    device = out["device"]
    assert device["platform"] == "cpu" and device["name"] and device["jax_version"]
    table = report.to_markdown()
    assert "| 1 |" in table and "LBS + render" in table
    assert f"{driving['n_isects']} tile intersections" in table


def test_views_above_the_model_are_skipped_with_a_message(measured):
    report, messages = measured
    assert report.skipped_views == (7,)
    assert "7" not in report.to_dict()["reconstruction"]
    assert any("(7,)" in m and "num_views=3" in m for m in messages), messages
    assert "N = 7" in report.to_markdown()


def test_driven_frame_is_the_real_render(measured):
    """The timed step's frame equals an eager render(drive(...)) of the same Gaussians."""
    report, _ = measured
    config, head, anchors, _, gaussians = _setup()
    params, viewmats, Ks = speed.driving_inputs(head, config.model.image_size)
    size = config.model.image_size
    expected = render(
        drive(head, anchors, gaussians, params), viewmats, Ks, size, size,
        background=tuple(config.render.background), config=RasterConfig(),
    )  # fmt: skip
    np.testing.assert_allclose(report.frame, np.asarray(expected.images[0, 0]), atol=1e-5)
    alpha = np.asarray(expected.alphas[0, 0, ..., 0])
    assert (alpha > 0.5).mean() > 0.1, "the driven head covers too little of the frame"
    background = np.asarray(config.render.background)
    assert (np.abs(report.frame - background).max(-1) > 0.05).mean() > 0.1


@pytest.mark.parametrize(
    "views, message",
    [((0, 1), "positive"), ((), "positive"), ((4, 9), "1 to 3")],
)
def test_bad_view_counts_are_refused(views, message):
    with pytest.raises(ValueError, match=message):
        speed.select_views(views, 3)


def test_driving_only_needs_gaussians():
    config, head, anchors, model, _ = _setup()
    with pytest.raises(ValueError, match="needs the Gaussians"):
        speed.measure_speed(model, config, head, anchors, views=(), repeats=1, warmup=0)
