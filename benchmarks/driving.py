"""Driving FPS (LBS + render) and reconstruction latency on the device at hand.

    python benchmarks/driving.py [--config configs/tiny.py] [--views 1,2,4,8,16]
        [--driving-only] [--num-gaussians K] [--builtin-head] [--backend NAME]
        [--repeats 10] [--warmup 2] [--json OUT]

What `evaluate.py --config.eval.mode=speed` reports (`uika_jax.evaluation.speed`),
without a checkpoint:

- default: a random-init model of the config (weights do not change the time):
  reconstruction latency for each source view count up to `model.num_views`, then
  driving of its Gaussians.
- `--driving-only`: no network; random Gaussians on the head's anchors
  (`random_gaussians`: sizes about the anchor spacing, capped at half of
  `model.gaussians.max_scale`) driven by LBS and rendered at the config's image
  size. `--num-gaussians K` takes K anchors; when the head's UV layout covers fewer
  texels at `model.decoder.map_size` (the built-in head covers 88,464 at 384, the
  paper's FLAME about 130K), the UV map is enlarged until it covers K.
  `--builtin-head` replaces the config's head model (configs/default.py names the
  licensed FLAME files, which do not ship) by the built-in one.

Runs on JAX's default device (CPU, or an accelerator when one is installed) and
prints the markdown table (`--json` also writes the measurement, `--png` the driven
frame). No peer is timed
here: the paper reports 220 FPS for about 130K Gaussians at 512 x 512 on an A100
(LBS + gsplat's CUDA rasterizer), which needs CUDA; the rasterizer alone is
compared with gsplat's torch reference on CPU in benchmarks/rasterizer.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from uika_jax.config import load_config
from uika_jax.evaluation import speed
from uika_jax.head.anchors import Anchors, make_anchors
from uika_jax.head.model import HeadModel
from uika_jax.models.avatar import UIKA, build_head
from uika_jax.models.gaussians import CanonicalGaussians, mean_anchor_spacing
from uika_jax.safe_files import atomic_write, write_png

ROOT = Path(__file__).resolve().parents[1]


def random_gaussians(anchors: Anchors, *, scale: float, seed: int = 0) -> CanonicalGaussians:
    """Random canonical Gaussians on the anchors, for timing driving without a network.

    Offsets up to a quarter of `scale`, scales log-uniform in [scale / 2, 2 scale],
    random rotations, opacities in [0.3, 1), colours in [0, 1).

    Args:
      anchors: the K anchors.
      scale: typical Gaussian size (e.g. the anchor spacing), metres.
      seed: NumPy seed.
    """
    rng = np.random.default_rng(seed)
    k = anchors.num_anchors
    shape = (1, k)
    offsets = 0.25 * scale * rng.uniform(-1, 1, size=(*shape, 3))
    quats = rng.normal(size=(*shape, 4))
    quats /= np.linalg.norm(quats, axis=-1, keepdims=True)
    opacities = rng.uniform(0.3, 0.999, size=shape)
    colors = rng.uniform(size=(*shape, 3))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return CanonicalGaussians(
        means=f32(np.asarray(anchors.positions)[None] + offsets),
        quats=f32(quats),
        log_scales=f32(np.log(scale) + rng.uniform(np.log(0.5), np.log(2.0), size=(*shape, 3))),
        opacity_logits=f32(np.log(opacities / (1 - opacities))),
        colors=f32(colors),
        offsets=f32(offsets),
        fusion_weights=f32(np.zeros((*shape, 1))),
        pred_colors=f32(colors),
        aggr_colors=f32(np.zeros((*shape, 3))),
    )


def anchors_for(head: HeadModel, resolution: int, num_gaussians: int | None) -> Anchors:
    """K anchors at `resolution`, or at the smallest larger UV size (x1.05 steps) covering K."""
    while True:
        covered = make_anchors(head, resolution)
        if num_gaussians is None:
            return covered
        if covered.num_anchors >= num_gaussians:
            return make_anchors(head, resolution, num_gaussians)
        resolution = int(resolution * 1.05) + 1


def driving_only(
    config: ml_collections.ConfigDict, num_gaussians: int | None, repeats: int, warmup: int
) -> tuple[str, dict, np.ndarray]:
    """Times the driving of random Gaussians; returns (markdown, JSON-ready dict, frame)."""
    head, _ = build_head(config)
    anchors = anchors_for(head, int(config.model.decoder.map_size), num_gaussians)
    spacing = mean_anchor_spacing(anchors.positions)
    scale = min(spacing, 0.5 * float(config.model.gaussians.max_scale))
    gaussians = random_gaussians(anchors, scale=scale)
    driving, rendered = speed.measure_driving(
        config, head, anchors, gaussians, repeats=repeats, warmup=warmup
    )
    device = speed.device_info()
    size = int(config.model.image_size)
    note = (
        f"Random Gaussians on {anchors.num_anchors} anchors of the "
        f"{'built-in head' if not config.head.model_path else config.head.model_path} "
        f"(UV map {anchors.uv_resolution}^2, spacing {1e3 * spacing:.2f} mm, scales "
        f"{1e3 * scale / 2:.2f}-{1e3 * scale * 2:.2f} mm)."
    )
    table = "\n".join(
        [speed.device_line(device, anchors.num_anchors, size), note, "",
         speed.driving_markdown(driving)]
    )  # fmt: skip
    record = {
        "device": device,
        "num_gaussians": anchors.num_anchors,
        "image_size": size,
        "uv_resolution": anchors.uv_resolution,
        "driving": driving.to_dict(),
    }
    return table, record, np.asarray(rendered.images[0, 0])


def full(
    config: ml_collections.ConfigDict, views: tuple[int, ...], repeats: int, warmup: int
) -> tuple[str, dict, np.ndarray]:
    """Times a random-init model's reconstruction per view count and its driving."""
    head, anchors = build_head(config)
    spacing = mean_anchor_spacing(anchors.positions)
    model = UIKA.from_config(config, rngs=nnx.Rngs(0), anchor_spacing=spacing)
    report = speed.measure_speed(
        model, config, head, anchors, views=views, repeats=repeats, warmup=warmup
    )
    return report.to_markdown(), report.to_dict(), report.frame


