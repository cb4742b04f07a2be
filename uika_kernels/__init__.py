"""Pallas kernels of uika_jax (GPU via Triton, TPU via Mosaic).

DESIGN.md sketches this folder as `kernels/`; it is named `uika_kernels`
because the bare import name `kernels` belongs to another PyPI package.
Importing it registers the ``pallas*`` compositing backends of
`uika_jax.render.rasterize` (see `uika_kernels.raster`).
"""

from uika_kernels import raster as raster
