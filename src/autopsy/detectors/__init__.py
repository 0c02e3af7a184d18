"""Built-in detectors. Importing this package registers them.

Each public module here is one family of signatures (its functions decorated with
:func:`~autopsy.detectors._registry.detector`); every such module is imported, in name order, so a new
family is a new file. See :mod:`autopsy.detectors._registry` for the contract.
"""

from __future__ import annotations

import importlib
import pkgutil

from autopsy.detectors._registry import DetectorSpec, detector, get_detector, registered, unregister

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_mod}")

__all__ = ["DetectorSpec", "detector", "get_detector", "registered", "unregister"]
