"""Options and rendering shared by every table command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from ..output import OutputFormat, Result

stderr = Console(stderr=True, soft_wrap=True)

PathsArg = Annotated[
    list[str],
    typer.Argument(help="Checkpoint folder, glob, or explicit files/folders (a series is ordered by training step)."),
]
_FORMATS = ("table", "csv", "json", "parquet")


def _format_callback(value: str) -> str:
    # Validate before any checkpoint is read, so a typo fails fast with a usage error.
    if value.lower() not in _FORMATS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(_FORMATS)}")
    return value.lower()


FormatOpt = Annotated[
    str, typer.Option("--format", "-f", help="table | csv | json | parquet.", callback=_format_callback)
]
OutOpt = Annotated[
    Path | None, typer.Option("--output", "-o", help="Write the data to FILE (atomically) instead of stdout.")
]
TrustOpt = Annotated[
    bool, typer.Option("--trust-pickle", help="Allow pickles that import code (only for files you trust).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes on stderr.")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="Override the learning rate for every parameter.")]
WdOpt = Annotated[float | None, typer.Option("--wd", help="Override the weight decay for every parameter.")]
MomentumOpt = Annotated[float | None, typer.Option("--momentum", help="Override SGD momentum / Adam beta1.")]
OptimizerOpt = Annotated[
    str | None,
    typer.Option("--optimizer", help="Override the optimizer family: sgd, adamw, adam, lion, sgdw, decoupledadamw "
                                     "(Composer; weight decay not scaled by the lr)."),
]
OnMismatchOpt = Annotated[
    str, typer.Option("--on-mismatch", help="A checkpoint of another architecture in the series: stop | skip.")
]
StepRegexOpt = Annotated[
    str | None, typer.Option("--step-regex", help="Regex with one group that extracts the step from file names.")
]
EmaOpt = Annotated[bool, typer.Option("--ema", help="Read the EMA weights (timm state_dict_ema) as the series.")]
KeyOpt = Annotated[str | None, typer.Option("--key", help="Entry of a training checkpoint that holds the weights.")]


def check_format(fmt: str) -> OutputFormat:
    f = fmt.lower()
    if f not in _FORMATS:
        raise typer.BadParameter(f"{fmt!r} is not one of {', '.join(_FORMATS)}", param_hint="--format")
    return f  # type: ignore[return-value]


def _cell(v: Any, column: str = "") -> str:
    if v is None or v is getattr(__import__("pandas"), "NA", object()):
        return ""
    if isinstance(v, float):
        if v != v:  # NaN
            return ""
        if column == "bytes":
            return _human_bytes(v)
        return f"{v:.6g}"
    if column == "bytes" and isinstance(v, int):
        return _human_bytes(v)
    return str(v)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _short_paths(values: list[Any]) -> list[Any]:
    """Checkpoint paths relative to their common folder: the table shows what differs."""
    import os

    paths = [str(v) for v in values if isinstance(v, str) and v]
    if len(paths) < 2:
        return values
    root = os.path.commonpath(paths)
    if not root or root in paths:
        root = os.path.dirname(root)
    return [os.path.relpath(v, root) if isinstance(v, str) and v else v for v in values]


def render_table(result: Result, columns: list[str] | None = None, title: str | None = None) -> Table:
    frame = result.rows
    cols = [c for c in (columns or list(frame.columns)) if c in frame.columns]
    table = Table(title=title, show_lines=False, header_style="bold")
    data = {c: frame[c].tolist() for c in cols}
    for c in cols:
        if c in ("checkpoint", "checkpoint_a", "checkpoint_b"):
            data[c] = _short_paths(data[c])
        table.add_column(c, overflow="fold", no_wrap=c in ("step", "unit"))
    for i in range(len(frame)):
        table.add_row(*(_cell(data[c][i], c) for c in cols))
    return table


def emit(result: Result, fmt: str, output: Path | None, *, table_columns: list[str] | None = None,
         quiet: bool = False) -> None:
    """Send a result to stdout or a file in the requested format; narration goes to stderr."""
    from ..output import atomic_write, serialize

    f = check_format(fmt)
    if f == "table":
        if output is not None:
            # A table written to a file is the plain-text rendering, width fixed so it does not depend on the TTY.
            console = Console(file=None, record=True, width=200, force_terminal=False)
            with console.capture():
                console.print(render_table(result, table_columns))
            text = console.export_text()
            atomic_write(output, lambda fh: fh.write(text.encode()))
        else:
            import os

            # Piped tables keep every column readable instead of folding to 80 characters.
            width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "220"))
            Console(soft_wrap=False, width=width).print(render_table(result, table_columns))
        return
    data = serialize(result, f)
    if output is None:
        if f == "parquet":
            raise typer.BadParameter("parquet is binary: give -o FILE", param_hint="--format")
        sys.stdout.write(data.decode())
        sys.stdout.flush()
    else:
        atomic_write(output, lambda fh: fh.write(data))
        if not quiet:
            stderr.print(f"wrote {output} ({len(data)} bytes)")


def open_series_from_cli(
    paths: list[str],
    *,
    trust_pickle: bool = False,
    key: str | None = None,
    ema: bool = False,
    step_regex: str | None = None,
    on_mismatch: str = "stop",
    quiet: bool = False,
    lr: float | None = None,
    wd: float | None = None,
    momentum: float | None = None,
    optimizer: str | None = None,
    read_logs: bool = True,
) -> Any:
    """Open a series with a progress bar on stderr (only when stderr is a terminal and not --quiet)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..formats import OpenOptions
    from ..series import expand_paths, open_series, with_overrides

    overrides = with_overrides(lr, wd, momentum, optimizer)
    options = OpenOptions(trust_pickle=trust_pickle, key=key, ema=ema)
    total = len(expand_paths(paths))
    with Progress(TextColumn("reading headers"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=stderr, transient=True, disable=quiet or not stderr.is_terminal) as bar:
        task = bar.add_task("headers", total=total)
        series = open_series(paths, options, step_regex=step_regex, on_mismatch=on_mismatch,  # type: ignore[arg-type]
                             overrides=overrides, read_logs=read_logs, progress=lambda _p: bar.advance(task))
    return series


def print_warnings(series: Any, quiet: bool) -> None:
    if quiet:
        return
    for w in series.warnings:
        stderr.print(f"warning: {w}", markup=False)
