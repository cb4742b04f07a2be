"""Fake FLAME model files for tests: random arrays in the official files' exact layout.

No FLAME data is used or produced: the arrays are random, with the official
shapes, dtypes and magnitudes. The writers reproduce the structure of the
official pickles, so tests exercise the same code path a real download does:

    arrays = make_fake_flame_arrays()                      # FLAME key names
    write_flame_pkl(tmp_path / "generic_model.pkl", arrays)  # needs scipy (sparse regressor)
    model = load_head_model(tmp_path / "generic_model.pkl")
    assert model.num_shape == 300 and model.num_expression == 100

The official FLAME 2020 `generic_model.pkl` is a Python 2 protocol-2 pickle of
a dict: float64 numpy arrays, `shapedirs` as a `chumpy.ch.Ch`, `J_regressor` as
a `scipy.sparse.csc_matrix`, `f` uint32, `kintree_table` with 4294967295 as
the root's parent, and the strings `bs_style` / `bs_type`. `write_flame_pkl`
writes the same opcodes and globals without chumpy (a stand-in class registered
as `chumpy.ch.Ch` only while pickling, pickled through the default object
protocol exactly like chumpy 0.70's `Ch`) and, in its default `python2` mode,
with Python 2's module names and string opcodes.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import struct
import sys
import types
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import numpy as np

NUM_SHAPE = 300
NUM_EXPRESSION = 100
PARENTS = (-1, 0, 1, 1, 1)
ROOT_PARENT = 4294967295  # uint32 -1, as stored in the official kintree_table

_FLOAT_KEYS = ("J_regressor", "J", "weights", "posedirs", "v_template", "shapedirs")
_OFFICIAL_ORDER = ("f", "J_regressor", "kintree_table", "J", "weights", "posedirs")
_OFFICIAL_ORDER += ("v_template", "shapedirs")


def make_fake_flame_arrays(
    num_vertices: int = 5023, num_faces: int = 9976, seed: int = 0
) -> dict[str, np.ndarray]:
    """Returns random arrays under the official FLAME key names, shapes and dtypes.

    Float arrays are float32 (the files store float64; every value here is
    float32-representable, so a loaded model equals these arrays exactly).

    Keys:
      v_template (V, 3): an ellipsoidal head ~0.1 m in size, y up.
      f (F, 3) uint32: triangles of three distinct vertices.
      shapedirs (V, 3, 400): 300 identity then 100 expression components,
        magnitudes decaying from 1e-2 to 1e-3.
      posedirs (V, 3, 36): pose correctives, ~1e-3.
      J_regressor (5, V): each joint a convex combination of 8 vertices (dense).
      kintree_table (2, 5) int64: parents (root 4294967295) over joint ids.
      weights (V, 5): non-negative rows summing to 1.
      J (5, 3): J_regressor @ v_template.
    """
    if num_vertices < 8 or num_faces < 1:
        raise ValueError("need at least 8 vertices and one face")
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(num_vertices, 3))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    v_template = directions * np.array([0.08, 0.11, 0.10]) + rng.normal(
        scale=2e-3, size=(num_vertices, 3)
    )
    first = rng.integers(0, num_vertices, num_faces)
    steps = rng.integers(1, (num_vertices - 1) // 2 + 1, size=(num_faces, 2))
    faces = np.stack([first, first + steps[:, 0], first + steps.sum(-1)], -1) % num_vertices
    scales = np.concatenate(
        [np.geomspace(1e-2, 1e-3, NUM_SHAPE), np.geomspace(1e-2, 1e-3, NUM_EXPRESSION)]
    )
    shapedirs = rng.normal(size=(num_vertices, 3, NUM_SHAPE + NUM_EXPRESSION)) * scales
    posedirs = rng.normal(scale=1e-3, size=(num_vertices, 3, 9 * (len(PARENTS) - 1)))
    j_regressor = np.zeros((len(PARENTS), num_vertices))
    for joint in range(len(PARENTS)):
        members = rng.choice(num_vertices, 8, replace=False)
        j_regressor[joint, members] = rng.random(8) + 0.1
    j_regressor /= j_regressor.sum(-1, keepdims=True)
    weights = rng.random((num_vertices, len(PARENTS))) ** 3
    weights /= weights.sum(-1, keepdims=True)
    j_regressor, v_template = j_regressor.astype(np.float32), v_template.astype(np.float32)
    kintree_table = np.array([[ROOT_PARENT, *PARENTS[1:]], np.arange(len(PARENTS))], np.int64)
    return {
        "v_template": v_template,
        "f": faces.astype(np.uint32),
        "shapedirs": shapedirs.astype(np.float32),
        "posedirs": posedirs.astype(np.float32),
        "J_regressor": j_regressor,
        "kintree_table": kintree_table,
        "weights": weights.astype(np.float32),
        "J": (j_regressor.astype(np.float64) @ v_template).astype(np.float32),
    }


class _FakeCh:
    """Pickles like chumpy 0.70's `chumpy.ch.Ch` (default object protocol, state below)."""

    def __init__(self, x: np.ndarray):
        # Ch.__getstate__ returns __dict__ without the unpicklable _parents and _cache.
        self._dirty_vars = {"x"}
        self._itr = None
        self._make_dense = False
        self._make_sparse = False
        self._depends_on_deps = {}
        self.x = np.asarray(x, np.float64)


