"""From the paths a person names to the runs a worker analyses: one :class:`Task` per run, in a fixed order.

A local path is grouped into runs by :func:`autopsy.importers.discover.find_runs` (the same grouping as
``autopsy.load``); an fsspec URL by listing its objects (:mod:`autopsy.fleet.remote`); ``wandb://entity/project``
by listing the project's runs (:func:`autopsy.importers.wandb_api.list_project`). Every input is expanded, and
every flag checked, before any run is read: a typo costs nothing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autopsy.analysis import Plan, make_plan
from autopsy.errors import InputError
from autopsy.fleet.remote import MIRROR_LIMIT, RemoteRun, is_url, list_runs
from autopsy.importers import ReadOptions
from autopsy.importers.discover import RunFiles, find_runs
from autopsy.importers.wandb_api import RunFilter, is_project_url, list_project

__all__ = ["Job", "Task", "credentials_env", "expand"]

_COLLAPSED = re.compile(r"^(?P<protocol>[a-zA-Z][a-zA-Z0-9+.-]*):/(?!/)")  # a CLI Path turns s3://b into s3:/b


@dataclass(frozen=True)
class Job:
    """What every task of one analysis shares (small and picklable: it travels with each task)."""

    select: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()
    params: tuple[tuple[str, Any], ...] = ()
    engine: str = "auto"
    keep_frames: bool = False
    api: Any = None  # an object of wandb.Api()'s shape (tests); None: wandb.Api() on the worker
    mirror_limit: int = MIRROR_LIMIT
    env: tuple[tuple[str, str], ...] = ()  # the caller's storage credentials, for the processes of a local pool
    cwd: str = ""  # the caller's directory: relative paths are read from there on a worker that runs elsewhere

    @property
    def options(self) -> ReadOptions:
        return ReadOptions(engine=self.engine)

    def plan(self) -> Plan:
        """The checked plan (made once per process and cached)."""
        key = repr((self.select, self.ignore, self.params))
        plan = _PLANS.get(key)
        if plan is None:
            plan = _PLANS[key] = make_plan(self.select, self.ignore, dict(self.params))
        return plan


_PLANS: dict[str, Plan] = {}
_CREDENTIALS = ("AWS_", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_")


def credentials_env() -> tuple[tuple[str, str], ...]:
    """The storage credentials of this process' environment: a local pool's processes, forked from a server started
    earlier, would otherwise see the environment of that moment (never sent to a remote cluster)."""
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_CREDENTIALS)))


@dataclass(frozen=True)
class Task:
    """One run to analyse: its place in the output, the input it came from, and where its files are."""

    index: int
    source: int  # which input path it came from
    name: str
    files: RunFiles | None = None  # a local run
    remote: RemoteRun | None = None  # a run in object storage
    wandb: str | None = None  # a W&B run address

    @property
    def where(self) -> str:
        if self.remote is not None:
            return f"{self.remote.base}/{self.remote.root}".rstrip("/")
        if self.wandb is not None:
            return self.wandb
        return str(self.files.root) if self.files is not None else self.name


@dataclass
class Inputs:
    """The tasks of every input path, and the inputs as a person named them."""

    tasks: list[Task] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)


def normalize(spec: str | os.PathLike[str]) -> str:
    """The input as text; ``s3:/bucket`` (a URL squeezed by a CLI path) back to ``s3://bucket``; ``file://`` to a
    path (a local or shared file system is read in place)."""
    text = os.fspath(spec)
    if text.startswith("file://"):
        return text[len("file://") :] or "/"
    m = _COLLAPSED.match(text)
    if m and len(m.group("protocol")) > 1 and not Path(text).exists():
        return f"{m.group('protocol')}://{text[m.end() :]}"
    return text


def expand(
    paths: list[str | os.PathLike[str]] | tuple[str | os.PathLike[str], ...],
    *,
    storage_options: dict[str, Any] | None = None,
    wandb_filter: RunFilter | None = None,
    api: Any = None,
) -> Inputs:
    """Every input path expanded into its runs (one :class:`Task` each), in input order then discovery order."""
    out = Inputs()
    for source, raw in enumerate(paths):
        spec = normalize(raw)
        out.labels.append(spec)
        if spec.startswith("wandb:"):
            urls = list_project(spec, filters=wandb_filter, api=api) if is_project_url(spec) else [spec]
            for url in urls:
                out.tasks.append(Task(index=len(out.tasks), source=source, name=url.rsplit("/", 1)[-1], wandb=url))
        elif is_url(spec):
            for name, remote in list_runs(spec, storage_options=storage_options):
                out.tasks.append(Task(index=len(out.tasks), source=source, name=name, remote=remote))
        else:
            if not Path(spec).exists():
                raise InputError(f"no such file or directory: {spec}")
            for files in find_runs(spec):
                out.tasks.append(Task(index=len(out.tasks), source=source, name=files.name, files=files))
    return out
