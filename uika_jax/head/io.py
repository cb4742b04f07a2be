"""Reading and writing FLAME-format head model files.

`load_head_model` reads the official FLAME files a user downloads (FLAME 2020
`generic_model.pkl`, FLAME 2023 `flame2023.pkl` / `flame2023_no_jaw.pkl`, FLAME
2023 Open) and the project's own `.npz` (written by `save_head_model` and the
`python -m uika_jax.head.convert` CLI) into a validated `HeadModel`, optionally
with a UV layout from `head_template.obj` or `FLAME_texture.npz`.

A model file is untrusted input: loading one runs no code and allocates no more
than the caps of `ModelFileLimits` allow (defaults: 1 GiB per file, 60,276,000
elements per array, which is 10x FLAME's largest, 1 GiB of arrays per `.npz`),
checked before anything is allocated; everything else is refused with a
`HeadModelFileError` naming the file.

- `.pkl`: read by the restricted unpickler of `uika_jax.head.safe_pickle`
  (needs neither chumpy nor scipy; its docstring lists exactly what it
  accepts): Python 2 or 3 pickles, protocols 0-5, of a dict of numpy arrays,
  `chumpy.ch.Ch` arrays and scipy CSC/CSR matrices of plain numeric dtypes.
- `.npz`: only the members the loader needs are read; each `.npy` header is
  parsed first (format 1.0 or 2.0), and its dtype must be a plain number (a
  unicode scalar for the stored fingerprint strings), its shape within the
  element cap and its data within the member's uncompressed size.
- `.obj`: `v`, `vt` and `f v/vt[/vn]` lines; at most as many faces as the model's.

The arrays are then validated (`validate_head_model`): shapes agree (an array
disagreeing with the others about V is named), all finite, faces of three
distinct in-range vertices, skinning weights non-negative with rows summing to
1, integral kinematic-tree parents forming a rooted ordered tree. The digest is
computed after validation.
"""

from __future__ import annotations

import array
import dataclasses
import os
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np

from uika_jax.head.model import HeadModel, ModelFingerprint, array_digest, validate_head_model
from uika_jax.head.pickled import (
    DEFAULT_LIMITS,
    ModelFileLimits,
    PickledObject,
    RestrictedPickleError,
    checked_shape,
)
from uika_jax.head.safe_pickle import load_restricted_pickle
from uika_jax.safe_files import (
    MAX_STRING_CHARS,
    NPY_MAGIC,
    PLAIN_DTYPES,
    ZIP_MAGIC,
    atomic_write,
    file_magic,
    read_npz,
)

NUM_SHAPE_IN_FILE = 300
"""Identity components before the expression components in a FLAME `shapedirs`."""

FLAME_PKL_KEYS = (
    "v_template",
    "f",
    "shapedirs",
    "posedirs",
    "J_regressor",
    "kintree_table",
    "weights",
)
"""Keys a FLAME model dict must hold (official pkl, or an npz of the same arrays)."""

NPZ_KEYS = (
    "v_template",
    "faces",
    "shapedirs",
    "exprdirs",
    "posedirs",
    "j_regressor",
    "lbs_weights",
    "parents",
)
"""Keys of the project's clean `.npz` (plus optional uv_coords, uv_faces, fingerprint_*)."""

_NPZ_OPTIONAL_KEYS = ("uv_coords", "uv_faces", "fingerprint_source", "fingerprint_version")
_NPZ_STRING_KEYS = ("fingerprint_source", "fingerprint_version")

_PathLike = str | os.PathLike[str]


class HeadModelFileError(ValueError):
    """A head model or UV file that cannot be used; the message names the file and the problem."""


# --------------------------------------------------------------------------- reading files


def _checked_file(path: Path, what: str, limits: ModelFileLimits) -> None:
    """Raises unless `path` is a regular file within the size cap."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} file not found")
    if path.is_dir():
        raise HeadModelFileError(f"{path}: is a directory, expected a {what} file")
    if not path.is_file():
        raise HeadModelFileError(f"{path}: not a regular file, expected a {what} file")
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise HeadModelFileError(
            f"{path}: {size:,} bytes, over the limit of {limits.max_file_bytes:,} "
            "(ModelFileLimits.max_file_bytes)"
        )


def _read_pickle(path: Path, limits: ModelFileLimits) -> object:
    try:
        return load_restricted_pickle(path, str(path), limits)
    except RestrictedPickleError as e:
        raise HeadModelFileError(str(e)) from e


def _read_npz(
    path: Path, wanted: Collection[str], limits: ModelFileLimits
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Reads the `wanted` arrays of an `.npz` within `limits` (`uika_jax.safe_files.read_npz`)."""
    return read_npz(
        path,
        wanted,
        check_shape=lambda shape: checked_shape(shape, limits),
        max_total_bytes=limits.max_total_bytes,
        max_total_bytes_name="ModelFileLimits.max_total_bytes",
        string_keys=_NPZ_STRING_KEYS,
        error=HeadModelFileError,
    )


