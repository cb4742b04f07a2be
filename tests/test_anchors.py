"""UV anchors: placement, attributes, driving and rotations."""

import jax
import numpy as np
import pytest
from conftest import require_oracle

from uika_jax.head.anchors import anchor_attributes, anchors_at, deform_anchors, make_anchors
from uika_jax.head.lbs import FlameParams, flame_forward
from uika_jax.head.model import HeadModel
from uika_jax.synthetic.head import synthetic_head_model


def _random_model(rng, num_vertices=60, num_faces=80) -> HeadModel:
    weights = rng.random((num_vertices, 5)) ** 3
    regressor = rng.random((5, num_vertices))
    return HeadModel(
        v_template=rng.normal(scale=0.1, size=(num_vertices, 3)).astype(np.float32),
        faces=rng.integers(0, num_vertices, size=(num_faces, 3)).astype(np.int32),
        shapedirs=rng.normal(scale=0.01, size=(num_vertices, 3, 8)).astype(np.float32),
        exprdirs=rng.normal(scale=0.01, size=(num_vertices, 3, 5)).astype(np.float32),
        posedirs=rng.normal(scale=0.01, size=(num_vertices, 3, 36)).astype(np.float32),
        j_regressor=(regressor / regressor.sum(1, keepdims=True)).astype(np.float32),
        lbs_weights=(weights / weights.sum(1, keepdims=True)).astype(np.float32),
    )


def _random_params(rng, model) -> FlameParams:
    return FlameParams(
        shape=rng.normal(size=model.num_shape).astype(np.float32),
        expression=rng.normal(size=model.num_expression).astype(np.float32),
        pose=rng.normal(scale=0.4, size=(5, 3)).astype(np.float32),
        translation=rng.normal(scale=0.1, size=3).astype(np.float32),
    )


def _numpy_lbs(model, attributes, offsets, params):
    """An independent float64 LBS of points carrying their own attributes."""
    transform = require_oracle("scipy.spatial.transform")
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    shaped_mesh = (
        f64(model.v_template)
        + f64(model.shapedirs) @ f64(params.shape)
        + f64(model.exprdirs) @ f64(params.expression)
    )
    joints = f64(model.j_regressor) @ shaped_mesh
    rotations = transform.Rotation.from_rotvec(f64(params.pose)).as_matrix()
    world = np.zeros((5, 4, 4))
    for j, parent in enumerate(model.parents):
        local = np.eye(4)
        local[:3, :3] = rotations[j]
        local[:3, 3] = joints[j] - (joints[parent] if parent >= 0 else 0.0)
        world[j] = local if parent < 0 else world[parent] @ local
    skinning = world.copy()
    skinning[:, :3, 3] -= np.einsum("jab,jb->ja", world[:, :3, :3], joints)
    feature = (rotations[1:] - np.eye(3)).reshape(-1)
    points = (
        f64(attributes["positions"])
        + f64(offsets)
        + f64(attributes["shapedirs"]) @ f64(params.shape)
        + f64(attributes["exprdirs"]) @ f64(params.expression)
        + f64(attributes["posedirs"]) @ feature
    )
    blended = np.einsum("kj,jab->kab", f64(attributes["lbs_weights"]), skinning)
    means = np.einsum("kab,kb->ka", blended[:, :3, :3], points) + blended[:, :3, 3]
    return means + f64(params.translation), blended[:, :3, :3]


def test_anchors_on_vertices_reproduce_flame_forward():
    rng = np.random.default_rng(0)
    model = _random_model(rng)
    used = np.unique(model.faces)
    face_of_vertex = np.array([np.nonzero((model.faces == v).any(1))[0][0] for v in used])
    corner = np.array(
        [np.nonzero(model.faces[f] == v)[0][0] for f, v in zip(face_of_vertex, used, strict=True)]
    )
    anchors = anchors_at(model, face_of_vertex, np.eye(3)[corner])
    for _ in range(3):
        params = _random_params(rng, model)
        means, _ = jax.jit(deform_anchors)(
            model, anchors, np.zeros((anchors.num_anchors, 3), np.float32), params
        )
        vertices, _ = flame_forward(
            model, params.shape, params.expression, params.pose, params.translation
        )
        np.testing.assert_allclose(means, np.asarray(vertices)[used], atol=1e-6)


