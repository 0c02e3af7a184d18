"""``wandb://entity/project``: every run of a W&B project, filtered by state, tag, sweep and creation date, analysed
in parallel. The network is unreachable here: the tests pass an object of the public API's shape (``runs(path,
filters=, order=, per_page=)``, ``run(path)``; runs with ``id``, ``state``, ``tags``, ``sweep_name``, ``created_at``,
``config``, ``summary``, ``scan_history``). It travels to the worker processes, as ``wandb.Api()`` would be made
there."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from autopsy.errors import InputError, UnreadableError, UsageError
from autopsy.fleet import analyze_many
from autopsy.importers.wandb_api import RunFilter, list_project, parse_since
from autopsy.report import render
from helpers.wandb_runs import nan151_rows


def _healthy_rows(steps: int = 200) -> list[dict[str, Any]]:
    return nan151_rows(max_steps=steps, nan_from=steps + 1)


class FakeRun:
    def __init__(self, id: str, state: str, created_at: str, *, tags=(), sweep=None, rows=None, lr=1e-4, broken=False):
        self.id = self.name = id
        self.state, self.created_at, self.tags, self.sweep_name = state, created_at, list(tags), sweep
        self.config = {"learning_rate": lr, "max_steps": 200, "logging_steps": 1}
        self.summary = {"train/global_step": 200}
        self._rows, self._broken = rows if rows is not None else _healthy_rows(), broken

    def scan_history(self, page_size: int = 1000):
        if self._broken:
            raise ConnectionError("read timed out\nwith a second line")
        return iter(self._rows)


class FakeApi:
    """wandb.Api()'s shape; the server-side filter is ignored (autopsy checks every listed run itself)."""

    def __init__(self, runs: list[FakeRun], *, fail: bool = False) -> None:
        self._runs = {r.id: r for r in runs}
        self.fail = fail
        self.queries: list[dict[str, Any]] = []

    def runs(self, path: str, filters=None, order: str = "+created_at", per_page: int = 50):
        if self.fail:
            raise RuntimeError("Could not connect to api.wandb.ai")
        self.queries.append({"path": path, "filters": filters, "order": order})
        return list(reversed(list(self._runs.values())))  # the server's order is not the report's

    def run(self, path: str) -> FakeRun:
        return self._runs[path.rsplit("/", 1)[-1]]


def _project() -> FakeApi:
    return FakeApi([
        FakeRun("a1", "finished", "2024-05-01T10:00:00Z", tags=["baseline"], sweep="sw1"),
        FakeRun("b2", "crashed", "2024-05-02T10:00:00Z", tags=["lr-sweep"], sweep="sw1", rows=nan151_rows(), lr=3e-3),
        FakeRun("c3", "failed", "2024-05-03T10:00:00Z", tags=["lr-sweep"], sweep="sw2", rows=nan151_rows(), lr=3e-3),
        FakeRun("d4", "finished", "2024-05-04T10:00:00Z", tags=["lr-sweep"], sweep="sw2"),
        FakeRun("e5", "killed", "2024-05-05T10:00:00Z"),
    ])


@pytest.mark.parametrize(
    ("flt", "ids", "query"),
    [
        (RunFilter(), ["a1", "b2", "c3", "d4", "e5"], None),
        (RunFilter(states=("crashed", "failed")), ["b2", "c3"], {"state": {"$in": ["crashed", "failed"]}}),
        (RunFilter(tags=("lr-sweep",)), ["b2", "c3", "d4"], {"tags": {"$in": ["lr-sweep"]}}),
        (RunFilter(sweep="sw2"), ["c3", "d4"], {"sweep": "sw2"}),
        (RunFilter(since=parse_since("2024-05-03")), ["c3", "d4", "e5"], {"createdAt": {"$gte": "2024-05-03T00:00:00"}}),
        (
            RunFilter(states=("finished",), tags=("lr-sweep",)),
            ["d4"],
            {"$and": [{"state": {"$in": ["finished"]}}, {"tags": {"$in": ["lr-sweep"]}}]},
        ),
    ],
)
def test_project_listing_applies_each_filter(flt, ids, query):
    api = _project()
    got = list_project("wandb://team/proj", filters=flt, api=api)
    assert got == [f"wandb://team/proj/{i}" for i in ids]  # oldest first, whatever the server's order
    assert api.queries == [{"path": "team/proj", "filters": query, "order": "+created_at"}]


def test_filters_are_checked_before_anything_is_listed():
    with pytest.raises(UsageError, match="unknown W&B run state 'crashd'"):
        RunFilter(states=("crashd",))
    with pytest.raises(UsageError, match="--since"):
        parse_since("last tuesday")
    assert parse_since("2024-05-01T12:30:00+02:00") == dt.datetime(2024, 5, 1, 10, 30, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_project_is_analysed_run_by_run(jobs):
    api = _project()
    report = analyze_many(["wandb://team/proj"], api=api, jobs=jobs, wandb_filter=RunFilter(tags=("lr-sweep",)))
    assert [r.run for r in report.runs] == ["b2", "c3", "d4"]
    status = dict(zip([r.run for r in report.runs], [v[0] for v in report.verdicts]))
    assert status["b2"] == status["c3"] == "failed" and status["d4"] != "failed"
    for r in report.runs:
        assert r.path == "" or r.path.startswith("wandb")
        assert r.config["learning_rate"] == api.run(r.run).config["learning_rate"]


def test_any_number_of_jobs_gives_the_same_report():
    flt = RunFilter(since=parse_since("2024-05-02"))
    one = analyze_many(["wandb://team/proj"], api=_project(), jobs=1, wandb_filter=flt)
    two = analyze_many(["wandb://team/proj"], api=_project(), jobs=2, wandb_filter=flt)
    assert render(one, "json") == render(two, "json")


def test_a_run_the_api_cannot_read_is_one_line_and_the_others_go_on():
    api = _project()
    api._runs["b2"]._broken = True
    report = analyze_many(["wandb://team/proj"], api=api, jobs=1, wandb_filter=RunFilter(tags=("lr-sweep",)))
    runs = {r["run"]: r for r in json.loads(render(report, "json"))["runs"]}
    (damaged,) = [f for f in runs["b2"]["findings"] if f["signature"] == "source_damaged"]
    assert damaged["evidence"]["problem"] == "W&B API: cannot read run b2: read timed out"
    assert runs["c3"]["status"] == "failed" and runs["d4"]["status"] != "no_data"


def test_an_empty_selection_or_an_unreachable_api_is_one_line():
    with pytest.raises(InputError, match="no run to analyse in wandb://team/proj"):
        analyze_many(["wandb://team/proj"], api=_project(), jobs=1, wandb_filter=RunFilter(sweep="none"))
    with pytest.raises(UnreadableError) as err:
        analyze_many(["wandb://team/proj"], api=FakeApi([], fail=True), jobs=1)
    assert str(err.value).startswith("W&B API: cannot list project team/proj: Could not connect")
    assert "\n" not in str(err.value)
