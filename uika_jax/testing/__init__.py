"""Test and benchmark helpers only; never imported by uika_jax's runtime code.

`gsplat_mirror` imports the `ref` extra's oracles (torch, gsplat) at import time
(`pip install -e '.[ref]'`); `mesh_oracle` needs only numpy.
"""
