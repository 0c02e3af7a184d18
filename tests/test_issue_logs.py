"""Logs pasted in real GitHub issue threads (../shared/issue-logs, labelled in its SOURCES.md) are diagnosed as
labelled: one parametrized test over all of them.

Each case lists the signatures SOURCES.md calls certain (``expect``; ``crash_<kind>`` means a ``crash`` finding of
that ``evidence.kind``), the ones it rules out (``forbid``: the traps), and checks on the parsed series that hold
whatever the detectors say. Uncertain labels ``(?)`` are not asserted. An expected signature that no registered
detector can emit yet is an xfail naming it; an exception to a label is written here with its reason.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from autopsy import analyze
from autopsy.detectors._registry import registered
from autopsy.findings import Severity
from autopsy.importers import load
from autopsy.runinfo import catalog
from autopsy.series import series
from helpers.paths import ISSUE_LOGS, needs_shared

# name -> expect, forbid, series checks {metric: (kind, args)}, known exceptions {signature: reason}
CASES: dict[str, dict] = {
    "01_CNN-for-Sentence-Classification-in-Keras_7.txt": {"expect": {"nan_loss"}, "first": {"train/loss": 2}},
    "02_ReLERNN_26.txt": {"expect": {"nan_loss"}, "first": {"train/loss": 309}},
    "03_keras_13942.txt": {"expect": {"overfitting"}, "points": {"eval/loss": 5}},
    "04_keras_3056.txt": {"expect": {"overfitting"}, "points": {"eval/loss": 7}},
    "05_Time-MoE_71.txt": {"expect": {"nan_grad_norm"}, "forbid": {"nan_loss", "loss_zero_collapse"},
                           "points": {"train/grad_norm": 9}, "first": {"train/grad_norm": 1}},
    # every loss is 0.0 from the first log (the onset is before the excerpt): the NaN grad norm at the same steps
    # makes it HF's NaN filter, so loss_zero_collapse is certain without a non-zero loss before the zeros
    "06_Time-MoE_31.txt": {"expect": {"nan_grad_norm", "loss_zero_collapse"}, "points": {"train/loss": 10}},
    "07_LlamaFactory_8261.txt": {"expect": {"crash_nccl_timeout", "abrupt_end"}, "steps": {"train/loss": [10, 20]}},
    "08_MIMIGenRec_3.txt": {"steps": {"train/loss": [6, 7, 8, 9]}, "max_steps": 390},
    "09_VideoLLaMA2_157.txt": {"points": {"train/grad_norm": 13}},
    # HF dicts, max_grad_norm not printed: the assumed default 1.0 makes clip_saturation an info note, not a warning
    "10_llm-finetuning_82.txt": {"healthy": True, "points": {"train/grad_norm": 13}},
    "11_Chinese-LLaMA-Alpaca_534.txt": {"expect": {"loss_scale_collapse"},
                                        "steps": {"train/loss_scale": [378, 379, 380, 381, 382]}},
    "12_transformers_14531.txt": {"expect": {"loss_scale_collapse"}},
    "13_CogVideo_233.txt": {"forbid": {"loss_scale_collapse"}, "points": {"train/loss_scale": 6}},
    "14_apex_318.txt": {"expect": {"loss_scale_collapse"}, "points": {"train/loss_scale": 14}},
    "15_trl_3452.txt": {"healthy": True, "forbid": {"loss_zero_collapse"}},
    "16_trl_1236.txt": {"points": {"train/loss": 3}},
    "17_open-r1_704.txt": {"forbid": {"nan_loss"}},
    "18_ms-swift_4146.txt": {"healthy": True, "steps": {"train/loss": [56, 57]}, "max_steps": 176},
    "19_mmdetection3d_3103.txt": {"expect": {"divergence", "exploding_gradients"}, "jump": ("train/grad_norm", 10)},
    "20_Birds-eye-view-Perception_13.txt": {"expect": {"nan_grad_norm"}, "forbid": {"nan_loss"}},
    "21_BEVDet_265.txt": {"expect": {"nan_loss", "nan_grad_norm"}, "first": {"train/loss": 50}},
    "22_TableMASTER-mmocr_32.txt": {"forbid_critical": {"nan_grad_norm"}, "first": {"train/grad_norm": 100}},
    "23_pytorch_118369.txt": {"expect": {"crash_nccl_timeout", "abrupt_end"}, "steps": {"train/loss": [32040]}},
    "24_RePlay_90.txt": {"expect": {"nan_loss"}, "first": {"train/loss": 5880}},
    "25_fairseq_41.txt": {"expect": {"exploding_gradients", "divergence", "clip_saturation", "nan_grad_norm"},
                          "jump": ("train/grad_norm", 1e4), "first": {"train/grad_norm": 7000}},
    # fairseq prints the share of clipped updates (clip=100%) but not --clip-norm: that share is the evidence
    "26_fairseq_118.txt": {"expect": {"clip_saturation"}, "points": {"train/grad_norm": 6}},
    "27_fairseq_311.txt": {"expect": {"exploding_gradients", "clip_saturation"}, "jump": ("train/grad_norm", 10)},
    "28_fairseq_940.txt": {"healthy": True, "forbid": {"loss_scale_collapse"}, "steps": {"eval/loss": [600]}},
    "29_Megatron-DeepSpeed_396.txt": {"expect": {"nan_grad_norm"}, "first": {"train/grad_norm": 5426}},
    "30_NLUT_12.txt": {"expect": {"nan_loss"}, "first": {"train/loss": 4500}},
    "31_mpII-face-gaze_3.txt": {"expect": {"nan_loss"}, "first": {"train/loss": 100}},
    "32_MedicalDataAugmentationTool-VerSe_31.txt": {"expect": {"nan_loss", "nan_grad_norm", "loss_scale_collapse"}},
    "33_LION_9.txt": {"expect": {"nan_loss"}, "first": {"train/loss": 104}},
    "34_tensorflow_12287.txt": {"expect": {"plateau"}, "points": {"train/loss": 28}},
    "35_caffe-mobilenet-v3_1.txt": {"expect": {"plateau"}, "forbid": {"nan_loss"}},
    "36_keys_values_97.txt": {"forbid": {"loss_zero_collapse"}, "points": {"train/loss": 12}},
    "37_litgpt_1110.txt": {"healthy": True, "forbid": {"abrupt_end", "crash"}, "points": {"train/loss": 5}},
    # a custom MetricLogger loop: no HF default max_grad_norm to assume, so grad_norm 0.27-2.5 is no clip_saturation
    "38_LLaMA2-Accessory_48.txt": {"healthy": True, "forbid": {"clip_saturation"}},
    "39_minimind_26.txt": {"healthy": True, "points": {"train/loss": 19}},
    "40_Person_reID_baseline_pytorch_372.txt": {"expect": {"crash_device_assert", "abrupt_end"}},
    "41_detectron2_1563.txt": {"expect": {"crash_oom", "abrupt_end"},
                               "evidence": {"tried_to_allocate_gib": 1.71, "total_capacity_gib": 31.72,
                                            "already_allocated_gib": 23.58, "reserved_gib": 29.08}},
    "42_models_3316.txt": {"expect": {"abrupt_end"}},
    "43_FastMaskRCNN_172.txt": {"expect": {"crash_killed", "abrupt_end"}},
    "44_dreamerv3_203.txt": {"expect": {"crash_killed", "abrupt_end"}},
    "45_stoke_31.txt": {"expect": {"crash_killed"}},
}

# a "healthy" log may carry notes, not warnings about its training
_HEALTHY_OK = {"insufficient_data", "sparse_eval", "source_damaged", "abrupt_end", "epoch_boundary_drop", "config_risk"}


def _emittable() -> set[str]:
    return {s for spec in registered().values() for s in spec.signatures}


def test_every_issue_log_has_a_case():
    needs_shared(ISSUE_LOGS)
    on_disk = {p.name for p in ISSUE_LOGS.glob("*.txt")}
    assert on_disk == set(CASES), sorted(on_disk ^ set(CASES))


@pytest.mark.parametrize("name", sorted(CASES))
def test_issue_log_series(name):
    """What the importer reads: steps, points, first non-finite step, a jump: independent of the detectors."""
    needs_shared(ISSUE_LOGS)
    case = CASES[name]
    frame = load(ISSUE_LOGS / name)
    info = next(iter(catalog(frame).values()))
    for metric, n in case.get("points", {}).items():
        assert len(series(frame, metric)) == n, (metric, series(frame, metric))
    for metric, steps in case.get("steps", {}).items():
        assert series(frame, metric).index.tolist() == steps
    for metric, step in case.get("first", {}).items():
        s = series(frame, metric)
        bad = s.index[~np.isfinite(s.to_numpy())]
        assert len(bad) and int(bad[0]) == step, (metric, s)
    if "jump" in case:
        metric, factor = case["jump"]
        v = series(frame, metric).to_numpy()
        v = np.where(np.isfinite(v), v, np.inf)
        assert np.max(v[1:] / v[:-1]) >= factor
    if "max_steps" in case:
        assert info.max_steps == case["max_steps"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_issue_log_diagnosis(name):
    needs_shared(ISSUE_LOGS)
    case = CASES[name]
    report = analyze(ISSUE_LOGS / name)
    assert len(report.runs) == 1 and not report.runs[0].errors, report.runs[0].errors
    findings = report.runs[0].findings
    got = {f.signature for f in findings}
    got |= {f"crash_{f.evidence.get('kind')}" for f in findings if f.signature == "crash"}
    known = case.get("known", {})
    for sig in case.get("forbid", set()):
        assert not [f for f in findings if f.signature == sig and f.severity >= Severity.WARNING], (sig, findings)
    for sig in case.get("forbid_critical", set()):
        assert not [f for f in findings if f.signature == sig and f.severity >= Severity.CRITICAL], sig
    for f in findings:
        if f.signature == "crash" and "evidence" in case:
            for k, v in case["evidence"].items():
                assert math.isclose(f.evidence[k], v, rel_tol=1e-3), (k, f.evidence)
    problems = []
    if case.get("healthy"):
        noisy = [f for f in findings if f.severity >= Severity.WARNING and f.signature not in _HEALTHY_OK]
        problems += [f"{f.signature} ({f.severity}) on a healthy log" for f in noisy if f.signature not in known]
        known_hits = [f.signature for f in noisy if f.signature in known]
    else:
        known_hits = []
    missing = sorted(case.get("expect", set()) - got)
    emittable = _emittable()
    pending = [s for s in missing if s.split("_")[0] != "crash" and s not in emittable]
    missing_known = [s for s in missing if s in known]
    missing = [s for s in missing if s not in pending and s not in known]
    assert not missing, f"{name}: expected {missing}, got {sorted(got)}"
    assert not problems, problems
    if pending or missing_known or known_hits:
        reasons = [f"no registered detector emits {s} yet" for s in pending]
        reasons += [f"{s}: {known[s]}" for s in missing_known + known_hits]
        pytest.xfail("; ".join(reasons))
