"""The fast paths of norms/angles (issue 14) and non-finite tensors (issue 9): values against a float64 NumPy
recomputation, the compiled pass right first time, no torch import for a safetensors series, resident file pages
released checkpoint by checkpoint."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from ilr_inspect.api import angles, norms, units
from ilr_inspect.measure import stream
from ilr_inspect.output import Records, Result, serialize, to_json_obj


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


# --- Fixed cost of a small run (issue 14): tables, CSV and JSON are rendered from plain rows, not DataFrames ---

_FIXTURE_SGD = Path(__file__).resolve().parents[1] / "fixtures" / "layouts" / "safetensors_meta_sgd"


def _renderings(result: Result) -> dict[str, bytes]:
    """CSV, JSON and the rich table of a result (fixed width, no terminal)."""
    from rich.console import Console

    from ilr_inspect.cli.common import render_table

    console = Console(file=None, record=True, width=400, force_terminal=False)
    with console.capture():
        console.print(render_table(result))
    return {"csv": serialize(result, "csv"), "json": serialize(result, "json"),
            "table": console.export_text().encode()}


def _both_ways(result: Result) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """The same result rendered from its rows (no pandas) and from the DataFrame pandas builds of them."""
    assert isinstance(result.data, Records)
    assert result.data.typed() is not None  # the plain-row renderer covers every column (no silent fallback)
    plain = Result(result.kind, Records(result.data.rows, result.data.columns, result.data.dtypes), result.meta)
    frame = Result(result.kind, result.data.frame(), result.meta)
    return _renderings(plain), _renderings(frame)


def test_plain_rows_render_byte_for_byte_like_pandas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """norms/angles (per unit and per tensor), units, ls and hparams of a real SGD series (hyperparameters in the
    safetensors metadata) and of a series without hyperparameters (null columns, a NaN tensor): CSV, JSON and the
    table are the same bytes whether rendered from the rows or through pandas (float digits, nulls, Int64 steps)."""
    from ilr_inspect.inventory import hparams, ls

    monkeypatch.setenv("ILR_INSPECT_TIMESTAMP", "2026-01-01T00:00:00+00:00")
    _series(tmp_path / "s", 3, nan_at=1)
    checked = 0
    for folder in (_FIXTURE_SGD, tmp_path / "s"):
        results = [norms(folder), norms(folder, per_tensor=True), angles(folder), angles(folder, per_tensor=True),
                   units(folder), ls(folder), hparams(folder)]
        for res in results:
            plain, frame = _both_ways(res)
            for fmt in ("csv", "json", "table"):
                assert plain[fmt] == frame[fmt], (folder.name, res.kind, fmt)
                checked += 1
    sgd_norms = norms(_FIXTURE_SGD).rows
    assert sgd_norms["lr"].notna().all() and sgd_norms["step"].dtype == "int64"  # real values were compared
    assert checked == 2 * 7 * 3


def test_plain_rows_match_pandas_typing_on_awkward_values() -> None:
    """Columns pandas types in surprising ways: ints with a missing value become float (100.0), bools with None
    stay objects, all-None stays object, a key absent from a row is NaN, strings needing CSV quoting, floats at
    the repr switch points, NumPy scalars, and the whole-or-float / float64 casts of ls and hparams."""
    rows: list[dict[str, Any]] = [
        {"i": 1, "i_gap": 100, "b": True, "b_none": True, "none": None, "s": 'a,"b"', "f": 0.1 + 0.2,
         "np_f": np.float64(1e16), "np_i": np.int64(7), "np_b": np.bool_(False), "w": 10, "w_frac": 0.5,
         "x": 1.0, "mixed": 3},
        {"i": 2, "b": False, "b_none": None, "none": None, "s": "line\nbreak", "f": 1e-5, "np_f": np.float64(-0.0),
         "np_i": np.int64(-3), "np_b": np.bool_(True), "w": None, "w_frac": 2, "x": None, "mixed": "three"},
        {"i": 3, "i_gap": 300, "b": True, "b_none": False, "none": None, "s": "", "f": math.inf,
         "np_f": np.float64(123456789.123), "np_i": np.int64(0), "np_b": np.bool_(True), "w": 2**40,
         "w_frac": None, "x": 2.5, "mixed": None, "late": "only here"},
    ]
    res = Result("ls", Records(rows, dtypes={"w": "whole-or-float", "w_frac": "whole-or-float", "x": "float64"}), {})
    plain, frame = _both_ways(res)
    for fmt in ("csv", "json", "table"):
        assert plain[fmt] == frame[fmt], fmt
    typed = {name: kind for name, kind, _ in res.data.typed() or []}
    dtypes = {str(c): str(t) for c, t in res.rows.dtypes.items()}
    assert (typed["i"], dtypes["i"]) == ("int", "int64")
    assert (typed["i_gap"], dtypes["i_gap"]) == ("float", "float64")
    assert (typed["b"], dtypes["b"]) == ("bool", "bool")
    assert (typed["w"], dtypes["w"]) == ("Int64", "Int64")
    assert (typed["w_frac"], dtypes["w_frac"]) == ("float", "float64")
    assert typed["b_none"] == typed["none"] == typed["mixed"] == "object"
    assert b"100.0" in plain["csv"] and b'"a,""b"""' in plain["csv"]


