"""`--ray` on norms / angles / units: the same tables as the local pass, on a real local Ray cluster.

One cluster per module, started by a helper process (``ray.init(num_cpus=2)``) whose exit tears it down, so the
tests never touch other Ray clusters on the machine. Every Ray run is the real CLI in a subprocess.

Bit-identity: the Ray tasks call ``row_stats`` on the same bytes with the same ``rows``/``kernel``/‖a‖² reuse as
the local pass, so every column of the JSON tables is compared exactly (as serialised text, NaN included), with
the compiled kernel off and on (``ILR_INSPECT_KERNEL``). Only the order of warning lines may differ (they are
compared as sorted lists), and the provenance ``command`` line names ``--ray``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from ilr_inspect.cli import app
from ilr_inspect.errors import EXIT_INPUT, InputError

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "fixtures" / "digits" / "ckpts"
TORCH_GROUPS = ROOT / "fixtures" / "layouts" / "torch_groups" / "ckpts"
KERAS = ROOT / "fixtures" / "layouts" / "keras_weights_only" / "ckpts"

_HEAD = r"""
import sys
import ray
ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
ray.shutdown()
"""


@contextlib.contextmanager
def ray_head(env: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """A 2-CPU Ray cluster owned by a helper process (with ``env``): (address, pid of that process); every Ray
    process of it descends from that pid, and closing the helper's stdin shuts the cluster down."""
    proc = subprocess.Popen([sys.executable, "-c", _HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None and proc.stdin is not None
    address = proc.stdout.readline().strip()
    assert address, "the Ray head did not start"
    try:
        yield address, proc.pid
    finally:
        proc.stdin.close()  # the helper shuts its cluster down and exits
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, int]]:
    """(address, pid of the process that owns the cluster)."""
    with ray_head() as head:
        yield head


def _env(kernel: str, task_bytes: int = 1) -> dict[str, str]:
    # Tiny task bytes: the small fixtures are split into many groups × segments (boundaries exercised).
    env = {**os.environ, "ILR_INSPECT_KERNEL": kernel, "ILR_INSPECT_RAY_TASK_BYTES": str(task_bytes)}
    env.pop("ILR_INSPECT_RAY_ADDRESS", None)
    return env


