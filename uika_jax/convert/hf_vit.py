"""HF DINOv2 / DINOv2-with-registers / DINOv3 ViT weights (local safetensors) -> `ViT` state.

Accepted layouts, for `Dinov2Model`/`Dinov2Backbone`, `Dinov2WithRegistersModel`/
`...Backbone` and `DINOv3ViTModel`/`DINOv3ViTBackbone`:

- transformers 5 names (what `model.state_dict()` / `save_pretrained` write), e.g.
  `encoder.layer.0.attention.q_proj.weight`, `model.layer.0.mlp.up_proj.weight`;
- the hub files' legacy names, which transformers renames on load:
  DINOv2 `attention.attention.{query,key,value}`, `attention.output.dense`,
  `mlp.weights_in` (SwiGLU; split in two halves: gate, up), `mlp.weights_out`;
  DINOv3 `layer.N.` without the `model.` prefix.

The load is strict: every tensor in the file must be consumed and every model
weight filled, shapes must match exactly and values be finite; each failure
raises a `ValueError` naming the file and the tensor(s). Tensors are cast to float32. Nothing here
reaches a hub: `path` is a local file, or a directory holding `config.json` and
`model.safetensors` (a hub snapshot fetched by the user).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from uika_jax.models.frozen import FrozenParam, ParamType
from uika_jax.models.vit import ViT, ViTConfig
from uika_jax.models.vit_layers import conv_to_patch_kernel

Transform = Callable[[np.ndarray, tuple[int, ...]], np.ndarray]

_HF_DEFAULTS: dict[str, dict[str, Any]] = {  # transformers 5.24 config defaults
    "dinov2": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        mlp_ratio=4,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        image_size=224,
        patch_size=14,
        qkv_bias=True,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        use_mask_token=True,
    ),
    "dinov3_vit": dict(
        patch_size=16,
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=12,
        num_attention_heads=6,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        rope_theta=100.0,
        image_size=224,
        query_bias=True,
        key_bias=False,
        value_bias=True,
        proj_bias=True,
        mlp_bias=True,
        layerscale_value=1.0,
        use_gated_mlp=False,
        num_register_tokens=0,
    ),
}
_HF_DEFAULTS["dinov2_with_registers"] = _HF_DEFAULTS["dinov2"] | dict(
    patch_size=16, num_register_tokens=4
)


def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"only square {name} is supported, got {value}")
        value = value[0]
    return int(value)


def vit_config_from_hf(hf: Mapping[str, Any]) -> ViTConfig:
    """A `ViTConfig` from an HF `config.json` dict.

    Args:
      hf: the config dict; model_type dinov2, dinov2_with_registers or dinov3_vit.
        Missing keys take the transformers 5.24 defaults.

    Returns:
      The matching `ViTConfig`.
    """
    model_type = hf.get("model_type")
    if model_type not in _HF_DEFAULTS:
        raise ValueError(f"unsupported model_type {model_type!r}; known: {sorted(_HF_DEFAULTS)}")
    c = _HF_DEFAULTS[model_type] | dict(hf)
    common = dict(
        hidden_size=c["hidden_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        patch_size=_square(c["patch_size"], "patch_size"),
        image_size=_square(c["image_size"], "image_size"),
        layer_norm_eps=c["layer_norm_eps"],
        layerscale_value=c["layerscale_value"],
    )
    if model_type == "dinov3_vit":
        return ViTConfig(
            family="dinov3",
            mlp_dim=c["intermediate_size"],
            num_register_tokens=c["num_register_tokens"],
            hidden_act=c["hidden_act"],
            gated_mlp=c["use_gated_mlp"],
            query_bias=c["query_bias"],
            key_bias=c["key_bias"],
            value_bias=c["value_bias"],
            proj_bias=c["proj_bias"],
            mlp_bias=c["mlp_bias"],
            rope_theta=c["rope_theta"],
            **common,
        )
    hidden = int(c["hidden_size"] * c["mlp_ratio"])
    swiglu = bool(c["use_swiglu_ffn"])
    registers = model_type == "dinov2_with_registers"
    return ViTConfig(
        family="dinov2",
        mlp_dim=(int(hidden * 2 / 3) + 7) // 8 * 8 if swiglu else hidden,
        num_register_tokens=c["num_register_tokens"] if registers else 0,
        hidden_act="silu" if swiglu else c["hidden_act"],
        gated_mlp=swiglu,
        query_bias=c["qkv_bias"],
        key_bias=c["qkv_bias"],
        value_bias=c["qkv_bias"],
        pos_embed_antialias=registers,
        use_mask_token=registers or c["use_mask_token"],
        **common,
    )


def _reshape(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Drops HF's leading singleton axes (cls (1, 1, D) -> (D,)); other shapes stay."""
    while a.ndim > len(shape) and a.shape[0] == 1:
        a = a[0]
    return a


