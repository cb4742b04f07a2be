"""A restricted unpickler for the official FLAME `.pkl` model files.

The official FLAME files (FLAME 2020 `generic_model.pkl`, FLAME 2023, FLAME
2023 Open) are Python 2 pickles of a dict holding numpy arrays, chumpy arrays
and a scipy sparse matrix. `load_restricted_pickle` reads them without chumpy
or scipy: it maps the few globals such a file references to numpy or to local
stand-ins (`ChumpyArray`, `SparseMatrix`) and refuses every other global, and
every misuse of an allowed one, so a malicious pickle cannot run code. The
pickle layouts it accepts (checked against chumpy 0.70 and scipy 1.17):

- `chumpy.ch.Ch` pickles through the default object protocol: NEWOBJ of the
  class with no arguments (protocol 2) or `copy_reg._reconstructor(Ch, object,
  None)` (protocols 0-1), then BUILD with `__dict__` minus `_parents` and
  `_cache`: `{'x': float64 ndarray, '_dirty_vars': set, '_itr': None,
  '_make_dense': bool, '_make_sparse': bool, '_depends_on_deps': dict}`,
  sometimes with `'_status'`. The array is `state['x']`. Other chumpy classes
  are lazy expressions that only chumpy can evaluate; they are refused.
- `scipy.sparse` `csc_matrix` / `csr_matrix` (module `scipy.sparse.csc` in old
  files, `scipy.sparse._csc` today; `*_array` likewise) pickle the same way,
  with state `{'_shape': (rows, cols), 'maxprint': int, 'indptr', 'indices',
  'data'}` (other scipy versions may store more keys, ignored here; `'shape'`
  is accepted for `'_shape'`). `SparseMatrix.to_dense` densifies them.
- numpy arrays pickle as `numpy.core.multiarray._reconstruct(ndarray, (0,),
  b'b')` + BUILD `(version, shape, dtype, fortran, raw bytes)` (Python 2 raw
  data arrives as a latin-1 `str`; Python 3 protocols below 3 wrap it in
  `_codecs.encode(str, 'latin1')`; protocol 5 calls `_frombuffer` from
  `numpy.core.numeric` instead), with `numpy.dtype` and
  `numpy.core.multiarray.scalar`; numpy 2 writes `numpy._core` for `numpy.core`.
  Sets (chumpy's `_dirty_vars`) come from `__builtin__.set`, protocols 0-1
  objects from `copy_reg._reconstructor` with `__builtin__.object`.

Allowed functions are handed out wrapped, so that a pickle's BUILD cannot
modify them, and each checks its arguments before calling the real one.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import BinaryIO

import numpy as np


class RestrictedPickleError(ValueError):
    """A pickle that is refused or cannot be read; the message names its origin and the problem."""


class _RefusedError(Exception):
    """Raised for an operation no FLAME pickle performs (caught and reported with the origin)."""


class ChumpyArray:
    """Stand-in for `chumpy.ch.Ch`: keeps the pickled state, whose 'x' is the array."""

    state: object = None

    def __setstate__(self, state: object) -> None:
        self.state = state


class SparseMatrix:
    """Stand-in for a scipy compressed sparse matrix (CSC here, CSR in a subclass).

    Keeps the pickled state; `to_dense` turns it into an array.
    """

    compressed_axis = 1  # csc: indptr runs over columns
    state: object = None

    def __setstate__(self, state: object) -> None:
        self.state = state

    def to_dense(self, origin: str) -> np.ndarray:
        """Returns the dense float64 matrix, summing duplicate entries as scipy does.

        Args:
          origin: names the matrix in errors (e.g. "path: J_regressor").

        Raises:
          RestrictedPickleError: if the state is malformed or inconsistent.
        """
        state = self.state if isinstance(self.state, dict) else {}
        shape = state.get("_shape", state.get("shape"))
        try:
            data = np.asarray(state["data"], np.float64)
            indices = np.asarray(state["indices"], np.int64)
            indptr = np.asarray(state["indptr"], np.int64)
            rows, cols = (int(s) for s in shape)
        except (KeyError, TypeError, ValueError) as e:
            raise RestrictedPickleError(f"{origin}: malformed sparse matrix state ({e!r})") from e
        major = cols if self.compressed_axis == 1 else rows
        minor = rows if self.compressed_axis == 1 else cols
        nnz = int(indptr[-1]) if indptr.size else -1
        if (
            indptr.shape != (major + 1,)
            or indptr[0] != 0
            or np.any(np.diff(indptr) < 0)
            or not nnz <= min(data.size, indices.size)
            or np.any(indices[:nnz] < 0)
            or np.any(indices[:nnz] >= minor)
        ):
            raise RestrictedPickleError(f"{origin}: inconsistent sparse matrix of shape {shape}")
        major_index = np.repeat(np.arange(major), np.diff(indptr))
        dense = np.zeros((rows, cols), np.float64)
        if self.compressed_axis == 1:
            np.add.at(dense, (indices[:nnz], major_index), data[:nnz])
        else:
            np.add.at(dense, (major_index, indices[:nnz]), data[:nnz])
        return dense


class _CsrMatrix(SparseMatrix):
    """Stand-in for a scipy CSR matrix (indptr runs over rows)."""

    compressed_axis = 0


_STAND_INS = (ChumpyArray, SparseMatrix, _CsrMatrix)
_ARRAY_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]
_NUMPY_SCALAR = np.float64(0.0).__reduce__()[0]
_NUMPY_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]


def _reconstruct_array(subtype: object, shape: object, dtype: object) -> np.ndarray:
    if subtype is not np.ndarray:
        raise _RefusedError(f"_reconstruct of {subtype!r} (only numpy.ndarray)")
    return _ARRAY_RECONSTRUCT(subtype, shape, dtype)


def _numpy_scalar(dtype: object, *args: object) -> object:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _RefusedError(f"numpy scalar of dtype {dtype!r}")
    return _NUMPY_SCALAR(dtype, *args)


def _frombuffer(buffer: object, dtype: object, shape: object, order: object) -> np.ndarray:
    if not isinstance(buffer, bytes | bytearray | memoryview | pickle.PickleBuffer):
        raise _RefusedError(f"_frombuffer of {type(buffer).__name__}")
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _RefusedError(f"_frombuffer of dtype {dtype!r}")
    return _NUMPY_FROMBUFFER(buffer, dtype, shape, order)


def _reconstructor(cls: object, base: object, state: object) -> object:
    if cls not in _STAND_INS or base is not object or state is not None:
        raise _RefusedError(f"copy_reg._reconstructor({cls!r}, {base!r}, ...)")
    return object.__new__(cls)


def _latin1_encode(text: object, encoding: object = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _RefusedError(f"_codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


class _SafeFunction:
    """Wraps an allowed function: a pickle's BUILD cannot modify what it hands out."""

    __slots__ = ("_function",)

    def __init__(self, function: Callable[..., object]):
        object.__setattr__(self, "_function", function)

    def __setattr__(self, name: str, value: object) -> None:
        raise _RefusedError(f"setting attribute {name!r} of a function")

    def __call__(self, *args: object) -> object:
        return self._function(*args)


