"""The ``autopsy`` command line (typer). Thin: parse, call the library, render, exit 0/1/2."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, cast

import typer

from autopsy.errors import AutopsyError, InputError, UsageError

app = typer.Typer(
    name="autopsy",
    help="Postmortem of a training run: what went wrong, at which step, why, and the fix.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from autopsy._version import __version__

        typer.echo(f"autopsy {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors (for bug reports).")] = False,
) -> None:
    """Postmortem of a training run: what went wrong, at which step, why, and the fix."""


def _parse_params(items: list[str]) -> dict[str, str]:
    """``DETECTOR.NAME=VALUE`` pairs; the values stay text: the registry converts each to its parameter's type."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param takes DETECTOR.NAME=VALUE, got {item!r}")
        out[key.strip()] = raw.strip()
    return out


def _fail_level(text: str) -> Any:
    """``--fail-on``: a severity, or None for ``never``."""
    from autopsy.findings import Severity

    word = text.strip().upper()
    if word == "NEVER":
        return None
    if word not in Severity.__members__:
        raise UsageError(f"--fail-on {text!r}: use info, warning, error, critical or never")
    return Severity[word]


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _emit(text: str, out: Path | None) -> None:
    if out is None:
        sys.stdout.write(text)
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None
    typer.echo(f"report written to {out}", err=True)


def _check_out(out: Path | None, paths: list[Path]) -> None:
    """autopsy never writes into a run directory: refuse an ``--out`` inside one of the analysed directories."""
    if out is None:
        return
    target = out.resolve()
    for p in paths:
        if "://" in str(p) or not p.is_dir():
            continue
        run_dir = p.resolve()
        if target == run_dir or run_dir in target.parents:
            raise UsageError(
                f"--out {out} is inside the analysed directory {p}: autopsy never writes into a run directory; "
                "write the report elsewhere"
            )


def _nothing_to_judge(report: Any) -> str | None:
    """The one-line error when no run holds anything to judge because every file read is not a training log."""
    runs = report.runs
    if not runs or any(r.frame is not None and not r.frame.empty for r in runs):
        return None
    unread = [u for r in runs if r.info is not None for u in r.info.unread_logs]
    if not unread or any(r.info is None or not r.info.unread_logs or len(r.sources) > 1 for r in runs):
        return None
    u = unread[0]
    more = f" (and {len(unread) - 1} more file(s))" if len(unread) > 1 else ""
    return f"{u.file} is not a training log autopsy reads: no metric line in its {u.lines} line(s){more}"


def _pick_format(fmt: str | None, out: Path | None) -> str:
    if fmt:
        f = fmt.lower()
        if f == "md":
            f = "markdown"
        if f not in ("console", "markdown", "json", "html"):
            raise UsageError(f"unknown format {fmt!r}: use console, markdown, json or html")
        return f
    if out is not None:
        from autopsy.report import EXTENSIONS

        if out.suffix.lower() not in EXTENSIONS:
            raise UsageError(
                f"--out {out}: unknown extension {out.suffix or '(none)'!r}; use .html, .md, .json or .txt "
                "(analyze also writes a table: .csv, .parquet), or pass --format"
            )
        return EXTENSIONS[out.suffix.lower()]
    return "console"


def _width() -> int:
    """The console report's width: the terminal's (rich reads it, and ``COLUMNS``), else ``COLUMNS``, else 80."""
    import os

    if sys.stdout.isatty():
        from rich.console import Console

        return Console().width
    cols = os.environ.get("COLUMNS", "")
    return int(cols) if cols.isdigit() and int(cols) >= 40 else 80


def _render(report: Any, fmt: str, out: Path | None, *, plots: bool = True, **console: Any) -> str:
    from autopsy.report import render

    if fmt == "console":
        color = out is None and sys.stdout.isatty()
        return render(report, "console", color=color, width=80 if out is not None else _width(), **console)
    if fmt == "html":
        return render(report, "html")
    if fmt == "markdown":
        plots_dir = out.parent / (out.stem + "_plots") if plots and out is not None else None
        return render(report, "markdown", plots_dir=plots_dir)
    return render(report, fmt)


