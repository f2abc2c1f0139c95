"""Command-line interface: thin wrappers over the library (one module per command group)."""

from __future__ import annotations

import importlib

from .app import app

# Each module registers its commands on ``app`` when imported; none imports torch at module level.
_COMMAND_MODULES = ("inventory_cmds", "measure_cmds", "distance_cmd", "equilibrium_cmd", "report_cmd")
for _name in _COMMAND_MODULES:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _exc:  # a command group still being written during development
        if _exc.name != f"{__name__}.{_name}":
            raise


def main() -> None:
    app(prog_name="ilr-inspect")


__all__ = ["app", "main"]
