"""What separates the failed runs of a fleet: each setting's best split, kept only where the evidence is strong.

Each run's outcome (its status, and its lead signature) is set against its settings (learning rate, warmup,
precision, batch size, LoRA rank, max_grad_norm, model, dataset size, scheduler, weight decay). For every setting
and outcome, every split is tried (``x >= t`` for numbers, ``x == v`` for categories) with at least ``min_side`` runs
on each side, and scored by Fisher's exact test on its 2x2 table of counts (the hypergeometric law, computed here). The best split of a setting is
Bonferroni-corrected for the splits tried, and the settings x outcomes together by Holm's step-down procedure; a
split is reported when the corrected p-value is at most ``alpha``. On a fleet whose failures do not depend on the
settings the family-wise chance of reporting anything is at most ``alpha``.

A finding says it in counts a reader can check: "7 of 7 runs with learning_rate >= 0.001 diverged; 0 of 12 below".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from autopsy.findings import Finding, Report, Severity, evidence_value
from autopsy.report._format import format_number
from autopsy.report.summary import summarize
from autopsy.signatures import NONFINITE

__all__ = ["SETTINGS", "Split", "fleet_findings", "run_settings"]

SIGNATURE = "fleet_split"
FAILED = ("failed", "unhealthy")  # statuses that count as a failed run
MAX_THRESHOLDS = 40  # a setting with more distinct values is split at 40 quantiles (the correction counts them)
SETTINGS = (
    "learning_rate",
    "warmup_steps",
    "precision",
    "batch_size",
    "lora_r",
    "max_grad_norm",
    "model",
    "dataset_size",
    "lr_scheduler_type",
    "weight_decay",
)
_OTHER_SIDE = {">=": "below", "<": "at or above", "==": "other than", "!=": "equal to"}
_VERBS = {
    "failed": "failed",
    "nonfinite": "went NaN",
    "divergence": "diverged",
    "crash": "crashed",
    "abrupt_end": "stopped early",
    "plateau": "did not learn (plateau)",
    "overfitting": "overfit",
    "exploding_gradients": "had exploding gradients",
    "loss_spike": "had loss spikes",
}


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _first(cfg: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return None


def _precision(cfg: Mapping[str, Any]) -> str | None:
    for key in ("mixed_precision", "precision"):
        v = cfg.get(key)
        if isinstance(v, str) and v:
            v = v.lower()
            return "bf16" if "bf16" in v else ("fp16" if "16" in v else ("fp32" if v in ("no", "32", "fp32") else v))
    if cfg.get("bf16") is True:
        return "bf16"
    if cfg.get("fp16") is True:
        return "fp16"
    return "fp32" if ("fp16" in cfg or "bf16" in cfg) else None


def _warmup(cfg: Mapping[str, Any]) -> float | None:
    steps, ratio, total = (
        _number(cfg.get("warmup_steps")),
        _number(cfg.get("warmup_ratio")),
        _number(cfg.get("max_steps")),
    )
    if steps is not None and steps > 0:
        return steps
    if ratio is not None and ratio > 0 and total is not None and total > 0:
        return float(math.ceil(ratio * total))
    return 0.0 if steps is not None or ratio is not None else None


def run_settings(config: Mapping[str, Any]) -> dict[str, float | str]:
    """A run's settings as the fleet compares them (numbers as floats, the rest as text; unknown ones left out)."""
    cfg = config or {}
    model: Mapping[str, Any] = cfg["model"] if isinstance(cfg.get("model"), Mapping) else {}
    adapter: Mapping[str, Any] = cfg["adapter"] if isinstance(cfg.get("adapter"), Mapping) else {}
    per_device = _number(_first(cfg, "per_device_train_batch_size"))
    batch = (
        per_device * (_number(cfg.get("gradient_accumulation_steps")) or 1.0)
        if per_device is not None
        else _number(_first(cfg, "batch_size", "train_batch_size", "global_batch_size"))
    )
    name = _first(model, "_name_or_path") or _first(
        cfg, "model_name_or_path", "base_model_name_or_path", "model_name", "model_id"
    )
    name = name or (cfg.get("model") if isinstance(cfg.get("model"), str) else None) or _first(model, "model_type")
    raw: dict[str, Any] = {
        "learning_rate": _number(_first(cfg, "learning_rate", "lr")),
        "warmup_steps": _warmup(cfg),
        "precision": _precision(cfg),
        "batch_size": batch,
        "lora_r": _number(_first(adapter, "r") or _first(cfg, "lora_r", "lora_rank")),
        "max_grad_norm": _number(cfg.get("max_grad_norm")),
        "model": str(name) if name else None,
        "dataset_size": _number(_first(cfg, "dataset_size", "num_train_samples", "train_samples", "num_examples")),
        "lr_scheduler_type": str(cfg["lr_scheduler_type"]) if isinstance(cfg.get("lr_scheduler_type"), str) else None,
        "weight_decay": _number(cfg.get("weight_decay")),
    }
    return {k: v for k, v in raw.items() if v is not None}


