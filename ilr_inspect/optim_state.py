"""Map a saved torch optimizer ``state_dict`` to per-parameter hyperparameters (formats.md §2.3).

A torch optimizer state dict refers to parameters by integer IDs assigned in construction order; names are saved
only when the optimizer was built from ``named_parameters()`` (``param_names``) or by DCP/FQN-keyed helpers
(``params`` holding strings). Without names we replay the common construction recipes and keep only the
candidates whose group sizes (and momentum / Adam-moment shapes) fit; anything else is refused, never guessed.
Works on any objects with a ``.shape`` (torch tensors, meta tensors, NumPy arrays); imports no framework.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import HParams, WdMode
from .errors import HParamsError

Shape = tuple[int, ...]

# State entries shaped like their parameter, per optimizer family (others, e.g. factored moments, are skipped).
_SHAPED_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "exp_inf",
                 "acc_delta", "grad_avg", "ax", "prev")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# HF Trainer's no-decay name patterns (transformers Trainer.get_decay_parameter_names) plus the names of common
# nn.LayerNorm attributes that the Trainer excludes by type (GPT-2 ``ln_1``/``ln_f``, T5/ViT ``*_norm``, ``norm1``).
_HF_NO_DECAY = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)",
                                          r"(?:^|\.)ln_?[a-z0-9]*\.", r"(?:^|\.)norm\d*\.", r"layer_norm")]
_HINT = ("pass the hyperparameters explicitly (--lr/--wd/--momentum/--optimizer), or save the optimizer from "
         "model.named_parameters() so the names are stored with it")


def optimizer_family(group: Mapping[str, Any]) -> tuple[str, WdMode | None]:
    """Name the optimizer family from the keys torch stores in a param group, and how it applies weight decay."""
    keys = set(group)
    if "betas" in keys:
        decoupled = group.get("decoupled_weight_decay")
        if "momentum_decay" in keys:
            return ("NAdamW" if decoupled else "NAdam"), ("decoupled" if decoupled else "coupled")
        if "amsgrad" in keys:
            if decoupled is None:  # torch < 2.5 saved no flag: Adam and AdamW look identical
                return "Adam or AdamW (cannot tell)", None
            return ("AdamW" if decoupled else "Adam"), ("decoupled" if decoupled else "coupled")
        if "decoupled_weight_decay" in keys:
            return ("RAdamW" if decoupled else "RAdam"), ("decoupled" if decoupled else "coupled")
        if "eps" not in keys:  # lion-pytorch: lr, betas, weight_decay; decay scaled by lr
            return "Lion", "decoupled"
        return "Adamax", "coupled"
    if {"momentum", "dampening", "nesterov"} <= keys:
        return "SGD", "coupled"
    if {"alpha", "centered"} <= keys:
        return "RMSprop", "coupled"
    if "lr_decay" in keys:
        return "Adagrad", "coupled"
    if "rho" in keys:
        return "Adadelta", "coupled"
    return "unknown", None


def _float(v: Any) -> float | None:
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def group_hparams(group: Mapping[str, Any], source: str) -> HParams:
    """The hyperparameters one param group applies to each of its parameters."""
    family, wd_mode = optimizer_family(group)
    betas = group.get("betas")
    momentum = _float(group.get("momentum"))
    beta2 = None
    if isinstance(betas, (tuple, list)) and len(betas) >= 2:
        momentum, beta2 = _float(betas[0]), _float(betas[1])
    return HParams(
        lr=_float(group.get("lr")),
        weight_decay=_float(group.get("weight_decay", 0.0)),
        momentum=momentum,
        beta2=beta2,
        optimizer=family,
        wd_mode=wd_mode,
        source=source,
        lr_timing="next",
        nesterov=bool(group.get("nesterov", False)),
        dampening=_float(group.get("dampening")) or 0.0,
        eps=_float(group.get("eps")),
    )


def _state_shapes(state: Mapping[Any, Any], pid: Any) -> list[Shape]:
    entry = state.get(pid)
    if not isinstance(entry, Mapping):
        return []
    out = []
    for key in _SHAPED_STATE:
        v = entry.get(key)
        if v is not None and hasattr(v, "shape"):
            out.append(tuple(int(d) for d in v.shape))
    return out


def _resolve(saved: str, names: Sequence[str]) -> str | None:
    """Match a saved parameter name to a checkpoint name despite wrapper or attribute prefixes."""
    if saved in names:
        return saved
    bare = saved
    stripped = True
    while stripped:
        stripped = False
        for p in _WRAPPER_PREFIXES:
            if bare.startswith(p):
                bare, stripped = bare[len(p):], True
    if bare in names:
        return bare
    hits = [n for n in names if n.endswith("." + bare)]
    return hits[0] if len(hits) == 1 else None


def _named_mapping(
    groups: Sequence[Mapping[str, Any]], names: Sequence[str], key: str
) -> tuple[list[list[str]], list[str]]:
    out: list[list[str]] = []
    missing: list[str] = []
    for g in groups:
        resolved = []
        for saved in g[key]:
            r = _resolve(str(saved), names)
            if r is None:
                missing.append(str(saved))
            else:
                resolved.append(r)
        out.append(resolved)
    return out, missing


def _hf_decays(name: str) -> bool:
    low = name.lower()
    return not any(p.search(low) for p in _HF_NO_DECAY)


Recipe = Callable[[list[str], Mapping[str, Shape], int], list[list[str]] | None]


def _order(scope: list[str], shapes: Mapping[str, Shape], n: int, sizes: Sequence[int] = ()) -> list[list[str]] | None:
    if sum(sizes) != len(scope):
        return None
    out, i = [], 0
    for s in sizes:
        out.append(scope[i:i + s])
        i += s
    return out


def _hf(scope: list[str], shapes: Mapping[str, Shape], n: int) -> list[list[str]] | None:
    if n != 2:
        return None
    return [[p for p in scope if _hf_decays(p)], [p for p in scope if not _hf_decays(p)]]


def _ndim_decay_first(scope: list[str], shapes: Mapping[str, Shape], n: int) -> list[list[str]] | None:
    if n != 2:
        return None
    return [[p for p in scope if len(shapes[p]) > 1], [p for p in scope if len(shapes[p]) <= 1]]


def _ndim_timm(scope: list[str], shapes: Mapping[str, Shape], n: int) -> list[list[str]] | None:
    # timm param_groups_weight_decay: no-decay (ndim <= 1 or *.bias) first, then decay.
    if n != 2:
        return None
    nd = [p for p in scope if len(shapes[p]) <= 1 or p.endswith(".bias")]
    return [nd, [p for p in scope if p not in set(nd)]]


def _scopes(names: list[str]) -> list[tuple[str, list[str]]]:
    """All trainable parameters, then each top-level attribute (Lightning ``model.``, GAN ``generator.``)."""
    out = [("all parameters", names)]
    tops: dict[str, list[str]] = {}
    for n in names:
        tops.setdefault(n.split(".", 1)[0], []).append(n)
    if len(tops) > 1:
        out += [(f"parameters under '{t}.'", sub) for t, sub in tops.items() if sub != names]
    return out


def hparams_from_optimizer_state(
    opt_sd: Mapping[str, Any],
    param_names: list[str],
    shapes: Mapping[str, Shape],
    *,
    source: str,
    recipe: str = "auto",
    names_ordered: bool = True,
    path: Path | None = None,
) -> dict[str, HParams]:
    """Per-parameter hyperparameters from an optimizer state dict.

    ``param_names`` are the checkpoint's trainable parameters in state-dict order (the order
    ``named_parameters()`` yields them). ``names_ordered=False`` says that order is unknown (safetensors sort
    their keys): group membership is then only accepted from name-based recipes and validated by the multiset
    of state shapes. ``recipe`` is ``auto`` or one of ``names``, ``order``, ``hf``, ``ndim``, ``timm``.
    """
    groups = opt_sd.get("param_groups")
    state = opt_sd.get("state") or {}
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) and "params" in g for g in groups):
        raise HParamsError(f"{source}: no param_groups with params in the optimizer state", hint=_HINT, path=path)
    sizes = [len(g["params"]) for g in groups]
    per_group = [group_hparams(g, source) for g in groups]

    def build(assign: list[list[str]]) -> dict[str, HParams]:
        got = {n: per_group[gi] for gi, members in enumerate(assign) for n in members}
        return {n: got[n] for n in param_names if n in got}

    def fits(assign: list[list[str]], ordered: bool) -> str | None:
        """None when ``assign`` agrees with the saved state, else why not."""
        for gi, members in enumerate(assign):
            if len(members) != sizes[gi]:
                return f"group {gi} holds {sizes[gi]} parameters, the recipe gives {len(members)}"
            pids = groups[gi]["params"]
            if ordered:
                for name, pid in zip(members, pids, strict=True):
                    bad = [s for s in _state_shapes(state, pid) if s != shapes[name]]
                    if bad:
                        return (f"state of group {gi} entry {pid} has shape {bad[0]}, "
                                f"parameter {name} has {shapes[name]}")
            else:
                have = Counter(shapes[m] for m in members)
                for pid in pids:
                    st = _state_shapes(state, pid)
                    if st and have[st[0]] == 0:
                        return f"group {gi} has state of shape {st[0]} that none of its recipe parameters has"
                    if st:
                        have[st[0]] -= 1
        return None

    # 1. Names saved with the optimizer: the only robust mapping.
    for key, kind in (("param_names", "saved param_names"), ("params", "FQN params")):
        if recipe in ("auto", "names") and groups and all(
            key in g and all(isinstance(x, str) for x in g[key]) for g in groups
        ):
            assign, missing = _named_mapping(groups, param_names, key)
            if missing:
                raise HParamsError(
                    f"{source}: {kind} name parameters the checkpoint lacks: {', '.join(missing[:5])}",
                    hint=_HINT, path=path,
                )
            why = fits(assign, True)
            if why:
                raise HParamsError(f"{source}: {kind} disagree with the optimizer state ({why})", hint=_HINT, path=path)
            return build(assign)

    # 2. Replay construction recipes and keep those the saved sizes and shapes accept.
    recipes: list[tuple[str, Recipe]] = []
    if names_ordered or len(groups) == 1:
        recipes.append(("order", lambda s, sh, n: _order(s, sh, n, sizes)))
    recipes += [("hf", _hf), ("ndim", _ndim_decay_first), ("timm", _ndim_timm)]
    recipes = [(r, f) for r, f in recipes if recipe in ("auto", r)]
    valid: dict[tuple[tuple[str, ...], ...], str] = {}
    tried: list[str] = []
    for scope_label, scope in _scopes(param_names):
        for rname, fn in recipes:
            cand = fn(scope, shapes, len(groups))
            if cand is None:
                tried.append(f"{rname} over {scope_label}: does not apply to {len(groups)} groups of sizes {sizes} "
                             f"and {len(scope)} parameters")
                continue
            why = fits(cand, names_ordered)
            if why is None and rname in ("hf", "ndim", "timm"):
                nd = 1 if rname != "timm" else 0
                wd = _float(groups[nd].get("weight_decay", 0.0))
                if wd not in (0.0, None):
                    why = f"its no-decay group {nd} has weight_decay {wd}"
            tried.append(f"{rname} over {scope_label}: {why or 'fits'}")
            if why is None:
                valid.setdefault(tuple(tuple(sorted(m)) for m in cand), f"{rname} over {scope_label}")
    built = [build([list(m) for m in assign_t]) for assign_t in valid]
    if built and all(b == built[0] for b in built[1:]):
        return built[0]  # one fit, or several that give every parameter the same hyperparameters
    detail = "; ".join(tried[:8]) + (f"; … {len(tried) - 8} more" if len(tried) > 8 else "")
    if not valid:
        raise HParamsError(
            f"{source}: cannot tell which parameters belong to which optimizer group "
            f"({len(groups)} groups of sizes {sizes}, {len(param_names)} trainable parameters; tried {detail})",
            hint=_HINT, path=path,
        )
    raise HParamsError(
        f"{source}: optimizer groups are ambiguous — several construction recipes fit: {', '.join(valid.values())}",
        hint=_HINT, path=path,
    )