def _allowed_globals() -> dict[tuple[str, str], object]:
    """Maps each (module, name) a FLAME pickle may reference to what the unpickler returns."""
    reconstruct, scalar, frombuffer = map(
        _SafeFunction, (_reconstruct_array, _numpy_scalar, _frombuffer)
    )
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _SafeFunction(_latin1_encode),
        ("chumpy.ch", "Ch"): ChumpyArray,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    for builtins_module in ("__builtin__", "builtins"):
        allowed[(builtins_module, "object")] = object
        allowed[(builtins_module, "set")] = set
    for copyreg_module in ("copy_reg", "copyreg"):
        allowed[(copyreg_module, "_reconstructor")] = _SafeFunction(_reconstructor)
    for fmt, stand_in in (("csc", SparseMatrix), ("csr", _CsrMatrix)):
        for module in (f"scipy.sparse.{fmt}", f"scipy.sparse._{fmt}", "scipy.sparse._arrays"):
            allowed[(module, f"{fmt}_matrix")] = stand_in
            allowed[(module, f"{fmt}_array")] = stand_in
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles FLAME files: numpy, chumpy `Ch` and scipy sparse only; refuses other globals."""

    def __init__(self, file: BinaryIO, origin: str):
        super().__init__(file, encoding="latin1")
        self._origin = origin

    def find_class(self, module: str, name: str) -> object:
        """Returns the stand-in for an allowed global; raises RestrictedPickleError otherwise."""
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        if module.split(".")[0] == "chumpy":
            why = (
                "only plain chumpy.ch.Ch arrays can be read without chumpy; convert the file "
                "with chumpy installed (np.asarray each value) and pass the .npz"
            )
        else:
            why = "a FLAME model file references only numpy, chumpy and scipy.sparse objects"
        raise RestrictedPickleError(
            f"{self._origin}: refusing to unpickle forbidden global {module}.{name} ({why})"
        )


def load_restricted_pickle(source: str | os.PathLike[str] | BinaryIO, origin: str) -> object:
    """Unpickles a FLAME model file with the restricted unpickler.

    Args:
      source: a path, or a binary file open for reading at the pickle's start.
      origin: names the file in errors (usually the path as a string).

    Returns:
      The unpickled object (for a FLAME file, a dict); chumpy arrays come back
      as `ChumpyArray` and scipy sparse matrices as `SparseMatrix`.

    Raises:
      RestrictedPickleError: naming `origin`, if the pickle references a
        forbidden global, misuses an allowed one, or cannot be read (truncated,
        corrupt or not a pickle).
    """
    try:
        if isinstance(source, str | os.PathLike):
            with open(source, "rb") as f:
                return _RestrictedUnpickler(f, origin).load()
        return _RestrictedUnpickler(source, origin).load()
    except RestrictedPickleError:
        raise
    except _RefusedError as e:
        raise RestrictedPickleError(f"{origin}: refusing to unpickle: {e}") from e
    except Exception as e:
        raise RestrictedPickleError(
            f"{origin}: not a readable pickle (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e


__all__ = [
    "ChumpyArray",
    "RestrictedPickleError",
    "SparseMatrix",
    "load_restricted_pickle",
]
