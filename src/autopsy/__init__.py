"""autopsy: the postmortem of a machine-learning training run.

>>> import autopsy
>>> frame = autopsy.load("./qlora-output")        # doctest: +SKIP
>>> report = autopsy.analyze(frame)                 # doctest: +SKIP

``import autopsy`` stays light: torch, transformers, wandb and tensorboard are imported only by
the functions that need them.
"""

from __future__ import annotations

from autopsy._version import __version__
from autopsy.analysis import analyze
from autopsy.errors import AutopsyError
from autopsy.findings import Finding, Report, RunReport, Severity, findings_to_frame
from autopsy.fleet import analyze_many
from autopsy.frame import validate_frame
from autopsy.importers import load
from autopsy.runinfo import RunInfo, run_info
from autopsy.series import series, wide

__all__ = [
    "AutopsyError",
    "Finding",
    "Report",
    "RunInfo",
    "RunReport",
    "Severity",
    "__version__",
    "analyze",
    "analyze_many",
    "findings_to_frame",
    "load",
    "run_info",
    "series",
    "validate_frame",
    "wide",
]
