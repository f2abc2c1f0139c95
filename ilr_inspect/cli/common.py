"""Options and rendering shared by every table command."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import Enum, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, cast, get_type_hints

import typer

from .app import app

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from ..checkpoint import HParams
    from ..formats import OpenOptions
    from ..output import OutputFormat, Result
    from ..series import Series


class _StderrConsole:
    """The rich Console for narration on stderr, made on first use: a quiet run that writes CSV or JSON never
    imports rich (~25 ms of every command's start-up, issue 14)."""

    _console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True, soft_wrap=True)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


_stderr = _StderrConsole()
stderr = cast("Console", _stderr)  # typed as the Console it forwards to

PathsArg = Annotated[
    list[str],
    typer.Argument(help="Checkpoint folder, glob, or explicit files/folders (a series is ordered by training step); "
                   "also URLs: s3://, gs://, hf://, file:// (docs/scale-out.md)."),
]


# Choices as Enums, so --help and docs/cli.md list them and click rejects a typo before anything is read.
Format = StrEnum("Format", "table csv json parquet")
OnMismatch = StrEnum("OnMismatch", "stop skip")
Optimizer = StrEnum("Optimizer", "sgd adamw adam lion sgdw decoupledadamw")
Granularity = StrEnum("Granularity", "tensor channel")
_FORMATS = tuple(f.value for f in Format)


def choice(value: object) -> str:
    """The plain string behind an Enum choice (or a string given by a caller)."""
    return str(value.value if isinstance(value, Enum) else value)


FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Output format.", case_sensitive=False)]
OutOpt = Annotated[
    Path | None, typer.Option("--output", "-o", help="Write the data to FILE (atomically) instead of stdout.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes on stderr.")]
RayOpt = Annotated[str | None, typer.Option(
    "--ray", envvar="ILR_INSPECT_RAY_ADDRESS", metavar="ADDRESS",
    help="Measure as tasks on a Ray cluster: 'local' starts one on this machine, 'auto' joins `ray start --head` "
         "here, HOST:PORT or ray://HOST:PORT joins that one (pip install 'ilr-inspect[ray]').")]


