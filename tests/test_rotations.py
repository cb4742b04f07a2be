"""Rotation maths against scipy's Rotation."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import require_oracle
from network_fixtures import FAST_COMPILE

from uika_jax.head.rotations import (
    axis_angle_to_matrix,
    matrix_to_quaternion,
    polar_rotation,
    quaternion_multiply,
)


def _jit(fn):
    """One fast compile instead of one per eager op."""
    return jax.jit(fn, compiler_options=FAST_COMPILE)


def _rotvecs(rng, n):
    axes = rng.normal(size=(n, 3))
    axes /= np.linalg.norm(axes, axis=-1, keepdims=True)
    angles = np.concatenate(
        [[0.0, 1e-9, 1e-5, 1e-3, np.pi - 1e-4, np.pi], rng.uniform(0, np.pi, n - 6)]
    )
    return axes * angles[:, None]


def test_axis_angle_and_quaternion_match_scipy():
    transform = require_oracle("scipy.spatial.transform")
    rotvecs = _rotvecs(np.random.default_rng(0), 64)
    ref = transform.Rotation.from_rotvec(rotvecs)
    matrices = np.asarray(_jit(axis_angle_to_matrix)(jnp.asarray(rotvecs, jnp.float32)))
    np.testing.assert_allclose(matrices, ref.as_matrix(), atol=2e-6)
    quats = np.asarray(_jit(matrix_to_quaternion)(jnp.asarray(ref.as_matrix(), jnp.float32)))
    ref_wxyz = np.roll(ref.as_quat(), 1, axis=-1)
    ref_wxyz *= np.where(ref_wxyz[:, :1] < 0, -1.0, 1.0)
    # At exactly pi the sign of the quaternion is arbitrary: compare up to sign.
    err = np.minimum(np.abs(quats - ref_wxyz).max(-1), np.abs(quats + ref_wxyz).max(-1))
    assert err.max() < 2e-6


def test_quaternion_multiply_composes_like_scipy():
    """a * b is the rotation b followed by a (scipy: `Rotation a * Rotation b`), any sign."""
    transform = require_oracle("scipy.spatial.transform")
    rng = np.random.default_rng(2)
    a, b = (transform.Rotation.from_rotvec(_rotvecs(rng, 32)) for _ in range(2))
    wxyz = lambda r: jnp.asarray(np.roll(r.as_quat(), 1, axis=-1), jnp.float32)  # noqa: E731
    multiply = _jit(quaternion_multiply)
    product = np.asarray(multiply(wxyz(a), wxyz(b)))
    expected = np.roll((a * b).as_quat(), 1, axis=-1)
    err = np.minimum(np.abs(product - expected).max(-1), np.abs(product + expected).max(-1))
    assert err.max() < 2e-6
    # Unnormalised inputs: the product's norm is the product of the norms.
    scaled = multiply(2.0 * wxyz(a), 3.0 * wxyz(b))
    np.testing.assert_allclose(np.linalg.norm(scaled, axis=-1), 6.0, rtol=1e-6)


def test_polar_rotation_recovers_rotation_of_stretched_matrix():
    transform = require_oracle("scipy.spatial.transform")
    rng = np.random.default_rng(1)
    rotations = transform.Rotation.from_rotvec(_rotvecs(rng, 32)).as_matrix()
    a = rng.normal(scale=0.15, size=(32, 3, 3))
    stretch = np.eye(3) + 0.5 * (a + np.swapaxes(a, -1, -2))
    result = np.asarray(_jit(polar_rotation)(jnp.asarray(rotations @ stretch, jnp.float32)))
    np.testing.assert_allclose(result, rotations, atol=1e-5)


def test_polar_rotation_gradient_is_finite_at_a_pure_rotation():
    grad = _jit(jax.grad(lambda m: polar_rotation(m).sum()))(jnp.eye(3))
    assert np.all(np.isfinite(grad))
