"""Map a saved torch optimizer ``state_dict`` to per-parameter hyperparameters (docs/formats.md).

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
from dataclasses import dataclass, field, replace
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


@dataclass(frozen=True)
class GroupMapping:
    """Which saved optimizer entries belong to which parameters, as far as the files decide it.

    ``hparams`` holds every parameter with at least one determined field (fields the files leave open are None);
    ``pid_names`` every saved parameter id whose parameter is determined; ``undetermined`` the held parameters whose
    candidate groups disagree on some field (name → candidate groups); ``note`` says what is ambiguous and which
    flag resolves it (None when everything is determined).
    """

    hparams: dict[str, HParams]
    pid_names: dict[Any, str]
    undetermined: dict[str, list[int]] = field(default_factory=dict)
    method: str = ""
    note: str | None = None


def _differing(per_group: Sequence[HParams], gis: Sequence[int]) -> list[str]:
    return [f for f in ("lr", "weight_decay", "momentum", "beta2", "optimizer")
            if len({getattr(per_group[g], f) for g in gis}) > 1]


_FLAGS = {"lr": "--lr", "weight_decay": "--wd", "momentum": "--momentum", "beta2": "--momentum",
          "optimizer": "--optimizer"}


def _shape_solve(
    groups: Sequence[Mapping[str, Any]], state: Mapping[Any, Any], scope: Sequence[str], shapes: Mapping[str, Shape]
) -> tuple[dict[str, list[int]], dict[Any, str]] | str:
    """Every group each parameter can sit in, over all assignments the saved state shapes allow.

    Sound without any construction assumption: a group holding ``c`` entries whose momentum/moment state has
    shape ``s`` holds exactly ``c`` parameters of shape ``s``; entries without shaped state (no step taken, SGD
    without momentum) can hold any leftover parameter. Returns (name → candidate groups, determined pid → name),
    or why no assignment fits.
    """
    counts: list[Counter[Shape]] = []
    wild: list[int] = []
    pid_shape: dict[Any, tuple[int, Shape]] = {}
    for gi, g in enumerate(groups):
        c: Counter[Shape] = Counter()
        w = 0
        for pid in g["params"]:
            st = _state_shapes(state, pid)
            if st:
                c[st[0]] += 1
                pid_shape[pid] = (gi, st[0])
            else:
                w += 1
        counts.append(c)
        wild.append(w)
    have = Counter(shapes[n] for n in scope)
    left: dict[Shape, int] = {}
    for s in set(have) | {s for c in counts for s in c}:
        used = sum(c[s] for c in counts)
        if used > have[s]:
            return f"the state holds {used} entries of shape {s}, the parameters {have[s]}"
        left[s] = have[s] - used
    if sum(left.values()) != sum(wild):
        return (f"{sum(left.values())} parameters have no matching state entry but {sum(wild)} entries lack shaped "
                "state")
    cand = {n: sorted({gi for gi, c in enumerate(counts) if c[shapes[n]]}
                      | ({gi for gi, w in enumerate(wild) if w} if left[shapes[n]] else set())) for n in scope}
    pid_names: dict[Any, str] = {}
    for pid, (gi, s) in pid_shape.items():
        fits_here = [n for n in scope if shapes[n] == s and gi in cand[n]]
        if len(fits_here) == 1:
            pid_names[pid] = fits_here[0]
    return cand, pid_names


def map_optimizer_groups(
    opt_sd: Mapping[str, Any],
    param_names: list[str],
    shapes: Mapping[str, Shape],
    *,
    source: str = "optimizer",
    recipe: str = "auto",
    names_ordered: bool = True,
    path: Path | None = None,
) -> GroupMapping:
    """Map saved optimizer groups to parameters: saved names, else a replayed construction recipe, else shapes.

    ``param_names`` are the checkpoint's trainable parameters in state-dict order (the order
    ``named_parameters()`` yields them). ``names_ordered=False`` says that order is unknown (safetensors sort
    their keys): group membership is then only accepted from name-based recipes and validated by the multiset
    of state shapes. ``recipe`` is ``auto`` or one of ``names``, ``order``, ``hf``, ``ndim``, ``timm``,
    ``shapes``. Raises HParamsError when no parameter's hyperparameters are determined.
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

    def pids_of(assign: list[list[str]], ordered: bool) -> dict[Any, str]:
        if not ordered:
            return {}
        return {pid: n for gi, members in enumerate(assign) for n, pid in zip(members, groups[gi]["params"],
                                                                              strict=True)}

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
            return GroupMapping(build(assign), pids_of(assign, True), method=kind)

    # 2. Replay construction recipes and keep those the saved sizes and shapes accept.
    recipes: list[tuple[str, Recipe]] = []
    if names_ordered or len(groups) == 1:
        recipes.append(("order", lambda s, sh, n: _order(s, sh, n, sizes)))
    recipes += [("hf", _hf), ("ndim", _ndim_decay_first), ("timm", _ndim_timm)]
    recipes = [(r, f) for r, f in recipes if recipe in ("auto", r)]
    valid: dict[tuple[tuple[str, ...], ...], tuple[str, list[list[str]]]] = {}
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
                valid.setdefault(tuple(tuple(sorted(m)) for m in cand), (f"{rname} over {scope_label}", cand))
    built = [build([list(m) for m in assign_t]) for assign_t in valid]
    if built and all(b == built[0] for b in built[1:]):
        # One fit, or several that give every parameter the same hyperparameters.
        maps = [pids_of(c, names_ordered) for _, c in valid.values()]
        agreed = {pid: n for pid, n in maps[0].items() if all(m.get(pid) == n for m in maps[1:])}
        return GroupMapping(built[0], agreed, method=", ".join(label for label, _ in valid.values()))

    # 3. No single recipe decides it: keep what every assignment consistent with the state shapes agrees on.
    solved: list[tuple[str, dict[str, list[int]], dict[Any, str]]] = []
    if recipe in ("auto", "shapes"):
        for scope_label, scope in _scopes(param_names):
            if len(scope) != sum(sizes):
                continue
            got = _shape_solve(groups, state, scope, shapes)
            if isinstance(got, str):
                tried.append(f"state shapes over {scope_label}: {got}")
            else:
                solved.append((scope_label, *got))
    detail = "; ".join(tried[:8]) + (f"; … {len(tried) - 8} more" if len(tried) > 8 else "")
    if len(solved) != 1:
        if not valid:
            raise HParamsError(
                f"{source}: cannot tell which parameters belong to which optimizer group "
                f"({len(groups)} groups of sizes {sizes}, {len(param_names)} trainable parameters; tried {detail})",
                hint=_HINT, path=path,
            )
        raise HParamsError(
            f"{source}: optimizer groups are ambiguous — several construction recipes fit: "
            + ", ".join(label for label, _ in valid.values()),
            hint=_HINT, path=path,
        )
    scope_label, where, pid_names = solved[0]
    hp: dict[str, HParams] = {}
    undetermined: dict[str, list[int]] = {}
    for n in param_names:
        gis = where.get(n)
        if not gis:
            continue
        diff = _differing(per_group, gis)
        if diff:
            undetermined[n] = gis
        # Each field every candidate group agrees on is known; the others stay empty (never one group's guess).
        blank: dict[str, Any] = dict.fromkeys(diff)
        known = replace(per_group[gis[0]], **blank)
        if any(getattr(known, f) is not None for f in ("lr", "weight_decay", "momentum")):
            hp[n] = known
    if not hp:
        raise HParamsError(
            f"{source}: optimizer groups are ambiguous — no parameter's group is decided by the saved state shapes "
            f"({len(groups)} groups of sizes {sizes}; tried {detail})",
            hint=_HINT, path=path,
        )
    note = _ambiguity_note(per_group, undetermined, shapes, len(where) - len(undetermined)) if undetermined else None
    return GroupMapping(hp, pid_names, undetermined, method=f"state shapes over {scope_label}", note=note)


