"""Restricted unpickling for ground-truth files (revisitop ``gnd_<dataset>.pkl``).

A pickle is a program: ``pickle.load`` on a file from the internet runs
whatever callables the file names (``os.system``, ``builtins.eval``, any
class's ``__reduce__``). Ground-truth pickles only hold data, so they are read
here by an unpickler whose ``find_class`` resolves nothing but an allow-list
(`ALLOWED_GLOBALS`); any other global ends the load with a `UserError` naming
the file and the global, before anything it names is called.

What the allow-list covers, and why:

* plain containers, numbers, strings, bytes, ``None`` and booleans are built
  by pickle opcodes directly and need no global at all -- the official
  revisitop files (protocol 3, written by Python 3) reference no global;
* ``builtins.set`` / ``frozenset``, and ``bytes`` / ``bytearray`` limited to
  copying a byte string (protocol 0-2 pickles name the module ``__builtin__``,
  Python 2's name; an overridden ``find_class`` sees that raw name, so it is
  mapped to ``builtins`` first, as the stdlib does);
* ``_codecs.encode``, which protocol <= 2 pickles use to rebuild ``bytes``;
  only the harmless ``encode(str, "latin1")`` form is accepted;
* numpy arrays, dtypes and scalars, because older ground-truth variants
  converted from ``.mat`` files store index lists and boxes as arrays.

numpy's own unpickling helpers are NOT handed to the pickle: a dtype's pickled
state sets its internal flags, so a forged file can declare an object dtype
"plain" and have raw bytes read as object pointers (a crash or worse). The
numpy names therefore resolve to stand-ins here (`DtypeRecipe`,
`_ArrayRecipe`) that only record what the file says; after loading, each is
turned into a real array by ``numpy.frombuffer`` with a dtype checked to be a
plain bool / int / uint / float / complex / bytes / str type of the file's byte
order. Object, structured and sub-array dtypes are refused.

Python 2 era pickles store text and array buffers as 8-bit ``str``: they are
first decoded as ASCII (what Python 3 does by default) and, when that fails,
re-read with ``encoding="latin1"``, the encoding numpy documents for them.
"""

import io
import os
import pickle
import re
import struct

import numpy as np

from common.errors import UserError

PLAIN_DTYPE_CODE = re.compile(r"[biufcSU]\d+")  # 'f8', 'i8', 'b1', 'U40', ... never 'O', 'V', 'M'
PYTHON2_MODULE_NAMES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _Forbidden(Exception):
    """The pickle asks for something outside the allow-list (message: what it asked for)."""


def _text(value):
    """``value`` as str: Python 2 pickles give str, Python 3 ones sometimes bytes."""
    return value.decode("latin1") if isinstance(value, (bytes, bytearray)) else value


class DtypeRecipe:
    """Stands in for ``numpy.dtype(code, align, copy)`` + its ``__setstate__``: records code and byte order."""

    def __init__(self, code, align=False, copy=True):
        code = _text(code)
        if not isinstance(code, str) or not PLAIN_DTYPE_CODE.fullmatch(code):
            raise _Forbidden(f"numpy dtype {code}")
        self.code, self.byteorder = code, "="

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 8 or any(part is not None for part in state[2:5]):
            raise _Forbidden(f"numpy structured or sub-array dtype {self.code}")
        byteorder = _text(state[1])
        if byteorder not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError(f"bad numpy byte order {byteorder!r}")
        self.byteorder = byteorder

    def to_numpy(self) -> np.dtype:
        dtype = np.dtype(self.code)
        return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" else dtype


def _array_from_bytes(raw, dtype, shape, order: str) -> np.ndarray:
    """A fresh array of ``shape`` read from ``raw`` with the recipe ``dtype``; sizes must agree."""
    raw = raw.encode("latin1") if isinstance(raw, str) else raw
    if isinstance(raw, pickle.PickleBuffer):
        raw = raw.raw()
    if not isinstance(raw, (bytes, bytearray, memoryview)) or not isinstance(dtype, DtypeRecipe):
        raise pickle.UnpicklingError("numpy array data is not a byte string with a plain dtype")
    if not isinstance(shape, tuple) or not all(isinstance(side, int) and side >= 0 for side in shape):
        raise pickle.UnpicklingError(f"bad numpy array shape {shape!r}")
    flat = np.frombuffer(bytes(raw), dtype=dtype.to_numpy())
    return np.array(flat.reshape(shape, order=order), order=order, copy=True)


class _ArrayRecipe:
    """Stands in for numpy's ``_reconstruct(ndarray, ...)`` + ``ndarray.__setstate__``; see `materialize`."""

    def __init__(self):
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def to_numpy(self) -> np.ndarray:
        if not isinstance(self.state, tuple) or len(self.state) not in (4, 5):
            raise pickle.UnpicklingError("numpy array without a valid state")
        shape, dtype, is_fortran, raw = self.state[-4:]  # (version,) shape, dtype, fortran flag, data
        return _array_from_bytes(raw, dtype, shape, "F" if is_fortran else "C")


