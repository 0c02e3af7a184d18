"""W&B's public API: ``autopsy analyze wandb://entity/project/run_id`` and, in a notebook, a ``wandb.Api().run()``.

The history is read unsampled with ``run.scan_history`` (``history()`` returns 500 sampled points and would hide a
single NaN step). Only the attributes ``id``, ``name``, ``config``, ``summary``, ``state`` and ``scan_history`` of a
run are used; the tests (which have no network) pass an object of that shape.
"""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

from autopsy._optional import require
from autopsy.errors import AutopsyError, InputError, UnreadableError, first_line
from autopsy.frame import empty_frame
from autopsy.importers._wandb_history import SOURCE, cells_from_dicts, history_frame, plain_summary, unwrap
from autopsy.runinfo import RunInfo, attach_runs

__all__ = ["from_api_run", "load_wandb_url"]

_URL = re.compile(r"^wandb:/{1,2}(?P<path>[^/\s]+/[^/\s]+/(?:runs/)?[^/\s]+)/?$")


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


def load_wandb_url(spec: str, *, timeout: int = 20) -> pd.DataFrame:
    """``wandb://entity/project/run_id`` -> canonical frame through ``wandb.Api()``.

    An unreachable or unauthenticated API is a one-line :class:`AutopsyError` (the run can also be
    exported and analysed as a file, or its local ``wandb/run-*`` dir analysed).
    """
    m = _URL.match(str(spec).strip())
    if not m:
        raise InputError(f"not a W&B run address: {spec!r}; expected wandb://entity/project/run_id")
    path = m.group("path").replace("/runs/", "/")
    wandb = require("wandb", purpose="read runs from the W&B API")
    try:
        api = wandb.Api(timeout=timeout)
        run_obj = api.run(path)
    except Exception as exc:
        raise UnreadableError(
            f"W&B API: cannot open run {path}: {first_line(exc)} "
            "(check the network and WANDB_API_KEY, or analyse the local wandb/run-* directory)"
        ) from None
    return from_api_run(run_obj, name=path.rsplit("/", 1)[-1])
