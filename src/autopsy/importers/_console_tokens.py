"""The tokens of :mod:`autopsy.importers._console_formats`' line grammars: numbers, keys, step counters, phases,
loss-scale messages, the HF banner and config lines, as compiled regular expressions."""

from __future__ import annotations

import re

# --- tokens -------------------------------------------------------------------------------------------

_NUM = r"[-+]?(?:nan(?:\.0)?|inf(?:inity)?|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?![a-z\d])"
_WORD = r"\[?[A-Za-z][\w./\-]*\]?"
# a value ends at a delimiter, or where a glued word starts with a capital ("0.2445Epoch 1/1000")
_END = r"(?=$|[\s,;|)\]}(%:*`']|[A-Z])"
PAIR = re.compile(
    rf"(?<![\w.\-])(?:(?P<k1>{_WORD}(?: {_WORD}){{0,3}})\s*[:=]\s*|(?P<k2>{_WORD})\s+)\[?(?P<v>{_NUM})\]?{_END}",
    re.IGNORECASE,
)
# cheap pre-filter: a line that could be a metric record
RECORD_HINT = re.compile(r"loss|norm|learning|lr\b|scale|acc|\bppl\b|\btrain|skipped", re.IGNORECASE)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\^\[\[[0-9;]*[A-Za-z]|\x1b[()][A-Z0-9]")
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]+")  # control bytes (tab, \n, \r kept), U+FFFD
# markdown around a pasted log: "> " quote prefixes, a code fence glued to the first or last line
QUOTE = re.compile(r"^\s*(?:>\s?)+|^\s*`{3}\w*\s*|`{3}\s*$|^`(?=\S)")
# a glog prefix (Caffe, TF C++): "I1010 17:36:18.471521 24907 solver.cpp:160] "
GLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ [\w.]+:\d+\] ")

DICT_PAIR = re.compile(r"'(?P<k>[^'\n]+)'\s*:\s*(?P<v>'[^']*'|\"[^\"]*\"|[^,}]+)")

EPOCH = re.compile(r"\bepoch\b(?:\(train\))?\s*:?\s*\[?\s*(?P<e>\d+)(?:\s*/\s*(?P<etot>\d+))?\s*\]?", re.IGNORECASE)
COUNTER = re.compile(r"(?P<i>\d+)\s*/\s*(?P<n>\d+)")
ITER_COUNTER = re.compile(r"\b(?:iteration|iter|step|global step)\s*[:=]?\s*(?P<i>\d+)\s*/\s*(?P<n>\d+)", re.IGNORECASE)
TQDM = re.compile(r"(?P<i>\d+)/(?P<n>\d+) \[(?:\d+:)?\d+:\d+<")
KERAS_HEADER = re.compile(r"^\s*Epoch (?P<e>\d+)/(?P<etot>\d+)\s*$")
# the phase of a line, when it names one before its values: "Eval Epoch: 1 [...] Loss:", "Test net output #0:"
PHASE = re.compile(r"\b(?P<p>eval|evaluation|evaluating|valid|validation|validating|val|test|testing)\b", re.IGNORECASE)
TRAIN_WORD = re.compile(r"\btrain", re.IGNORECASE)
# Tacotron2 / WaveGlow: "Validation loss 6312:  0.149928" (the iteration, then the value)
VAL_AT_ITER = re.compile(rf"\b(?:validation|val|eval|test) loss (?P<s>\d+)\s*:\s*(?P<v>{_NUM})", re.IGNORECASE)
# whitespace tables with an Epoch header and "e/E" rows (YOLOv5/v7/v8): "Epoch gpu_mem box obj cls total ..."
WS_HEADER = re.compile(r"^\s*Epoch\s+\S+(?:\s+\S+){2,}\s*$")
WS_ROW = re.compile(r"^\s*(?P<e>\d+)/(?P<n>\d+)\s+\S")
HEADER_WORD = re.compile(r"[A-Za-z][\w.@-]*")
# bare numeric columns: "<step> <loss> [more numbers]"
NUMERIC_ROW = re.compile(rf"^\s*(?P<s>\d+)(?:[\s,]+{_NUM}){{1,4}}\s*$", re.IGNORECASE)
LOG_TAG = re.compile(r"^(?:[A-Z]{2,}\s+)+(?=\S)")  # "PARAMETER loss_scale", "DLL ..." tags before a key

STEP_KEYS = {
    "step",
    "global_step",
    "num_updates",
    "iteration",
    "iter",
    "steps",
    "update",
    "global_steps",
    "it",
    "train_step",
    "trainer/global_step",
}
STEP_WORDS = ("iter", "iteration", "step", "steps")
METRIC_WORDS = re.compile(r"loss|acc|lr|norm|rate|time|ppl|scale")

