"""Units from the files alone (no --model) against the ε→0 functional truth computed with the model.

Truth: the functional tier (normalizers in train mode, ε ~ 0, dropout off) on the trained weights, with joint
hypotheses from torch.fx and from the prediction; every SI verdict is re-checked at the scales 0.1 and 10 so that
an insensitive output (near-uniform attention at tiny weights) is not mistaken for invariance. Keras and Flax
series get a torch twin (same layers, names and order; kernels transposed HWIO→OIHW): the twin computes the same
function because scale invariance depends only on the layer graph, and the normalizers' ε, which is where the
frameworks differ, is set to ~0 in the check. A unit counts as right only with exactly the same members (a joint
unit only as that joint unit).
"""

from __future__ import annotations

import importlib.util
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ilr_inspect.errors import ModelError
from ilr_inspect.invariance import detect_units
from ilr_inspect.invariance.functional import FunctionalProbe, functional_units
from ilr_inspect.invariance.graph import graph_units, trace_module
from ilr_inspect.invariance.rules import canonical_names, name_rule_units
from ilr_inspect.series import open_series

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"
TOL = 1e-4


def _load(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


matrix = _load(FIX / "make_units_matrix.py", "_units_matrix")
digits = _load(FIX / "digits" / "model.py", "_units_digits_model")


class TinyNet(nn.Module):
    """The layouts fixtures' net (fixtures/make_layouts_torch.py TinyNet): same layers, names and forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(nn.functional.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.mean((2, 3)))


def _digits_probe() -> torch.Tensor:
    with np.load(FIX / "digits" / "probe.npz") as z:
        return torch.from_numpy(z["x"][:64]).float()


def _nhwc_probe() -> torch.Tensor:
    return _digits_probe()


def _load_torch(model: nn.Module, ck: Any) -> dict[str, str]:
    from ilr_inspect.models import load_weights

    return {k: v for k, v in load_weights(model, ck).mapping.items()}


def _load_canonical(model: nn.Module, ck: Any) -> dict[str, str]:
    """Keras/Flax weights into the torch twin: canonical names, kernels HWIO→OIHW, dense (in, out)→(out, in)."""
    shapes = {n: t.shape for n, t in ck.tensors.items()}
    kinds = {n: t.kind for n, t in ck.tensors.items()}
    _, _, back = canonical_names(shapes, kinds)
    state = model.state_dict()
    mapping = {}
    with torch.no_grad():
        for canon, orig in back.items():
            if canon not in state:
                continue
            arr = np.array(ck.read(orig), dtype=np.float32)
            if orig.split("/")[-1] == "kernel":
                arr = arr.transpose(3, 2, 0, 1) if arr.ndim == 4 else arr.T
            state[canon].copy_(torch.from_numpy(np.ascontiguousarray(arr)).reshape(state[canon].shape))
            mapping[canon] = orig
    return mapping


def _hf_model(ck: Any) -> tuple[nn.Module, torch.Tensor, dict[str, str]]:
    from ilr_inspect.invariance import config_graph as cg

    folder = Path(ck.path)
    model, config = cg._hf_build(folder, "cpu")
    mapping = {f"model.{k}": v for k, v in _load_torch(model, ck).items()}
    probe = cg._hf_probe(model, config, "cpu")
    assert probe is not None
    return cg._KwargModel(model, "input_ids"), probe["input_ids"], mapping


# label, path, (model factory, weight loader) or "hf", probe, open kwargs
CASES: list[tuple[str, Path, Any, Callable[[], torch.Tensor] | None, dict[str, Any]]] = [
    ("PyTorch loop (.pt)", FIX / "digits" / "ckpts", (digits.build, _load_torch), _digits_probe, {}),
    ("Lightning (.ckpt)", FIX / "lightning", (digits.build, _load_torch), _digits_probe, {}),
    ("HF Trainer (BERT)", FIX / "hf_trainer", "hf", None, {}),
    ("HF Accelerate", FIX / "layouts" / "accelerate", (TinyNet, _load_torch), _digits_probe, {}),
    ("timm layout", FIX / "layouts" / "timm", (TinyNet, _load_torch), _digits_probe, {"trust_pickle": True}),
    ("safetensors", FIX / "torch_other" / "safetensors", (digits.build, _load_torch), _digits_probe, {}),
    ("Keras weights-only .h5", FIX / "keras" / "final.weights.h5", (digits.build, _load_canonical),
     _nhwc_probe, {}),
    ("Keras full .keras", FIX / "keras" / "ckpts", (digits.build, _load_canonical), _nhwc_probe, {}),
    ("Flax msgpack", FIX / "flax" / "ckpts", (digits.build, _load_canonical), _nhwc_probe, {}),
    ("Orbax", FIX / "orbax" / "ckpts", (digits.build, _load_canonical), _nhwc_probe, {}),
    ("pre-LN residual MLP (safetensors)", FIX / "units_matrix" / "preln_mlp", (matrix.PreLNMLP, _load_torch),
     matrix.probe, {}),
    ("Linear→LayerNorm head (safetensors)", FIX / "units_matrix" / "ln_head", (matrix.LNHeadMLP, _load_torch),
     matrix.probe, {}),
]


def _open(path: Path, kw: dict[str, Any]) -> Any:
    from ilr_inspect.formats import OpenOptions

    opts = OpenOptions(trust_pickle=bool(kw.get("trust_pickle")))
    return open_series(path, opts, read_logs=False)


def _truth(model: nn.Module, probe: torch.Tensor, mapping: dict[str, str], extra_joint: list[tuple[str, ...]]
           ) -> set[frozenset[str]]:
    back = {v: k for k, v in mapping.items()}
    hyps = [u for u in _graph_joint(model)]
    from ilr_inspect.invariance.unit import Unit

    for j in extra_joint:
        if all(m in back for m in j):
            hyps.append(Unit("h", tuple(back[m] for m in j), "joint", True, "name-rule", "prediction"))
    found = functional_units(model, probe, hypotheses=hyps)
    fp = FunctionalProbe(model, probe)
    out: set[frozenset[str]] = set()
    for u in found:
        if not u.scale_invariant:
            continue
        if max(fp.scaled(list(u.members), c) for c in (0.1, 10.0)) >= TOL:
            continue
        if all(m in mapping for m in u.members):
            out.add(frozenset(mapping[m] for m in u.members))
    return out


def _graph_joint(model: nn.Module) -> list[Any]:
    try:
        return [u for u in graph_units(trace_module(model)) if u.scale_invariant and len(u.members) > 1]
    except ModelError:
        return []


def _row(label: str, path: Path, spec: Any, probe_fn: Any, kw: dict[str, Any]) -> dict[str, Any]:
    series = _open(path, kw)
    with series:
        ck = series.checkpoints[-1]
        t0 = time.perf_counter()
        pred_units = detect_units(ck)
        dt = time.perf_counter() - t0
        pred = {frozenset(u.members) for u in pred_units if u.scale_invariant}
        joints = [u.members for u in pred_units if len(u.members) > 1]
        if spec == "hf":
            model, probe, mapping = _hf_model(ck)
            joints += [u.members for u in name_rule_units({n: t.shape for n, t in ck.tensors.items()})
                       if len(u.members) > 1]
        else:
            factory, loader = spec
            model = factory()
            mapping = loader(model, ck)
            probe = probe_fn()
        truth = _truth(model, probe, mapping, joints)
        tiers = sorted({f"{u.evidence}" + (f" ({Path(u.source).name})" if u.source else "") for u in pred_units
                        if u.scale_invariant} or {"-"})
    tp = len(pred & truth)
    return {"label": label, "tp": tp, "pred": len(pred), "truth": len(truth), "fp": sorted(map(sorted, pred - truth)),
            "fn": sorted(map(sorted, truth - pred)), "tiers": ", ".join(tiers), "seconds": dt}


@pytest.mark.slow
def test_units_matrix_precision_recall(capsys: pytest.CaptureFixture[str]) -> None:
    rows = []
    for label, path, spec, probe_fn, kw in CASES:
        if not path.exists():
            pytest.fail(f"fixture {path} missing (run the fixtures/ generators)")
        rows.append(_row(label, path, spec, probe_fn, kw))
    tp = sum(r["tp"] for r in rows)
    npred = sum(r["pred"] for r in rows)
    ntruth = sum(r["truth"] for r in rows)
    precision, recall = tp / max(npred, 1), tp / max(ntruth, 1)
    lines = [f"{'series':38s} {'TP':>3s} {'pred':>4s} {'true':>4s} {'prec':>5s} {'rec':>5s}  evidence of SI units"]
    for r in rows:
        p = r["tp"] / r["pred"] if r["pred"] else 1.0
        rc = r["tp"] / r["truth"] if r["truth"] else 1.0
        lines.append(f"{r['label']:38s} {r['tp']:3d} {r['pred']:4d} {r['truth']:4d} {p:5.2f} {rc:5.2f}  {r['tiers']}")
        for kind in ("fp", "fn"):
            for m in r[kind]:
                lines.append(f"    {kind}: {'+'.join(m)}")
    lines.append(f"{'ALL':38s} {tp:3d} {npred:4d} {ntruth:4d} {precision:5.2f} {recall:5.2f}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert precision >= 0.98 and recall >= 0.9, "\n".join(lines)


def test_undetermined_not_invariant_and_rotational_is_opt_in() -> None:
    shapes = {k: tuple(v.shape) for k, v in matrix.PreLNMLP().state_dict().items()}
    default = {u.members[0]: u for u in name_rule_units(shapes)}
    fc1 = default["blocks.0.fc1.weight"]
    assert not fc1.scale_invariant and fc1.role == "undetermined" and "--model" in fc1.reason
    opted = {u.members[0]: u for u in name_rule_units(shapes, rotational_default=True)}
    assert opted["blocks.0.fc1.weight"].scale_invariant and "OPT-IN" in opted["blocks.0.fc1.weight"].reason


def test_keras_config_graph_names_file_and_matches_twin() -> None:
    series = _open(FIX / "keras" / "ckpts", {})
    with series:
        units = detect_units(series.checkpoints[0])
    si = {frozenset(u.members): u for u in units if u.scale_invariant}
    assert frozenset({"bn1/gamma", "bn1/beta"}) in si and frozenset({"conv3/kernel"}) in si
    assert all(u.evidence == "config-graph" and u.source and u.source.endswith(".keras:config.json")
               for u in si.values())
    assert not any("fc/" in m for u in si.values() for m in u.members)


@pytest.mark.slow
def test_hundred_layer_hf_folder_units_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 100-layer BERT folder (config.json + model.safetensors from the config, no download) through the CLI."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=100, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, type_vocab_size=1)
    cfg.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    folder = tmp_path / "checkpoint-100"
    folder.mkdir()
    cfg.to_json_file(str(folder / "config.json"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    out = tmp_path / "units.json"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ilr_inspect", "units", str(folder), "--format", "json", "-o",
                           str(out), "-q"], capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    rows = rows.get("rows", rows.get("data", rows)) if isinstance(rows, dict) else rows
    si = [r for r in rows if r["scale_invariant"]]
    assert len(si) == 1 and si[0]["evidence"] == "config-graph" and "embeddings" in si[0]["unit"]
    with capsys.disabled():
        print(f"\nunits on a 100-layer HF folder (config.json + safetensors), whole process: {wall:.2f} s wall, "
              f"{cpu:.2f} s CPU (wall exceeds CPU only when other processes share the cores)")
    assert cpu < 5.0  # CPU time: the wall clock on a shared machine measures the other processes too


@pytest.mark.slow
def test_bert_config_template_matches_transformers_graph() -> None:
    """The torch-free BERT graph read from config.json gives the same units as recording transformers' forward."""
    from ilr_inspect.invariance import config_graph as cg

    for folder, act in ((FIX / "hf_trainer" / "checkpoint-10", None), (FIX / "hf_trainer" / "checkpoint-10", "relu")):
        series = _open(folder, {})
        with series:
            params = [n for n, t in series.checkpoints[0].tensors.items() if t.kind == "parameter"]
        raw = json.loads((folder / "config.json").read_text())
        config = cg._hf_config(folder)
        if act is not None:  # a ReLU MLP is positively homogeneous: the template must follow the config
            raw["hidden_act"] = config.hidden_act = act
        model = cg._hf_build_from(config, "meta")
        template = cg.bert_template(raw, params)
        assert template is not None
        recorded = cg.record_graph(model, cg._hf_probe(model, config, "meta") or {})

        def key(units: list[Any]) -> set[tuple[Any, ...]]:
            return {(u.members, u.scale_invariant, u.role) for u in units}

        assert key(graph_units(template)) == key(graph_units(recorded))


def test_onnx_beside_series_is_used_but_pt2_is_not(tmp_path: Path) -> None:
    """ONNX is data: used automatically. A .pt2 is a program: never loaded because it lies beside the series."""
    import shutil

    ref = FIX / "reference"
    shutil.copy(ref / "reference.safetensors", tmp_path / "step_000001.safetensors")
    shutil.copy(ref / "model.pt2", tmp_path / "model.pt2")
    series = _open(tmp_path / "step_000001.safetensors", {})
    with series:
        without_onnx = detect_units(series.checkpoints[0])
    assert {u.evidence for u in without_onnx} == {"name-rule"}  # the .pt2 beside it was not used
    shutil.copy(ref / "model.onnx", tmp_path / "model.onnx")
    series = _open(tmp_path / "step_000001.safetensors", {})
    with series:
        with_onnx = detect_units(series.checkpoints[0])
    si = {frozenset(u.members) for u in with_onnx if u.scale_invariant}
    assert si == {frozenset({"conv1.weight"}), frozenset({"conv2.weight"}), frozenset({"conv3.weight"}),
                  frozenset({"bn1.weight", "bn1.bias"}), frozenset({"bn2.weight", "bn2.bias"})}
    assert all(u.evidence == "config-graph" and u.source == str(tmp_path / "model.onnx") for u in with_onnx)
