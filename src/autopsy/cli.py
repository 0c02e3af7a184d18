"""The ``autopsy`` command line (typer). Thin: parse, call the library, render, exit 0/1/2."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from autopsy.errors import AutopsyError, UsageError

app = typer.Typer(
    name="autopsy",
    help="Postmortem of a training run: what went wrong, at which step, why, and the fix.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_EXT_FORMAT = {
    ".json": "json",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".txt": "console",
}


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


def _pick_format(fmt: str | None, out: Path | None) -> str:
    if fmt:
        f = fmt.lower()
        if f == "md":
            f = "markdown"
        if f not in ("console", "markdown", "json", "html"):
            raise UsageError(f"unknown format {fmt!r}: use console, markdown, json or html")
        return f
    if out is not None:
        if out.suffix.lower() not in _EXT_FORMAT:
            raise UsageError(
                f"--out {out}: unknown extension {out.suffix or '(none)'!r}; use .html, .md, .json or .txt, or pass --format"
            )
        return _EXT_FORMAT[out.suffix.lower()]
    return "console"


def _render(report: Any, fmt: str, out: Path | None, *, plots: bool = True, verbose: bool = False) -> str:
    from autopsy.report import render

    if fmt == "console":
        return render(report, "console", color=out is None and sys.stdout.isatty(), verbose=verbose)
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


@app.command()
def analyze(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Run directories, checkpoint dirs, log files, or wandb://entity/project/run_id.", show_default=False
        ),
    ],
    format: Annotated[
        str | None,
        typer.Option(
            "--format", "-f", help="console, markdown, json or html (default: from --out's extension, else console)."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the report to this file instead of stdout.")
    ] = None,
    fail_on: Annotated[
        str | None,
        typer.Option("--fail-on", help="Exit 1 when a finding reaches this severity (info, warning, error, critical)."),
    ] = None,
    select: Annotated[
        list[str] | None,
        typer.Option("--select", help="Only these signatures or detectors (repeat or comma-separate)."),
    ] = None,
    ignore: Annotated[
        list[str] | None, typer.Option("--ignore", help="Leave out these signatures or detectors.")
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="Override a detector parameter: DETECTOR.NAME=VALUE.")
    ] = None,
    engine: Annotated[str, typer.Option("--engine", help="TensorBoard reader: auto, fast or tbparse.")] = "auto",
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Markdown: do not write plot images.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Console: also list skipped detectors.")] = False,
) -> None:
    """Diagnose one or more training runs from the logs they left behind."""
    from autopsy.analysis import analyze as run_analyze
    from autopsy.analysis import make_plan
    from autopsy.findings import Report, Severity
    from autopsy.frame import concat_frames
    from autopsy.importers import ReadOptions, load

    fmt = _pick_format(format, out)
    level = Severity.parse(fail_on) if fail_on else None
    chosen, dropped, params = _split(select) or None, _split(ignore), _parse_params(param or [])
    make_plan(chosen, dropped, params)  # every flag checked before any file is read
    ReadOptions(engine=engine)
    frames = []
    for p in paths:
        spec = str(p)
        if not spec.startswith("wandb:") and not p.exists():
            raise UsageError(f"no such file or directory: {p}")
        with _progress(f"reading {p} ..."):
            frames.append(load(spec if spec.startswith("wandb:") else p, engine=engine))
    frame = concat_frames(frames) if len(frames) > 1 else frames[0]
    with _progress("diagnosing ..."):
        report: Report = run_analyze(frame, select=chosen, ignore=dropped, params=params)
    with _progress(f"writing the {fmt} report ..."):
        text = _render(report, fmt, out, plots=not no_plots, verbose=verbose)
    _emit(text, out)
    if level is not None and report.reaches(level):
        raise typer.Exit(1)


@app.command()
def replay(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="A checkpoint dir (full model or PEFT adapter), or a run's output dir recorded with AutopsyCallback.",
            show_default=False,
        ),
    ],
    batch: Annotated[
        Path | None, typer.Option("--batch", "-b", help="safetensors batch file (input_ids, attention_mask, labels).")
    ] = None,
    base: Annotated[
        Path | None, typer.Option("--base", help="Local base model dir for a PEFT adapter (default: the one it names).")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu or cuda (default: cuda when available).")] = None,
    from_checkpoint: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="Step replay: re-run the recorded steps after this checkpoint of the run dir (checkpoint-N, with its optimizer, scheduler and RNG state) until one goes non-finite, then localize inside it.",
        ),
    ] = None,
    format: Annotated[
        str | None,
        typer.Option(
            "--format", "-f", help="console, markdown, json or html (default: from --out's extension, else console)."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the report to this file instead of stdout.")
    ] = None,
    fail_on: Annotated[
        str | None,
        typer.Option("--fail-on", help="Exit 1 when a finding reaches this severity (info, warning, error, critical)."),
    ] = None,
) -> None:
    """Reload a checkpoint and a batch, and localize the module where the first NaN/Inf is born."""
    from autopsy.findings import Severity
    from autopsy.replay import replay as run_replay

    fmt = _pick_format(format, out)
    level = Severity.parse(fail_on) if fail_on else None
    report = run_replay(checkpoint, batch=batch, base=base, device=device, from_checkpoint=from_checkpoint)
    _emit(_render(report, fmt, out, plots=False), out)
    if level is not None and report.reaches(level):
        raise typer.Exit(1)


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
        sys.stderr.write(f"autopsy: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("autopsy: interrupted\n")
        return 130
    except Exception as exc:
        if type(exc).__name__ == "Abort":
            sys.stderr.write("autopsy: aborted\n")
            return 2
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # click's usage errors
            sys.stderr.write(f"autopsy: error: {exc.format_message()}\n")
            return 2
        if debug:
            raise
        sys.stderr.write(
            f"autopsy: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
            "(run with --debug for the traceback and report it)\n"
        )
        return 2
    return int(rc) if isinstance(rc, int) else 0


def run() -> None:
    sys.exit(main())
