"""Hair as render-only geometry on the synthetic head: attachment, visibility, determinism."""

import jax
import numpy as np
import pytest

from uika_jax.head.lbs import flame_forward
from uika_jax.synthetic import mesh as mesh
from uika_jax.synthetic import sculpt as sculpt
from uika_jax.synthetic.hair import HAIR_COLUMNS, HAIR_ROWS, hair_mesh, pose_hair
from uika_jax.synthetic.hairstyle import hair_style, scalp_coverage
from uika_jax.synthetic.head import identity_coefficients, synthetic_head_model, synthetic_layout
from uika_jax.synthetic.identity import HAIR_STYLES, identity_traits
from uika_jax.synthetic.views import identity_camera

forward = jax.jit(flame_forward)
SIZE = 96
FULL_STYLES = ("short_crop", "bob", "long_straight", "curly_volume", "bun")
"""Styles whose hair hides the scalp under it."""
SCALP_VIEW_LIFT = 0.35
"""Rise per horizontal unit of the rays that look for hair above the scalp (about 19 degrees)."""


@pytest.fixture(scope="module")
def model():
    return synthetic_head_model()


def _posed(model, seed, pose=None):
    shape = identity_coefficients(seed, model.num_shape)
    expression = np.zeros(model.num_expression, np.float32)
    pose = np.zeros((5, 3), np.float32) if pose is None else pose
    return np.asarray(forward(model, shape, expression, pose)[0])


def _kabsch(source, target):
    """Least-squares rotation and translation taking source points (N, 3) onto target."""
    source_mean, target_mean = source.mean(0), target.mean(0)
    u, _, vt = np.linalg.svd((source - source_mean).T @ (target - target_mean))
    d = np.sign(np.linalg.det(u @ vt))
    rotation = (u @ np.diag([1.0, 1.0, d]) @ vt).T
    return rotation, target_mean - rotation @ source_mean


def test_hair_follows_the_head(model):
    """After global and neck rotations the hair moves rigidly with the scalp it hangs from."""
    pose = np.zeros((5, 3), np.float32)
    pose[0], pose[1] = (0.1, -0.3, 0.05), (0.25, 0.6, -0.15)
    for seed, style in ((4, "long_straight"), (7, "bun")):
        hair = hair_mesh(model, seed, style)
        rest, posed = _posed(model, seed), _posed(model, seed, pose)
        scalp = np.unique(np.asarray(hair.anchors))
        rotation, translation = _kabsch(rest[scalp].astype(np.float64), posed[scalp])
        assert np.abs(rest[scalp] @ rotation.T + translation - posed[scalp]).max() < 1e-5
        rest_hair = np.asarray(pose_hair(hair, rest)[0], np.float64)
        moved_hair = np.asarray(pose_hair(hair, posed)[0])
        expected = rest_hair @ rotation.T + translation
        assert np.abs(expected - moved_hair).max() < 2e-5, style
        assert np.abs(moved_hair - rest_hair).max() > 0.05  # the pose really moved it
    batch = np.asarray(pose_hair(hair, np.stack([rest, posed]))[0])
    np.testing.assert_allclose(batch[1], moved_hair, atol=1e-6)


def _ray_hits(origins, directions, triangles, near=1e-4):
    """Distance (N,) along each ray to the nearest triangle it crosses (inf: none; Moller-Trumbore).

    Args:
      origins: (N, 3) ray origins.
      directions: (N, 3) unit directions.
      triangles: (F, 3, 3) corners.
      near: hits closer than this are ignored.
    """
    triangles, origins, directions = (
        np.asarray(a, np.float32) for a in (triangles, origins, directions)
    )
    a, b, c = (triangles[:, k][None] for k in range(3))
    e1, e2 = b - a, c - a
    p = np.cross(directions[:, None], e2)
    det = np.sum(e1 * p, axis=-1)
    inv = 1.0 / np.where(np.abs(det) > 1e-12, det, np.inf)
    s = origins[:, None] - a
    u = np.sum(s * p, axis=-1) * inv
    q = np.cross(s, e1)
    v = np.sum(directions[:, None] * q, axis=-1) * inv
    t = np.sum(e2 * q, axis=-1) * inv
    hit = (u >= -1e-5) & (v >= -1e-5) & (u + v <= 1 + 1e-5) & (t > near) & (np.abs(det) > 1e-12)
    return np.where(hit, t, np.inf).min(axis=1)