_WRAPPER = """
import io, os, sys
os.environ["ILR_INSPECT_SLOW_EXIT"] = "1"
from ilr_inspect.cli import common, main
emitted = []
real_emit = common.emit
def emit(result, fmt, output, **kw):
    emitted.append((result, str(getattr(fmt, "value", fmt)), kw.get("table_columns")))
    return real_emit(result, fmt, output, **kw)
common.emit = emit
sys.argv = ["ilr-inspect", *ARGS]
try:
    main()
finally:
    open(RECORD + ".modules", "w").write("\\n".join(sorted(sys.modules)))
    # The same Result rendered the way every format was rendered before: through its DataFrame.
    from rich.console import Console
    from ilr_inspect.output import Result, serialize
    result, fmt, cols = emitted[0]
    old = Result(result.kind, result.rows, result.meta)
    if fmt == "table":
        buf = io.StringIO()
        Console(file=buf, soft_wrap=False, width=int(os.environ["COLUMNS"])).print(common.render_table(old, cols))
        text = buf.getvalue()
    else:
        text = serialize(old, fmt).decode()
    open(RECORD + ".expected", "w").write(text)
"""


def _run_recording_modules(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], set[str], str]:
    """Run the CLI in a subprocess through a small wrapper that records ``sys.modules`` when the command is done,
    then renders the very Result the CLI printed through pandas (as before this change)."""
    record = str(tmp_path / "run")
    code = _WRAPPER.replace("ARGS", repr(args)).replace("RECORD", repr(record))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "400"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       check=False, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    return p, set(Path(record + ".modules").read_text().split()), Path(record + ".expected").read_text()


@pytest.mark.parametrize(("cmd", "fmt"), [("norms", "csv"), ("norms", "table"), ("angles", "json"), ("ls", "csv"),
                                          ("hparams", "json"), ("norms", "json")])
def test_tiny_series_output_unchanged_and_no_torch(tmp_path: Path, cmd: str, fmt: str) -> None:
    """On a 2-file safetensors series the CLI prints byte for byte what pandas renders from the same Result (the
    path every format took before), and torch is never imported."""
    _series(tmp_path / "s", 2)
    args = [cmd, str(tmp_path / "s"), "-f", fmt] + (["-q"] if cmd != "ls" else [])
    p, mods, expected = _run_recording_modules(args, tmp_path)
    assert p.stdout == expected
    assert ("effective_lr" if cmd == "norms" else "step") in p.stdout and p.stdout.count("\n") >= 3
    assert "torch" not in mods
    assert "ilr_inspect.measure" in mods or cmd in ("ls", "hparams")


