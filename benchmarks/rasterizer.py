"""Rasterizer speed and peak memory: ours (JAX, jitted) beside the torch gsplat mirror, on CPU.

    python benchmarks/rasterizer.py [--sizes 10000:256,10000:512,50000:256,50000:512,...]
        [--backends reference] [--sort-keys exact] [--repeats 5] [--torch-repeats 3]
        [--max-seconds 300]

Each size is K:S: K Gaussians as surfels on a head-sized ellipsoid shell (thin
axis along the normal, in-plane extent about the surface area per Gaussian, so
tile intersections per Gaussian are like a fitted avatar's), one S x S camera
framing it as in `uika_jax.render.camera.framing_camera`; fixed seeds.

Every (size, implementation) runs in a fresh subprocess of this script, on this
machine's CPU, in the same invocation:

- ours: `rasterization()` per backend and sort key, jitted, capacity from
  `calibrate_capacity()` (headroom 1.1). "fwd" renders colours and alphas;
  "f+b" is jax.grad of sum(colours) + sum(alphas) w.r.t. means, quats, scales,
  opacities, colours. "bin" times `binning.bin_gaussians` alone (jitted, on
  the projected Gaussians), "sort" the XLA sorts alone (jitted, on the real
  keys; two stable uint32 sorts for "exact", one for "packed"), "sort %" is
  sort / fwd.
- torch: `uika_jax.testing.gsplat_mirror.render` (gsplat 1.5.3's torch
  projection and tile intersection, and the torch mirror of its CUDA
  compositor used by the parity tests; a Python loop over intersections),
  with the same loss, backward by torch autograd. It is skipped ("n/a",
  with the reason) where the last size it ran predicts (linearly in the
  intersection count) more than --max-seconds or more than 80% of the
  available memory, and killed past --max-seconds.

Times are medians of wall milliseconds per call (ours after a warm-up call;
compile time excluded). Peak memory, in MiB:

- "xla": the compiled executable's own buffers from
  `jit(f).lower(...).compile().memory_analysis()`: arguments + outputs +
  temporaries - aliased (what XLA's buffer assignment needs; ours only).
- "rss": the growth of the process's resident set during one extra, untimed
  call over its value just before it (after `gc.collect()` and glibc's
  `malloc_trim(0)`, so that freed heap held by the allocator does not hide the
  growth), sampled every 2 ms from /proc/self/statm by a thread. Inputs
  already resident are not counted, nor pages of a buffer the call never touches.
  Both implementations are measured this way.

Prints each row as it completes, then the whole table.
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
from timing import median_ms

MIB = 2.0**20
_LIBC = ctypes.CDLL("libc.so.6")


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


# ---------------------------------------------------------------- ours


def _sort_inputs(means2d, radii, depths, size, capacity):
    """The unsorted keys `binning.bin_gaussians` sorts (same construction, one camera)."""
    import jax
    import jax.numpy as jnp

    from uika_jax.render import binning

    c, n = depths.shape
    tiles_x, tiles_y = binning.tile_grid(size, size, 16)
    n_tiles = tiles_x * tiles_y
    lo, hi = binning.tile_rects(means2d, radii, 16, tiles_x, tiles_y)
    span = hi - lo
    counts = (span[..., 0] * span[..., 1]).reshape(-1)
    ends = jnp.cumsum(counts)
    starts = ends - counts
    owner = jnp.zeros((capacity,), jnp.int32)
    idx = jnp.arange(c * n, dtype=jnp.int32)
    owner = owner.at[jnp.where(counts > 0, starts, capacity)].max(idx, mode="drop")
    owner = jax.lax.cummax(owner)
    slot = jnp.arange(capacity, dtype=jnp.int32)
    used = slot < ends[-1]
    local = slot - starts[owner]
    lo_f, span_f = lo.reshape(-1, 2)[owner], span.reshape(-1, 2)[owner]
    w = jnp.maximum(span_f[:, 0], 1)
    tile = (owner // n) * n_tiles + (lo_f[:, 1] + local // w) * tiles_x + lo_f[:, 0] + local % w
    tile_key = jnp.where(used, tile.astype(jnp.uint32), jnp.uint32(0xFFFFFFFF))
    dkey = binning.depth_key(depths).reshape(-1)[owner]
    tile_bits = int(c * n_tiles).bit_length()
    packed = (tile_key << (32 - tile_bits)) | (dkey >> tile_bits)
    packed = jnp.where(used, packed, jnp.uint32(0xFFFFFFFF))
    return tile_key, dkey, packed, slot


def _sort_only(tile_key, dkey, packed, slot, sort_key):
    import jax

    if sort_key == "exact":
        _, perm = jax.lax.sort((dkey, slot), num_keys=1, is_stable=True)
        return jax.lax.sort((tile_key[perm], perm), num_keys=1, is_stable=True)
    return jax.lax.sort((packed, slot), num_keys=1, is_stable=True)


def _xla_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def worker_ours(n: int, size: int, backend: str, sort_key: str, repeats: int) -> dict:
    import functools

    import jax
    import jax.numpy as jnp

    from uika_jax.render import RasterConfig, binning, calibrate_capacity, rasterization

    scene = [jnp.asarray(head_scene(n, size)[k]) for k in KEYS]
    base = RasterConfig(backend=backend, sort_key=sort_key)
    cfg = calibrate_capacity(*scene[:4], *scene[5:], size, size, headroom=1.1,
                             with_tile_cap=backend != "reference", base=base)  # fmt: skip

    def fwd(*x):
        return rasterization(*x, size, size, config=cfg)[:2]

    def loss(*x):
        r, a, _ = rasterization(*x, size, size, config=cfg)
        return jnp.sum(r) + jnp.sum(a)

    t0 = time.perf_counter()
    fwd_c = jax.jit(fwd).lower(*scene).compile()
    fb_c = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*scene).compile()
    compile_s = time.perf_counter() - t0
    out = {"compile_s": compile_s, "xla_fwd": _xla_bytes(fwd_c), "xla_fb": _xla_bytes(fb_c)}
    out["fwd_ms"] = median_ms(lambda: jax.block_until_ready(fwd_c(*scene)), repeats)
    out["fb_ms"] = median_ms(lambda: jax.block_until_ready(fb_c(*scene)), repeats)
    with PeakRSS() as m:
        jax.block_until_ready(fwd_c(*scene))
    out["rss_fwd"] = m.growth
    with PeakRSS() as m:
        jax.block_until_ready(fb_c(*scene))
    out["rss_fb"] = m.growth

    meta = rasterization(*scene, size, size, config=cfg)[2]
    out["isects"] = int(meta["n_isects"])
    out["max_tile"] = int(meta["max_tile_count"])
    proj = (meta["means2d"], meta["radii"], meta["depths"])
    bin_fn = jax.jit(functools.partial(binning.bin_gaussians, width=size, height=size,
                                       capacity=cfg.capacity, sort_key=sort_key))  # fmt: skip
    out["bin_ms"] = median_ms(lambda: jax.block_until_ready(bin_fn(*proj)), repeats)
    keys = jax.jit(_sort_inputs, static_argnums=(3, 4))(*proj, size, cfg.capacity)
    sort_fn = jax.jit(functools.partial(_sort_only, sort_key=sort_key))
    out["sort_ms"] = median_ms(lambda: jax.block_until_ready(sort_fn(*keys)), repeats)
    return out


# ---------------------------------------------------------------- torch mirror


def worker_torch(n: int, size: int, repeats: int) -> dict:
    import torch

    from uika_jax.testing import gsplat_mirror

    scene = {k: torch.tensor(v) for k, v in head_scene(n, size).items()}

    def fwd():
        with torch.no_grad():
            return gsplat_mirror.render(*(scene[k] for k in KEYS), size, size)

    def fb():
        leaves = [scene[k].clone().requires_grad_(True) for k in KEYS[:5]]
        r, a, _, _ = gsplat_mirror.render(*leaves, scene["viewmats"], scene["Ks"], size, size)
        (r.sum() + a.sum()).backward()
        return [x.grad for x in leaves]

    out = {"threads": torch.get_num_threads()}
    out["isects"] = int(fwd()[3].shape[0])  # also the warm-up
    out["fwd_ms"] = median_ms(fwd, repeats, warmup=0)
    out["fb_ms"] = median_ms(fb, repeats, warmup=0)
    with PeakRSS() as m:
        fwd()
    out["rss_fwd"] = m.growth
    with PeakRSS() as m:
        fb()
    out["rss_fb"] = m.growth
    return out


# ---------------------------------------------------------------- driver


def _run_worker(argv: list[str], timeout: float) -> tuple[dict | None, str]:
    """Runs this script as a worker in a fresh process; (result, "") or (None, reason)."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"killed after {timeout:.0f} s"
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


