"""The fixed cost of every command (issue 14): a run imports only what its command and output need (no pydantic,
no importlib.metadata, no rich for a quiet CSV run, only the named command's module), with the same output and
provenance as before."""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from ilr_inspect import output

# Runs the CLI's entry point in a subprocess and records sys.modules once the command is done.
_WRAPPER = """
import os, sys
os.environ["ILR_INSPECT_SLOW_EXIT"] = "1"
sys.argv = ["ilr-inspect", *ARGS]
from ilr_inspect.cli import main
try:
    main()
finally:
    open(RECORD, "w").write("\\n".join(sorted(sys.modules)))
"""

# The same arguments through the whole application (every command module loaded, as CliRunner and --help see it).
_FULL_APP = """
import sys
from ilr_inspect.cli.app import app
app(prog_name="ilr-inspect", args=ARGS)
"""


def _tiny(folder: Path) -> dict[int, dict[str, np.ndarray]]:
    """Two safetensors checkpoints of four float32 tensors, with the step in the metadata and the name."""
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True)
    out = {}
    for step in (100, 200):
        state = {f"layer{i}.weight": rng.standard_normal((16, 24)).astype(np.float32) for i in range(4)}
        save_file(state, str(folder / f"checkpoint-{step}.safetensors"), metadata={"step": str(step)})
        out[step] = state
    return out


def _run(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    record = tmp_path / "modules.txt"
    code = _WRAPPER.replace("ARGS", repr(args)).replace("RECORD", repr(str(record)))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                       env={**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "100"}, cwd=tmp_path)
    return p, set(record.read_text().split()) if record.exists() else set()


def _families(mods: set[str], *names: str) -> set[str]:
    return {m for m in mods if any(m == n or m.startswith(n + ".") for n in names)}


