"""OpenCV cameras and the face framing."""

import numpy as np
import pytest

from uika_jax.render.camera import HEAD_FRACTION, framing_camera, look_at, project, world_to_camera


def test_look_at_is_opencv_and_centres_the_target():
    viewmat = look_at(eye=(0.0, 0.0, 2.0), target=(0.0, 0.0, 0.0))
    rotation = viewmat[:3, :3]
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-6)
    assert np.linalg.det(rotation) == pytest.approx(1.0, abs=1e-6)
    points = np.array([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
    cam = np.asarray(world_to_camera(points, viewmat))
    np.testing.assert_allclose(cam[0], [0.0, 0.0, 2.0], atol=1e-6)
    assert cam[1, 1] < 0  # world up is image up: OpenCV y points down
    assert cam[2, 0] > 0  # seen from +z, world +x (the subject's left) is on the image's right


def test_framing_spans_the_agreed_fraction_of_the_image():
    centre, height, size = np.array([0.01, 0.02, 0.03]), 0.23, 512
    for yaw in (0.0, 45.0, 90.0):
        viewmat, K = framing_camera(centre, height, size, yaw_deg=yaw)
        half = np.array([0.0, height / 2, 0.0])
        ends = np.stack([centre + half, centre - half, centre])
        pixels = np.asarray(project(world_to_camera(ends.astype(np.float32), viewmat), K))
        np.testing.assert_allclose(pixels[2], [size / 2, size / 2], atol=1e-3)
        span = pixels[1, 1] - pixels[0, 1]
        assert span == pytest.approx(HEAD_FRACTION * size, rel=2e-3)
