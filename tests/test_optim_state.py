"""optim_state: optimizer state dict → per-parameter hyperparameters, checked against the live optimizer.

The reference for every mapping is the optimizer object itself: which group holds each parameter *object*
(matched to its name through ``named_parameters()``), and that group's lr / weight decay / momentum.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ilr_inspect.errors import HParamsError
from ilr_inspect.optim_state import (
    hparams_from_optimizer_state,
    map_optimizer_groups,
    optimizer_family,
    resolve_param_ids,
)


class Net(nn.Module):
    """Conv + BN + a LayerNorm-named block, so both the ndim rule and the HF name rule have work to do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(16, 8)
        self.LayerNorm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = nn.functional.adaptive_avg_pool2d(h, 2).flatten(1)
        return self.head(self.LayerNorm(self.fc(h)))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(4, 3, 6, 6, generator=g)
        model(x).square().mean().backward()
        opt.step()


def _names_shapes(model: nn.Module) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    names = [n for n, _ in model.named_parameters()]
    return names, {n: tuple(p.shape) for n, p in model.named_parameters()}


def _reference(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, float]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in opt.param_groups:
        for p in g["params"]:
            mom = g["betas"][0] if "betas" in g else g.get("momentum")
            out[by_id[id(p)]] = {"lr": g["lr"], "weight_decay": g["weight_decay"], "momentum": mom}
    return out


def _check(got: dict, ref: dict[str, dict[str, float]]) -> None:  # type: ignore[type-arg]
    assert set(got) == set(ref)
    for name, r in ref.items():
        assert got[name].lr == pytest.approx(r["lr"]), name
        assert got[name].weight_decay == pytest.approx(r["weight_decay"]), name
        assert got[name].momentum == pytest.approx(r["momentum"]), name
        assert got[name].lr_timing == "next"


def test_single_group_sgd_nesterov_with_scheduler() -> None:
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(m, opt)
    sched.step()
    names, shapes = _names_shapes(m)
    got = hparams_from_optimizer_state(opt.state_dict(), names, shapes, source="optimizer")
    _check(got, _reference(m, opt))
    h = got["conv.weight"]
    assert h.lr == pytest.approx(0.05)  # the lr the *next* update uses, after the scheduler step
    assert (h.optimizer, h.wd_mode, h.nesterov) == ("SGD", "coupled", True)


