"""HF safetensors -> ViT conversion: strict (every tensor used, none missing), clear errors."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_oracle
from flax import nnx
from hf_vit_oracle import hf_model, images, run_hf
from network_fixtures import fast_jit

from uika_jax.convert.hf_vit import (
    load_hf_vit,
    load_hf_vit_weights,
    read_safetensors,
    vit_config_from_hf,
)
from uika_jax.models.frozen import FrozenParam
from uika_jax.models.vit import ViT

pytestmark = pytest.mark.oracle


def _save(tensors, path):
    safetensors_torch = require_oracle("safetensors.torch")
    torch = require_oracle("torch")
    tensors = {k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in tensors.items()}
    safetensors_torch.save_file(tensors, str(path))
    return path


def _state(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _fresh(hf):
    """An abstract ViT for the HF model's config: a weight left unfilled stays abstract."""
    cfg = vit_config_from_hf(hf.config.to_dict())
    return nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(1))), cfg


@pytest.mark.parametrize("case", ["dinov2", "dinov2_registers", "dinov3", "dinov3_gated"])
def test_every_tensor_is_used_and_every_weight_filled(case, tmp_path):
    hf = hf_model(case)
    state = _state(hf)
    path = _save(state, tmp_path / "model.safetensors")
    model, _ = _fresh(hf)
    load_hf_vit_weights(model, read_safetensors(path), source=str(path))
    ours = {
        ".".join(map(str, p)): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(model))
    }
    assert len(ours) == len(state)  # one model weight per tensor, both ways
    flat_ours = np.sort(np.concatenate([a.ravel() for a in ours.values()]))
    flat_hf = np.sort(np.concatenate([a.ravel() for a in state.values()]))
    np.testing.assert_array_equal(flat_ours, flat_hf)  # the same numbers, moved


def test_load_from_directory_and_from_file_with_config(tmp_path):
    hf = hf_model("dinov3")
    hf.save_pretrained(tmp_path)
    x = jnp.asarray(images("dinov3"))
    tokens = fast_jit(lambda m, x: m(x).tokens)
    a = tokens(load_hf_vit(tmp_path), x)
    cfg = vit_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    b = load_hf_vit(tmp_path / "model.safetensors", config=cfg, param_type=nnx.Param)
    assert not nnx.state(b, FrozenParam)
    np.testing.assert_array_equal(a, tokens(b, x))


def _legacy_dinov2(name):
    for new, old in [
        ("attention.q_proj", "attention.attention.query"),
        ("attention.k_proj", "attention.attention.key"),
        ("attention.v_proj", "attention.attention.value"),
        ("attention.o_proj", "attention.output.dense"),
        ("mlp.down_proj", "mlp.weights_out"),
    ]:
        name = name.replace(new, old)
    return name


@pytest.mark.parametrize("case", ["dinov2", "dinov2_swiglu", "dinov3"])
def test_legacy_hub_names_load(case, tmp_path):
    kw = dict(use_swiglu_ffn=True) if case == "dinov2_swiglu" else {}
    hf = hf_model(case.removesuffix("_swiglu"), **kw)
    state = _state(hf)
    if case == "dinov3":
        legacy = {re.sub(r"^model\.layer\.", "layer.", k): v for k, v in state.items()}
    else:
        legacy = {_legacy_dinov2(k): v for k, v in state.items() if "gate_proj" not in k}
        for k in [k for k in legacy if "up_proj" in k]:  # fused SwiGLU input: [gate; up]
            legacy[k.replace("up_proj", "weights_in")] = np.concatenate(
                [state[k.replace("up_proj", "gate_proj")], legacy.pop(k)]
            )
    assert set(legacy) != set(state)
    path = _save(legacy, tmp_path / "model.safetensors")
    model, cfg = _fresh(hf)
    assert cfg.gated_mlp == (case == "dinov2_swiglu")
    load_hf_vit_weights(model, read_safetensors(path))
    x = images(case.removesuffix("_swiglu"))
    ref = run_hf(hf, x).last_hidden_state.numpy()
    tokens = fast_jit(lambda m, x: m(x).tokens)(model, jnp.asarray(x))
    assert float(np.abs(np.asarray(tokens) - ref).max()) < 1e-5


@pytest.fixture(scope="module")
def v2_state():
    return _state(hf_model("dinov2"))


def _refused(state, tmp_path, match):
    path = _save(state, tmp_path / "w.safetensors")
    model, _ = _fresh(hf_model("dinov2"))
    with pytest.raises(ValueError, match=match) as e:
        load_hf_vit_weights(model, read_safetensors(path), source=str(path))
    assert str(path) in str(e.value)


def test_extra_tensor_is_refused(v2_state, tmp_path):
    _refused(
        v2_state | {"classifier.weight": np.zeros((3, 64), np.float32)},
        tmp_path,
        r"unexpected tensors \['classifier.weight'\]",
    )


def test_missing_tensor_is_refused(v2_state, tmp_path):
    state = {k: v for k, v in v2_state.items() if k != "encoder.layer.1.attention.k_proj.bias"}
    _refused(state, tmp_path, r"missing tensors \['encoder.layer.1.attention.k_proj.bias'\]")


def test_wrong_shape_is_refused(v2_state, tmp_path):
    key = "encoder.layer.0.mlp.fc1.weight"
    state = v2_state | {key: np.zeros((128, 64), np.float32)}
    _refused(state, tmp_path, rf"tensor '{re.escape(key)}' has shape \(128, 64\)")


def test_non_finite_tensor_is_refused(v2_state, tmp_path):
    key = "encoder.layer.2.layer_scale2.lambda1"
    state = v2_state | {key: np.full(64, np.nan, np.float32)}
    _refused(state, tmp_path, rf"tensor '{re.escape(key)}' holds NaN")


def test_key_bias_not_in_dinov3_config_is_refused(tmp_path):
    state = _state(hf_model("dinov3"))
    state["model.layer.0.attention.k_proj.bias"] = np.zeros(64, np.float32)
    path = _save(state, tmp_path / "model.safetensors")
    model, _ = _fresh(hf_model("dinov3"))
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layer.0.attention.k_proj"):
        load_hf_vit_weights(model, read_safetensors(path), source=str(path))


def test_corrupt_and_missing_files_are_refused(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))}: not a readable safetensors"):
        read_safetensors(bad)
    with pytest.raises(FileNotFoundError, match=r"nothere\.safetensors"):
        read_safetensors(tmp_path / "nothere.safetensors")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_hf_vit(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_hf_vit(tmp_path)


def test_unsupported_configs_are_refused():
    with pytest.raises(ValueError, match="model_type"):
        vit_config_from_hf({"model_type": "vit"})
    with pytest.raises(ValueError, match="square patch_size"):
        vit_config_from_hf({"model_type": "dinov3_vit", "patch_size": [16, 8]})


def test_half_precision_file_is_upcast(tmp_path):
    torch = require_oracle("torch")
    hf = hf_model("dinov3")
    state = {k: v.to(torch.bfloat16) for k, v in hf.state_dict().items()}
    require_oracle("safetensors.torch").save_file(state, str(tmp_path / "model.safetensors"))
    hf.config.to_json_file(str(tmp_path / "config.json"))
    model = load_hf_vit(tmp_path)
    dtypes = {v.get_value().dtype for v in jax.tree.leaves(nnx.state(model), is_leaf=_is_var)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    want = state["norm.weight"].float().numpy()
    np.testing.assert_array_equal(np.asarray(model.norm.scale.get_value()), want)


def _is_var(x):
    return isinstance(x, nnx.Variable)