def _progress(label: str) -> Any:
    """A spinner on stderr while a step takes a moment (only on a terminal: logs and pipes stay clean)."""
    import contextlib

    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(label)


def _fleet_flags(storage_options: str | None, state: Any, tag: Any, sweep: str | None, since: str | None) -> Any:
    """The fleet's flags, checked and parsed before any file is read: storage options, W&B project filters."""
    from autopsy.fleet.remote import parse_storage_options
    from autopsy.importers.wandb_api import RunFilter, parse_since

    runs = RunFilter(states=tuple(_split(state)), tags=tuple(_split(tag)), sweep=sweep, since=parse_since(since))
    return {"storage_options": parse_storage_options(storage_options), "wandb_filter": runs}


def _analyze_many(paths: list[Path], scheduler: str | None, **options: Any) -> Any:
    """Every run of ``paths`` analysed by :func:`autopsy.fleet.analyze_many`: on the Dask cluster at ``scheduler``
    when given, else in ``jobs`` processes, with a progress bar on a terminal."""
    from autopsy.fleet import analyze_many
    from autopsy.fleet.output import progress_bar
    from autopsy.fleet.runner import connect

    client = connect(scheduler)
    try:
        with progress_bar() as progress:
            return analyze_many(paths, client=client, progress=progress, **options)
    finally:
        if client is not None:
            client.close()


# The options, as every command takes them
_Paths = Annotated[
    list[Path],
    typer.Argument(
        help="Run directories, checkpoint dirs, log files, s3:// (any fsspec) URLs, wandb://entity/project\\[/run_id].",
        show_default=False,
    ),
]
_Format = Annotated[
    str | None,
    typer.Option(
        "--format", "-f", help="console, markdown, json or html (default: from --out's extension, else console)."
    ),
]
_Out = Annotated[Path | None, typer.Option("--out", "-o", help="Write the report to this file instead of stdout.")]
_FailOn = Annotated[
    str,
    typer.Option(
        "--fail-on",
        help="Exit 1 when a finding reaches this severity: info, warning, error (default: a FAILED or unhealthy "
        "run), critical, or never.",
    ),
]
_Select = Annotated[
    list[str] | None, typer.Option("--select", help="Only these signatures or detectors (repeat or comma-separate).")
]
_Ignore = Annotated[list[str] | None, typer.Option("--ignore", help="Leave out these signatures or detectors.")]
_Param = Annotated[
    list[str] | None, typer.Option("--param", "-p", help="Override a detector parameter: DETECTOR.NAME=VALUE.")
]
_Engine = Annotated[str, typer.Option("--engine", help="TensorBoard reader: auto, fast or tbparse.")]
_NoPlots = Annotated[bool, typer.Option("--no-plots", help="Markdown: do not write plot images.")]
_Verbose = Annotated[
    int,
    typer.Option(
        "--verbose", "-v", count=True, help="Console: -v adds the evidence, damage and notes; -vv everything."
    ),
]
_Summary = Annotated[
    bool, typer.Option("--summary", help="Console, several runs: only the summary table and the count line.")
]
_Details = Annotated[
    bool, typer.Option("--details", help="Console, several runs: a section for every run, healthy ones too.")
]
_Jobs = Annotated[int | None, typer.Option("--jobs", "-j", help="Runs at once (processes; default: cores).")]
_Scheduler = Annotated[str | None, typer.Option("--scheduler", help="A Dask scheduler's address.")]
_Storage = Annotated[str | None, typer.Option("--storage-options", help="JSON: s3:// options.")]
_State = Annotated[list[str] | None, typer.Option("--state", help="W&B project: only runs in these states.")]
_Tag = Annotated[list[str] | None, typer.Option("--tag", help="W&B project: only runs with these tags.")]
_Sweep = Annotated[str | None, typer.Option("--sweep", help="W&B project: only this sweep's runs.")]
_Since = Annotated[str | None, typer.Option("--since", help="W&B project: only runs created since DATE.")]


