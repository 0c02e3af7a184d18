"""A pickle virtual machine that rebuilds values from a pickle's opcodes and never executes anything.

:func:`walk` decodes a pickle with :func:`pickletools.genops` and runs its opcodes on a small stack machine
(:class:`_Machine`, one method per opcode family, dispatched from a dict). It is the engine of
:mod:`autopsy.importers.training_args`, which opens the file and turns what comes back into plain values.

What it allows:

* plain values: dicts, lists, tuples, str, int, float, bool, None and bytes (sets and frozensets come back
  as lists), with the memo (``PUT``/``GET``/``MEMOIZE``), marks, ``POP``/``DUP`` and ``FRAME``/``PROTO``;
* global names (``GLOBAL``/``STACK_GLOBAL``/``INST``) under :data:`ALLOWED_PREFIXES` (transformers, TRL,
  accelerate, PEFT), kept as a *name* only (:class:`_Global`): "calling" one (``REDUCE``/``NEWOBJ``/
  ``NEWOBJ_EX``/``INST``/``OBJ``) gives an inert :class:`_Obj` that stores the positional arguments, and
  ``BUILD`` stores its state;
* a few inert value types that real files hold, emulated here and never called: ``torch.device`` (its
  string), torch dtypes (``"torch.bfloat16"``), ``collections.OrderedDict`` (a dict), ``builtins.set`` /
  ``frozenset`` (a list) and ``_codecs.encode(s, "latin1")`` (protocol 2's bytes). Protocol 0-2 names
  (``__builtin__.set``) are mapped as pickle's own ``fix_imports`` maps them.

What it refuses: nothing is ever called and no module named in the pickle is ever imported. Any other
global name (``builtins.exec``, ``posix.system``, ``subprocess.Popen``, torch's tensor rebuilders...), a
persistent id (tensor storage) or an extension code is added to the caller's ``refused`` set (the walk goes
on, so that the note can name everything); an opcode this machine does not know (out-of-band buffers, a
later protocol's), a malformed stream or a value of the wrong kind raises :class:`_Unreadable`.

Its limits: at most :data:`MAX_OPCODES` opcodes (the caller may pass a lower cap), no integer over
``_MAX_INT_BITS`` bits, dict keys only of types whose hashing cannot recurse, and refused names cut to
:data:`MAX_NOTE` characters. The size and depth of the rebuilt value are the caller's to bound.
"""

from __future__ import annotations

import _compat_pickle
import pickletools
from collections.abc import Callable
from typing import Any

__all__ = ["ALLOWED_PREFIXES", "MAX_NOTE", "MAX_OPCODES", "_Global", "_Obj", "_Unreadable", "walk"]

# _Global names a TrainingArguments pickle references (transformers, TRL's configs, accelerate's
# state and enums, PEFT configs). Only these module prefixes are allowed, and only as inert records.
ALLOWED_PREFIXES = ("transformers.", "trl.", "accelerate.", "peft.")

MAX_OPCODES = 200_000  # real files have under 2,000
MAX_NOTE = 160  # characters of a note, and of a refused name
_MAX_INT_BITS = 1024  # a longer integer is no config value (and could not be printed as JSON)

# torch dtypes pickle by name (``GLOBAL 'torch bfloat16'``): shown as str(dtype) would show them.
_DTYPES = frozenset(
    {
        "bfloat16",
        "bool",
        "complex128",
        "complex32",
        "complex64",
        "float16",
        "float32",
        "float64",
        "float4_e2m1fn_x2",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "int16",
        "int32",
        "int64",
        "int8",
        "qint32",
        "qint8",
        "quint2x4",
        "quint4x2",
        "quint8",
        "uint1",
        "uint16",
        "uint32",
        "uint64",
        "uint8",
    }
)
_DTYPE_ALIASES = {
    "bit": "uint1",
    "cdouble": "complex128",
    "cfloat": "complex64",
    "chalf": "complex32",
    "double": "float64",
    "float": "float32",
    "half": "float16",
    "int": "int32",
    "long": "int64",
    "short": "int16",
}
# Inert value types emulated below (never imported, never called).
_VALUE_TYPES = frozenset(
    {"torch.device", "collections.OrderedDict", "builtins.set", "builtins.frozenset", "_codecs.encode"}
)
_KEY_TYPES = (str, int, float, bool, type(None), bytes)  # hashing these cannot recurse


# The classes keep their leading underscore although training_args uses them: their names show in notes
# ("BUILD on a _Global", "holds _Obj, not TrainingArguments"), which must not change.


