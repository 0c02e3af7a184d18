"""``analyze_many``: every run of a fleet analysed in this process, a process pool or a Dask cluster, one code path.

The tasks go out in input order and their results come back in that order (a bounded window of tasks in flight), so
the report is the same for any ``jobs`` and any cluster, and memory holds the reports (frames digested on the
worker) plus a window of results, whatever the number of runs.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from autopsy._version import __version__
from autopsy.analysis import make_plan
from autopsy.errors import InputError, UsageError, first_line
from autopsy.findings import Finding, Report, RunReport
from autopsy.fleet.tasks import Job, Task, credentials_env, expand
from autopsy.fleet.worker import Curve, Outcome, failed_outcome, run_task
from autopsy.importers import ReadOptions
from autopsy.importers.wandb_api import RunFilter

__all__ = ["FleetReport", "analyze_many", "default_jobs", "outcomes"]

Progress = Callable[[int, int, str], None]


@dataclass
class FleetReport(Report):
    """A :class:`~autopsy.findings.Report` of many runs, with what separates the failed ones (``fleet_findings``,
    first in every format) and each run's thinned loss curve (``curves``, the HTML page's small multiples)."""

    fleet_findings: list[Finding] = field(default_factory=list)
    curves: list[Curve | None] = field(default_factory=list, repr=False)
    verdicts: list[tuple[str, str | None]] = field(default_factory=list, repr=False)  # (status, lead) of each run
    frames_dropped: bool = True


def default_jobs() -> int:
    """The cores this process may use."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(os.cpu_count() or 1, 1)


def _inline(tasks: Sequence[Task], job: Job) -> Iterator[Outcome]:
    for task in tasks:
        yield run_task(task, job)


