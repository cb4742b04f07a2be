"""A restricted unpickler for the official FLAME `.pkl` model files.

The official FLAME files (FLAME 2020 `generic_model.pkl`, FLAME 2023, FLAME
2023 Open) are Python 2 pickles of a dict holding numpy arrays, chumpy arrays
and a scipy sparse matrix. `load_restricted_pickle` reads them, and the same
content written by Python 3 at protocols 0 to 5, without chumpy or scipy.

Design: nothing handed out while unpickling is a live numpy or scipy object or
a callable. Each allowed global is an inert marker; calling one (REDUCE),
instantiating one (NEWOBJ) or filling one in (BUILD) runs this module's own
checks and yields an inert stand-in: `PickledDtype` (a dtype code), `PickledArray`
(shape, dtype code, byte order, raw bytes), `PickledChumpyArray`,
`PickledSparseMatrix`. BUILD is refused on anything else. Real arrays are
made only afterwards, by `PickledObject.to_array`, from bytes whose length
matches the validated shape and dtype. The pickle runs on the standard
library's pure-Python unpickler with an allow-list of opcodes and this
module's loaders for the ones that make objects: none hashes, compares or
iterates anything but strings and the stand-ins, so a pickle cannot run code,
forge a numpy object or recurse through attacker data. What is accepted, all
else refused:

- globals: `numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')`
  followed by BUILD `([1,] shape, dtype, fortran, raw bytes)` (how numpy
  pickles arrays at protocols 0-4; Python 2 raw data arrives as a latin-1
  `str`, Python 3 protocols below 3 wrap it in `_codecs.encode(str, 'latin1')`);
  `numpy.core.numeric._frombuffer(bytes, dtype, shape, 'C' | 'F')` (protocol
  5); `numpy.core.multiarray.scalar(dtype, bytes)`; `numpy.dtype(code, align,
  copy)` + BUILD `(3, byteorder, None, None, None, int, int, int)`; numpy 2's
  `numpy._core` wherever `numpy.core` appears.
- dtype codes: b1, i1, i2, i4, i8, u1, u2, u4, u8, f2, f4, f8, little- or
  big-endian (`|` for one-byte codes). Object, void, string and structured
  dtypes are refused.
- `chumpy.ch.Ch` through the default object protocol: NEWOBJ with no
  arguments (protocols 2+) or `copy_reg._reconstructor(Ch, object, None)`
  (protocols 0-1), then BUILD with a dict whose `'x'` is an array (chumpy 0.70
  also stores `_dirty_vars`, `_itr`, `_make_dense`, `_make_sparse`,
  `_depends_on_deps`, ignored). Other chumpy classes are lazy expressions that
  only chumpy can evaluate; they are refused.
- scipy `csc_matrix` / `csr_matrix` (and `*_array`) from `scipy.sparse.csc`,
  `scipy.sparse._csc` (csr likewise) or `scipy.sparse._arrays`, the same way,
  BUILD with a dict holding `'_shape'` (or `'shape'`) and arrays `'data'`,
  `'indices'`, `'indptr'` (other keys ignored).
- `set(list of str)` / `EMPTY_SET` + `ADDITEMS` of str (chumpy's `_dirty_vars`),
  `copy_reg._reconstructor`, `object`; Python 2 (`__builtin__`, `copy_reg`)
  and Python 3 (`builtins`, `copyreg`) module names.
- opcodes: everything of protocols 0-5 except PERSID, BINPERSID, INST, OBJ,
  EXT1/2/4, LONG4, NEWOBJ_EX, FROZENSET, NEXT_BUFFER and READONLY_BUFFER.
  Dict keys must be `str`, APPEND(S) targets lists, numeric literals of
  protocol 0 at most 64 characters.

Caps (`ModelFileLimits`, each checked before what it guards is allocated):
the file size (1 GiB), the opcodes run (100,000; an official file runs about
500), the items of a set (64), each array's declared element count
(60,276,000, 10x FLAME's largest array, 5023 x 3 x 400; a sparse matrix counts
its dense shape) and the bytes of array data decoded in all (1 GiB, so that
one string referenced many times cannot be decoded many times).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import struct
import sys
from collections.abc import Callable

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


class _RefusedError(Exception):
    """Raised for an operation no FLAME pickle performs (caught and reported with the origin)."""


def _describe(value: object) -> str:
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


def _is_flag(value: object) -> bool:
    return type(value) is bool or (type(value) is int and value in (0, 1))


# --------------------------------------------------------------------------- numeric types

_PLAIN_CODES = frozenset(
    f"{kind}{size}"
    for kind, sizes in (("b", (1,)), ("i", (1, 2, 4, 8)), ("u", (1, 2, 4, 8)), ("f", (2, 4, 8)))
    for size in sizes
)
PLAIN_DTYPES = frozenset(
    f"{order}{code}" for code in _PLAIN_CODES for order in (("|",) if code[1] == "1" else "<>")
)
"""Dtype strings (`numpy.dtype.str`) accepted in model files: plain numbers only."""
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
            f"{_describe(shape)}"
        )
    cap = limits.max_array_elements
    exact = all(d <= cap for d in shape)  # else the product could have thousands of digits
    if not exact or math.prod(shape) > cap:
        text = ", ".join(map(_describe, shape))
        count = f" ({math.prod(shape):,} elements)" if exact else ""
        raise ValueError(
            f"an array of shape ({text}){count} exceeds the limit of {cap:,} elements per "
            "array (ModelFileLimits.max_array_elements)"
        )
    return shape


class _Budget:
    """The caps of one pickle and what is left of its decoded bytes.

    Every array's bytes and every latin-1 encoding are charged, so that a
    pickle cannot multiply one large string by referencing it many times.
    """

    __slots__ = ("bytes_left", "limits")

    def __init__(self, limits: ModelFileLimits):
        self.limits = limits
        self.bytes_left = limits.max_total_bytes

    def spend(self, nbytes: int) -> None:
        """Charges `nbytes`; raises _RefusedError once the total exceeds the cap."""
        self.bytes_left -= nbytes
        if self.bytes_left < 0:
            raise _RefusedError(
                f"more than {self.limits.max_total_bytes:,} bytes of array data "
                "(ModelFileLimits.max_total_bytes)"
            )


# --------------------------------------------------------------------------- stand-ins


class PickledObject:
    """Base of the inert stand-ins the unpickler hands out; `to_array` makes the real array."""

    __slots__ = ()

    def build(self, state: object, budget: _Budget) -> None:
        """Applies a pickle's BUILD state after checking it (raises _RefusedError)."""
        raise _RefusedError(f"BUILD on {type(self).__name__}")

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

    def build(self, state: object, budget: _Budget) -> None:
        """Takes the byte order from numpy's dtype state `(3, order, None, None, None, ...)`."""
        if self._built:
            raise _RefusedError("BUILD twice on a numpy.dtype")
        if type(state) is not tuple or len(state) not in (8, 9):
            raise _RefusedError(f"numpy.dtype state {_describe(state)} (expected an 8-tuple)")
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
            raise _RefusedError(
                "numpy.dtype state that is not a plain numeric type (subarray, fields or metadata)"
            )
        if self.itemsize > 1:
            if order == "|":
                raise _RefusedError(f"numpy.dtype {self.code} without a byte order")
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
        budget: _Budget,
    ) -> PickledArray:
        """Checks and stores an array's parts; the bytes must match shape and dtype exactly."""
        if self.data is not None:
            raise _RefusedError("BUILD twice on a numpy array")
        try:
            shape = checked_shape(shape, budget.limits)
        except ValueError as e:
            raise _RefusedError(str(e)) from None
        if not isinstance(dtype, PickledDtype):
            raise _RefusedError(f"a numpy array whose dtype is a {_describe(dtype)}")
        if not _is_flag(fortran_order):
            raise _RefusedError(f"a numpy array whose fortran flag is {_describe(fortran_order)}")
        if not isinstance(data, str | bytes | bytearray):
            raise _RefusedError(f"a numpy array whose data is a {_describe(data)}, not raw bytes")
        expected = math.prod(shape) * dtype.itemsize
        budget.spend(expected)
        if len(data) != expected:
            raise _RefusedError(
                f"a numpy array of shape {shape} and dtype {dtype.dtype_string} needs "
                f"{expected:,} bytes of data, the pickle holds {len(data):,}"
            )
        self.shape, self.dtype, self.fortran_order = shape, dtype, bool(fortran_order)
        self.data = data.encode("latin1") if isinstance(data, str) else bytes(data)
        return self

    def build(self, state: object, budget: _Budget) -> None:
        """Applies numpy's array state `([1,] shape, dtype, fortran, raw bytes)`."""
        if type(state) is not tuple or len(state) not in (4, 5):
            raise _RefusedError(f"numpy array state {_describe(state)} (expected a 5-tuple)")
        if len(state) == 5:
            if type(state[0]) is not int or state[0] != 1:
                raise _RefusedError(f"numpy array state version {_describe(state[0])}")
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

    def build(self, state: object, budget: _Budget) -> None:
        """Keeps `state['x']`, which must be a numpy array."""
        if self.x is not None:
            raise _RefusedError("BUILD twice on a chumpy.ch.Ch")
        if type(state) is not dict:
            raise _RefusedError(f"chumpy.ch.Ch state {_describe(state)} (expected a dict)")
        x = state.get("x")
        if not isinstance(x, PickledArray):
            why = "itself a chumpy Ch (self-referencing or nested?)"
            if not isinstance(x, PickledChumpyArray):
                why = f"a {_describe(x)}"
            raise _RefusedError(f"a chumpy.ch.Ch whose 'x' is {why}, expected a numpy array")
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

    def build(self, state: object, budget: _Budget) -> None:
        """Checks the dense shape against the cap and keeps data, indices and indptr."""
        if self.parts is not None:
            raise _RefusedError("BUILD twice on a sparse matrix")
        if type(state) is not dict:
            raise _RefusedError(f"sparse matrix state {_describe(state)} (expected a dict)")
        shape = state.get("_shape", state.get("shape"))
        if type(shape) is not tuple or len(shape) != 2:
            raise _RefusedError(f"a sparse matrix of shape {_describe(shape)}")
        try:
            self.rows, self.cols = checked_shape(shape, budget.limits)
        except ValueError as e:
            raise _RefusedError(f"sparse matrix: {e}") from None
        parts = {key: state.get(key) for key in ("data", "indices", "indptr")}
        for key, part in parts.items():
            if not isinstance(part, PickledArray):
                raise _RefusedError(f"a sparse matrix whose {key!r} is a {_describe(part)}")
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


