"""Fleets: many runs at once (a sweep, a bucket of runs, a W&B project), in parallel, on Dask when one machine is
not enough, and what separates the failed runs from the healthy ones.

- :mod:`~autopsy.fleet.tasks`: the inputs expanded into one task per run, before any run is read;
- :mod:`~autopsy.fleet.remote`: fsspec URLs listed on the driver, each run copied and read on its worker;
- :mod:`~autopsy.fleet.worker`: one task -> its reports, the frame dropped (a digest kept for the summary);
- :mod:`~autopsy.fleet.runner`: :func:`analyze_many` inline, on a process pool or a Dask cluster (one code path);
- :mod:`~autopsy.fleet.separate`: the fleet findings (each setting's best split, Fisher's exact test, corrected);
- :mod:`~autopsy.fleet.table`: one row per finding with the run's settings and status (Parquet, CSV).

The package sits above analysis, importers and report: nothing below it imports it.
"""

from __future__ import annotations

from autopsy.fleet.runner import FleetReport, analyze_many
from autopsy.fleet.separate import fleet_findings, run_settings

__all__ = ["FleetReport", "analyze_many", "fleet_findings", "run_settings"]
