"""uika_jax: UIKA feed-forward 3D Gaussian head avatars in JAX/Flax."""

__version__ = "0.1.0"