def main() -> None:
    """Parses the arguments, measures, prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs/tiny.py"))
    parser.add_argument("--views", default="1,2,4,8,16")
    parser.add_argument("--driving-only", action="store_true")
    parser.add_argument("--num-gaussians", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backend", default=None, help="render.backend (default: the config's)")
    parser.add_argument(
        "--builtin-head", action="store_true", help="the built-in head instead of the config's"
    )
    parser.add_argument("--json", default=None, help="also write the measurement here")
    parser.add_argument("--png", default=None, help="also write the driven frame here")
    args = parser.parse_args()
    config = load_config(args.config)
    if args.builtin_head:
        config.head.model_path, config.head.uv_path = None, None
    if args.backend:
        config.render.backend = args.backend
    if args.driving_only:
        table, record, frame = driving_only(config, args.num_gaussians, args.repeats, args.warmup)
    else:
        if args.num_gaussians is not None:
            parser.error("--num-gaussians needs --driving-only (the model sets K)")
        views = tuple(int(v) for v in args.views.split(","))
        table, record, frame = full(config, views, args.repeats, args.warmup)
    record["config"] = args.config
    print(f"jax {jax.__version__}, config {args.config}\n")
    print(table)
    if args.json:
        with atomic_write(args.json) as f:
            f.write(json.dumps(record, indent=2).encode())
    if args.png:
        write_png(args.png, np.round(np.clip(frame, 0, 1) * 255).astype(np.uint8))


if __name__ == "__main__":
    main()
