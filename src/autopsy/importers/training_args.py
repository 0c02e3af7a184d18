"""The run's config from ``training_args.bin``, read without torch and without executing the pickle.

``training_args.bin`` is what HF's Trainer writes with ``torch.save(TrainingArguments)``: a zip
container whose ``<name>/data.pkl`` record is a pickle of the arguments object. Unpickling it with
:mod:`pickle` (or ``torch.load``) would run whatever the file names, and the directories autopsy reads
are often downloaded. Importing torch just to read a few KB of config also costs more than the rest
of an analysis. So this module reads the file with the standard library only:

* :mod:`zipfile` opens the container and finds the ``*/data.pkl`` record. The record's declared size
  is checked first, then it is read with a hard cap (:data:`MAX_PICKLE_BYTES`), so a zip bomb is
  never inflated past the cap. Files over :data:`MAX_FILE_BYTES` are not opened.
* :func:`pickletools.genops` decodes the pickle's opcodes and a small stack machine here rebuilds
  *plain values* from them: dicts, lists, tuples, str, int, float, bool, None. Nothing is ever
  called, and no module named in the file is ever imported.
* A global name (``GLOBAL``/``STACK_GLOBAL``/``INST``) is only a *name* here. Names under
  :data:`ALLOWED_PREFIXES` (transformers, TRL, accelerate, PEFT) become inert records: "calling" one
  (``REDUCE``/``NEWOBJ``) stores its arguments, ``BUILD`` stores its state. An enum such as
  ``transformers.trainer_utils.IntervalStrategy`` (one argument, no state) reduces to its value
  (``"steps"``); a dataclass such as ``AcceleratorConfig`` to the dict of its state. A few inert value
  types that real files hold are emulated here, never called: ``torch.device`` (its string),
  torch dtypes (``"torch.bfloat16"``), ``collections.OrderedDict`` (a dict), ``builtins.set`` /
  ``frozenset`` (a list) and ``_codecs.encode(s, "latin1")`` (protocol 2's bytes).
* Any other name (``builtins.exec``, ``posix.system``, ``subprocess.Popen``, torch's tensor
  rebuilders...), a persistent id (tensor storage) or an extension code makes the whole file refused,
  with a note that names what it references.
* The walk is bounded: at most :data:`MAX_OPCODES` opcodes, and the rebuilt value at most
  :data:`MAX_DEPTH` levels deep and :data:`MAX_VALUES` values in all (shared references cannot
  multiply it); nested containers keep their first :data:`MAX_ITEMS` items.

:func:`read_training_args` never raises on a bad file: a damaged, hostile, oversized or legacy
(pre-zip ``torch.save``) file gives ``({}, note)`` with a one-line note. Field values are what the
earlier ``torch.load(weights_only=True)`` reader returned for the same file, except that a
``hub_token`` is masked (``"<HUB_TOKEN>"``) as ``TrainingArguments.to_dict`` masks it.
"""

from __future__ import annotations

import _compat_pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Any

__all__ = [
    "ALLOWED_PREFIXES",
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_ITEMS",
    "MAX_OPCODES",
    "MAX_PICKLE_BYTES",
    "MAX_VALUES",
    "read_training_args",
]

# Global names a TrainingArguments pickle references (transformers, TRL's configs, accelerate's
# state and enums, PEFT configs). Only these module prefixes are allowed, and only as inert records.
ALLOWED_PREFIXES = ("transformers.", "trl.", "accelerate.", "peft.")

# Real files are 5-10 KB with a 4-8 KB pickle of under 2,000 opcodes: the caps leave 100x headroom or more
# and still bound a hostile file to a fraction of a second and a few tens of MB.
MAX_FILE_BYTES = 64 * 2**20  # zipfile reads the whole central directory: do not open bigger files
MAX_PICKLE_BYTES = 16 * 2**20  # the data.pkl record, declared and as inflated
MAX_OPCODES = 200_000
MAX_DEPTH = 32  # nesting of the rebuilt value (TrainingArguments -> fsdp_config -> ... is 3-4)
MAX_VALUES = 50_000  # values rebuilt in all, counting each use of a shared (memoized) one (real: ~300)
MAX_ITEMS = 200  # items kept of a nested list or dict (as the torch-based reader did)

# torch.save's legacy (non-zip) format starts with its magic number pickled as a LONG1.
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_MAX_INT_BITS = 1024  # a longer integer is no config value (and could not be printed as JSON)
_MAX_NOTE = 160

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
_SCALARS = (str, int, float, bool, type(None))
_KEY_TYPES = (str, int, float, bool, type(None), bytes)  # hashing these cannot recurse


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


def _truncate(value: Any) -> str:
    """One line of at most ``_MAX_NOTE`` characters."""
    text = str(value).splitlines()[0] if str(value) else ""
    return text[:_MAX_NOTE]


# --------------------------------------------------------------------------------------------------
# the container


