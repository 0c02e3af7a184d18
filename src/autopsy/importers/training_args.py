"""The run's config from ``training_args.bin``, read without torch and without executing the pickle.

``training_args.bin`` is what HF's Trainer writes with ``torch.save(TrainingArguments)``: a zip
container whose ``<name>/data.pkl`` record is a pickle of the arguments object. Unpickling it with
:mod:`pickle` (or ``torch.load``) would run whatever the file names, and the directories autopsy reads
are often downloaded. Importing torch just to read a few KB of config also costs more than the rest
of an analysis. So this module reads the file with the standard library only:

* :mod:`zipfile` opens the container and finds the ``*/data.pkl`` record. The record's declared size
  is checked first, then it is read with a hard cap (:data:`MAX_PICKLE_BYTES`), so a zip bomb is
  never inflated past the cap. Files over :data:`MAX_FILE_BYTES` are not opened.
* :func:`~autopsy.importers._safe_pickle.walk` runs the pickle's opcodes on a small stack machine
  that executes nothing and imports nothing (:mod:`autopsy.importers._safe_pickle` says what it
  allows, what it refuses and its limits). A global name is only a *name* there. Names under
  :data:`ALLOWED_PREFIXES` (transformers, TRL, accelerate, PEFT) become inert records: "calling" one
  (``REDUCE``/``NEWOBJ``) stores its arguments, ``BUILD`` stores its state. A few inert value types
  that real files hold are emulated, never called: ``torch.device``, torch dtypes,
  ``collections.OrderedDict``, ``builtins.set`` / ``frozenset`` and ``_codecs.encode``.
* Any other name (``builtins.exec``, ``posix.system``, ``subprocess.Popen``, torch's tensor
  rebuilders...), a persistent id (tensor storage) or an extension code makes the whole file refused,
  with a note that names what it references.
* What the walk gives back becomes *plain values* here: dicts, lists, str, int, float, bool, None. An
  enum such as ``transformers.trainer_utils.IntervalStrategy`` (one argument, no state) reduces to its
  value (``"steps"``); a dataclass such as ``AcceleratorConfig`` to the dict of its state.
* The walk is bounded: at most :data:`MAX_OPCODES` opcodes, and the rebuilt value at most
  :data:`MAX_DEPTH` levels deep and :data:`MAX_VALUES` values in all (shared references cannot
  multiply it); nested containers keep their first :data:`MAX_ITEMS` items.

:func:`read_training_args` never raises on a bad file: a damaged, hostile, oversized or legacy
(pre-zip ``torch.save``) file gives ``({}, note)`` with a one-line note. Field values are what the
earlier ``torch.load(weights_only=True)`` reader returned for the same file, except that a
``hub_token`` is masked (``"<HUB_TOKEN>"``) as ``TrainingArguments.to_dict`` masks it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from autopsy.importers._safe_pickle import ALLOWED_PREFIXES, MAX_NOTE, MAX_OPCODES, _Global, _Obj, _Unreadable, walk

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

# Real files are 5-10 KB with a 4-8 KB pickle of under 2,000 opcodes: the caps leave 100x headroom or more
# and still bound a hostile file to a fraction of a second and a few tens of MB. MAX_OPCODES (the walk's cap,
# from _safe_pickle) is read from this module at each call, so that it can be lowered here.
MAX_FILE_BYTES = 64 * 2**20  # zipfile reads the whole central directory: do not open bigger files
MAX_PICKLE_BYTES = 16 * 2**20  # the data.pkl record, declared and as inflated
MAX_DEPTH = 32  # nesting of the rebuilt value (TrainingArguments -> fsdp_config -> ... is 3-4)
MAX_VALUES = 50_000  # values rebuilt in all, counting each use of a shared (memoized) one (real: ~300)
MAX_ITEMS = 200  # items kept of a nested list or dict (as the torch-based reader did)

# torch.save's legacy (non-zip) format starts with its magic number pickled as a LONG1.
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_SCALARS = (str, int, float, bool, type(None))


def _truncate(value: Any) -> str:
    """One line of at most ``MAX_NOTE`` characters."""
    text = str(value).splitlines()[0] if str(value) else ""
    return text[:MAX_NOTE]


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
# the values


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
            top = walk(data, refused, MAX_OPCODES)
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
