"""ONNX front end of the graph tier: ONNX nodes → the IR of :mod:`.graph` (initializers are the parameters).

Known trap (docs/theory.md §2): torch's default ONNX export folds BatchNorm into the preceding conv and keeps the
conv's initializer name — no normalizer remains, so the graph says nothing about invariance and the weight is not
the checkpoint's tensor. Such a graph is refused with a clear message rather than analysed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ModelError
from .graph import IGraph, INode

_PRODUCERS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"}
_NORMS = {"BatchNormalization": "batch", "InstanceNormalization": "instance", "GroupNormalization": "group",
          "LayerNormalization": "layer", "RMSNormalization": "layer"}
_HOMOG = {"Relu", "LeakyRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten",
          "Reshape", "Transpose", "Dropout", "Identity", "Pad", "Squeeze", "Unsqueeze", "ReduceMean", "Cast"}
_NOT_CHANNELWISE = {"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "ReduceMean"}


def from_onnx(model: Any) -> IGraph:
    g = model.graph
    inits = {t.name for t in g.initializer}
    consts = {o for n in g.node if n.op_type == "Constant" for o in n.output}
    producer_of: dict[str, int] = {}
    nodes: list[INode] = []
    for inp in g.input:
        if inp.name not in inits:
            producer_of[inp.name] = len(nodes)
            nodes.append(INode(len(nodes), "input", inp.name))
    for n in g.node:
        nid = len(nodes)
        acts = [producer_of[i] for i in n.input if i in producer_of]
        params = tuple(i for i in n.input if i in inits)
        op = n.op_type
        if op in _PRODUCERS and params and (op != "Gather" or n.input[0] in inits):
            node = INode(nid, "producer", f"{op}({n.name or params[0]})", acts[:1], params[:2], len(params) > 1)
        elif op in _NORMS:
            groups = next((a.i for a in n.attribute if a.name == "num_groups"), None)
            node = INode(nid, "norm", f"{op}({n.name})", acts[:1], params[:2], norm_kind=_NORMS[op], groups=groups)
        elif op in ("Add", "Sub") and len(acts) >= 2:
            node = INode(nid, "add", op, acts)
        elif op == "Add" and len(acts) == 1 and params and nodes[acts[0]].op == "producer" \
                and not nodes[acts[0]].has_bias:
            # MatMul + Add(bias): fold the bias into the producer it belongs to.
            p = nodes[acts[0]]
            p.params, p.has_bias = (*p.params, params[0]), True
            producer_of[n.output[0]] = p.id
            continue
        elif op == "Concat":
            node = INode(nid, "cat", op, acts)
        elif op in _HOMOG or (op in ("Mul", "Div") and len(acts) == 1 and not params):
            node = INode(nid, "homog", op, acts, channelwise=op not in _NOT_CHANNELWISE)
        elif op in ("Shape", "Constant", "Size") or (not acts and all(i in consts or i in inits for i in n.input)):
            node = INode(nid, "const", op, acts)
        else:
            node = INode(nid, "other", op, acts)
        nodes.append(node)
        for o in n.output:
            producer_of[o] = nid
    outs = [producer_of[o.name] for o in g.output if o.name in producer_of]
    nodes.append(INode(len(nodes), "output", "output", outs))
    return IGraph(nodes)


def load_onnx_graph(path: Path) -> IGraph:
    from ..formats.onnx_file import load_graph

    model = load_graph(path)
    ops = {n.op_type for n in model.graph.node}
    if not ops & set(_NORMS):
        raise ModelError("the ONNX graph contains no normalization node (BatchNorm folded into the convs at export?)",
                         path=path, hint="re-export with torch.onnx.export(..., training=torch.onnx.TrainingMode."
                                         "PRESERVE, do_constant_folding=False) or use --model")
    return from_onnx(model)