# --------------------------------------------------------------------------- array conversion


def _to_array(value: object, key: str, origin: str) -> np.ndarray:
    """Turns a loaded value (an `.npz` array or a pickle's stand-in) into a numeric array."""
    if isinstance(value, PickledObject):
        try:
            return value.to_array(f"{origin}: {key}")
        except RestrictedPickleError as e:
            raise HeadModelFileError(str(e)) from e
    if isinstance(value, np.ndarray) and value.dtype.str in PLAIN_DTYPES:
        return value
    raise HeadModelFileError(
        f"{origin}: {key} is a {type(value).__name__}, expected a numeric array"
    )


def _float32(value: object, key: str, origin: str) -> np.ndarray:
    """A fresh, writable C-contiguous float32 copy (the loaded arrays may be read-only views)."""
    return np.array(_to_array(value, key, origin), np.float32, order="C")


def _int32(value: object, key: str, origin: str) -> np.ndarray:
    array = _to_array(value, key, origin)
    if array.size and (
        not np.all(np.isfinite(array))
        or np.any(array != np.round(array))
        or array.min() < np.iinfo(np.int32).min
        or array.max() > np.iinfo(np.int32).max
    ):
        raise HeadModelFileError(f"{origin}: {key} does not hold int32 indices")
    return np.array(array, np.int32, order="C")


def _parents(table: object, key: str, origin: str) -> tuple[int, ...]:
    """Parents from a FLAME kintree_table (2, J) or a parents vector (J,); the root gets -1.

    The official files store the root's parent as 4294967295 (uint32 -1). Float
    tables must hold integers (NaN or 0.7 is refused, not cast).
    """
    array = _to_array(table, key, origin)
    if array.dtype.kind == "f" and not np.all(
        np.isfinite(array) & (array == np.round(array)) & (np.abs(array) < 2.0**62)
    ):
        raise HeadModelFileError(
            f"{origin}: {key} holds non-integer values (NaN, infinite or fractional parents)"
        )
    array = array.astype(np.int64)
    if array.ndim == 2 and array.shape[0] == 2:
        if not np.array_equal(array[1], np.arange(array.shape[1])):
            raise HeadModelFileError(
                f"{origin}: {key} row 1 (joint ids) is {array[1].tolist()}, expected 0..J-1"
            )
        array = array[0]
    if array.ndim != 1 or array.size == 0:
        raise HeadModelFileError(
            f"{origin}: {key} has shape {array.shape}, expected (2, J) or (J,)"
        )
    parents = [int(p) for p in array]
    if not 0 <= parents[0] < len(parents):
        parents[0] = -1
    return tuple(parents)


def _from_flame_dict(
    raw: Mapping[str, object], found: Collection[str], origin: str, num_shape_in_file: int
) -> tuple[dict[str, np.ndarray], tuple[int, ...]]:
    """Maps the official FLAME keys to HeadModel fields (`found`: the file's keys, for errors)."""
    missing = [key for key in FLAME_PKL_KEYS if key not in raw]
    if missing:
        raise HeadModelFileError(
            f"{origin}: not a FLAME model: missing {', '.join(missing)} "
            f"(found keys: {', '.join(sorted(found)[:50]) or 'none'})"
        )
    shapedirs = _float32(raw["shapedirs"], "shapedirs", origin)
    if shapedirs.ndim != 3:
        raise HeadModelFileError(
            f"{origin}: shapedirs has shape {shapedirs.shape}, expected (V, 3, C)"
        )
    if shapedirs.shape[-1] <= num_shape_in_file:
        raise HeadModelFileError(
            f"{origin}: shapedirs has {shapedirs.shape[-1]} components, but a FLAME file holds "
            f"num_shape_in_file={num_shape_in_file} identity components followed by the "
            "expression components (pass the right num_shape_in_file)"
        )
    arrays = {
        "v_template": _float32(raw["v_template"], "v_template", origin),
        "faces": _int32(raw["f"], "f", origin),
        "shapedirs": np.ascontiguousarray(shapedirs[..., :num_shape_in_file]),
        "exprdirs": np.ascontiguousarray(shapedirs[..., num_shape_in_file:]),
        "posedirs": _float32(raw["posedirs"], "posedirs", origin),
        "j_regressor": _float32(raw["J_regressor"], "J_regressor", origin),
        "lbs_weights": _float32(raw["weights"], "weights", origin),
    }
    return arrays, _parents(raw["kintree_table"], "kintree_table", origin)


