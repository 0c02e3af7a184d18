"""Acceptance of issue 8: a dozen damaged and hostile copies of the real NaN run (fixtures/damaged/make_damaged.py).

Every case gives exit 0, 1 or 2 and no traceback; the salvageable ones still report ``nan_grad_norm`` at its
true first step (31) and report what was lost (``source_damaged`` with the file and offset); the hostile
payloads never run; the inputs are byte-identical afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers.reliability import cli_inprocess, has_module, make_damaged, snapshot

CASES = list(make_damaged.CASES)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    cases, outside = make_damaged.build_corpus(root, wandb=has_module("wandb"))
    return cases, outside


def _findings(doc: dict, signature: str) -> list[dict]:
    return [f for run in doc["runs"] for f in run["findings"] if f["signature"] == signature]


def _skip_unless_importers(case) -> None:
    missing = [m for m in case.needs if not has_module(m)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not in this build yet")


def test_corpus_has_a_dozen_cases():
    kinds = [k for k, _ in make_damaged.CASES.values()]
    assert len(kinds) >= 12 and kinds.count("salvage") >= 5 and kinds.count("hostile") >= 2


@pytest.mark.parametrize("name", CASES)
def test_damaged_case(name, corpus):
    cases, outside = corpus
    if name not in cases:
        pytest.skip("wandb is not installed")
    case = cases[name]
    before = snapshot(case.path, outside)
    rc, out, err = cli_inprocess("analyze", case.path, "--format", "json")
    assert rc in (0, 1, 2), (rc, err)
    assert "Traceback" not in err and "internal error" not in err, err
    after = snapshot(case.path, outside)
    assert after == before, "the analysed directory (or the decoys outside it) changed"
    for marker in case.markers:
        assert not marker.exists(), f"hostile payload ran: {marker} was written"
    if rc == 2:
        assert err.strip() and err.strip().count("\n") == 0, err
        assert case.nan_grad_norm_step is None, f"salvageable case failed: {err}"
        assert case.signature is None, f"a run with a report to give failed: {err}"
        return
    doc = json.loads(out)
    if case.nan_grad_norm_step is not None:
        _skip_unless_importers(case)
        nan = _findings(doc, "nan_grad_norm")
        assert nan, f"nan_grad_norm lost: {[(f['signature'], f['step']) for r in doc['runs'] for f in r['findings']]}"
        assert min(f["step"] for f in nan) == case.nan_grad_norm_step
    if case.damaged_file is not None:
        _skip_unless_importers(case)
        damaged = [f for f in _findings(doc, "source_damaged") if f["evidence"]["file"].endswith(case.damaged_file)]
        assert damaged, "the damage was not reported"
        assert all(isinstance(f["evidence"]["offset"], int) for f in damaged)
    _check_expectations(case, doc)


def _check_expectations(case, doc: dict) -> None:
    """What the newer cases add: every damaged file reported, the restart point, a note, a signature."""
    reported = {f["evidence"]["file"] for f in _findings(doc, "source_damaged")}
    for rel in case.also_damaged:
        assert str(case.path / rel) in reported, (rel, reported)
    if case.restart_step is not None:
        assert f"(step {case.restart_step})" in doc["runs"][0]["restart"], doc["runs"][0]["restart"]
    if case.note is not None:
        notes = doc["runs"][0]["run_info"].get("notes", [])
        assert any(case.note in n for n in notes), notes
    if case.signature is not None:
        assert _findings(doc, case.signature), [f["signature"] for r in doc["runs"] for f in r["findings"]]


def test_truncation_offset_is_where_the_cut_is(corpus):
    """The reported offset of a truncated event file lies inside the file, at or before the cut."""
    cases, _ = corpus
    case = cases["truncated-events"]
    _skip_unless_importers(case)
    ev = next(case.path.glob("runs/*/*tfevents*"))
    rc, out, err = cli_inprocess("analyze", case.path, "--format", "json")
    damaged = _findings(json.loads(out), "source_damaged")
    assert damaged and 0 < damaged[0]["evidence"]["offset"] <= ev.stat().st_size
    # every whole record before the cut was read: the last complete one is within one record of the offset
    last_whole = make_damaged.event_records(ev.read_bytes())[-1]
    assert damaged[0]["evidence"]["offset"] >= last_whole[0]


def test_half_written_trainer_state_keeps_entries_before_the_cut(corpus):
    cases, _ = corpus
    case = cases["halfwritten-trainer-state"]
    rc, out, err = cli_inprocess("analyze", case.path, "--format", "json")
    doc = json.loads(out)
    (d,) = _findings(doc, "source_damaged")
    assert "log_history entries" in d["evidence"]["salvaged"]
    text = (case.path / "trainer_state.json").read_text()
    assert d["evidence"]["offset"] <= len(text)
    assert doc["runs"][0]["run_info"]["global_step"] is None or doc["runs"][0]["run_info"]["global_step"] >= 35


def test_hostile_pickle_refused_with_a_note(corpus):
    cases, _ = corpus
    case = cases["hostile-pickle"]
    rc, out, err = cli_inprocess("analyze", case.path, "--format", "json")
    notes = json.loads(out)["runs"][0]["run_info"]["notes"]
    refused = [n for n in notes if "training_args.bin" in n and "refused" in n]
    assert refused and "exec" in refused[0], notes
    assert not any(m.exists() for m in case.markers)


def test_symlinked_decoys_outside_are_not_read(corpus):
    cases, _ = corpus
    case = cases["symlinks"]
    rc, out, err = cli_inprocess("analyze", case.path, "--format", "json")
    doc = json.loads(out)
    for run in doc["runs"]:
        assert "tensorboard" not in run["sources"], "the event file behind runs/ -> outside was read"
        assert not any(f["step"] == 3 for f in run["findings"]), "the decoy trainer_state.json outside was read"


def test_salvage_cases_as_a_user_runs_them(corpus):
    """Two acceptance salvage cases through ``python -m autopsy`` (in parallel; the others run in process above)."""
    cases, _ = corpus
    names = [n for n in ("bitflip-events", "halfwritten-trainer-state")
             if all(has_module(m) for m in cases[n].needs)]
    procs = {n: subprocess.Popen([sys.executable, "-m", "autopsy", "analyze", str(cases[n].path), "--format", "json",
                                  "--fail-on", "critical"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in names}
    for n, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 1, (n, err)  # nan_grad_norm is critical
        assert "Traceback" not in err
        steps = [f["step"] for f in _findings(json.loads(out), "nan_grad_norm")]
        assert min(steps) == make_damaged.NAN_STEP, n
