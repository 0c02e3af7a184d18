"""The canonical frame: construction, superseded rows, merging sources, user frames."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import autopsy
from autopsy.errors import FrameError
from autopsy.frame import (
    COLUMNS,
    concat_frames,
    labelled_codes,
    make_frame,
    merge_sources,
    validate_frame,
)
from autopsy.importers import priorities
from autopsy.metrics import canonical_metric
from autopsy.series import series


def sup(steps):
    return make_frame(run="r", source="s", metric="m", step=steps, value=np.zeros(len(steps)))["superseded"].tolist()


def test_superseded_rows():
    assert sup([1, 2, 3, 4, 5, 6, 5, 6, 7, 8]) == [False] * 4 + [True, True] + [False] * 4  # resumed from step 4
    assert sup([5, 6, 7, 1, 2, 3]) == [True, True, True, False, False, False]  # restarted from scratch
    assert sup([1, 2, 2, 3]) == [False, True, False, False]  # a duplicate: the last one written wins
    assert sup([1, 2, 3, 4, 0]) == [False] * 5  # a lone backward row is not a resume
    assert sup([1, 2, 3, 0, 4, 5]) == [False] * 6  # nor a glitch the series carries on past


def test_superseded_is_per_series():
    f = make_frame(run="r", source="s", metric=["a", "b", "a", "b"], step=[1, 1, 2, 1], value=[0, 0, 0, 0])
    assert f["superseded"].tolist() == [False, True, False, False]


def _superseded_by_the_words(metrics: list[str], steps: list[int]) -> list[bool]:
    """The rule as the docstring states it, row by row: a row is superseded when its step is logged again later in its
    series, or when a later row of its series (not a lone backward row) goes back below it."""
    out = [False] * len(steps)
    for m in set(metrics):
        rows = [i for i, x in enumerate(metrics) if x == m]
        s = [steps[i] for i in rows]
        lone = [
            k > 0 and s[k] < s[k - 1] and (k == len(s) - 1 or s[k + 1] > s[k - 1]) for k in range(len(s))
        ]
        for k, i in enumerate(rows):
            later = [s[j] for j in range(k + 1, len(s)) if not lone[j]]
            out[i] = s[k] in s[k + 1 :] or (bool(later) and min(later) < s[k])
    return out


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 12)), max_size=30),
    st.booleans(),
)
def test_superseded_agrees_with_its_rule(rows, sort_steps):
    """The vectorised rule (with its lean path for series in non-decreasing order) against the rule in words."""
    if sort_steps:  # the common shape: every series non-decreasing, with repeated steps
        rows = sorted(rows, key=lambda r: r[1])
    metrics, steps = [m for m, _ in rows], [s for _, s in rows]
    f = make_frame(run="r", source="s", metric=metrics, step=steps, value=np.zeros(len(rows)))
    assert f["superseded"].tolist() == _superseded_by_the_words(metrics, steps)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=40), st.lists(st.sampled_from(["a", "b", "c/d", ""]), min_size=6, max_size=6))
def test_labelled_codes_is_factorize_over_the_labels(codes, labels):
    """Codes into labels (two codes may share a label) make the column pandas would make from the strings."""
    got = labelled_codes(np.asarray(codes, dtype=np.int64), labels)
    want_codes, want_cats = pd.factorize(np.asarray([labels[c] for c in codes] + [""], dtype=object)[:-1])
    assert list(got.categories) == [str(c) for c in want_cats]
    assert got.codes.tolist() == want_codes.tolist()


def test_columns_and_dtypes():
    f = make_frame(run="r", source="s", metric=["train/loss"], step=[1], value=[np.nan])
    assert list(f.columns) == COLUMNS
    assert f["step"].dtype == np.int64 and f["value"].dtype == np.float64
    assert np.isnan(f["value"].iloc[0]) and pd.isna(f["wall_time"].iloc[0])
    assert isinstance(f["wall_time"].dtype, pd.DatetimeTZDtype)


def test_merge_prefers_the_densest_source_then_the_importers_priority():
    dense = make_frame(run="r", source="trainer_state", metric="train/loss", step=np.arange(1, 11), value=np.ones(10))
    sparse = make_frame(run="r", source="tensorboard", metric="train/loss", step=[2, 4, 11], value=[9.0, 9.0, 9.0])
    merged = merge_sources(concat_frames([dense, sparse]), priorities())
    s = merged[merged["metric"] == "train/loss"]
    assert not s["step"].duplicated().any()
    assert set(s.loc[s["step"] <= 10, "source"]) == {"trainer_state"}  # densest wins where both have a step
    assert s.loc[s["step"] == 11, "source"].tolist() == ["tensorboard"]  # a step only the other has is kept
    # equal density: TensorBoard (wall times, every step; PRIORITY 0) before trainer_state (2), whatever the row order
    tb = make_frame(run="r", source="tensorboard", metric="train/loss", step=np.arange(1, 11), value=np.full(10, 2.0))
    for frames in ([dense, tb], [tb, dense]):
        m = merge_sources(concat_frames(frames), priorities())
        assert set(m["source"]) == {"tensorboard"} and len(m) == 10


def test_concat_keeps_categories_of_both():
    a = make_frame(run="a", source="s", metric="x", step=[1], value=[1.0])
    b = make_frame(run="b", source="t", metric="y", step=[1], value=[2.0])
    c = concat_frames([a, b])
    assert c["run"].tolist() == ["a", "b"] and c["metric"].tolist() == ["x", "y"]
    assert isinstance(c["metric"].dtype, pd.CategoricalDtype)


def test_user_frame_needs_only_step_metric_value():
    user = pd.DataFrame({"step": [1, 2, 3], "metric": ["loss"] * 3, "value": [3.0, 2.0, 1.0]})
    f = validate_frame(user)
    assert list(f.columns) == COLUMNS and series(f, "loss").tolist() == [3.0, 2.0, 1.0]
    with pytest.raises(FrameError):
        validate_frame(pd.DataFrame({"step": [1]}))
    with pytest.raises(FrameError):
        validate_frame(pd.DataFrame({"step": ["x"], "metric": ["a"], "value": [1.0]}))
    assert autopsy.analyze(user).runs[0].run == "run"


@pytest.mark.parametrize("raw,hf,expected", [
    ("loss", True, "train/loss"), ("eval_loss", True, "eval/loss"), ("eval_squad_loss", True, "eval/squad/loss"),
    ("rewards/chosen", True, "train/rewards/chosen"), ("train/grad_norm", False, "train/grad_norm"),
    ("val_loss", False, "eval/loss"), ("lr", False, "train/learning_rate"), ("eval/wiki_loss", False, "eval/wiki/loss"),
    ("my/custom", False, "my/custom"),
])
def test_canonical_metric(raw, hf, expected):
    assert canonical_metric(raw, hf_flat=hf) == expected
