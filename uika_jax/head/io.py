"""Reading and writing FLAME-format head model files.

`load_head_model` reads the official FLAME files a user downloads (FLAME 2020
`generic_model.pkl`, FLAME 2023 `flame2023.pkl` / `flame2023_no_jaw.pkl`, FLAME
2023 Open) and the project's own `.npz` (written by `save_head_model` and the
`python -m uika_jax.head.convert` CLI) into a validated `HeadModel`, optionally
with a UV layout from `head_template.obj` or `FLAME_texture.npz`.

The official `.pkl` files are Python 2 pickles of a dict holding numpy arrays,
chumpy arrays and a scipy sparse matrix. They are read by the restricted
unpickler of `uika_jax.head.safe_pickle`, which needs neither chumpy nor scipy
and refuses every global it does not know, so a malicious pickle cannot run
code; its docstring lists the pickle layouts it accepts.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from uika_jax.head.model import HeadModel, ModelFingerprint, array_digest, validate_head_model
from uika_jax.head.safe_pickle import (
    ChumpyArray,
    RestrictedPickleError,
    SparseMatrix,
    load_restricted_pickle,
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

_PathLike = str | os.PathLike[str]


class HeadModelFileError(ValueError):
    """A head model or UV file that cannot be used; the message names the file and the problem."""


# --------------------------------------------------------------------------- reading files


_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUM"


def _magic(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(4)


def _read_pickle(path: Path) -> object:
    try:
        return load_restricted_pickle(path, str(path))
    except RestrictedPickleError as e:
        raise HeadModelFileError(str(e)) from e


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if _magic(path) != _ZIP_MAGIC:
        raise HeadModelFileError(f"{path}: not an .npz archive (no zip signature; corrupt?)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except Exception as e:
        raise HeadModelFileError(
            f"{path}: not a readable .npz (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e


# --------------------------------------------------------------------------- array conversion


def _to_array(value: object, key: str, origin: str) -> np.ndarray:
    """Turns a loaded value (ndarray, chumpy or sparse stand-in, nested lists) into an array."""
    if isinstance(value, ChumpyArray):
        if not isinstance(value.state, dict) or "x" not in value.state:
            raise HeadModelFileError(f"{origin}: {key} is a chumpy Ch without an 'x' array")
        return _to_array(value.state["x"], key, origin)
    if isinstance(value, SparseMatrix):
        try:
            return value.to_dense(f"{origin}: {key}")
        except RestrictedPickleError as e:
            raise HeadModelFileError(str(e)) from e
    try:
        array = np.asarray(value)
    except Exception as e:
        raise HeadModelFileError(f"{origin}: {key} is not an array ({type(value).__name__})") from e
    if array.dtype.kind not in "biuf":
        raise HeadModelFileError(
            f"{origin}: {key} is not a numeric array ({type(value).__name__}, dtype {array.dtype})"
        )
    return array


def _float32(value: object, key: str, origin: str) -> np.ndarray:
    return np.ascontiguousarray(_to_array(value, key, origin), np.float32)


def _int32(value: object, key: str, origin: str) -> np.ndarray:
    array = _to_array(value, key, origin)
    if array.size and (
        not np.all(np.isfinite(array))
        or np.any(array != np.round(array))
        or array.min() < np.iinfo(np.int32).min
        or array.max() > np.iinfo(np.int32).max
    ):
        raise HeadModelFileError(f"{origin}: {key} does not hold int32 indices")
    return np.ascontiguousarray(array, np.int32)


def _parents(table: object, key: str, origin: str) -> tuple[int, ...]:
    """Parents from a FLAME kintree_table (2, J) or a parents vector (J,); the root gets -1.

    The official files store the root's parent as 4294967295 (uint32 -1).
    """
    array = _to_array(table, key, origin).astype(np.int64)
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
    raw: Mapping[str, object], origin: str, num_shape_in_file: int
) -> tuple[dict[str, np.ndarray], tuple[int, ...]]:
    """Maps the official FLAME keys to HeadModel fields."""
    missing = [key for key in FLAME_PKL_KEYS if key not in raw]
    if missing:
        raise HeadModelFileError(
            f"{origin}: not a FLAME model: missing {', '.join(missing)} "
            f"(found keys: {', '.join(sorted(map(str, raw))) or 'none'})"
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


def _load_obj_uv(path: Path, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Parses `vt` and `f v/vt[/vn]` lines; the face vertex indices must equal `faces`."""
    texcoords: list[list[float]] = []
    obj_faces: list[list[int]] = []
    uv_faces: list[list[int]] = []
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
                    texcoords.append([float(fields[1]), float(fields[2])])
                elif fields[0] == "f":
                    corners = [c.split("/") for c in fields[1:]]
                    if len(corners) != 3 or any(len(c) < 2 or not c[1] for c in corners):
                        raise ValueError(
                            "expected a triangle with texture indices (f v/vt v/vt v/vt)"
                        )
                    obj_faces.append([_obj_index(c[0], num_vertices) for c in corners])
                    uv_faces.append([_obj_index(c[1], len(texcoords)) for c in corners])
            except (ValueError, IndexError) as e:
                raise HeadModelFileError(
                    f"{path}:{line_number}: cannot parse {line.strip()!r}: {e}"
                ) from e
    if not texcoords or not uv_faces:
        raise HeadModelFileError(f"{path}: no texture coordinates (vt) or textured faces (f v/vt)")
    obj_faces_array = np.asarray(obj_faces, np.int64)
    if obj_faces_array.shape != faces.shape or not np.array_equal(obj_faces_array, faces):
        if obj_faces_array.shape != faces.shape:
            detail = f"{len(obj_faces)} faces, the model has {len(faces)}"
        else:
            i = int(np.flatnonzero(np.any(obj_faces_array != faces, axis=1))[0])
            detail = (
                f"face {i} is {obj_faces_array[i].tolist()}, the model's is {faces[i].tolist()}"
            )
        raise HeadModelFileError(
            f"{path}: the obj's face vertex indices do not match the model's faces ({detail}); "
            "is it the template of a different head model?"
        )
    return np.asarray(texcoords, np.float32), np.asarray(uv_faces, np.int32)