@dataclass(frozen=True)
class HParamOptions:
    """Hyperparameter overrides (commands that compute effective or intrinsic LRs)."""

    __cli_bundle__: ClassVar[bool] = True  # :func:`command` expands a parameter of this type into options

    lr: Annotated[float | None, typer.Option("--lr", help="Override the learning rate for every parameter.")] = None
    wd: Annotated[float | None, typer.Option("--wd", help="Override the weight decay for every parameter.")] = None
    momentum: Annotated[float | None, typer.Option("--momentum", help="Override SGD momentum / Adam beta1.")] = None
    optimizer: Annotated[Optimizer | None, typer.Option(
        "--optimizer", case_sensitive=False,
        help="Override the optimizer family (decoupledadamw: Composer, weight decay not scaled by the lr).")] = None

    def overrides(self) -> HParams | None:
        from ..series import with_overrides

        return with_overrides(self.lr, self.wd, self.momentum, choice(self.optimizer) if self.optimizer else None)

    def settings(self) -> dict[str, Any]:
        return {k: choice(v) if isinstance(v, Enum) else v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class SeriesOptions:
    """How a series is read (every command that reads checkpoints)."""

    __cli_bundle__: ClassVar[bool] = True  # :func:`command` expands a parameter of this type into options

    trust_pickle: Annotated[bool, typer.Option(
        "--trust-pickle", help="Allow pickles that import code (only for files you trust).")] = False
    key: Annotated[str | None, typer.Option("--key", help="Entry of a training checkpoint that holds the weights.")] \
        = None
    ema: Annotated[bool, typer.Option("--ema", help="Read the EMA weights (timm state_dict_ema) as the series.")] \
        = False
    step_regex: Annotated[str | None, typer.Option(
        "--step-regex", help="Regex with one group that extracts the step from file names.")] = None
    on_mismatch: Annotated[OnMismatch, typer.Option(
        "--on-mismatch", help="A checkpoint of another architecture in the series: stop, or skip it with a warning.",
        case_sensitive=False)] = OnMismatch.stop
    quiet: QuietOpt = False

    def settings(self) -> dict[str, Any]:
        return {"trust_pickle": self.trust_pickle, "key": self.key, "ema": self.ema, "step_regex": self.step_regex,
                "on_mismatch": choice(self.on_mismatch)}

    def open_options(self) -> OpenOptions:
        """The reader options (also sent to Ray workers, which reopen the checkpoints)."""
        from ..formats import OpenOptions

        return OpenOptions(trust_pickle=self.trust_pickle, key=self.key, ema=self.ema)

    def open(self, paths: list[str] | list[Path], *, hp: HParamOptions | None = None,
             read_logs: bool = True) -> Series:
        """Open a series with a progress bar on stderr (only when stderr is a terminal and not --quiet)."""
        from ..formats import OpenOptions
        from ..series import expand_paths, open_series

        options = OpenOptions(trust_pickle=self.trust_pickle, key=self.key, ema=self.ema)
        kwargs: dict[str, Any] = {"step_regex": self.step_regex, "on_mismatch": choice(self.on_mismatch),
                                  "overrides": hp.overrides() if hp is not None else None, "read_logs": read_logs}
        if self.quiet or not stderr.is_terminal:  # no bar: neither rich.progress nor a second listing of the paths
            return open_series(list(paths), options, **kwargs)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        total = len(expand_paths(list(paths)))
        with Progress(TextColumn("reading headers"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=_stderr.console, transient=True) as bar:
            task = bar.add_task("headers", total=total)
            return open_series(list(paths), options, progress=lambda _p: bar.advance(task), **kwargs)


@dataclass(frozen=True)
class OutputOptions:
    """Where a table goes and in which format."""

    __cli_bundle__: ClassVar[bool] = True  # :func:`command` expands a parameter of this type into options

    fmt: FormatOpt = Format.table
    output: OutOpt = None

    def emit(self, result: Result, columns: list[str] | None = None, *, quiet: bool = False) -> None:
        emit(result, choice(self.fmt), self.output, table_columns=columns, quiet=quiet)


@functools.cache
def _bundle_parameters(cls: type) -> tuple[inspect.Parameter, ...]:
    """A bundle's fields as keyword-only parameters; evaluated once per bundle class, not once per command that
    uses it (resolving the string annotations is most of the cost of registering a command)."""
    field_hints = get_type_hints(cls, include_extras=True)
    return tuple(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                   annotation=field_hints[f.name]) for f in fields(cls))


def command(name: str, *, doc: str | None = None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """``app.command(name)`` that expands each option bundle parameter into its options, declared once.

    The command function receives the bundle objects; Typer sees the individual options (after the command's
    own), so --help and docs/cli.md list them like any other option.
    """

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        if not app.wants(name):  # this process runs another command (ilr_inspect.cli.main)
            return fn
        hints = get_type_hints(fn, include_extras=True)
        own: list[inspect.Parameter] = []
        bundles: dict[str, type] = {}
        for p in inspect.signature(fn).parameters.values():
            ann = hints[p.name]
            if getattr(ann, "__cli_bundle__", False):
                bundles[p.name] = ann
            else:
                own.append(p.replace(annotation=ann))
        expanded: dict[str, list[str]] = {}
        extra: list[inspect.Parameter] = []
        for arg, cls in bundles.items():
            expanded[arg] = [f.name for f in fields(cls)]
            extra += _bundle_parameters(cls)  # Parameters are immutable: shared between commands

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> None:
            for arg, cls in bundles.items():
                kwargs[arg] = cls(**{n: kwargs.pop(n) for n in expanded[arg]})
            fn(**kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + extra
        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        if doc is not None:
            wrapper.__doc__ = doc
        app.command(name)(wrapper)
        return wrapper

    return register


def check_format(fmt: str | Format) -> OutputFormat:
    f = choice(fmt).lower()
    if f not in _FORMATS:
        raise typer.BadParameter(f"{fmt!r} is not one of {', '.join(_FORMATS)}", param_hint="--format")
    return f  # type: ignore[return-value]


def _cell(v: Any, column: str = "") -> str:
    if v is None or type(v).__name__ == "NAType":  # pd.NA, recognised without importing pandas
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
    from rich.table import Table

    everything = dict(result.column_values())  # from the rows, without pandas where possible
    cols = [c for c in (columns or list(everything)) if c in everything]
    table = Table(title=title, show_lines=False, header_style="bold")
    data = {c: everything[c] for c in cols}
    n_rows = len(next(iter(everything.values()), []))
    for c in cols:
        if c in ("checkpoint", "checkpoint_a", "checkpoint_b"):
            data[c] = _short_paths(data[c])
        table.add_column(c, overflow="fold", no_wrap=c in ("step", "unit"))
    for i in range(n_rows):
        table.add_row(*(_cell(data[c][i], c) for c in cols))
    return table


def emit(result: Result, fmt: str | Format, output: Path | None, *, table_columns: list[str] | None = None,
         quiet: bool = False) -> None:
    """Send a result to stdout or a file in the requested format; narration goes to stderr."""
    from ..output import atomic_write, serialize

    f = check_format(fmt)
    if f == "table":
        from rich.console import Console

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


def print_warnings(series: Series, quiet: bool) -> None:
    if quiet:
        return
    for w in series.warnings:
        stderr.print(f"warning: {w}", markup=False)