def _ray_cli(args: list[str], address: str, env: dict[str, str]) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "ilr_inspect", *args, "-f", "json", "-q", "--ray", address],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def _local_cli(args: list[str], monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> dict[str, Any]:
    for k in ("ILR_INSPECT_KERNEL", "ILR_INSPECT_RAY_TASK_BYTES"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.delenv("ILR_INSPECT_RAY_ADDRESS", raising=False)
    r = CliRunner().invoke(app, [*args, "-f", "json", "-q"])
    assert r.exit_code == 0, r.output
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def _same(local: dict[str, Any], ray: dict[str, Any]) -> None:
    assert local["rows"], "nothing measured"
    assert ray["columns"] == local["columns"]
    assert json.dumps(ray["rows"]) == json.dumps(local["rows"])  # bit-identical floats, NaN/null included
    assert sorted(ray["meta"]["warnings"]) == sorted(local["meta"]["warnings"])
    assert ray["meta"].get("units") == local["meta"].get("units")
    assert ray["meta"]["settings"] == local["meta"]["settings"]


@pytest.mark.parametrize(("cmd", "path", "kernel"), [
    ("norms", DIGITS, "off"),  # norms only: pairs just for the units with angle-implied norms
    ("norms", DIGITS, "on"),  # ... with the compiled norm and pair loops
    ("norms", TORCH_GROUPS, "off"),  # no tensor needs pairs: tasks read each checkpoint once, no boundary
    ("angles", DIGITS, "on"),  # the compiled kernel on both sides
    ("angles", TORCH_GROUPS, "off"),  # another torch series
    ("units", KERAS, "off"),  # regimes from the same pass; a reader that copies (HDF5), tensor-major locally
])
def test_same_tables_with_and_without_ray(cluster: tuple[str, int], monkeypatch: pytest.MonkeyPatch, cmd: str,
                                          path: Path, kernel: str) -> None:
    env = _env(kernel)
    args = [cmd, str(path)]
    if cmd == "angles":
        args.append("--per-tensor")
    _same(_local_cli(args, monkeypatch, env), _ray_cli(args, cluster[0], env))


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _title(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def _series(folder: Path, n_ck: int = 6, n_t: int = 4,
            shape: tuple[int, int] = (256, 16384)) -> dict[str, list[tuple[float, float | None]]]:
    """A safetensors series written with safetensors.numpy (~400 MB by default), and per tensor and checkpoint
    the float64 oracle: (norm, angle to the previous checkpoint)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    w = {f"block{i}.weight": rng.standard_normal(shape).astype(np.float32) for i in range(n_t)}
    truth: dict[str, list[tuple[float, float | None]]] = {n: [] for n in w}
    prev: dict[str, np.ndarray] = {}
    folder.mkdir()
    for k in range(n_ck):
        if k:
            w = {n: (a + 0.05 * rng.standard_normal(shape)).astype(np.float32) for n, a in w.items()}
        save_file(w, str(folder / f"step_{100 * k:06d}.safetensors"))
        for n, a in w.items():
            b = a.astype(np.float64).ravel()
            ang = None
            if n in prev:
                cos = float(b @ prev[n] / (np.linalg.norm(b) * np.linalg.norm(prev[n])))
                ang = float(np.arccos(min(1.0, cos)))
            truth[n].append((float(np.linalg.norm(b)), ang))
            prev[n] = b
    return truth


def test_killed_worker_is_retried(cluster: tuple[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    address, head = cluster
    series = tmp_path / "ckpts"
    truth = _series(series)
    env = _env("off")
    args = ["angles", str(series), "--per-tensor"]
    proc = subprocess.Popen([sys.executable, "-m", "ilr_inspect", *args, "-f", "json", "-q", "--ray", address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    killed: list[int] = []
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if not killed:
            for pid in _descendants(head):
                if _title(pid).startswith("ray::ilr-measure"):  # a worker in the middle of a task (its name)
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    break
        time.sleep(0.01)
    out, err = proc.communicate(timeout=60)
    assert killed, "no task was caught running; the series is too small to kill a worker mid-run"
    assert proc.returncode == 0, err[-3000:]
    ray_out = json.loads(out)
    _same(_local_cli(args, monkeypatch, env), ray_out)
    # ... and the values themselves against a float64 NumPy recomputation of the arrays written above.
    got = {(r["parameter"], r["step_to"]): r["angle"] for r in ray_out["rows"]}
    assert len(got) == 4 * 5
    for n, h in truth.items():
        for k in range(1, len(h)):
            assert got[(n, 100 * k)] == pytest.approx(h[k][1], abs=1e-6)


def test_bad_address_is_one_line_exit_4() -> None:
    """From --ray, and from ILR_INSPECT_RAY_ADDRESS when the flag is absent."""
    for args, extra in (([ "--ray", "127.0.0.1:1"], {}), ([], {"ILR_INSPECT_RAY_ADDRESS": "127.0.0.1:1"})):
        r = subprocess.run([sys.executable, "-m", "ilr_inspect", "norms", str(DIGITS), *args], capture_output=True,
                           text=True, timeout=120, env={**_env("off"), **extra})
        assert r.returncode == EXIT_INPUT, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:") and "127.0.0.1:1" in lines[0], r.stderr


def test_help_and_local_path_do_not_import_ray() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from ilr_inspect.cli import app\n"
        "for args in (['--help'], ['norms', '--help'], ['report', '--help'],\n"
        f"             ['norms', {str(DIGITS)!r}, '-f', 'json', '-q']):\n"
        "    r = CliRunner().invoke(app, args); assert r.exit_code == 0, r.output\n"
        "assert 'ray' not in sys.modules\n"
        "assert '--ray' in CliRunner().invoke(app, ['angles', '--help']).output\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ILR_INSPECT_RAY_ADDRESS"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_task_refuses_changed_files_and_plan_covers_everything() -> None:
    """Without a cluster: a worker that finds other tensors than the driver listed stops with an input error, and
    the plan's groups × segments cover every tensor and checkpoint exactly once."""
    from ilr_inspect.formats import OpenOptions
    from ilr_inspect.scaleout.measure import measure_task, plan
    from ilr_inspect.series import open_series

    with open_series(DIGITS) as series:
        cks = series.checkpoints
        order = list(cks[0].tensors)
        name = order[0]
        shapes = [{name: (*ck.tensors[name].shape, 1)} for ck in cks[:2]]  # not what the files hold
        with pytest.raises(InputError, match="changed since the series was listed"):
            measure_task([str(c.path) for c in cks[:2]], [c.format for c in cks[:2]], OpenOptions(), [name], shapes,
                         [True], False, False)
        pl = plan(cks, order, cpus=2, min_task_bytes=1)
        assert [n for g in pl.groups for n in g] == order
        assert pl.segments[0][0] == 0 and pl.segments[-1][1] == len(cks)
        assert all(a[1] == b[0] for a, b in zip(pl.segments, pl.segments[1:], strict=False))
        assert pl.tasks >= 8  # ≥ 4 per CPU where the series allows
        assert plan(cks, order, cpus=2).tasks == 1  # a tiny series: one task (64 MiB floor)


def test_norms_only_task_skips_the_boundary() -> None:
    """Without a cluster: a task whose tensors need no pairs opens only its own checkpoints (no boundary) and
    returns the same ‖w‖² bit for bit as a task that sums pairs across the boundary; a wrong ``before`` shape is
    reported as the local pass reports a shape change."""
    from ilr_inspect.formats import OpenOptions
    from ilr_inspect.scaleout.measure import measure_task
    from ilr_inspect.series import open_series

    with open_series(DIGITS) as series:
        cks = series.checkpoints
        assert len(cks) >= 3
        order = list(cks[0].tensors)
        shapes = [{n: tuple(ck.tensors[n].shape) for n in order} for ck in cks]
        paths, fmts = [str(c.path) for c in cks], [c.format for c in cks]
        rows = [True] * len(order)
        paired = measure_task(paths[:3], fmts[:3], OpenOptions(), order, shapes[:3], rows, False, True)
        before = {n: tuple(cks[0].tensors[n].shape) for n in order}
        alone = measure_task(paths[1:3], fmts[1:3], OpenOptions(), order, shapes[1:3], rows, False, False,
                             [False] * len(order), before)
        assert len(paired) == len(alone) == 2
        for (p_stats, p_warn), (a_stats, a_warn) in zip(paired, alone, strict=True):
            assert p_stats.keys() == a_stats.keys() and not p_warn and not a_warn
            for n, (ss, prev, tang, numel) in a_stats.items():
                assert prev is None and tang is None and numel == p_stats[n][3]
                assert np.array_equal(ss, p_stats[n][0])
                assert p_stats[n][1] is not None  # the paired task did sum the pair
        odd = {n: (*shape, 1) for n, shape in before.items()}
        one = [{order[0]: before[order[0]]}]
        warned = measure_task(paths[1:2], fmts[1:2], OpenOptions(), order[:1], one, rows[:1], False, False,
                              [False], {order[0]: odd[order[0]]})
        assert warned[0][1] == [f"{order[0]}: shape {odd[order[0]]} -> {before[order[0]]}; no angle for this pair"]
