"""The Typer application and the error boundary: library errors become one-line messages and exit codes."""

from __future__ import annotations

import os
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from .. import __version__
from ..errors import EXIT_INTERNAL, IlrError


def _print_error(message: str) -> None:
    # Plain stderr write: one line, no wrapping, no markup interpretation of file names.
    sys.stderr.write(message.rstrip() + "\n")


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
