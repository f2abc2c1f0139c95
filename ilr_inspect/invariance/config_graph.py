"""The config-graph tier: a graph from what the framework itself wrote beside the weights, without user code.

- Hugging Face folder (``config.json`` naming a library architecture): ``transformers`` builds the model on the
  meta device (library code only; configs that ask for remote code are refused), a recorder follows one forward
  pass op by op into the graph IR of :mod:`.graph`. Small models are also checked by the functional tier, with the
  checkpoint's weights and synthesised token ids / pixels as the probe.
- timm (``args.yaml`` or ``config.json`` with ``architecture``): ``timm.create_model(name, pretrained=False)``.
- Keras ``.keras``: its ``config.json`` *is* the layer graph (classes + inbound nodes); read as data, no Keras.
- ONNX files beside the checkpoints (data, not code). ``.pt2`` and TorchScript archives are code: they are used
  only when named with ``--model`` (docs/security.md).

Each unit carries ``evidence="config-graph"`` (or ``functional``) and ``source`` = the file that decided it.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .graph import IGraph, INode, graph_units
from .unit import Unit

if TYPE_CHECKING:
    import torch
    from torch import nn

# Models larger than this get the graph tier only: the functional check costs one forward per module.
FUNCTIONAL_MAX_MODULES = 64
FUNCTIONAL_MAX_PARAMS = 5_000_000


@dataclass
class ConfigEvidence:
    """What the files beside a checkpoint said: units (names as in the checkpoint) and notes for the user."""

    units: list[Unit] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    source: str | None = None


# ----------------------------------------------------------------------------------------- op recorder
_PRODUCER_FUNCS = {"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                   "conv_transpose3d", "embedding", "addmm", "bilinear"}
_PARAM_MATMUL = {"matmul", "mm", "bmm", "__matmul__", "einsum"}
_NORM_FUNCS = {"layer_norm": "layer", "batch_norm": "batch", "group_norm": "group", "instance_norm": "instance",
               "rms_norm": "layer"}
_HOMOG = {"relu", "relu_", "leaky_relu", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d",
          "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
          "adaptive_max_pool2d", "dropout", "dropout1d", "dropout2d", "flatten", "view", "reshape", "permute",
          "transpose", "contiguous", "__getitem__", "expand", "expand_as", "squeeze", "unsqueeze", "clone", "to",
          "float", "half", "type_as", "narrow", "split", "chunk", "unbind", "mean", "sum", "pad", "t", "flip",
          "roll", "detach", "repeat", "max_pool2d_with_indices", "identity", "neg", "__neg__", "select", "movedim",
          "unflatten", "as_strided", "swapaxes"}
_NOT_CHANNELWISE = {"flatten", "view", "reshape", "permute", "transpose", "squeeze", "unsqueeze", "mean", "sum", "t",
                    "unflatten", "movedim", "swapaxes"}
_ADD = {"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__"}
_SCALE = {"mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__", "__itruediv__"}
_CAT = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}
_IGNORED = {"__get__", "__set__", "size", "dim", "numel", "__len__", "__format__", "__repr__", "__bool__", "item",
            "tolist", "is_floating_point", "__index__", "__eq__", "__ne__", "__hash__", "stride", "data_ptr",
            "is_contiguous", "get_device", "element_size", "__setstate__", "__reduce_ex__", "requires_grad_"}
_NORM_CLASS = re.compile(r"(RMS|Layer|Group|Batch|Instance)Norm", re.IGNORECASE)


def _norm_module_kind(m: nn.Module) -> tuple[str, int | None] | None:
    """Normalizer modules are recorded as one node (HF's RMSNorm is written out in elementwise ops)."""
    from torch import nn

    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "batch", None
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return "instance", None
    if isinstance(m, nn.GroupNorm):
        return "group", m.num_groups
    if isinstance(m, nn.LayerNorm) or type(m).__name__ == "RMSNorm":
        return "layer", None
    name = type(m).__name__
    if _NORM_CLASS.search(name) and "Pre" not in name and "Post" not in name and any(True for _ in m.parameters(
            recurse=False)):
        kind = "batch" if "batch" in name.lower() else "group" if "group" in name.lower() else "layer"
        return kind, None
    return None


class _Recorder:
    """Builds the IR from one forward pass: a TorchFunctionMode sees every op; normalizer modules are opaque."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.nodes: list[INode] = []
        self.of: dict[int, int] = {}  # id(tensor) -> node
        self.keep: list[Any] = []  # keep recorded tensors alive so ids are not reused
        self.params: dict[int, str] = {}
        for name, p in module.named_parameters():
            self.params.setdefault(id(p), name)
        self.depth = 0
        self.param_nodes: dict[str, int] = {}

    def add(self, op: str, label: str, inputs: Sequence[int], params: tuple[str, ...] = (), has_bias: bool = False,
            **kw: Any) -> int:
        nid = len(self.nodes)
        self.nodes.append(INode(nid, op, label, list(inputs), params, has_bias, **kw))
        return nid

    def bind(self, out: Any, nid: int) -> None:
        import torch

        if isinstance(out, torch.Tensor):
            self.of[id(out)] = nid
            self.keep.append(out)
        elif isinstance(out, (tuple, list)):
            for o in out:
                self.bind(o, nid)

    def node_of(self, t: Any) -> int:
        """The node a tensor came from: a recorded op, a parameter (its own producer), or a constant."""
        if id(t) in self.of:
            return self.of[id(t)]
        if id(t) in self.params:
            name = self.params[id(t)]
            if name not in self.param_nodes:
                self.param_nodes[name] = self.add("producer", f"param({name})", [], (name,))
            return self.param_nodes[name]
        nid = self.add("const", "const", [])
        self.bind(t, nid)
        return nid

    def tensors(self, args: Any, kwargs: Mapping[str, Any]) -> list[Any]:
        import torch

        out: list[Any] = []

        def walk(x: Any) -> None:
            if isinstance(x, torch.Tensor):
                out.append(x)
            elif isinstance(x, (tuple, list)):
                for y in x:
                    walk(y)

        walk(list(args))
        walk(list(kwargs.values()))
        return out

    def record(self, func: Any, args: Any, kwargs: Mapping[str, Any], out: Any) -> None:
        import torch

        name = str(getattr(func, "__name__", func)).split(".")[-1]
        if name in _IGNORED or self.depth:
            return
        has_tensor_out = isinstance(out, torch.Tensor) or (
            isinstance(out, (tuple, list)) and any(isinstance(o, torch.Tensor) for o in out))
        if not has_tensor_out:
            return
        ts = self.tensors(args, kwargs)
        pnames = tuple(self.params[id(t)] for t in ts if id(t) in self.params and id(t) not in self.of)
        acts = [self.node_of(t) for t in ts if not (id(t) in self.params and id(t) not in self.of)]
        scalars = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        if name in _PRODUCER_FUNCS or (name in _PARAM_MATMUL and pnames) or (name in _SCALE and pnames):
            if name == "addmm" and pnames and ts and id(ts[0]) in self.params:  # addmm(bias, x, W): bias first
                pnames = (*pnames[1:], pnames[0])
            nid = self.add("producer", f"{name}({', '.join(pnames)})", [] if name == "embedding" else acts[:1],
                           pnames, len(pnames) > 1)
        elif name in _NORM_FUNCS:
            nid = self.add("norm", name, acts[:1], pnames, norm_kind=_NORM_FUNCS[name])
        elif name in _ADD and len(ts) >= 2:
            nid = self.add("add", name, [self.node_of(t) for t in ts])
        elif name in _CAT:
            nid = self.add("cat", name, [self.node_of(t) for t in ts])
        elif (name in _HOMOG and len(acts) <= 1 and not pnames) or (
                name in _SCALE and len(ts) == 1 and all(s > 0 for s in scalars)) or (
                name in _ADD and len(ts) == 1 and scalars and all(s == 0 for s in scalars)):
            nid = self.add("homog", name, acts, channelwise=name not in _NOT_CHANNELWISE)
        elif acts and all(self.nodes[a].op == "const" for a in acts) and not pnames:
            nid = self.add("const", name, acts)
        else:
            ins = acts + [self.node_of(t) for t in ts if id(t) in self.params and id(t) not in self.of]
            nid = self.add("other", name, ins)
        self.bind(out, nid)

    def run(self, inputs: Mapping[str, Any]) -> IGraph:
        import torch
        from torch.overrides import TorchFunctionMode

        rec = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                rec.record(func, args, kwargs, out)
                return out

        handles = []
        for mname, m in self.module.named_modules():
            kind = _norm_module_kind(m)
            if kind is None:
                continue

            def pre(mod: nn.Module, args: Any, kind: tuple[str, int | None] = kind) -> None:
                if rec.depth == 0:
                    ts = rec.tensors(args, {})
                    rec._norm_in = rec.node_of(ts[0]) if ts else rec.add("const", "const", [])
                rec.depth += 1

            def post(mod: nn.Module, args: Any, out: Any, kind: tuple[str, int | None] = kind,
                     mname: str = mname) -> None:
                rec.depth -= 1
                if rec.depth == 0:
                    params = tuple(f"{mname}.{p}" if mname else p for p, _ in mod.named_parameters(recurse=False))
                    nid = rec.add("norm", f"{type(mod).__name__}({mname})", [rec._norm_in], params,
                                  norm_kind=kind[0], groups=kind[1])
                    rec.bind(out, nid)

            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        for k, v in inputs.items():
            self.bind(v, self.add("input", k, []))
        try:
            with Mode(), torch.no_grad():
                out = self.module(**inputs)
        finally:
            for h in handles:
                h.remove()
        outs: list[int] = []
        vals = out.to_tuple() if hasattr(out, "to_tuple") else out
        vals = list(vals.values()) if isinstance(vals, dict) else vals
        for t in vals if isinstance(vals, (tuple, list)) else [vals]:
            if isinstance(t, torch.Tensor) and id(t) in self.of:
                outs.append(self.of[id(t)])
        self.add("output", "output", outs)
        return IGraph(self.nodes)

    _norm_in: int = -1


def record_graph(module: nn.Module, inputs: Mapping[str, Any]) -> IGraph:
    """The graph of one forward pass of ``module`` on ``inputs`` (meta tensors work: nothing is computed)."""
    return _Recorder(module).run(inputs)


# ----------------------------------------------------------------------------------------- helpers
def _rename(units: Sequence[Unit], params: Sequence[str], source: str, tier: str = "config-graph") -> list[Unit]:
    from . import name_map
    from .unit import unit_name

    names = sorted({m for u in units for m in u.members})
    mapping = name_map(names, params)
    out = []
    for u in units:
        members = tuple(mapping[m] for m in u.members if m in mapping)
        if members:
            out.append(u.with_(members=members, name=unit_name(list(members)), evidence=tier, source=source,
                               reason=f"{u.reason} [{source}]"))
    return out


def _folder(ckpt_path: Path) -> Path:
    return ckpt_path if ckpt_path.is_dir() else ckpt_path.parent


def _load_json(path_or_bytes: Path | bytes) -> Any:
    try:
        from ..safety import load_json

        return load_json(path_or_bytes)
    except ImportError:  # pragma: no cover - the shared safety module is always there in the package
        import json

        raw = path_or_bytes if isinstance(path_or_bytes, bytes) else path_or_bytes.read_bytes()
        return json.loads(raw)


# ----------------------------------------------------------------------------------------- Hugging Face
def _hf_probe(model: nn.Module, config: Any, device: str) -> dict[str, torch.Tensor] | None:
    import torch

    main = getattr(model, "main_input_name", "input_ids")
    if main == "input_ids":
        n_pos = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 16)
        vocab = int(getattr(config, "vocab_size", 2) or 2)
        t = min(8, n_pos)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(1, max(vocab, 2), (4, t), generator=gen)
        return {"input_ids": ids.to(device)}
    if main == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size if isinstance(size, int) else int(size[0])
        ch = int(getattr(config, "num_channels", 3))
        gen = torch.Generator().manual_seed(0)
        return {"pixel_values": torch.randn(4, ch, size, size, generator=gen).to(device)}
    return None


def _hf_config(folder: Path) -> Any:
    import contextlib

    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    with contextlib.suppress(Exception):
        config._attn_implementation = "eager"  # matmul + softmax visible as ops
    for key, val in list(vars(config).items()):  # functional dropout in attention ignores module eval()
        if isinstance(val, float) and ("dropout" in key or key.endswith("_pdrop")):
            setattr(config, key, 0.0)
    return config


def _hf_build_from(config: Any, device: str) -> Any:
    import logging

    import torch
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = None  # only a library model class; anything else falls back to AutoModel
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with torch.device(device):
        if cls is not None and hasattr(cls, "_from_config"):
            model = cls._from_config(config)  # type: ignore[no-untyped-call]
        else:
            model = transformers.AutoModel.from_config(config)  # type: ignore[no-untyped-call]
    model.eval()
    return model


def _hf_build(folder: Path, device: str) -> tuple[Any, Any]:
    config = _hf_config(folder)
    return _hf_build_from(config, device), config


_HOMOG_ACTS = {"relu"}


def bert_template(config: Mapping[str, Any], params: Sequence[str]) -> IGraph | None:
    """BERT-family graph straight from ``config.json`` (model_type bert/roberta), op for op what transformers'
    eager BERT forward records (tests/test_units_from_files.py checks both give the same units). Used so that a
    deep BERT needs neither torch nor transformers; None when any checkpoint parameter is not covered."""
    if config.get("model_type") not in ("bert", "roberta") or config.get("is_decoder") or config.get(
            "add_cross_attention"):
        return None
    hit = next((n for n in params if n.endswith("embeddings.word_embeddings.weight")), None)
    n_layers = config.get("num_hidden_layers")
    if hit is None or not isinstance(n_layers, int):
        return None
    p = hit[: -len("embeddings.word_embeddings.weight")]
    have = set(params)
    nodes: list[INode] = []
    used: set[str] = set()

    def add(op: str, label: str, inputs: list[int], params_: tuple[str, ...] = (), **kw: Any) -> int:
        ps = tuple(x for x in params_ if x in have)
        used.update(ps)
        nodes.append(INode(len(nodes), op, label, inputs, ps, len(ps) > 1 and op == "producer", **kw))
        return len(nodes) - 1

    def lin(name: str, x: int) -> int:
        return add("producer", f"linear({name})", [x], (f"{p}{name}.weight", f"{p}{name}.bias"))

    def ln(name: str, x: int) -> int:
        return add("norm", f"LayerNorm({name})", [x], (f"{p}{name}.weight", f"{p}{name}.bias"), norm_kind="layer")

    add("input", "input_ids", [])
    e = "embeddings."
    x = add("producer", "embedding(word)", [], (f"{p}{e}word_embeddings.weight",))
    for table in ("token_type", "position"):  # the order of HF's BertEmbeddings.forward
        if f"{p}{e}{table}_embeddings.weight" in have:
            emb = add("producer", f"embedding({table})", [], (f"{p}{e}{table}_embeddings.weight",))
            x = add("add", "add", [x, emb])
    x = ln(f"{e}LayerNorm", x)
    act = str(config.get("hidden_act", "gelu"))
    for i in range(n_layers):
        lp = f"encoder.layer.{i}."
        q, k, v = (lin(f"{lp}attention.self.{t}", x) for t in ("query", "key", "value"))
        scores = add("other", "matmul", [q, k])
        probs = add("other", "softmax", [add("homog", "mul", [scores])])
        ctx = add("other", "matmul", [probs, v])
        x1 = ln(f"{lp}attention.output.LayerNorm", add("add", "add", [lin(f"{lp}attention.output.dense", ctx), x]))
        h = lin(f"{lp}intermediate.dense", x1)
        h = add("homog" if act in _HOMOG_ACTS else "other", act, [h])
        x = ln(f"{lp}output.LayerNorm", add("add", "add", [lin(f"{lp}output.dense", h), x1]))
    outs = [x]
    if f"{p}pooler.dense.weight" in have:
        pooled = add("other", "tanh", [lin("pooler.dense", add("homog", "__getitem__", [x]))])
        outs = [x, pooled]
        if "classifier.weight" in have:
            outs = [add("producer", "linear(classifier)", [pooled], ("classifier.weight", "classifier.bias"))]
    add("output", "output", outs)
    if used != set(params):
        return None  # a head or extra module the template does not know: let transformers build it
    return IGraph(nodes)


def hf_evidence(folder: Path, params: Sequence[str], checkpoint: Any = None, *, functional: bool = True
                ) -> ConfigEvidence:
    """Units of a Hugging Face folder from its ``config.json`` (library architectures only)."""
    cfg_path = folder / "config.json"
    src = str(cfg_path)
    ev = ConfigEvidence(source=src)
    raw = _load_json(cfg_path)
    if not isinstance(raw, dict):
        ev.notes.append(f"{src}: not a JSON object; config graph not used")
        return ev
    if raw.get("auto_map"):
        ev.notes.append(f"{src}: the architecture is remote code (auto_map), which is never run; pass --model")
        return ev
    if "architecture" in raw and "model_type" not in raw:  # timm's hub layout
        return timm_evidence(str(raw["architecture"]), src, params, raw.get("num_classes"))
    template = bert_template(raw, params)
    if template is not None and (not functional or checkpoint is None or len(params) > 2 * FUNCTIONAL_MAX_MODULES):
        ev.units = [u.with_(reason=f"{u.reason} (BERT graph read from config.json as data)")
                    for u in _rename(graph_units(template), params, src)]
        return ev
    try:
        import transformers  # noqa: F401
    except ImportError:
        ev.notes.append(f"{src}: transformers is not installed (pip install 'ilr-inspect[hf]'); config graph not used")
        return ev
    try:
        model, config = _hf_build(folder, "meta")
        probe = _hf_probe(model, config, "meta")
        if probe is None:
            ev.notes.append(f"{src}: no probe can be synthesised for input {model.main_input_name!r}")
            return ev
        g = record_graph(model, probe)
    except Exception as exc:  # a config the library cannot build, or a forward that needs real data
        ev.notes.append(f"{src}: the config graph could not be built ({type(exc).__name__}: {str(exc)[:120]})")
        return ev
    found = _rename(graph_units(g), params, src)
    n_mod = sum(1 for m in model.modules() if any(True for _ in m.parameters(recurse=False)))
    n_par = sum(p.numel() for p in model.parameters())
    if functional and checkpoint is not None and n_mod <= FUNCTIONAL_MAX_MODULES and n_par <= FUNCTIONAL_MAX_PARAMS:
        checked = _hf_functional(folder, checkpoint, found, src, ev)
        if checked:
            return ConfigEvidence(checked, ev.notes, src)
    ev.units = found
    return ev


def _hf_functional(folder: Path, checkpoint: Any, graph_found: Sequence[Unit], src: str, ev: ConfigEvidence
                   ) -> list[Unit]:
    """The definition itself on the library-built model with the checkpoint's weights: every unit the graph calls
    SI is scaled by 0.1 and 10 (normalizer ε ~ 0). A structural "not SI" from the graph stays: a small deviation at
    nearly untrained weights (uniform attention) is insensitivity, not invariance."""
    from ..models import load_weights
    from .functional import TOL, FunctionalProbe

    try:
        model, config = _hf_build(folder, "cpu")
        rep = load_weights(model, checkpoint)
        probe = _hf_probe(model, config, "cpu")
        if probe is None:
            return []
        key = next(iter(probe))
        fp = FunctionalProbe(_KwargModel(model, key), probe[key])
    except Exception as exc:
        ev.notes.append(f"{src}: functional check skipped ({type(exc).__name__}: {str(exc)[:120]})")
        return []
    back = {v: f"model.{k}" for k, v in rep.mapping.items()}
    out = []
    for u in graph_found:
        if not u.scale_invariant or not all(m in back for m in u.members):
            out.append(u)
            continue
        dev = max(fp.scaled([back[m] for m in u.members], c) for c in (0.1, 10.0))
        if dev < TOL:
            out.append(u.with_(evidence="functional", deviation=dev, reason=f"output unchanged when scaled by 0.1 "
                               f"and 10 (max relative deviation {dev:.1e}; model built from {src}, synthesised "
                               f"probe); graph: {u.reason}"))
        else:
            out.append(u.with_(evidence="functional", deviation=dev, scale_invariant=False, role="not-invariant",
                               reason=f"the graph suggested SI, but scaling by 0.1/10 changes the output by "
                                      f"{dev:.1e} (model built from {src}, synthesised probe)"))
    return out


def _kwarg_model_cls() -> type:
    from torch import nn

    class KwargModel(nn.Module):
        def __init__(self, model: nn.Module, key: str) -> None:
            super().__init__()
            self.model = model
            self.key = key

        def forward(self, x: Any) -> Any:
            return self.model(**{self.key: x})

    return KwargModel


def _KwargModel(model: nn.Module, key: str) -> nn.Module:  # noqa: N802 - reads like the class it builds
    return _kwarg_model_cls()(model, key)  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------------------- timm
def timm_evidence(name: str, src: str, params: Sequence[str], num_classes: Any = None) -> ConfigEvidence:
    ev = ConfigEvidence(source=src)
    try:
        import timm
    except Exception as exc:  # timm imports torchvision; either may be missing
        ev.notes.append(f"{src} names timm model {name!r}, but timm cannot be imported ({type(exc).__name__}: "
                        f"{str(exc)[:80]}); name rules used (pip install timm torchvision to use the graph)")
        return ev
    import torch

    kw: dict[str, Any] = {"pretrained": False}
    if isinstance(num_classes, int):
        kw["num_classes"] = num_classes
    try:
        with torch.device("meta"):
            model = timm.create_model(name, **kw)
        model.eval()
        size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))
        g = record_graph(model, {"x": torch.zeros(2, *size, device="meta")})
    except Exception as exc:
        ev.notes.append(f"{src}: timm could not build {name!r} ({type(exc).__name__}: {str(exc)[:100]})")
        return ev
    ev.units = _rename(graph_units(g), params, src)
    return ev


def _timm_args(folder: Path) -> tuple[str, Any] | None:
    path = folder / "args.yaml"
    if not path.is_file():
        return None
    from ..safety import load_yaml

    data = load_yaml(path)
    if isinstance(data, dict) and isinstance(data.get("model"), str):
        return data["model"], data.get("num_classes")
    return None


# ----------------------------------------------------------------------------------------- Keras
_K_PRODUCERS = {"Dense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
                "Embedding", "EinsumDense"}
_K_NORMS = {"BatchNormalization": "batch", "LayerNormalization": "layer", "GroupNormalization": "group",
            "RMSNormalization": "layer"}
_K_HOMOG = {"MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
            "AveragePooling3D", "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
            "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D", "Flatten", "Reshape", "Permute",
            "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
            "GaussianDropout", "Identity", "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D",
            "Cropping2D", "ReLU", "LeakyReLU", "ActivityRegularization", "RepeatVector"}
_K_HOMOG_ACT = {"relu", "linear", None, "leaky_relu"}
_NOT_CW_K = {"Flatten", "Reshape", "Permute", "GlobalAveragePooling1D", "GlobalAveragePooling2D",
             "GlobalAveragePooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D"}


def keras_graph(config: Mapping[str, Any], prefix: str = "") -> IGraph:
    """The layer graph of a Keras ``config.json`` (Functional: inbound nodes; Sequential: layer order)."""
    from ..errors import InputError

    cls = config.get("class_name")
    cfg = config.get("config") or {}
    layers = cfg.get("layers") or []
    nodes: list[INode] = []
    out_of: dict[str, int] = {}

    def add(op: str, label: str, inputs: list[int], params: tuple[str, ...] = (), has_bias: bool = False,
            **kw: Any) -> int:
        nodes.append(INode(len(nodes), op, label, inputs, params, has_bias, **kw))
        return len(nodes) - 1

    def inbound(layer: Mapping[str, Any]) -> list[int]:
        names: list[str] = []

        def walk(x: Any) -> None:
            if isinstance(x, dict):
                hist = (x.get("config") or {}).get("keras_history") if x.get("class_name") == "__keras_tensor__" \
                    else None
                if isinstance(hist, list) and hist:
                    names.append(str(hist[0]))
                else:
                    for v in x.values():
                        walk(v)
            elif isinstance(x, list):
                for v in x:
                    walk(v)

        walk(layer.get("inbound_nodes") or [])
        return [out_of[n] for n in names if n in out_of]

    sequential = cls == "Sequential"
    prev: int | None = None
    if sequential:
        prev = add("input", "input", [])
    for layer in layers:
        lc = str(layer.get("class_name"))
        lcfg = layer.get("config") or {}
        name = str(lcfg.get("name") or layer.get("name"))
        ins = ([prev] if prev is not None else []) if sequential else inbound(layer)
        p = f"{prefix}{name}/"
        if lc == "InputLayer":
            nid = add("input", name, [])
        elif lc in _K_PRODUCERS:
            if lc == "Embedding":
                params: tuple[str, ...] = (f"{p}embeddings",)
                ins = []
            else:
                params = (f"{p}kernel", f"{p}bias") if lcfg.get("use_bias", True) else (f"{p}kernel",)
            nid = add("producer", f"{lc}({name})", ins[:1], params, len(params) > 1)
            act = lcfg.get("activation")
            if act not in ("linear", None):
                nid = add("homog" if act in _K_HOMOG_ACT else "other", f"{act}({name})", [nid])
        elif lc in _K_NORMS:
            params = tuple(x for x, on in ((f"{p}gamma", lcfg.get("scale", True)), (f"{p}beta", lcfg.get(
                "center", True))) if on)
            nid = add("norm", f"{lc}({name})", ins[:1], params, norm_kind=_K_NORMS[lc], groups=lcfg.get("groups"))
        elif lc == "Activation":
            act = lcfg.get("activation")
            nid = add("homog" if act in _K_HOMOG_ACT else "other", f"{act}({name})", ins)
        elif lc in _K_HOMOG:
            nid = add("homog", f"{lc}({name})", ins, channelwise=lc not in _NOT_CW_K)
        elif lc in ("Add", "Subtract", "Average"):
            nid = add("add", f"{lc}({name})", ins)
        elif lc == "Concatenate":
            nid = add("cat", f"{lc}({name})", ins)
        elif lc in ("Functional", "Sequential", "Model"):
            raise InputError(f"nested model {name!r} in the Keras config is not read as a graph")
        else:
            nid = add("other", f"{lc}({name})", ins)
        out_of[name] = nid
        prev = nid
    outs: list[int] = []
    if sequential:
        outs = [prev] if prev is not None else []
    else:
        def walk_out(x: Any) -> None:
            if isinstance(x, list) and x and isinstance(x[0], str):
                if x[0] in out_of:
                    outs.append(out_of[x[0]])
            elif isinstance(x, list):
                for v in x:
                    walk_out(v)

        walk_out(cfg.get("output_layers") or [])
    add("output", "output", outs)
    return IGraph(nodes)


def keras_evidence(path: Path, params: Sequence[str]) -> ConfigEvidence:
    src = f"{path}:config.json"
    ev = ConfigEvidence(source=src)
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo("config.json")
            if info.file_size > 64 << 20:
                ev.notes.append(f"{src}: too large to read as a graph")
                return ev
            raw = zf.read("config.json")
        g = keras_graph(_load_json(raw))
    except Exception as exc:
        ev.notes.append(f"{src}: layer graph not read ({type(exc).__name__}: {str(exc)[:100]})")
        return ev
    ev.units = _rename(graph_units(g), params, src)
    return ev


# ----------------------------------------------------------------------------------------- ONNX
def onnx_evidence(path: Path, params: Sequence[str]) -> ConfigEvidence:
    from ..errors import IlrError
    from .onnx_graph import load_onnx_graph

    ev = ConfigEvidence(source=str(path))
    try:
        g = load_onnx_graph(path)
    except (IlrError, ImportError) as exc:
        ev.notes.append(f"{path}: ONNX graph not used ({exc})")
        return ev
    ev.units = _rename(graph_units(g), params, str(path))
    return ev


# ----------------------------------------------------------------------------------------- discovery
def _onnx_beside(folder: Path, ckpt: Path) -> Path | None:
    from ..series import step_from_name

    if ckpt.suffix == ".onnx":
        return ckpt
    for f in sorted(folder.glob("*.onnx")):
        if f.is_file() and step_from_name(f) is None:
            return f
    return None


def config_evidence(checkpoint: Any, params: Sequence[str], *, functional: bool = True) -> ConfigEvidence:
    """The best description the framework wrote beside ``checkpoint`` (nothing outside its folder is read)."""
    from ..storage import local_view

    path = local_view(checkpoint)  # a URL: the description files beside it, copied (ilr_inspect.storage)
    folder = _folder(path)
    notes: list[str] = []
    finders: list[Callable[[], ConfigEvidence | None]] = [
        lambda: keras_evidence(path, params) if path.suffix == ".keras" and path.is_file() else None,
        lambda: hf_evidence(folder, params, checkpoint, functional=functional)
        if (folder / "config.json").is_file() else None,
        lambda: (lambda a: timm_evidence(a[0], str(folder / "args.yaml"), params, a[1]) if a else None)(
            _timm_args(folder)),
        lambda: (lambda o: onnx_evidence(o, params) if o else None)(_onnx_beside(folder, path)),
    ]
    for find in finders:
        try:
            ev = find()
        except Exception as exc:  # an unreadable description never stops the name rules
            notes.append(f"{folder}: description beside the checkpoint not read ({type(exc).__name__}: {exc})")
            continue
        if ev is None:
            continue
        notes.extend(ev.notes)
        if ev.units:
            return ConfigEvidence(ev.units, notes, ev.source)
    return ConfigEvidence([], notes, None)


__all__ = ["ConfigEvidence", "config_evidence", "keras_graph", "record_graph"]