class _PickledCsrMatrix(PickledSparseMatrix):
    """Stand-in for a scipy CSR matrix (indptr runs over rows)."""

    __slots__ = ()
    compressed_axis = 0


# --------------------------------------------------------------------------- allowed globals


class _Global:
    """An inert marker for an allowed global: what REDUCE and NEWOBJ may do with it."""

    __slots__ = ("call", "name", "new")

    def __init__(
        self,
        name: str,
        call: Callable[..., object] | None = None,
        new: Callable[[], PickledObject] | None = None,
    ):
        self.name, self.call, self.new = name, call, new


_NDARRAY = _Global("numpy.ndarray")
_OBJECT = _Global("object")


def _reconstruct(budget: _Budget, subtype: object, shape: object, typecode: object) -> object:
    if subtype is not _NDARRAY or shape != (0,) or typecode not in ("b", b"b"):
        raise _RefusedError(
            "numpy _reconstruct other than numpy's own (numpy.ndarray, (0,), b'b') "
            "(the shape comes from BUILD)"
        )
    return PickledArray()


def _frombuffer(
    budget: _Budget, buffer: object, dtype: object, shape: object, order: object
) -> object:
    if order not in ("C", "F"):
        raise _RefusedError(f"numpy _frombuffer with order {_describe(order)}")
    if not isinstance(buffer, bytes | bytearray):
        raise _RefusedError(f"numpy _frombuffer of a {_describe(buffer)}")
    return PickledArray().fill(shape, dtype, order == "F", buffer, budget)