def _value(v: Any) -> str:
    return format_number(v) if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class Split:
    """One side of a setting against the rest: ``hits`` of ``runs`` with the outcome on the side, ``hits_rest`` of
    ``runs_rest`` elsewhere; ``p`` from Fisher's exact test, ``tried`` splits of this setting and outcome."""

    setting: str
    op: str  # ">=", "<", "=="
    value: Any
    outcome: str
    hits: int
    runs: int
    hits_rest: int
    runs_rest: int
    p: float
    tried: int

    def phrase(self) -> str:
        return f"{self.setting} {'=' if self.op == '==' else self.op} {_value(self.value)}"

    def summary(self) -> str:
        verb = _VERBS.get(self.outcome, f"ended in {self.outcome}")
        rest = {">=": "below", "<": "at or above", "==": "others"}.get(self.op, f"with {self.setting} = {self.value}")
        return (
            f"{self.hits} of {self.runs} runs with {self.phrase()} {verb}; {self.hits_rest} of {self.runs_rest} {rest}"
        )


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _fisher(a: int, n: int, b: int, m: int) -> float:
    """Two-sided p-value of Fisher's exact test on the table ``[[a, n - a], [b, m - b]]``: the probability, under
    the hypergeometric law of the margins, of every table at most as likely as this one (``scipy.stats.fisher_exact``'s
    definition and tolerance, without importing scipy.stats: 60 MiB on the driver)."""
    hits, total = a + b, n + m
    lo, hi = max(0, hits - m), min(hits, n)
    base = _log_comb(total, hits)
    logp = [_log_comb(n, k) + _log_comb(m, hits - k) - base for k in range(lo, hi + 1)]
    bound = logp[a - lo] + math.log1p(1e-7)
    return min(1.0, sum(math.exp(x) for x in logp if x <= bound))


def _numeric_sides(x: np.ndarray) -> list[tuple[str, Any, np.ndarray]]:
    values = np.unique(x)
    cuts = values[1:]
    if len(cuts) > MAX_THRESHOLDS:
        cuts = np.unique(np.quantile(x, np.linspace(0, 1, MAX_THRESHOLDS + 2)[1:-1], method="higher"))
        cuts = cuts[cuts > values[0]]
    return [(">=", float(t), x >= t) for t in cuts]


def _best(setting: str, outcome: str, values: list[Any], hit: np.ndarray, min_side: int) -> Split | None:
    """The split of ``setting`` that best separates ``hit`` runs from the others (None: no split to try)."""
    levels: list[str] = []
    sides: list[tuple[str, Any, np.ndarray]]
    if all(isinstance(v, float) for v in values):
        sides = _numeric_sides(np.asarray(values, dtype=np.float64))
    else:
        labels = np.asarray([str(v) for v in values], dtype=object)
        levels = sorted(set(labels.tolist()))
        sides = [("==", level, labels == level) for level in levels[: 1 if len(levels) == 2 else None]]
    best: Split | None = None
    tried = 0
    for op, value, side in sides:
        n, m = int(side.sum()), int((~side).sum())
        if n < min_side or m < min_side:
            continue
        tried += 1
        a, b = int(hit[side].sum()), int(hit[~side].sum())
        p = _fisher(a, n, b, m)
        if a * m < b * n:  # the outcome gathers on the other side: name that side
            op = {">=": "<", "==": "!="}[op]
            a, n, b, m = b, m, a, n
            if op == "!=" and len(levels) == 2:
                op, value = "==", next(x for x in levels if x != value)
        if best is None or p < best.p:
            best = Split(setting, op, value, outcome, a, n, b, m, p, 0)
    if best is None:
        return None
    return Split(**{**best.__dict__, "tried": tried})


def _outcomes(rows: list[tuple[str, str | None]], min_hits: int) -> dict[str, np.ndarray]:
    """The outcomes to explain: any failure, and each lead signature (the non-finite ones as one) that at least
    ``min_hits`` failed runs share; when every failure has the same lead, that lead alone."""
    failed = np.asarray([status in FAILED for status, _ in rows])
    leads = [("nonfinite" if lead in NONFINITE else lead) if status in FAILED else None for status, lead in rows]
    kinds = sorted({x for x in leads if x})
    if len(kinds) == 1:
        return {kinds[0]: failed}
    out = {"failed": failed}
    for lead in kinds:
        hit = np.asarray([x == lead for x in leads])
        if hit.sum() >= min_hits:
            out[lead] = hit
    return out


