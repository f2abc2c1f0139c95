"""Detection against functional truth computed here directly (scale a set of parameters, compare outputs), on a
torchvision-style ResNet, VGG-BN and a pre-activation ResNet, through every tier."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ilr_inspect.checkpoint import Checkpoint, DictSource
from ilr_inspect.invariance import detect_units
from ilr_inspect.invariance.functional import functional_units
from ilr_inspect.invariance.graph import from_export, graph_units, trace_module
from ilr_inspect.invariance.rules import name_rule_units
from ilr_inspect.invariance.unit import Unit
from ilr_inspect.invariance.userfile import load_units_file


class Basic(nn.Module):
    def __init__(self, i: int, o: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(i, o, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(o)
        self.conv2 = nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(o)
        self.downsample: nn.Module | None = None
        if stride != 1 or i != o:
            self.downsample = nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + idt)


class ResNet(nn.Module):
    """torchvision naming: conv1/bn1, layerN.M.convK/bnK, downsample.0/1, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Basic(8, 8), Basic(8, 8))
        self.layer2 = nn.Sequential(Basic(8, 16, 2), Basic(16, 16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class PreAct(nn.Module):
    def __init__(self, i: int, o: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(i)
        self.conv1 = nn.Conv2d(i, o, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(o)
        self.conv2 = nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or i != o:
            self.shortcut = nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if len(self.shortcut) > 0 else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + sc


class PreActResNet(nn.Module):
    """kuangliu naming: conv1, layerN.M.bn1/conv1/bn2/conv2/shortcut.0, bn, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.layer1 = nn.Sequential(PreAct(8, 8), PreAct(8, 8))
        self.layer2 = nn.Sequential(PreAct(8, 16, 2), PreAct(16, 16))
        self.bn = nn.BatchNorm2d(16)
        self.linear = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def vgg_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))


def _trained_like(factory: type[nn.Module] | object) -> nn.Module:
    """Non-trivial normalizer affine parameters (at init β = 0, which makes any scaling test of β vacuous)."""
    model: nn.Module = factory()  # type: ignore[operator]
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.BatchNorm2d, nn.GroupNorm)):
                mod.weight.copy_(0.5 + torch.rand(mod.weight.shape, generator=gen))
                mod.bias.copy_(0.3 * torch.randn(mod.bias.shape, generator=gen))
    return model


MODELS = {"resnet": ResNet, "preact": PreActResNet, "vgg_bn": vgg_bn}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is ~50× faster than two on a loaded 2-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _truth_dev(model: nn.Module, x: torch.Tensor, members: tuple[str, ...]) -> float:
    """Reference check written independently of the library: deep copy, train-mode BN with ε≈0 and frozen
    running statistics, scale the members in place by 0.5 and 2, compare outputs."""
    import copy

    m = copy.deepcopy(model).double().train()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.eps, mod.momentum = 1e-12, 0.0
    xd = x.double()
    with torch.no_grad():
        base = m(xd)
        params = dict(m.named_parameters())
        dev = 0.0
        for c in (0.5, 2.0):
            for n in members:
                params[n].mul_(c)
            dev = max(dev, float((m(xd) - base).abs().max() / base.abs().max()))
            for n in members:
                params[n].div_(c)
    return dev


def _si_sets(units: list[Unit]) -> set[frozenset[str]]:
    return {frozenset(u.members) for u in units if u.scale_invariant}


def _weights_only(sets: set[frozenset[str]], shapes: dict[str, tuple[int, ...]]) -> set[frozenset[str]]:
    """The conv/linear part of each SI set (matrices and kernels: what name rules decide)."""
    out = set()
    for s in sets:
        w = frozenset(m for m in s if len(shapes[m]) >= 2)
        if w:
            out.add(w)
    return out


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(16, 3, 8, 8)


@pytest.mark.parametrize("name", list(MODELS))
def test_graph_and_functional_agree_with_direct_truth(name: str, probe: torch.Tensor) -> None:
    torch.manual_seed(1)
    model = _trained_like(MODELS[name])
    g_units = graph_units(trace_module(model), granularity="channel")
    hyps = [u for u in g_units if u.kind == "joint"]
    f_units = functional_units(model, probe, granularity="channel", hypotheses=hyps)
    params = [n for n, _ in model.named_parameters()]
    for units in (g_units, f_units):
        assert sorted(m for u in units for m in u.members) == sorted(params)  # every tensor decided once
        for u in units:
            dev = _truth_dev(model, probe, u.members)
            if u.role == "no-effect":
                continue
            if u.scale_invariant:
                assert dev < 1e-9, (u, dev)
            else:
                assert dev > 1e-3, (u, dev)
    assert _si_sets(g_units) == _si_sets(f_units)


def test_preact_residual_writers_are_one_joint_unit(probe: torch.Tensor) -> None:
    model = _trained_like(PreActResNet)
    writers1 = {"conv1.weight", "layer1.0.conv2.weight", "layer1.1.conv2.weight"}
    writers2 = {"layer2.0.shortcut.0.weight", "layer2.0.conv2.weight", "layer2.1.conv2.weight"}
    for w in writers1 | writers2:
        assert _truth_dev(model, probe, (w,)) > 1e-3  # each alone is not SI
    assert _truth_dev(model, probe, tuple(writers1)) < 1e-9
    units = detect_units(_ckpt(model), model=model, probe=probe, granularity="channel")
    by_member = {m: u for u in units for m in u.members}
    for group in (writers1, writers2):
        u = by_member[next(iter(group))]
        assert set(u.members) == group
        assert u.kind == "joint" and u.scale_invariant and u.evidence == "functional"
        assert "each alone is not SI" in u.reason


def _ckpt(model: nn.Module) -> Checkpoint:
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return Checkpoint(Path("m.pt"), "test", DictSource(sd), step=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_name_rules_match_functional_truth_on_weights(name: str, probe: torch.Tensor) -> None:
    model = _trained_like(MODELS[name])
    ck = _ckpt(model)
    rule_units = name_rule_units({k: t.shape for k, t in ck.tensors.items()},
                                 {k: t.kind for k, t in ck.tensors.items()})
    assert all(u.evidence == "name-rule" and u.heuristic and 0 < u.confidence < 1 for u in rule_units)
    truth = functional_units(model, probe, hypotheses=graph_units(trace_module(model)))
    shapes = {k: t.shape for k, t in ck.tensors.items()}
    assert _weights_only(_si_sets(rule_units), shapes) == _weights_only(_si_sets(truth), shapes)
    heads = [u for u in rule_units if any(m.startswith(("fc.", "linear.", "11.")) for m in u.members)]
    assert heads and not any(u.scale_invariant for u in heads)


def test_bias_before_bn_reported_as_no_effect(probe: torch.Tensor) -> None:
    model = _trained_like(vgg_bn)
    for units in (graph_units(trace_module(model)), functional_units(model, probe),
                  name_rule_units({k: tuple(v.shape) for k, v in model.state_dict().items()})):
        dead = {m for u in units if u.role == "no-effect" for m in u.members}
        assert dead == {"0.bias", "4.bias"}
        si = {m for u in units if u.scale_invariant for m in u.members}
        assert "0.weight" in si and "4.weight" in si and "0.bias" not in si


def test_bn_affine_pair_into_another_bn_is_jointly_invariant(probe: torch.Tensor) -> None:
    model = _trained_like(ResNet)
    units = graph_units(trace_module(model))
    pair = next(u for u in units if set(u.members) == {"layer1.0.bn1.weight", "layer1.0.bn1.bias"})
    assert pair.scale_invariant
    assert _truth_dev(model, probe, ("layer1.0.bn1.weight",)) > 1e-3  # γ alone is not
    assert _truth_dev(model, probe, pair.members) < 1e-9
    assert pair.kind == "joint"  # a union of two tensors


def test_torch_export_graph_finds_the_same_units(probe: torch.Tensor) -> None:
    model = _trained_like(PreActResNet)
    ep = torch.export.export(model, (probe,))
    exported = _si_sets(graph_units(from_export(ep)))
    traced = _si_sets(graph_units(trace_module(model)))
    assert exported == traced


def test_onnx_graph_and_folded_bn_trap(probe: torch.Tensor, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from ilr_inspect.errors import ModelError
    from ilr_inspect.invariance.onnx_graph import load_onnx_graph

    model = _trained_like(ResNet).train()
    kept, folded = tmp_path / "kept.onnx", tmp_path / "folded.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (probe,), str(kept), training=torch.onnx.TrainingMode.TRAINING,
                          do_constant_folding=False, dynamo=False)
        torch.onnx.export(model.eval(), (probe,), str(folded), dynamo=False)
    onnx_sets = _si_sets(graph_units(load_onnx_graph(kept)))
    assert onnx_sets == _si_sets(graph_units(trace_module(model)))
    with pytest.raises(ModelError, match="no normalization node"):
        load_onnx_graph(folded)


def test_evidence_tiers_best_wins_and_user_file_overrides(probe: torch.Tensor, tmp_path: Path) -> None:
    model = _trained_like(ResNet)
    ck = _ckpt(model)
    rules_only = detect_units(ck)
    assert {u.evidence for u in rules_only} == {"name-rule"}
    graph_tier = detect_units(ck, model=model)
    assert {u.evidence for u in graph_tier} == {"graph"}
    full = detect_units(ck, model=model, probe=probe)
    assert {u.evidence for u in full} <= {"functional", "graph"}
    assert any(u.evidence == "functional" for u in full)
    (tmp_path / "u.yaml").write_text('stem: ["conv1.weight"]\nhead: {members: ["fc.*"], scale_invariant: false}\n')
    (tmp_path / "u.toml").write_text('[stage]\nmembers = ["layer1.*.conv2.weight"]\nkind = "joint"\n')
    over = detect_units(ck, model=model, probe=probe, units_file=tmp_path / "u.yaml")
    user = [u for u in over if u.evidence == "user"]
    assert {u.name for u in user} == {"stem", "head"}
    assert next(u for u in user if u.name == "head").members == ("fc.weight", "fc.bias")
    toml_units = load_units_file(tmp_path / "u.toml", list(ck.tensors))
    assert toml_units[0].members == ("layer1.0.conv2.weight", "layer1.1.conv2.weight")
    from ilr_inspect.errors import UsageError

    (tmp_path / "bad.yaml").write_text('x: ["nothing.*"]\n')
    with pytest.raises(UsageError, match="matches no tensor"):
        load_units_file(tmp_path / "bad.yaml", list(ck.tensors))


def test_transformer_name_rules() -> None:
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=32))
    units = name_rule_units({k: tuple(v.shape) for k, v in bert.state_dict().items()})
    emb = next(u for u in units if u.kind == "joint")
    assert emb.scale_invariant and len(emb.members) == 3 and all("embeddings" in m for m in emb.members)
    assert not any(u.scale_invariant for u in units if "attention.output.dense" in u.members[0])
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    sd = {k: tuple(v.shape) for k, v in gpt.state_dict().items() if k != "lm_head.weight"}  # tied head, as saved
    joint = next(u for u in name_rule_units(sd) if u.kind == "joint")
    assert not joint.scale_invariant and "tied" in joint.reason


def test_channel_granularity_functional_matches_rows(probe: torch.Tensor) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.GroupNorm(2, 8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 36, 4))
    units = functional_units(model, probe, granularity="channel")
    conv = next(u for u in units if "0.weight" in u.members)
    assert conv.kind == "group" and conv.groups == 2
    g = graph_units(trace_module(model), granularity="channel")
    assert next(u for u in g if "0.weight" in u.members).kind == "group"
    rows = np.arange(8) // 4
    assert rows.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # the row blocks a group unit measures


def test_units_from_an_existing_measurement_reads_nothing_again() -> None:
    from pathlib import Path

    import pandas as pd

    from ilr_inspect.api import units
    from ilr_inspect.invariance import detect_units
    from ilr_inspect.measure import measure
    from ilr_inspect.series import open_series

    ckpts = Path(__file__).resolve().parents[1] / "fixtures" / "digits" / "ckpts"
    with open_series([ckpts], read_logs=False) as series:
        m = measure(series, detect_units(series.checkpoints[0]), quiet=True)
        reads = 0
        for ck in series.checkpoints:  # any further tensor read would be counted
            original = ck.source.read

            def counting(name: str, _orig=original) -> object:  # type: ignore[no-untyped-def]
                nonlocal reads
                reads += 1
                return _orig(name)

            ck.source.read = counting  # type: ignore[method-assign]
        shared = units(series, measurement=m).rows
        assert reads == 0
    with open_series([ckpts], read_logs=False) as fresh:
        independent = units(fresh).rows
    pd.testing.assert_frame_equal(shared, independent)