def _scalar(budget: _Budget, dtype: object, data: object) -> object:
    return PickledArray().fill((), dtype, False, data, budget)


def _dtype(budget: _Budget, code: object, align: object = False, copy: object = False) -> object:
    if type(code) is not str or code not in _PLAIN_CODES:
        raise _RefusedError(
            f"numpy.dtype({_describe(code)}): only plain numeric types "
            f"({', '.join(sorted(_PLAIN_CODES))}) are accepted"
        )
    if not _is_flag(align) or not _is_flag(copy):
        raise _RefusedError("numpy.dtype with non-boolean align or copy")
    return PickledDtype(code)


def _set(budget: _Budget, items: object = ()) -> object:
    if type(items) not in (list, tuple):
        raise _RefusedError(f"set of a {_describe(items)} (only a list of strings)")
    return _checked_strings(set(), items, budget.limits)


def _checked_strings(target: set[str], items: list | tuple, limits: ModelFileLimits) -> set[str]:
    if len(target) + len(items) > limits.max_set_items:
        raise _RefusedError(f"a set of more than {limits.max_set_items} items")
    if not all(type(item) is str for item in items):
        raise _RefusedError("a set holding something other than strings")
    target.update(items)
    return target


def _reconstructor(budget: _Budget, cls: object, base: object, state: object) -> object:
    if not isinstance(cls, _Global) or cls.new is None or base is not _OBJECT or state is not None:
        raise _RefusedError(
            f"copy_reg._reconstructor({_describe(cls)}, {_describe(base)}, ...) (only a chumpy Ch "
            "or scipy sparse matrix from object)"
        )
    return cls.new()


