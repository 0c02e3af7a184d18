"""W&B's public API: ``autopsy analyze wandb://entity/project/run_id``, a whole project ``wandb://entity/project``
(filtered by state, tag, sweep and creation date), and, in a notebook, a ``wandb.Api().run()``.

The history is read unsampled with ``run.scan_history`` (``history()`` returns 500 sampled points and would hide a
single NaN step). Only the attributes ``id``, ``name``, ``config``, ``summary``, ``state`` and ``scan_history`` of a
run are used, and of a listed run ``id``, ``state``, ``tags``, ``sweep_name`` and ``created_at``; of the API only
``run(path)`` and ``runs(path, filters=, order=, per_page=)``. The tests (which have no network) pass an object of
that shape as ``api``.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

import pandas as pd

from autopsy._optional import require
from autopsy.errors import AutopsyError, InputError, UnreadableError, UsageError, first_line
from autopsy.frame import empty_frame
from autopsy.importers._wandb_history import SOURCE, cells_from_dicts, history_frame, plain_summary, unwrap
from autopsy.runinfo import RunInfo, attach_runs

__all__ = ["RunFilter", "from_api_run", "is_project_url", "list_project", "load_wandb_url", "parse_since"]

_URL = re.compile(r"^wandb:/{1,2}(?P<path>[^/\s]+/[^/\s]+/(?:runs/)?[^/\s]+)/?$")
_PROJECT = re.compile(r"^wandb:/{1,2}(?P<path>[^/\s]+/[^/\s]+)/?$")
STATES = ("running", "finished", "crashed", "failed", "killed", "preempting", "preempted")


def from_api_run(run_obj: Any, *, name: str | None = None, page_size: int = 10_000) -> pd.DataFrame:
    """A ``wandb.Api().run("entity/project/run_id")`` object -> the canonical frame, its run attached (a notebook's
    ``autopsy.analyze(from_api_run(api.run(...)))``)."""
    run = name or str(getattr(run_obj, "name", None) or getattr(run_obj, "id", None) or "wandb-run")
    info = RunInfo(name=run, sources=[SOURCE])
    try:
        rows = list(run_obj.scan_history(page_size=page_size))
        config = dict(run_obj.config or {})
        raw_summary = getattr(run_obj, "summary", None) or {}
        # the real HTTPSummary keeps its values in _json_dict; a plain mapping works as is
        summary = dict(getattr(raw_summary, "_json_dict", None) or raw_summary)
    except AutopsyError:
        raise
    except Exception as exc:  # the API raises requests/CommError/ValueError...: one line for a person
        raise UnreadableError(f"W&B API: cannot read run {getattr(run_obj, 'id', run)}: {first_line(exc)}") from None
    for key, value in config.items():
        if not str(key).startswith("_wandb"):
            info.config.setdefault(str(key), unwrap(value))
    info.config["wandb"] = {
        k: v
        for k, v in {
            "id": getattr(run_obj, "id", None),
            "name": getattr(run_obj, "name", None),
            "state": getattr(run_obj, "state", None),
        }.items()
        if v
    }
    info.summary.update(plain_summary({str(k): v for k, v in summary.items()}))
    state = getattr(run_obj, "state", None)
    if state in ("finished",):
        info.finished = True
    elif state in ("crashed", "failed", "killed"):
        info.finished = False
        info.notes.append(f"W&B marks this run as {state}")
    info.fill_from_config()
    r, k, v = cells_from_dicts([row for row in rows if isinstance(row, dict)])
    frame = history_frame(r, k, v, run=run, source=SOURCE, info=info) if len(r) else empty_frame()
    return attach_runs(frame, {run: info})


def _api(api: Any, timeout: int, what: str) -> Any:
    if api is not None:
        return api
    wandb = require("wandb", purpose="read runs from the W&B API")
    try:
        return wandb.Api(timeout=timeout)
    except Exception as exc:
        raise UnreadableError(
            f"W&B API: cannot open {what}: {first_line(exc)} "
            "(check the network and WANDB_API_KEY, or analyse the local wandb/run-* directory)"
        ) from None


def load_wandb_url(spec: str, *, timeout: int = 20, api: Any = None) -> pd.DataFrame:
    """``wandb://entity/project/run_id`` -> canonical frame through ``wandb.Api()`` (or ``api``, an object of its
    shape).

    An unreachable or unauthenticated API is a one-line :class:`AutopsyError` (the run can also be
    exported and analysed as a file, or its local ``wandb/run-*`` dir analysed).
    """
    m = _URL.match(str(spec).strip())
    if not m:
        raise InputError(f"not a W&B run address: {spec!r}; expected wandb://entity/project/run_id")
    path = m.group("path").replace("/runs/", "/")
    try:
        run_obj = _api(api, timeout, f"run {path}").run(path)
    except AutopsyError:
        raise
    except Exception as exc:
        raise UnreadableError(
            f"W&B API: cannot open run {path}: {first_line(exc)} "
            "(check the network and WANDB_API_KEY, or analyse the local wandb/run-* directory)"
        ) from None
    return from_api_run(run_obj, name=path.rsplit("/", 1)[-1])


# --- a whole project ---------------------------------------------------------------------------------


def is_project_url(spec: str) -> bool:
    """True for ``wandb://entity/project`` (a project, not one run)."""
    return bool(_PROJECT.match(str(spec).strip()))


