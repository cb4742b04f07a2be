"""FLAME forward: parity with smplx's LBS, gradients, component counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_oracle
from fake_flame import make_fake_flame_arrays, write_flame_pkl
from jax.test_util import check_grads

from uika_jax.head.io import load_head_model
from uika_jax.head.lbs import flame_forward
from uika_jax.head.model import HeadModel


def _random_pose(rng, batch):
    pose = rng.normal(scale=0.4, size=(batch, 5, 3))
    pose[0] = 0.0
    axes = rng.normal(size=(batch // 2, 3))
    axes /= np.linalg.norm(axes, axis=-1, keepdims=True)
    # Rotations within 1e-3 of pi, on the global joint and on the jaw.
    pose[1 : 1 + batch // 2, 0] = axes * (np.pi - 1e-3)
    pose[1 : 1 + batch // 2, 2] = -axes * (np.pi - 2e-4)
    return pose.astype(np.float32)


@pytest.fixture(scope="module")
def flame_file_model(tmp_path_factory):
    require_oracle("scipy")
    arrays = make_fake_flame_arrays(seed=3)
    path = tmp_path_factory.mktemp("flame") / "flame2023.pkl"
    write_flame_pkl(path, arrays)
    return arrays, load_head_model(path)


def test_matches_smplx_lbs_on_full_flame_file(flame_file_model):
    torch = require_oracle("torch")
    smplx_lbs = require_oracle("smplx.lbs")
    arrays, model = flame_file_model
    assert model.num_shape == 300 and model.num_expression == 100
    rng = np.random.default_rng(0)
    batch = 8
    betas = rng.normal(size=(batch, 400)).astype(np.float32)
    pose = _random_pose(rng, batch)
    forward = jax.jit(jax.vmap(flame_forward, in_axes=(None, 0, 0, 0)))
    vertices, joints = forward(model, betas[:, :300], betas[:, 300:], pose)

    num_vertices = arrays["v_template"].shape[0]
    parents = arrays["kintree_table"][0].astype(np.int64)
    parents[0] = -1
    regressor = arrays["J_regressor"]
    regressor = regressor.toarray() if hasattr(regressor, "toarray") else regressor
    ref_vertices, ref_joints = smplx_lbs.lbs(
        torch.tensor(betas),
        torch.tensor(pose.reshape(batch, 15)),
        torch.tensor(arrays["v_template"]),
        torch.tensor(np.asarray(arrays["shapedirs"])),
        torch.tensor(arrays["posedirs"].reshape(num_vertices * 3, -1).T.copy()),
        torch.tensor(np.asarray(regressor, np.float32)),
        torch.tensor(parents),
        torch.tensor(arrays["weights"]),
    )
    ref_vertices, ref_joints = ref_vertices.numpy(), ref_joints.numpy()
    scale = np.abs(ref_vertices).max()
    assert np.abs(np.asarray(vertices) - ref_vertices).max() <= 1e-5 * scale
    assert np.abs(np.asarray(joints) - ref_joints).max() <= 1e-5 * scale


def _small_model(rng, num_vertices=40) -> HeadModel:
    weights = rng.random((num_vertices, 5))
    regressor = rng.random((5, num_vertices))
    return HeadModel(
        v_template=rng.normal(scale=0.1, size=(num_vertices, 3)),
        faces=np.array([[0, 1, 2]], np.int32),
        shapedirs=rng.normal(scale=0.01, size=(num_vertices, 3, 6)),
        exprdirs=rng.normal(scale=0.01, size=(num_vertices, 3, 4)),
        posedirs=rng.normal(scale=0.01, size=(num_vertices, 3, 36)),
        j_regressor=regressor / regressor.sum(1, keepdims=True),
        lbs_weights=weights / weights.sum(1, keepdims=True),
    )


def test_gradients_match_finite_differences_including_zero_pose():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        model = _small_model(rng)
        shape, expression = jnp.asarray(rng.normal(size=6)), jnp.asarray(rng.normal(size=4))
        translation = jnp.asarray(rng.normal(size=3))

        @jax.jit
        def f(shape, expression, pose, translation):
            vertices, joints = flame_forward(model, shape, expression, pose, translation)
            return jnp.sum(jnp.sin(3.0 * vertices)) + jnp.sum(joints**2)

        for pose in (jnp.zeros((5, 3)), jnp.asarray(rng.normal(scale=0.5, size=(5, 3)))):
            check_grads(f, (shape, expression, pose, translation), order=1, modes=["rev"])
        grad_at_rest = jax.grad(f, argnums=2)(shape, expression, jnp.zeros((5, 3)), translation)
        assert np.all(np.isfinite(grad_at_rest)) and np.abs(grad_at_rest).max() > 0


def test_fewer_components_equal_zero_padding():
    model = _small_model(np.random.default_rng(2))
    rng = np.random.default_rng(3)
    shape, expression = rng.normal(size=6), rng.normal(size=4)
    pose = rng.normal(scale=0.3, size=(5, 3))
    shape[3:], expression[2:] = 0.0, 0.0
    full, _ = flame_forward(model, shape, expression, pose)
    partial, _ = flame_forward(model, shape[:3], expression[:2], pose)
    np.testing.assert_allclose(partial, full, atol=1e-6)


def test_bad_shapes_are_refused():
    model = _small_model(np.random.default_rng(4))
    with pytest.raises(ValueError, match="pose must have shape"):
        flame_forward(model, np.zeros(6), np.zeros(4), np.zeros(15))
    with pytest.raises(ValueError, match="shape must have shape"):
        flame_forward(model, np.zeros(7), np.zeros(4), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="expression must have shape"):
        flame_forward(model, np.zeros(6), np.zeros((1, 4)), np.zeros((5, 3)))
