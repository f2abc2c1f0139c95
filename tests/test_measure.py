"""Measurements against independent references: float64 NumPy recomputation, exact SGD/SGDM/AdamW identities on
a real conv→BN network trained with torch.optim, intrinsic time bookkeeping, regimes, one-pass reading."""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ilr_inspect.checkpoint import Checkpoint, DictSource, HParams
from ilr_inspect.invariance.unit import Unit
from ilr_inspect.measure import measure
from ilr_inspect.measure.regime import classify


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is ~50× faster than two on a loaded 2-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Series:
    def __init__(self, cks: list[Checkpoint]) -> None:
        self.checkpoints = cks

    def hparams_for(self, ck: Checkpoint) -> dict[str, HParams]:
        return ck.hparams


def _ck(step: int, arrays: dict[str, np.ndarray], hp: HParams | None = None) -> Checkpoint:
    return Checkpoint(Path(f"ck_{step}.npz"), "test", DictSource(arrays), step=step, step_source="contents",
                      hparams={k: hp for k in arrays} if hp else {})


def _ref_angle(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    ah, bh = a64 / np.linalg.norm(a64), b64 / np.linalg.norm(b64)
    return float(2 * math.atan2(np.linalg.norm(ah - bh), np.linalg.norm(ah + bh)))


# ------------------------------------------------------------------ float64 recomputation
def test_norms_and_angles_match_float64_numpy() -> None:
    rng = np.random.default_rng(0)
    shapes = {"conv.weight": (16, 8, 3, 3), "big.weight": (3, 400_000), "bn.weight": (16,), "emb": (5000, 32)}
    base = {k: rng.standard_normal(s).astype(np.float32) * 3 for k, s in shapes.items()}
    cks, arrays = [], []
    for t in range(4):
        arr = {k: (v * (1 + 0.1 * t) + 0.05 * t * rng.standard_normal(v.shape)).astype(np.float32)
               for k, v in base.items()}
        arrays.append(arr)
        cks.append(_ck(10 * t, arr))
    units = [Unit(k, (k,), "tensor", True, "user", "test") for k in shapes]
    units.append(Unit("joint", ("conv.weight", "bn.weight"), "joint", True, "user", "test"))
    units.append(Unit("rows", ("emb",), "channel", True, "user", "test"))
    m = measure(_Series(cks), units)
    for t, arr in enumerate(arrays):
        for k in shapes:
            got = m.norms[(m.norms.unit == k) & (m.norms.step == 10 * t)]["norm"].item()
            assert got == pytest.approx(float(np.linalg.norm(arr[k].astype(np.float64))), rel=1e-6)
        joint = np.concatenate([arr["conv.weight"].ravel(), arr["bn.weight"]]).astype(np.float64)
        got = m.norms[(m.norms.unit == "joint") & (m.norms.step == 10 * t)]["norm"].item()
        assert got == pytest.approx(float(np.linalg.norm(joint)), rel=1e-6)
        rows = np.linalg.norm(arr["emb"].astype(np.float64), axis=1)
        got = m.norms[(m.norms.unit == "rows") & (m.norms.step == 10 * t)]["norm"].item()
        assert got == pytest.approx(float(np.sqrt(np.mean(rows**2))), rel=1e-6)
    for t in range(1, 4):
        for k in shapes:
            row = m.angles[(m.angles.unit == k) & (m.angles.step_to == 10 * t)]
            ref = _ref_angle(arrays[t - 1][k], arrays[t][k])
            assert row["angle"].item() == pytest.approx(ref, abs=1e-5)
            assert row["angle_per_step"].item() == pytest.approx(ref / 10, abs=1e-6)
            assert row["angle_per_sqrt_step"].item() == pytest.approx(ref / math.sqrt(10), abs=1e-6)
            d = (arrays[t][k].astype(np.float64) - arrays[t - 1][k]).ravel()
            rel = np.linalg.norm(d) / np.linalg.norm(arrays[t - 1][k].astype(np.float64))
            assert row["relative_update"].item() == pytest.approx(rel, rel=1e-6)
        e_prev, e_cur = arrays[t - 1]["emb"].astype(np.float64), arrays[t]["emb"].astype(np.float64)
        per_row = [_ref_angle(e_prev[i], e_cur[i]) for i in range(e_prev.shape[0])]
        got = m.angles[(m.angles.unit == "rows") & (m.angles.step_to == 10 * t)]["angle"].item()
        assert got == pytest.approx(math.sqrt(np.mean(np.square(per_row))), abs=1e-5)


@pytest.mark.parametrize("theta", [3e-8, 1e-6, 1e-3, 0.3, 2.5])
def test_tiny_and_large_angles_are_exact(theta: float) -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal(10_000)
    u = rng.standard_normal(10_000)
    u -= a * (a @ u) / (a @ a)
    u *= np.linalg.norm(a) / np.linalg.norm(u)
    b = 1.7 * (math.cos(theta) * a + math.sin(theta) * u)  # rotated by θ, rescaled: the angle must ignore scale
    m = measure(_Series([_ck(0, {"w": a}), _ck(1, {"w": b})]), [Unit("w", ("w",), "tensor", True, "user", "t")])
    assert m.angles["angle"].item() == pytest.approx(theta, abs=1e-8)  # float64 data; the target is 1e-5 rad


@pytest.mark.parametrize("theta", [1e-4, 0.05, 0.19, 0.21, 0.5, 1.5, 3.0])
@pytest.mark.parametrize("shape", [(64, 3, 3, 3), (600_000,), (8, 70_000)])
def test_float32_angles_both_paths_match_float64(theta: float, shape: tuple[int, ...]) -> None:
    """float32 tensors, rotated by θ and shrunk 30 %, over three checkpoints so the second pair can take the
    one-sweep ⟨a,b⟩ path (large angles) and small angles the explicit-difference path."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal(shape)
    arrays = [a.astype(np.float32)]
    for _ in range(2):
        prev = arrays[-1].astype(np.float64)
        u = rng.standard_normal(shape)
        u -= prev * (prev * u).sum() / (prev * prev).sum()
        u *= np.linalg.norm(prev) / np.linalg.norm(u)
        arrays.append((0.7 * (math.cos(theta) * prev + math.sin(theta) * u)).astype(np.float32))
    cks = [_ck(t, {"w": x}) for t, x in enumerate(arrays)]
    for kind in ("tensor", "channel"):
        m = measure(_Series(cks), [Unit("w", ("w",), kind, True, "user", "t")])  # type: ignore[arg-type]
        for t in (1, 2):
            got = m.angles[m.angles.step_to == t]["angle"].item()
            if kind == "tensor":
                ref = _ref_angle(arrays[t - 1], arrays[t])
            else:
                rows = arrays[t].shape[0] if arrays[t].ndim >= 2 or arrays[t].size <= 65536 else 1
                pa, pb = arrays[t - 1].reshape(rows, -1), arrays[t].reshape(rows, -1)
                ref = math.sqrt(np.mean([_ref_angle(pa[r], pb[r]) ** 2 for r in range(rows)]))
            assert got == pytest.approx(ref, abs=1e-5), (kind, t)


# ------------------------------------------------------------------ hyperparameter-derived columns
def test_intrinsic_and_effective_lr_and_intrinsic_time_with_a_schedule_change() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal(100).astype(np.float32)
    hps = [HParams(lr=0.1, weight_decay=5e-4, momentum=0.9, optimizer="sgd", source="t")] * 3 + \
          [HParams(lr=0.01, weight_decay=5e-4, momentum=0.9, optimizer="sgd", source="t")] * 3
    cks = [_ck(100 * i, {"w": w * (1 - 0.01 * i)}, hp) for i, hp in enumerate(hps)]
    n = measure(_Series(cks), [Unit("w", ("w",), "tensor", True, "user", "t")]).norms
    assert n["intrinsic_lr"].tolist() == pytest.approx([5e-4] * 3 + [5e-5] * 3)
    norms = [float(np.linalg.norm((w * (1 - 0.01 * i)).astype(np.float64))) for i in range(6)]
    assert n["effective_lr"].tolist() == pytest.approx([h.lr / x**2 for h, x in zip(hps, norms, strict=True)])
    # lr_timing "next": the lr stored at a checkpoint drives the following steps; the change resets τ at step 300.
    assert n["intrinsic_time"].tolist() == pytest.approx([0, 0.05, 0.10, 0, 0.005, 0.010])
    assert n["schedule_origin_step"].tolist() == [0, 0, 0, 300, 300, 300]
    assert n["relaxation_done"].iloc[2] == pytest.approx(1 - math.exp(-4 * 0.10))


def test_adamw_effective_lr_is_lr_over_norm() -> None:
    w = np.full(64, 0.5)
    hp = HParams(lr=1e-3, weight_decay=0.1, momentum=0.9, beta2=0.999, optimizer="adamw", source="t")
    n = measure(_Series([_ck(0, {"w": w}, hp)]), [Unit("w", ("w",), "tensor", True, "user", "t")]).norms
    assert n["effective_lr"].item() == pytest.approx(1e-3 / 4.0)
    assert n["effective_lr_form"].item() == "lr/norm"
    assert n["intrinsic_lr"].item() == pytest.approx(1e-4)
    assert n["wd_mode"].item() == "decoupled"


# ------------------------------------------------------------------ regimes
def test_regime_periodic_no_wd_approaching() -> None:
    steps = list(range(0, 1200, 100))
    saw = [1.0, 0.8, 0.6, 0.45, 1.2, 0.9, 0.7, 0.5, 1.3, 1.0, 0.8, 0.6]
    r = classify(steps, saw, [0.0] * 12, 5e-4, 0.5, [], True)
    assert r.regime == "periodic"
    assert "2 norm collapse" in r.detail
    assert classify(steps, [1 + 0.1 * i for i in range(12)], [0.0] * 12, 0.0, None, [], True).regime \
        == "no-weight-decay"
    taus = [0.01 * i for i in range(12)]
    r = classify(steps, [2 * math.exp(-0.5 * t) for t in taus], taus, 5e-4, 1 - math.exp(-0.44), [], True)
    assert r.regime == "approaching"
    assert "35.6%" in r.detail
    assert classify(steps, saw, taus, 5e-4, 0.99, [], False).regime == "undetermined"


# ------------------------------------------------------------------ one pass, bounded memory
class _CountingSource(DictSource):
    def __init__(self, arrays: dict[str, np.ndarray], counter: dict[str, int]) -> None:
        super().__init__(arrays)
        self.counter = counter

    def read(self, name: str) -> np.ndarray:
        self.counter[name] = self.counter.get(name, 0) + 1
        return super().read(name).copy()  # like a file reader: a fresh array per read


def test_each_tensor_read_once_and_memory_bounded() -> None:
    rng = np.random.default_rng(3)
    counters: list[dict[str, int]] = []
    cks = []
    for t in range(6):
        c: dict[str, int] = {}
        counters.append(c)
        arrays = {f"t{i}": rng.standard_normal(250_000).astype(np.float32) for i in range(4)}
        cks.append(Checkpoint(Path(f"c{t}"), "test", _CountingSource(arrays, c), step=t))
    units = [Unit(f"t{i}", (f"t{i}",), "tensor", True, "user", "t") for i in range(4)]
    tracemalloc.start()
    measure(_Series(cks), units)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert all(v == 1 for c in counters for v in c.values())  # every tensor of every checkpoint read once
    import os

    # In flight: one tensor per worker thread plus the one being read and the previous checkpoint's value, each
    # with a 1 MiB scratch block — a few copies of the largest tensor, not the 6 × 4 tensors of the series.
    largest = 250_000 * 4
    in_flight = min(4, os.cpu_count() or 1) + 2
    assert peak < in_flight * (largest + (1 << 20)) + (1 << 20), peak


# ------------------------------------------------------------------ exact identities on a real SI network
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8, eps=1e-12)  # ε ≪ batch variance: exact SI (§12.5.4)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8, eps=1e-12)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _train(opt_name: str, steps: int = 6) -> tuple[list[Checkpoint], list[dict[str, torch.Tensor]], nn.Module,
                                                    list[dict[str, Any]]]:
    torch.manual_seed(0)
    net = _Net().double()
    lr, wd = 0.1, 5e-4
    if opt_name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(net.parameters(), lr=lr, weight_decay=wd)
        hp = HParams(lr=lr, weight_decay=wd, momentum=0.0, optimizer="sgd", source="t")
    elif opt_name == "sgdm":
        opt = torch.optim.SGD(net.parameters(), lr=lr, weight_decay=wd, momentum=0.9)
        hp = HParams(lr=lr, weight_decay=wd, momentum=0.9, optimizer="sgd", source="t")
    else:
        lr, wd = 1e-2, 0.1
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
        hp = HParams(lr=lr, weight_decay=wd, momentum=0.9, beta2=0.999, optimizer="adamw", source="t")
    x, y = torch.randn(16, 3, 6, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    cks, grads, states = [], [], []
    for t in range(steps + 1):
        sd = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
        cks.append(Checkpoint(Path(f"s{t}"), "test", DictSource(sd), step=t, hparams={k: hp for k in sd}))
        if t == steps:
            break
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        grads.append({n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None})
        opt.step()
        states.append({n: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                       for n, p in net.named_parameters()})
    return cks, grads, net, states


@pytest.mark.parametrize("opt_name", ["sgd", "sgdm", "adamw"])
def test_exact_identities_on_trained_conv_bn_net(opt_name: str) -> None:
    cks, grads, net, states = _train(opt_name)
    units = [Unit("conv2", ("conv2.weight",), "tensor", True, "user", "t")]
    m = measure(_Series(cks), units)
    norms = m.norms["norm"].to_numpy()
    cos = m.angles["cosine"].to_numpy()
    hp = cks[0].hparams["conv2.weight"]
    lr, wd = float(hp.lr or 0), float(hp.weight_decay or 0)
    for t, g in enumerate(grads):
        w = torch.from_numpy(cks[t].read("conv2.weight"))
        gw = g["conv2.weight"]
        # gradient orthogonality (§2.1): BN makes the per-batch loss SI in conv2.weight
        assert abs(float((gw * w).sum()) / float(gw.norm() * w.norm())) < 1e-10
        if opt_name == "sgd":
            # norm recursion (3.1) and cos identity (3.2), exact for plain SGD + coupled WD
            expected = (1 - lr * wd) ** 2 * norms[t] ** 2 + lr**2 * float(gw.norm()) ** 2
            assert norms[t + 1] ** 2 == pytest.approx(expected, rel=1e-10)
            assert cos[t] == pytest.approx((1 - lr * wd) * norms[t] / norms[t + 1], abs=1e-12)
        elif opt_name == "sgdm":
            # w_{t+1} = w_t − η b_{t+1}, b_{t+1} = μ b_t + g_t + λ w_t; ⟨w_t, g_t⟩ = 0 ⇒ exact inner product
            b = states[t]["conv2.weight"]["momentum_buffer"]
            inner = norms[t] ** 2 - lr * float((w * b).sum())
            assert cos[t] == pytest.approx(inner / (norms[t] * norms[t + 1]), abs=1e-12)
            assert norms[t + 1] ** 2 == pytest.approx(norms[t] ** 2 - 2 * lr * float((w * b).sum())
                                                      + lr**2 * float(b.norm()) ** 2, rel=1e-10)
        else:
            st = states[t]["conv2.weight"]
            k = int(st["step"])
            u = (st["exp_avg"] / (1 - 0.9**k)) / ((st["exp_avg_sq"] / (1 - 0.999**k)).sqrt() + 1e-8)
            w_next = (1 - lr * wd) * w - lr * u  # decoupled WD, then the Adam step
            assert norms[t + 1] == pytest.approx(float(w_next.norm()), rel=1e-10)
            assert cos[t] == pytest.approx(float((w * w_next).sum()) / (norms[t] * float(w_next.norm())), abs=1e-12)
    # L(c·w) = L(w) for c ∈ {0.5, 2} (train-mode BN with ε ≈ 0: exact to rounding)
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        base = net(x)
        for c in (0.5, 2.0):
            net.conv2.weight.mul_(c)
            assert torch.allclose(net(x), base, rtol=0, atol=1e-10)
            net.conv2.weight.div_(c)


# ------------------------------------------------------------------ CLI contract on real files
NORMS_COLUMNS = ["step", "checkpoint", "unit", "members", "scale_invariant", "evidence", "numel", "norm", "lr",
                 "weight_decay", "momentum", "optimizer", "wd_mode", "intrinsic_lr", "effective_lr", "intrinsic_time"]
ANGLES_COLUMNS = ["step_from", "step_to", "steps", "unit", "cosine", "angle", "angle_per_step", "angle_per_sqrt_step",
                  "relative_update", "predicted_angle_per_step", "ratio"]
UNITS_COLUMNS = ["unit", "members", "kind", "scale_invariant", "evidence", "reason", "regime", "regime_detail"]


def test_cli_units_norms_angles_on_safetensors_series(tmp_path: Path) -> None:
    import json

    from safetensors.numpy import save_file
    from typer.testing import CliRunner

    from ilr_inspect.cli import app

    rng = np.random.default_rng(4)
    sd = {"conv1.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
          "bn1.weight": np.ones(8, np.float32), "bn1.bias": np.zeros(8, np.float32),
          "bn1.running_mean": np.zeros(8, np.float32), "bn1.running_var": np.ones(8, np.float32),
          "fc.weight": rng.standard_normal((4, 8)).astype(np.float32), "fc.bias": np.zeros(4, np.float32)}
    saved = []
    for t in range(3):
        arr = {k: (v * (1 - 0.05 * t) + (0.01 * t * rng.standard_normal(v.shape)).astype(np.float32)
                   if k.endswith("weight") else v) for k, v in sd.items()}
        saved.append(arr)
        save_file(arr, str(tmp_path / f"step_{100 * (t + 1):06d}.safetensors"))
    common = ["--lr", "0.1", "--wd", "5e-4", "--momentum", "0.9", "--optimizer", "sgd", "-f", "json", "-q"]
    runner = CliRunner()
    out = {}
    for cmd in ("units", "norms", "angles"):
        r = runner.invoke(app, [cmd, str(tmp_path), *common])
        assert r.exit_code == 0, r.output
        out[cmd] = json.loads(r.output)
    units = out["units"]["rows"]
    assert all(c in units[0] for c in UNITS_COLUMNS)
    conv = next(u for u in units if u["members"] == "conv1.weight")
    assert conv["scale_invariant"] and conv["evidence"] == "name-rule"
    assert not next(u for u in units if u["members"].startswith("fc.weight"))["scale_invariant"]
    norms = out["norms"]["rows"]
    assert list(norms[0])[: len(NORMS_COLUMNS)] == NORMS_COLUMNS
    for t in range(3):
        row = next(r for r in norms if r["unit"] == conv["unit"] and r["step"] == 100 * (t + 1))
        ref = float(np.linalg.norm(saved[t]["conv1.weight"].astype(np.float64)))
        assert row["norm"] == pytest.approx(ref, rel=1e-6)
        assert row["intrinsic_lr"] == pytest.approx(5e-4)
        assert row["effective_lr"] == pytest.approx(0.1 / ref**2, rel=1e-6)
    angles = out["angles"]["rows"]
    assert list(angles[0])[: len(ANGLES_COLUMNS)] == ANGLES_COLUMNS
    a = next(r for r in angles if r["unit"] == conv["unit"] and r["step_to"] == 300)
    assert a["angle"] == pytest.approx(_ref_angle(saved[1]["conv1.weight"], saved[2]["conv1.weight"]), abs=1e-5)
    assert a["steps"] == 100
    r = runner.invoke(app, ["norms", str(tmp_path), "--per-tensor", *common])
    assert r.exit_code == 0, r.output
    pt = json.loads(r.output)["rows"]
    assert {p["parameter"] for p in pt} == {"conv1.weight", "bn1.weight", "bn1.bias", "fc.weight", "fc.bias"}
    fc = next(p for p in pt if p["parameter"] == "fc.weight" and p["step"] == 300)
    assert fc["norm"] == pytest.approx(float(np.linalg.norm(saved[2]["fc.weight"].astype(np.float64))), rel=1e-6)


# ------------------------------------------------------------------ block forms of the one-pass sums
@pytest.mark.parametrize(("scale", "noise", "form"), [(0.999, 1e-3, "derived"), (1.0, 3e-7, "derived"),
                                                      (0.99, 0.01, "derived"), (0.7, 1e-4, "exact"),
                                                      (0.9, 1.0, "fast")])
@pytest.mark.parametrize("rows", [True, False])
def test_block_forms_match_float64(scale: float, noise: float, form: str, rows: bool,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 (64, 3, 3, 3)·(40, 4608) tensors as in training (decay + noise): each block takes the cheapest form
    whose error bound holds (small changes: from b − a alone; radial-dominated tiny angles: the exact form), and
    norms, angles and relative updates still match a float64 recomputation."""
    from ilr_inspect.measure import stream

    monkeypatch.setattr(stream, "CHUNK", 1 << 14)  # several blocks per tensor, pieces for the rows=False case
    monkeypatch.setattr(stream, "KERNEL", False)  # the NumPy block forms (the kernel's float64 sums need none)
    used: list[str] = []
    derived = stream._derived

    def spy(aa: np.ndarray, dd: np.ndarray, da: np.ndarray, *err: float) -> tuple[np.ndarray, np.ndarray, bool]:
        out = derived(aa, dd, da, *err)
        used.append("derived" if out[2] else "rejected")
        return out

    monkeypatch.setattr(stream, "_derived", spy)
    rng = np.random.default_rng(11)
    a = rng.standard_normal((40, 4608)).astype(np.float32)
    b = (scale * a.astype(np.float64) + noise * rng.standard_normal(a.shape)).astype(np.float32)
    st = stream.row_stats(b, a, rows=rows)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    pa, pb = (a64, b64) if rows else (a64.reshape(1, -1), b64.reshape(1, -1))
    np.testing.assert_allclose(st.sumsq, (pb**2).sum(axis=1), rtol=1e-6)
    assert st.prev_sumsq is not None and st.tang is not None
    np.testing.assert_allclose(st.prev_sumsq, (pa**2).sum(axis=1), rtol=1e-6)
    na, nb = np.sqrt(st.prev_sumsq), np.sqrt(st.sumsq)
    q = np.clip(st.tang / (na * nb), 0, 4)
    theta = 2 * np.arctan2(np.sqrt(q), np.sqrt(4 - q))
    ref = [_ref_angle(pa[r], pb[r]) for r in range(pa.shape[0])]
    np.testing.assert_allclose(theta, ref, rtol=0, atol=1e-5)
    if noise >= 1e-3:  # below, ‖a‖ − ‖b‖ is within the norms' own rounding: no relative update to speak of
        diff2 = st.tang + (na - nb) ** 2  # ‖a − b‖² per row, as measure() forms it
        np.testing.assert_allclose(np.sqrt(diff2), np.linalg.norm(pb - pa, axis=1), rtol=1e-5)
    if form == "derived":
        assert used and all(u == "derived" for u in used)
    elif form == "exact":
        assert "rejected" in used and "derived" not in used
    else:
        assert "derived" not in used


def test_safetensors_views_and_mixed_dtypes_match_float64(tmp_path: Path) -> None:
    """safetensors tensors come back as zero-copy views of a private map (writes never reach the file); float16
    is converted block by block and bfloat16 widened, and norms and angles still match float64."""
    from safetensors.torch import save_file

    from ilr_inspect.formats import OpenOptions, safetensors_file

    rng = np.random.default_rng(12)
    base = {"w32": rng.standard_normal((48, 300)), "w16": rng.standard_normal((32, 64)),
            "wbf": rng.standard_normal((16, 80))}
    dtypes = {"w32": torch.float32, "w16": torch.float16, "wbf": torch.bfloat16}
    saved: list[dict[str, np.ndarray]] = []
    cks = []
    for t in range(3):
        sd = {k: torch.from_numpy(v * (1 - 0.02 * t) + 0.01 * t * rng.standard_normal(v.shape)).to(dtypes[k])
              for k, v in base.items()}
        saved.append({k: v.float().numpy().astype(np.float64) for k, v in sd.items()})
        p = tmp_path / f"step_{t}.safetensors"
        save_file(sd, str(p))
        ck = safetensors_file.open(p, OpenOptions())
        cks.append(Checkpoint(p, "safetensors", ck.source, step=t))
    view = cks[0].read("w32")
    assert not view.flags.owndata and np.shares_memory(view, cks[0].read("w32"))
    before = (tmp_path / "step_0.safetensors").read_bytes()
    kept = view[0, 0].copy()
    view[0, 0] = kept + 1  # copy-on-write: the file is untouched
    assert (tmp_path / "step_0.safetensors").read_bytes() == before
    view[0, 0] = kept
    units = [Unit(k, (k,), "tensor", True, "user", "t") for k in base]
    m = measure(_Series(cks), units)
    for t in range(3):
        for k in base:
            got = m.norms[(m.norms.unit == k) & (m.norms.step == t)]["norm"].item()
            assert got == pytest.approx(float(np.linalg.norm(saved[t][k])), rel=1e-6)
    for t in (1, 2):
        for k in base:
            got = m.angles[(m.angles.unit == k) & (m.angles.step_to == t)]["angle"].item()
            assert got == pytest.approx(_ref_angle(saved[t - 1][k], saved[t][k]), abs=1e-5)


def test_long_safetensors_series_keeps_few_files_mapped(tmp_path: Path) -> None:
    """Each mapping holds a file descriptor; a tensor-major pass over 100 files must not keep all of them."""
    import os

    from safetensors.numpy import save_file

    from ilr_inspect.formats import OpenOptions, safetensors_file

    rng = np.random.default_rng(13)
    w = rng.standard_normal(50).astype(np.float32)
    cks = []
    for t in range(100):
        p = tmp_path / f"step_{t}.safetensors"
        save_file({"w": (w * (1 + 0.01 * t)).astype(np.float32), "v": w}, str(p))
        cks.append(Checkpoint(p, "safetensors", safetensors_file.open(p, OpenOptions()).source, step=t))
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    m = measure(_Series(cks), [Unit(k, (k,), "tensor", True, "user", "t") for k in ("w", "v")])
    assert m.norms[m.norms.unit == "w"]["norm"].tolist() == pytest.approx(
        [float(np.linalg.norm((w * (1 + 0.01 * t)).astype(np.float32).astype(np.float64))) for t in range(100)],
        rel=1e-6)
    assert safetensors_file._MAX_MAPS < 90  # fewer than the files, or the check below says nothing
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) - fds <= safetensors_file._MAX_MAPS + 4
    for ck in cks:
        ck.close()