class _Unreadable(Exception):
    """The file is damaged, over a cap, or not what it should be: the message is the note's tail."""


class _Global:
    """A global name the pickle references. Never resolved: only its qualified name is kept."""

    __slots__ = ("name", "refused")

    def __init__(self, name: str, refused: bool) -> None:
        self.name = name
        self.refused = refused


class _Obj:
    """An object the pickle builds from an allowed class: its constructor arguments and its state."""

    __slots__ = ("args", "name", "state")

    def __init__(self, name: str, args: tuple[Any, ...]) -> None:
        self.name = name
        self.args = args
        self.state: dict[Any, Any] = {}

    def build(self, state: Any) -> None:
        """``BUILD``: a dict (or the dict of a ``(dict, slots)`` pair) becomes the object's state."""
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        if isinstance(state, dict):
            self.state.update(state)


class _Set(list[Any]):
    """A set or frozenset, kept as a list (its items need not be hashable here)."""


def _device(args: tuple[Any, ...]) -> str:
    """``torch.device(*args)`` as ``str(torch.device(...))`` shows it, without torch."""
    if len(args) == 1 and isinstance(args[0], str):
        return args[0]
    if len(args) == 2 and isinstance(args[0], str) and (args[1] is None or type(args[1]) is int):
        return args[0] if args[1] is None else f"{args[0]}:{args[1]}"
    raise _Unreadable("a torch.device with unexpected arguments")


def _call(func: Any, args: Any, what: str) -> Any:
    """``REDUCE``/``NEWOBJ``/``INST``/``OBJ``: build the inert stand-in for ``func(*args)``; call nothing."""
    if not isinstance(func, _Global):
        raise _Unreadable(f"{what} of a {type(func).__name__}, not of a class")
    if not isinstance(args, tuple):
        raise _Unreadable(f"{what} with {type(args).__name__} arguments")
    name = func.name
    if func.refused or name.startswith(ALLOWED_PREFIXES):
        return _Obj(name, args)
    if name == "torch.device":
        return _device(args)
    if name == "collections.OrderedDict":
        out: dict[Any, Any] = {}
        for pair in args[0] if args and isinstance(args[0], (list, tuple)) else ():
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], _KEY_TYPES)):
                raise _Unreadable("an OrderedDict with unexpected items")
            out[pair[0]] = pair[1]
        return out
    if name in ("builtins.set", "builtins.frozenset"):
        return _Set(args[0]) if args and isinstance(args[0], (list, tuple)) else _Set()
    if name == "_codecs.encode" and len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return args[0].encode("latin-1")
    raise _Unreadable(f"{what} of {name}")