def test_quiet_csv_norms_imports_no_pydantic_metadata_or_rich(tmp_path: Path) -> None:
    """`norms -f csv -o FILE -q` on a tiny safetensors series: the norms are right (float64 NumPy), and the run
    imported neither pydantic (typer >= 0.29 validates options through it), importlib.metadata / email
    (provenance versions), rich (nothing goes to the terminal) nor another command's module."""
    states = _tiny(tmp_path / "s")
    out = tmp_path / "norms.csv"
    p, mods = _run(["norms", str(tmp_path / "s"), "-f", "csv", "-o", str(out), "-q"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stderr == "" and p.stdout == ""
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 8
    for r in rows:
        ref = math.sqrt(float(np.sum(states[int(r["step"])][r["members"]].astype(np.float64) ** 2)))
        assert float(r["norm"]) == pytest.approx(ref, rel=1e-12)
    assert "ilr_inspect.measure" in mods  # the command really ran through the library
    assert not _families(mods, "pydantic", "pydantic_core", "importlib.metadata", "email", "rich")
    assert not _families(mods, *(f"ilr_inspect.cli.{m}" for m in ("inventory_cmds", "distance_cmd",
                                                                   "equilibrium_cmd", "report_cmd")))


@pytest.mark.parametrize("args", [["norms", "-q"], ["ls"], ["hparams", "-q", "-f", "json"]])
def test_terminal_output_without_progress_machinery(tmp_path: Path, args: list[str]) -> None:
    """A table (or JSON) on a pipe: rich renders the table, but the progress bar (stderr is not a terminal)
    and its module are never loaded."""
    _tiny(tmp_path / "s")
    p, mods = _run([args[0], str(tmp_path / "s"), *args[1:]], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "checkpoint-200" in p.stdout or "200" in p.stdout
    assert "rich.progress" not in mods and "rich.live" not in mods
    assert not _families(mods, "pydantic", "importlib.metadata")
    assert ("rich.table" in mods) == (args[0] != "hparams")


@pytest.mark.parametrize("args", [
    ["norms", "--format", "xml", "S"],
    ["norms"],
    ["angles", "S", "--granularity", "row"],
    ["nrms", "S"],
    ["norms", "--help"],
    ["ls", "S", "-f", "csv"],
    ["--version"],
])
def test_single_command_process_behaves_like_the_whole_app(tmp_path: Path, args: list[str]) -> None:
    """The entry point builds only the named command; usage errors, help, typos and output are those of the
    application with every command loaded."""
    _tiny(tmp_path / "S")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "100"}
    lazy, _ = _run(args, tmp_path)
    full = subprocess.run([sys.executable, "-c", _FULL_APP.replace("ARGS", repr(args))], capture_output=True,
                          text=True, timeout=300, check=False, env=env, cwd=tmp_path)
    assert (lazy.returncode, lazy.stdout, lazy.stderr) == (full.returncode, full.stdout, full.stderr)


def test_command_table_names_what_each_module_registers() -> None:
    """The entry point finds a command's module in COMMAND_MODULES: it must list exactly what each registers."""
    code = ("import json\nfrom ilr_inspect.cli.app import app\nfrom typer.main import get_command\n"
            "group = get_command(app)\nout = {}\n"
            "for name, cmd in group.commands.items():\n"
            "    out.setdefault(cmd.callback.__module__.rsplit('.', 1)[1], []).append(name)\n"
            "print(json.dumps(out))\n")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    from ilr_inspect.cli.app import COMMAND_MODULES

    assert json.loads(got.stdout) == {m: list(names) for m, names in COMMAND_MODULES.items()}


def test_help_lists_commands_in_order_whichever_module_came_first() -> None:
    """Command modules imported in another order (a test importing one directly) leave --help unchanged."""
    code = ("import ilr_inspect.cli.report_cmd, ilr_inspect.cli.measure_cmds\n"
            "from ilr_inspect.cli.docgen import render\nprint(render(), end='')\n")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert got.stdout == (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()


def test_provenance_versions_are_importlib_metadata_versions() -> None:
    """The cheap lookup gives importlib.metadata's answer for every installed distribution (names written any
    way pip accepts them) and None for absent ones."""
    names = sorted({d.metadata["Name"] for d in importlib.metadata.distributions()})
    spelled = names + [n.upper() for n in names[:20]] + [n.replace("-", "_") for n in names if "-" in n]
    fast = output._fast_versions([*spelled, "surely-not-installed-ilr"])
    assert fast is not None
    assert {n: fast[n] for n in spelled} == {n: importlib.metadata.version(n) for n in spelled}
    assert fast["surely-not-installed-ilr"] is None
    versions = output.package_versions()
    for n in output._PROVENANCE_PACKAGES:
        try:
            assert versions[n] == importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            assert n not in versions


def _dist(root: Path, folder: str, metadata: str, file: str = "METADATA") -> None:
    (root / folder).mkdir(parents=True)
    (root / folder / file).write_text(metadata)


def test_provenance_versions_on_awkward_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """First match on sys.path wins, egg-info PKG-INFO, a header after folded ones, lower-case header names; a
    folded Version or an unreadable file falls back to importlib.metadata: every answer equals its answer."""
    first, second = tmp_path / "first", tmp_path / "second"
    _dist(first, "zz_pkg_a-1.0.dist-info", "Metadata-Version: 2.1\nName: zz-pkg-a\nVersion: 1.0\n\nbody\n")
    _dist(second, "zz_pkg_a-2.0.dist-info", "Metadata-Version: 2.1\nName: zz-pkg-a\nVersion: 2.0\n")
    _dist(first, "zz.pkg.b-3.egg-info", "Name: zz.pkg.b\nversion:   3.1rc1\n", file="PKG-INFO")
    _dist(first, "zz_pkg_c-4.dist-info", "Name: zz-pkg-c\nSummary: a\n  folded line\nVersion: 4.0.post2\n")
    _dist(first, "zz_pkg_d-5.dist-info", "Name: zz-pkg-d\nVersion: 5.0\n  oddly folded\n")
    _dist(first, "zz_pkg_e-6.dist-info", "Name: zz-pkg-e\n\nVersion: 6.0\n")  # Version in the body: none
    monkeypatch.syspath_prepend(str(second))
    monkeypatch.syspath_prepend(str(first))
    names = ["zz-pkg-a", "zz.pkg.b", "zz_pkg_c", "zz-pkg-d", "zz-pkg-e"]
    fast = output._fast_versions(names[:3])
    assert fast == {"zz-pkg-a": "1.0", "zz.pkg.b": "3.1rc1", "zz_pkg_c": "4.0.post2"}
    assert output._fast_versions(names[3:4]) is None  # folded Version: left to the email parser
    assert output._fast_versions(names[4:]) is None
    monkeypatch.setattr(output, "_VERSION_CACHE", {})
    got = output.package_versions(names)
    ref = {n: importlib.metadata.version(n) for n in names}
    assert {n: got.get(n) for n in names} == {n: v for n, v in ref.items()}


def test_json_provenance_lists_the_same_versions(tmp_path: Path) -> None:
    """`angles -f json`: meta.packages are importlib.metadata's versions, found without importing it."""
    _tiny(tmp_path / "s")
    p, mods = _run(["angles", str(tmp_path / "s"), "-f", "json", "-q"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    packages = json.loads(p.stdout)["meta"]["packages"]
    ref = {}
    for n in output._PROVENANCE_PACKAGES:
        try:
            ref[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    assert packages == {"ilr-inspect": output.__version__, "python": sys.version.split()[0], **ref}
    assert not _families(mods, "importlib.metadata", "email", "pydantic")
