"""The fast paths of norms/angles (issue 14) and non-finite tensors (issue 9): values against a float64 NumPy
recomputation, the compiled pass right first time, no torch import for a safetensors series, resident file pages
released checkpoint by checkpoint."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from ilr_inspect.api import angles, norms
from ilr_inspect.measure import stream
from ilr_inspect.output import to_json_obj


def _angle64(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between a and b in float64, stable for tiny angles: 2·atan2(‖â − b̂‖, ‖â + b̂‖)."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
    return float(2 * math.atan2(np.linalg.norm(ua - ub), np.linalg.norm(ua + ub)))


def _series(folder: Path, count: int, nan_at: int | None = None) -> list[dict[str, np.ndarray]]:
    """Training-like checkpoints: each one decays the last by ~1 % and adds noise (angles ~1e-3..1e-2 rad)."""
    rng = np.random.default_rng(7)
    cur = {"enc.w": rng.standard_normal((64, 300)).astype(np.float32),
           "enc.v": rng.standard_normal((1000,)).astype(np.float32),
           "head.k": rng.standard_normal((3, 4, 5, 6))}  # float64
    states = []
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        if k:
            cur = {n: (0.99 * x + 3e-3 * rng.standard_normal(x.shape)).astype(x.dtype) for n, x in cur.items()}
        state = {n: x.copy() for n, x in cur.items()}
        if k == nan_at:
            state["enc.w"][5, 7] = np.nan
        save_file(state, str(folder / f"checkpoint-{100 * (k + 1)}.safetensors"), metadata={"step": str(100 * (k + 1))})
        states.append(state)
    return states


@pytest.fixture(params=["numpy", "kernel"])
def path_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "kernel":
        pytest.importorskip("numba")
        monkeypatch.setattr(stream, "KERNEL_MIN_PAIRS", 0)
    monkeypatch.setattr(stream, "KERNEL", request.param == "kernel")
    return str(request.param)


def test_values_match_float64_recomputation(tmp_path: Path, path_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Norms agree with a float64 NumPy recomputation to 1e-12 relative on both paths; angles to 1e-9 relative
    with the compiled pass (float64 sums) and within the documented 1e-6 rad without it. On ordinary training
    data the compiled pass needs no second computation by NumPy."""
    states = _series(tmp_path / "s", 4)
    numpy_calls: list[int] = []
    real = stream._numpy_pair
    monkeypatch.setattr(stream, "_numpy_pair", lambda b, a, *rest: (numpy_calls.append(1), real(b, a, *rest))[1])
    n = norms(tmp_path / "s", per_tensor=True).rows.to_dict(orient="records")
    got = {(r["parameter"], r["step"]): r for r in n}
    assert len(got) == len(states) * len(states[0])
    for k, st in enumerate(states):
        for name, x in st.items():
            ref = float(np.sqrt((x.astype(np.float64) ** 2).sum()))
            assert got[(name, 100 * (k + 1))]["norm"] == pytest.approx(ref, rel=1e-12, abs=0)
    a = angles(tmp_path / "s", per_tensor=True).rows.to_dict(orient="records")
    assert len(a) == 3 * len(states[0])
    for r in a:
        k = int(r["step_to"]) // 100 - 1
        name = str(r["parameter"])
        ref = _angle64(states[k - 1][name], states[k][name])
        assert 1e-4 < ref < 0.1
        if path_kind == "kernel":
            assert r["angle"] == pytest.approx(ref, rel=1e-9)
        else:
            assert abs(float(r["angle"]) - ref) < 1e-6
    if path_kind == "kernel":
        assert not numpy_calls  # the float64 error model accepts ordinary data the first time


def test_nan_tensor_is_null_for_its_checkpoint_only(tmp_path: Path, path_kind: str) -> None:
    """A NaN in enc.w at the 2nd of 4 checkpoints: that checkpoint's enc.w norm and the two angles touching it
    are null (JSON) with a warning naming the tensor; the next, finite checkpoint's norm of enc.w and every
    other value stay exact."""
    states = _series(tmp_path / "s", 4, nan_at=1)
    res = norms(tmp_path / "s", per_tensor=True)
    assert any("enc.w" in w and "NaN" in w for w in res.meta["warnings"])
    rows = to_json_obj(res)["rows"]
    for r in rows:
        k = int(r["step"]) // 100 - 1
        name = r["parameter"]
        x = states[k][name]
        if name == "enc.w" and k == 1:
            assert r["norm"] is None
        else:
            assert r["norm"] == pytest.approx(float(np.sqrt((x.astype(np.float64) ** 2).sum())), rel=1e-12, abs=0)
    arows = to_json_obj(angles(tmp_path / "s", per_tensor=True))["rows"]
    assert len(arows) == 3 * len(states[0])
    for r in arows:
        k = int(r["step_to"]) // 100 - 1
        name = r["parameter"]
        if name == "enc.w" and k in (1, 2):
            assert r["angle"] is None
        else:
            assert r["angle"] == pytest.approx(_angle64(states[k - 1][name], states[k][name]), rel=1e-6)


def _imported(args: list[str]) -> set[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "ilr_inspect", *args], capture_output=True,
                       text=True, env=env, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    mods = set()
    for line in p.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            mods.add(line.rsplit("|", 1)[1].strip())
    return mods


@pytest.mark.parametrize("cmd", ["norms", "angles", "ls"])
def test_safetensors_series_never_imports_torch(tmp_path: Path, cmd: str) -> None:
    """torch costs ~1 s to import; a safetensors series needs only NumPy and the format's reader."""
    _series(tmp_path / "s", 2)
    mods = _imported([cmd, str(tmp_path / "s"), "-f", "csv", "-q"] if cmd != "ls" else [cmd, str(tmp_path / "s")])
    assert "torch" not in mods
    assert "ilr_inspect.measure" in mods or cmd == "ls"  # the command really ran through the library


@pytest.mark.parametrize("layout", ["flax", "orbax", "keras", "npz"])
def test_other_numpy_formats_never_import_torch(tmp_path: Path, layout: str) -> None:
    """Flax msgpack, Orbax, Keras HDF5 and npz series: NumPy and the format's own reader suffice."""
    if layout == "npz":
        folder = tmp_path / "n"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for step in (100, 200):
            np.savez(folder / f"ckpt-{step}.npz", **{"layer0.weight": rng.standard_normal((8, 4))})
    else:
        folder = Path(__file__).resolve().parents[1] / "fixtures" / layout
    mods = _imported(["norms", str(folder), "-f", "csv", "-q"])
    assert "torch" not in mods and "ilr_inspect.measure" in mods


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status and madvise are Linux's")
def test_release_drops_a_checkpoints_resident_file_pages(tmp_path: Path) -> None:
    """After a checkpoint is done, its mapped pages leave the process (RssFile falls by its size) and the arrays
    still read the right values (faulted in again from the file)."""
    from ilr_inspect.series import open_series

    x = np.arange(16 << 20, dtype=np.float32).reshape(4096, -1)  # 64 MiB
    save_file({"w": x}, str(tmp_path / "checkpoint-1.safetensors"))
    ck = open_series([tmp_path / "checkpoint-1.safetensors"]).checkpoints[0]

    def rss_file() -> int:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("RssFile:")) * 1024

    arr = ck.read("w")
    before = rss_file()
    assert float(arr.astype(np.float64).sum()) == float(x.astype(np.float64).sum())  # touches every page
    touched = rss_file()
    assert touched - before > 48 << 20
    stream._release(ck)
    assert touched - rss_file() > 48 << 20
    np.testing.assert_array_equal(arr[-1], x[-1])
    ck.close()