@app.command()
def analyze(
    paths: _Paths,
    format: _Format = None,
    out: _Out = None,
    fail_on: _FailOn = "error",
    select: _Select = None,
    ignore: _Ignore = None,
    param: _Param = None,
    engine: _Engine = "auto",
    no_plots: _NoPlots = False,
    verbose: _Verbose = 0,
    summary: _Summary = False,
    details: _Details = False,
    jobs: _Jobs = None,
    scheduler: _Scheduler = None,
    storage_options: _Storage = None,
    state: _State = None,
    tag: _Tag = None,
    sweep: _Sweep = None,
    since: _Since = None,
) -> None:
    """Diagnose one or more training runs from the logs they left behind."""
    from autopsy.analysis import make_plan
    from autopsy.fleet.output import TABLE_FORMATS
    from autopsy.importers import ReadOptions

    table = out is not None and out.suffix.lower() in TABLE_FORMATS and format is None
    fmt = "table" if table else _pick_format(format, out)
    level = _fail_level(fail_on)
    _check_out(out, paths)
    chosen, dropped, params = _split(select) or None, _split(ignore), _parse_params(param or [])
    make_plan(chosen, dropped, params)  # every flag checked before any file is read
    ReadOptions(engine=engine)
    fleet = _fleet_flags(storage_options, state, tag, sweep, since)
    keep = 20 if fmt == "html" or (fmt == "markdown" and not no_plots) else False  # per-run plots need the frames
    report = _analyze_many(paths, scheduler, jobs=jobs, select=chosen, ignore=dropped, params=params, engine=engine,
                           keep_frames=keep, **fleet)  # fmt: skip
    _write_many(report, fmt, out, plots=not no_plots, verbosity=verbose, summary_only=summary, details=details or None)
    if level is not None and report.reaches(level):
        raise typer.Exit(1)


def _write_many(report: Any, fmt: str, out: Path | None, *, plots: bool, **console: Any) -> None:
    """Write the report of :func:`analyze` (a table file, or a report in ``fmt``); raise :class:`InputError` after
    writing when the input held nothing to judge."""
    from autopsy.fleet.output import fleet_text, write_table

    if fmt == "table":
        typer.echo(f"table written to {write_table(report, cast(Path, out))}", err=True)
        return
    with _progress(f"writing the {fmt} report ..."):
        plots = plots and not getattr(report, "frames_dropped", False)  # over 20 runs: small multiples
        text = _render(report, fmt, out, plots=plots, **console)
    nothing = _nothing_to_judge(report)
    if nothing is not None and fmt == "console":
        raise InputError(nothing)
    _emit(fleet_text(report) + text if fmt == "console" else text, out)
    if nothing is not None:
        raise InputError(nothing)


def _finish(report: Any, fmt: str, out: Path | None, fail_on: str) -> None:
    level = _fail_level(fail_on)
    _emit(_render(report, fmt, out, plots=False), out)
    if level is not None and report.reaches(level):
        raise typer.Exit(1)


