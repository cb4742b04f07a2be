"""The inert values the restricted unpickler hands out, and the caps on model files.

`uika_jax.head.safe_pickle` never hands a pickle a live numpy or scipy object:
what a FLAME pickle builds becomes one of these stand-ins, checked as it is
filled in, and real arrays are made afterwards by `PickledObject.to_array`:

- `PickledDtype`: a plain numeric type code (`PLAIN_CODES`) and a byte order.
- `PickledArray`: shape (checked against `ModelFileLimits.max_array_elements`),
  a `PickledDtype`, the memory order and raw bytes whose length matches.
- `PickledChumpyArray`: a `chumpy.ch.Ch`, holding its 'x' array.
- `PickledSparseMatrix` / `PickledCsrMatrix`: a scipy CSC / CSR matrix, its
  dense shape checked against the element cap; `to_array` densifies it.

`ModelFileLimits` holds the caps shared by every model and UV file reader
(`checked_shape` applies the element cap to a declared shape).
"""

from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np

FLAME_LARGEST_ARRAY_ELEMENTS = 5023 * 3 * 400
"""Elements of the largest array in the official FLAME files (shapedirs, 5023 x 3 x 400)."""


@dataclasses.dataclass(frozen=True)
class ModelFileLimits:
    """Caps checked before anything is allocated when a model or UV file is read.

    The defaults leave about 10x headroom over the official FLAME files (the
    largest array has 6,027,600 elements; a protocol-0 pickle of FLAME 2020 is
    163 MB and runs about 500 opcodes).

    Attributes:
      max_file_bytes: size on disk of a model or UV file.
      max_array_elements: declared elements of one array; a sparse matrix
        counts its dense shape, as it is densified.
      max_total_bytes: bytes of array data decoded from one file: the arrays
        read from an `.npz`; every array and latin-1 string a pickle decodes.
      max_pickle_opcodes: opcodes one pickle may run.
      max_set_items: items of one set (chumpy's `_dirty_vars` holds a few names).
    """

    max_file_bytes: int = 1 << 30
    max_array_elements: int = 10 * FLAME_LARGEST_ARRAY_ELEMENTS
    max_total_bytes: int = 1 << 30
    max_pickle_opcodes: int = 100_000
    max_set_items: int = 64


DEFAULT_LIMITS = ModelFileLimits()


class RestrictedPickleError(ValueError):
    """A pickle that is refused or cannot be read; the message names its origin and the problem."""


class RefusedOperationError(Exception):
    """Raised for an operation no FLAME pickle performs (caught and reported with the origin)."""


def describe_value(value: object) -> str:
    """Names a value in an error without repr-ing attacker data of unbounded size or depth."""
    if isinstance(value, str | bytes) and len(value) <= 40:
        return repr(value)
    if (
        value is None
        or isinstance(value, float)
        or (isinstance(value, int) and value.bit_length() <= 64)
    ):
        return repr(value)
    return type(value).__name__


def is_flag(value: object) -> bool:
    """Whether a pickled value is a boolean flag (bool, or the ints 0 and 1 of Python 2)."""
    return type(value) is bool or (type(value) is int and value in (0, 1))


# --------------------------------------------------------------------------- numeric types

_NATIVE_ORDER = "<" if sys.byteorder == "little" else ">"


