"""One voice in every format: no sentence said twice in a run's report, no advice that contradicts the run's config.

Run over every bundled fixture and every real log in ../shared (and the grown corpus in tests/real): the console
(default and ``-v``), Markdown and HTML text of each run are split into sentences, and each finding's summary, cause
and fix are checked against the run's own config and checkpoints. The rules are what a reader would object to:

- a sentence of five or more words said twice in one run's section (evidence quoting the log is left out: it is a
  quote, and a log repeats itself);
- a phrase doubled in place ("at offset 12 at offset 12", "KeyError: KeyError:"), or a cause that only repeats the
  summary;
- a fix that asks for a setting the run already has (``max_grad_norm=1.0`` to a run clipping at 1.0), "bf16 instead of
  fp16" to a run that did not use fp16, a fine-tuning LR range quoted to a run trained from scratch;
- restart advice that contradicts the checkpoints ("restart from scratch" when a checkpoint before the failure is
  known), or a headline step that is not the "first bad step".
"""

from __future__ import annotations

import html as html_lib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

import autopsy
from autopsy.report import render
from autopsy.report.summary import summarize
from autopsy.runinfo import trains_from_scratch
from helpers.paths import REPO, RUNS, SHARED

_SKIP_NAMES = ("SOURCES", "LABELS", "README", "expected", "score")


def _inputs() -> list[Path]:
    roots = [RUNS, SHARED / "real-logs", SHARED / "labelled-runs" / "trainer_state",
             SHARED / "labelled-runs" / "console-logs", SHARED / "issue-logs", REPO / "tests" / "real" / "trainer_state",
             REPO / "tests" / "real" / "console-logs"]
    out = []
    for root in roots:
        if root.is_dir():
            out += [p for p in sorted(root.iterdir()) if not p.name.startswith(_SKIP_NAMES) and p.suffix != ".md"]
    return out


INPUTS = _inputs()
_CACHE: dict[Path, autopsy.Report] = {}


def _report(path: Path) -> autopsy.Report:
    if path not in _CACHE:
        _CACHE.clear()  # one input at a time: the parametrized tests of one input run together
        _CACHE[path] = autopsy.analyze(path)
    return _CACHE[path]


def _sentences(text: str) -> list[str]:
    text = re.sub(r"[*`#|>]+", " ", text)
    text = re.sub(r"\s+", " ", text)
    parts = re.split(r"(?<=[.;!?])\s+|(?<=:)\s+(?=[a-z])|\s+·\s+|\s+—\s+", text)
    return [p.strip(" .;:") for p in parts if len(p.split()) >= 5]


def _repeated(text: str) -> list[str]:
    return [s for s, k in Counter(_sentences(text)).items() if k > 1]


def _markdown_prose(md: str) -> str:
    """The Markdown without the evidence bullets (quotes of the log) and the skipped-detector list."""
    out, evidence = [], False
    for line in md.splitlines():
        if line.startswith("### "):
            evidence = line.strip() in ("### Evidence", "### Replay", "### Config", "### Sources read")
        if line.startswith("<details>"):
            evidence = True
        if not evidence or line.startswith(("- **Cause:**", "- **Fix:**")):
            out.append(line)
    return "\n".join(out)


def _html_prose(page: str) -> str:
    page = re.sub(r"<(script|style)\b.*?</\1>", " ", page, flags=re.S)
    page = re.sub(r'<(?P<tag>\w+)[^>]*class="[^"]*\b(evidence|config|sources|skipped|plot|chart)\b[^"]*"[^>]*>.*?</(?P=tag)>',
                  " ", page, flags=re.S)
    page = re.sub(r"<(br|/p|/li|/tr|/div|/h\d|/td|/th|/summary)\b[^>]*>", ". ", page)
    return html_lib.unescape(re.sub(r"<[^>]+>", " ", page))


def _without_log_quotes(text: str) -> str:
    """The console text without the evidence that quotes the log (a crash's message and the tail block under it)."""
    out, tail_indent = [], None
    for line in text.splitlines():
        body = line.lstrip()
        indent = len(line) - len(body)
        if tail_indent is not None and indent > tail_indent:
            continue
        tail_indent = indent if body.startswith("tail:") else None
        if not body.startswith(("tail:", "message:")):
            out.append(line)
    return "\n".join(out)