def parse_since(text: str | dt.datetime | None) -> dt.datetime | None:
    """``--since 2024-05-01`` (or an ISO date-time) -> an aware datetime (UTC when no zone is given)."""
    if text is None or text == "":
        return None
    if isinstance(text, dt.datetime):
        when = text
    else:
        try:
            when = dt.datetime.fromisoformat(str(text).strip().replace("Z", "+00:00"))
        except ValueError:
            raise UsageError(
                f"--since takes a date or date-time (2024-05-01, 2024-05-01T12:00), got {text!r}"
            ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.timezone.utc)


@dataclass(frozen=True)
class RunFilter:
    """Which runs of a project to analyse: any of ``states``, any of ``tags``, one ``sweep``, created ``since``."""

    states: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    sweep: str | None = None
    since: dt.datetime | None = None

    def __post_init__(self) -> None:
        bad = [s for s in self.states if s not in STATES]
        if bad:
            raise UsageError(f"unknown W&B run state {bad[0]!r}: use {', '.join(STATES)}")

    def query(self) -> dict[str, Any] | None:
        """The MongoDB-style filter of W&B's ``Api.runs`` (the server filters; :meth:`keeps` checks again)."""
        parts: list[dict[str, Any]] = []
        if self.states:
            parts.append({"state": {"$in": list(self.states)}})
        if self.tags:
            parts.append({"tags": {"$in": list(self.tags)}})
        if self.sweep:
            parts.append({"sweep": self.sweep})
        if self.since is not None:
            parts.append({"createdAt": {"$gte": self.since.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")}})
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else {"$and": parts}

    def keeps(self, run: Any) -> bool:
        """Whether a listed run passes every filter (read from the run's own attributes)."""
        if self.states and getattr(run, "state", None) not in self.states:
            return False
        if self.tags and not set(getattr(run, "tags", None) or ()) & set(self.tags):
            return False
        if self.sweep and self.sweep not in (
            getattr(run, "sweep_name", None),
            getattr(getattr(run, "sweep", None), "id", None),
        ):
            return False
        if self.since is not None:
            created = _created(run)
            if created is None or created < self.since:
                return False
        return True


def _created(run: Any) -> dt.datetime | None:
    """A listed run's creation time (None when absent or unreadable)."""
    value = getattr(run, "created_at", None)
    if not value:
        return None
    try:
        return parse_since(value if isinstance(value, dt.datetime) else str(value))
    except UsageError:
        return None


def list_project(
    spec: str, *, filters: RunFilter | None = None, api: Any = None, timeout: int = 20, per_page: int = 200
) -> list[str]:
    """``wandb://entity/project`` -> the addresses ``wandb://entity/project/<id>`` of its runs that pass ``filters``,
    oldest first (then by id: the order does not depend on the server's)."""
    m = _PROJECT.match(str(spec).strip())
    if not m:
        raise InputError(f"not a W&B project address: {spec!r}; expected wandb://entity/project")
    path = m.group("path")
    filters = filters or RunFilter()
    try:
        listed = _api(api, timeout, f"project {path}").runs(
            path, filters=filters.query(), order="+created_at", per_page=per_page
        )
        kept = [(str(getattr(r, "created_at", "") or ""), str(r.id)) for r in listed if filters.keeps(r)]
    except AutopsyError:
        raise
    except Exception as exc:  # requests/CommError/ValueError...: one line for a person
        raise UnreadableError(
            f"W&B API: cannot list project {path}: {first_line(exc)} "
            "(check the network and WANDB_API_KEY, or analyse the local wandb/run-* directories)"
        ) from None
    return [f"wandb://{path}/{run_id}" for _, run_id in sorted(kept)]
