"""Every README example runs, as written, against the bundled fixtures (in a scratch folder, so outputs land there)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block_after(marker: str) -> list[str]:
    m = re.search(re.escape(marker) + r"\s*```(?:bash)?\n(.*?)```", README, re.S)
    assert m, f"README has no code block after {marker}"
    return [ln.strip() for ln in m.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


EXAMPLES = _block_after("<!-- examples -->")


def _cli() -> list[str]:
    exe = shutil.which("ilr-inspect", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "ilr_inspect"]


def test_quick_start_commands_match_ci() -> None:
    main_cmd = _block_after("<!-- main-command -->")
    test_cmd = _block_after("<!-- test-command -->")
    assert len(main_cmd) == 1 and "ilr-inspect report fixtures/digits/ckpts" in main_cmd[0]
    assert len(test_cmd) == 1 and "pytest" in test_cmd[0]
    assert "<!-- test-command -->" in (ROOT / ".ci" / "run").read_text()


def test_quick_start_main_job(tmp_path: Path) -> None:
    """The README's main job, minus the install steps (already done in this environment)."""
    cmd = _block_after("<!-- main-command -->")[0].split("&&")[-1].strip()
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    args = shlex.split(cmd)
    proc = subprocess.run(_cli() + args[1:], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    html = (tmp_path / "report.html").read_text()
    assert "<html" in html.lower() and "vega" in html.lower()


@pytest.mark.parametrize("line", EXAMPLES, ids=[ln.split()[1] + str(i) for i, ln in enumerate(EXAMPLES)])
def test_readme_example(line: str, tmp_path: Path) -> None:
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    args = shlex.split(line)
    assert args[0] == "ilr-inspect"
    env = dict(os.environ, COLUMNS="160")
    proc = subprocess.run(_cli() + args[1:], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{line}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    if "-o" in args:
        out = tmp_path / args[args.index("-o") + 1]
        assert out.exists() and out.stat().st_size > 0
    elif "--format" not in args:
        assert proc.stdout.strip(), "a table command printed nothing"


def test_readme_python_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = re.search(r"## Python API\s*```python\n(.*?)```", README, re.S)
    assert m, "README has no Python API example"
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(m.group(1), "README.md", "exec"), namespace)
    norms = namespace["norms"]
    rows = norms.rows  # type: ignore[attr-defined]
    assert {"step", "unit", "norm", "effective_lr", "intrinsic_lr"} <= set(rows.columns)
    assert rows["step"].nunique() == 13
