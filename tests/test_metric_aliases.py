"""The one alias table (autopsy.metrics), checked against every metric key of the real corpora.

A key a practitioner reads as the train loss, the eval loss, the grad norm or the learning rate must reach the
canonical name the detectors ask for; a loss scale is never a loss; the fields W&B flattens out of a logged image or
table are not metrics.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import autopsy
from autopsy.metrics import METRIC_ALIASES, canonical_metric, is_canonical, media_leaves
from helpers.paths import REPO, RUNS, SHARED

_SKIP = ("SOURCES", "LABELS", "README", "expected", "score")


def _corpus() -> list[Path]:
    roots = [RUNS, SHARED / "real-logs", SHARED / "labelled-runs" / "trainer_state", SHARED / "labelled-runs" / "console-logs",
             SHARED / "issue-logs", REPO / "tests" / "real" / "trainer_state", REPO / "tests" / "real" / "console-logs"]
    return [p for r in roots if r.is_dir() for p in sorted(r.iterdir())
            if not p.name.startswith(_SKIP) and p.suffix != ".md"]


def _norm(raw: str) -> str:
    return re.sub(r"[\s.\-/]+", "_", raw.strip().lower())


# (what a reader calls the key, the pattern of its normalised raw name, the canonical names it may become)
RULES = [
    ("train loss", re.compile(r"^(train_|training_)?loss$|^loss_train$|^train_loss_step$"), {"train/loss", "eval/loss"}),
    ("eval loss", re.compile(r"^(eval|val|valid|validation)_?loss$"), {"eval/loss"}),
    ("grad norm", re.compile(r"^(train_)?(grad_?norm|gnorm|gradient_norm|global_grad_norm)$"), {"train/grad_norm"}),
    ("learning rate", re.compile(r"^(train_)?(lr|learning_rate)$"), {"train/learning_rate"}),
    ("loss scale", re.compile(r"^(train_)?loss_?scale"), {"train/loss_scale"}),
]


def test_every_alias_names_a_canonical_metric():
    bad = {a: m for a, m in METRIC_ALIASES.items() if not is_canonical(m)}
    assert not bad
    assert all(canonical_metric(a) == m for a, m in METRIC_ALIASES.items())
    assert all(a == a.lower() for a in METRIC_ALIASES)  # looked up lower-cased


@pytest.mark.parametrize(
    ("names", "media"),
    [
        (["examples._type", "examples.width", "examples.height", "examples.sha256", "loss"],
         {"examples._type", "examples.width", "examples.height", "examples.sha256"}),
        (["samples.nrows", "samples.ncols", "samples.size", "samples.path"],
         {"samples.nrows", "samples.ncols", "samples.size", "samples.path"}),
        (["train.loss", "eval.size", "batch.size"], set()),  # a .size beside no media field is a number
        (["pred_table.artifact_path", "pred_table._latest_artifact_path"],
         {"pred_table.artifact_path", "pred_table._latest_artifact_path"}),
    ],
)
def test_media_leaves(names, media):
    assert media_leaves(names) == media


@pytest.mark.slow
def test_the_corpus_keys_reach_their_canonical_names():
    corpus = _corpus()
    assert corpus
    wrong, media = [], []
    for path in corpus:
        frame = autopsy.load(path)
        pairs = set(zip(frame["raw_metric"].astype(str), frame["metric"].astype(str)))
        for raw, metric in pairs:
            key = _norm(raw)
            for what, pattern, allowed in RULES:
                if pattern.search(key) and metric not in allowed:
                    wrong.append(f"{path.name}: {raw!r} ({what}) became {metric}")
            if media_leaves([raw]) or media_leaves([m for m, _ in pairs if m.rpartition(".")[0] == raw.rpartition(".")[0]]) & {raw}:
                media.append(f"{path.name}: {raw!r}")
    assert not wrong, wrong
    assert not media, media