def _resolve(module: Any, qualname: Any, refused: set[str], proto: int) -> _Global:
    """A global name: allowed (an inert record or an emulated value type) or refused (remembered)."""
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise _Unreadable("a global name that is not a string")
    if proto < 3:  # Python 2 names (``__builtin__.set``), mapped as pickle's own fix_imports maps them
        if (module, qualname) in _compat_pickle.NAME_MAPPING:
            module, qualname = _compat_pickle.NAME_MAPPING[(module, qualname)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
    name = f"{module}.{qualname}"
    if name.startswith(ALLOWED_PREFIXES) or name in _VALUE_TYPES:
        return _Global(name, refused=False)
    if module == "torch" and (qualname in _DTYPES or qualname in _DTYPE_ALIASES):
        return _Global(f"torch.{_DTYPE_ALIASES.get(qualname, qualname)}", refused=False)
    refused.add(name[:MAX_NOTE])
    return _Global(name, refused=True)


def _pop_mark(stack: list[Any], marks: list[int]) -> list[Any]:
    """The items pushed since the last MARK, taken off the stack."""
    if not marks:
        raise _Unreadable("an opcode needs a MARK that is not there")
    start = marks.pop()
    items = stack[start:]
    del stack[start:]
    return items


def _set_items(target: Any, items: list[Any]) -> None:
    if not isinstance(target, dict):
        raise _Unreadable(f"SETITEM on a {type(target).__name__}")
    if len(items) % 2:
        raise _Unreadable("SETITEMS with an odd number of items")
    for k, v in zip(items[::2], items[1::2], strict=True):
        if not isinstance(k, _KEY_TYPES):
            raise _Unreadable(f"a dict key of type {type(k).__name__}")
        target[k] = v


# Opcodes whose argument is the value to push (int, float, str or bytes).
_PUSH = frozenset(
    {
        "INT",
        "BININT",
        "BININT1",
        "BININT2",
        "LONG",
        "LONG1",
        "LONG4",
        "FLOAT",
        "BINFLOAT",
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
        "UNICODE",
        "BINUNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE8",
        "BINBYTES",
        "SHORT_BINBYTES",
        "BINBYTES8",
        "BYTEARRAY8",
    }
)
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_EMPTY: dict[str, Callable[[], Any]] = {"EMPTY_LIST": list, "EMPTY_DICT": dict, "EMPTY_TUPLE": tuple, "EMPTY_SET": _Set}


class _Machine:
    """The stack machine: its stack, memo and marks, and one method per opcode family (``(name, arg)``)."""

    __slots__ = ("marks", "memo", "proto", "refused", "stack")

    def __init__(self, refused: set[str]) -> None:
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.proto = 0
        self.refused = refused  # names the pickle references that are not allowed

    def run(self, data: bytes, max_opcodes: int) -> Any:
        """Run the pickle's opcodes up to ``STOP``; return its top value."""
        dispatch = _DISPATCH
        arg: Any  # genops types it ``Any | None``; each opcode's argument is what its kind says
        for count, (op, arg, _pos) in enumerate(pickletools.genops(data), 1):
            if count > max_opcodes:
                raise _Unreadable(f"refused: more than {max_opcodes:,} pickle opcodes")
            name = op.name
            if name == "STOP":
                if not self.stack:
                    raise _Unreadable("the pickle stops on an empty stack")
                return self.stack[-1]
            handler = dispatch.get(name)
            if handler is None:  # NEXT_BUFFER, READONLY_BUFFER (out-of-band buffers), a later protocol's
                raise _Unreadable(f"unsupported pickle opcode {name}")
            handler(self, name, arg)
        raise _Unreadable("the pickle ends before STOP")  # pragma: no cover - genops raises first

    # push, constants, protocol
    def push(self, name: str, arg: Any) -> None:
        if type(arg) is int and arg.bit_length() > _MAX_INT_BITS:
            raise _Unreadable(f"an integer of {arg.bit_length():,} bits")
        self.stack.append(bytes(arg) if isinstance(arg, bytearray) else arg)

    def constant(self, name: str, arg: Any) -> None:
        self.stack.append(_CONSTANTS[name])

    def set_proto(self, name: str, arg: Any) -> None:
        self.proto = arg

    def frame(self, name: str, arg: Any) -> None:
        pass

    # marks and the stack
    def mark(self, name: str, arg: Any) -> None:
        self.marks.append(len(self.stack))

    def pop(self, name: str, arg: Any) -> None:
        """``POP`` (an item, or a MARK just set) and ``POP_MARK``."""
        stack, marks = self.stack, self.marks
        if name == "POP" and stack and (not marks or marks[-1] < len(stack)):
            stack.pop()
        else:
            _pop_mark(stack, marks)

    def dup(self, name: str, arg: Any) -> None:
        self.stack.append(self.stack[-1])

    # the memo
    def put(self, name: str, arg: Any) -> None:
        """``PUT``, ``BINPUT``, ``LONG_BINPUT`` and ``MEMOIZE``."""
        memo = self.memo
        if name == "MEMOIZE":
            memo[len(memo)] = self.stack[-1]
            return
        if arg < 0:
            raise _Unreadable("a negative memo index")
        memo[arg] = self.stack[-1]

    def get(self, name: str, arg: Any) -> None:
        if arg not in self.memo:
            raise _Unreadable(f"memo {arg} read before it was written")
        self.stack.append(self.memo[arg])

    # containers
    def empty(self, name: str, arg: Any) -> None:
        self.stack.append(_EMPTY[name]())

    def small_tuple(self, name: str, arg: Any) -> None:
        """``TUPLE1``, ``TUPLE2``, ``TUPLE3``."""
        stack = self.stack
        n = int(name[-1])
        if len(stack) < n:
            raise _Unreadable(f"{name} on a stack of {len(stack)}")
        items = stack[-n:]
        del stack[-n:]
        stack.append(tuple(items))

    def from_mark(self, name: str, arg: Any) -> None:
        """``TUPLE``, ``LIST``, ``FROZENSET``, ``DICT``: a container of the items since the last MARK."""
        items = _pop_mark(self.stack, self.marks)
        if name == "TUPLE":
            self.stack.append(tuple(items))
        elif name == "LIST":
            self.stack.append(items)
        elif name == "FROZENSET":
            self.stack.append(_Set(items))
        else:
            d: dict[Any, Any] = {}
            _set_items(d, items)
            self.stack.append(d)

    def append(self, name: str, arg: Any) -> None:
        """``APPEND``, ``APPENDS`` (to a list) and ``ADDITEMS`` (to a set)."""
        stack = self.stack
        items = [stack.pop()] if name == "APPEND" else _pop_mark(stack, self.marks)
        target = stack[-1]
        if type(target) is not (_Set if name == "ADDITEMS" else list):
            raise _Unreadable(f"{name} on a {type(target).__name__}")
        target.extend(items)

    def set_items(self, name: str, arg: Any) -> None:
        """``SETITEM`` and ``SETITEMS``."""
        stack = self.stack
        items = stack[-2:] if name == "SETITEM" else _pop_mark(stack, self.marks)
        if name == "SETITEM":
            if len(stack) < 3:
                raise _Unreadable("SETITEM on a short stack")
            del stack[-2:]
        _set_items(stack[-1], items)

    # globals, calls, state
    def global_(self, name: str, arg: Any) -> None:
        """``GLOBAL`` (its argument is ``"module qualname"``) and ``STACK_GLOBAL`` (both on the stack)."""
        stack = self.stack
        if name == "GLOBAL":
            module, _, qualname = arg.partition(" ")
        else:
            qualname, module = stack.pop(), stack.pop()
        stack.append(_resolve(module, qualname, self.refused, self.proto))

    def reduce(self, name: str, arg: Any) -> None:
        """``REDUCE``, ``NEWOBJ`` and ``NEWOBJ_EX`` (an inert record keeps only the positional arguments)."""
        stack = self.stack
        if name == "NEWOBJ_EX":
            stack.pop()  # kwargs
        args = stack.pop()
        stack[-1] = _call(stack[-1], args, name)

    def inst(self, name: str, arg: Any) -> None:
        module, _, qualname = arg.partition(" ")
        func = _resolve(module, qualname, self.refused, self.proto)
        self.stack.append(_call(func, tuple(_pop_mark(self.stack, self.marks)), name))

    def obj(self, name: str, arg: Any) -> None:
        items = _pop_mark(self.stack, self.marks)
        if not items:
            raise _Unreadable("OBJ without a class")
        self.stack.append(_call(items[0], tuple(items[1:]), name))

    def build(self, name: str, arg: Any) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, _Obj):
            raise _Unreadable(f"BUILD on a {type(target).__name__}")
        target.build(state)

    # references to the outside: refused, the walk goes on
    def persistent_id(self, name: str, arg: Any) -> None:
        self.refused.add("a persistent id (tensor storage)")
        if name == "BINPERSID":
            self.stack.pop()
        self.stack.append(None)

    def extension(self, name: str, arg: Any) -> None:
        self.refused.add(f"extension code {arg}")
        self.stack.append(None)