def _latin1_encode(budget: _Budget, text: object, encoding: object = "utf-8") -> bytes:
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise _RefusedError(f"_codecs.encode(..., {_describe(encoding)}) (only latin1 strings)")
    budget.spend(len(text))
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], _Global]:
    """Maps each (module, name) a FLAME pickle may reference to its marker."""
    allowed = {
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _Global("numpy.dtype", call=_dtype),
        ("_codecs", "encode"): _Global("_codecs.encode", call=_latin1_encode),
        ("chumpy.ch", "Ch"): _Global("chumpy.ch.Ch", new=PickledChumpyArray),
    }
    for core in ("numpy.core", "numpy._core"):
        reconstruct = _Global(f"{core}.multiarray._reconstruct", call=_reconstruct)
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = _Global(
            f"{core}.multiarray.scalar", call=_scalar
        )
        allowed[(f"{core}.numeric", "_frombuffer")] = _Global("_frombuffer", call=_frombuffer)
    for builtins_module in ("__builtin__", "builtins"):
        allowed[(builtins_module, "object")] = _OBJECT
        allowed[(builtins_module, "set")] = _Global("set", call=_set)
    for copyreg_module in ("copy_reg", "copyreg"):
        allowed[(copyreg_module, "_reconstructor")] = _Global(
            "copy_reg._reconstructor", call=_reconstructor
        )
    for fmt, stand_in in (("csc", PickledSparseMatrix), ("csr", _PickledCsrMatrix)):
        for module in (f"scipy.sparse.{fmt}", f"scipy.sparse._{fmt}", "scipy.sparse._arrays"):
            for name in (f"{fmt}_matrix", f"{fmt}_array"):
                allowed[(module, name)] = _Global(f"scipy.sparse.{name}", new=stand_in)
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


# --------------------------------------------------------------------------- the unpickler

