"""The graph tier: follow each weight's output through positively homogeneous ops to a normalizer
(docs/theory.md §2), merging residual-stream writers into joint units (union of the summands' producers).

Front ends translate a torch.fx graph (``--model`` traced with ``symbolic_trace``) or a torch.export program
(``.pt2``) into a tiny IR; the analysis works on the IR only.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .unit import Unit, unit_name

if TYPE_CHECKING:
    from torch import fx, nn

# op: producer (linear map with its own parameters), norm, homog (positively homogeneous, degree 1), add,
# cat, input, const, output, other.
@dataclass
class INode:
    id: int
    op: str
    label: str
    inputs: list[int] = field(default_factory=list)
    params: tuple[str, ...] = ()  # producer: (weight[, bias]); norm: affine (weight, bias) if any
    has_bias: bool = False
    norm_kind: str | None = None  # batch | instance | group | layer
    groups: int | None = None
    channelwise: bool = True  # keeps the channel layout (for per-channel units)


@dataclass
class IGraph:
    nodes: list[INode]

    def users(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {n.id: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out[i].append(n.id)
        return out


# ---------------------------------------------------------------- torch.fx front end
_HOMOG_FUNCS = {"relu", "relu_", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d",
                "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "dropout",
                "flatten", "view", "reshape", "permute", "transpose", "contiguous", "mean", "getitem", "pad",
                "squeeze", "unsqueeze", "leaky_relu", "identity", "clone", "detach", "to", "float",
                "max_pool2d_with_indices"}
_NOT_CHANNELWISE = {"flatten", "view", "reshape", "permute", "transpose", "squeeze", "unsqueeze", "mean", "Flatten"}
_ADD_FUNCS = {"add", "add_", "iadd", "sub", "sub_"}
_CONST_FUNCS = {"size", "dim", "shape", "numel"}


def _module_kind(m: nn.Module) -> tuple[str, dict[str, Any]]:
    from torch import nn

    if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding, nn.Bilinear)):
        return "producer", {}
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "norm", {"norm_kind": "batch"}
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return "norm", {"norm_kind": "instance"}
    if isinstance(m, nn.GroupNorm):
        return "norm", {"norm_kind": "group", "groups": m.num_groups}
    rms = getattr(nn, "RMSNorm", None)
    if isinstance(m, nn.LayerNorm) or (rms is not None and isinstance(m, rms)):
        return "norm", {"norm_kind": "layer"}
    homog = (nn.ReLU, nn.LeakyReLU, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
             nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
             nn.modules.dropout._DropoutNd, nn.Identity, nn.Flatten, nn.modules.padding._ConstantPadNd,
             nn.ReLU6 if False else nn.ReLU)
    if isinstance(m, homog):
        return "homog", {"channelwise": not isinstance(m, nn.Flatten)}
    return "other", {}


def _fname(target: Any) -> str:
    return str(getattr(target, "__name__", target)).split(".")[-1]


def from_fx(gm: fx.GraphModule) -> IGraph:
    """Translate a traced module (call_module / call_function / call_method / get_attr nodes)."""
    index: dict[str, int] = {}
    nodes: list[INode] = []
    param_names = {n for n, _ in gm.named_parameters()}
    for node in gm.graph.nodes:
        nid = len(nodes)
        index[node.name] = nid
        ins = [index[a.name] for a in node.all_input_nodes if a.name in index]
        label = f"{node.op}:{node.target}"
        if node.op == "placeholder":
            nodes.append(INode(nid, "input", label))
        elif node.op == "output":
            nodes.append(INode(nid, "output", label, ins))
        elif node.op == "get_attr":
            target = str(node.target)
            is_param = target in param_names
            nodes.append(INode(nid, "producer" if is_param else "const", label, [], (target,) if is_param else ()))
        elif node.op == "call_module":
            target = str(node.target)
            m = gm.get_submodule(target)
            kind, extra = _module_kind(m)
            params = tuple(f"{target}.{p}" for p, _ in m.named_parameters(recurse=False))
            has_bias = any(p.endswith(".bias") for p in params)
            nodes.append(INode(nid, kind, f"{type(m).__name__}({target})", ins, params, has_bias, **extra))
        else:  # call_function / call_method
            name = _fname(node.target)
            scalar_mul = name in ("mul", "truediv", "mul_", "div") and len(ins) == 1
            if name in _ADD_FUNCS and len(ins) >= 2:
                op = "add"
            elif name == "cat":
                op = "cat"
            elif name in _HOMOG_FUNCS or scalar_mul or (name in _ADD_FUNCS and len(ins) == 1 and False):
                op = "homog"
            elif name in _CONST_FUNCS:
                op = "const"
            else:
                op = "other"
            nodes.append(INode(nid, op, f"{name}", ins, channelwise=name not in _NOT_CHANNELWISE))
    return IGraph(nodes)


def trace_module(module: nn.Module) -> IGraph:
    from torch import fx

    from ..errors import ModelError

    try:
        gm = fx.symbolic_trace(module)
    except Exception as exc:  # fx raises many kinds of errors on dynamic control flow
        raise ModelError(f"torch.fx cannot trace the model ({type(exc).__name__}: {str(exc)[:120]})",
                         hint="the functional tier still applies; pass --probe") from exc
    return from_fx(gm)


# ---------------------------------------------------------------- torch.export front end
_ATEN_PRODUCERS = {"conv1d", "conv2d", "conv3d", "convolution", "linear", "embedding", "conv_transpose2d"}
_ATEN_NORMS = {"batch_norm": "batch", "_native_batch_norm_legit_functional": "batch",
               "_native_batch_norm_legit": "batch", "_native_batch_norm_legit_no_training": "batch",
               "native_batch_norm": "batch", "group_norm": "group", "native_group_norm": "group",
               "layer_norm": "layer", "native_layer_norm": "layer", "instance_norm": "instance", "rms_norm": "layer"}


def from_export(ep: Any) -> IGraph:
    """Translate a torch.export ExportedProgram (aten ops; parameters are placeholders)."""
    sig = ep.graph_signature
    to_param: dict[str, str] = dict(sig.inputs_to_parameters)
    index: dict[str, int] = {}
    nodes: list[INode] = []
    for node in ep.graph.nodes:
        nid = len(nodes)
        index[node.name] = nid
        if node.op == "placeholder":
            nodes.append(INode(nid, "const" if node.name in to_param or node.name in sig.inputs_to_buffers
                               else "input", node.name))
            continue
        if node.op == "output":
            user_out = [a for a in node.all_input_nodes][: len(sig.user_outputs)]
            nodes.append(INode(nid, "output", "output", [index[a.name] for a in user_out]))
            continue
        name = _fname(getattr(node.target, "_opname", None) or node.target)
        arg_nodes = [a for a in node.args if hasattr(a, "name")]
        params = tuple(to_param[a.name] for a in arg_nodes if a.name in to_param)
        acts = [index[a.name] for a in node.all_input_nodes if a.name in index and a.name not in to_param]
        if name in _ATEN_PRODUCERS:
            if name == "embedding":
                acts = []
            nodes.append(INode(nid, "producer", name, acts[:1], params, len(params) > 1))
        elif name in _ATEN_NORMS:
            groups = node.args[1] if name == "group_norm" and isinstance(node.args[1], int) else None
            nodes.append(INode(nid, "norm", name, acts[:1], params, norm_kind=_ATEN_NORMS[name], groups=groups))
        elif name in _ADD_FUNCS and len(acts) >= 2:
            nodes.append(INode(nid, "add", name, acts))
        elif name == "cat":
            nodes.append(INode(nid, "cat", name, acts))
        elif name in _HOMOG_FUNCS or (name in ("mul", "div") and len(acts) == 1 and not params):
            nodes.append(INode(nid, "homog", name, acts, channelwise=name not in _NOT_CHANNELWISE))
        elif name in _CONST_FUNCS or name in ("sym_size",):
            nodes.append(INode(nid, "const", name, acts))
        elif params and not acts:  # a parameter used directly, e.g. x + pos_embed
            nodes.append(INode(nid, "producer", name, [], params))
        else:
            nodes.append(INode(nid, "other", name, acts))
    return IGraph(nodes)


def load_exported(path: Path) -> IGraph:
    import torch

    from ..errors import ModelError

    try:
        ep = torch.export.load(str(path))
    except Exception as exc:
        raise ModelError(f"cannot load the torch.export program ({type(exc).__name__})", path=path,
                         hint="re-save it with torch.export.save") from exc
    return from_export(ep)


# ---------------------------------------------------------------- analysis
@dataclass
class _Verdict:
    ok: bool
    cause: str = ""
    mixing: list[int] = field(default_factory=list)  # unaffected operands of the first mixing add
    norms: list[int] = field(default_factory=list)
    channelwise: bool = True


def _only_bn(g: IGraph, users: dict[int, list[int]], i: int) -> bool:
    us = users[i]
    return bool(us) and all(g.nodes[u].op == "norm" and g.nodes[u].norm_kind in ("batch", "instance") for u in us)


def _propagate(g: IGraph, unit: set[int], users: dict[int, list[int]]) -> _Verdict:
    status: dict[int, str] = {}
    v = _Verdict(True)
    for n in g.nodes[min(unit):]:  # nodes before the unit's first member cannot carry its scaling
        ins = [status.get(i, "u") for i in n.inputs]
        bad, sc = "b" in ins, "s" in ins
        if n.id in unit:
            if n.op == "producer":
                st = "b" if (bad or sc) else "s"
                if sc and v.ok:
                    v = _Verdict(False, f"{n.label} is in the unit and also receives its scaled input")
            else:  # a normalizer's affine pair: output = γ·x̂ + β, scaled when (γ, β) are
                st = "b" if bad else "s"
        elif bad:
            st = "b"
        elif not sc:
            st = "u"
        elif n.op == "producer":
            # A bias read only by batch/instance norms is removed by their mean subtraction.
            bias_matters = n.has_bias and not _only_bn(g, users, n.id)
            st = "b" if bias_matters else "s"
            if bias_matters and v.ok:
                v = _Verdict(False, f"the bias of {n.label} is added after the scaled input (not homogeneous)")
            v.channelwise = False
        elif n.op == "norm":
            st = "u"
            v.norms.append(n.id)
        elif n.op == "homog":
            st = "s"
            v.channelwise = v.channelwise and n.channelwise
        elif n.op in ("add", "cat"):
            if all(s == "s" for s in ins):
                st = "s"
            else:
                st = "b"
                if v.ok:
                    v = _Verdict(False, f"{n.label} mixes the unit's output with an unscaled summand",
                                 [i for i, s in zip(n.inputs, ins, strict=True) if s == "u"], v.norms, v.channelwise)
        elif n.op == "const":
            st = "u"
        elif n.op == "output":
            st = "b"
            if v.ok:
                v = _Verdict(False, "the unit's output reaches the model output without a normalizer", [], v.norms)
        else:
            st = "b"
            if v.ok:
                v = _Verdict(False, f"{n.label} is not positively homogeneous", [], v.norms)
        status[n.id] = st
        if not v.ok:  # the first failure decides the verdict (and the merge candidates); the rest cannot change it
            break
    return v


def _back_sources(g: IGraph, start: int) -> set[int] | None:
    """Producers (or normalizer affine pairs) whose joint scaling scales this node; None if a fixed origin."""
    out: set[int] = set()
    stack, seen = [start], set()
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        n = g.nodes[i]
        if n.op == "producer" or (n.op == "norm" and n.params):
            out.add(i)
        elif n.op in ("homog", "add", "cat"):
            stack.extend(n.inputs)
        else:
            return None
    return out


def graph_units(g: IGraph, *, granularity: str = "tensor", max_merges: int = 64) -> list[Unit]:
    """Units for every parameter the graph touches (names as in the graph's parameter naming)."""
    users = g.users()
    seeds = [n.id for n in g.nodes if n.params and n.op in ("producer", "norm")]
    si_sets: list[tuple[int, set[int], _Verdict]] = []
    failures: dict[int, str] = {}
    for s in seeds:
        unit = {s}
        for _ in range(max_merges):
            v = _propagate(g, unit, users)
            if v.ok:
                si_sets.append((s, unit, v))
                break
            extra: set[int] = set()
            for i in v.mixing:
                src = _back_sources(g, i)
                if src is None:
                    extra = set()
                    break
                extra |= src
            if not extra or extra <= unit:
                failures[s] = v.cause
                break
            unit = unit | extra
        else:
            failures[s] = "residual merging did not converge"
    # Each parameter goes to one unit: sets seeded by weights first, then normalizer-affine ones; a set that
    # overlaps one already taken is an alternative grouping and is dropped (its seed is then "jointly only").
    merged: list[tuple[set[int], _Verdict]] = []
    taken_ids: set[int] = set()
    for seed, st, v in sorted(si_sets, key=lambda t: (g.nodes[t[0]].op != "producer", len(t[1]))):
        if st & taken_ids:
            if seed not in taken_ids:
                failures.setdefault(seed, "scale-invariant only together with tensors already in another unit "
                                    "(an alternative grouping of the same residual stream)")
            continue
        merged.append((st, v))
        taken_ids |= st
    out: list[Unit] = []
    covered: set[int] = set()
    for st, v in merged:
        members: list[str] = []
        dead: list[str] = []
        for i in sorted(st):
            n = g.nodes[i]
            for p in n.params:
                # A producer bias read only by batch/instance norms is removed by the mean subtraction.
                if p.endswith("bias") and n.op == "producer" and _only_bn(g, users, i):
                    dead.append(p)
                else:
                    members.append(p)
        covered |= st
        norm_kinds = {g.nodes[j].norm_kind for j in v.norms}
        norm_labels = ", ".join(sorted({g.nodes[j].label for j in v.norms})[:3])
        if len(st) > 1:
            kind, groups = "joint", None
            reason = (f"each alone is not SI ({failures.get(min(st), 'mixed into a sum')}); together their "
                      f"outputs are summed and read only through normalizers ({norm_labels})")
        else:
            # One node's several tensors (a normalizer's γ and β) scale together: a union, hence "joint".
            kind, groups = ("joint" if len(members) > 1 else "tensor"), None
            if granularity != "tensor" and v.channelwise and norm_kinds <= {"batch", "instance"} and norm_kinds:
                kind = "channel"
            elif granularity != "tensor" and v.channelwise and norm_kinds == {"group"}:
                gs = {g.nodes[j].groups for j in v.norms}
                if len(gs) == 1:
                    kind, groups = "group", gs.pop()
            reason = f"every path to the output goes through homogeneous ops into {norm_labels}"
        if members:
            out.append(Unit(unit_name(members), tuple(members), kind, True, "graph", reason,  # type: ignore[arg-type]
                            normalizer=norm_labels or None, groups=groups, confidence=0.95))
        for d in dead:
            out.append(Unit(unit_name([d]), (d,), "tensor", False, "graph",
                            "bias directly before BatchNorm: removed by the mean subtraction (zero gradient, no "
                            "effect; only weight decay moves it) — not a weight to track", role="no-effect",
                            confidence=0.95))
    for s in seeds:
        if s in covered:
            continue
        n = g.nodes[s]
        why = failures.get(s, "not scale-invariant")
        if n.op == "norm":
            why = f"normalizer affine parameters: {why}"
        for p in n.params:
            out.append(Unit(unit_name([p]), (p,), "tensor", False, "graph", why, role="not-invariant",
                            confidence=0.95))
    return out



def units_from_graph(g: IGraph, granularity: str = "tensor") -> list[Unit]:
    return graph_units(g, granularity=granularity)


__all__: Sequence[str] = ("IGraph", "INode", "from_export", "from_fx", "graph_units", "trace_module")
_ = operator  # operator functions are matched by __name__ above
