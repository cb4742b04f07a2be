"""Attention backends: chunked and splash (Pallas interpreter) against XLA, masks, errors;
the "auto" resolution table; and, marked `gpu` (skipped elsewhere), cuDNN forward and
gradients on the device (``JAX_PLATFORMS=cuda pytest -m gpu tests/test_attention.py``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType
from network_fixtures import FAST_COMPILE

from uika_jax.models.attention import AttentionConfig, attention, current_platform, resolve_backend

B, T, S, H, DH = 2, 20, 37, 4, 8


def _inputs(seed=0, dtype=jnp.float32):
    """q, k, v and a key mask (key 0 always valid), drawn by NumPy: no random programs."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(B, length, H, DH)), dtype) for length in (T, S, S))
    mask = rng.random((B, S)) < 0.6
    mask[:, 0] = True
    return q, k, v, jnp.asarray(mask)


def _loss_and_grads(config, q, k, v, mask):
    weights = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)

    def loss(q, k, v):
        return (attention(q, k, v, mask, config=config) * weights).sum()

    grads = jax.value_and_grad(loss, argnums=(0, 1, 2))
    return jax.jit(grads, compiler_options=FAST_COMPILE)(q, k, v)


def _numpy_attention(q, k, v, mask):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(np.asarray(mask)[:, None, None, :], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def test_xla_matches_numpy():
    q, k, v, mask = _inputs()
    out = attention(q, k, v, mask)
    np.testing.assert_allclose(out, _numpy_attention(q, k, v, mask), atol=1e-5)


def _assert_matches_xla(cfg, out, q, k, v, mask):
    """`out` (attention under `cfg`), the loss and its gradients equal the xla backend's."""
    np.testing.assert_allclose(out, attention(q, k, v, mask), atol=1e-5)
    (loss_ref, g_ref), (loss, g) = (
        _loss_and_grads(c, q, k, v, mask) for c in (AttentionConfig(), cfg)
    )
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("chunk", [5, 16, 64])
def test_chunked_equals_xla(chunk):
    q, k, v, mask = _inputs()
    cfg = AttentionConfig("chunked", chunk_size=chunk)
    out = attention(q, k, v, mask, config=cfg)
    _assert_matches_xla(cfg, out, q, k, v, mask)


def test_chunked_bf16_close():
    q, k, v, mask = _inputs(dtype=jnp.bfloat16)
    out = attention(q, k, v, mask, config=AttentionConfig("chunked", chunk_size=8))
    assert out.dtype == jnp.bfloat16
    ref = _numpy_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)


def test_splash_interpret_equals_xla():
    q, k, v, mask = _inputs()
    cfg = AttentionConfig("splash", splash_interpret=True)
    out = jax.jit(
        lambda q, k, v: attention(q, k, v, mask, config=cfg), compiler_options=FAST_COMPILE
    )(q, k, v)
    _assert_matches_xla(cfg, out, q, k, v, mask)


def test_splash_under_mesh_shard_map():
    q, k, v, mask = _inputs()
    cfg = AttentionConfig("splash", splash_interpret=True, batch_axes=("data",), head_axis="tensor")
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        out = jax.jit(
            lambda q, k, v: attention(q, k, v, mask, config=cfg), compiler_options=FAST_COMPILE
        )(q, k, v)
    np.testing.assert_allclose(out, attention(q, k, v, mask), atol=1e-5)


def test_splash_indivisible_mesh_raises():
    q, k, v, mask = _inputs()
    cfg = AttentionConfig("splash", splash_interpret=True, batch_axes=("data",), head_axis=None)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="not divisible"):
        attention(q, k, v, mask, config=cfg)


@pytest.mark.parametrize("with_mesh", [False, True])
def test_splash_cross_lowers_for_tpu(with_mesh):
    """The real Mosaic TPU kernels (not the interpreter), forward and backward, lower for TPU."""
    cfg = AttentionConfig("splash")
    bf = jnp.bfloat16
    args = (
        jax.ShapeDtypeStruct((2, 200, 4, 64), bf),
        jax.ShapeDtypeStruct((2, 300, 4, 64), bf),
        jax.ShapeDtypeStruct((2, 300, 4, 64), bf),
        jax.ShapeDtypeStruct((2, 300), bool),
    )

    def grads(q, k, v, m):
        loss = lambda q, k, v: attention(q, k, v, m, config=cfg).astype(jnp.float32).sum()  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    def lower():
        return jax.jit(grads).trace(*args).lower(lowering_platforms=("tpu",)).as_text()

    if with_mesh:
        mesh = AbstractMesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
        with jax.sharding.use_abstract_mesh(mesh):
            text = lower()
        assert "manual_computation" in text  # the kernels run inside shard_map
    else:
        text = lower()
    assert text.count("tpu_custom_call") == 3  # forward, dq and dkv kernels


