"""Pallas kernels of uika_jax (GPU via Triton, TPU via Mosaic).

DESIGN.md sketches this folder as `kernels/`; it is named `uika_kernels`
because the bare import name `kernels` belongs to another PyPI package.
"""