def _holm(ps: list[float]) -> list[float]:
    order = np.argsort(ps, kind="stable")
    out = [1.0] * len(ps)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[int(i)] = running
    return out


def _finding(split: Split, adjusted: float, tests: int, names: list[str]) -> Finding:
    side = f"runs with {split.phrase()}"
    rate = split.hits / split.runs
    rest = split.hits_rest / split.runs_rest if split.runs_rest else 0.0
    return Finding(
        signature=SIGNATURE,
        severity=Severity.WARNING,
        summary=split.summary(),
        evidence={
            "setting": split.setting,
            "split": split.phrase(),
            "outcome": split.outcome,
            "with": {"runs": split.runs, "outcome": split.hits, "rate": evidence_value(rate)},
            "without": {"runs": split.runs_rest, "outcome": split.hits_rest, "rate": evidence_value(rest)},
            "p_value": evidence_value(split.p),
            "p_adjusted": evidence_value(adjusted),
            "test": f"Fisher's exact test, two-sided; Bonferroni over {split.tried} split(s) of {split.setting}, "
            f"Holm over {tests} setting x outcome test(s)",
            "runs_with_outcome": names[:20] + ([f"... {len(names) - 20} more"] if len(names) > 20 else []),
        },
        cause=f"{side} {_VERBS.get(split.outcome, 'failed')} far more often than the others "
        f"({rate:.0%} against {rest:.0%}): this setting, or one that varies with it in this fleet, is the likely cause",
        fix=f"try {split.setting} {_OTHER_SIDE[split.op]} {_value(split.value)}, where {split.hits_rest} of "
        f"{split.runs_rest} runs {_VERBS.get(split.outcome, 'failed')}, on one of these runs to confirm; check first "
        f"that {split.setting} does not vary together with another setting in this fleet",
        detector="fleet",
    )


def fleet_findings(report: Report, *, min_side: int = 3, min_hits: int = 3, alpha: float = 0.05) -> list[Finding]:
    """What separates the failed runs of ``report``: at most one finding per setting, the strongest first."""
    verdicts = list(getattr(report, "verdicts", None) or ())
    if len(verdicts) != len(report.runs):  # a plain Report: summarize its runs here
        verdicts = [(sm.status, sm.lead.signature if sm.lead else None) for sm in map(summarize, report.runs)]
    judged = [(run, v) for run, v in zip(report.runs, verdicts) if v[0] != "no_data"]
    if len(judged) < 2 * min_side:
        return []
    rows = [v for _, v in judged]
    settings = [run_settings(run.config) for run, _ in judged]
    candidates: list[Split] = []
    for outcome, hit in _outcomes(rows, min_hits).items():
        if hit.sum() < min_hits or (~hit).sum() < min_side:
            continue
        for name in SETTINGS:
            have = np.asarray([name in st for st in settings])
            values = [st[name] for st in settings if name in st]
            if len(values) < 2 * min_side:
                continue
            split = _best(name, outcome, values, hit[have], min_side)
            if split is not None:
                candidates.append(split)
    adjusted = _holm([min(1.0, c.p * c.tried) for c in candidates])
    kept: dict[str, tuple[float, Split]] = {}
    for split, p in zip(candidates, adjusted):
        if p > alpha or split.hits < min_hits:
            continue
        prior = kept.get(split.setting)
        if prior is None or (p, split.outcome == "failed") < (prior[0], prior[1].outcome == "failed"):
            kept[split.setting] = (p, split)
    out = []
    for p, split in sorted(kept.values(), key=lambda x: (x[0], x[1].setting)):
        names = [
            r.run for (r, _), st, (status, lead) in zip(judged, settings, rows) if _on_side(split, st, status, lead)
        ]
        out.append(_finding(split, p, len(candidates), names))
    return out


def _on_side(split: Split, st: Mapping[str, Any], status: str, lead: str | None) -> bool:
    """Whether a run is on the failing side of ``split`` with its outcome."""
    if split.setting not in st or status not in FAILED:
        return False
    if split.outcome != "failed" and split.outcome != ("nonfinite" if lead in NONFINITE else lead):
        return False
    v = st[split.setting]
    if split.op == ">=":
        return float(v) >= float(split.value)
    if split.op == "<":
        return float(v) < float(split.value)
    return (str(v) == str(split.value)) == (split.op == "==")