_FakeCh.__module__ = "chumpy.ch"
_FakeCh.__name__ = _FakeCh.__qualname__ = "Ch"


@contextlib.contextmanager
def _fake_chumpy_modules() -> Iterator[None]:
    """Registers `chumpy` / `chumpy.ch` (holding the fake Ch) while pickling, then restores."""
    saved = {name: sys.modules.get(name) for name in ("chumpy", "chumpy.ch")}
    package, module = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")
    package.__path__ = []
    package.ch = module
    module.Ch = _FakeCh
    sys.modules.update({"chumpy": package, "chumpy.ch": module})
    try:
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                del sys.modules[name]
            else:
                sys.modules[name] = previous


# Module names as Python 2 era numpy / scipy wrote them.
_PYTHON2_MODULES = {
    "numpy._core.multiarray": "numpy.core.multiarray",
    "numpy._core.numeric": "numpy.core.numeric",
    "scipy.sparse._csc": "scipy.sparse.csc",
    "scipy.sparse._csr": "scipy.sparse.csr",
}


class _Python2Pickler(pickle._Pickler):
    """Writes what Python 2's pickler wrote: `str` opcodes for text and raw bytes.

    Python 3 writes bytes as `_codecs.encode(...)` calls at protocols < 3; Python 2
    wrote its byte strings (keys, dtype codes, array data) as STRING /
    SHORT_BINSTRING / BINSTRING, which Python 3 reads back as str with
    encoding="latin1". Module names are mapped back to their Python 2 era
    spellings (`copy_reg`, `__builtin__` by pickle itself, numpy and scipy here).
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _write_py2_string(self, data: bytes) -> None:
        if self.proto == 0:
            self.write(pickle.STRING + repr(data)[1:].encode("ascii") + b"\n")
        elif len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)

    def save_bytes(self, obj: bytes) -> None:
        self._write_py2_string(obj)
        self.memoize(obj)

    def save_str(self, obj: str) -> None:
        if not obj.isascii():
            return pickle._Pickler.save_str(self, obj)
        self._write_py2_string(obj.encode("ascii"))
        self.memoize(obj)
        return None

    def save_global(self, obj: object, name: str | None = None) -> None:
        name = name or obj.__qualname__
        module = _PYTHON2_MODULES.get(obj.__module__)
        if module is None:
            return pickle._Pickler.save_global(self, obj, name)
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)
        return None

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str
    dispatch[types.FunctionType] = save_global


def _flame_dict(
    arrays: Mapping[str, np.ndarray], chumpy: bool | Collection[str], sparse_regressor: bool
) -> dict[str, object]:
    """Returns the dict the official files hold, in their key order."""
    chumpy_keys = ("shapedirs",) if chumpy is True else () if chumpy is False else tuple(chumpy)
    data: dict[str, object] = {}
    keys = [k for k in _OFFICIAL_ORDER if k in arrays] + [
        k for k in arrays if k not in _OFFICIAL_ORDER
    ]
    for key in keys:
        value = np.asarray(arrays[key])
        if key in _FLOAT_KEYS:
            value = value.astype(np.float64)
        if key in chumpy_keys:
            value = _FakeCh(value)
        elif key == "J_regressor" and sparse_regressor:
            import scipy.sparse

            value = scipy.sparse.csc_matrix(value)
        data[key] = value
    data["bs_style"] = "lbs"
    data["bs_type"] = "lrotmin"
    return data


def write_flame_pkl(
    path: str | Path,
    arrays: Mapping[str, np.ndarray],
    *,
    chumpy: bool | Collection[str] = True,
    sparse_regressor: bool = True,
    python2: bool = True,
    protocol: int = 2,
) -> Path:
    """Writes `arrays` as an official-style FLAME pickle.

    Args:
      path: the file to write.
      arrays: FLAME-named arrays, e.g. from `make_fake_flame_arrays`; float
        arrays are stored as float64 like the official files.
      chumpy: True stores `shapedirs` as a `chumpy.ch.Ch` (as in FLAME 2020), a
        collection of key names stores those, False stores plain numpy arrays
        (as FLAME 2023 Open may).
      sparse_regressor: store `J_regressor` as a `scipy.sparse.csc_matrix` (needs
        scipy: call `require_oracle("scipy")` first), else dense.
      python2: write Python 2's opcodes and module names (the official files);
        False writes an ordinary Python 3 pickle.
      protocol: the pickle protocol; at most 2 with python2.

    Returns:
      The path written.
    """
    if python2 and protocol > 2:
        raise ValueError("Python 2 pickles use protocol 0, 1 or 2")
    path = Path(path)
    buffer = io.BytesIO()
    with _fake_chumpy_modules():
        data = _flame_dict(arrays, chumpy, sparse_regressor)
        if python2:
            _Python2Pickler(buffer, protocol).dump(data)
        else:
            pickle.dump(data, buffer, protocol)
    path.write_bytes(buffer.getvalue())
    return path


def write_flame_npz(path: str | Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """Writes `arrays` under the FLAME key names as an `.npz` (dense, float64, plus bs_*).

    This is what a user gets from `np.savez(path, **{k: np.asarray(v) ...})` on
    an official pickle loaded with chumpy and scipy.
    """
    path = Path(path)
    data = _flame_dict(arrays, chumpy=False, sparse_regressor=False)
    with path.open("wb") as f:
        np.savez(f, **{key: np.asarray(value) for key, value in data.items()})
    return path