def checked_shape(shape: object, limits: ModelFileLimits) -> tuple[int, ...]:
    """Returns `shape` as a tuple of ints after checking it against the element cap.

    Args:
      shape: a declared shape (from a pickle or an `.npy` header).
      limits: the caps.

    Raises:
      ValueError: if it is not a tuple of non-negative ints, or its product
        exceeds `limits.max_array_elements`.
    """
    if (
        type(shape) is not tuple
        or len(shape) > 32
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise ValueError(
            "an array shape must be a tuple of at most 32 non-negative ints, not "
            f"{describe_value(shape)}"
        )
    cap = limits.max_array_elements
    exact = all(d <= cap for d in shape)  # else the product could have thousands of digits
    if not exact or math.prod(shape) > cap:
        text = ", ".join(map(describe_value, shape))
        count = f" ({math.prod(shape):,} elements)" if exact else ""
        raise ValueError(
            f"an array of shape ({text}){count} exceeds the limit of {cap:,} elements per "
            "array (ModelFileLimits.max_array_elements)"
        )
    return shape


class DecodeBudget:
    """The caps of one pickle and what is left of its decoded bytes.

    Every array's bytes and every latin-1 encoding are charged, so that a
    pickle cannot multiply one large string by referencing it many times.
    """

    __slots__ = ("bytes_left", "limits")

    def __init__(self, limits: ModelFileLimits):
        self.limits = limits
        self.bytes_left = limits.max_total_bytes

    def spend(self, nbytes: int) -> None:
        """Charges `nbytes`; raises RefusedOperationError once the total exceeds the cap."""
        self.bytes_left -= nbytes
        if self.bytes_left < 0:
            raise RefusedOperationError(
                f"more than {self.limits.max_total_bytes:,} bytes of array data "
                "(ModelFileLimits.max_total_bytes)"
            )


# --------------------------------------------------------------------------- stand-ins


class PickledObject:
    """Base of the inert stand-ins the unpickler hands out; `to_array` makes the real array."""

    __slots__ = ()

    def build(self, state: object, budget: DecodeBudget) -> None:
        """Applies a pickle's BUILD state after checking it (raises RefusedOperationError)."""
        raise RefusedOperationError(f"BUILD on {type(self).__name__}")

    def to_array(self, what: str) -> np.ndarray:
        """Returns the value as a numpy array of a plain numeric dtype.

        Args:
          what: names the value in errors (e.g. "path: shapedirs").

        Raises:
          RestrictedPickleError: if the pickled state is incomplete or inconsistent.
        """
        raise RestrictedPickleError(f"{what} is a {type(self).__name__}, not an array")


class PickledDtype(PickledObject):
    """Stand-in for `numpy.dtype`: a plain numeric type code and its byte order."""

    __slots__ = ("_built", "byteorder", "code")

    def __init__(self, code: str):
        self.code = code
        self.byteorder = "|" if code[1] == "1" else _NATIVE_ORDER
        self._built = False

    @property
    def dtype_string(self) -> str:
        """The dtype string, e.g. '<f8' or '|u1' (always one of PLAIN_DTYPES)."""
        return self.byteorder + self.code

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return int(self.code[1])

    def build(self, state: object, budget: DecodeBudget) -> None:
        """Takes the byte order from numpy's dtype state `(3, order, None, None, None, ...)`."""
        if self._built:
            raise RefusedOperationError("BUILD twice on a numpy.dtype")
        if type(state) is not tuple or len(state) not in (8, 9):
            raise RefusedOperationError(
                f"numpy.dtype state {describe_value(state)} (expected an 8-tuple)"
            )
        version, order, subarray, names, fields, *sizes_and_flags = state
        no_metadata = (len(state), version) == (8, 3) or (
            (len(state), version) == (9, 4) and state[8] is None
        )
        if (
            not no_metadata
            or order not in ("<", ">", "|", "=")
            or not (subarray is None and names is None and fields is None)
            or not all(type(v) is int for v in sizes_and_flags[:3])
        ):
            raise RefusedOperationError(
                "numpy.dtype state that is not a plain numeric type (subarray, fields or metadata)"
            )
        if self.itemsize > 1:
            if order == "|":
                raise RefusedOperationError(f"numpy.dtype {self.code} without a byte order")
            self.byteorder = _NATIVE_ORDER if order == "=" else order
        self._built = True


class PickledArray(PickledObject):
    """Stand-in for a numpy array: shape, dtype, memory order and raw bytes, all checked."""

    __slots__ = ("data", "dtype", "fortran_order", "shape")

    def __init__(self) -> None:
        self.shape: tuple[int, ...] = ()
        self.dtype: PickledDtype | None = None
        self.fortran_order = False
        self.data: bytes | None = None

    def fill(
        self,
        shape: object,
        dtype: object,
        fortran_order: object,
        data: object,
        budget: DecodeBudget,
    ) -> PickledArray:
        """Checks and stores an array's parts; the bytes must match shape and dtype exactly."""
        if self.data is not None:
            raise RefusedOperationError("BUILD twice on a numpy array")
        try:
            shape = checked_shape(shape, budget.limits)
        except ValueError as e:
            raise RefusedOperationError(str(e)) from None
        if not isinstance(dtype, PickledDtype):
            raise RefusedOperationError(f"a numpy array whose dtype is a {describe_value(dtype)}")
        if not is_flag(fortran_order):
            raise RefusedOperationError(
                f"a numpy array whose fortran flag is {describe_value(fortran_order)}"
            )
        if not isinstance(data, str | bytes | bytearray):
            raise RefusedOperationError(
                f"a numpy array whose data is a {describe_value(data)}, not raw bytes"
            )
        expected = math.prod(shape) * dtype.itemsize
        budget.spend(expected)
        if len(data) != expected:
            raise RefusedOperationError(
                f"a numpy array of shape {shape} and dtype {dtype.dtype_string} needs "
                f"{expected:,} bytes of data, the pickle holds {len(data):,}"
            )
        self.shape, self.dtype, self.fortran_order = shape, dtype, bool(fortran_order)
        self.data = data.encode("latin1") if isinstance(data, str) else bytes(data)
        return self

    def build(self, state: object, budget: DecodeBudget) -> None:
        """Applies numpy's array state `([1,] shape, dtype, fortran, raw bytes)`."""
        if type(state) is not tuple or len(state) not in (4, 5):
            raise RefusedOperationError(
                f"numpy array state {describe_value(state)} (expected a 5-tuple)"
            )
        if len(state) == 5:
            if type(state[0]) is not int or state[0] != 1:
                raise RefusedOperationError(f"numpy array state version {describe_value(state[0])}")
            state = state[1:]
        self.fill(*state, budget)

    def to_array(self, what: str) -> np.ndarray:
        """Returns a read-only array over the checked bytes."""
        if self.data is None or self.dtype is None:
            raise RestrictedPickleError(f"{what}: a numpy array without data")
        order = "F" if self.fortran_order else "C"
        return np.frombuffer(self.data, np.dtype(self.dtype.dtype_string)).reshape(
            self.shape, order=order
        )


class PickledChumpyArray(PickledObject):
    """Stand-in for `chumpy.ch.Ch`: its pickled `__dict__`, whose 'x' is the array."""

    __slots__ = ("x",)

    def __init__(self) -> None:
        self.x: PickledArray | None = None

    def build(self, state: object, budget: DecodeBudget) -> None:
        """Keeps `state['x']`, which must be a numpy array."""
        if self.x is not None:
            raise RefusedOperationError("BUILD twice on a chumpy.ch.Ch")
        if type(state) is not dict:
            raise RefusedOperationError(
                f"chumpy.ch.Ch state {describe_value(state)} (expected a dict)"
            )
        x = state.get("x")
        if not isinstance(x, PickledArray):
            why = "itself a chumpy Ch (self-referencing or nested?)"
            if not isinstance(x, PickledChumpyArray):
                why = f"a {describe_value(x)}"
            raise RefusedOperationError(
                f"a chumpy.ch.Ch whose 'x' is {why}, expected a numpy array"
            )
        self.x = x

    def to_array(self, what: str) -> np.ndarray:
        """Returns the Ch's 'x' array."""
        if self.x is None:
            raise RestrictedPickleError(f"{what}: a chumpy Ch without an 'x' array")
        return self.x.to_array(what)


class PickledSparseMatrix(PickledObject):
    """Stand-in for a scipy compressed sparse matrix (CSC; CSR in a subclass)."""

    __slots__ = ("cols", "parts", "rows")
    compressed_axis = 1  # csc: indptr runs over columns

    def __init__(self) -> None:
        self.rows = self.cols = 0
        self.parts: dict[str, PickledArray] | None = None

    def build(self, state: object, budget: DecodeBudget) -> None:
        """Checks the dense shape against the cap and keeps data, indices and indptr."""
        if self.parts is not None:
            raise RefusedOperationError("BUILD twice on a sparse matrix")
        if type(state) is not dict:
            raise RefusedOperationError(
                f"sparse matrix state {describe_value(state)} (expected a dict)"
            )
        shape = state.get("_shape", state.get("shape"))
        if type(shape) is not tuple or len(shape) != 2:
            raise RefusedOperationError(f"a sparse matrix of shape {describe_value(shape)}")
        try:
            self.rows, self.cols = checked_shape(shape, budget.limits)
        except ValueError as e:
            raise RefusedOperationError(f"sparse matrix: {e}") from None
        parts = {key: state.get(key) for key in ("data", "indices", "indptr")}
        for key, part in parts.items():
            if not isinstance(part, PickledArray):
                raise RefusedOperationError(
                    f"a sparse matrix whose {key!r} is a {describe_value(part)}"
                )
        self.parts = parts

    def _part(self, key: str, kinds: str, what: str) -> np.ndarray:
        assert self.parts is not None
        array = self.parts[key].to_array(f"{what} {key}")
        if array.ndim != 1 or array.dtype.kind not in kinds:
            raise RestrictedPickleError(
                f"{what}: sparse {key} has shape {array.shape} and dtype {array.dtype}"
            )
        return array

    def to_array(self, what: str) -> np.ndarray:
        """Returns the dense float64 matrix, summing duplicate entries as scipy does."""
        if self.parts is None:
            raise RestrictedPickleError(f"{what}: a sparse matrix without data")
        data = self._part("data", "biuf", what).astype(np.float64)
        indices = self._part("indices", "iu", what).astype(np.int64)
        indptr = self._part("indptr", "iu", what).astype(np.int64)
        major, minor = (
            (self.cols, self.rows) if self.compressed_axis == 1 else (self.rows, self.cols)
        )
        nnz = int(indptr[-1]) if indptr.size else -1
        if (
            indptr.shape != (major + 1,)
            or indptr[0] != 0
            or np.any(np.diff(indptr) < 0)
            or not 0 <= nnz <= min(data.size, indices.size)
            or np.any(indices[:nnz] < 0)
            or np.any(indices[:nnz] >= minor)
        ):
            raise RestrictedPickleError(
                f"{what}: inconsistent sparse matrix of shape ({self.rows}, {self.cols})"
            )
        major_index = np.repeat(np.arange(major), np.diff(indptr))
        dense = np.zeros((self.rows, self.cols), np.float64)
        if self.compressed_axis == 1:
            np.add.at(dense, (indices[:nnz], major_index), data[:nnz])
        else:
            np.add.at(dense, (major_index, indices[:nnz]), data[:nnz])
        return dense


class PickledCsrMatrix(PickledSparseMatrix):
    """Stand-in for a scipy CSR matrix (indptr runs over rows)."""

    __slots__ = ()
    compressed_axis = 0


__all__ = [
    "DEFAULT_LIMITS",
    "FLAME_LARGEST_ARRAY_ELEMENTS",
    "DecodeBudget",
    "ModelFileLimits",
    "PickledArray",
    "PickledChumpyArray",
    "PickledCsrMatrix",
    "PickledDtype",
    "PickledObject",
    "PickledSparseMatrix",
    "RefusedOperationError",
    "RestrictedPickleError",
    "checked_shape",
    "describe_value",
    "is_flag",
]
