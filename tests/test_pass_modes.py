"""The measuring pass sums only what its caller needs: `norms` reads each tensor once per checkpoint and keeps no
previous value, except for the units whose norms row takes an angle-implied equilibrium norm; the table stays the
same as the full pass's, value for value. Also: the compiled loops' ‖b‖² agree bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from ilr_inspect import api
from ilr_inspect.measure import stream
from ilr_inspect.output import to_json_obj

ROOT = Path(__file__).resolve().parents[1] / "fixtures"

# (series folder, whether some of its norms rows are angle-implied): safetensors, HF Trainer, torch zip, Keras
# HDF5 (tensor-major), Orbax, and series with and without hyperparameters.
SERIES = [
    ("digits/ckpts", True),
    ("hf_trainer", True),
    ("layouts/aliases", True),
    ("layouts/safetensors_meta_sgd", True),
    ("keras", True),
    ("orbax", True),
    ("step_angle/equilibrium", True),
    ("layouts/torch_groups/ckpts", False),
    ("layouts/safetensors_meta", False),
]


class _Spy:
    """Records, per call of row_stats, the tensor shape and whether a previous value was given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[bool] = []
        real = stream.row_stats

        def spy(cur: np.ndarray, prev: np.ndarray | None, **kw: Any) -> stream.TensorStats:
            self.calls.append(prev is not None)
            return real(cur, prev, **kw)

        monkeypatch.setattr(stream, "row_stats", spy)


def _norms_json(path: Path, *, full: bool, per_tensor: bool = False) -> str:
    """`norms` as JSON; ``full``: the pass forced to sum every pair (what `angles` and `report` run)."""
    with pytest.MonkeyPatch.context() as mp:
        if full:
            real = api.measure  # type: ignore[attr-defined]
            mp.setattr(api, "measure", lambda *a, **k: real(*a, **{**k, "angles": True}))
        res = api.norms(path, per_tensor=per_tensor)
    return json.dumps(to_json_obj(res), sort_keys=True)


@pytest.fixture(autouse=True)
def _fixed_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ILR_INSPECT_TIMESTAMP", "2026-01-01T00:00:00+00:00")
    monkeypatch.delenv("ILR_INSPECT_RAY_ADDRESS", raising=False)