def test_anchors_inside_triangles_match_numpy_lbs_of_interpolated_attributes():
    rng = np.random.default_rng(1)
    model = _random_model(rng)
    num_anchors = 50
    barycentrics = rng.dirichlet(np.ones(3), size=num_anchors)
    anchors = anchors_at(model, rng.integers(0, 80, num_anchors), barycentrics)
    attributes = anchor_attributes(model, anchors)
    offsets = rng.normal(scale=0.01, size=(num_anchors, 3)).astype(np.float32)
    for _ in range(3):
        params = _random_params(rng, model)
        means, rotations = jax.jit(deform_anchors)(model, anchors, offsets, params)
        ref_means, ref_blended = _numpy_lbs(model, attributes, offsets, params)
        assert np.abs(np.asarray(means) - ref_means).max() <= 1e-5 * np.abs(ref_means).max()
        rotations = np.asarray(rotations, np.float64)
        np.testing.assert_allclose(
            rotations @ np.swapaxes(rotations, 1, 2),
            np.eye(3)[None].repeat(num_anchors, 0),
            atol=1e-5,
        )
        np.testing.assert_allclose(np.linalg.det(rotations), 1.0, atol=1e-5)
        # The rotation is the polar factor of the blended transform: R^T M is symmetric.
        stretch = np.swapaxes(rotations, 1, 2) @ ref_blended
        np.testing.assert_allclose(stretch, np.swapaxes(stretch, 1, 2), atol=1e-4)


def test_rigidly_attached_anchor_turns_with_its_joint():
    transform = require_oracle("scipy.spatial.transform")
    rng = np.random.default_rng(2)
    model = _random_model(rng)
    weights = np.zeros_like(model.lbs_weights)
    weights[:, 0] = 1.0
    model = HeadModel(**{**model.__dict__, "lbs_weights": weights})
    anchors = anchors_at(model, [3, 7], [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    params = _random_params(rng, model)
    _, rotations = deform_anchors(model, anchors, np.zeros((2, 3), np.float32), params)
    expected = transform.Rotation.from_rotvec(params.pose[0]).as_matrix()
    np.testing.assert_allclose(rotations, np.stack([expected, expected]), atol=1e-5)


@pytest.fixture(scope="module")
def synthetic_head():
    return synthetic_head_model()


def test_make_anchors_covers_the_uv_mask_deterministically(synthetic_head):
    from uika_jax.head.uv_raster import uv_rasterize

    resolution = 64
    raster = uv_rasterize(synthetic_head, resolution)
    covered = int(np.asarray(raster.mask).sum())
    every = make_anchors(synthetic_head, resolution)
    assert every.num_anchors == covered
    rows, cols = every.texels.T
    assert np.asarray(raster.mask)[rows, cols].all()
    subset = make_anchors(synthetic_head, resolution, num_anchors=covered // 3)
    again = make_anchors(synthetic_head, resolution, num_anchors=covered // 3)
    assert subset.num_anchors == covered // 3
    np.testing.assert_array_equal(subset.texels, again.texels)
    assert len({tuple(t) for t in subset.texels}) == subset.num_anchors
    # Evenly spread: every band of rows holding texels keeps some anchors.
    assert set(np.unique(rows // 8)) == set(np.unique(subset.texels[:, 0] // 8))
    # Each anchor's barycentric UV is its texel centre.
    uv = synthetic_head.uv_coords[synthetic_head.uv_faces[every.face_ids]]
    anchor_uv = np.einsum("kc,kcd->kd", every.barycentrics, uv)
    centres = np.stack([(cols + 0.5) / resolution, 1.0 - (rows + 0.5) / resolution], -1)
    np.testing.assert_allclose(anchor_uv, centres, atol=1e-4)


def test_make_anchors_refuses_impossible_requests(synthetic_head):
    with pytest.raises(ValueError, match="num_anchors"):
        make_anchors(synthetic_head, 16, num_anchors=10**6)
    no_uv = HeadModel(**{**synthetic_head.__dict__, "uv_coords": None, "uv_faces": None})
    with pytest.raises(ValueError, match="UV layout"):
        make_anchors(no_uv, 16)
