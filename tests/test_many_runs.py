"""Many runs in one flat ``logs/`` dir: one frame, the same rows as joining the runs one by one, in time linear in
their number (measured in bench/reliability, never asserted here)."""

from __future__ import annotations

import shutil

import numpy as np

import autopsy
from autopsy.frame import concat_frames
from autopsy.importers import load_run
from autopsy.importers.discover import find_runs
from autopsy.runinfo import attach_runs, catalog
from helpers.tb import write_hf_run


def test_a_flat_dir_of_event_files_is_one_frame_of_many_runs(tmp_path):
    seed = write_hf_run(tmp_path / "seed", steps=range(1, 21), texts=False)
    logs = tmp_path / "exp" / "logs"
    logs.mkdir(parents=True)
    for i in range(30):
        shutil.copy(seed, logs / f"events.out.tfevents.{1700000000 + i}.host.{i}.0")
    frame = autopsy.load(tmp_path / "exp")
    runs = find_runs(tmp_path / "exp")
    assert len(runs) == 30 and set(frame["run"].astype(str)) == {r.name for r in runs} == set(catalog(frame))
    # the same rows, categories and infos as the generic join of the runs one by one
    loaded = [load_run(r) for r in runs]
    joined = concat_frames([attach_runs(g.frame, g.runs) for g in loaded])
    for col in ("run", "source", "metric", "raw_metric"):
        assert frame[col].astype(str).tolist() == joined[col].astype(str).tolist(), col
    for col in ("step", "superseded"):
        assert np.array_equal(frame[col].to_numpy(), joined[col].to_numpy()), col
    assert np.array_equal(frame["value"].to_numpy(), joined["value"].to_numpy(), equal_nan=True)
    assert frame["wall_time"].equals(joined["wall_time"])
    report = autopsy.analyze(frame)
    assert len(report.runs) == 30
    assert {f.signature for f in report.runs[0].findings} == {f.signature for f in report.runs[-1].findings}