def _read_pickle_bytes(path: Path) -> bytes:
    """The bytes of the ``*/data.pkl`` record of a torch zip file, read within the caps."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise _Unreadable(f"could not be opened ({type(exc).__name__}: {_truncate(exc.strerror or exc)})") from None
    if size > MAX_FILE_BYTES:
        raise _Unreadable(f"refused: {size:,} bytes, too large for a training_args.bin (cap {MAX_FILE_BYTES:,})")
    if head[:1] == b"\x80" and head[2:14] == _LEGACY_MAGIC:
        raise _Unreadable("legacy torch format: not read")
    if not head.startswith(b"PK"):
        what = "empty" if not head else "a bare pickle" if head[:1] == b"\x80" else "garbage"
        raise _Unreadable(f"not a torch zip file ({what}): not read")
    try:
        with zipfile.ZipFile(path) as zf:
            member = next(
                (i for i in zf.infolist() if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1), None
            )
            if member is None:
                raise _Unreadable("a zip file without a <name>/data.pkl record: not a torch file")
            if member.file_size > MAX_PICKLE_BYTES:
                raise _Unreadable(
                    f"refused: its pickle declares {member.file_size:,} bytes "
                    f"(cap {MAX_PICKLE_BYTES:,}; real ones are a few KB)"
                )
            with zf.open(member) as record:
                data = record.read(MAX_PICKLE_BYTES + 1)  # inflates at most the cap (+1 byte to see it)
    except _Unreadable:
        raise
    except Exception as exc:
        raise _Unreadable(f"not a readable torch file ({type(exc).__name__}: {_truncate(exc)})") from None
    if len(data) > MAX_PICKLE_BYTES:
        raise _Unreadable(f"refused: its pickle inflates past {MAX_PICKLE_BYTES:,} bytes")
    return data


# --------------------------------------------------------------------------------------------------
# the pickle


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
    refused.add(name[:_MAX_NOTE])
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


def _walk(data: bytes, refused: set[str]) -> Any:
    """Rebuild the pickle's top value from its opcodes, executing nothing. Refused names go to ``refused``."""
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    proto = 0
    arg: Any  # genops types it ``Any | None``; each opcode's argument is what its kind says
    for count, (op, arg, _pos) in enumerate(pickletools.genops(data), 1):
        if count > MAX_OPCODES:
            raise _Unreadable(f"refused: more than {MAX_OPCODES:,} pickle opcodes")
        name = op.name
        if name in _PUSH:
            if type(arg) is int and arg.bit_length() > _MAX_INT_BITS:
                raise _Unreadable(f"an integer of {arg.bit_length():,} bits")
            stack.append(bytes(arg) if isinstance(arg, bytearray) else arg)
        elif name in _CONSTANTS:
            stack.append(_CONSTANTS[name])
        elif name == "PROTO":
            proto = arg
        elif name == "FRAME":
            pass
        elif name == "STOP":
            if not stack:
                raise _Unreadable("the pickle stops on an empty stack")
            return stack[-1]
        elif name == "MARK":
            marks.append(len(stack))
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name == "EMPTY_SET":
            stack.append(_Set())
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            if len(stack) < n:
                raise _Unreadable(f"{name} on a stack of {len(stack)}")
            items = stack[-n:]
            del stack[-n:]
            stack.append(tuple(items))
        elif name == "TUPLE":
            stack.append(tuple(_pop_mark(stack, marks)))
        elif name == "LIST":
            stack.append(_pop_mark(stack, marks))
        elif name == "FROZENSET":
            stack.append(_Set(_pop_mark(stack, marks)))
        elif name == "DICT":
            d: dict[Any, Any] = {}
            _set_items(d, _pop_mark(stack, marks))
            stack.append(d)
        elif name in ("APPEND", "APPENDS", "ADDITEMS"):
            items = [stack.pop()] if name == "APPEND" else _pop_mark(stack, marks)
            target = stack[-1]
            if type(target) is not (_Set if name == "ADDITEMS" else list):
                raise _Unreadable(f"{name} on a {type(target).__name__}")
            target.extend(items)
        elif name in ("SETITEM", "SETITEMS"):
            items = stack[-2:] if name == "SETITEM" else _pop_mark(stack, marks)
            if name == "SETITEM":
                if len(stack) < 3:
                    raise _Unreadable("SETITEM on a short stack")
                del stack[-2:]
            _set_items(stack[-1], items)
        elif name == "POP":
            if stack and (not marks or marks[-1] < len(stack)):
                stack.pop()
            else:
                _pop_mark(stack, marks)
        elif name == "POP_MARK":
            _pop_mark(stack, marks)
        elif name == "DUP":
            stack.append(stack[-1])
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            if arg < 0:
                raise _Unreadable("a negative memo index")
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise _Unreadable(f"memo {arg} read before it was written")
            stack.append(memo[arg])
        elif name == "GLOBAL":
            module, _, qualname = arg.partition(" ")
            stack.append(_resolve(module, qualname, refused, proto))
        elif name == "STACK_GLOBAL":
            qualname, module = stack.pop(), stack.pop()
            stack.append(_resolve(module, qualname, refused, proto))
        elif name in ("REDUCE", "NEWOBJ"):
            args = stack.pop()
            stack[-1] = _call(stack[-1], args, name)
        elif name == "NEWOBJ_EX":
            stack.pop()  # kwargs: an inert record keeps only the positional arguments
            args = stack.pop()
            stack[-1] = _call(stack[-1], args, name)
        elif name == "INST":
            module, _, qualname = arg.partition(" ")
            stack.append(_call(_resolve(module, qualname, refused, proto), tuple(_pop_mark(stack, marks)), name))
        elif name == "OBJ":
            items = _pop_mark(stack, marks)
            if not items:
                raise _Unreadable("OBJ without a class")
            stack.append(_call(items[0], tuple(items[1:]), name))
        elif name == "BUILD":
            state = stack.pop()
            target = stack[-1]
            if not isinstance(target, _Obj):
                raise _Unreadable(f"BUILD on a {type(target).__name__}")
            target.build(state)
        elif name in ("PERSID", "BINPERSID"):
            refused.add("a persistent id (tensor storage)")
            if name == "BINPERSID":
                stack.pop()
            stack.append(None)
        elif name in ("EXT1", "EXT2", "EXT4"):
            refused.add(f"extension code {arg}")
            stack.append(None)
        else:  # NEXT_BUFFER, READONLY_BUFFER (out-of-band buffers) and whatever a later protocol adds
            raise _Unreadable(f"unsupported pickle opcode {name}")
    raise _Unreadable("the pickle ends before STOP")  # pragma: no cover - genops raises first