_REFUSED_OPCODES = [
    "PERSID",
    "BINPERSID",
    "INST",
    "OBJ",
    "EXT1",
    "EXT2",
    "EXT4",
    "LONG4",
    "NEWOBJ_EX",
    "FROZENSET",
    "NEXT_BUFFER",
    "READONLY_BUFFER",
]
_MAX_NUMBER_LINE = 64


class _RestrictedUnpickler(pickle._Unpickler):
    """Runs a pickle with an allow-list of opcodes whose object-making steps are this module's."""

    def __init__(self, data: bytes, limits: ModelFileLimits):
        super().__init__(io.BytesIO(data), encoding="latin1")
        self._size = len(data)
        self._limits = limits
        self._budget = _Budget(limits)
        self._opcodes_left = limits.max_pickle_opcodes

    def find_class(self, module: str, name: str) -> object:
        """Returns the marker of an allowed global; raises RestrictedPickleError otherwise."""
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
        raise _RefusedError(f"forbidden global {module[:100]}.{name[:100]} ({why})")

    def _number_line(self) -> bytes:
        line = self.readline()
        if len(line) > _MAX_NUMBER_LINE:
            raise _RefusedError(f"a numeric literal of {len(line):,} characters")
        return line

    def load_int(self) -> None:
        line = self._number_line()
        flags = {pickle.FALSE[1:]: False, pickle.TRUE[1:]: True}
        self.append(flags[line] if line in flags else int(line, 0))

    def load_long(self) -> None:
        self.append(int(self._number_line().rstrip(b"\nL"), 0))

    def load_float(self) -> None:
        self.append(float(self._number_line()))

    def load_get(self) -> None:
        self.append(self.memo[int(self._number_line())])

    def load_put(self) -> None:
        index = int(self._number_line())
        if index < 0:
            raise ValueError("negative PUT argument")
        self.memo[index] = self.stack[-1]

    def load_bytearray8(self) -> None:
        (size,) = struct.unpack("<Q", self.read(8))
        if size > self._size:
            raise _RefusedError(f"a bytearray of {size:,} bytes in a {self._size:,}-byte file")
        data = self.read(size)
        if len(data) != size:
            raise EOFError("truncated BYTEARRAY8")
        self.append(data)  # bytes: only the array stand-ins consume it

    def load_reduce(self) -> None:
        args = self.stack.pop()
        function = self.stack[-1]
        if not isinstance(function, _Global) or function.call is None or type(args) is not tuple:
            name = function.name if isinstance(function, _Global) else _describe(function)
            raise _RefusedError(f"calling {name}")
        try:
            self.stack[-1] = function.call(self._budget, *args)
        except TypeError as e:
            raise _RefusedError(f"calling {function.name} with {len(args)} arguments") from e

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if not isinstance(cls, _Global) or cls.new is None or args != ():
            name = cls.name if isinstance(cls, _Global) else _describe(cls)
            raise _RefusedError(f"creating a {name} object (NEWOBJ)")
        self.append(cls.new())

    def load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, PickledObject):
            name = target.name if isinstance(target, _Global) else _describe(target)
            raise _RefusedError(
                f"BUILD on {name} (only numpy arrays and dtypes, chumpy Ch and scipy sparse "
                "matrices are built)"
            )
        target.build(state, self._budget)

    def _set_items(self, target: object, items: list) -> None:
        if type(target) is not dict:
            raise _RefusedError(f"SETITEM on a {_describe(target)}")
        keys = items[::2]
        if not all(type(key) is str for key in keys):
            raise _RefusedError("a dict key that is not a string")
        target.update(zip(keys, items[1::2], strict=True))

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._set_items(self.stack[-1], [key, value])

    def load_setitems(self) -> None:
        items = self.pop_mark()
        self._set_items(self.stack[-1], items)

    def load_dict(self) -> None:
        items = self.pop_mark()
        self.append({})
        self._set_items(self.stack[-1], items)

    def load_append(self) -> None:
        value = self.stack.pop()
        self._extend(self.stack[-1], [value])

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._extend(self.stack[-1], items)

    @staticmethod
    def _extend(target: object, items: list) -> None:
        if type(target) is not list:
            raise _RefusedError(f"APPEND to a {_describe(target)}")
        target.extend(items)

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not set:
            raise _RefusedError(f"ADDITEMS to a {_describe(target)}")
        _checked_strings(target, items, self._limits)

    def _count(self, load: Callable[[_RestrictedUnpickler], None]) -> None:
        self._opcodes_left -= 1
        if self._opcodes_left < 0:
            raise _RefusedError(
                f"more than {self._limits.max_pickle_opcodes:,} opcodes "
                "(ModelFileLimits.max_pickle_opcodes)"
            )
        load(self)


