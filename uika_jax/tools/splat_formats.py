"""3D Gaussian splat files as gsplat 1.5.3's `gsplat.exporter.export_splats` writes them.

NumPy only (no torch at run time). Three formats, with degree-0 colour only (no
higher-order spherical harmonics):

- `ply`: the standard 3DGS PLY that almost every viewer opens. Binary little-endian
  float32 rows of x y z, f_dc_0..2 = (rgb - 0.5) / C0, opacity (logit), scale_0..2
  (log), rot_0..3 (wxyz, as stored). Byte for byte what gsplat writes.
- `splat`: antimatter15's viewer format, 32 bytes a splat in Morton order of the
  centres: xyz float32, linear scales float32, RGBA uint8, quaternion uint8 (q * 128 +
  128). The order and the centres are exact; the linear scales can differ from
  gsplat's in the last bit, because torch's float32 `exp` is not correctly rounded and
  NumPy's is, and a uint8 code can differ by one where a value sits within a rounding
  error of a code boundary.
- `ply_compressed`: SuperSplat's chunked PLY (256 splats a chunk in Morton order,
  per-chunk bounds, 11/10/11-bit positions and scales, 2+10+10+10-bit rotations,
  8888 colours and opacity). Same exactness as `splat`: the bounds are exact, a packed
  code can differ by one at a boundary (the sigmoid).

Non-finite values are refused (gsplat silently drops such rows, and a single NaN
opacity drops every row).
"""

from __future__ import annotations

import math
import os

import numpy as np

from uika_jax.safe_files import atomic_write

SH_C0 = 0.28209479177387814
"""The degree-0 spherical-harmonic basis constant, 1 / (2 sqrt(pi))."""

FORMATS = ("ply", "splat", "ply_compressed")
CHUNK_SIZE = 256
"""Splats per chunk of `ply_compressed` (gsplat's default)."""
OPACITY_THRESHOLD = 1 / 255
"""`ply_compressed` keeps only splats more opaque than this (gsplat's default)."""

_F32 = np.dtype("<f4")
_U32 = np.dtype("<u4")