def _linear(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return a.T if a.ndim == 2 else a


def _conv(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return conv_to_patch_kernel(a) if a.ndim == 4 else a


def _expected(cfg: ViTConfig) -> Iterator[tuple[tuple[Any, ...], str, Transform]]:
    """(our variable path, canonical HF key, transform) for every weight of a `ViT(cfg)`."""
    v2 = cfg.family == "dinov2"
    patch = "embeddings.patch_embeddings.projection" if v2 else "embeddings.patch_embeddings"
    yield ("patch_embed", "kernel"), f"{patch}.weight", _conv
    yield ("patch_embed", "bias"), f"{patch}.bias", _reshape
    yield ("cls_token",), "embeddings.cls_token", _reshape
    if cfg.use_mask_token:
        yield ("mask_token",), "embeddings.mask_token", _reshape
    if cfg.num_register_tokens:
        yield ("registers",), "embeddings.register_tokens", _reshape
    if v2:
        yield ("pos_embed",), "embeddings.position_embeddings", _reshape
    if cfg.gated_mlp:
        mlp = dict(gate="gate_proj", up="up_proj", down="down_proj")
    else:
        mlp = dict(up="fc1", down="fc2") if v2 else dict(up="up_proj", down="down_proj")
    biases = dict(q=cfg.query_bias, k=cfg.key_bias, v=cfg.value_bias, o=cfg.proj_bias)
    for i in range(cfg.num_layers):
        hf = f"encoder.layer.{i}" if v2 else f"model.layer.{i}"
        ours = ("blocks", i)
        for n in ("norm1", "norm2"):
            yield (*ours, n, "scale"), f"{hf}.{n}.weight", _reshape
            yield (*ours, n, "bias"), f"{hf}.{n}.bias", _reshape
        for n in ("q", "k", "v", "o"):
            yield (*ours, "attn", n, "kernel"), f"{hf}.attention.{n}_proj.weight", _linear
            if biases[n]:
                yield (*ours, "attn", n, "bias"), f"{hf}.attention.{n}_proj.bias", _reshape
        for n, hf_n in mlp.items():
            yield (*ours, "mlp", n, "kernel"), f"{hf}.mlp.{hf_n}.weight", _linear
            if cfg.mlp_bias:
                yield (*ours, "mlp", n, "bias"), f"{hf}.mlp.{hf_n}.bias", _reshape
        yield (*ours, "ls1", "gamma"), f"{hf}.layer_scale1.lambda1", _reshape
        yield (*ours, "ls2", "gamma"), f"{hf}.layer_scale2.lambda1", _reshape
    final = "layernorm" if v2 else "norm"
    yield ("norm", "scale"), f"{final}.weight", _reshape
    yield ("norm", "bias"), f"{final}.bias", _reshape


_V2_LEGACY = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
    ("mlp.weights_out.", "mlp.down_proj."),
)


def _canonical(tensors: Mapping[str, np.ndarray], family: str) -> dict[str, tuple[str, np.ndarray]]:
    """Maps legacy hub names to transformers 5 names: {canonical: (name in file, array)}."""
    out: dict[str, tuple[str, np.ndarray]] = {}
    for name, a in tensors.items():
        if family == "dinov3":
            pairs = [(re.sub(r"^layer\.", "model.layer.", name), a)]
        elif ".mlp.weights_in." in name:
            gate, up = np.split(a, 2, axis=0)
            pairs = [(name.replace("weights_in", "gate_proj"), gate)]
            pairs.append((name.replace("weights_in", "up_proj"), up))
        else:
            new = name
            for old, rep in _V2_LEGACY:
                new = new.replace(old, rep)
            pairs = [(new, a)]
        for key, arr in pairs:
            if key in out:
                raise ValueError(f"tensors {out[key][0]!r} and {name!r} both map to {key!r}")
            out[key] = (name, arr)
    return out


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a local safetensors file as float32 numpy arrays (bf16/f16 upcast)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"safetensors file not found: {path}")
    try:
        with safe_open(path, framework="flax") as f:
            return {k: np.asarray(f.get_tensor(k).astype(jnp.float32)) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def load_hf_vit_weights(
    model: ViT, tensors: Mapping[str, np.ndarray], *, source: str = "<tensors>"
) -> ViT:
    """Fills every weight of `model` from HF-layout tensors, in place; strict (see module doc).

    Args:
      model: a `ViT` whose config matches the checkpoint.
      tensors: name -> array, e.g. from `read_safetensors`.
      source: the file name used in error messages.

    Returns:
      `model`, for chaining.
    """
    cfg = model.config
    have = _canonical(tensors, cfg.family)
    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    expected = list(_expected(cfg))
    keys = {key for _, key, _ in expected}
    missing = sorted(key for key in keys if key not in have)
    unexpected = sorted(have[k][0] for k in have if k not in keys)
    if missing or unexpected:
        raise ValueError(
            f"{source}: does not match the {cfg.family} ViT config: "
            f"missing tensors {missing}, unexpected tensors {unexpected}"
        )
    ours = {path for path, _, _ in expected}
    if ours != set(flat):
        raise AssertionError(f"converter table and model disagree: {ours ^ set(flat)}")
    for path, key, transform in expected:
        name, a = have[key]
        var = flat[path]
        arr = transform(np.asarray(a, np.float32), var.shape)
        if arr.shape != var.shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(a.shape)}, the model's "
                f"{'.'.join(map(str, path))} needs {var.shape} (config mismatch?)"
            )
        if not np.isfinite(arr).all():
            raise ValueError(f"{source}: tensor {name!r} holds NaN or infinite values")
        var.set_value(jnp.asarray(arr, jnp.float32))
    nnx.update(model, state)
    return model


def load_hf_vit(
    path: str | os.PathLike,
    *,
    config: ViTConfig | None = None,
    param_type: ParamType = FrozenParam,
    dtype: jnp.dtype = jnp.float32,
    stop_gradient: bool = False,
) -> ViT:
    """Builds a `ViT` and loads HF weights from a local path.

    Args:
      path: a `.safetensors` file, or a directory with `model.safetensors` and
        (unless `config` is given) `config.json`.
      config: the architecture; default: read from `config.json` beside the weights.
      param_type: `FrozenParam` (default) or `nnx.Param`.
      dtype: computation dtype.
      stop_gradient: see `ViT`.

    Returns:
      The loaded model.
    """
    path = os.fspath(path)
    weights = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    if config is None:
        cfg_file = os.path.join(os.path.dirname(weights), "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"no config given and no config.json beside {weights}")
        try:
            with open(cfg_file) as f:
                config = vit_config_from_hf(json.load(f))
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
    tensors = read_safetensors(weights)
    model = nnx.eval_shape(
        lambda: ViT(
            config,
            param_type=param_type,
            dtype=dtype,
            stop_gradient=stop_gradient,
            rngs=nnx.Rngs(0),
        )
    )
    return load_hf_vit_weights(model, tensors, source=weights)
