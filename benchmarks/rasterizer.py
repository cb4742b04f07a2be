"""Rasterizer speed and memory on CPU: ours (JAX, jitted) beside a vectorised torch peer.

    python benchmarks/rasterizer.py [--sizes 10000:256,130000:512]
        [--backends reference,pallas_triton_interpret] [--runs 7] [--no-torch]

Each size is K:S: K Gaussians as surfels on a head-sized ellipsoid shell (thin
axis along the normal, in-plane extent about the surface area per Gaussian, so
tile intersections per Gaussian are like a fitted avatar's), one S x S camera
framing it as in `uika_jax.render.camera.framing_camera`; fixed seeds.

Implementations, all on this machine's CPU:

- ours: `rasterization()` per backend (the first is the baseline of the
  ratios), jitted, capacity from `calibrate_capacity()` (headroom 1.1).
- torch: what a torch user would run: gsplat 1.5.3's torch projection and tile
  intersection (`gsplat.cuda._torch_impl`) with a vectorised torch compositor
  (`uika_jax.testing.gsplat_mirror.render` with `composite_vectorised`: tiles
  grouped by intersection count and padded, alpha for every slot x pixel, T by
  a cumulative product), backward by torch autograd; torch's default threads.
  Skipped ("n/a") where its estimated memory exceeds 80% of what is available.
  gsplat's torch `_isect_tiles` is a Python loop over Gaussians, so the table
  adds "torch, isect reused": the same with that intersection computed once
  before timing and reused (what a torch pipeline with a vectorised
  intersection would at best take).

"fwd" renders colours and alphas; "f+b" is the gradient of sum(colours) +
sum(alphas) w.r.t. means, quats, scales, opacities and colours.

Per size, one fresh process builds the scene once and runs every
implementation on it, interleaved: after a warm-up call of each (compile time
excluded), each of `--runs` rounds times one fwd and one f+b call of each
implementation in turn, so that all see the same machine load. The table
prints the median over rounds with the spread (min-max), and "x base": per
round, the implementation's time over the baseline's (median and min-max; 3x
means the baseline is 3 times faster).

Peak memory, in MiB:

- "xla": the compiled executable's own buffers from
  `jit(f).lower(...).compile().memory_analysis()`: arguments + outputs +
  temporaries - aliased (ours only).
- "rss": the growth of the process's resident set during one extra, untimed
  call over its value just before it (after `gc.collect()` and glibc's
  `malloc_trim(0)`, so that freed heap held by the allocator does not hide the
  growth), sampled every 2 ms from /proc/self/statm by a thread.

"diff" is the largest absolute difference of the implementation's colours and
alphas from the baseline's: every row renders the same image (torch differs by
up to about 1e-3 where Gaussians at equal float32 depth are composited in
another order; the shell scenes have a few thousand such ties).

Prints each size's rows as they complete, then the whole table.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
from timing import spread, time_ms

MIB = 2.0**20
_LIBC = ctypes.CDLL("libc.so.6")
TORCH = "torch vectorised"
TORCH_REUSED = "torch, isect reused"
# Peak bytes of the torch peer per (intersection x tile pixel), for the memory guard
# (measured 65-90 on the 10K/256 and 130K/512 scenes, f+b).
TORCH_BYTES_PER_ENTRY = 120


# ---------------------------------------------------------------- scene


def head_scene(n: int, size: int, seed: int = 0) -> dict:
    """Surfel Gaussians on a head-sized ellipsoid shell and one camera framing it (numpy)."""
    from uika_jax.render import camera

    rng = np.random.default_rng(seed)
    axes = np.array([0.08, 0.11, 0.09])  # half-widths (m): 0.22 m chin to crown
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    means = d * axes * rng.uniform(0.97, 1.0, (n, 1))
    normal = means / axes**2
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    p = 1.6075  # Knud Thomsen's ellipsoid surface area
    a, b, c = axes**p
    area = 4 * np.pi * ((a * b + a * c + b * c) / 3) ** (1 / p) / n
    tangent = np.sqrt(area) * rng.uniform(0.4, 1.0, (n, 2))
    scales = np.concatenate([tangent, 0.1 * tangent.min(1, keepdims=True)], 1)
    # Rotation: local z onto the normal (half-way quaternion), then a random spin about it.
    q_align = np.concatenate(
        [1.0 + normal[:, 2:3], -normal[:, 1:2], normal[:, 0:1], 0 * d[:, :1]], 1
    )
    q_align /= np.linalg.norm(q_align, axis=1, keepdims=True)
    half = rng.uniform(0, np.pi, n)
    w1, z1 = q_align[:, 0], q_align[:, 3]
    x1, y1 = q_align[:, 1], q_align[:, 2]
    w2, z2 = np.cos(half), np.sin(half)  # (w2, 0, 0, z2)
    quats = np.stack(
        [w1 * w2 - z1 * z2, x1 * w2 + y1 * z2, y1 * w2 - x1 * z2, w1 * z2 + z1 * w2], 1
    )
    opacities = rng.uniform(0.3, 1.0, n)
    colors = rng.uniform(size=(n, 3))
    viewmat, k = camera.framing_camera(np.zeros(3), 2 * axes[1], size)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return {
        "means": f32(means),
        "quats": f32(quats),
        "scales": f32(scales),
        "opacities": f32(opacities),
        "colors": f32(colors),
        "viewmats": f32(viewmat[None]),
        "Ks": f32(k[None]),
    }


KEYS = ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")


# ---------------------------------------------------------------- measuring


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak growth of the resident set over its value at entry, sampled by a thread."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __enter__(self):
        gc.collect()
        _LIBC.malloc_trim(0)  # hand freed heap back, so that the start is what is live
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.growth = self.peak - self.start


def _xla_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


# ---------------------------------------------------------------- implementations


def ours(backend: str, scene: dict, size: int) -> dict:
    """Jitted forward and forward+backward of `rasterization()` with `backend`."""
    import jax
    import jax.numpy as jnp

    from uika_jax.render import RasterConfig, calibrate_capacity, rasterization

    x = [jnp.asarray(scene[k]) for k in KEYS]
    base = RasterConfig(backend=backend, warn_on_overflow=False)
    cfg = calibrate_capacity(*x[:4], *x[5:], size, size, headroom=1.1,
                             with_tile_cap=backend != "reference", base=base)  # fmt: skip

    def render(*args):
        return rasterization(*args, size, size, config=cfg)

    def loss(*args):
        colours, alphas, _ = render(*args)
        return jnp.sum(colours) + jnp.sum(alphas)

    fwd = jax.jit(lambda *a: render(*a)[:2]).lower(*x).compile()
    fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*x).compile()
    meta = render(*x)[2]
    return {
        "fwd": lambda: jax.block_until_ready(fwd(*x)),
        "fb": lambda: jax.block_until_ready(fb(*x)),
        "image": lambda: [np.asarray(a) for a in fwd(*x)],
        "xla_fwd": _xla_bytes(fwd),
        "xla_fb": _xla_bytes(fb),
        "isects": int(np.max(meta["n_isects"])),
        "max_tile": int(np.max(meta["max_tile_count"])),
    }


def torch_peer(scene: dict, size: int, reuse_intersections: bool) -> dict:
    """Forward and forward+backward of gsplat's torch pipeline with the vectorised compositor.

    With `reuse_intersections`, gsplat's tile intersection is computed once here
    and reused by every call.
    """
    import torch

    from uika_jax.testing import gsplat_mirror

    t = {k: torch.tensor(scene[k]) for k in KEYS}
    isects = None
    if reuse_intersections:
        radii, means2d, depths, _ = gsplat_mirror.project(
            *(t[k] for k in ("means", "quats", "scales", "opacities", "viewmats", "Ks")), size, size
        )
        isects = gsplat_mirror.intersect(means2d, radii, depths, size, size)

    def render(leaves):
        return gsplat_mirror.render(*leaves, t["viewmats"], t["Ks"], size, size,
                                    compositor=gsplat_mirror.composite_vectorised,
                                    intersections=isects)  # fmt: skip

    def fwd():
        with torch.no_grad():
            return render([t[k] for k in KEYS[:5]])

    def fb():
        leaves = [t[k].clone().requires_grad_(True) for k in KEYS[:5]]
        colours, alphas, _, _ = render(leaves)
        (colours.sum() + alphas.sum()).backward()
        return [x.grad for x in leaves]

    return {"fwd": fwd, "fb": fb, "image": lambda: [x.numpy() for x in fwd()[:2]]}


def worker(n: int, size: int, backends: list[str], with_torch: bool, runs: int) -> dict:
    """Times every implementation on one scene, interleaved; returns the figures as a dict."""
    scene = head_scene(n, size)
    impls = {b: ours(b, scene, size) for b in backends}
    base = impls[backends[0]]
    out = {"isects": base["isects"], "max_tile": base["max_tile"], "skipped": {}}
    if with_torch:
        need = TORCH_BYTES_PER_ENTRY * base["isects"] * 256
        if need > 0.8 * _available():
            out["skipped"][TORCH] = f"needs about {need / 2**30:.1f} GiB"
        else:
            impls[TORCH] = torch_peer(scene, size, reuse_intersections=False)
            impls[TORCH_REUSED] = torch_peer(scene, size, reuse_intersections=True)
    reference = base["image"]()
    rows = {}
    for name, impl in impls.items():
        impl["fwd"](), impl["fb"]()  # warm-up
        image = impl["image"]()
        diff = max(float(np.abs(a - b).max()) for a, b in zip(image, reference, strict=True))
        rows[name] = {"fwd_ms": [], "fb_ms": [], "diff": diff}
        rows[name].update({k: impl[k] for k in ("xla_fwd", "xla_fb") if k in impl})
    for _ in range(runs):
        for name, impl in impls.items():
            rows[name]["fwd_ms"].append(time_ms(impl["fwd"]))
            rows[name]["fb_ms"].append(time_ms(impl["fb"]))
    for name, impl in impls.items():
        for key in ("fwd", "fb"):
            with PeakRSS() as m:
                impl[key]()
            rows[name][f"rss_{key}"] = m.growth
    out["rows"] = rows
    return out


# ---------------------------------------------------------------- driver


def _run_worker(argv: list[str]) -> tuple[dict | None, str]:
    """Runs this script as a worker in a fresh process; (result, "") or (None, reason)."""
    p = subprocess.run([sys.executable, os.path.abspath(__file__), *argv],
                       capture_output=True, text=True)  # fmt: skip
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1][:80]
        why = "killed (out of memory?)" if p.returncode in (-9, 137) else tail
        return None, f"exit {p.returncode}: {why}"
    return json.loads(p.stdout.strip().splitlines()[-1]), ""


def _available() -> int:
    """MemAvailable in bytes."""
    with open("/proc/meminfo") as f:
        line = next(x for x in f if x.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / MIB:.0f}"


HEADER = (
    f"{'K':>6} {'size':>4} {'isects':>7} {'impl':>23} | {'fwd ms':>17} {'x base':>20} | "
    f"{'f+b ms':>19} {'x base':>20} | {'fwd MiB xla/rss':>15} {'f+b MiB':>9} | {'diff':>7}"
)


def _rows(n: int, size: int, res: dict) -> list[str]:
    rows, base = res["rows"], next(iter(res["rows"].values()))
    lines = []
    for name, r in rows.items():
        ratio = {
            k: [a / b for a, b in zip(r[k], base[k], strict=True)] for k in ("fwd_ms", "fb_ms")
        }
        memory = [_mib(r.get(k)) for k in ("xla_fwd", "rss_fwd", "xla_fb", "rss_fb")]
        lines.append(
            f"{n:>6} {size:>4} {res['isects']:>7} {name:>23} | "
            f"{spread(r['fwd_ms']):>17} {spread(ratio['fwd_ms'], '.2f', 'x'):>20} | "
            f"{spread(r['fb_ms']):>19} {spread(ratio['fb_ms'], '.2f', 'x'):>20} | "
            f"{memory[0] + '/' + memory[1]:>15} {memory[2] + '/' + memory[3]:>9} | "
            f"{r['diff']:>7.1e}"
        )
    for name, why in res["skipped"].items():
        lines.append(f"{n:>6} {size:>4} {res['isects']:>7} {name:>23} | n/a: {why}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000:256,130000:512")
    parser.add_argument("--backends", default="reference,pallas_triton_interpret")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--no-torch", action="store_true", help="skip the torch peer")
    parser.add_argument("--worker", nargs=2, type=int, metavar=("K", "S"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    backends = args.backends.split(",")

    if args.worker:
        n, size = args.worker
        print(json.dumps(worker(n, size, backends, not args.no_torch, args.runs)))
        return

    import jax
    import torch

    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)  # fmt: skip
    print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    lines = []
    for spec in args.sizes.split(","):
        n, size = (int(x) for x in spec.split(":"))
        argv = ["--worker", str(n), str(size), "--backends", args.backends,
                "--runs", str(args.runs), *(["--no-torch"] if args.no_torch else [])]  # fmt: skip
        res, why = _run_worker(argv)
        new = _rows(n, size, res) if res else [f"{n:>6} {size:>4} failed: {why}"]
        print("\n".join(new), flush=True)
        lines += new
    print(f"\nload average {os.getloadavg()[0]:.1f} at end; times are medians over --runs "
          f"{args.runs} rounds with (min-max)\n")  # fmt: skip
    print(HEADER + "\n" + "-" * len(HEADER) + "\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