def _from_clean_npz(
    raw: Mapping[str, np.ndarray], origin: str
) -> tuple[dict[str, np.ndarray], tuple[int, ...]]:
    """Reads the arrays of the project's own npz layout (NPZ_KEYS)."""
    missing = [key for key in NPZ_KEYS if key not in raw]
    if missing:
        raise HeadModelFileError(
            f"{origin}: incomplete head model .npz: missing {', '.join(missing)}"
        )
    arrays = {
        key: _float32(raw[key], key, origin) for key in NPZ_KEYS if key not in ("faces", "parents")
    }
    arrays["faces"] = _int32(raw["faces"], "faces", origin)
    if ("uv_coords" in raw) != ("uv_faces" in raw):
        raise HeadModelFileError(f"{origin}: uv_coords and uv_faces must be stored together")
    if "uv_coords" in raw:
        arrays["uv_coords"] = _float32(raw["uv_coords"], "uv_coords", origin)
        arrays["uv_faces"] = _int32(raw["uv_faces"], "uv_faces", origin)
    return arrays, _parents(raw["parents"], "parents", origin)


# --------------------------------------------------------------------------- UV layouts


def _load_obj_uv(
    path: Path, faces: np.ndarray, limits: ModelFileLimits
) -> tuple[np.ndarray, np.ndarray]:
    """Parses `vt` and `f v/vt[/vn]` lines; the face vertex indices must equal `faces`.

    Reading stops at the first face beyond the model's face count or the first
    texture coordinate beyond the element cap.
    """
    texcoords = array.array("d")
    obj_faces, uv_faces = array.array("q"), array.array("q")
    num_vertices = 0
    with path.open("r", encoding="latin-1") as f:
        for line_number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                if fields[0] == "v":
                    num_vertices += 1
                elif fields[0] == "vt":
                    if len(texcoords) >= limits.max_array_elements:
                        raise ValueError("more texture coordinates than the element cap")
                    texcoords.extend((float(fields[1]), float(fields[2])))
                elif fields[0] == "f":
                    if len(obj_faces) == faces.size:
                        raise ValueError(
                            f"more than {len(faces)} faces, the model has {len(faces)}"
                        )
                    corners = [c.split("/") for c in fields[1:]]
                    if len(corners) != 3 or any(len(c) < 2 or not c[1] for c in corners):
                        raise ValueError(
                            "expected a triangle with texture indices (f v/vt v/vt v/vt)"
                        )
                    obj_faces.extend(_obj_index(c[0], num_vertices) for c in corners)
                    uv_faces.extend(_obj_index(c[1], len(texcoords) // 2) for c in corners)
            except (ValueError, IndexError) as e:
                raise HeadModelFileError(
                    f"{path}:{line_number}: cannot parse {line.strip()[:200]!r}: {e}"
                ) from e
    if not texcoords or not uv_faces:
        raise HeadModelFileError(f"{path}: no texture coordinates (vt) or textured faces (f v/vt)")
    obj_faces_array = np.frombuffer(obj_faces, np.int64).reshape(-1, 3)
    if obj_faces_array.shape != faces.shape or not np.array_equal(obj_faces_array, faces):
        if obj_faces_array.shape != faces.shape:
            detail = f"{len(obj_faces_array)} faces, the model has {len(faces)}"
        else:
            i = int(np.flatnonzero(np.any(obj_faces_array != faces, axis=1))[0])
            detail = (
                f"face {i} is {obj_faces_array[i].tolist()}, the model's is {faces[i].tolist()}"
            )
        raise HeadModelFileError(
            f"{path}: the obj's face vertex indices do not match the model's faces ({detail}); "
            "is it the template of a different head model?"
        )
    uv_coords = np.frombuffer(texcoords, np.float64).reshape(-1, 2).astype(np.float32)
    return uv_coords, np.frombuffer(uv_faces, np.int64).reshape(-1, 3).astype(np.int32)


def _obj_index(token: str, count: int) -> int:
    """Converts a 1-based (or negative, relative) obj index to 0-based."""
    index = int(token)
    if index == 0 or index > count or index < -count:
        raise ValueError(f"index {index} outside 1..{count}")
    return index - 1 if index > 0 else count + index


def _load_npz_uv(
    path: Path, faces: np.ndarray, limits: ModelFileLimits
) -> tuple[np.ndarray, np.ndarray]:
    """Reads `vt` (T, 2) and `ft` (F, 3) from a FLAME_texture.npz; its other arrays stay unread."""
    raw, found = _read_npz(path, ("vt", "ft", "f"), limits)
    missing = [key for key in ("vt", "ft") if key not in raw]
    if missing:
        raise HeadModelFileError(
            f"{path}: not a FLAME texture file: missing {', '.join(missing)} "
            f"(found keys: {', '.join(sorted(found)[:50]) or 'none'})"
        )
    origin = str(path)
    if "f" in raw and not np.array_equal(raw["f"], faces):
        raise HeadModelFileError(f"{path}: its faces 'f' do not match the model's faces")
    return _float32(raw["vt"], "vt", origin), _int32(raw["ft"], "ft", origin)


def load_uv_layout(
    uv_path: _PathLike, faces: np.ndarray, *, limits: ModelFileLimits = DEFAULT_LIMITS
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a UV layout for a mesh with the given faces.

    Args:
      uv_path: `head_template.obj` (its `f v/vt` lines must use the same vertex
        indices as `faces`) or `FLAME_texture.npz` (keys `vt`, `ft`).
      faces: the model's faces (F, 3), 0-based.
      limits: caps on the file's size and its arrays' sizes.

    Returns:
      uv_coords (T, 2) float32 and uv_faces (F, 3) int32.

    Raises:
      FileNotFoundError: if the file does not exist.
      HeadModelFileError: naming the file, if it is a directory, exceeds a cap,
        cannot be read, holds no UV layout or belongs to another mesh.
    """
    path = Path(uv_path).expanduser()
    _checked_file(path, "UV layout", limits)
    faces = np.asarray(faces)
    if path.suffix.lower() == ".obj":
        uv_coords, uv_faces = _load_obj_uv(path, faces, limits)
    else:
        uv_coords, uv_faces = _load_npz_uv(path, faces, limits)
    if uv_coords.ndim != 2 or uv_coords.shape[1] != 2 or not np.all(np.isfinite(uv_coords)):
        raise HeadModelFileError(f"{path}: texture coordinates must be finite (T, 2)")
    if uv_faces.shape != faces.shape:
        raise HeadModelFileError(
            f"{path}: UV faces have shape {uv_faces.shape}, the model's faces {faces.shape}"
        )
    if uv_faces.size and (uv_faces.min() < 0 or uv_faces.max() >= len(uv_coords)):
        raise HeadModelFileError(f"{path}: UV face index outside the {len(uv_coords)} coordinates")
    return uv_coords, uv_faces


# --------------------------------------------------------------------------- public API


def flame_source(file_name: str) -> str:
    """Returns the model family a FLAME file name states, for the fingerprint.

    Args:
      file_name: e.g. "generic_model.pkl" (FLAME 2020), "flame2023.pkl",
        "flame2023_no_jaw.pkl", "FLAME2023_Open.pkl".

    Returns:
      "flame2023_open", "flame2023", "flame2020" or, if the name does not say, "flame".
    """
    name = file_name.lower()
    if "2023" in name:
        return "flame2023_open" if "open" in name else "flame2023"
    if "2020" in name or Path(name).stem == "generic_model":
        return "flame2020"
    return "flame"


def load_head_model(
    model_path: _PathLike,
    uv_path: _PathLike | None = None,
    *,
    num_shape_in_file: int = NUM_SHAPE_IN_FILE,
    limits: ModelFileLimits = DEFAULT_LIMITS,
) -> HeadModel:
    """Loads a FLAME-format head model file.

    The built-in procedural head needs no file: `uika_jax.synthetic.head.synthetic_head_model()`.

    Args:
      model_path: an official FLAME `.pkl` (FLAME 2020, 2023, 2023 Open; chumpy
        or plain numpy arrays, sparse or dense J_regressor), an `.npz` holding
        the same FLAME keys, or an `.npz` written by `save_head_model` /
        `python -m uika_jax.head.convert`.
      uv_path: optional UV layout, `head_template.obj` or `FLAME_texture.npz`;
        it replaces a layout stored in the model file.
      num_shape_in_file: identity components at the front of a FLAME
        `shapedirs`; the rest are expression components (300 + 100 in FLAME
        2020 and 2023). Unused for the project's own npz.
      limits: caps checked before anything is allocated (file size, elements
        per array, bytes per `.npz`, pickle opcodes); the defaults leave 10x
        headroom over the official files.

    Returns:
      The validated model. Its fingerprint: source from the file name (see
      `flame_source`) or as stored by `save_head_model`, version the file name
      (or the original file name, as stored), digest over all arrays.

    Raises:
      FileNotFoundError: if a file does not exist.
      HeadModelFileError: (a ValueError) naming the file, if it is a directory,
        exceeds a cap, is corrupt, not a FLAME model, holds a forbidden pickle
        global, or has bad shapes or values.
    """
    path = Path(model_path).expanduser()
    _checked_file(path, "head model", limits)
    origin = str(path)
    source, version = flame_source(path.name), path.name
    magic = file_magic(path)
    if magic == NPY_MAGIC:
        raise HeadModelFileError(f"{path}: a single .npy array, expected a FLAME .pkl or .npz")
    if magic == ZIP_MAGIC or path.suffix.lower() == ".npz":
        raw, found = _read_npz(path, (*FLAME_PKL_KEYS, *NPZ_KEYS, *_NPZ_OPTIONAL_KEYS), limits)
    else:
        raw = _read_pickle(path, limits)
        if not isinstance(raw, dict):
            raise HeadModelFileError(
                f"{path}: not a FLAME model: the pickle holds a {type(raw).__name__}, "
                "expected a dict"
            )
        found = list(raw)
    if "exprdirs" in raw:
        arrays, parents = _from_clean_npz(raw, origin)
        source = _stored_string(raw, "fingerprint_source", source, origin)
        version = _stored_string(raw, "fingerprint_version", version, origin)
    else:
        arrays, parents = _from_flame_dict(raw, found, origin, num_shape_in_file)
    if uv_path is not None:
        arrays["uv_coords"], arrays["uv_faces"] = load_uv_layout(
            uv_path, arrays["faces"], limits=limits
        )
    try:
        model = validate_head_model(HeadModel(**arrays, parents=parents), origin=origin)
    except ValueError as e:
        message = str(e) if str(e).startswith(origin) else f"{origin}: {e}"
        raise HeadModelFileError(message) from e
    digest = array_digest({**arrays, "parents": np.asarray(parents, np.int32)})
    return dataclasses.replace(model, fingerprint=ModelFingerprint(source, version, digest))


def _stored_string(raw: Mapping[str, object], key: str, default: str, origin: str) -> str:
    """A fingerprint string stored with the arrays (a unicode scalar in an `.npz`), or `default`."""
    value = raw.get(key, default)
    if isinstance(value, np.ndarray) and value.dtype.kind == "U" and value.shape == ():
        value = str(value)
    if not isinstance(value, str) or len(value) > MAX_STRING_CHARS:
        raise HeadModelFileError(f"{origin}: {key} is not a string of at most {MAX_STRING_CHARS}")
    return value


def save_head_model(model: HeadModel, path: _PathLike) -> Path:
    """Writes a model as the project's `.npz`, atomically (temporary file, then rename).

    `load_head_model(path)` returns the same arrays, parents and fingerprint.

    Args:
      model: the model to write.
      path: the output file (conventionally `*.npz`).

    Returns:
      The path written.
    """
    path = Path(path).expanduser()
    arrays = {key: np.asarray(getattr(model, key)) for key in NPZ_KEYS if key != "parents"}
    arrays["parents"] = np.asarray(model.parents, np.int32)
    if model.has_uv:
        arrays["uv_coords"] = np.asarray(model.uv_coords)
        arrays["uv_faces"] = np.asarray(model.uv_faces)
    arrays["fingerprint_source"] = np.asarray(model.fingerprint.source)
    arrays["fingerprint_version"] = np.asarray(model.fingerprint.version)
    with atomic_write(path) as f:
        np.savez(f, **arrays)
    return path


__all__ = [
    "FLAME_PKL_KEYS",
    "NPZ_KEYS",
    "NUM_SHAPE_IN_FILE",
    "HeadModelFileError",
    "flame_source",
    "load_head_model",
    "load_uv_layout",
    "save_head_model",
]
