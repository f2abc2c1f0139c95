"""The Typer application and the error boundary: library errors become one-line messages and exit codes."""

from __future__ import annotations

import os
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from .. import __version__
from ..errors import EXIT_INPUT, EXIT_INTERNAL, IlrError


def _print_error(message: str) -> None:
    # One line, no markup; file names that are not valid UTF-8 are escaped rather than crashing the write.
    line = " ".join(message.split()) + "\n"
    try:
        sys.stderr.write(line)
    except UnicodeEncodeError:
        sys.stderr.write(line.encode("ascii", "backslashreplace").decode("ascii"))


class _ErrorBoundary(TyperGroup):
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except IlrError as exc:
            hint = f" (hint: {exc.hint})" if exc.hint else ""
            _print_error(f"Error: {exc.render()}{hint}")
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except KeyboardInterrupt:
            _print_error("Interrupted.")
            raise typer.Exit(130) from None
        except OSError as exc:
            if os.environ.get("ILR_INSPECT_DEBUG"):
                raise
            # An OS-level failure on a named file (an unreadable input, an -o that is a folder or unwritable)
            # is a problem with that file, not a bug (docs/security.md).
            where = f"{exc.filename}: " if exc.filename is not None else ""
            _print_error(f"Error: {where}{exc.strerror or type(exc).__name__} "
                         "(hint: check the path and its permissions)")
            raise typer.Exit(EXIT_INPUT) from None
        except (MemoryError, RecursionError) as exc:
            if os.environ.get("ILR_INSPECT_DEBUG"):
                raise
            # Only hostile or damaged input gets here (every parser has size/depth limits; docs/security.md).
            what = "too large to hold in memory" if isinstance(exc, MemoryError) else "nested too deeply to read"
            _print_error(f"Error: an input is {what} (hint: check the files you passed; see docs/security.md)")
            raise typer.Exit(EXIT_INPUT) from None
        except Exception as exc:
            if os.environ.get("ILR_INSPECT_DEBUG"):
                raise
            _print_error(
                f"Error: internal error: {type(exc).__name__}: {exc} "
                "(hint: rerun with ILR_INSPECT_DEBUG=1 for a traceback and report it)"
            )
            raise typer.Exit(EXIT_INTERNAL) from None


app = typer.Typer(
    cls=_ErrorBoundary,
    name="ilr-inspect",
    help=(
        "Intrinsic LR, effective LR, angular updates and time to equilibrium of normalized networks, "
        "computed from checkpoint series on disk.\n\n"
        "Data goes to stdout (--format table|csv|json|parquet, -o FILE); progress and messages to stderr.\n\n"
        "Exit codes: 0 ok, 1 internal error, 2 usage, 3 --fail-if threshold hit, 4 bad input, "
        "5 untrusted pickle refused, 6 optional dependency missing."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ilr-inspect {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Root options."""
