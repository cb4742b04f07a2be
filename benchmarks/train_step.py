"""Training-step speed and memory of both stages: compile time, step time, throughput.

    python benchmarks/train_step.py [--config=configs/tiny.py[:arg]] [--dataset=DIR]
        [--rounds 5] [--steps 10] [--accelerator-metrics]

Setup, as `uika_jax.training.loop` builds it (its `_Run`: mesh, head, anchors, data
pipeline, assets; `_Run.compiled_step`: the jitted `make_train_step` with the state
donated): per stage ("estimator", "avatar") a fresh state (`train_state.init_state`,
the avatar stage's at its first global step) and one global batch from the pipeline,
moved to the devices once and reused by every step (data loading is not timed). The
rasterizer's capacity is `raster_budget.raster_config` on that batch. `--dataset` is a
synthetic dataset folder (`uika synth`); without it a small one is generated into a
temporary folder: `SynthConfig(identities=8, views=config.data.synthetic.views,
sequences=1, frames=4, size=model.image_size, val_fraction=0.25)`.

Measured per stage:

- "lower s" / "compile s": `jit(step).lower(state, batch, assets)` (tracing and
  lowering) and `.compile()` of that, timed separately.
- "step ms": after one warm-up step, each of `--rounds` rounds dispatches `--steps`
  steps back to back (each feeding the next its state, as training does), blocks on
  the last state and metrics, and takes the mean; the table gives the median over
  rounds with the spread (min-max), never the best round. The stages are interleaved
  (round r runs the estimator's steps, then the avatar's), so both see the same load.
  "steps/s" and "samples/s" (global batch, `optim.batch_size`) are from the median.
- "args / out / temp MiB": `compiled.memory_analysis()` of the step, per device:
  argument, output and temporary buffers (the donated state is counted in both the
  arguments and the outputs; XLA aliases it).
- "peak RSS MiB": the process's peak resident set (`resource.getrusage`, ru_maxrss)
  after the stage's setup, compile and warm-up. One process runs both stages, the
  estimator's first, so the avatar's figure also holds the estimator's state.

On an accelerator (`jax.default_backend() != "cpu"`, or with `--accelerator-metrics`
to check the code path on a CPU) also:

- "tokens/s": tokens per step over the median step time. Tokens per sample, with N =
  model.num_views (padded views included), P = (image_size / patch)^2 patch tokens of a
  screen image and P' = (encoder.uv_size / patch)^2 of a reprojected UV map (0 without
  UV attention), patch tokens only (no class or register tokens):
  estimator stage: N * P (the ViT's screen patch tokens);
  avatar stage: Lz + N * (P + P'), Lz = transformer.token_side^2, every token the UV
  transformer carries: the UV tokens Z once, and each view's screen and UV context
  tokens.
- "TFLOP/step" and "MFU": `compiled.cost_analysis()["flops"]` (XLA's count for the
  per-device program) over the median step time, against the chip's peak dense bf16
  FLOP/s from the vendors' data sheets (`PEAK_FLOPS`: H100 / H200 SXM 989 TFLOP/s,
  A100 312, TPU v5p 459, TPU v5e 197), whatever the config's compute dtype (float32
  configs are thus under-rated); "n/a" on a chip not in the table. XLA's cost
  analysis counts a loop's body once, not once per iteration (jax 0.10.2: a 10-step
  `lax.scan` of a matmul counts as one matmul), so with the transformer's `nnx.scan`
  over blocks, the micro-batch `lax.scan` or the rasterizer's loops both figures are
  lower bounds.
- "raster %" (avatar stage): the rasterizer's share of the step. The posed Gaussians of
  the batch (the model's forward and `drive`, from the state before timing) are
  rendered alone through `models.avatar.render` (same raster config, background and
  cameras), forward and backward (the gradient of sum(images) + sum(alphas) w.r.t.
  every posed leaf), jitted; each round also times `--steps` of these calls, and the
  column is, per round, that mean over the step's mean (median, min-max). The whole
  batch is rendered in one call (the step renders it micro-batch by micro-batch).

No peer implementation exists to compare against: there is no public JAX or PyTorch
UIKA, and LAM's PyTorch code (the closest relative) is not available offline; so,
following the project's rule that a peer is shown when there is one, the table has
no peer column.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from timing import spread

from uika_jax.config import load_config
from uika_jax.data.format import INDEX_FILE, load_index
from uika_jax.models.avatar import drive, render
from uika_jax.synthetic.dataset import SynthConfig, generate
from uika_jax.training import train_state as ts
from uika_jax.training.loop import _Run
from uika_jax.training.raster_budget import raster_config
from uika_jax.training.step import step_background, target_params, teacher_maps

MIB = 2.0**20
PEAK_FLOPS = {  # dense bf16 FLOP/s per chip, vendors' data sheets; matched in device_kind
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "v5p": 459e12,
    "v5 lite": 197e12,
    "v5e": 197e12,
}


def peak_flops(device: jax.Device) -> float | None:
    """The chip's peak dense bf16 FLOP/s from `PEAK_FLOPS`, or None if not listed."""
    kind = device.device_kind.lower()
    return next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind), None)


