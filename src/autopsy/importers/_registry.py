"""The registry of importers: every public module of ``autopsy.importers`` that declares ``KIND`` (see the package's
documentation for what an importer declares), found at run time, in claim order."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from pathlib import Path
from types import ModuleType

__all__ = ["importer", "importers", "priorities"]

_PACKAGE = __name__.rpartition(".")[0]  # autopsy.importers: its modules are listed from its directory


@functools.cache
def importers() -> tuple[ModuleType, ...]:
    """The importer modules, in claim order (PRIORITY, then KIND)."""
    found = []
    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if mod.name.startswith("_") or mod.name == "discover":
            continue
        module = importlib.import_module(f"{_PACKAGE}.{mod.name}")
        if hasattr(module, "KIND"):
            for attr in ("PRIORITY", "claims", "read"):
                if not hasattr(module, attr):
                    raise TypeError(f"importer {module.__name__} declares KIND but no {attr}")
            found.append(module)
    kinds = [m.KIND for m in found]
    dup = {k for k in kinds if kinds.count(k) > 1}
    if dup:
        raise TypeError(f"importer kind(s) declared twice: {', '.join(sorted(dup))}")
    return tuple(sorted(found, key=lambda m: (m.PRIORITY, m.KIND)))


def importer(kind: str) -> ModuleType:
    for module in importers():
        if kind == module.KIND:
            return module
    raise KeyError(kind)


def priorities() -> dict[str, int]:
    """Source name -> its priority when sources tie (each importer's SOURCE, default its KIND)."""
    out: dict[str, int] = {}
    for m in importers():
        out.setdefault(getattr(m, "SOURCE", m.KIND), m.PRIORITY)
    return out
