"""The FLAME-format head model: file io, LBS, UV anchors, the built-in synthetic head.

Import from the modules: `io` (load_head_model, save_head_model), `lbs`
(flame_forward, FlameParams), `anchors` (make_anchors, deform_anchors),
`uv_raster` (the UV convention), `mesh_render` (render_mesh), `synthetic`
(synthetic_head_model), `albedo` (synthetic_albedo), `preview` (contact sheet).
"""