class _Plain:
    """Converts the rebuilt value to plain Python values within the depth and size caps."""

    def __init__(self) -> None:
        self.left = MAX_VALUES

    def __call__(self, v: Any, depth: int = 0) -> Any:
        self.left -= 1
        if self.left < 0:
            raise _Unreadable(f"refused: more than {MAX_VALUES:,} values")
        if depth > MAX_DEPTH:
            raise _Unreadable(f"refused: nested deeper than {MAX_DEPTH} levels")
        if isinstance(v, _SCALARS):
            return v
        if isinstance(v, _Obj):
            if not v.state and len(v.args) == 1:  # an enum member: its value
                return self(v.args[0], depth + 1)
            return {str(k): self(x, depth + 1) for k, x in v.state.items()}
        if isinstance(v, _Global):  # a class or dtype used as a value
            return v.name
        if isinstance(v, dict):
            return {str(k): self(x, depth + 1) for k, x in list(v.items())[:MAX_ITEMS]}
        if isinstance(v, (list, tuple)):
            return [self(x, depth + 1) for x in v[:MAX_ITEMS]]
        return str(v)  # bytes: shown as the torch-based reader showed them


def _is_secret(key: str) -> bool:
    """``hub_token``, ``push_to_hub_token``, ``token``: credentials a report must never show."""
    return key == "token" or key.endswith("hub_token")


def _masked(key: str) -> str:
    """The placeholder ``TrainingArguments.to_dict`` shows in place of a token (``<HUB_TOKEN>``)."""
    return f"<{key.upper()}>"


def read_training_args(path: Path) -> tuple[dict[str, Any], str | None]:
    """Return (config, note): the TrainingArguments fields of ``path``, or ``{}`` and why not.

    The config's keys are the arguments' field names (enums as their values: ``"steps"``,
    ``"cosine"``, ``"adamw_torch"``), plus ``"_trainer_args_class"``, the qualified class name
    (``"transformers.training_args.TrainingArguments"``, ``"trl.trainer.sft_config.SFTConfig"``).
    Tokens (``hub_token``...) are masked as ``TrainingArguments.to_dict`` masks them. The note is a
    single line, ``None`` when the file was read.
    """
    path = Path(path)
    refused: set[str] = set()
    try:
        data = _read_pickle_bytes(path)
        try:
            top = _walk(data, refused)
        except _Unreadable:
            if refused:  # a hostile file that is also malformed: the names are the better note
                top = None
            else:
                raise
        except Exception as exc:
            if not refused:
                raise _Unreadable(f"could not be read safely ({type(exc).__name__}: {_truncate(exc)})") from None
            top = None
        if refused:
            names = ", ".join(sorted(refused)[:5]) + (f" and {len(refused) - 5} more" if len(refused) > 5 else "")
            return {}, f"{path}: refused to load: it references {names} (not on the allowlist)"
        plain = _Plain()(top)
    except _Unreadable as exc:
        return {}, f"{path}: {exc}"
    if not isinstance(plain, dict):
        kind = top.name if isinstance(top, _Obj) else type(top).__name__
        return {}, f"{path}: holds {kind}, not TrainingArguments"
    config = {k: _masked(k) if v is not None and _is_secret(k) else v for k, v in plain.items() if k[:1] != "_"}
    config["_trainer_args_class"] = top.name if isinstance(top, _Obj) else type(top).__name__
    return config, None
