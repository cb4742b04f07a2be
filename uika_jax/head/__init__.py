"""The FLAME-format head model: file io, LBS, rotations, the UV layout and anchors.

Import from the modules: `io` (load_head_model, save_head_model), `lbs`
(flame_forward, FlameParams), `rotations`, `uv_raster` (the UV convention and
the rasterized UV layout), `anchors` (make_anchors, deform_anchors). The built-in
procedural head lives in `uika_jax.synthetic`, the renderers in `uika_jax.render`.
"""
