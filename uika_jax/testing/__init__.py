"""Test and benchmark helpers only; never imported by uika_jax's runtime code.

Modules here import the `ref` extra's oracles (torch, gsplat) at import time:
`pip install -e '.[ref]'`.
"""