def _pool(tasks: Sequence[Task], job: Job, jobs: int) -> Iterator[Outcome]:
    """A process pool (forkserver: no fork of a process that holds threads); a worker that dies (killed, out of
    memory) fails its own run, and a fresh pool takes the rest."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["autopsy.fleet.worker"])
    window = 2 * jobs
    todo = deque(tasks)
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx)
    flying: deque[tuple[Task, Any]] = deque()
    try:
        while todo or flying:
            while todo and len(flying) < window:
                task = todo.popleft()
                flying.append((task, pool.submit(run_task, task, job)))
            task, future = flying.popleft()
            try:
                yield future.result()
            except BrokenProcessPool:
                yield failed_outcome(task, job, "the worker analysing this run died (killed or out of memory)")
                pool.shutdown(wait=False, cancel_futures=True)
                todo.extendleft(reversed([t for t, _ in flying]))
                flying.clear()
                pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _dask(tasks: Sequence[Task], job: Job, client: Any) -> Iterator[Outcome]:
    """Each task on a Dask ``distributed`` cluster (Dask retries a task whose worker died; one that keeps killing
    workers fails its own run)."""
    try:
        threads = sum(client.nthreads().values())
    except Exception:
        threads = 2
    window = max(2 * threads, 4)
    todo = deque(tasks)
    flying: deque[tuple[Task, Any]] = deque()
    while todo or flying:
        while todo and len(flying) < window:
            task = todo.popleft()
            flying.append((task, client.submit(run_task, task, job, pure=False)))
        task, future = flying.popleft()
        try:
            yield future.result()
        except Exception as exc:  # KilledWorker, a lost connection: this run fails, the others go on
            yield failed_outcome(task, job, f"the Dask worker failed: {type(exc).__name__}: {first_line(exc)}")
        finally:
            future.release()


def outcomes(tasks: Sequence[Task], job: Job, *, client: Any = None, jobs: int | None = None) -> Iterator[Outcome]:
    """The outcome of every task, in task order: on ``client`` (Dask), else ``jobs`` processes, else inline."""
    if client is not None:
        yield from _dask(tasks, job, client)
        return
    n = default_jobs() if jobs is None else int(jobs)
    if n < 1:
        raise UsageError(f"--jobs must be 1 or more, got {n}")
    if n == 1 or len(tasks) <= 1:
        yield from _inline(tasks, job)
    else:
        yield from _pool(tasks, replace(job, env=credentials_env()), min(n, len(tasks)))


def _share(run: RunReport, shared: dict[Any, Any]) -> RunReport:
    """What many runs' reports hold alike, held once: the skipped-detector entries and the config's keys and short
    texts (each report arrives as its own copies). Reports are not changed after analysis, so sharing is safe."""
    run.skipped = [shared.setdefault(tuple(s.items()), s) for s in run.skipped]

    def one(v: Any) -> Any:
        return sys.intern(v) if isinstance(v, str) and len(v) <= 80 else v

    config = {one(k): one(v) for k, v in run.config.items()}
    if run.info is not None and run.info.config is run.config:
        run.info.config = config
    run.config = config
    return run


def connect(address: str | None) -> Any:
    """A Dask client for ``address`` (or ``DASK_SCHEDULER_ADDRESS``); None when neither is given."""
    address = address or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
    if not address:
        return None
    try:
        from distributed import Client
    except ImportError:
        raise UsageError("--scheduler needs dask.distributed: pip install 'autopsy[fleet]'") from None
    try:
        return Client(address, timeout="20s")
    except Exception as exc:
        raise UsageError(f"cannot connect to the Dask scheduler at {address}: {first_line(exc)}") from None


def analyze_many(
    paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    client: Any = None,
    jobs: int | None = None,
    select: Sequence[str] | None = None,
    ignore: Sequence[str] | None = None,
    params: Mapping[str, Any] | None = None,
    engine: str = "auto",
    storage_options: Mapping[str, Any] | None = None,
    wandb_filter: RunFilter | None = None,
    api: Any = None,
    keep_frames: bool | int = False,
    progress: Progress | None = None,
) -> FleetReport:
    """Analyse every run under ``paths`` (local paths, fsspec URLs such as ``s3://bucket/sweep``, W&B runs or
    projects) and return one report: the runs in input order, then what separates the failed runs.

    ``client``: a Dask ``distributed.Client`` to run on; else ``jobs`` processes (default: the cores; 1 runs in this
    process). The result is the same either way. ``storage_options`` open the URLs (credentials otherwise come from
    the worker's environment); ``wandb_filter`` picks the runs of a W&B project; ``api`` stands in for
    ``wandb.Api()``. Frames are dropped on the workers (each report keeps a digest of the rows its summary reads);
    ``keep_frames=True`` keeps them, for per-run plots, and ``keep_frames=N`` keeps them when there are at most N
    runs. ``progress(done, total, run)`` is called as each run's report arrives.

    The worker processes are started with ``forkserver``: a script that calls this (with ``jobs`` above 1) does so
    under ``if __name__ == "__main__":``, as any multiprocessing code.
    """
    from autopsy.fleet.separate import fleet_findings

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    make_plan(select, ignore, params)  # every flag checked before any file is read
    ReadOptions(engine=engine)
    if jobs is not None and int(jobs) < 1:
        raise UsageError(f"--jobs must be 1 or more, got {jobs}")
    inputs = expand(list(paths), storage_options=dict(storage_options or {}), wandb_filter=wandb_filter, api=api)
    for source, label in enumerate(inputs.labels):
        if not any(t.source == source for t in inputs.tasks):
            raise InputError(f"no run to analyse in {label}" + (" (none passes the filters)" if wandb_filter else ""))
    keep = keep_frames if isinstance(keep_frames, bool) else len(inputs.tasks) <= int(keep_frames)
    job = Job(
        select=tuple(select) if select else None,
        ignore=tuple(ignore or ()),
        params=tuple((params or {}).items()),
        engine=engine,
        keep_frames=keep,
        api=api,
        cwd=os.getcwd(),
    )
    report = FleetReport(version=__version__, frames_dropped=not keep)
    empty = [True] * len(inputs.labels)
    total = len(inputs.tasks)
    shared: dict[Any, Any] = {}
    for done, (task, out) in enumerate(zip(inputs.tasks, outcomes(inputs.tasks, job, client=client, jobs=jobs)), 1):
        report.runs.extend(_share(r, shared) for r in out.reports)
        report.curves.extend(out.curves)
        report.verdicts.extend(out.verdicts)
        empty[task.source] &= out.empty
        if progress is not None:
            progress(done, total, task.name)
    for label, nothing in zip(inputs.labels, empty):
        if nothing:
            raise InputError(f"no metrics found under {label}")
    report.fleet_findings = fleet_findings(report)
    return report