def test_hair_leaves_the_face_visible_and_hides_the_scalp(model):
    """No hair between a frontal camera and the nose tip or the pupils; full hair covers its scalp.

    Seen from any side, level with the head or from above, skin under full hair
    (`scalp_coverage` > 0.99) must be behind hair: the ray from such a vertex
    outwards, SCALP_VIEW_LIFT up, crosses the hair mesh.
    """
    layout, template = synthetic_layout()
    pupils = np.nonzero(
        np.isin(layout.part, [mesh.LEFT_EYE, mesh.RIGHT_EYE]) & (layout.eye_offsets[:, 2] > 0.999)
    )[0]
    front = template[:, 2] > 0.04
    nose_tip = int(np.argmax(np.where(front & (np.abs(template[:, 0]) < 1e-6), template[:, 2], -1)))
    face_points = np.array([nose_tip, *pupils])
    skin = layout.part == mesh.SKIN
    for index, style in enumerate(HAIR_STYLES):
        seed = 20 + index
        head = _posed(model, seed).astype(np.float64)
        vertices, faces, _ = pose_hair(hair_mesh(model, seed, style), head)
        triangles = np.asarray(vertices, np.float64)[np.asarray(faces)]
        viewmat, _ = identity_camera(model, identity_coefficients(seed, model.num_shape), SIZE)
        camera = -viewmat[:3, :3].T @ viewmat[:3, 3]
        to_face = head[face_points] - camera
        distance = np.linalg.norm(to_face, axis=-1)
        hits = _ray_hits(
            np.tile(camera, (len(face_points), 1)), to_face / distance[:, None], triangles
        )
        assert np.all(hits > distance), (style, hits, distance)
        if style in FULL_STYLES:
            coverage = scalp_coverage(hair_style(seed, style), template)
            under = np.nonzero(skin & (coverage > 0.99))[0][::3]
            assert under.size > 200
            towards = head[under] - sculpt.RAY_ORIGIN
            towards[:, 1] = 0.0
            towards /= np.linalg.norm(towards, axis=-1, keepdims=True)
            towards[:, 1] = SCALP_VIEW_LIFT
            towards /= np.linalg.norm(towards, axis=-1, keepdims=True)
            covered = np.isfinite(_ray_hits(head[under], towards, triangles, near=-0.002))
            assert covered.all(), (style, covered.mean())


def test_hair_is_deterministic_with_static_shapes(model):
    a, b = hair_mesh(model, 5), hair_mesh(model, 5)
    for field in ("anchors", "offsets", "faces", "colours"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.style == identity_traits(5).hair_style
    other = hair_mesh(model, 5, "curly_volume" if a.style != "curly_volume" else "bob")
    assert np.abs(np.asarray(other.offsets) - np.asarray(a.offsets)).max() > 0.005
    vertices = 1 + HAIR_COLUMNS * HAIR_ROWS
    for style in HAIR_STYLES:
        hair = hair_mesh(model, 6, style)
        assert hair.offsets.shape == (vertices, 3) and hair.colours.shape == (vertices, 3)
        assert hair.faces.shape == (2 * HAIR_COLUMNS * HAIR_ROWS - HAIR_COLUMNS, 3)
        degenerate = np.all(np.asarray(hair.faces) == np.asarray(hair.faces)[:, :1], axis=1)
        assert degenerate.all() == (style == "bald") and (degenerate.any() == (style == "bald"))
        colours = np.asarray(hair.colours)
        assert colours.min() >= 0.0 and colours.max() <= 1.0
    with pytest.raises(ValueError, match="known"):
        hair_mesh(model, 5, "mohawk")
