"""Pallas kernels of uika_jax (GPU via Triton, TPU via Mosaic): leaf code.

Named `uika_kernels` because the bare import name `kernels` belongs to another
PyPI package. Nothing here imports `uika_jax`: `uika_kernels.tiles` holds the
compositing constants and tile layout that the reference compositor in
`uika_jax.render` imports, and `uika_jax.render` registers the kernels of
`uika_kernels.raster` as rasterizer backends on first use. Importing the
package imports no Pallas module.
"""
