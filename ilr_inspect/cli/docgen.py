"""Generate docs/cli.md from the commands' own --help text: `python -m ilr_inspect.cli.docgen > docs/cli.md`.

tests/test_docs.py fails when the checked-in file differs, so the reference cannot go stale.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

from . import app

_WIDTH = 100


def _help(command: Any, name: str, parent: typer.Context | None = None) -> str:
    ctx = typer.Context(command, info_name=name, parent=parent, terminal_width=_WIDTH, max_content_width=_WIDTH)
    return str(command.get_help(ctx))


def render() -> str:
    root = typer.main.get_command(app)
    parts = [
        "# CLI reference",
        "",
        "Generated from `--help` by `python -m ilr_inspect.cli.docgen > docs/cli.md`; a test checks it is current.",
        "",
        "## ilr-inspect",
        "",
        "```text",
        _help(root, "ilr-inspect"),
        "```",
    ]
    assert isinstance(root, TyperGroup)
    root_ctx = typer.Context(root, info_name="ilr-inspect", terminal_width=_WIDTH, max_content_width=_WIDTH)
    for name in root.list_commands(root_ctx):
        cmd = root.get_command(root_ctx, name)
        if cmd is None:
            continue
        parts += ["", f"## ilr-inspect {name}", "", "```text", _help(cmd, name, root_ctx), "```"]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(render(), end="")