def rgb_to_sh0(colors: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] (K, 3) to degree-0 SH coefficients (K, 3), float32."""
    return (np.asarray(colors, np.float32) - np.float32(0.5)) / np.float32(SH_C0)


def _sh0_to_rgb(sh0: np.ndarray) -> np.ndarray:
    return sh0 * np.float32(SH_C0) + np.float32(0.5)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.float32(1) / (np.float32(1) + np.exp(-x))


def _checked(
    means: np.ndarray,
    log_scales: np.ndarray,
    quats: np.ndarray,
    opacity_logits: np.ndarray,
    colors: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """float32 arrays of checked shapes, all finite."""
    arrays = {
        "means": np.asarray(means, np.float32),
        "log_scales": np.asarray(log_scales, np.float32),
        "quats": np.asarray(quats, np.float32),
        "opacity_logits": np.asarray(opacity_logits, np.float32),
        "colors": np.asarray(colors, np.float32),
    }
    k = arrays["means"].shape[0]
    tails = {"means": (3,), "log_scales": (3,), "quats": (4,), "opacity_logits": (), "colors": (3,)}
    for name, array in arrays.items():
        if array.shape != (k, *tails[name]):
            raise ValueError(f"{name} must have shape {(k, *tails[name])}, got {array.shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} holds NaN or infinite values: nothing to export")
    return tuple(arrays.values())


def ply_bytes(
    means: np.ndarray,
    log_scales: np.ndarray,
    quats: np.ndarray,
    opacity_logits: np.ndarray,
    colors: np.ndarray,
) -> bytes:
    """The standard 3DGS PLY (module docstring).

    Args:
      means: (K, 3) centres.
      log_scales: (K, 3) log scales.
      quats: (K, 4) quaternions, wxyz (written as given).
      opacity_logits: (K,) opacity logits.
      colors: (K, 3) RGB in [0, 1].
    """
    means, log_scales, quats, opacity_logits, colors = _checked(
        means, log_scales, quats, opacity_logits, colors
    )
    names = [
        "x",
        "y",
        "z",
        *(f"f_dc_{i}" for i in range(3)),
        "opacity",
        *(f"scale_{i}" for i in range(3)),
        *(f"rot_{i}" for i in range(4)),
    ]
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {means.shape[0]}\n"
        + "".join(f"property float {name}\n" for name in names)
        + "end_header\n"
    )
    rows = np.concatenate(
        [means, rgb_to_sh0(colors), opacity_logits[:, None], log_scales, quats], axis=1
    )
    return header.encode() + rows.astype(_F32).tobytes()


def morton_order(means: np.ndarray) -> np.ndarray:
    """The splats' order along a 3D Morton curve of their centres (10 bits an axis).

    Ties keep their index order (a stable sort, which is what torch's CPU sort gives).
    """
    low = means.min(axis=0)
    lengths = means.max(axis=0) - low
    lengths[lengths == 0] = 1
    scaled = np.floor((means - low) / lengths * np.float32(1024)).astype(np.int32)

    def spread(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.int64) & 0x3FF
        x = (x ^ (x << 16)) & 0xFF0000FF
        x = (x ^ (x << 8)) & 0x0300F00F
        x = (x ^ (x << 4)) & 0x030C30C3
        return (x ^ (x << 2)) & 0x09249249

    codes = (spread(scaled[:, 2]) << 2) + (spread(scaled[:, 1]) << 1) + spread(scaled[:, 0])
    return np.argsort(codes, kind="stable")


def splat_bytes(
    means: np.ndarray,
    log_scales: np.ndarray,
    quats: np.ndarray,
    opacity_logits: np.ndarray,
    colors: np.ndarray,
) -> bytes:
    """antimatter15's `.splat` (module docstring); arguments as `ply_bytes`."""
    means, log_scales, quats, opacity_logits, colors = _checked(
        means, log_scales, quats, opacity_logits, colors
    )
    rgba = np.concatenate(
        [_sh0_to_rgb(rgb_to_sh0(colors)), _sigmoid(opacity_logits)[:, None]], axis=1
    )
    rgba = np.clip(rgba * np.float32(255), 0, 255).astype(np.uint8)
    unit = quats / np.linalg.norm(quats, axis=1, keepdims=True)
    rots = np.clip(unit * np.float32(128) + np.float32(128), 0, 255).astype(np.uint8)
    order = morton_order(means)
    record = np.dtype(
        [("mean", _F32, 3), ("scale", _F32, 3), ("rgba", np.uint8, 4), ("rot", np.uint8, 4)]
    )
    out = np.empty(means.shape[0], record)
    out["mean"] = means[order]
    out["scale"] = np.exp(log_scales)[order]
    out["rgba"] = rgba[order]
    out["rot"] = rots[order]
    return out.tobytes()


def _unorm(value: np.ndarray, bits: int) -> np.ndarray:
    """The pack_unorm of gsplat; NaN (a chunk whose bounds coincide) packs as 0, as on x86 torch."""
    top = (1 << bits) - 1
    packed = np.clip(np.floor(value * np.float32(top) + np.float32(0.5)), 0, top)
    return np.where(np.isnan(packed), 0, packed).astype(np.int64)


def _pack_111011(v: np.ndarray) -> np.ndarray:
    return (_unorm(v[:, 0], 11) << 21) | (_unorm(v[:, 1], 10) << 11) | _unorm(v[:, 2], 11)


def _pack_rotation(quats: np.ndarray) -> np.ndarray:
    """Smallest-three quaternion packing: 2 bits for the largest component's index."""
    q = quats / np.linalg.norm(quats, axis=-1, keepdims=True)
    largest = np.argmax(np.abs(q), axis=-1)
    rows = np.arange(q.shape[0])
    q = np.where((q[rows, largest] < 0)[:, None], -q, q)
    others = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])[largest]
    packed = _unorm(q[rows[:, None], others] * np.float32(math.sqrt(2) * 0.5) + np.float32(0.5), 10)
    return (
        (largest.astype(np.int64) << 30)
        | (packed[:, 0] << 20)
        | (packed[:, 1] << 10)
        | packed[:, 2]
    )