def _id(p: Path) -> str:
    return f"{p.parent.name}/{p.name}"


@pytest.mark.slow
@pytest.mark.parametrize("path", INPUTS, ids=_id)
def test_no_sentence_is_said_twice_in_a_run(path):
    report = _report(path)
    for run in report.runs:
        one = autopsy.Report(runs=[run], version=report.version)
        texts = {
            "console": render(one, "console", width=100),
            "console -v": render(one, "console", width=100, verbosity=1),
            "markdown": _markdown_prose(render(one, "markdown")),
            "html": _html_prose(render(one, "html", plots=False)),
        }
        for fmt, text in texts.items():
            if fmt == "console -v":  # -v adds the evidence: quotes of the log may say what the summary says
                text = _without_log_quotes(text)
            assert not _repeated(text), (run.run, fmt, _repeated(text))


_DOUBLED = re.compile(r"\b((?:\w+\W+){1,5}?\w+)\s+\1\b|\b(\w+):\s*\2:", re.I)


def _setting_value(v: object) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        return f"{float(v):g}"
    return str(v)


def _advice_contradictions(run, sm) -> list[str]:
    cfg = run.config or {}
    problems = []
    for f in run.findings:
        for text in (f.cause or "", f.fix or ""):
            for name, value in re.findall(r"\b([a-z][a-z0-9_]+)=([\w.+-]+)", f.fix or ""):
                if name in cfg and name not in ("learning_rate",) and text is f.fix:
                    have = _setting_value(cfg[name])
                    want = _setting_value(float(value)) if re.fullmatch(r"[\d.e+-]+", value) else value
                    if have == want and "(the run has" not in f.fix:
                        problems.append(f"{f.signature}: fix asks for {name}={value}, the run has it")
        if "instead of fp16" in (f.fix or "") and cfg.get("fp16") is False and "train/loss_scale" not in set(
            run.frame["metric"].astype(str)
        ):
            problems.append(f"{f.signature}: bf16-instead-of-fp16 to a run with fp16=False")
        if "fine-tun" in f"{f.summary} {f.fix}" and run.info is not None and trains_from_scratch(run.info):
            problems.append(f"{f.signature}: a fine-tuning range quoted to a run trained from scratch")
        if f.cause and f.cause.strip(" .") == f.summary.strip(" ."):
            problems.append(f"{f.signature}: the cause repeats the summary")
        for text in (f.summary, f.cause or "", f.fix or ""):
            m = _DOUBLED.search(text)
            if m and not re.fullmatch(r"[\d.\s]+", m.group(0)):
                problems.append(f"{f.signature}: doubled phrase {m.group(0)!r}")
    restart = sm.restart or ""
    if "restart from scratch" in restart and sm.lead is not None and run.info is not None:
        before = [s for s in run.info.checkpoints if s < sm.lead.step and s not in run.info.bad_checkpoints]
        if before:
            problems.append(f"'{restart}' while checkpoints {before} come before the failure")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("path", INPUTS, ids=_id)
def test_advice_agrees_with_the_run(path):
    report = _report(path)
    data = json.loads(render(report, "json"))
    for run, rj in zip(report.runs, data["runs"], strict=True):
        sm = summarize(run)
        assert not _advice_contradictions(run, sm), (run.run, _advice_contradictions(run, sm))
        lead = sm.lead
        assert rj["status"] == sm.status
        if lead is not None:
            assert rj["first_bad_step"] == lead.step  # the headline's step is the first bad step, in every format
            console = render(autopsy.Report(runs=[run], version=report.version), "console", width=100)
            assert f"{lead.signature} at step {lead.step}" in console or lead.step is None
            if lead.step is not None:
                assert f"first bad step {lead.step}" in " ".join(console.split())


def test_the_corpus_is_here():
    """The voice tests cover the bundled fixtures at least (and ../shared where it is beside the repo)."""
    assert any(p.parent == RUNS for p in INPUTS)
