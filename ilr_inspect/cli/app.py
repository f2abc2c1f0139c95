"""The Typer application and the error boundary: library errors become one-line messages and exit codes."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from typing import Any

import typer
from typer.core import TyperGroup
from typer.main import get_command_name
from typer.models import CommandInfo

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


# The modules that register commands on ``app`` when imported, in the order --help lists them (none imports torch
# at module level), and the commands each one registers.
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "inventory_cmds": ("ls", "hparams"),
    "measure_cmds": ("units", "norms", "angles"),
    "distance_cmd": ("distance",),
    "equilibrium_cmd": ("equilibrium",),
    "report_cmd": ("report",),
}
_ORDER = [f"{__package__}.{m}" for m in COMMAND_MODULES]


def _position(command: CommandInfo) -> int:
    # the module's place in COMMAND_MODULES (a stable sort keeps each module's own order)
    module = getattr(command.callback, "__module__", "")
    return _ORDER.index(module) if module in _ORDER else len(_ORDER)


class _LazyTyper(typer.Typer):
    """A Typer app whose command modules are imported when its commands are first asked for (by ``app()``,
    ``CliRunner().invoke(app, ...)``, the docs generator). :func:`ilr_inspect.cli.main` loads only the module of
    the command on the command line: importing every command module and building every command's options cost
    ~30 ms of each run (issue 14)."""

    _registered: list[CommandInfo]
    _loaded = False
    _only: str | None = None  # set by load_only: the one command this process runs

    def wants(self, name: str) -> bool:
        """Whether a command module should register ``name`` (all but the one command are skipped in a process
        that runs only that one, saving the work of building their options)."""
        return self._only is None or name == self._only

    @property  # type: ignore[override]
    def registered_commands(self) -> list[CommandInfo]:
        if not self._loaded:
            self.load_commands()
        return self._registered

    @registered_commands.setter
    def registered_commands(self, value: list[CommandInfo]) -> None:
        self._registered = value

    def load_commands(self, modules: Iterable[str] = COMMAND_MODULES) -> None:
        """Import the command modules (each registers its commands on this app); commands keep the --help order
        whichever module was imported first."""
        self._loaded = True
        for name in modules:
            try:
                importlib.import_module(f"{__package__}.{name}")
            except ModuleNotFoundError as exc:  # a command group still being written during development
                if exc.name != f"{__package__}.{name}":
                    raise
        self._registered.sort(key=_position)

    def load_only(self, argv: list[str]) -> None:
        """Register just the command ``argv`` names first, or every command when it names none (--help,
        --version, a typo). For the entry point (:func:`ilr_inspect.cli.main`): the app then holds that one
        command for the rest of the process."""
        first = argv[0] if argv else ""
        module = next((m for m, names in COMMAND_MODULES.items() if first in names), None)
        if module is None:
            self.load_commands()
            return
        self._only = first
        self.load_commands([module])
        self._registered[:] = [c for c in self._registered
                               if (c.name or get_command_name(c.callback.__name__ if c.callback else "")) == first]


app = _LazyTyper(
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