_Handler = Callable[[_Machine, str, Any], None]
_DISPATCH: dict[str, _Handler] = {
    **dict.fromkeys(_PUSH, _Machine.push),
    **dict.fromkeys(_CONSTANTS, _Machine.constant),
    "PROTO": _Machine.set_proto,
    "FRAME": _Machine.frame,
    "MARK": _Machine.mark,
    "POP": _Machine.pop,
    "POP_MARK": _Machine.pop,
    "DUP": _Machine.dup,
    **dict.fromkeys(("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"), _Machine.put),
    **dict.fromkeys(("GET", "BINGET", "LONG_BINGET"), _Machine.get),
    **dict.fromkeys(_EMPTY, _Machine.empty),
    **dict.fromkeys(("TUPLE1", "TUPLE2", "TUPLE3"), _Machine.small_tuple),
    **dict.fromkeys(("TUPLE", "LIST", "FROZENSET", "DICT"), _Machine.from_mark),
    **dict.fromkeys(("APPEND", "APPENDS", "ADDITEMS"), _Machine.append),
    **dict.fromkeys(("SETITEM", "SETITEMS"), _Machine.set_items),
    **dict.fromkeys(("GLOBAL", "STACK_GLOBAL"), _Machine.global_),
    **dict.fromkeys(("REDUCE", "NEWOBJ", "NEWOBJ_EX"), _Machine.reduce),
    "INST": _Machine.inst,
    "OBJ": _Machine.obj,
    "BUILD": _Machine.build,
    **dict.fromkeys(("PERSID", "BINPERSID"), _Machine.persistent_id),
    **dict.fromkeys(("EXT1", "EXT2", "EXT4"), _Machine.extension),
}


def walk(data: bytes, refused: set[str], max_opcodes: int = MAX_OPCODES) -> Any:
    """Rebuild the pickle's top value from its opcodes, executing nothing. Refused names go to ``refused``."""
    return _Machine(refused).run(data, max_opcodes)
