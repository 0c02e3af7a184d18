"""Real offline W&B runs for the tests, written by the real ``wandb`` client in ONE subprocess.

``python tests/_wandb_support.py SPEC.json`` reads a list of runs (``dir``, ``id``, ``config``,
``rows``: the dicts to ``wandb.log`` in order, ``summary``, ``exit_code``) and writes each with
``wandb.init(mode="offline", dir=...)``. NaN/inf travel through the spec as JSON's ``NaN``/``Infinity``
tokens. A subprocess keeps wandb's service, signal handlers and global state out of the test process.

The logging follows HF's ``WandbCallback``: every Trainer log becomes one ``wandb.log`` call of the
rewritten keys (``loss`` -> ``train/loss``, ``eval_loss`` -> ``eval/loss``) plus
``train/global_step``, so evaluations add rows and W&B's ``_step`` runs ahead of the global step.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

_SUMMARY_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss"}


def hf_rewrite(entry: dict[str, Any]) -> dict[str, Any]:
    """transformers.integrations.integration_utils.rewrite_logs, as the callback applies it."""
    out = {}
    for key, value in entry.items():
        if key == "step":
            continue
        if key.startswith("eval_"):
            out["eval/" + key[5:]] = value
        elif key.startswith("test_"):
            out["test/" + key[5:]] = value
        else:
            out["train/" + key] = value
    return out


def rows_from_log_history(history: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """HF log_history -> (the rows WandbCallback logs, the summary it sets)."""
    rows, summary = [], {}
    for entry in history:
        if _SUMMARY_KEYS & set(entry):
            summary.update({k: v for k, v in entry.items() if k in _SUMMARY_KEYS})
            continue
        rows.append({**hf_rewrite(entry), "train/global_step": entry["step"]})
    return rows, summary


def nan151_rows(*, max_steps: int = 200, eval_every: int = 25, nan_from: int = 151) -> list[dict[str, Any]]:
    """An HF-shaped run whose grad norm is NaN from ``nan_from`` on and whose loss reads 0.0 there
    (HF's logging_nan_inf_filter), with an eval row every ``eval_every`` steps."""
    rows = []
    for step in range(1, max_steps + 1):
        bad = step >= nan_from
        lr = 1e-3 * min(1.0, step / 10) * (1 - step / (max_steps + 1))
        loss = 0.0 if bad else 3.0 * math.exp(-step / 80) + 1.0 + 0.03 * math.sin(step * 1.7)
        grad = math.nan if bad else 1.2 + 0.2 * math.cos(step * 0.9)
        rows.append({"train/loss": loss, "train/grad_norm": grad, "train/learning_rate": lr,
                     "train/epoch": step / max_steps, "train/global_step": step})
        if step % eval_every == 0:
            rows.append({"eval/loss": math.nan if bad else 1.1 + 2.5 * math.exp(-step / 90),
                         "eval/runtime": 0.5, "train/global_step": step})
    return rows


def write_runs(specs: list[dict[str, Any]], *, timeout: float = 120) -> list[Path]:
    """Write the runs in one subprocess; returns each run's ``offline-run-*`` directory."""
    spec_path = Path(specs[0]["dir"]) / "_spec.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(specs))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_CODE": "true",
           "WANDB_DISABLE_GIT": "true", "WANDB_CONSOLE": "off"}
    subprocess.run([sys.executable, __file__, str(spec_path)], check=True, env=env, timeout=timeout,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    spec_path.unlink()
    out = []
    for spec in specs:
        found = sorted((Path(spec["dir"]) / "wandb").glob(f"offline-run-*-{spec['id']}"))
        assert len(found) == 1, f"no offline run dir for {spec['id']} under {spec['dir']}"
        out.append(found[0])
    return out


def _stats_record(t: float, items: dict[str, Any]) -> Any:
    """A ``stats`` record as W&B's system monitor writes it, at wall time ``t`` (wandb's own protobuf)."""
    from wandb.proto import wandb_internal_pb2 as pb

    rec = pb.StatsRecord(stats_type=pb.StatsRecord.StatsType.SYSTEM)
    rec.timestamp.FromNanoseconds(int(t * 1e9))
    for key, value in items.items():
        if key == "_t":
            continue
        item = rec.item.add()
        item.key, item.value_json = key, json.dumps(value)
    return rec


def _main(spec_path: str) -> None:
    """Each run: ``rows`` (an ``_t`` key, seconds after init, becomes the row's ``_timestamp``), ``stats`` (dicts of
    W&B system keys with their ``_t``: written through the run's own interface as the sampler would, since a CPU
    machine has no GPU to sample), ``console`` (lines the client captures), ``settings`` (extra wandb.Settings)."""
    import time

    import wandb

    for spec in json.loads(Path(spec_path).read_text()):
        Path(spec["dir"]).mkdir(parents=True, exist_ok=True)
        settings = {"x_disable_stats": True, "x_disable_meta": True, **spec.get("settings", {})}
        run = wandb.init(mode="offline", dir=spec["dir"], id=spec["id"], project="autopsy-tests",
                         config=spec.get("config", {}), settings=wandb.Settings(**settings))
        t0 = time.time()
        iface = run._interface  # the client's own writer: records go to the .wandb file as it writes them
        for line in spec.get("console", []):
            iface.publish_output_raw("stdout", line)
        stats = sorted(spec.get("stats", []), key=lambda s: s["_t"])
        k = 0
        for row in spec["rows"]:
            row = dict(row)
            if "_t" in row:
                t = t0 + row.pop("_t")
                row["_timestamp"] = t
                while k < len(stats) and t0 + stats[k]["_t"] <= t:
                    iface._publish(iface._make_record(stats=_stats_record(t0 + stats[k]["_t"], stats[k])))
                    k += 1
            run.log(row)
        for sample in stats[k:]:
            iface._publish(iface._make_record(stats=_stats_record(t0 + sample["_t"], sample)))
        for key, value in spec.get("summary", {}).items():
            run.summary[key] = value
        run.finish(exit_code=spec.get("exit_code", 0))


if __name__ == "__main__":
    _main(sys.argv[1])