# ------------------------------------------------------------------ compiled pass (extension, numba) on and off
@pytest.fixture(params=[False, "native", "numba"], ids=["numpy", "native", "numba"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Runs a test with the compiled pass off, and on as the extension built at install (``native``) and as numba's
    loops (``numba``); each skipped where it is not available."""
    from ilr_inspect.measure import stream

    monkeypatch.setattr(stream, "_kernel_mod", None)  # chosen again for this test
    if request.param == "native":
        pytest.importorskip("ilr_inspect.measure._native")
    elif request.param == "numba":
        pytest.importorskip("numba")
        monkeypatch.setenv("ILR_INSPECT_NATIVE", "0")
        monkeypatch.setattr(stream, "KERNEL_MIN_PAIRS", 0)  # series passes take it however small
    monkeypatch.setattr(stream, "KERNEL", bool(request.param))
    return bool(request.param)


def test_float64_recomputation_kernel_on_and_off(kernel: bool) -> None:
    test_norms_and_angles_match_float64_numpy()


@pytest.mark.parametrize("theta", [1e-4, 0.19, 0.21, 1.5])
@pytest.mark.parametrize("shape", [(64, 3, 3, 3), (600_000,), (8, 70_000)])
def test_float32_angles_kernel_on_and_off(theta: float, shape: tuple[int, ...], kernel: bool) -> None:
    test_float32_angles_both_paths_match_float64(theta, shape)


@pytest.mark.parametrize("theta", [3e-8, 1e-3, 2.5])
def test_float64_tiny_angles_kernel_on_and_off(theta: float, kernel: bool) -> None:
    test_tiny_and_large_angles_are_exact(theta)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [True, False])
def test_mixed_rows_kernel_on_and_off(dtype: type, rows: bool, kernel: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """One tensor whose rows need different forms: small changes, large angles, mostly radial tiny angles
    (where 1 − cos cancels), unchanged rows and all-zero rows. NumPy blocks are made small so long rows are
    split. Norms 1e-6 relative and angles 1e-5 rad against float64; with the kernel on, the compiled pass must
    have run and NumPy must have seen only rows whose bounds failed."""
    from ilr_inspect.measure import stream

    monkeypatch.setattr(stream, "CHUNK", 1 << 12)
    calls: list[int] = []
    if kernel:
        compiled = stream._pair_kernel()  # the extension built at install, else numba's loops
        if compiled is None:
            pytest.skip("no compiled pass here")
        pair_sums = compiled.pair_sums
        monkeypatch.setattr(compiled, "pair_sums", lambda b, a, *k: (calls.append(b.shape[0]), pair_sums(b, a, *k))[1])
    numpy_rows: list[int] = []
    numpy_pair = stream._numpy_pair
    monkeypatch.setattr(stream, "_numpy_pair", lambda b, a, w, buf: (numpy_rows.append(b.shape[0]),
                                                                       numpy_pair(b, a, w, buf))[1])
    rng = np.random.default_rng(5)
    a = rng.standard_normal((24, 5000))
    b = a.copy()
    b[0:6] = 0.999 * a[0:6] + 1e-3 * rng.standard_normal((6, 5000))  # small changes: derived form
    b[6:12] = 0.6 * a[6:12] + rng.standard_normal((6, 5000))  # large angles: fast form
    b[12:18] = 0.7 * a[12:18] + 1e-6 * rng.standard_normal((6, 5000))  # mostly radial, tiny angle: exact form
    a[20:22] = b[20:22] = 0.0  # dead rows: no angle; rows 18-19 and 22-23 unchanged
    a, b = a.astype(dtype), b.astype(dtype)
    st = stream.row_stats(b, a, rows=rows)
    pa, pb = (a.astype(np.float64), b.astype(np.float64))
    if not rows:
        pa, pb = pa.reshape(1, -1), pb.reshape(1, -1)
    np.testing.assert_allclose(st.sumsq, (pb**2).sum(axis=1), rtol=1e-6)
    assert st.prev_sumsq is not None and st.tang is not None
    np.testing.assert_allclose(st.prev_sumsq, (pa**2).sum(axis=1), rtol=1e-6)
    na, nb = np.sqrt(st.prev_sumsq), np.sqrt(st.sumsq)
    live = (na > 0) & (nb > 0)
    q = np.clip(st.tang[live] / (na * nb)[live], 0, 4)
    theta = 2 * np.arctan2(np.sqrt(q), np.sqrt(4 - q))
    ref = [_ref_angle(pa[r], pb[r]) for r in np.flatnonzero(live)]
    np.testing.assert_allclose(theta, ref, rtol=0, atol=1e-5)
    assert np.all(st.tang[~live] == 0)
    if kernel:
        assert calls == [pa.shape[0]]
        assert sum(numpy_rows) <= (6 if rows else 1)  # only the mostly radial rows (or the one row) went to NumPy
    else:
        assert not calls and sum(numpy_rows) == pa.shape[0]


def test_without_numba_the_numpy_path_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """numba not installed (its import fails): the kernel is skipped silently and results match float64."""
    import sys

    from ilr_inspect.measure import stream

    monkeypatch.setattr(stream, "_kernel_mod", None)
    monkeypatch.setenv("ILR_INSPECT_NATIVE", "0")  # nor the extension built at install
    monkeypatch.setitem(sys.modules, "numba", None)  # makes `import numba` raise ImportError
    monkeypatch.delitem(sys.modules, "ilr_inspect.measure._kernel", raising=False)
    monkeypatch.delattr(sys.modules["ilr_inspect.measure"], "_kernel", raising=False)
    assert stream._pair_kernel() is None
    rng = np.random.default_rng(2)
    a = rng.standard_normal((16, 300)).astype(np.float32)
    b = (0.9 * a + 1e-2 * rng.standard_normal(a.shape)).astype(np.float32)
    st = stream.row_stats(b, a)
    assert st.tang is not None
    na, nb = np.linalg.norm(a.astype(np.float64), axis=1), np.linalg.norm(b.astype(np.float64), axis=1)
    np.testing.assert_allclose(np.sqrt(st.sumsq), nb, rtol=1e-6)
    q = np.clip(st.tang / (na * nb), 0, 4)
    ref = [_ref_angle(a[r], b[r]) for r in range(16)]
    np.testing.assert_allclose(2 * np.arctan2(np.sqrt(q), np.sqrt(4 - q)), ref, rtol=0, atol=1e-5)


def test_small_series_do_not_load_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the built extension: below KERNEL_MIN_PAIRS a series pass never imports numba (its one-time load
    costs more than it saves);
    from it on (here: lowered to the series' size) the pass loads and uses the kernel."""
    pytest.importorskip("numba")
    from ilr_inspect.measure import _kernel, stream

    monkeypatch.setenv("ILR_INSPECT_NATIVE", "0")  # the thresholds are numba's (the extension has no load cost)
    calls: list[int] = []
    pair_sums = _kernel.pair_sums
    monkeypatch.setattr(_kernel, "pair_sums", lambda b, a, *k: (calls.append(b.shape[0]), pair_sums(b, a, *k))[1])
    monkeypatch.setattr(stream, "_kernel_mod", None)
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal((8, 50)).astype(np.float32) for _ in range(3)]
    cks = [_ck(t, {"w": x}) for t, x in enumerate(arrays)]
    units = [Unit("w", ("w",), "channel", True, "user", "t")]
    m0 = measure(_Series(cks), units)
    assert stream._kernel_mod is None and not calls
    monkeypatch.setattr(stream, "KERNEL_MIN_PAIRS", 2 * 8 * 50)
    m1 = measure(_Series(cks), units)
    assert stream._kernel_mod is _kernel and len(calls) == 2
    ref_angle = [math.sqrt(np.mean([_ref_angle(arrays[t - 1][r], arrays[t][r]) ** 2 for r in range(8)]))
                 for t in (1, 2)]  # RMS over channels
    np.testing.assert_allclose(m1.angles["angle"], ref_angle, rtol=0, atol=1e-5)
    np.testing.assert_allclose(m0.angles["angle"], ref_angle, rtol=0, atol=1e-5)
    ref = [np.sqrt(np.mean((x.astype(np.float64) ** 2).sum(axis=1))) for x in arrays]  # RMS of channel norms
    np.testing.assert_allclose(m1.norms["norm"], ref, rtol=1e-6)
    np.testing.assert_allclose(m0.norms["norm"], ref, rtol=1e-6)
