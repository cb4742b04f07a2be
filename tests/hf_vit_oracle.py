"""Small random-init HF DINOv2 / DINOv3 models (transformers 5.24, eval mode) for ViT tests."""

import os

import numpy as np
from conftest import require_oracle

os.environ.setdefault("HF_HUB_OFFLINE", "1")

D, HEADS = 64, 4

# name -> (HF model class, config class, config kwargs, test image (H, W))
CASES = {
    "dinov2": (
        "Dinov2Model",
        "Dinov2Config",
        dict(image_size=56, patch_size=14, num_hidden_layers=3),
        (28, 42),
    ),
    "dinov2_registers": (
        "Dinov2WithRegistersModel",
        "Dinov2WithRegistersConfig",
        dict(image_size=56, patch_size=14, num_hidden_layers=3, num_register_tokens=4),
        (28, 42),
    ),
    "dinov3": (
        "DINOv3ViTModel",
        "DINOv3ViTConfig",
        dict(
            image_size=32,
            patch_size=16,
            num_hidden_layers=3,
            intermediate_size=128,
            num_register_tokens=4,
        ),
        (32, 48),
    ),
    "dinov3_gated": (
        "DINOv3ViTModel",
        "DINOv3ViTConfig",
        dict(
            image_size=32,
            patch_size=16,
            num_hidden_layers=2,
            intermediate_size=96,
            num_register_tokens=4,
            use_gated_mlp=True,
            hidden_act="silu",
        ),
        (32, 48),
    ),
}


def hf_config(name, cls_name=None, **overrides):
    """The HF config of a case (overrides win)."""
    transformers = require_oracle("transformers")
    model_cls, config_cls, kw, _ = CASES[name]
    kw = dict(hidden_size=D, num_attention_heads=HEADS) | kw | overrides
    return getattr(transformers, config_cls)(**kw), getattr(transformers, cls_name or model_cls)


def hf_model(name, cls_name=None, seed=0, **overrides):
    """A random-init HF model in eval mode whose LayerScale, norms, biases and registers
    are all randomised (HF inits them to constants, which would hide mistakes)."""
    torch = require_oracle("torch")
    config, cls = hf_config(name, cls_name, **overrides)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in ("lambda1", "norm", "bias", "register", "mask_token")):
                base = 1.0 if n.endswith(("lambda1", "norm1.weight", "norm2.weight")) else 0.0
                p.copy_(base + 0.5 * torch.randn_like(p))
    return model


def images(name, batch=2, seed=0, size=None):
    """Random normalised NHWC images for a case."""
    h, w = size or CASES[name][3]
    return np.random.RandomState(seed).randn(batch, h, w, 3).astype(np.float32)


def run_hf(model, x, **kwargs):
    """Runs an HF model on NHWC numpy images (NCHW inside)."""
    torch = require_oracle("torch")
    with torch.no_grad():
        return model(torch.from_numpy(x).permute(0, 3, 1, 2), **kwargs)


def final_norm(model):
    """The HF model's final LayerNorm module."""
    return model.layernorm if hasattr(model, "layernorm") else model.norm
