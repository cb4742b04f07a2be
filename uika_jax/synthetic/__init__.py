"""The built-in procedural head and what is made from it.

`head` (synthetic_head_model: a FLAME-format model needing no licensed file,
identity coefficients, expression presets), its construction (`sculpt`, `mesh`,
`deform`); identities (`identity`: sex, age, skin tone, hair per seed; `albedo`
and `face_paint`: per-identity albedo with age and sex cues; `hair` and
`hairstyle`: render-only hair geometry attached to the scalp); motion (`motion`,
`motion_kinds`, `keyframes`: the procedural motion library); scenes (`rig`: the 9
fixed views jittered per identity; `lighting`, `materials`, `backgrounds`);
rendering (`frame`: lit, anti-aliased frames with masks and ground-truth UV maps;
`views`: the framing camera and a plain render of an identity); the dataset
generator (`dataset`, `uika synth`) and the contact sheet (`preview`,
`python -m uika_jax.synthetic.preview --out head.png`).
"""