@pytest.mark.parametrize("kernel", ["off", "on"])
@pytest.mark.parametrize(("rel", "implied"), SERIES)
def test_norms_table_identical_to_full_pass(rel: str, implied: bool, kernel: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Byte-identical JSON (every float, warning and unit) with and without the pair sums; the norms-only pass
    gives a previous value only to tensors of units that need the angle, so fewer (or no) pairs are summed."""
    if kernel == "on":
        pytest.importorskip("numba")
    monkeypatch.setenv("ILR_INSPECT_KERNEL", kernel)
    path = ROOT / rel
    full = _norms_json(path, full=True)
    spy = _Spy(monkeypatch)
    lean = _norms_json(path, full=False)
    assert lean == full
    rows = json.loads(lean)["rows"]
    assert rows
    has_implied = any(r["predicted_norm_source"] == "angle-implied" for r in rows)
    assert has_implied == implied
    paired = sum(spy.calls)
    if implied:
        assert 0 < paired < len(spy.calls) or rel in ("layouts/aliases",)  # some tensors keep no previous value
    else:
        assert paired == 0  # no tensor of this series keeps its previous value


def test_norms_per_tensor_identical_to_full_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-tensor rows: each tensor row decides on its own (its own hyperparameters and size)."""
    path = ROOT / "digits" / "ckpts"
    full = _norms_json(path, full=True, per_tensor=True)
    lean = _norms_json(path, full=False, per_tensor=True)
    assert lean == full
    assert any(r["predicted_norm_source"] == "angle-implied" for r in json.loads(lean)["rows"])


def _series(folder: Path, n_ck: int = 4, reshape_at: int | None = None) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    w: dict[str, np.ndarray] = {"a.weight": rng.standard_normal((64, 300)).astype(np.float32),
                                "b.weight": rng.standard_normal((32, 50)).astype(np.float64)}
    out = []
    folder.mkdir()
    for k in range(n_ck):
        if k:
            w = {n: (0.99 * x + 0.01 * rng.standard_normal(x.shape)).astype(x.dtype) for n, x in w.items()}
        state = dict(w)
        if k == reshape_at:
            state["b.weight"] = rng.standard_normal((16, 50))
            w["b.weight"] = state["b.weight"]
        save_file(state, str(folder / f"checkpoint-{100 * (k + 1)}.safetensors"))
        out.append(state)
    return out


class _Series:
    def __init__(self, folder: Path) -> None:
        from ilr_inspect.formats import OpenOptions, detect

        paths = sorted(folder.glob("*.safetensors"))
        self.checkpoints = [detect(p).open(p, OpenOptions()) for p in paths]
        for k, ck in enumerate(self.checkpoints):
            ck.step = 100 * (k + 1)

    def hparams_for(self, ck: Any) -> dict[str, Any]:
        return {}


@pytest.mark.parametrize("kernel", ["off", "on"])
def test_norms_only_values_and_warnings(tmp_path: Path, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No hyperparameters: no tensor needs pairs, none is given a previous value; norms equal a float64
    recomputation to 1e-12, and a shape change (a series opened by a caller that allows it) is reported as in
    the full pass."""
    from ilr_inspect.invariance.unit import Unit
    from ilr_inspect.measure import measure

    if kernel == "on":
        pytest.importorskip("numba")
    monkeypatch.setenv("ILR_INSPECT_KERNEL", kernel)
    states = _series(tmp_path / "s", reshape_at=2)
    units = [Unit(n, (n,), "tensor", True, "user", "t") for n in ("a.weight", "b.weight")]
    series = _Series(tmp_path / "s")
    full = measure(series, units, per_tensor=True)
    spy = _Spy(monkeypatch)
    lean = measure(series, units, per_tensor=True, angles=False)
    assert spy.calls and not any(spy.calls)
    assert json.dumps(lean.tensor_rows.rows) == json.dumps(full.tensor_rows.rows)
    assert json.dumps(lean.norm_rows.rows) == json.dumps(full.norm_rows.rows)
    assert lean.warnings == full.warnings
    assert any("b.weight: shape (32, 50) -> (16, 50)" in w for w in lean.warnings)
    assert not len(lean.angle_rows) and len(full.angle_rows)
    for r in lean.tensor_rows.rows:
        x = states[int(r["step"]) // 100 - 1][r["parameter"]]
        assert r["norm"] == pytest.approx(float(np.sqrt((x.astype(np.float64) ** 2).sum())), rel=1e-12, abs=0)
    for ck in series.checkpoints:
        ck.close()


@pytest.mark.parametrize("impl", ["_native", "_kernel"])  # the extension built at install; numba's loops
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (64, 3000), (2, 1 << 20), (1000, 17)])
def test_kernel_norm_equals_pair_norm_bit_for_bit(impl: str, dtype: type, shape: tuple[int, int]) -> None:
    """The norm-only loop and the pair loop give the same ‖b‖² bit for bit (so `norms` and `angles`/`report`
    agree exactly with the kernel on), and both are within float64 rounding of a float64 NumPy recomputation;
    the pair loop takes the known ‖a‖² unchanged."""
    kernel = pytest.importorskip(f"ilr_inspect.measure.{impl}")
    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    b: np.ndarray = rng.standard_normal(shape).astype(dtype)
    a: np.ndarray = (b + 0.01 * rng.standard_normal(shape)).astype(dtype)
    nb = kernel.norm_sums(b)
    known = kernel.norm_sums(a)
    aa, bb, dd, da = kernel.pair_sums(b, a, known)
    assert aa is known
    assert np.array_equal(nb, bb)
    x, y = a.astype(np.float64), b.astype(np.float64)
    np.testing.assert_allclose(bb, (y * y).sum(axis=1), rtol=1e-12, atol=0)
    np.testing.assert_allclose(dd, ((y - x) ** 2).sum(axis=1), rtol=1e-9, atol=0)
    np.testing.assert_allclose(da, ((y - x) * x).sum(axis=1), rtol=1e-9, atol=1e-12 * float(np.abs((y - x) * x).sum()))
    aa2 = kernel.pair_sums(b, a)[0]  # ‖a‖² unknown: the norm loop's
    assert np.array_equal(aa2, known)


def _rss_file() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssFile:")) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="/proc/self/status is Linux's")
def test_norms_only_pass_keeps_no_checkpoint_resident(tmp_path: Path) -> None:
    """Between checkpoints, the full pass keeps the last checkpoint mapped (it is the next one's previous value),
    the norms-only pass keeps none: each checkpoint's pages are released as soon as its own sums are done."""
    from ilr_inspect.series import open_series

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 4096)).astype(np.float32)  # 32 MiB per checkpoint
    ref = []
    for k in range(3):
        w = x * np.float32(1 + k / 10)
        save_file({"w": w}, str(tmp_path / f"checkpoint-{k + 1}.safetensors"))
        ref.append((w.astype(np.float64) ** 2).sum(axis=1))
    with open_series(tmp_path) as series:
        cks = series.checkpoints
        for pairs, most, least in ((None, None, 24 << 20), (set(), 8 << 20, None)):
            base = _rss_file()
            for cs in stream.stream_stats(cks, ["w"], pair_names=pairs):
                held = _rss_file() - base
                if most is not None:
                    assert held < most, held
                if least is not None and cs.index < len(cks) - 1:
                    assert held > least, held
                st = cs.tensors["w"]
                np.testing.assert_allclose(st.sumsq, ref[cs.index], rtol=1e-12, atol=0)
                assert (st.tang is None) == (pairs is not None or cs.index == 0)
