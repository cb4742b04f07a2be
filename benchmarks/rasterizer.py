"""Rasterizer time: the reference backend, forward and forward+backward, exact vs packed keys.

    python benchmarks/rasterizer.py [--sizes 2000:128,20000:256] [--cameras 1] [--repeats 5]

Each size is N:S (N Gaussians on a head-sized ellipsoid shell, an S x S image
framed as in uika_jax.render.camera). Both sort keys run in the same process
on the same scene, jitted, with capacities from `calibrate_capacity()`.
Prints a table of median milliseconds per call and the intersection counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from uika_jax.render import calibrate_capacity, camera, rasterization


def head_scene(n: int, size: int, n_cams: int, seed: int = 0):
    """Gaussians on an ellipsoid shell (a head stand-in) and cameras framing it."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    means = d * np.array([0.08, 0.11, 0.09]) * rng.uniform(0.97, 1.0, (n, 1))
    area = 4 * np.pi * 0.09**2 / n
    scales = np.sqrt(area) * rng.uniform(0.3, 1.0, (n, 3)) * np.array([1.0, 1.0, 0.2])
    quats = rng.normal(size=(n, 4))
    opacities = rng.uniform(0.3, 1.0, n)
    colors = rng.uniform(size=(n, 3))
    views = [
        camera.framing_camera(np.zeros(3), 0.22, size, yaw_deg=30.0 * i) for i in range(n_cams)
    ]
    viewmats = np.stack([v for v, _ in views])
    ks = np.stack([k for _, k in views])
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return [f32(x) for x in (means, quats, scales, opacities, colors, viewmats, ks)]


def _time(fn, args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000:128,20000:256")
    parser.add_argument("--cameras", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}")
    print(f"{'N':>7} {'size':>5} {'isects':>8} {'key':>7} {'fwd ms':>9} {'fwd+bwd ms':>11}")
    for spec in args.sizes.split(","):
        n, size = (int(x) for x in spec.split(":"))
        scene = head_scene(n, size, args.cameras)
        base = calibrate_capacity(*scene[:4], *scene[5:], size, size, headroom=1.1,
                                  with_tile_cap=False)  # fmt: skip
        for key in ("exact", "packed"):
            cfg = dataclasses.replace(base, sort_key=key)
            fwd = jax.jit(lambda *x, cfg=cfg, s=size: rasterization(*x, s, s, config=cfg)[:2])

            def loss(*x, cfg=cfg, s=size):
                r, a, _ = rasterization(*x, s, s, config=cfg)
                return jnp.sum(r) + jnp.sum(a)

            bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
            isects = int(rasterization(*scene, size, size, config=cfg)[2]["n_isects"])
            t_f = _time(fwd, scene, args.repeats)
            t_b = _time(bwd, scene, args.repeats)
            print(f"{n:>7} {size:>5} {isects:>8} {key:>7} {t_f:>9.1f} {t_b:>11.1f}")


if __name__ == "__main__":
    main()
