"""Function-space distances on a real short training run, checked against an independent float64 NumPy
recomputation from logits computed here with plain PyTorch (load_state_dict + forward)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ilr_inspect.errors import ModelError, ProbeError
from ilr_inspect.function_space import distance
from ilr_inspect.models import build_model
from ilr_inspect.probe import load_probe
from ilr_inspect.series import open_series

MODEL_PY = """
import torch.nn as nn

def build():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

def grid():
    # Same weights, non-classification output: (N, 2, 5) instead of 2-D class logits.
    net = build()
    net.append(nn.Unflatten(1, (2, 5)))
    return net

def features():
    # Non-classification head: per-input feature maps (N, 16, 8, 8).
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))

def broken():
    raise RuntimeError("cannot build: hidden size 17 is not divisible by 4 heads")
"""
STEPS = (0, 10, 20, 40, 60, 80)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images[:, None] / 16.0, dtype=torch.float32), torch.tensor(d.target)


def _train(folder: Path, model_file: Path, *, seed: int, lr: float, steps: tuple[int, ...]) -> None:
    """A real short SGD run (momentum, weight decay) of a BN CNN; state dicts saved with torch.save."""
    x, y = _digits()
    torch.manual_seed(seed)
    net = build_model(f"{model_file}:build")
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for step in range(max(steps) + 1):
        if step in steps:
            torch.save(net.state_dict(), folder / f"step_{step:04d}.pt")
        idx = torch.randint(0, 1400, (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    (root / "model.py").write_text(MODEL_PY)
    _train(root / "ckpts", root / "model.py", seed=0, lr=0.1, steps=STEPS)
    x, y = _digits()
    np.savez(root / "probe.npz", x=x[1400:].numpy(), y=y[1400:].numpy())
    return root


# ------------------------------------------------------------------------------------------- the reference


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def _reference_logits(run: Path, step: int, *, recalibrate_batch: int | None = None) -> np.ndarray:
    """Logits from a freshly built model with load_state_dict: eval mode, or BN recalibrated by torch's own
    ``swa_utils.update_bn`` (cumulative average over the same probe batches)."""
    ns: dict[str, object] = {}
    exec(compile(MODEL_PY, "model", "exec"), ns)
    net = ns["build"]()  # type: ignore[operator]
    net.load_state_dict(torch.load(run / "ckpts" / f"step_{step:04d}.pt", weights_only=True))
    x = torch.from_numpy(np.load(run / "probe.npz")["x"])
    if recalibrate_batch is not None:
        torch.optim.swa_utils.update_bn([x[i:i + recalibrate_batch] for i in range(0, len(x), recalibrate_batch)], net)
    net.eval()
    with torch.no_grad():
        return net(x).double().numpy()  # type: ignore[no-any-return]


def _reference_metrics(za: np.ndarray, zb: np.ndarray, y: np.ndarray) -> dict[str, float]:
    la, lb = _log_softmax(za), _log_softmax(zb)
    pa, pb = np.exp(la), np.exp(lb)
    return {
        "disagreement": float(np.mean(za.argmax(1) != zb.argmax(1))),
        "tv": float(np.mean(0.5 * np.abs(pa - pb).sum(1))),
        "kl_ab": float(np.mean((pa * (la - lb)).sum(1))),
        "kl_ba": float(np.mean((pb * (lb - la)).sum(1))),
        "accuracy_a": float(np.mean(za.argmax(1) == y)),
        "accuracy_b": float(np.mean(zb.argmax(1) == y)),
    }


def _check_against_reference(result_rows: list[dict[str, float]], logits: dict[int, np.ndarray], y: np.ndarray) -> None:
    for row in result_rows:
        ref = _reference_metrics(logits[int(row["step_a"])], logits[int(row["step_b"])], y)
        assert row["disagreement"] == ref["disagreement"]
        assert row["accuracy_a"] == ref["accuracy_a"]
        assert row["accuracy_b"] == ref["accuracy_b"]
        for k in ("tv", "kl_ab", "kl_ba"):
            assert row[k] == pytest.approx(ref[k], abs=1e-6), k


# --------------------------------------------------------------------------------------------------- tests


def test_all_pairs_eval_mode_matches_numpy(run: Path) -> None:
    with open_series([run / "ckpts"]) as series:
        res = distance(series, f"{run}/model.py:build", run / "probe.npz", pairs="all", bn_mode="eval",
                       batch_size=64)
    assert list(res.rows.columns[:8]) == ["step_a", "step_b", "disagreement", "tv", "kl_ab", "kl_ba",
                                          "accuracy_a", "accuracy_b"]
    n = len(STEPS)
    assert len(res.rows) == n * (n - 1) // 2
    assert all(a < b for a, b in zip(res.rows.step_a, res.rows.step_b, strict=True))
    y = np.load(run / "probe.npz")["y"]
    logits = {s: _reference_logits(run, s) for s in STEPS}
    _check_against_reference(res.rows.to_dict(orient="records"), logits, y)
    # The run really moved the function: not every metric is zero, and training improved accuracy.
    assert res.rows.tv.max() > 0.1
    assert res.rows.accuracy_b.iloc[-1] > 0.5
    assert res.meta["bn_mode"] == "eval"
    assert res.meta["probe_passes"] == n


def test_recalibrated_matches_torch_update_bn(run: Path) -> None:
    with open_series([run / "ckpts"]) as series:
        res = distance(series, f"{run}/model.py:build", run / "probe.npz", pairs="consecutive", batch_size=100,
                       bn_mode="recalibrate")
    assert res.meta["bn_mode"] == "recalibrate"
    assert list(zip(res.rows.step_a, res.rows.step_b, strict=True)) == list(itertools.pairwise(STEPS))
    y = np.load(run / "probe.npz")["y"]
    logits = {s: _reference_logits(run, s, recalibrate_batch=100) for s in STEPS}
    _check_against_reference(res.rows.to_dict(orient="records"), logits, y)
    # Recalibration changes the answer relative to saved running stats (else this test could not tell them apart).
    eval_logits = _reference_logits(run, STEPS[2])
    assert np.abs(eval_logits - logits[STEPS[2]]).max() > 1e-3


def test_default_compares_networks_as_evaluated(run: Path) -> None:
    """Without --bn-mode the saved running statistics (eval mode) are used: accuracies match the user's own."""
    with open_series([run / "ckpts"]) as series:
        res = distance(series, f"{run}/model.py:build", run / "probe.npz", pairs="consecutive", batch_size=100)
    assert res.meta["bn_mode"] == "eval"
    y = np.load(run / "probe.npz")["y"]
    _check_against_reference(res.rows.to_dict(orient="records"), {s: _reference_logits(run, s) for s in STEPS}, y)


