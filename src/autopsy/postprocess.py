"""After the detectors: fold precursors into the failure they led to, attach config risks as causes, order.

Rules (each a small function, applied in order; the groups come from the signature table):

1. Precursors (``exploding_gradients``, ``divergence``) at or before the first non-finite event (``nan_grad_norm``,
   ``nan_loss``, ``loss_zero_collapse``) are folded into its evidence (``precursors``), not reported twice; except
   when only the grad norm went non-finite, the logged loss stayed finite and had already diverged: then the
   divergence is the failure and both stay reported (each also listed in the NaN's ``precursors``).
2. A ``config_risk`` whose ``can_explain`` names a finding's signature becomes that finding's cause (the
   "no warmup" risk only for findings in the run's first 10%); a risk that explains something is dropped as a
   separate finding, a risk marked ``standalone=False`` that explains nothing is dropped too.
3. The one order of findings (:func:`autopsy.findings.finding_order`).
"""

from __future__ import annotations

from autopsy.findings import Finding, finding_order
from autopsy.signatures import NONFINITE, PRECURSORS

__all__ = ["postprocess"]


def _fold_precursors(findings: list[Finding]) -> list[Finding]:
    nan = [f for f in findings if f.signature in NONFINITE and f.step is not None and f.metric != "eval/loss"]
    if not nan:
        nan = [f for f in findings if f.signature in NONFINITE and f.step is not None]
    if not nan:
        return findings
    target = min(nan, key=lambda f: (f.step, -int(f.severity)))
    # a NaN only in the grad norm while the logged loss stayed finite (no nan_loss, no 0.0 collapse), after the loss
    # had already diverged: the divergence is the failure, the non-finite norm its last stage. Both stay reported
    # (fairseq#41: gnorm 2 -> 1e5 -> 1e13 -> inf while the loss climbs to 1e12).
    assert target.step is not None
    loss_nan = any(f.signature != "nan_grad_norm" for f in nan)
    diverged_first = any(f.signature == "divergence" and f.step is not None and f.step < target.step for f in findings)
    keep_separate = target.signature == "nan_grad_norm" and not loss_nan and diverged_first
    out = []
    for f in findings:
        if f.signature in PRECURSORS and f.step is not None and f.step <= target.step:
            target.evidence.setdefault("precursors", []).append(
                {
                    "signature": f.signature,
                    "step": f.step,
                    "steps_before": int(target.step - f.step),
                    "summary": f.summary,
                }
            )
            if not keep_separate:
                continue
        out.append(f)
    return out


def _attach_config(findings: list[Finding]) -> list[Finding]:
    risks = [f for f in findings if f.signature == "config_risk"]
    others = [f for f in findings if f.signature != "config_risk"]
    keep = []
    for risk in risks:
        explains = set(risk.evidence.get("can_explain", []))
        early = risk.evidence.get("early_until")
        used = False
        for f in others:
            if f.signature not in explains:
                continue
            if early is not None and (f.step is None or f.step > early):
                continue
            setting = str(risk.evidence.get("setting", ""))
            because = f"{risk.summary} ({risk.cause})" if risk.cause else risk.summary
            if setting not in f.cause:  # the finding already says it in its own words
                f.cause = f"{because}; {f.cause}" if f.cause else because
            f.evidence.setdefault("config_risk", []).append(
                {"setting": risk.evidence.get("setting"), "value": risk.evidence.get("value")}
            )
            if risk.fix and setting not in f.fix:
                f.fix = f"{f.fix}; {risk.fix}" if f.fix else risk.fix
            used = True
        if not used and risk.evidence.get("standalone", True):
            keep.append(risk)
    return others + keep


def postprocess(findings: list[Finding]) -> list[Finding]:
    """Apply the cross-finding rules, then order the findings (most severe first, then by step)."""
    findings = _fold_precursors(list(findings))
    findings = _attach_config(findings)
    return sorted(findings, key=finding_order)