@pytest.mark.parametrize("backend", ["xla", "chunked", "splash"])
def test_fully_masked_rows_give_zeros(backend):
    q, k, v, mask = _inputs()
    mask = mask.at[1].set(False)
    cfg = AttentionConfig(backend, chunk_size=8, splash_interpret=True)
    out = attention(q, k, v, mask, config=cfg)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_allclose(out[0], attention(q, k, v, mask)[0], atol=1e-5)
    _, g = _loss_and_grads(cfg, q, k, v, mask)
    assert all(bool(jnp.isfinite(x).all()) for x in g)
    np.testing.assert_array_equal(g[0][1], 0.0)


def test_cudnn_on_cpu_raises():
    q, k, v, mask = _inputs(dtype=jnp.bfloat16)
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
        attention(q, k, v, mask, config=AttentionConfig("cudnn"))


@pytest.mark.gpu
def test_cudnn_matches_xla_on_gpu():
    """cuDNN in bfloat16 against float64 NumPy (forward) and xla in float32 (gradients)."""
    q, k, v, mask = _inputs(dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 or all float16"):
        attention(
            *(x.astype(jnp.float32) for x in (q, k, v)), mask, config=AttentionConfig("cudnn")
        )
    out = attention(q, k, v, mask, config=AttentionConfig("cudnn"))
    ref = _numpy_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)
    _, grads = _loss_and_grads(AttentionConfig("cudnn"), q, k, v, mask)
    f32 = (x.astype(jnp.float32) for x in (q, k, v))
    _, grads_ref = _loss_and_grads(AttentionConfig(), *f32, mask)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        g, g_ref = np.asarray(g, np.float32), np.asarray(g_ref)
        assert np.linalg.norm(g - g_ref) <= 2e-2 * np.linalg.norm(g_ref)
    # Padded keys get no gradient.
    np.testing.assert_array_equal(np.asarray(grads[1], np.float32)[~np.asarray(mask)], 0.0)
    assert current_platform() == "cuda"
    assert resolve_backend("auto", current_platform(), jnp.bfloat16) == "cudnn"


AUTO_TABLE = [
    ("cuda", jnp.bfloat16, "cudnn"),
    ("cuda", jnp.float16, "cudnn"),
    ("cuda", jnp.float32, "chunked"),
    ("rocm", jnp.bfloat16, "chunked"),
    ("tpu", jnp.bfloat16, "splash"),
    ("tpu", jnp.float32, "splash"),
    ("cpu", jnp.bfloat16, "chunked"),
    ("cpu", jnp.float32, "chunked"),
]


@pytest.mark.parametrize(("platform", "dtype", "expected"), AUTO_TABLE)
def test_auto_resolves_by_platform_and_dtype(platform, dtype, expected):
    assert resolve_backend("auto", platform, dtype) == expected
    assert resolve_backend("xla", platform, dtype) == "xla"  # a named backend overrides


def test_auto_runs_the_resolved_backend():
    """Here "auto" is chunked: the same program (hence bitwise the same numbers)."""
    q, k, v, mask = _inputs()
    assert current_platform() == "cpu"
    auto = attention(q, k, v, mask, config=AttentionConfig("auto", chunk_size=16))
    chunked = attention(q, k, v, mask, config=AttentionConfig("chunked", chunk_size=16))
    np.testing.assert_array_equal(auto, chunked)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash", "cpu", jnp.float32)


def test_bad_inputs_raise():
    q, k, v, mask = _inputs()
    with pytest.raises(ValueError, match="unknown attention backend"):
        AttentionConfig("flash")
    with pytest.raises(ValueError, match="kv_mask"):
        attention(q, k, v, mask[:, :-1])
    with pytest.raises(ValueError, match="disagree"):
        attention(q, k[:, :, :2], v[:, :, :2], mask)
