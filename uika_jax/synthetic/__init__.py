"""The built-in procedural head and what is made from it.

`head` (synthetic_head_model: a FLAME-format model needing no licensed file,
identity coefficients, expression presets), its construction (`sculpt`, `mesh`,
`deform`), `albedo` (per-identity procedural albedo), `views` (the framing camera
and render of an identity) and `preview` (the contact sheet,
`python -m uika_jax.synthetic.preview --out head.png`).
"""
