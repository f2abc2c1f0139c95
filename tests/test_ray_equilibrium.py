"""`equilibrium --ray`: one Ray task per arm gives the local path's table exactly, also after a worker is killed
mid-arm and after an interrupted Ray run is resumed without Ray (docs/equilibrium.md, "Many arms on Ray").

The reference is the local path itself (one process, 1 torch thread); a Ray worker runs the same per-arm function
with 1 thread, and every random draw is a function of (seed, branch, step), so the rows must be bit-identical
except `branch_steps_per_s` (a wall-clock speed).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ilr_inspect.errors import UsageError
from ilr_inspect.scaleout.sweep import cluster_device

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "fixtures" / "digits"
LONG_ARM = "sgdm-lr0.1-wd0.016"  # λ_e 1.6e-2: 13 evaluations 6 steps apart
TIMING = {"branch_steps_per_s"}  # wall-clock speed: the only field allowed to differ


def _write_config(folder: Path) -> Path:
    """Two arms of the bundled FEC sweep (fixtures/fec-sweep) on the digits example, shortened to 1.2/λ_e."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ilr.toml").write_text(f"""
[model]
spec = "{DIGITS / 'model.py'}:build"
[data]
train = "{DIGITS / 'train.npz'}"
test = "{DIGITS / 'test.npz'}"
[starts]
checkpoints = "{DIGITS / 'ckpts'}"
select = ["first", "last"]
[protocol]
horizon = 1.2
eval_every = 0.1
seeds = 2
bootstrap = 20
window = 0.5
smooth = 0.2
input_noise = 0.3
[[arms]]
name = "sgdm"
optimizer = "sgd"
momentum = 0.9
lr = 0.1
batch_size = 32
intrinsic_lr = [1.6e-2, 1.131e-2]
decay = "weights"
""", encoding="utf-8")
    return folder


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def _assert_rows_equal(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [r["arm"] for r in got] == [r["arm"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w)
        diff = {k: (g[k], w[k]) for k in w if k not in TIMING and not _same(g[k], w[k])}
        assert not diff, f"{w['arm']}: {diff}"


def _rows(result: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = result.rows.to_dict("records")
    return rows


def _json_rows(out: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads((out / "equilibrium.json").read_text(encoding="utf-8"))["rows"]
    return rows


# --------------------------------------------------------------------------------------------- no cluster needed
def test_cluster_device_follows_the_cluster_not_the_driver() -> None:
    assert cluster_device("auto", 0) == "cpu"
    assert cluster_device("auto", 8) == "cuda"
    assert cluster_device("cuda:3", 1) == "cuda"  # Ray's CUDA_VISIBLE_DEVICES makes the task's GPU cuda:0
    assert cluster_device("cpu", 4) == "cpu"
    with pytest.raises(UsageError, match="no GPU"):
        cluster_device("cuda", 0)
    with pytest.raises(UsageError, match="auto, cpu or cuda"):
        cluster_device("mps", 0)


def test_help_and_library_import_no_ray() -> None:
    code = ("import sys\nfrom ilr_inspect.cli import app\n"
            "try:\n    app(['equilibrium', '--help'], prog_name='ilr-inspect')\nexcept SystemExit:\n    pass\n"
            "import ilr_inspect.retrain, ilr_inspect.scaleout.sweep\n"
            "print('LOADED', 'ray' in sys.modules, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "--ray" in proc.stdout and "ILR_INSPECT_RAY_ADDRESS" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "LOADED False False"


# ------------------------------------------------------------------------------------------------ with a cluster
@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """One in-process 2-CPU Ray cluster for the module; ``--ray local`` reuses an initialised ray."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_config(tmp_path_factory.mktemp("sweep") / "cfg")


@pytest.fixture(scope="module")
def reference(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The local path, 1 torch thread: the table every Ray variant must reproduce."""
    from ilr_inspect.retrain import equilibrium

    return equilibrium(run_dir, out=tmp_path_factory.mktemp("local") / "out", device="cpu", threads=1)


@pytest.mark.slow
def test_ray_sweep_matches_local(cluster: Any, run_dir: Path, reference: Any, tmp_path: Path) -> None:
    from ilr_inspect.retrain import equilibrium

    out = tmp_path / "ray"
    lines: list[str] = []
    got = equilibrium(run_dir, out=out, device="cpu", threads=1, ray="local", log=lines.append)
    want_rows = _rows(reference)
    _assert_rows_equal(_rows(got), want_rows)
    _assert_rows_equal(_json_rows(out), _json_rows(Path(reference.meta["settings"]["out"])))
    cols = [c for c in reference.curves.rows.columns]
    assert got.curves is not None and reference.curves is not None
    assert got.curves.rows[cols].equals(reference.curves.rows[cols])
    meta = got.meta["settings"]["ray"]
    assert meta["tasks"] == 2 and meta["num_cpus_per_task"] == 1 and meta["num_gpus_per_task"] == 0
    assert {w["torch_threads"] for w in meta["workers"].values()} == {1}
    assert got.meta["settings"]["device"] == "cpu"
    for arm in want_rows:  # every arm's summary was written by its worker, in the shared results folder
        assert json.loads((out / "arms" / arm["arm"] / "summary.json").read_text())["arm"] == arm["arm"]
    assert any(line.startswith("ray: 2 of 2 arm(s)") for line in lines)
    # A second run over the finished folder trains nothing (no tasks) and gives the same table.
    again = equilibrium(run_dir, out=out, device="cpu", threads=1, ray="local", resume=True)
    assert again.meta["settings"]["ray"]["tasks"] == 0
    _assert_rows_equal(_rows(again), want_rows)


def _ray_task_pids() -> list[int]:
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [int(line.split(None, 1)[0]) for line in ps.splitlines() if "ray::arm_task" in line]


@pytest.mark.slow
def test_killed_worker_is_retried_and_resumes(cluster: Any, run_dir: Path, reference: Any, tmp_path: Path) -> None:
    from ilr_inspect.retrain import equilibrium

    out = tmp_path / "ray-kill"
    arm_dir = out / "arms" / LONG_ARM
    killed: dict[str, Any] = {}

    def killer() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (arm_dir / "eval_00003.npz").exists() and (pids := _ray_task_pids()):
                killed["first_evals"] = {d.name: (d / "eval_00000.npz").stat().st_mtime_ns
                                         for d in (out / "arms").iterdir() if (d / "eval_00000.npz").exists()}
                killed["evals_before"] = len(list(arm_dir.glob("eval_*.npz")))
                for pid in pids:  # every running arm's worker (processes of this test's cluster), mid-arm
                    os.kill(pid, signal.SIGKILL)
                killed["pids"] = pids
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        got = equilibrium(run_dir, out=out, device="cpu", threads=1, ray="local")
    finally:
        thread.join()
    assert "pids" in killed, "no ray::arm_task worker was found to kill"
    assert killed["evals_before"] < 13  # killed mid-arm, not after
    _assert_rows_equal(_rows(got), _rows(reference))
    # The retries resumed from the saved evaluations instead of starting over: evaluation 0 was not rewritten.
    assert LONG_ARM in killed["first_evals"]
    for arm, mtime in killed["first_evals"].items():
        assert (out / "arms" / arm / "eval_00000.npz").stat().st_mtime_ns == mtime, arm


@pytest.mark.slow
def test_interrupted_ray_run_resumes_without_ray(cluster: Any, run_dir: Path, reference: Any, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (SIGINT to this process) during a Ray sweep, `--resume` without Ray, then the CLI with the address
    from ILR_INSPECT_RAY_ADDRESS over the finished folder."""
    from typer.testing import CliRunner

    from ilr_inspect.cli import app
    from ilr_inspect.retrain import equilibrium

    out = tmp_path / "ray-int"
    arm_dir = out / "arms" / LONG_ARM

    running = threading.Event()

    def interrupt() -> None:
        deadline = time.monotonic() + 120
        while running.is_set() and time.monotonic() < deadline:
            if (arm_dir / "eval_00002.npz").exists():  # 10 evaluations before this arm ends
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does
                return
            time.sleep(0.05)

    lines: list[str] = []
    running.set()
    thread = threading.Thread(target=interrupt)
    thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            equilibrium(run_dir, out=out, device="cpu", threads=1, ray="local", log=lines.append)
    finally:
        running.clear()
        thread.join()
    assert any("rerun with --resume" in line for line in lines)
    assert not (out / "equilibrium.json").exists()
    deadline = time.monotonic() + 60  # the interrupted tasks were cancelled by force: their workers are gone
    while _ray_task_pids():
        assert time.monotonic() < deadline, "cancelled Ray workers still running"
        time.sleep(0.1)
    partial = [d.name for d in (out / "arms").iterdir() if not (d / "summary.json").exists()]
    assert LONG_ARM in partial, "the interrupt came too late: the arm had finished"
    first = (arm_dir / "eval_00000.npz").stat().st_mtime_ns
    got = equilibrium(run_dir, out=out, device="cpu", threads=1, resume=True)
    _assert_rows_equal(_rows(got), _rows(reference))
    assert (arm_dir / "eval_00000.npz").stat().st_mtime_ns == first  # resumed, not recomputed

    # The CLI takes the address from the environment; over a finished folder it submits no task.
    monkeypatch.setenv("ILR_INSPECT_RAY_ADDRESS", "local")
    res = CliRunner().invoke(app, ["equilibrium", "--run-dir", str(run_dir), "--out", str(out), "--resume",
                                   "--device", "cpu", "--threads", "1", "-q", "-f", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["meta"]["settings"]["ray"]["address"] == "local" and doc["meta"]["settings"]["ray"]["tasks"] == 0
    _assert_rows_equal(doc["rows"], _json_rows(Path(reference.meta["settings"]["out"])))  # NaN is null


@pytest.mark.slow
def test_ray_refuses_more_threads_than_a_node_has(cluster: Any, run_dir: Path, tmp_path: Path) -> None:
    from ilr_inspect.retrain import equilibrium

    with pytest.raises(UsageError, match="no node of the Ray cluster has that many CPUs"):
        equilibrium(run_dir, out=tmp_path / "x", device="cpu", threads=64, ray="local")
    assert not (tmp_path / "x").exists()  # refused before the results folder was claimed


@pytest.mark.gpu
def test_ray_sweep_gives_each_arm_a_gpu(run_dir: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("ray")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from ilr_inspect.retrain import equilibrium

    local = equilibrium(run_dir, out=tmp_path / "local", device="cuda", quick=True)
    got = equilibrium(run_dir, out=tmp_path / "ray", device="auto", quick=True, ray="local")
    meta = got.meta["settings"]["ray"]
    assert got.meta["settings"]["device"] == "cuda"
    assert meta["num_gpus_per_task"] == 1 and meta["tasks"] == 2
    assert all(len(w["gpu_ids"]) == 1 for w in meta["workers"].values())
    assert list(got.rows["arm"]) == list(local.rows["arm"])
    assert set(got.rows["status"]) == {"smoke-test"}
    # bf16 autocast on CUDA is not bit-reproducible across processes; the accuracies agree to a few probe inputs.
    assert (got.rows["test_acc"] - local.rows["test_acc"]).abs().max() < 0.05
