"""A restricted unpickler for the official FLAME `.pkl` model files.

The official FLAME files (FLAME 2020 `generic_model.pkl`, FLAME 2023, FLAME
2023 Open) are Python 2 pickles of a dict holding numpy arrays, chumpy arrays
and a scipy sparse matrix. `load_restricted_pickle` reads them, and the same
content written by Python 3 at protocols 0 to 5, without chumpy or scipy.

Design: nothing handed out while unpickling is a live numpy or scipy object or
a callable. Each allowed global is an inert marker; calling one (REDUCE),
instantiating one (NEWOBJ) or filling one in (BUILD) runs this module's own
checks and yields an inert stand-in of `uika_jax.head.pickled`: `PickledDtype`
(a dtype code), `PickledArray` (shape, dtype code, byte order, raw bytes),
`PickledChumpyArray`, `PickledSparseMatrix`. BUILD is refused on anything
else. Real arrays are made only afterwards, by `PickledObject.to_array`, from
bytes whose length matches the validated shape and dtype. The pickle runs on the standard
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

Caps (`uika_jax.head.pickled.ModelFileLimits`, each checked before what it
guards is allocated):
the file size (1 GiB), the opcodes run (100,000; an official file runs about
500), the items of a set (64), each array's declared element count
(60,276,000, 10x FLAME's largest array, 5023 x 3 x 400; a sparse matrix counts
its dense shape) and the bytes of array data decoded in all (1 GiB, so that
one string referenced many times cannot be decoded many times).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from collections.abc import Callable

from uika_jax.head.pickled import (
    DEFAULT_LIMITS,
    DecodeBudget,
    ModelFileLimits,
    PickledArray,
    PickledChumpyArray,
    PickledCsrMatrix,
    PickledDtype,
    PickledObject,
    PickledSparseMatrix,
    RefusedOperationError,
    RestrictedPickleError,
    describe_value,
    is_flag,
)
from uika_jax.safe_files import PLAIN_CODES

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


def _reconstruct(budget: DecodeBudget, subtype: object, shape: object, typecode: object) -> object:
    if subtype is not _NDARRAY or shape != (0,) or typecode not in ("b", b"b"):
        raise RefusedOperationError(
            "numpy _reconstruct other than numpy's own (numpy.ndarray, (0,), b'b') "
            "(the shape comes from BUILD)"
        )
    return PickledArray()


def _frombuffer(
    budget: DecodeBudget, buffer: object, dtype: object, shape: object, order: object
) -> object:
    if order not in ("C", "F"):
        raise RefusedOperationError(f"numpy _frombuffer with order {describe_value(order)}")
    if not isinstance(buffer, bytes | bytearray):
        raise RefusedOperationError(f"numpy _frombuffer of a {describe_value(buffer)}")
    return PickledArray().fill(shape, dtype, order == "F", buffer, budget)


def _scalar(budget: DecodeBudget, dtype: object, data: object) -> object:
    return PickledArray().fill((), dtype, False, data, budget)


def _dtype(
    budget: DecodeBudget, code: object, align: object = False, copy: object = False
) -> object:
    if type(code) is not str or code not in PLAIN_CODES:
        raise RefusedOperationError(
            f"numpy.dtype({describe_value(code)}): only plain numeric types "
            f"({', '.join(sorted(PLAIN_CODES))}) are accepted"
        )
    if not is_flag(align) or not is_flag(copy):
        raise RefusedOperationError("numpy.dtype with non-boolean align or copy")
    return PickledDtype(code)


def _set(budget: DecodeBudget, items: object = ()) -> object:
    if type(items) not in (list, tuple):
        raise RefusedOperationError(f"set of a {describe_value(items)} (only a list of strings)")
    return _checked_strings(set(), items, budget.limits)


def _checked_strings(target: set[str], items: list | tuple, limits: ModelFileLimits) -> set[str]:
    if len(target) + len(items) > limits.max_set_items:
        raise RefusedOperationError(f"a set of more than {limits.max_set_items} items")
    if not all(type(item) is str for item in items):
        raise RefusedOperationError("a set holding something other than strings")
    target.update(items)
    return target


def _reconstructor(budget: DecodeBudget, cls: object, base: object, state: object) -> object:
    if not isinstance(cls, _Global) or cls.new is None or base is not _OBJECT or state is not None:
        raise RefusedOperationError(
            f"copy_reg._reconstructor({describe_value(cls)}, {describe_value(base)}, ...) "
            "(only a chumpy Ch or scipy sparse matrix from object)"
        )
    return cls.new()


def _latin1_encode(budget: DecodeBudget, text: object, encoding: object = "utf-8") -> bytes:
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise RefusedOperationError(
            f"_codecs.encode(..., {describe_value(encoding)}) (only latin1 strings)"
        )
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
    for fmt, stand_in in (("csc", PickledSparseMatrix), ("csr", PickledCsrMatrix)):
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
        self._budget = DecodeBudget(limits)
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
        raise RefusedOperationError(f"forbidden global {module[:100]}.{name[:100]} ({why})")

    def _number_line(self) -> bytes:
        line = self.readline()
        if len(line) > _MAX_NUMBER_LINE:
            raise RefusedOperationError(f"a numeric literal of {len(line):,} characters")
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
            raise RefusedOperationError(
                f"a bytearray of {size:,} bytes in a {self._size:,}-byte file"
            )
        data = self.read(size)
        if len(data) != size:
            raise EOFError("truncated BYTEARRAY8")
        self.append(data)  # bytes: only the array stand-ins consume it

    def load_reduce(self) -> None:
        args = self.stack.pop()
        function = self.stack[-1]
        if not isinstance(function, _Global) or function.call is None or type(args) is not tuple:
            name = function.name if isinstance(function, _Global) else describe_value(function)
            raise RefusedOperationError(f"calling {name}")
        try:
            self.stack[-1] = function.call(self._budget, *args)
        except TypeError as e:
            raise RefusedOperationError(
                f"calling {function.name} with {len(args)} arguments"
            ) from e

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if not isinstance(cls, _Global) or cls.new is None or args != ():
            name = cls.name if isinstance(cls, _Global) else describe_value(cls)
            raise RefusedOperationError(f"creating a {name} object (NEWOBJ)")
        self.append(cls.new())

    def load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, PickledObject):
            name = target.name if isinstance(target, _Global) else describe_value(target)
            raise RefusedOperationError(
                f"BUILD on {name} (only numpy arrays and dtypes, chumpy Ch and scipy sparse "
                "matrices are built)"
            )
        target.build(state, self._budget)

    def _set_items(self, target: object, items: list) -> None:
        if type(target) is not dict:
            raise RefusedOperationError(f"SETITEM on a {describe_value(target)}")
        keys = items[::2]
        if not all(type(key) is str for key in keys):
            raise RefusedOperationError("a dict key that is not a string")
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
            raise RefusedOperationError(f"APPEND to a {describe_value(target)}")
        target.extend(items)

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not set:
            raise RefusedOperationError(f"ADDITEMS to a {describe_value(target)}")
        _checked_strings(target, items, self._limits)

    def _count(self, load: Callable[[_RestrictedUnpickler], None]) -> None:
        self._opcodes_left -= 1
        if self._opcodes_left < 0:
            raise RefusedOperationError(
                f"more than {self._limits.max_pickle_opcodes:,} opcodes "
                "(ModelFileLimits.max_pickle_opcodes)"
            )
        load(self)


def _dispatch_table() -> dict[int, Callable[[_RestrictedUnpickler], None]]:
    """Every byte maps to a counted loader: the allowed opcodes' or a refusal."""

    def refuse(name: str) -> Callable[[_RestrictedUnpickler], None]:
        def load(self: _RestrictedUnpickler) -> None:
            raise RefusedOperationError(f"pickle opcode {name} (not used by FLAME files)")

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
            raise RefusedOperationError(
                f"a file of {size:,} bytes (ModelFileLimits.max_file_bytes is "
                f"{limits.max_file_bytes:,})"
            )
        with open(path, "rb") as f:
            data = f.read(size)
        return _RestrictedUnpickler(data, limits).load()
    except RefusedOperationError as e:
        raise RestrictedPickleError(f"{origin}: refusing to unpickle: {e}") from None
    except Exception as e:
        raise RestrictedPickleError(
            f"{origin}: not a readable pickle (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from None


__all__ = ["load_restricted_pickle"]
