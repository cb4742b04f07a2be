"""The UIKA network: frozen ViT backbones, DPT heads, encoders, UV transformer, decoder.

Modules are Flax NNX. Pretrained frozen weights are `FrozenParam` variables
(`uika_jax.models.frozen`), kept outside the optimizer's `wrt=nnx.Param`.
"""
