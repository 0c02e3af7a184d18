"""Shared paths and expensive fixtures (real Trainer runs are made once per test session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers.paths import RUNS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def nan_run() -> Path:
    """Committed real Trainer run: inf planted after step 30 (grad norm NaN, loss 0.0 from step 31)."""
    return RUNS / "nan-at-31"


@pytest.fixture(scope="session")
def healthy_run() -> Path:
    return RUNS / "healthy"


@pytest.fixture(scope="session")
def fresh_nan_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A NaN run trained now by the real HF Trainer (not the committed copy)."""
    import tinyllama

    out = tmp_path_factory.mktemp("fresh") / "nan-run"
    tinyllama.train(out, max_steps=40, learning_rate=5e-4, plant_inf_at=30, eval_steps=20, save_steps=10)
    return out


@pytest.fixture
def math_attention():
    """Replay in the attention kernel the fixture runs were trained with (see tinyllama.math_attention); a module
    that replays a fixture run names it in ``pytest.mark.usefixtures``."""
    import tinyllama

    with tinyllama.math_attention():
        yield
