"""One MM-attention branch against an independent NumPy reference written from the maths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from network_fixtures import fast_jit, noise_filled

from uika_jax.models.mmdit import JointAttentionBlock

D, HEADS, LZ, M = 32, 4, 16, 12


def _params(model: nnx.Module) -> dict:
    return jax.tree.map(
        lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    )


# ---- NumPy reference (float64 NumPy; no JAX) ----------------------------------------------


def _ln(x, eps, p=None):
    y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return y if p is None else y * p["scale"] + p["bias"]


def _lin(x, p):
    return x @ p["kernel"] + p["bias"]


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _mlp(x, p):
    return _lin(_gelu_tanh(_lin(x, p["up"])), p["down"])


def _heads(x, p=None):
    x = x.reshape(*x.shape[:-1], HEADS, -1)
    if p is not None:  # per-head RMSNorm
        x = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * p["scale"]
    return x


def _softmax_attention(q, k, v, key_mask):
    """q (T, H, d), k/v (S, H, d), key_mask (S,) -> (T, H*d); one example."""
    logits = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(key_mask[None, None, :], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.einsum("hts,shd->thd", w, v)
    return out.reshape(out.shape[0], -1)


def reference_branch(p, z, f, f_mask, mode, update_context):
    """dZ and F' of one branch, one example at a time (z (B, Lz, D), f (B, M, D))."""
    dzs, fs = [], []
    for zb, fb, mb in zip(z, f, f_mask, strict=True):
        zn, fn = _ln(zb, 1e-5, p["norm1"]), _ln(fb, 1e-5, p["norm1_context"])
        qz = _heads(_lin(zn, p["to_q"]), p["norm_q"])
        kf = _heads(_lin(fn, p["add_k"]), p["norm_added_k"])
        vf = _heads(_lin(fn, p["add_v"]))
        if mode == "cross":
            a_z = _softmax_attention(qz, kf, vf, mb)
        else:
            kz, vz = _heads(_lin(zn, p["to_k"]), p["norm_k"]), _heads(_lin(zn, p["to_v"]))
            k, v = np.concatenate([kz, kf]), np.concatenate([vz, vf])
            key_mask = np.concatenate([np.ones(len(zb), bool), mb])
            a_z = _softmax_attention(qz, k, v, key_mask)
            if update_context:
                qf = _heads(_lin(fn, p["add_q"]), p["norm_added_q"])
                a_f = _softmax_attention(qf, k, v, key_mask)
                fb = fb + _lin(a_f, p["to_add_out"])
                fb = fb + _mlp(_ln(fb, 1e-6), p["ff_context"])
        z1 = zb + _lin(a_z, p["to_out"])
        z1 = z1 + _mlp(_ln(z1, 1e-6), p["ff"])
        dzs.append(z1 - zb)
        fs.append(fb)
    return np.stack(dzs), np.stack(fs)


# ---- tests -----------------------------------------------------------------------------------


def _inputs(seed=1):
    rng = np.random.default_rng(seed)
    z = jnp.asarray(rng.normal(size=(2, LZ, D)), jnp.float32)
    f = jnp.asarray(rng.normal(size=(2, M, D)), jnp.float32)
    f_mask = jnp.array([[True] * M, [True] * 6 + [False] * 6])
    return z, f, f_mask


@pytest.mark.parametrize(
    "mode,update_context", [("joint", True), ("joint", False), ("cross", False)]
)
def test_branch_matches_numpy_reference(mode, update_context):
    # NumPy weights, every one nonzero (biases, norm scales, ...) so that each one matters.
    block = noise_filled(
        nnx.eval_shape(
            lambda: JointAttentionBlock(
                D, HEADS, mode=mode, update_context=update_context, rngs=nnx.Rngs(0)
            )
        ),
        seed=3,
    )
    z, f, f_mask = _inputs()
    dz, f_new = fast_jit(lambda m, z, f, fm: m(z, f, fm))(block, z, f, f_mask)
    dz_ref, f_ref = reference_branch(
        _params(block),
        *(np.asarray(x, np.float64) for x in (z, f)),
        np.asarray(f_mask),
        mode,
        update_context,
    )
    np.testing.assert_allclose(dz, dz_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(f_new, f_ref, atol=1e-5, rtol=1e-5)
    if not (mode == "joint" and update_context):
        np.testing.assert_array_equal(f_new, f)  # the context passes through untouched


def test_branch_weights_per_mode():
    names = lambda **kw: set(  # noqa: E731
        nnx.to_pure_dict(
            nnx.state(
                nnx.eval_shape(lambda: JointAttentionBlock(D, HEADS, rngs=nnx.Rngs(0), **kw)),
                nnx.Param,
            )
        )
    )
    full = names()
    assert {"add_q", "to_add_out", "ff_context", "norm_added_q"} <= full
    assert full - names(update_context=False) == {
        "add_q",
        "norm_added_q",
        "to_add_out",
        "ff_context",
    }
    assert names(mode="cross") == full - {
        "to_k",
        "to_v",
        "norm_k",
        "add_q",
        "norm_added_q",
        "to_add_out",
        "ff_context",
    }
    with pytest.raises(ValueError, match="unknown attention mode"):
        JointAttentionBlock(D, HEADS, mode="self", rngs=nnx.Rngs(0))
