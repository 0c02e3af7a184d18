"""What every importer hands back, and the options a user gives the readers (kept apart from the package's
``__init__`` so that importer modules never import the package that discovers them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from autopsy.errors import UsageError
from autopsy.runinfo import RunInfo

__all__ = ["ENGINES", "Imported", "ReadOptions"]

ENGINES = ("auto", "fast", "tbparse")  # TensorBoard readers: auto = fast, tbparse = the reference


@dataclass(frozen=True)
class ReadOptions:
    """Options a user can give the readers (each importer reads the ones it knows), checked when made."""

    engine: str = "auto"  # the TensorBoard reader

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise UsageError(f"unknown TensorBoard engine {self.engine!r}: use one of {', '.join(ENGINES)}")


@dataclass
class Imported:
    """What an importer read: a canonical frame and the runs it is about."""

    frame: pd.DataFrame
    runs: dict[str, RunInfo] = field(default_factory=dict)

    @classmethod
    def one(cls, frame: pd.DataFrame, info: RunInfo) -> Imported:
        return cls(frame=frame, runs={info.name: info})
