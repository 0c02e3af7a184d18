"""How a training console ends when it ends badly: a traceback or a kill, its kind, its exception and message, and
the allocator's numbers of an OOM. :func:`find_crash` reads the tail of a log (after its last metric line).

Kinds: ``oom``, ``device_assert``, ``disk_full``, ``killed`` (SIGKILL/SIGHUP/SIGTERM, the OOM killer, a scheduler's
kill, "death signal"), ``nccl_timeout``, ``interrupted`` (KeyboardInterrupt), ``other`` (any other exception; a
traceback whose last line was cut off is still a crash).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["CRASH_KINDS", "OOM_SIZES", "find_crash"]


CRASH_KINDS: list[tuple[str, re.Pattern[str]]] = [
    (
        "oom",
        re.compile(
            r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory|RESOURCE_EXHAUSTED|"
            r"ResourceExhaustedError|OOM when allocating|ran out of memory|"
            r"bfc_allocator\.cc:\d+\] Allocator|HIP out of memory|MPS backend out of memory"
        ),
    ),
    (
        "device_assert",
        re.compile(
            r"device-side assert|Assertion [`'].*[`'] failed|index out of bounds|"
            r"srcIndex < srcSelectDimSize|CUDA error: an illegal memory access"
        ),
    ),
    ("disk_full", re.compile(r"No space left on device|\[Errno 28\]|Disk quota exceeded")),
    (
        "killed",
        re.compile(
            r"(?m)^\W*Killed\W*$|\b\d+ Killed\s|已杀死|Signal 9 \(SIGKILL\)|\bSIGKILL\b|exit ?code:? ?(?:-9|137)\b|"
            r"oom-kill|Out of memory: Killed process|killed by signal 9|"
            # torchrun/elastic: a signal to the launcher (the terminal closed, the scheduler's kill or time limit)
            r"Received \d+ death signal|closing signal SIG(?:HUP|TERM|KILL|INT)|got signal:? ?\d+|"
            r"Signals?\.SIG(?:HUP|TERM|KILL)|received signal SIG(?:HUP|TERM|KILL)"
        ),
    ),
    (
        "nccl_timeout",
        re.compile(
            r"Watchdog caught collective|collective operation timeout|NCCL.{0,80}time(?:d )?out|"
            r"ProcessGroupNCCL.{0,120}[Tt]imeout|DistBackendError.{0,80}[Tt]imeout"
        ),
    ),
    ("interrupted", re.compile(r"KeyboardInterrupt")),
]
TRACEBACK = re.compile(r"Traceback \(most recent call last\):")
EXCEPTION_LINE = re.compile(
    r"(?m)^[\W_]*(?P<name>[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Failure|Fault))\b\W*?:?\s*(?P<msg>.*)$"
)
_UNIT = {
    "b": 1 / 2**30,
    "kib": 1 / 2**20,
    "kb": 1 / 2**20,
    "mib": 1 / 2**10,
    "mb": 1 / 2**10,
    "gib": 1.0,
    "gb": 1.0,
    "tib": 2**10,
    "tb": 2**10,
}
_SIZE = r"(?P<n>[\d.]+)\s*(?P<u>[KMGT]i?B|B)"
OOM_SIZES = {
    "tried_to_allocate_gib": re.compile(r"(?:Tried to allocate|trying to allocate)\s*" + _SIZE),
    "total_capacity_gib": re.compile(
        _SIZE + r" total capacity|total capacity of\s*" + _SIZE.replace("?P<n>", "?P<n2>").replace("?P<u>", "?P<u2>")
    ),
    "already_allocated_gib": re.compile(
        _SIZE
        + r" already allocated|allocated memory\s*"
        + _SIZE.replace("?P<n>", "?P<n2>").replace("?P<u>", "?P<u2>")
        + r" is allocated"
    ),
    "free_gib": re.compile(
        _SIZE + r" free\b|of which\s*" + _SIZE.replace("?P<n>", "?P<n2>").replace("?P<u>", "?P<u2>") + r" is free"
    ),
    "reserved_gib": re.compile(
        _SIZE + r" reserved in total|" + _SIZE.replace("?P<n>", "?P<n2>").replace("?P<u>", "?P<u2>") + r" is reserved"
    ),
}


def _gib(m: re.Match[str]) -> float | None:
    n = m.group("n") if m.group("n") is not None else m.groupdict().get("n2")
    u = m.group("u") if m.group("u") is not None else m.groupdict().get("u2")
    if n is None or u is None:
        return None
    try:
        return round(float(n) * _UNIT[u.lower()], 4)
    except (ValueError, KeyError):
        return None


def find_crash(tail: str, *, offset_line: int = 0) -> dict[str, Any] | None:
    """The crash a log ends with: kind, exception, message, sizes (OOM), and the last lines. None when clean."""
    if not tail.strip():
        return None
    found: tuple[str, re.Match[str]] | None = None
    for kind, pattern in CRASH_KINDS:
        m = pattern.search(tail)
        if m is not None:
            found = (kind, m)
            break
    exc_name = exc_msg = None
    tracebacks = list(TRACEBACK.finditer(tail))
    tb = tracebacks[-1] if tracebacks else None
    # the exception a traceback ends with (the first one after the last traceback), else the last one printed
    candidates = [em for em in EXCEPTION_LINE.finditer(tail) if not em.group(0).lstrip().startswith("File ")]
    after = [em for em in candidates if tb is not None and em.start() > tb.end()]
    pick = after[0] if after else (candidates[-1] if candidates else None)
    if pick is not None and (tb is not None or found is not None):
        exc_name, exc_msg = pick.group("name"), pick.group("msg").strip(" *`")
    if found is None and exc_name is None and tb is None:
        return None
    kind = found[0] if found else "other"
    match_line = tail.count("\n", 0, (found[1].start() if found else tb.start())) + offset_line  # type: ignore[union-attr]
    message = ""
    if found is not None:
        ls = tail.rfind("\n", 0, found[1].start()) + 1
        le = tail.find("\n", found[1].end())
        message = tail[ls : le if le >= 0 else len(tail)].strip()
    elif exc_name:
        message = f"{exc_name}: {exc_msg}".strip(": ")
    else:
        message = "a traceback whose exception line is cut off"
    lines = [ln.rstrip() for ln in tail.splitlines() if ln.strip()]
    out: dict[str, Any] = {
        "kind": kind,
        "exception": exc_name,
        "message": message[:400],
        "line": match_line + 1,
        "tail": [ln[:300] for ln in lines[-12:]],
    }
    if found is None and exc_name is None:
        out["message_cut"] = True
    if kind == "oom":
        for name, pat in OOM_SIZES.items():
            m = pat.search(tail)
            if m is not None:
                v = _gib(m)
                if v is not None:
                    out[name] = v
        out["message_cut"] = not any(k in out for k in OOM_SIZES) and "bfc_allocator" in message
    return out
