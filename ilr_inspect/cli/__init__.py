"""Command-line interface: thin wrappers over the library (one module per command group)."""

from __future__ import annotations

import os
import sys

from .app import app

# ``app`` imports its command modules (app.COMMAND_MODULES) when its commands are first needed.


def main() -> None:
    """Run the CLI, then end the process as soon as its output is flushed: tearing down the interpreter (freeing
    every module and array) cost 0.4-0.6 s per run and changes nothing a user sees. Files are written atomically
    and fsynced before this point; ILR_INSPECT_SLOW_EXIT=1 keeps the normal exit (e.g. for profilers)."""
    # This process is ours: the compiled kernel may skip numba's scipy/BLAS probe (measure/_kernel.py).
    os.environ.setdefault("ILR_INSPECT_LEAN_NUMBA", "1")
    app.load_only(sys.argv[1:])  # only the command on the command line is imported and built
    try:
        app(prog_name="ilr-inspect")
        code = 0
    except SystemExit as exc:
        if os.environ.get("ILR_INSPECT_SLOW_EXIT"):
            raise
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            sys.stderr.write(f"{exc.code}\n")
            code = 1
    if os.environ.get("ILR_INSPECT_SLOW_EXIT"):
        sys.exit(code)
    storage = sys.modules.get("ilr_inspect.storage")
    if storage is not None:  # os._exit skips atexit: delete staged copies of remote files, report I/O stats
        storage.finish()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
        code = code or 1
    os._exit(code)


__all__ = ["app", "main"]
