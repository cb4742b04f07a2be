"""Mesh renderer speed on CPU: frames/s of the synthetic head, ours beside a numpy z-buffer.

    python benchmarks/mesh_render.py [--sizes 64,128,256,512] [--batch 8] [--runs 5]

Scene: the built-in synthetic head (`synthetic_head_model()`), `--batch`
identities (seeds 0..B-1, neutral), each framed as the synthetic views frame
it (`uika_jax.synthetic.views.identity_camera`) from a yaw spread over -40..40
degrees, textured with `synthetic_albedo(0, 256)`.

Implementations, all on this machine's CPU, in one process:

- ours, render: `render_mesh_batch` (jitted, the B views in one call, the
  capacity from `mesh_capacity` on the same views): image, image UV, mask,
  depth, triangle id and normals.
- ours, raster: `rasterize_triangles` alone on the B views' projected
  triangles (one batched, jitted call).
- numpy: `uika_jax.testing.mesh_oracle.rasterize`, view by view: a vectorised
  numpy z-buffer (float64; triangles grouped by bounding-box window size),
  rasterization only: what a numpy user would otherwise write.

After a warm-up call of each (compile time excluded), each of `--runs`
rounds times one call of each implementation in turn, so that all see the same
machine load. The table prints frames/s (B / time) as the median over rounds
with the spread (min-max), and per round the numpy peer's time over ours
("x numpy": how many times faster ours is).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from timing import spread, time_ms

from uika_jax.head.lbs import flame_forward
from uika_jax.head.uv_raster import corner_image_uv
from uika_jax.render.camera import project, world_to_camera
from uika_jax.render.mesh_raster import rasterize_triangles
from uika_jax.render.mesh_render import mesh_capacity, render_mesh_batch
from uika_jax.synthetic.albedo import synthetic_albedo
from uika_jax.synthetic.head import identity_coefficients, synthetic_head_model
from uika_jax.synthetic.views import identity_camera
from uika_jax.testing import mesh_oracle

HEADER = (
    f"{'size':>5} {'slots/px':>8} | {'ours, render f/s':>18} | {'ours, raster f/s':>18} | "
    f"{'numpy f/s':>14} | {'x numpy (raster)':>18}"
)


def views(model, batch: int, size: int):
    """Posed vertices (B, V, 3), viewmats (B, 4, 4) and intrinsics (B, 3, 3) of B identities."""
    yaws = np.linspace(-40.0, 40.0, batch) if batch > 1 else np.zeros(1)
    pose = jnp.zeros((5, 3))
    expression = jnp.zeros(model.num_expression)
    posed = jax.jit(lambda shape: flame_forward(model, shape, expression, pose)[0])
    vertices, viewmats, Ks = [], [], []
    for seed, yaw in enumerate(yaws):
        shape = identity_coefficients(seed, model.num_shape)
        vertices.append(np.asarray(posed(jnp.asarray(shape, jnp.float32))))
        viewmat, K = identity_camera(model, shape, size, yaw_deg=float(yaw))
        viewmats.append(viewmat)
        Ks.append(K)
    return tuple(jnp.asarray(np.stack(a), jnp.float32) for a in (vertices, viewmats, Ks))


def measure(model, size: int, batch: int, runs: int) -> dict:
    """Frames/s lists of the three implementations at one image size."""
    vertices, viewmats, Ks = views(model, batch, size)
    faces = jnp.asarray(model.faces)
    corner_uv = corner_image_uv(model)
    texture = jnp.asarray(synthetic_albedo(0, 256), jnp.float32)
    capacity = mesh_capacity(vertices, faces, viewmats, Ks, size, size)
    camera = jax.vmap(world_to_camera)(vertices, viewmats)
    corners = jax.vmap(project)(camera, Ks)[:, faces]
    depth = camera[..., 2][:, faces]
    corners_np, depth_np = np.asarray(corners), np.asarray(depth)
    raster = jax.jit(lambda c, d: rasterize_triangles(c, d, size, size, capacity=capacity))

    def render():
        out = render_mesh_batch(
            vertices, faces, viewmats, Ks, size, size,
            corner_uv=corner_uv, texture=texture, capacity=capacity,
        )  # fmt: skip
        jax.block_until_ready(out)
        return out

    calls = {
        "render": render,
        "raster": lambda: jax.block_until_ready(raster(corners, depth)),
        "numpy": lambda: [
            mesh_oracle.rasterize(c, d, size, size)
            for c, d in zip(corners_np, depth_np, strict=True)
        ],
    }
    first = {name: call() for name, call in calls.items()}
    assert int(np.sum(first["render"].overflow)) == 0
    np.testing.assert_array_equal(
        first["raster"].triangle_id, np.stack([f.triangle_id for f in first["numpy"]])
    )
    ms = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            ms[name].append(time_ms(call))
    return {
        "slots_per_pixel": capacity / size**2,
        **{name: [1e3 * batch / t for t in times] for name, times in ms.items()},
        "x_numpy": [n / r for n, r in zip(ms["numpy"], ms["raster"], strict=True)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,128,256,512")
    parser.add_argument("--batch", type=int, default=8, help="views per call")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    model = synthetic_head_model()
    print(
        f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, jax {jax.__version__}; "
        f"synthetic head: {model.num_vertices} vertices, {len(model.faces)} faces; "
        f"batch {args.batch}"
    )
    print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    for size in (int(s) for s in args.sizes.split(",")):
        r = measure(model, size, args.batch, args.runs)
        print(
            f"{size:>5} {r['slots_per_pixel']:>8.2f} | {spread(r['render']):>18} | "
            f"{spread(r['raster']):>18} | {spread(r['numpy']):>14} | "
            f"{spread(r['x_numpy'], '.1f', 'x'):>18}",
            flush=True,
        )
    print(
        f"\nload average {os.getloadavg()[0]:.1f} at end; frames/s are medians over --runs "
        "rounds (min-max); 'slots/px' is the rasterizer capacity per pixel."
    )


if __name__ == "__main__":
    main()
