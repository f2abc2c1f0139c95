"""CLI contract: start-up without torch, version, docs current, one-line errors with exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from ilr_inspect import __version__
from ilr_inspect.cli import app
from ilr_inspect.cli.docgen import render
from ilr_inspect.errors import EXIT_INPUT

ROOT = Path(__file__).resolve().parents[1]


def test_help_and_version_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from ilr_inspect.cli import app\n"
        "from typer.testing import CliRunner\n"
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(app, ['--version']); assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'jax', 'keras', 'onnx', 'tensorflow') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"ilr-inspect {__version__}"


def test_cli_reference_is_current() -> None:
    doc = (ROOT / "docs" / "cli.md").read_text()
    assert doc == render(), "docs/cli.md is stale: run `python -m ilr_inspect.cli.docgen > docs/cli.md`"


def test_missing_path_is_one_line_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["ls", str(tmp_path / "nope")])
    assert result.exit_code == EXIT_INPUT
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("Error: ") and "nope" in lines[0] and "hint:" in lines[0]
    assert "Traceback" not in result.output


def test_bad_format_is_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["ls", str(tmp_path), "--format", "xml"])
    assert result.exit_code == 2