def _obj_index(token: str, count: int) -> int:
    """Converts a 1-based (or negative, relative) obj index to 0-based."""
    index = int(token)
    if index == 0 or index > count or index < -count:
        raise ValueError(f"index {index} outside 1..{count}")
    return index - 1 if index > 0 else count + index


def _load_npz_uv(path: Path, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reads `vt` (T, 2) and `ft` (F, 3) from a FLAME_texture.npz."""
    raw = _read_npz(path)
    missing = [key for key in ("vt", "ft") if key not in raw]
    if missing:
        raise HeadModelFileError(
            f"{path}: not a FLAME texture file: missing {', '.join(missing)} "
            f"(found keys: {', '.join(sorted(raw)) or 'none'})"
        )
    origin = str(path)
    if "f" in raw and not np.array_equal(raw["f"], faces):
        raise HeadModelFileError(f"{path}: its faces 'f' do not match the model's faces")
    return _float32(raw["vt"], "vt", origin), _int32(raw["ft"], "ft", origin)


def load_uv_layout(uv_path: _PathLike, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reads a UV layout for a mesh with the given faces.

    Args:
      uv_path: `head_template.obj` (its `f v/vt` lines must use the same vertex
        indices as `faces`) or `FLAME_texture.npz` (keys `vt`, `ft`).
      faces: the model's faces (F, 3), 0-based.

    Returns:
      uv_coords (T, 2) float32 and uv_faces (F, 3) int32.

    Raises:
      FileNotFoundError: if the file does not exist.
      HeadModelFileError: naming the file, if it cannot be read, holds no UV
        layout or belongs to another mesh.
    """
    path = Path(uv_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: UV layout file not found")
    faces = np.asarray(faces)
    if path.suffix.lower() == ".obj":
        uv_coords, uv_faces = _load_obj_uv(path, faces)
    else:
        uv_coords, uv_faces = _load_npz_uv(path, faces)
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

    Returns:
      The validated model. Its fingerprint: source from the file name (see
      `flame_source`) or as stored by `save_head_model`, version the file name
      (or the original file name, as stored), digest over all arrays.

    Raises:
      FileNotFoundError: if a file does not exist.
      HeadModelFileError: (a ValueError) naming the file, if it is corrupt, not
        a FLAME model, holds a forbidden pickle global, or has bad shapes or
        values.
    """
    path = Path(model_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: head model file not found")
    origin = str(path)
    source, version = flame_source(path.name), path.name
    magic = _magic(path)
    if magic == _NPY_MAGIC:
        raise HeadModelFileError(f"{path}: a single .npy array, expected a FLAME .pkl or .npz")
    if magic == _ZIP_MAGIC or path.suffix.lower() == ".npz":
        raw: object = _read_npz(path)
    else:
        raw = _read_pickle(path)
    if not isinstance(raw, Mapping):
        raise HeadModelFileError(
            f"{path}: not a FLAME model: the pickle holds a {type(raw).__name__}, expected a dict"
        )
    if "exprdirs" in raw:
        arrays, parents = _from_clean_npz(raw, origin)
        source = str(raw.get("fingerprint_source", source))
        version = str(raw.get("fingerprint_version", version))
    else:
        arrays, parents = _from_flame_dict(raw, origin, num_shape_in_file)
    if uv_path is not None:
        arrays["uv_coords"], arrays["uv_faces"] = load_uv_layout(uv_path, arrays["faces"])

    digest = array_digest({**arrays, "parents": np.asarray(parents, np.int32)})
    model = HeadModel(
        **arrays, parents=parents, fingerprint=ModelFingerprint(source, version, digest)
    )
    try:
        return validate_head_model(model, origin=origin)
    except ValueError as e:
        message = str(e) if str(e).startswith(origin) else f"{origin}: {e}"
        raise HeadModelFileError(message) from e


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
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("xb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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