@app.command()
def replay(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint (model or PEFT adapter), or a run dir recorded with AutopsyCallback.")
    ],
    batch: Annotated[Path | None, typer.Option("--batch", "-b", help="A batch file (safetensors).")] = None,
    base: Annotated[Path | None, typer.Option("--base", help="Local base model dir of a PEFT adapter.")] = None,
    device: Annotated[str | None, typer.Option(help="auto (GPU, else GPU+RAM, else CPU), cpu, cuda or cuda:N.")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, float16 or bfloat16 (default: the run's).")] = None,
    step: Annotated[int | None, typer.Option(help="The recorded step (default: the first non-finite one).")] = None,
    generate: Annotated[bool, typer.Option("--generate", help="Checkpoint health: greedy samples checked.")] = False,
    prompts: Annotated[Path | None, typer.Option(help="With --generate: a file, one prompt a line.")] = None,
    from_checkpoint: Annotated[
        str | None,
        typer.Option("--from", help="Step replay: re-run the recorded steps after this checkpoint-N of the run dir."),
    ] = None,
    format: _Format = None,
    out: _Out = None,
    fail_on: _FailOn = "error",
) -> None:
    """Reload a checkpoint and a batch, and localize the module where the first NaN/Inf is born."""
    from autopsy.replay import check_arguments
    from autopsy.replay import replay as run_replay

    fmt = _pick_format(format, out)
    _fail_level(fail_on)
    flags: dict[str, Any] = dict(batch=batch, base=base, device=device, from_checkpoint=from_checkpoint, step=step)
    check_arguments(checkpoint, generate=generate, prompts=prompts, dtype=dtype, **flags)  # before torch is imported
    _finish(run_replay(checkpoint, generate=generate, prompts=prompts, dtype=dtype, **flags), fmt, out, fail_on)


@app.command()
def data(
    dataset: Annotated[Path, typer.Argument(help="A .jsonl, .parquet, .arrow, save_to_disk dir or recorded batch.")],
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer dir, to count the tokens of text rows.")] = None,
    max_length: Annotated[int | None, typer.Option(help="The run's max sequence length: flags truncated rows.")] = None,
    format: _Format = None,
    out: _Out = None,
    fail_on: _FailOn = "error",
) -> None:
    """Check a dataset for rows that cannot train as meant: empty, masked out, truncated, duplicated."""
    from autopsy.data import data_report

    fmt = _pick_format(format, out)
    _fail_level(fail_on)
    _finish(data_report(dataset, tokenizer=tokenizer, max_length=max_length), fmt, out, fail_on)


@app.command()
def detectors(
    name: Annotated[str | None, typer.Argument(help="Show one detector's full documentation.")] = None,
) -> None:
    """List every detector with its signatures, parameters and docs."""
    from autopsy.detectors import get_detector, registered

    specs = [get_detector(name)] if name else list(registered().values())
    for spec in specs:
        params = ", ".join(f"{k}: {p.type_name} = {p.default!r}" for k, p in spec.params.items()) or "none"
        needs = ", ".join(spec.requires) or (" or ".join(spec.requires_any)) or "-"
        typer.echo(f"{spec.name}  [{', '.join(spec.signatures)}]")
        typer.echo(f"    needs: {needs}")
        typer.echo(f"    params: {params}")
        if name:
            typer.echo("")
            typer.echo("    " + spec.doc.replace("\n", "\n    "))
        else:
            typer.echo(f"    {spec.summary}")
        typer.echo("")


def _one_line(text: str) -> str:
    """A message on one line: a newline inside it (a path may hold one) is written as ``\\n``."""
    return text.strip().replace("\r", "\\r").replace("\n", "\\n")


def main(argv: list[str] | None = None) -> int:
    """Entry point: every AutopsyError becomes one line on stderr and exit 2 (traceback with --debug)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        with warnings.catch_warnings():
            if not debug:  # numpy/pandas warnings about NaN-laden series are noise to a user (--debug shows them)
                warnings.simplefilter("ignore")
            rc = app(args=args, prog_name="autopsy", standalone_mode=False)
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except AutopsyError as exc:
        if debug:
            raise
        sys.stderr.write(f"autopsy: error: {_one_line(str(exc))}\n")
        return exc.exit_code
    except BrokenPipeError:  # `autopsy analyze ... | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        sys.stderr.write("autopsy: interrupted\n")
        return 130
    except Exception as exc:
        if type(exc).__name__ == "Abort":
            sys.stderr.write("autopsy: aborted\n")
            return 2
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # click's usage errors
            sys.stderr.write(f"autopsy: error: {_one_line(exc.format_message())}\n")
            return 2
        if debug:
            raise
        sys.stderr.write(
            f"autopsy: internal error: {type(exc).__name__}: {_one_line(str(exc))[:300]} "
            "(run with --debug for the traceback and report it)\n"
        )
        return 2
    return int(rc) if isinstance(rc, int) else 0


def run() -> None:
    sys.exit(main())