def _mib(x):
    return f"{x / MIB:.0f}"


HEADER = (
    f"{'K':>7} {'size':>4} {'isects':>7} {'backend/key':>17} | "
    f"{'fwd ms':>7} {'torch':>8} | {'f+b ms':>7} {'torch':>8} {'speedup':>7} | "
    f"{'fwd MiB xla/rss':>15} {'torch':>6} | {'f+b MiB xla/rss':>15} {'torch':>6} | "
    f"{'bin ms':>6} {'sort ms':>7} {'sort %':>6}"
)


def _row(n, size, label, ours, theirs, why):
    if theirs is None:
        t_f = t_fb = speed = m_f = m_fb = "n/a"
    else:
        t_f, t_fb = f"{theirs['fwd_ms']:.0f}", f"{theirs['fb_ms']:.0f}"
        speed = f"{theirs['fb_ms'] / ours['fb_ms']:.1f}x"
        m_f, m_fb = _mib(theirs["rss_fwd"]), _mib(theirs["rss_fb"])
    mem_f = f"{_mib(ours['xla_fwd'])}/{_mib(ours['rss_fwd'])}"
    mem_fb = f"{_mib(ours['xla_fb'])}/{_mib(ours['rss_fb'])}"
    share = 100 * ours["sort_ms"] / ours["fwd_ms"]
    line = (
        f"{n:>7} {size:>4} {ours['isects']:>7} {label:>17} | "
        f"{ours['fwd_ms']:>7.0f} {t_f:>8} | {ours['fb_ms']:>7.0f} {t_fb:>8} {speed:>7} | "
        f"{mem_f:>15} {m_f:>6} | {mem_fb:>15} {m_fb:>6} | "
        f"{ours['bin_ms']:>6.0f} {ours['sort_ms']:>7.1f} {share:>5.1f}%"
    )
    if theirs is None:
        line += f"  torch n/a: {why}"
    elif theirs["isects"] != ours["isects"]:
        line += f"  (torch mirror: {theirs['isects']} isects)"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="10000:256,10000:512,50000:256,50000:512,130000:256,130000:512"
    )
    parser.add_argument("--backends", default="reference")
    parser.add_argument("--sort-keys", default="exact")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch-repeats", type=int, default=3)
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=300.0,
        help="torch mirror: skip a size predicted to take longer, kill past it",
    )
    parser.add_argument("--worker", choices=("ours", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--sort-key", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "ours":
        res = worker_ours(args.n, args.size, args.backend, args.sort_key, args.repeats)
        print(json.dumps(res))
        return
    if args.worker == "torch":
        print(json.dumps(worker_torch(args.n, args.size, args.torch_repeats)))
        return

    import jax

    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)  # fmt: skip
    combos = [(b, k) for b in args.backends.split(",") for k in args.sort_keys.split(",")]
    lines = []
    seconds_per_isect = None  # torch mirror throughput, from the last size it ran
    bytes_per_isect = 0.0
    torch_threads = "?"
    print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    for spec in args.sizes.split(","):
        n, size = (int(x) for x in spec.split(":"))
        ours = {}
        for backend, key in combos:
            argv = ["--worker", "ours", "--n", str(n), "--size", str(size), "--backend", backend,
                    "--sort-key", key, "--repeats", str(args.repeats)]  # fmt: skip
            res, why = _run_worker(argv, timeout=1e6)
            if res is None:
                print(f"{n:>7} {size:>4} {backend}/{key}: failed ({why})", flush=True)
            ours[(backend, key)] = res
        isects = next((r["isects"] for r in ours.values() if r), None)
        calls = 2 * args.torch_repeats + 3  # fwd: warm-up + repeats + 1; f+b: repeats + 1
        run_torch = seconds_per_isect is None or isects is None
        if not run_torch:
            est, est_mem = seconds_per_isect * isects * calls, bytes_per_isect * isects
            theirs, why = None, f"est. {est:.0f} s, {est_mem / 2**30:.1f} GiB"
            if est > args.max_seconds:
                why += f" > --max-seconds {args.max_seconds:.0f}"
            elif est_mem > 0.8 * _available():
                why += f" > 80% of {_available() / 2**30:.1f} GiB available"
            else:
                run_torch = True
        if run_torch:
            argv = ["--worker", "torch", "--n", str(n), "--size", str(size),
                    "--torch-repeats", str(args.torch_repeats)]  # fmt: skip
            theirs, why = _run_worker(argv, timeout=args.max_seconds)
            if theirs is not None:
                torch_threads = theirs["threads"]
                per_call = (theirs["fwd_ms"] + theirs["fb_ms"]) / 2e3
                seconds_per_isect = per_call / max(theirs["isects"], 1)
                bytes_per_isect = theirs["rss_fb"] / max(theirs["isects"], 1)
        for (backend, key), res in ours.items():
            if res is None:
                continue
            line = _row(n, size, f"{backend}/{key}", res, theirs, why)
            print(line, flush=True)
            lines.append(line)
    print(f"\nload average {os.getloadavg()[0]:.1f} at end; torch threads: {torch_threads}\n")
    print(HEADER + "\n" + "-" * len(HEADER) + "\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