def _ambiguity_note(per_group: Sequence[HParams], undetermined: Mapping[str, list[int]],
                    shapes: Mapping[str, Shape], n_known: int) -> str:
    """What the state shapes leave open: per class, the parameters, their candidate groups and the fields that
    differ between those groups, and the flags that set those fields."""
    classes: dict[tuple[Shape, tuple[int, ...]], list[str]] = {}
    for n, gis in undetermined.items():
        classes.setdefault((shapes[n], tuple(gis)), []).append(n)
    parts = []
    fields: set[str] = set()
    for (shape, gtuple), names in classes.items():
        gis = list(gtuple)
        diff = _differing(per_group, gis)
        fields.update(diff)
        groups_txt = ", ".join(
            f"{g} (" + ", ".join(f"{f} {getattr(per_group[g], f)}" for f in diff) + ")" for g in gis)
        shown = ", ".join(names[:4]) + (f", … {len(names) - 4} more" if len(names) > 4 else "")
        parts.append(f"{shown} (shape {list(shape)}) could each be in group {groups_txt}")
    flags = sorted({_FLAGS[f] for f in fields})
    return (f"optimizer groups decided by the saved state shapes for {n_known} parameters; for "
            f"{len(undetermined)} the shapes leave {'/'.join(sorted(fields))} open (other fields are known): "
            + "; ".join(parts)
            + f". Resolve with {'/'.join(flags)} (sets every parameter), or save the optimizer built from "
            "model.named_parameters() so torch stores param_names")


def resolve_param_ids(
    opt_sd: Mapping[str, Any],
    param_names: list[str],
    shapes: Mapping[str, Shape],
    *,
    recipe: str = "auto",
    names_ordered: bool = True,
    path: Path | None = None,
) -> dict[Any, str]:
    """Saved optimizer parameter id → parameter name, only where the files determine it (see map_optimizer_groups).

    Raises HParamsError when nothing about the groups can be determined.
    """
    return map_optimizer_groups(opt_sd, param_names, shapes, recipe=recipe, names_ordered=names_ordered,
                                path=path).pid_names


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
    """Per-parameter hyperparameters from an optimizer state dict: the determined part of map_optimizer_groups."""
    return map_optimizer_groups(opt_sd, param_names, shapes, source=source, recipe=recipe,
                                names_ordered=names_ordered, path=path).hparams
