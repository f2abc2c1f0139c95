"""docs/ci.md runs as written: the shell commands of its GitHub Actions step and GitLab CI job are extracted from
the page and executed against the fixture series, so the documentation cannot drift from the tool.

Only the ``pip install`` lines are not run (the package is already installed here). The expected exit code is
derived from the ``angles`` and ``units`` tables computed by the library, not from the report.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ci.md"
CKPTS = ROOT / "fixtures" / "digits" / "ckpts"
needs_fixture = pytest.mark.skipif(not any(CKPTS.glob("*.pt")) if CKPTS.is_dir() else True,
                                   reason="fixture series fixtures/digits/ckpts not generated")


def _yaml_blocks() -> list[Any]:
    text = DOC.read_text(encoding="utf-8")
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]


def _github_step() -> dict[str, Any]:
    for block in _yaml_blocks():
        for job in (block or {}).get("jobs", {}).values():
            for step in job.get("steps", []):
                if step.get("id") == "ilr-report":
                    return dict(step)
    raise AssertionError("docs/ci.md has no GitHub step with id ilr-report")


def _gitlab_job() -> dict[str, Any]:
    for block in _yaml_blocks():
        if isinstance(block, dict) and "ilr-report" in block:
            return dict(block["ilr-report"])
    raise AssertionError("docs/ci.md has no GitLab job ilr-report")


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this ilr-inspect
    env["CHECKPOINTS"] = str(CKPTS)
    env["GITHUB_STEP_SUMMARY"] = str(tmp_path / "step_summary.md")
    return env


@pytest.fixture(scope="module")
def expected_exit() -> int:
    """3 when a documented gate holds on the fixture according to the library's own tables, else 0."""
    from ilr_inspect.api import angles, units

    unit_rows = units(str(CKPTS)).rows
    si = set(unit_rows.loc[unit_rows["scale_invariant"].astype(bool), "unit"])
    rows = angles(str(CKPTS)).rows
    ratio = rows.loc[rows["unit"].isin(si), "ratio"].dropna()
    periodic = (unit_rows.loc[unit_rows["unit"].isin(si), "regime"] == "periodic").any()
    return 3 if (len(ratio) and float(ratio.max()) > 1.5) or periodic else 0


def _check_outputs(workdir: Path) -> str:
    out = workdir / "ilr-report"
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and 'id="chart-norms_vs_step"' in html
    assert sorted(p.stem for p in (out / "png").glob("*.png"))  # every chart exported
    return (out / "summary.md").read_text(encoding="utf-8")


@needs_fixture
def test_github_actions_step_runs_as_documented(tmp_path: Path, expected_exit: int) -> None:
    step = _github_step()
    assert "pip install" in " ".join(str(s.get("run", "")) for s in _all_github_steps())
    before = sorted(p.name for p in CKPTS.iterdir())
    # GitHub runs `run:` blocks with `bash -e {0}` plus pipefail.
    proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], cwd=tmp_path,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == expected_exit, proc.stderr[-3000:]
    summary = _check_outputs(tmp_path)
    assert (tmp_path / "step_summary.md").read_text(encoding="utf-8") == summary  # job summary published
    assert ("❌ **holds**" in summary) == (expected_exit == 3)
    assert sorted(p.name for p in CKPTS.iterdir()) == before  # nothing written into the checkpoint folder


def _all_github_steps() -> list[dict[str, Any]]:
    return [s for b in _yaml_blocks() for j in (b or {}).get("jobs", {}).values() for s in j.get("steps", [])]


@needs_fixture
def test_gitlab_job_runs_as_documented(tmp_path: Path, expected_exit: int) -> None:
    job = _gitlab_job()
    assert job["allow_failure"] == {"exit_codes": [3]} and job["artifacts"]["paths"] == ["ilr-report/"]
    script = [line for line in job["script"] if not line.startswith("pip install")]
    assert len(script) == len(job["script"]) - 1
    proc = subprocess.run(["bash", "--noprofile", "--norc", "-e", "-c", "\n".join(script)], cwd=tmp_path,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == expected_exit, proc.stderr[-3000:]
    summary = _check_outputs(tmp_path)
    after = subprocess.run(["bash", "-c", "\n".join(job["after_script"])], cwd=tmp_path, env=_env(tmp_path),
                           capture_output=True, text=True, timeout=60, check=False)
    assert after.returncode == 0 and after.stdout == summary  # the summary lands in the job log