def _dispatch_table() -> dict[int, Callable[[_RestrictedUnpickler], None]]:
    """Every byte maps to a counted loader: the allowed opcodes' or a refusal."""

    def refuse(name: str) -> Callable[[_RestrictedUnpickler], None]:
        def load(self: _RestrictedUnpickler) -> None:
            raise _RefusedError(f"pickle opcode {name} (not used by FLAME files)")

        return load

    def unknown(code: int) -> Callable[[_RestrictedUnpickler], None]:
        def load(self: _RestrictedUnpickler) -> None:
            raise pickle.UnpicklingError(f"invalid pickle opcode 0x{code:02x}")

        return load

    table = {code: unknown(code) for code in range(256)}
    for name in dir(pickle):
        opcode = getattr(pickle, name)
        if name.isupper() and isinstance(opcode, bytes) and len(opcode) == 1:
            loader = pickle._Unpickler.dispatch.get(opcode[0])
            if loader is None:
                continue
            loader = getattr(_RestrictedUnpickler, loader.__name__)
            table[opcode[0]] = refuse(name) if name in _REFUSED_OPCODES else loader

    def counted(load: Callable[[_RestrictedUnpickler], None]) -> Callable:
        return lambda self: self._count(load)

    return {code: counted(load) for code, load in table.items()}


_RestrictedUnpickler.dispatch = _dispatch_table()


def load_restricted_pickle(
    path: str | os.PathLike[str], origin: str, limits: ModelFileLimits = DEFAULT_LIMITS
) -> object:
    """Unpickles a FLAME model file with the restricted unpickler.

    Args:
      path: the pickle file.
      origin: names the file in errors (usually the path as a string).
      limits: the caps (file size, opcodes, elements per array, bytes of
        array data, set items).

    Returns:
      The unpickled object (for a FLAME file, a dict with str keys); numpy
      arrays, chumpy arrays and scipy sparse matrices come back as
      `PickledObject` stand-ins: call `to_array` on each value you need.

    Raises:
      RestrictedPickleError: naming `origin`, if the file exceeds a cap,
        references a forbidden global, misuses an allowed one, or cannot be
        read (truncated, corrupt or not a pickle).
    """
    try:
        size = os.stat(path).st_size
        if size > limits.max_file_bytes:
            raise _RefusedError(
                f"a file of {size:,} bytes (ModelFileLimits.max_file_bytes is "
                f"{limits.max_file_bytes:,})"
            )
        with open(path, "rb") as f:
            data = f.read(size)
        return _RestrictedUnpickler(data, limits).load()
    except _RefusedError as e:
        raise RestrictedPickleError(f"{origin}: refusing to unpickle: {e}") from None
    except Exception as e:
        raise RestrictedPickleError(
            f"{origin}: not a readable pickle (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from None


__all__ = [
    "DEFAULT_LIMITS",
    "FLAME_LARGEST_ARRAY_ELEMENTS",
    "PLAIN_DTYPES",
    "ModelFileLimits",
    "PickledArray",
    "PickledChumpyArray",
    "PickledDtype",
    "PickledObject",
    "PickledSparseMatrix",
    "RestrictedPickleError",
    "checked_shape",
    "load_restricted_pickle",
]
