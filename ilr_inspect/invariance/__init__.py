"""Scale-invariant unit detection in tiers (docs/theory.md §2): user file > functional > graph > name rules, with a
trajectory cross-check. ``detect_units`` returns the decisions; :func:`ilr_inspect.api.units` adds each unit's
regime as a Result. Nothing here imports :mod:`ilr_inspect.measure` (measuring takes units; it never detects).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import Checkpoint
from .rules import name_rule_units
from .unit import EVIDENCE_RANK, Unit, unit_name

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Unit", "detect_units", "name_map"]


def name_map(module_names: Sequence[str], ckpt_names: Sequence[str]) -> dict[str, str]:
    """Module parameter name → checkpoint tensor name (exact, else the unique name ending with it)."""
    ck = set(ckpt_names)
    out: dict[str, str] = {}
    for m in module_names:
        if m in ck:
            out[m] = m
            continue
        hits = [c for c in ckpt_names if c.endswith("." + m) or c.endswith("/" + m)]
        if len(hits) == 1:
            out[m] = hits[0]
    return out


def _rename(units: Sequence[Unit], mapping: Mapping[str, str]) -> list[Unit]:
    out = []
    for u in units:
        members = tuple(mapping[m] for m in u.members if m in mapping)
        if members:
            out.append(u.with_(members=members, name=unit_name(list(members)) if u.evidence != "user" else u.name))
    return out


def _combine(tiers: Sequence[Sequence[Unit]], params: Sequence[str]) -> list[Unit]:
    """Best evidence wins per tensor; a lower-tier unit keeps only its members nobody better decided."""
    taken: set[str] = set()
    out: list[Unit] = []
    for tier in sorted(tiers, key=lambda t: min((EVIDENCE_RANK[u.evidence] for u in t), default=99)):
        for u in tier:
            rest = tuple(m for m in u.members if m not in taken)
            if not rest:
                continue
            if rest != u.members:
                kind = u.kind if len(rest) > 1 or u.kind != "joint" else "tensor"
                u = u.with_(members=rest, kind=kind, name=unit_name(list(rest)),
                            reason=u.reason + " (remaining members after better evidence decided the others)")
            out.append(u)
            taken.update(rest)
    order = {p: i for i, p in enumerate(params)}
    out.sort(key=lambda u: min(order.get(m, 1 << 30) for m in u.members))
    return out


def detect_units(checkpoint: Checkpoint, *, model: nn.Module | None = None, probe: torch.Tensor | None = None,
                 graph: Any = None, granularity: str = "tensor", units_file: str | Path | None = None,
                 param_names: Mapping[str, str] | None = None, config: bool = True,
                 rotational_default: bool = False) -> list[Unit]:
    """Decide every parameter tensor of ``checkpoint``.

    ``model`` (weights loaded) enables the graph tier via torch.fx and, with ``probe``, the functional tier;
    ``graph`` is an :class:`~ilr_inspect.invariance.graph.IGraph` or a path to a ``.pt2`` program;
    ``param_names`` maps the model's parameter names to the checkpoint's (default: exact or unique suffix match).
    ``config``: without a model or graph, use the description the framework wrote beside the checkpoint
    (config.json, .keras, args.yaml, ONNX; no user code — docs/units.md). ``rotational_default``: opt in to the
    Kosson et al. heuristic for tensors no rule decides (otherwise they are ``undetermined``).
    """
    infos = checkpoint.tensors
    params = [n for n, t in infos.items() if t.kind == "parameter" and t.dtype.startswith(("float", "bfloat"))]
    shapes = {n: t.shape for n, t in infos.items()}
    kinds = {n: t.kind for n, t in infos.items()}
    rules = name_rule_units(shapes, kinds, rotational_default=rotational_default)
    tiers: list[list[Unit]] = [rules]
    if config and model is None and graph is None:
        from .config_graph import config_evidence

        ev = config_evidence(checkpoint, params)
        if ev.units:
            tiers.append(ev.units)
        elif ev.notes:
            note = "; ".join(ev.notes)[:300]
            tiers[0] = [u.with_(reason=f"{u.reason} (config graph: {note})") if u.role == "undetermined" else u
                        for u in rules]
    graph_tier: list[Unit] = []
    if graph is not None:
        from .graph import IGraph, graph_units, load_exported

        g = graph if isinstance(graph, IGraph) else load_exported(Path(graph))
        graph_tier = graph_units(g, granularity=granularity)
        names = sorted({m for u in graph_tier for m in u.members})
        graph_tier = _rename(graph_tier, dict(param_names) if param_names else name_map(names, params))
    elif model is not None:
        from ..errors import ModelError
        from .graph import graph_units, trace_module

        try:
            raw = graph_units(trace_module(model), granularity=granularity)
            mapping = dict(param_names) if param_names else name_map([n for n, _ in model.named_parameters()], params)
            graph_tier = _rename(raw, mapping)
        except ModelError:
            graph_tier = []
    if graph_tier:
        tiers.append(graph_tier)
    if model is not None and probe is not None:
        from .functional import functional_units

        mod_names = [n for n, _ in model.named_parameters()]
        fwd = dict(param_names) if param_names else name_map(mod_names, params)
        back = {v: k for k, v in fwd.items()}
        hyps = [u.with_(members=tuple(back[m] for m in u.members if m in back))
                for t in tiers for u in t if u.kind == "joint" and u.scale_invariant]
        try:
            tiers.append(_rename(functional_units(model, probe, granularity=granularity, hypotheses=hyps), fwd))
        except Exception as exc:  # e.g. a TorchScript module functional_call cannot drive, a probe of the wrong shape
            from ..errors import ModelError

            raise ModelError(f"the functional check could not run the model on the probe ({type(exc).__name__}: "
                             f"{str(exc)[:160]})", hint="check --probe matches the model input, or drop --probe "
                             "to use the graph and name tiers") from exc
    if units_file is not None:
        from .userfile import load_units_file

        tiers.append(load_units_file(units_file, params))
    units_ = _combine(tiers, params)
    if granularity == "tensor":
        units_ = [u.with_(kind="tensor") if u.kind in ("channel", "group") else u for u in units_]
    return [u for u in units_ if any(m in params for m in u.members)]