@pytest.mark.parametrize(("cmd", "fmt"), [("norms", "csv"), ("norms", "table"), ("ls", "json")])
def test_tiny_series_never_imports_pandas(tmp_path: Path, cmd: str, fmt: str) -> None:
    """pandas + pyarrow cost ~0.3 s to import; a series without training logs renders without them."""
    _series(tmp_path / "s", 2)
    args = [cmd, str(tmp_path / "s"), "-f", fmt, "-q"] if cmd != "ls" else [cmd, str(tmp_path / "s"), "-f", fmt]
    _, mods, _ = _run_recording_modules(args, tmp_path)
    assert "ilr_inspect.output" in mods
    assert not {m for m in mods if m.split(".")[0] in ("pandas", "pyarrow", "torch")}


_LEAN_PROBE = """
import sys
import numpy as np
from ilr_inspect.measure import _kernel
rng = np.random.default_rng(0)
a = rng.standard_normal((3, 1000)).astype(np.float32)
b = a + np.float32(0.01) * rng.standard_normal((3, 1000)).astype(np.float32)
got = np.stack(_kernel.pair_sums(b, a))
x, y = a.astype(np.float64), b.astype(np.float64)
ref = np.stack([(x * x).sum(1), (y * y).sum(1), ((y - x) ** 2).sum(1), ((y - x) * x).sum(1)])
assert np.allclose(got, ref, rtol=1e-12, atol=0), (got, ref)
hidden = "scipy.linalg" not in sys.modules
import numba.np.arraymath as am
import scipy.linalg  # importable again once the kernel is loaded
print(hidden, am._HAVE_BLAS)
"""


@pytest.mark.parametrize("lean", ["1", "0"])
def test_lean_numba_load_skips_scipy_only_when_asked(lean: str) -> None:
    """The CLI and Ray workers (ILR_INSPECT_LEAN_NUMBA=1) load the kernel without numba's scipy/BLAS probe; a
    library caller keeps numba's normal BLAS support. The kernel's sums equal a float64 recomputation either way."""
    pytest.importorskip("numba")
    pytest.importorskip("scipy.linalg")
    env = {**os.environ, "ILR_INSPECT_LEAN_NUMBA": lean}
    out = subprocess.run([sys.executable, "-c", _LEAN_PROBE], env=env, capture_output=True, text=True, check=True)
    hidden, have_blas = out.stdout.split()
    assert (hidden, have_blas) == (("True", "False") if lean == "1" else ("False", "True"))


def test_built_extension_serves_small_series_without_numba(tmp_path: Path) -> None:
    """Where the extension was built at install, even a tiny series takes the compiled pass (no load cost) and
    numba is never imported; the values equal a float64 recomputation."""
    pytest.importorskip("ilr_inspect.measure._native")
    rng = np.random.default_rng(11)
    arrays = [rng.standard_normal((16, 40)).astype(np.float32)]
    arrays.append((0.99 * arrays[0] + 0.05 * rng.standard_normal((16, 40))).astype(np.float32))
    for k, x in enumerate(arrays):
        save_file({"w": x}, str(tmp_path / f"step_{k + 1}.safetensors"))
    code = (
        "import sys, json\n"
        "from ilr_inspect.api import angles\n"
        f"r = angles({str(tmp_path)!r})\n"
        "mods = sorted(m for m in sys.modules if m.startswith(('numba', 'ilr_inspect.measure._')))\n"
        "print(json.dumps([mods, float(r.frame['angle'].iloc[0])]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    mods, angle = json.loads(out.stdout.splitlines()[-1])
    assert "ilr_inspect.measure._ckernel" in mods and not any(m.startswith("numba") for m in mods)
    a, b = (x.astype(np.float64).ravel() for x in arrays)
    ref = math.atan2(math.sqrt(max(0.0, float(a @ a) * float(b @ b) - float(a @ b) ** 2)), float(a @ b))
    assert angle == pytest.approx(ref, abs=1e-6)


def test_built_extension_refuses_a_buffer_smaller_than_its_shape() -> None:
    native = pytest.importorskip("ilr_inspect.measure._native")
    from ilr_inspect.measure import _ckernel

    out = np.empty(4)
    with pytest.raises(ValueError, match="smaller than its shape"):
        _ckernel.norm_sums(np.zeros(10, dtype=np.float32), 4, 3, False, out)
    with pytest.raises(ValueError, match="one shape and dtype"):
        native.pair_sums(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32))