def test_timm_style_no_decay_first_groups_sgd() -> None:
    torch.manual_seed(0)
    m = Net()
    no_decay = [p for n, p in m.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
    decay = [p for n, p in m.named_parameters() if not (p.ndim <= 1 or n.endswith(".bias"))]
    opt = torch.optim.SGD([{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 1e-3}],
                          lr=0.2, momentum=0.8)
    _train(m, opt)
    names, shapes = _names_shapes(m)
    got = hparams_from_optimizer_state(opt.state_dict(), names, shapes, source="optimizer")
    _check(got, _reference(m, opt))
    assert got["bn.weight"].weight_decay == 0.0 and got["conv.weight"].weight_decay == pytest.approx(1e-3)


def test_hf_two_group_rule_adamw() -> None:
    torch.manual_seed(0)
    m = Net()
    # The HF Trainer rule: no decay for biases and LayerNorm parameters; BatchNorm weight keeps decay.
    nd = {n for n, _ in m.named_parameters() if "bias" in n or "LayerNorm" in n}
    opt = torch.optim.AdamW([
        {"params": [p for n, p in m.named_parameters() if n not in nd], "weight_decay": 0.05},
        {"params": [p for n, p in m.named_parameters() if n in nd], "weight_decay": 0.0},
    ], lr=3e-4, betas=(0.85, 0.99))
    _train(m, opt)
    names, shapes = _names_shapes(m)
    got = hparams_from_optimizer_state(opt.state_dict(), names, shapes, source="optimizer")
    _check(got, _reference(m, opt))
    assert got["bn.weight"].weight_decay == pytest.approx(0.05)
    assert got["LayerNorm.weight"].weight_decay == 0.0
    h = got["fc.weight"]
    assert (h.optimizer, h.wd_mode, h.momentum, h.beta2) == ("AdamW", "decoupled", 0.85, 0.99)
    # Same mapping when the names' order is unknown (safetensors sort keys): membership is name-based.
    shuffled = sorted(names)
    got2 = hparams_from_optimizer_state(opt.state_dict(), shuffled, shapes, source="optimizer", names_ordered=False)
    _check(got2, _reference(m, opt))


def test_saved_param_names_arbitrary_groups() -> None:
    torch.manual_seed(0)
    m = Net()
    named = dict(m.named_parameters())
    opt = torch.optim.SGD([
        {"params": [("head.weight", named["head.weight"]), ("conv.weight", named["conv.weight"])], "lr": 0.01},
        {"params": [(n, p) for n, p in named.items() if n not in ("head.weight", "conv.weight")], "weight_decay": 0.1},
    ], lr=0.3, momentum=0.5)
    _train(m, opt)
    names, shapes = _names_shapes(m)
    sd = opt.state_dict()
    assert "param_names" in sd["param_groups"][0]
    got = hparams_from_optimizer_state(sd, names, shapes, source="optimizer")
    _check(got, _reference(m, opt))
    by_id = {id(p): n for n, p in m.named_parameters()}
    live = {i: by_id[id(p)] for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    assert resolve_param_ids(sd, names, shapes) == live
    # Names saved under a DDP wrapper still resolve to the bare checkpoint names.
    for g in sd["param_groups"]:
        g["param_names"] = ["module." + n for n in g["param_names"]]
    _check(hparams_from_optimizer_state(sd, names, shapes, source="optimizer"), _reference(m, opt))


def test_lazy_state_unused_parameter_is_fine() -> None:
    torch.manual_seed(0)
    m = Net()
    m.unused = nn.Parameter(torch.ones(3))  # never receives a gradient → no optimizer state entry
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=1e-4)
    _train(m, opt)
    sd = opt.state_dict()
    assert len(sd["state"]) == len(list(m.parameters())) - 1
    names, shapes = _names_shapes(m)
    got = hparams_from_optimizer_state(sd, names, shapes, source="optimizer")
    _check(got, _reference(m, opt))
    assert (got["unused"].optimizer, got["unused"].wd_mode) == ("Adam", "coupled")


def test_attribute_scope_when_optimizer_covers_a_submodule() -> None:
    torch.manual_seed(0)
    outer = nn.Module()
    outer.model = Net()
    outer.temperature = nn.Parameter(torch.ones(()))  # a parameter the optimizer does not hold
    opt = torch.optim.SGD(outer.model.parameters(), lr=0.1, momentum=0.9)
    _train(outer.model, opt)
    names, shapes = _names_shapes(outer)
    got = hparams_from_optimizer_state(opt.state_dict(), names, shapes, source="optimizer")
    _check(got, _reference(outer, opt))
    assert "temperature" not in got


def test_frozen_parameter_mismatch_is_refused_with_hint() -> None:
    torch.manual_seed(0)
    m = Net()
    m.conv.weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    _train(m, opt)
    names, shapes = _names_shapes(m)  # the checkpoint still lists the frozen weight
    # 'head.weight' [2, 8] now sits where the replay expects a different shape, or the counts differ.
    with pytest.raises(HParamsError) as ei:
        hparams_from_optimizer_state(opt.state_dict(), names, shapes, source="optimizer")
    assert "tried" in ei.value.message and "--lr" in (ei.value.hint or "")


def test_shape_mismatch_is_refused() -> None:
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    _train(m, opt)
    names, shapes = _names_shapes(m)
    shapes["conv.weight"] = (4, 3, 5, 5)  # the state's (4, 3, 3, 3) buffer fits no parameter
    with pytest.raises(HParamsError, match="shape"):
        hparams_from_optimizer_state(opt.state_dict(), names, shapes, source="optimizer")


def test_single_group_is_determined_even_when_name_order_is_off() -> None:
    # One group holds every parameter, so each one's hyperparameters are known whatever the saved order; only ids
    # whose state shape is unique map back to a name.
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    _train(m, opt)
    names, shapes = _names_shapes(m)
    names[0], names[2] = names[2], names[0]  # conv.weight and bn.bias swapped: the order replay fails on shapes
    _check(hparams_from_optimizer_state(opt.state_dict(), names, shapes, source="optimizer"), _reference(m, opt))
    pids = resolve_param_ids(opt.state_dict(), names, shapes)
    assert pids[0] == "conv.weight" and 1 not in pids  # bn.weight/bn.bias share shape (4,)


def test_ambiguous_recipes_are_refused() -> None:
    # Two recipes fit the saved group sizes with different memberships, and no state breaks the tie.
    shapes = {"fc.weight": (4, 4), "emb.bias": (4,), "norm.weight": (4, 4), "gain": (4,)}
    ps = {n: nn.Parameter(torch.zeros(s)) for n, s in shapes.items()}
    opt = torch.optim.AdamW([{"params": [ps["fc.weight"], ps["gain"]], "weight_decay": 0.1},
                             {"params": [ps["emb.bias"], ps["norm.weight"]], "weight_decay": 0.0}])
    # Each parameter could be in either group: the weight decay is open, while lr and β1 (equal in both) are known.
    got = map_optimizer_groups(opt.state_dict(), list(shapes), shapes, source="optimizer")
    assert set(got.undetermined) == set(shapes)
    assert all(h.weight_decay is None and h.lr == 1e-3 and h.momentum == 0.9 for h in got.hparams.values())
    assert got.note is not None and "leave weight_decay open" in got.note and "--wd" in got.note
    # When every field differs between the candidate groups, nothing is reported and the refusal says why.
    opt2 = torch.optim.AdamW([{"params": [ps["fc.weight"], ps["gain"]], "weight_decay": 0.1, "lr": 0.1},
                              {"params": [ps["emb.bias"], ps["norm.weight"]], "weight_decay": 0.0, "lr": 0.2,
                               "betas": (0.8, 0.99)}])
    with pytest.raises(HParamsError, match="ambiguous"):
        hparams_from_optimizer_state(opt2.state_dict(), list(shapes), shapes, source="optimizer")


def test_fqn_keyed_optimizer_state() -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.AdamW([{"params": [m.conv.weight], "weight_decay": 0.2},
                             {"params": [p for n, p in m.named_parameters() if n != "conv.weight"]}], lr=1e-3)
    _train(m, opt)
    osd = get_optimizer_state_dict(m, opt)
    assert isinstance(osd["param_groups"][0]["params"][0], str)
    names, shapes = _names_shapes(m)
    _check(hparams_from_optimizer_state(osd, names, shapes, source="optimizer"), _reference(m, opt))
    assert resolve_param_ids(osd, names, shapes) == {n: n for n in names}  # FQN-keyed: the id is the name


@pytest.mark.parametrize(
    ("cls", "kwargs", "family", "wd_mode"),
    [
        (torch.optim.Adam, {}, "Adam", "coupled"),
        (torch.optim.AdamW, {}, "AdamW", "decoupled"),
        (torch.optim.Adam, {"decoupled_weight_decay": True}, "AdamW", "decoupled"),
        (torch.optim.RMSprop, {"momentum": 0.9}, "RMSprop", "coupled"),
        (torch.optim.Adagrad, {}, "Adagrad", "coupled"),
        (torch.optim.NAdam, {}, "NAdam", "coupled"),
        (torch.optim.Adamax, {}, "Adamax", "coupled"),
        (torch.optim.RAdam, {"decoupled_weight_decay": True}, "RAdamW", "decoupled"),
    ],
)
def test_family_detection(cls: type, kwargs: dict, family: str, wd_mode: str) -> None:  # type: ignore[type-arg]
    opt = cls([nn.Parameter(torch.zeros(2))], lr=0.01, **kwargs)
    assert optimizer_family(opt.state_dict()["param_groups"][0]) == (family, wd_mode)


def test_old_torch_adam_without_flag_is_labelled_honestly() -> None:
    group = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False, "params": [0]}
    got = hparams_from_optimizer_state({"state": {}, "param_groups": [group]}, ["w"], {"w": (3,)}, source="opt")
    assert got["w"].optimizer == "Adam or AdamW (cannot tell)" and got["w"].wd_mode is None
    assert (got["w"].momentum, got["w"].beta2, got["w"].eps) == (0.9, 0.999, 1e-8)


def test_malformed_state_is_an_hparams_error() -> None:
    with pytest.raises(HParamsError, match="param_groups"):
        hparams_from_optimizer_state({"state": {}}, ["w"], {"w": (3,)}, source="optimizer")


def test_several_fits_with_identical_hyperparameters_are_accepted() -> None:
    # Same sizes and no state, but both groups carry the same lr/wd: every parameter's values are determined.
    shapes = {"fc.weight": (4, 4), "emb.bias": (4,), "norm.weight": (4, 4), "gain": (4,)}
    ps = {n: nn.Parameter(torch.zeros(s)) for n, s in shapes.items()}
    opt = torch.optim.SGD([{"params": [ps["fc.weight"], ps["gain"]]}, {"params": [ps["emb.bias"], ps["norm.weight"]]}],
                          lr=0.1, momentum=0.9)
    got = hparams_from_optimizer_state(opt.state_dict(), list(shapes), shapes, source="optimizer")
    assert {n: (h.lr, h.weight_decay, h.momentum) for n, h in got.items()} == dict.fromkeys(shapes, (0.1, 0.0, 0.9))
