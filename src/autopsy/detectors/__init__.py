"""Built-in detectors. Importing this package registers them.

Each module is one family of signatures; see :mod:`autopsy.detectors._registry` for the contract.
"""

from __future__ import annotations

from autopsy.detectors import nonfinite  # noqa: F401
from autopsy.detectors._registry import DetectorSpec, detector, get_detector, registered, unregister

__all__ = ["DetectorSpec", "detector", "get_detector", "registered", "unregister"]