class _NdarrayName:
    """What ``numpy.ndarray`` resolves to: only a marker for `_reconstruct`. The real class would let a
    file call ``ndarray(shape, "O", buffer)`` directly, past the dtype check."""

    def __new__(cls, *args, **kwargs):
        raise _Forbidden("numpy.ndarray called directly")


def _reconstruct(subtype, shape, typecode):
    if subtype is not _NdarrayName:
        raise _Forbidden("numpy array subclass")
    return _ArrayRecipe()


def _scalar(dtype, raw):
    return _array_from_bytes(raw, dtype, (), "C")[()]


def _frombuffer(buffer, dtype, shape, order):
    return _array_from_bytes(buffer, dtype, shape, _text(order))


def _encode_latin1_only(text, encoding="latin1"):
    """The only use pickles make of ``_codecs.encode``: text -> bytes, latin1."""
    if not isinstance(text, str) or not isinstance(encoding, str) \
            or encoding.lower().replace("-", "") != "latin1":
        raise pickle.UnpicklingError(f"unexpected _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _byte_string_maker(kind):
    """``bytes`` / ``bytearray`` limited to what pickles call them with: (), (bytes,), (str, "latin1").
    Never ``kind(n)``, which would allocate n bytes on the file's say-so."""
    def make(*args):
        if not args:
            return kind()
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
            return kind(args[0])
        if len(args) == 2:
            return kind(_encode_latin1_only(*args))
        raise pickle.UnpicklingError(f"unexpected {kind.__name__}() arguments")
    return make


def _under_numpy_1_and_2(submodule: str, name: str, stand_in) -> dict:
    return {(f"numpy.core.{submodule}", name): stand_in, (f"numpy._core.{submodule}", name): stand_in}


ALLOWED_GLOBALS = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytes"): _byte_string_maker(bytes),
    ("builtins", "bytearray"): _byte_string_maker(bytearray),
    ("_codecs", "encode"): _encode_latin1_only,
    ("numpy", "ndarray"): _NdarrayName,
    ("numpy", "dtype"): DtypeRecipe,
    **_under_numpy_1_and_2("multiarray", "_reconstruct", _reconstruct),
    **_under_numpy_1_and_2("multiarray", "scalar", _scalar),
    **_under_numpy_1_and_2("numeric", "_frombuffer", _frombuffer),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only `ALLOWED_GLOBALS` and no persistent ids."""

    def find_class(self, module, name):
        module = PYTHON2_MODULE_NAMES.get(module, module)
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _Forbidden(f"{module}.{name}") from None

    def persistent_load(self, persistent_id):
        raise _Forbidden(f"persistent id {persistent_id!r}")


_RECIPES = (_ArrayRecipe, DtypeRecipe)


def materialize(value, done: dict):
    """``value`` with every recipe replaced by its real numpy object (lists and dicts updated in place)."""
    if id(value) in done:
        return done[id(value)]
    if isinstance(value, _RECIPES):
        done[id(value)] = value.to_numpy()
    elif isinstance(value, list):
        done[id(value)] = value
        value[:] = [materialize(item, done) for item in value]
    elif isinstance(value, dict):
        if any(isinstance(key, _RECIPES) for key in value):
            raise pickle.UnpicklingError("numpy object used as a dict key")
        done[id(value)] = value
        for key in list(value):
            value[key] = materialize(value[key], done)
    elif isinstance(value, tuple):
        done[id(value)] = tuple(materialize(item, done) for item in value)
    elif isinstance(value, (set, frozenset)) and any(isinstance(item, _RECIPES) for item in value):
        raise pickle.UnpicklingError("numpy object inside a set")
    else:
        return value
    return done[id(value)]


# What a damaged or truncated pickle can raise inside the unpickler.
_CORRUPT_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                          IndexError, KeyError, struct.error, MemoryError, RecursionError, RuntimeError,
                          OverflowError)


def safe_loads(data: bytes, source: str = "<bytes>"):
    """Unpickle ``data`` with the allow-list; ``source`` names it in error messages.

    Raises `UserError` (one line) for a forbidden global or a corrupt pickle.
    """
    try:
        try:
            loaded = _RestrictedUnpickler(io.BytesIO(data), encoding="ASCII").load()
        except UnicodeDecodeError:  # Python 2 8-bit strings (or numpy buffers): numpy's advice
            loaded = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
        return materialize(loaded, {})
    except _Forbidden as forbidden:
        raise UserError(f"refusing to unpickle '{source}': it references '{forbidden}', which a "
                        f"ground-truth file never needs (only containers, numbers, strings and plain numpy "
                        f"arrays are allowed): use the official file or re-save it with plain lists") from None
    except _CORRUPT_PICKLE_ERRORS as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise UserError(f"cannot unpickle '{source}' ({reason}): the file is damaged or not a "
                        f"pickle; download it again") from None


def load_pickle_file(path):
    """Read the file at ``path`` and unpickle it with `safe_loads` (same errors).

    A missing or unreadable file is a `UserError` too.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise UserError(f"cannot read '{path}' ({error.strerror or error}): check the path") from None
    return safe_loads(data, source=path)