def _normalized(values: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return (values - low) / (high - low)


def ply_compressed_bytes(
    means: np.ndarray,
    log_scales: np.ndarray,
    quats: np.ndarray,
    opacity_logits: np.ndarray,
    colors: np.ndarray,
) -> bytes:
    """SuperSplat's compressed PLY (module docstring); arguments as `ply_bytes`."""
    means, log_scales, quats, opacity_logits, colors = _checked(
        means, log_scales, quats, opacity_logits, colors
    )
    keep = _sigmoid(opacity_logits) > OPACITY_THRESHOLD
    means, log_scales, quats, opacity_logits = (
        means[keep],
        log_scales[keep],
        quats[keep],
        opacity_logits[keep],
    )
    rgb = _sh0_to_rgb(rgb_to_sh0(colors))[keep]
    count = means.shape[0]
    chunks = -(-count // CHUNK_SIZE)
    order = morton_order(means) if count else np.zeros(0, np.int64)
    bounds, packed = [], []
    for start in range(0, count, CHUNK_SIZE):
        pick = order[start : start + CHUNK_SIZE]
        m, s, c = means[pick], log_scales[pick], rgb[pick]
        m_low, m_high = m.min(0), m.max(0)
        s_low, s_high = np.clip(s.min(0), -20, 20), np.clip(s.max(0), -20, 20)
        c_low, c_high = c.min(0), c.max(0)
        bounds.append(np.concatenate([m_low, m_high, s_low, s_high, c_low, c_high]))
        color = np.concatenate(
            [
                _normalized(c, c_low, c_high),
                _sigmoid(opacity_logits[pick])[:, None],
            ],
            axis=1,
        )
        color_code = (
            (_unorm(color[:, 0], 8) << 24)
            | (_unorm(color[:, 1], 8) << 16)
            | (_unorm(color[:, 2], 8) << 8)
            | _unorm(color[:, 3], 8)
        )
        packed.append(
            np.stack(
                [
                    _pack_111011(_normalized(m, m_low, m_high)),
                    _pack_rotation(quats[pick]),
                    _pack_111011(_normalized(s, s_low, s_high)),
                    color_code,
                ],
                axis=1,
            ).ravel()
        )
    float_names = [
        *(f"min_{a}" for a in "xyz"),
        *(f"max_{a}" for a in "xyz"),
        *(f"min_scale_{a}" for a in "xyz"),
        *(f"max_scale_{a}" for a in "xyz"),
        *(f"min_{a}" for a in "rgb"),
        *(f"max_{a}" for a in "rgb"),
    ]
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element chunk {chunks}\n"
        + "".join(f"property float {name}\n" for name in float_names)
        + f"element vertex {count}\n"
        + "".join(
            f"property uint {name}\n"
            for name in ("packed_position", "packed_rotation", "packed_scale", "packed_color")
        )
        + f"element sh {count}\nend_header\n"
    )
    chunk_floats = np.concatenate(bounds) if bounds else np.zeros(0, np.float32)
    vertex_codes = np.concatenate(packed) if packed else np.zeros(0, np.int64)
    return (
        header.encode() + chunk_floats.astype(_F32).tobytes() + vertex_codes.astype(_U32).tobytes()
    )


_WRITERS = {"ply": ply_bytes, "splat": splat_bytes, "ply_compressed": ply_compressed_bytes}


def write_splats(
    path: str | os.PathLike,
    format: str,
    means: np.ndarray,
    log_scales: np.ndarray,
    quats: np.ndarray,
    opacity_logits: np.ndarray,
    colors: np.ndarray,
) -> int:
    """Writes the splats in `format` (one of `FORMATS`) atomically; returns the byte count."""
    if format not in _WRITERS:
        raise ValueError(f"unknown splat format {format!r} (one of {', '.join(FORMATS)})")
    data = _WRITERS[format](means, log_scales, quats, opacity_logits, colors)
    with atomic_write(path) as file:
        file.write(data)
    return len(data)
