"""The console importer reads the two shapes that make up nearly all of an HF log (bare tqdm bars, one-line dicts of
numbers) in bulk, and a log a chunk at a time. Neither may change what a log says: the bulk readers must give what
the line grammars give, line for line, and a log read in pieces must give what it gives read whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autopsy.importers import _console_stream, console

SHARED = Path(__file__).resolve().parents[2] / "shared"
HERE = Path(__file__).resolve().parent


def _read(pieces: list[str]) -> str:
    """Frame rows and run info of a log given in pieces, as one comparable JSON text."""
    got = console._parse(iter(pieces), run="r", file="f")
    rows = got.frame[["metric", "raw_metric", "step", "value", "superseded"]].astype(str).values.tolist()
    return json.dumps({"rows": rows, "info": got.runs["r"].to_dict()}, sort_keys=True, default=str)


def _by_the_line_grammars(monkeypatch: pytest.MonkeyPatch, pieces: list[str]) -> str:
    """The same, with the bulk readers off: every line goes through the line grammars."""
    with monkeypatch.context() as m:
        m.setattr(_console_stream, "BAR_ENDS", ("\x00never",))
        m.setattr(_console_stream, "DICT_START", "\x00never")
        return _read(pieces)


def _bar(i: int, n: int) -> str:
    return f" {100 * i // n:3d}%|{'█' * (10 * i // n):<10}| {i}/{n} [00:{i % 60:02d}<01:{i % 60:02d},  7.30it/s]"


# the shapes of HF-like logs, with the near-misses that must go to the line grammars
_LINES = st.sampled_from(
    [
        "{'loss': 1.25, 'grad_norm': 0.5, 'learning_rate': 4.9e-05, 'epoch': 0.01}",
        "{'loss': nan, 'grad_norm': inf, 'learning_rate': 1e-05, 'epoch': 0.02}",
        "{'loss': '0.75', 'grad_norm': '1.5', 'learning_rate': '2e-05', 'epoch': '0.5'}",  # HF 5.x strings
        "{'eval_loss': 1.4, 'eval_runtime': 11.36, 'eval_steps_per_second': 11.0, 'epoch': 0.5}",
        "{'loss': 2.0, 'step': 7}",
        "{'train_runtime': 10.5, 'train_loss': 1.2, 'epoch': 1.0}",
        "{'loss': 1.0, 'loss': 3.0, 'epoch': 0.3}",  # a key twice: its first place, its last value
        "{'loss': 1.0, 'note': 'a/b'}",  # text values are not numbers
        "{'a}': 1.0, 'loss': 2.0}",  # a brace inside a key ends the dict there
        "{'loss': 1.0} Training completed. Do not forget to share your model",
        "{'loss': 1.0, 'grad_norm': 0.25",  # wrapped by the terminal...
        "'learning_rate': 3e-05, 'epoch': 0.4}",  # ...over two lines
        "{'loss': 0.5,'grad_norm':0.1}",  # odd spacing
        "{'loss': 1_000, 'x': 0x10}",
        "{}",
        "",
        "  5%|▌         | 5/100 [00:02<00:40,  2.30it/s]",
        " 50%|█████     | 50/100 [00:20<00:20,  2.50s/it]",
        "  0%|          | 0/125 [00:00<?, ?it/s]",
        " 10%|█         | 10/100 [00:04<00:36,  2.30it/s, loss=1.5]",  # a postfix: a record of its own
        "Epoch 1:  10%|█         | 10/100 [00:04<00:36,  2.30it/s]",  # a description
        " 10%|█         | 10/100 [00:04<00:36,  2.30it/s] ",
        " 10%|█         | 10/100 [1<2,  2.30it/s]",
        "***** Running training *****",
        "  Total optimization steps = 100",
        "  Num update steps per epoch = 50",
        "| Step | Training Loss | Validation Loss |",
        "|------|---------------|-----------------|",
        "| 10 | 1.5 | 1.7 |",
        "Epoch 2/10",
        "12 1.5",
        "step 3 loss 1.25 lr 0.001",
        "Gradient overflow.  Skipping step, loss scaler 0 reducing loss scale to 32768.0",
        "Current loss scale already at minimum - cannot decrease scale anymore. Exiting run.",
        "Traceback (most recent call last):",
        "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB",
        "# a note around a pasted log",
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.one_of(_LINES, st.builds(_bar, st.integers(0, 100), st.sampled_from([100, 125])))),
    st.integers(1, 400),
)
def test_bulk_readers_give_what_the_line_grammars_give(monkeypatch, lines, piece):
    """Any mix of the shapes, cut into pieces of any size (a chunk's last lines are held back and read with the
    next): the bulk readers and the line grammars make the same frame and the same run info."""
    text = "\n".join(lines) + "\n"
    pieces = [text[k : k + piece] for k in range(0, len(text), piece)] or [""]
    assert _read(pieces) == _by_the_line_grammars(monkeypatch, [text])


def _console_logs() -> list[Path]:
    found = sorted((SHARED / "issue-logs").glob("*.txt")) + sorted((SHARED / "labelled-runs").glob("console-logs/*"))
    return found + sorted((HERE / "real" / "console-logs").glob("*"))


@pytest.mark.parametrize("path", _console_logs(), ids=lambda p: p.name)
def test_real_logs_read_in_chunks_as_read_whole(monkeypatch, path):
    """Each real console log, read from disk in 4 KiB chunks, says what its whole text says to the line grammars."""
    text = console._line_breaks(console._clean(path.read_bytes().decode("utf-8", errors="replace")))
    with monkeypatch.context() as m:
        m.setattr(console, "_CHUNK", 4096)
        notes: list[str] = []
        with path.open("rb") as fh:
            chunked = _read(list(console._text_chunks(fh, str(path), notes)))
    assert chunked == _by_the_line_grammars(monkeypatch, [text])


def test_a_long_log_keeps_only_its_tail_for_the_crash(tmp_path):
    """Lines after the last record are kept for the crash they may hold, and no more than TAIL_LINES of them."""
    path = tmp_path / "train.log"
    filler = "".join(f"warning {k}: nothing to see\n" for k in range(_console_stream.TAIL_LINES + 500))
    path.write_text("{'loss': 1.0, 'epoch': 0.1}\n" + filler + "Traceback (most recent call last):\nKeyError: 'x'\n")
    got = console.read([path], run="r")
    crash = got.runs["r"].crash
    assert crash is not None and crash.exception == "KeyError"
    assert crash.line == _console_stream.TAIL_LINES + 500 + 2  # the traceback's line, counted from the file's start