# fp16 dynamic loss scalers: DeepSpeed, apex, fairseq, torch.cuda.amp (via a printed scale)
OVERFLOW = re.compile(
    r"OVERFLOW!.*?Attempted loss scale:\s*(?P<a>" + _NUM + r"),\s*reducing to\s*(?P<ds>" + _NUM + r")"
    r"|Gradient overflow\.\s+Skipping step.*?reducing loss scale to\s*(?P<apex>" + _NUM + r")"
    r"|overflow detected, setting loss scale to:?\s*(?P<fs>" + _NUM + r")",
    re.IGNORECASE,
)
SCALE_FLOOR = re.compile(r"Current loss scale already at minimum", re.IGNORECASE)

# printed configuration: HF's training banner, TrainingArguments repr, yaml/argparse dumps
BANNER = re.compile(r"\*{3,} Running training \*{3,}")
CONFIG_LINE = re.compile(
    r"(?P<k>Num Epochs|Num examples|Num update steps per epoch|Instantaneous batch size per device|Total optimization steps|"
    r"Gradient Accumulation steps|Number of trainable parameters|Total train batch size[^=]*)\s*=\s*(?P<v>[\d,.]+)"
    r"|\b(?P<ck>max_steps|logging_steps|eval_steps|save_steps|num_train_epochs|learning_rate|max_grad_norm|"
    r"per_device_train_batch_size|gradient_accumulation_steps|warmup_steps|warmup_ratio|max_seq_length|"
    r"max_length|model_max_length|cutoff_len|sequence_len|seq_length|fp16|bf16|gradient_checkpointing)"
    r"\s*[=:]\s*(?P<cv>True|False|true|false|" + _NUM + r")\b"
)
PEFT_PARAMS = re.compile(r"trainable params:\s*(?P<t>[\d,]+)\s*\|\|\s*all params:\s*(?P<a>[\d,]+)")
BANNER_KEYS = {
    "Num Epochs": "num_train_epochs",
    "Num examples": "num_examples",
    "Num update steps per epoch": "_steps_per_epoch",
    "Instantaneous batch size per device": "per_device_train_batch_size",
    "Total optimization steps": "max_steps",
    "Gradient Accumulation steps": "gradient_accumulation_steps",
    "Number of trainable parameters": "trainable_params",
}
# a run that printed its end: HF's summary dict, Lightning's stop line, LitGPT's training time
FINISHED = re.compile(
    r"'train_runtime'|Training completed\.|`Trainer\.fit` stopped|(?m:^Training time: [\d.]+s$)|"
    r"(?i:training finished)"
)
# notebook progress tables (HF/TRL in Jupyter, copied as text): "Step | Training Loss | ..." then numeric rows
TABLE_HEADER = re.compile(r"^\s*\|?\s*(?:Step|Epoch)\s*(?:\||\t)(?=.*loss)", re.IGNORECASE)

# --- the two shapes of nearly every line of an HF Trainer log, read in bulk ----------------------------
# A bare tqdm bar ("  5%|▌    | 1234/25000 [02:49<54:12,  7.30it/s]"): no description, no postfix, so nothing on it
# but the counter for any other grammar to read.
_STRICT_BAR = (  # possessive (*+, ++): no token can give back what it took, and sre skips the backtracking state
    r"[ \t]*+\d{1,3}+%\|[^|\n/\[A-Za-z_]*+\| *+(\d++)/(\d++) \[\d++:\d++(?::\d++)?+<(?:\d++:\d++(?::\d++)?+|\?),"
    r" *+(?:[\d.]++|\?) ?(?:it/s|s/it)\][ \t]*+"
)
# One match per line of bar-like lines joined with "\n" (lines that end the way a bar does): (n, total) for a bare
# bar, two empty strings for any other line. Run over the text's UTF-8 bytes (twice as fast as over its str): every
# class is ASCII, so a line matches as bytes exactly where it matches as text, but for a bar counted in non-ASCII
# digits, which the line grammars then read.
BAR_LINE = re.compile(rf"^(?:{_STRICT_BAR}$|[^\n]*$)".encode(), re.MULTILINE)
BAR_ENDS = ("it/s]", "s/it]")
DICT_START = "{'"  # a line that starts an HF dict
# What makes a line that starts with an HF dict one for the line grammars after all: a tqdm counter ("["), the end
# of training ("rain": 'train_runtime', "Training completed"), the loss-scale floor, a step key ('step',
# 'global_step/max_steps'); a dict not closed on its line is wrapped, and theirs too.
DICT_LINE_GRAMMAR = ("[", "rain", "minimum", "step")
# DICT_PAIR, for one-line dicts.
BULK_PAIR = re.compile(r"'([^'\n]+)'\s*:\s*('[^'\n]*'|\"[^\"\n]*\"|[^,}\n]+)")