def test_all_pairs_costs_n_forward_passes(run: Path) -> None:
    module = build_model(f"{run}/model.py:build")
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    probe = load_probe(run / "probe.npz")
    with open_series([run / "ckpts"]) as series:
        res = distance(series, module, probe, pairs="all", bn_mode="eval", batch_size=len(probe))
        n = len(series)
        assert len(calls) == n
        assert len(res.rows) == n * (n - 1) // 2
        calls.clear()
        distance(series, module, probe, pairs="all", bn_mode="recalibrate", batch_size=len(probe))
        assert len(calls) == 2 * n  # one statistics pass + one evaluation pass per checkpoint
        calls.clear()
        distance(series, module, probe, pairs="all", bn_mode="eval", batch_size=100)
        assert len(calls) == n * -(-len(probe) // 100)


def test_reference_pairs(run: Path) -> None:
    with open_series([run / "ckpts"]) as series:
        last = distance(series, f"{run}/model.py:build", run / "probe.npz", pairs="reference", bn_mode="eval")
        mid = distance(series, f"{run}/model.py:build", run / "probe.npz", pairs="reference", reference=20,
                       bn_mode="eval")
    assert list(last.rows.step_a) == list(STEPS[:-1])
    assert set(last.rows.step_b) == {STEPS[-1]}
    assert list(mid.rows.step_a) == [s for s in STEPS if s != 20]
    assert set(mid.rows.step_b) == {20}
    y = np.load(run / "probe.npz")["y"]
    logits = {s: _reference_logits(run, s) for s in STEPS}
    _check_against_reference(mid.rows.to_dict(orient="records"), logits, y)


def test_non_classification_outputs_use_l2_and_cosine(run: Path) -> None:
    with open_series([run / "ckpts"]) as series:
        res = distance(series, f"{run}/model.py:grid", run / "probe.npz", pairs="consecutive", bn_mode="eval")
    assert res.meta["output_kind"] == "non-classification"
    assert res.meta["metrics_apply"] == ["l2", "cosine"]
    assert "(N, 2, 5)" in res.meta["output_note"]
    assert res.rows[["disagreement", "tv", "kl_ab", "kl_ba", "accuracy_a"]].isna().all().all()
    logits = {s: _reference_logits(run, s) for s in STEPS}
    for row in res.rows.to_dict(orient="records"):
        a, b = logits[row["step_a"]], logits[row["step_b"]]
        l2 = np.mean(np.linalg.norm(a - b, axis=1))
        cos = np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
        assert row["l2"] == pytest.approx(l2, rel=1e-6)
        assert row["cosine"] == pytest.approx(cos, abs=1e-6)


def test_model_without_the_checkpoint_head_is_refused(run: Path) -> None:
    # The checkpoint carries a classifier head the model lacks: the error names those keys.
    with open_series([run / "ckpts"]) as series, pytest.raises(ModelError) as err:
        distance(series, f"{run}/model.py:features", run / "probe.npz", bn_mode="eval")
    assert "8.weight" in str(err.value) and "8.bias" in str(err.value)


def test_probe_of_wrong_shape_names_expected_shape(run: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", x=np.zeros((5, 3, 8, 8), np.float32))
    with open_series([run / "ckpts"]) as series, pytest.raises(ProbeError) as err:
        distance(series, f"{run}/model.py:build", tmp_path / "bad.npz", bn_mode="eval")
    msg = str(err.value)
    assert "(5, 3, 8, 8)" in msg and "(N, 1, H, W)" in msg and "in_channels=1" in msg


def test_replicated_runs_l1_and_noise_floor(run: Path, tmp_path: Path) -> None:
    steps = (10, 20)
    for cond, lr in (("slow", 0.02), ("fast", 0.2)):
        for seed in range(4):
            _train(tmp_path / "runs" / cond / f"seed{seed}", run / "model.py", seed=seed, lr=lr, steps=steps)
    with open_series([tmp_path / "runs"]) as series:
        assert len(series) == 16
        res = distance(series, f"{run}/model.py:build", run / "probe.npz", bn_mode="eval", replicas="folder")
    assert list(res.rows.step_a) == list(steps)
    assert set(res.rows.group_a) == {"fast"} and set(res.rows.group_b) == {"slow"}
    x = torch.from_numpy(np.load(run / "probe.npz")["x"])
    ns: dict[str, object] = {}
    exec(compile(MODEL_PY, "model", "exec"), ns)

    def dist(cond: str, step: int, seeds: range) -> np.ndarray:
        preds = []
        for seed in seeds:
            net = ns["build"]()  # type: ignore[operator]
            net.load_state_dict(torch.load(tmp_path / "runs" / cond / f"seed{seed}" / f"step_{step:04d}.pt",
                                           weights_only=True))
            net.eval()
            with torch.no_grad():
                preds.append(net(x).argmax(1).numpy())
        return np.stack([(np.stack(preds) == c).mean(0) for c in range(10)], axis=1)

    for row in res.rows.to_dict(orient="records"):
        s = row["step_a"]
        full = np.abs(dist("fast", s, range(4)) - dist("slow", s, range(4))).sum(1).mean()
        assert row["l1"] == pytest.approx(full, abs=1e-12)
        assert row["tv"] == pytest.approx(full / 2, abs=1e-12)
        f1, f2, s1, s2 = (dist("fast", s, range(2)), dist("fast", s, range(2, 4)), dist("slow", s, range(2)),
                          dist("slow", s, range(2, 4)))
        l1 = lambda p, q: np.abs(p - q).sum(1).mean()  # noqa: E731
        assert row["noise_floor"] == pytest.approx((l1(f1, f2) + l1(s1, s2)) / 2, abs=1e-12)
        assert row["l1_half"] == pytest.approx((l1(f1, s2) + l1(f2, s1)) / 2, abs=1e-12)
        assert row["replicas_a"] == row["replicas_b"] == 4
        assert row["l1"] > 0.1  # the two learning rates give different functions at these steps


# ------------------------------------------------------------------------------------------------------ CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ilr_inspect", *args], capture_output=True, text=True, timeout=120)


def test_cli_distance_json_with_discovery(run: Path, tmp_path: Path) -> None:
    # model.py and probe.npz sit one folder above the checkpoints: the probe is discovered, but model code is
    # only run when named, so the first call refuses with the exact --model to pass.
    refused = _cli("distance", str(run / "ckpts"), "-q")
    assert refused.returncode == 4
    assert f"--model {run / 'model.py'}:build" in refused.stderr and "Traceback" not in refused.stderr
    out = tmp_path / "d.json"
    proc = _cli("distance", str(run / "ckpts"), "--model", f"{run / 'model.py'}:build", "--pairs", "all",
                "--bn-mode", "eval", "-f", "json", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "probe.npz" in proc.stderr
    doc = json.loads(out.read_text())
    assert doc["schema"] == "ilr-inspect/distance/v1"
    assert doc["meta"]["bn_mode"] == "eval"
    n = len(STEPS)
    assert len(doc["rows"]) == n * (n - 1) // 2
    y = np.load(run / "probe.npz")["y"]
    logits = {s: _reference_logits(run, s) for s in STEPS}
    _check_against_reference(doc["rows"], logits, y)


def test_cli_factory_that_raises_gives_its_message(run: Path) -> None:
    proc = _cli("distance", str(run / "ckpts"), "--model", f"{run}/model.py:broken", "--probe", str(run / "probe.npz"))
    assert proc.returncode == 4
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:")
    assert "hidden size 17 is not divisible by 4 heads" in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_wrong_probe_shape_exit_4(run: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "probe.npz", inputs=np.zeros((4, 64), np.float32))
    proc = _cli("distance", str(run / "ckpts"), "--model", f"{run}/model.py:build", "--probe",
                str(tmp_path / "probe.npz"), "-q")
    assert proc.returncode == 4
    assert "(N, 1, H, W)" in proc.stderr and "(4, 64)" in proc.stderr and "Traceback" not in proc.stderr


def test_export_and_torchscript_models_give_the_same_distances(run: Path, tmp_path: Path) -> None:
    import warnings

    net = build_model(f"{run}/model.py:build")
    example = torch.zeros(7, 1, 8, 8)  # static batch of 7: the probe (397) is padded to a multiple of it
    torch.export.save(torch.export.export(net, (example,)), tmp_path / "model.pt2")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.save(torch.jit.trace(net, (example,)), str(tmp_path / "model.ts"))  # type: ignore[no-untyped-call]
    with open_series([run / "ckpts"]) as series:
        eager = distance(series, f"{run}/model.py:build", run / "probe.npz", pairs="all", bn_mode="eval")
        exported = distance(series, str(tmp_path / "model.pt2"), run / "probe.npz", pairs="all")
        scripted = distance(series, str(tmp_path / "model.ts"), run / "probe.npz", pairs="all")
    assert exported.meta["bn_mode"] == "as-exported" and exported.meta["settings"]["batch_size"] == 7
    assert scripted.meta["bn_mode"] == "eval" and scripted.meta["model_kind"] == "torchscript"
    for other in (exported, scripted):
        assert (other.rows.disagreement == eager.rows.disagreement).all()
        for k in ("tv", "kl_ab", "kl_ba", "accuracy_a"):
            np.testing.assert_allclose(other.rows[k], eager.rows[k], atol=1e-6)
    with open_series([run / "ckpts"]) as series, pytest.raises(ModelError, match="recalibrate"):
        distance(series, str(tmp_path / "model.ts"), run / "probe.npz", bn_mode="recalibrate")