def dataset_config(config, dataset: str | None, tmp: str) -> None:
    """Points the config's data block at `dataset`, or at a small one generated in `tmp`."""
    d = config.data
    if dataset is None:
        dataset = str(Path(tmp) / "synthetic")
        views, size = int(d.synthetic.get("views", 9)), int(config.model.image_size)
        synth = SynthConfig(identities=8, views=views, sequences=1, frames=4, size=size,
                            val_fraction=0.25)  # fmt: skip
        print(f"generating {synth} in {dataset}", flush=True)
        generate(dataset, synth)
        d.synthetic = dataclasses.asdict(synth)
    elif not (Path(dataset) / INDEX_FILE).is_file():
        raise SystemExit(f"--dataset {dataset}: no {INDEX_FILE} (not a finished dataset)")
    else:  # what prepare_sources checks before it would regenerate
        d.synthetic.identities = len(load_index(dataset).subjects)
    d.synthetic_path, d.synthetic_weight = dataset, 1.0
    d.real_paths, d.real_weights = (), ()


def tokens_per_sample(config, model_config, stage: str) -> int:
    """Tokens per sample (module docstring)."""
    m, patch = config.model, model_config.vit.patch_size
    screen = m.num_views * (m.image_size // patch) ** 2
    if stage == ts.STAGES[0]:
        return screen
    uv = m.num_views * (m.encoder.uv_size // patch) ** 2 if m.uv_attention else 0
    return m.transformer.token_side**2 + screen + uv


def render_share_fn(run, raster, state, batch):
    """A call of the posed Gaussians' render forward + backward alone (module docstring)."""
    config = run.config

    def posed_of(params, rest, batch, assets):
        model = nnx.merge(run.graphdef, params, rest)
        teacher = teacher_maps(batch) if config.train.teacher_forcing else None
        out = model(batch["source_image"], batch["view_mask"], assets.anchors, teacher=teacher)
        return drive(assets.head, assets.anchors, out.gaussians, target_params(batch),
                     use_shape=bool(config.head.use_dataset_shape))  # fmt: skip

    def render_loss(posed, batch, background):
        size = batch["target_image"].shape[-2]
        r = render(posed, batch["target_viewmat"], batch["target_intrinsics"], size, size,
                   background=background, config=raster)  # fmt: skip
        return jnp.sum(r.images) + jnp.sum(r.alphas)

    posed = jax.jit(posed_of)(state.params, state.rest, batch, run.assets)
    background = step_background(config, state.step)
    fb = jax.jit(jax.grad(render_loss)).lower(posed, batch, background).compile()
    return lambda: fb(posed, batch, background)


class Stage:
    """One stage's state, compiled step and figures."""

    def __init__(self, run, stage: str, batch, raster, accelerator: bool):
        config = run.config
        self.name, self.run, self.batch = stage, run, batch
        tx = ts.optimizer_of(config, stage)
        first = ts.stage_range(config, stage)[0]
        self.state, shardings = ts.init_state(run.make_model, stage, tx, run.mesh, run.rules,
                                              step=first)  # fmt: skip
        jitted = run.compiled_step(stage, shardings, raster)
        start = time.perf_counter()
        lowered = jitted.lower(self.state, batch, run.assets)
        self.lower_s = time.perf_counter() - start
        start = time.perf_counter()
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - start
        self.memory = self.compiled.memory_analysis()
        self.render = None
        if accelerator and stage == ts.STAGES[1]:
            self.render = render_share_fn(run, raster, self.state, batch)
            jax.block_until_ready(self.render())
        self.steps(1)  # warm-up
        self.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.step_ms, self.render_ms = [], []

    def steps(self, n: int) -> float:
        """Mean ms of n steps dispatched back to back, blocking on the last result."""
        start = time.perf_counter()
        for _ in range(n):
            self.state, metrics = self.compiled(self.state, self.batch, self.run.assets)
        jax.block_until_ready((self.state, metrics))
        return 1e3 * (time.perf_counter() - start) / n

    def round(self, n: int) -> None:
        """One timing round: n steps (and n render calls when measuring the share)."""
        self.step_ms.append(self.steps(n))
        if self.render is not None:
            start = time.perf_counter()
            for _ in range(n):
                out = self.render()
            jax.block_until_ready(out)
            self.render_ms.append(1e3 * (time.perf_counter() - start) / n)

    def flops(self) -> float | None:
        """XLA's FLOP count of the compiled step (per device), or None if it gives none."""
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return None if not cost or "flops" not in cost else float(cost["flops"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.py", help="config file path[:arg]")
    parser.add_argument("--dataset", default=None, help="a synthetic dataset folder")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--accelerator-metrics", action="store_true",
                        help="tokens/s, MFU and raster share on a CPU too")  # fmt: skip
    args = parser.parse_args()
    accelerator = jax.default_backend() != "cpu" or args.accelerator_metrics

    config = load_config(args.config)
    with tempfile.TemporaryDirectory(prefix="uika_train_step_") as tmp:
        dataset_config(config, args.dataset, tmp)
        run = _Run(config, Path(tmp))
        batch = next(iter(run.pipeline))
        raster = raster_config(config, run.head, run.anchors, batch)
        model_config = nnx.eval_shape(run.make_model).config
        device = jax.devices()[0]
        print(f"device: {device.device_kind} x {jax.device_count()}, {os.cpu_count()} CPUs, "
              f"jax {jax.__version__}; config {args.config} ({config.name}), global batch "
              f"{config.optim.batch_size}, raster capacity {raster.capacity}; load average "
              f"{os.getloadavg()[0]:.1f} at start", flush=True)  # fmt: skip
        with jax.set_mesh(run.mesh):
            stages = [Stage(run, s, batch, raster, accelerator) for s in ts.STAGES]
            for _ in range(args.rounds):
                for s in stages:
                    s.round(args.steps)
        load_end = os.getloadavg()[0]

    header = ("| stage | lower s | compile s | step ms | steps/s | samples/s | args MiB "
              "| out MiB | temp MiB | peak RSS MiB |")  # fmt: skip
    if accelerator:
        header += " tokens/s | TFLOP/step | MFU | raster % |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    peak = peak_flops(device)
    for s in stages:
        median_s = statistics.median(s.step_ms) / 1e3
        m = s.memory
        row = (f"| {s.name} | {s.lower_s:.1f} | {s.compile_s:.1f} | {spread(s.step_ms, '.1f')} "
               f"| {1 / median_s:.2f} | {config.optim.batch_size / median_s:.1f} "
               f"| {m.argument_size_in_bytes / MIB:.1f} | {m.output_size_in_bytes / MIB:.1f} "
               f"| {m.temp_size_in_bytes / MIB:.1f} | {s.peak_rss / MIB:.0f} |")  # fmt: skip
        if accelerator:
            tokens = config.optim.batch_size * tokens_per_sample(config, model_config, s.name)
            flops = s.flops()
            tflop = "n/a" if flops is None else f"{flops / 1e12:.3g}"
            mfu = (
                "n/a" if flops is None or peak is None else f"{100 * flops / median_s / peak:.1f}%"
            )
            share = "-"
            if s.render_ms:
                ratios = [100 * r / t for r, t in zip(s.render_ms, s.step_ms, strict=True)]
                share = spread(ratios, ".0f", "%")
            row += f" {tokens / median_s:.3g} | {tflop} | {mfu} | {share} |"
        lines.append(row)
    print(f"\nload average {load_end:.1f} at end; step ms: median over --rounds {args.rounds} "
          f"rounds of the mean of --steps {args.steps} steps (min-max); no peer exists "
          "(module docstring)\n")  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
