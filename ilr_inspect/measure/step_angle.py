"""The last update of each unit, reconstructed from the saved optimizer state (docs/step-angle.md).

A checkpoint that holds the optimizer state holds the last update too: for SGD with momentum
w_{t−1} = w_t + η_t·v_t, for Adam/AdamW w_{t−1} = (w_t + η_t·m̂_t/(√v̂_t + ε)) / (1 − η_t·λ) with the bias
corrections of the stored step, and so on. The angle between w_{t−1} and w_t is the per-step angular update the
equilibrium theory predicts — measured at one checkpoint, not inferred from the gap between two.

Readers attach a loader (``Checkpoint.optimizer_state``) that turns the saved state into :class:`SavedOptimizerState`
only when called; nothing is read at open time and no framework is imported here.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..checkpoint import Checkpoint, HParams, TensorInfo
from ..errors import IlrError
from ..invariance.unit import Unit
from . import theory

Source = Literal["exact", "estimate", "unavailable"]
_RANK: dict[str, int] = {"exact": 0, "estimate": 1, "unavailable": 2}
LR_RTOL = 1e-9  # two stored learning rates closer than this are the same value

# Rules whose algebra is closed given the state; the others need the (unsaved) gradient of the last step.
EXACT_RULES = frozenset({"sgd", "adam", "keras-sgd", "keras-adam", "optax-trace", "optax-adam"})
ESTIMATE_RULES = frozenset({"sgd-nesterov", "lion", "keras-sgd-nesterov", "optax-trace-nesterov"})


@dataclass
class ParamState:
    """The saved optimizer state of one parameter, with the hyperparameters of its group.

    ``rule`` names the update algebra (``sgd``, ``sgd-nesterov``, ``adam``, ``lion``, ``keras-sgd``, ``keras-adam``,
    ``optax-trace``, ``optax-adam``) or is ``none`` with ``why`` saying what is missing. ``lr_timing`` is ``next``
    when the stored lr is the one the next update will use (torch param groups after ``scheduler.step()``).
    """

    rule: str
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)
    lr: float | None = None
    lr_timing: Literal["next", "used"] = "next"
    weight_decay: float = 0.0
    decoupled: bool = False  # weight decay applied to w outside the moments: w ← w·(1 − lr·wd) before the update
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    eps_root: float = 0.0
    amsgrad: bool = False
    step: float | None = None
    group: int = 0
    initial_lr: float | None = None  # set by a torch LR scheduler on its group
    why: str = ""
    note: str = ""


@dataclass
class SavedOptimizerState:
    """What a loader returns: per parameter name, its state; plus the LR scheduler state where one was saved."""

    framework: str
    params: dict[str, ParamState]
    scheduler: Mapping[str, Any] | None = None
    note: str = ""


OptimizerStateLoader = Callable[[], SavedOptimizerState]


@dataclass(frozen=True)
class StepAngle:
    """One unit's reconstructed last-step angle at one checkpoint."""

    angle: float
    source: Source
    lr_used: float | None
    note: str


# -- readers' side: build a loader ----------------------------------------------------------------------------


def _np(x: Any) -> np.ndarray:
    """A float NumPy view of a torch tensor / NumPy array / JAX array (bfloat16 widened), without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach()
        if str(getattr(x, "dtype", "")) in ("torch.bfloat16", "torch.float16") or getattr(x, "is_floating_point",
                                                                                         lambda: True)() is False:
            x = x.float()
        return np.asarray(x.cpu().numpy())
    arr = np.asarray(x)
    return arr if arr.dtype.kind == "f" else arr.astype(np.float64)


def _scalar(x: Any, default: float | None = None) -> float | None:
    if x is None:
        return default
    try:
        return float(np.asarray(_np(x) if hasattr(x, "detach") else x).reshape(-1)[0])
    except (TypeError, ValueError, IndexError):
        return default


class _LazyArrays(Mapping[str, np.ndarray]):
    """Optimizer buffers turned into NumPy only when read: a lazily loaded state (memory-mapped, or ranged reads
    of a URL) then reads a buffer's bytes only for the parameters whose last update is reconstructed, one at a
    time, instead of the whole optimizer state up front."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self._raw = dict(raw)

    def __getitem__(self, key: str) -> np.ndarray:
        return _np(self._raw[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


def torch_state(opt_sd: Mapping[str, Any], param_names: list[str], shapes: Mapping[str, tuple[int, ...]], *,
                scheduler: Mapping[str, Any] | None = None, names_ordered: bool = True,
                path: Path | None = None) -> SavedOptimizerState:
    """A torch ``optimizer.state_dict()`` as per-parameter states (mapped to names by optim_state)."""
    from ..errors import HParamsError
    from ..optim_state import optimizer_family, resolve_param_ids

    groups = opt_sd.get("param_groups")
    state = opt_sd.get("state") or {}
    if not isinstance(groups, list):
        return SavedOptimizerState("torch", {}, scheduler, "no param_groups in the optimizer state")
    try:
        pid_names = resolve_param_ids(opt_sd, param_names, shapes, names_ordered=names_ordered, path=path)
    except HParamsError as exc:
        return SavedOptimizerState("torch", {}, scheduler, f"optimizer state not mapped to parameters: {exc.message}")
    out: dict[str, ParamState] = {}
    for gi, g in enumerate(groups):
        if not isinstance(g, Mapping):
            continue
        family, wd_mode = optimizer_family(g)
        lr = _scalar(g.get("lr"))
        wd = _scalar(g.get("weight_decay"), 0.0) or 0.0
        init = _scalar(g.get("initial_lr"))
        betas = g.get("betas")
        for pid in g.get("params", []):
            name = pid_names.get(pid)
            if name is None:
                continue
            st = state.get(pid)
            st = st if isinstance(st, Mapping) else {}
            base = ParamState("none", lr=lr, weight_decay=wd, group=gi, initial_lr=init)
            if family == "SGD":
                mom = _scalar(g.get("momentum"), 0.0) or 0.0
                buf = st.get("momentum_buffer")
                if mom == 0.0:
                    base.why = ("plain SGD keeps no state: its last update was lr·(gradient + wd·w) and the gradient "
                                "is not saved")
                elif buf is None:
                    base.why = "no momentum buffer saved (no step taken yet)"
                else:
                    base = replace(base, rule="sgd-nesterov" if g.get("nesterov") else "sgd",
                                   arrays=_LazyArrays({"buf": buf}), momentum=mom)
            elif family in ("Adam", "AdamW", "Adam or AdamW (cannot tell)"):
                m, v = st.get("exp_avg"), st.get("exp_avg_sq")
                ams = bool(g.get("amsgrad"))
                if ams:
                    v = st.get("max_exp_avg_sq")
                if m is None or v is None or st.get("step") is None:
                    base.why = "no Adam moments saved (no step taken yet)"
                else:
                    b1, b2 = (float(_scalar(betas[0]) or 0.9), float(_scalar(betas[1]) or 0.999)) \
                        if isinstance(betas, (list, tuple)) else (0.9, 0.999)
                    base = replace(base, rule="adam", arrays=_LazyArrays({"m": m, "v": v}), beta1=b1, beta2=b2,
                                   eps=_scalar(g.get("eps"), 1e-8) or 0.0, amsgrad=ams,
                                   step=_scalar(st.get("step")), decoupled=wd_mode != "coupled")
                    if wd_mode is None and wd:
                        base.note = "Adam vs AdamW undecidable from the saved state: decoupled weight decay assumed"
            elif family == "Lion":
                m = st.get("exp_avg")
                if m is None:
                    base.why = "no Lion momentum saved"
                else:
                    b1 = float(_scalar(betas[0]) or 0.9) if isinstance(betas, (list, tuple)) else 0.9
                    base = replace(base, rule="lion", arrays=_LazyArrays({"m": m}), beta1=b1, decoupled=True)
            else:
                base.why = (f"{family}: the last update needs the gradient of that step, which the state does not "
                            "hold")
            out[name] = base
    held = sum(len(g.get("params", [])) for g in groups if isinstance(g, Mapping))
    note = "" if len(out) >= held else (
        f"only {len(out)} of {held} optimizer entries could be matched to their parameters (the weights file does "
        "not keep the parameter order, and several parameters share a shape); save the optimizer built from "
        "model.named_parameters() so the names are stored")
    return SavedOptimizerState("torch", out, scheduler, note)


def torch_loader(opt_sd: Mapping[str, Any], infos: Sequence[TensorInfo], *,
                 scheduler: Mapping[str, Any] | None = None, names_ordered: bool = True,
                 path: Path | None = None) -> OptimizerStateLoader:
    """A loader over an already (memory-mapped) loaded torch optimizer state dict; converts only when called."""
    params = [i.name for i in infos if i.kind == "parameter"]
    shapes = {i.name: i.shape for i in infos}

    def load() -> SavedOptimizerState:
        return torch_state(opt_sd, params, shapes, scheduler=scheduler, names_ordered=names_ordered, path=path)

    return load


def torch_loaders(opt_sds: Sequence[Any], infos: Sequence[TensorInfo], *,
                  schedulers: Sequence[Any] = (), names_ordered: bool = True,
                  path: Path | None = None) -> OptimizerStateLoader | None:
    """One loader over several optimizers (Lightning ``optimizer_states``), each with its scheduler when saved;
    None when no entry is a torch optimizer state dict."""
    found = [(o, schedulers[i] if i < len(schedulers) and isinstance(schedulers[i], Mapping) else None)
             for i, o in enumerate(opt_sds) if isinstance(o, Mapping) and "param_groups" in o]
    if not found:
        return None
    params = [i.name for i in infos if i.kind == "parameter"]
    shapes = {i.name: i.shape for i in infos}

    def load() -> SavedOptimizerState:
        parts = [torch_state(o, params, shapes, scheduler=sch, names_ordered=names_ordered, path=path)
                 for o, sch in found]
        if len(parts) == 1:
            return parts[0]
        merged: dict[str, ParamState] = {}
        for i, part in enumerate(parts):  # several optimizers: each keeps its own scheduler via group ids
            for n, ps in part.params.items():
                merged.setdefault(n, replace(ps, group=1000 * i + ps.group))
        notes = "; ".join(p.note for p in parts if p.note)
        return SavedOptimizerState("torch", merged, None, notes)

    return load


_SCHED_KEYS = ("lr_scheduler", "scheduler", "lr_scheduler_state_dict", "scheduler_state_dict")


def torch_object_loader(obj: Any, optim_key: str | None, infos: Sequence[TensorInfo], *,
                        path: Path | None = None) -> OptimizerStateLoader | None:
    """The loader for a training checkpoint dict saved with ``torch.save`` (``optimizer`` + ``lr_scheduler``)."""
    if optim_key is None or not isinstance(obj, Mapping):
        return None
    sched = next((obj[k] for k in _SCHED_KEYS if isinstance(obj.get(k), Mapping)), None)
    return torch_loaders([obj.get(optim_key)], infos, schedulers=[sched], path=path)


def torch_lightning_loader(obj: Any, infos: Sequence[TensorInfo], *,
                           path: Path | None = None) -> OptimizerStateLoader | None:
    """The loader for a Lightning ``.ckpt``: ``optimizer_states`` with ``lr_schedulers`` in the same order."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("optimizer_states"), list):
        return None
    scheds = obj.get("lr_schedulers")
    return torch_loaders(obj["optimizer_states"], infos, schedulers=scheds if isinstance(scheds, list) else [],
                         path=path)


def torch_file_loader(optimizer_file: Path, infos: Sequence[TensorInfo], *, scheduler_file: Path | None = None,
                      names_ordered: bool = True, trust: bool = False,
                      loaded: Any = None) -> OptimizerStateLoader | None:
    """The loader for an optimizer saved in its own file (HF ``optimizer.pt``, Accelerate ``optimizer.bin``):
    the file is opened only when the loader is called, by the torch-free lazy reader (memory-mapped locally,
    ranged reads for a URL; nothing imported or run unless trusted), or ``loaded`` is the state dict already
    opened that way. A tensor's bytes are read only when its parameter's last update is reconstructed."""
    if not optimizer_file.is_file():
        return None
    params = [i.name for i in infos if i.kind == "parameter"]
    shapes = {i.name: i.shape for i in infos}

    def load() -> SavedOptimizerState:
        from ..formats import _torchutil as tu

        osd = loaded if loaded is not None else tu.load_file(optimizer_file, trust=trust, what="optimizer state")
        sched = None
        if scheduler_file is not None and scheduler_file.is_file():
            s = tu.load_file(scheduler_file, trust=False, what="scheduler state")
            sched = s if isinstance(s, Mapping) else None
        if not isinstance(osd, Mapping):
            return SavedOptimizerState("torch", {}, None, f"{optimizer_file.name} is not an optimizer state dict")
        return torch_state(osd, params, shapes, scheduler=sched, names_ordered=names_ordered, path=optimizer_file)

    return load


def keras_h5_loader(h5: Any, infos: Sequence[TensorInfo], hp: HParams | None) -> OptimizerStateLoader | None:
    """The loader for the optimizer variables of a Keras 3 weights file (``optimizer/vars``: 0 = iterations,
    1 = learning rate, then per trainable variable, in order, its slots — ``momentum`` for SGD, ``momentum`` and
    ``velocity`` for Adam/AdamW). Slots are matched to the trainable weights by position, checked by shape."""
    opt_path = "optimizer"
    while f"{opt_path}/inner_optimizer/vars" in h5:
        opt_path += "/inner_optimizer"
    group = h5.get(f"{opt_path}/vars")
    if group is None or hp is None:
        return None
    params = [i for i in infos if i.kind == "parameter"]

    def load() -> SavedOptimizerState:
        n = len(group)
        slots = [group[str(i)] for i in range(2, n)]
        if not params or len(slots) % len(params):
            return SavedOptimizerState("keras", {}, None, f"{len(slots)} optimizer slot variables do not divide "
                                                          f"evenly over {len(params)} trainable weights")
        k = len(slots) // len(params)
        name = (hp.optimizer or "").lower()
        rule = {("sgd", 1): "keras-sgd-nesterov" if hp.nesterov else "keras-sgd", ("adam", 2): "keras-adam",
                ("adamw", 2): "keras-adam"}.get((name, k), "none")
        why = "" if rule != "none" else (
            "plain SGD keeps no state: the last update needs the gradient" if k == 0 else
            f"Keras {hp.optimizer or 'optimizer'} with {k} slot(s) per weight: the update needs the gradient")
        step = float(group["0"][()]) if "0" in group else None
        out: dict[str, ParamState] = {}
        for i, info in enumerate(params):
            arrs = [np.asarray(slots[i * k + j][()]) for j in range(k)]
            if any(tuple(a.shape) != tuple(info.shape) for a in arrs):
                return SavedOptimizerState("keras", {}, None, f"optimizer slots do not line up with the weights "
                                                              f"(slot {i * k} for {info.name} has another shape)")
            named = dict(zip(("m", "v"), arrs, strict=False))
            out[info.name] = ParamState(
                rule, named if rule != "none" else {}, lr=hp.lr, lr_timing="used",
                weight_decay=hp.weight_decay or 0.0, decoupled=True, momentum=hp.momentum or 0.0,
                beta1=hp.momentum if hp.momentum is not None else 0.9,
                beta2=hp.beta2 if hp.beta2 is not None else 0.999, eps=hp.eps if hp.eps is not None else 1e-7,
                step=step, why=why)
        return SavedOptimizerState("keras", out)

    return load


_OPTAX_SLOTS = ("trace", "mu", "nu")


def optax_tree_loader(leaves: Mapping[str, Callable[[], np.ndarray]], param_names: Sequence[str],
                      hp: HParams | None) -> OptimizerStateLoader | None:
    """The loader for optax states flattened to ``…/trace/<param path>`` (``trace``: SGD momentum) and
    ``…/mu|nu/<param path>`` with a sibling ``…/count`` (``scale_by_adam``), as Flax serialization names them.
    ``hp``: hyperparameters stored by ``optax.inject_hyperparams`` (lr used by the last step), if any."""
    params = set(param_names)
    found: dict[tuple[str, str], dict[str, str]] = {}  # (transform path, param) -> slot -> leaf name
    for leaf in leaves:
        parts = leaf.split("/")
        for i, part in enumerate(parts):
            if part in _OPTAX_SLOTS and i + 1 < len(parts):
                rest = "/".join(parts[i + 1:])
                name = f"params/{rest}" if f"params/{rest}" in params else rest if rest in params else None
                if name is not None:
                    found.setdefault(("/".join(parts[:i]), name), {})[part] = leaf
                break
    if not found:
        return None

    def load() -> SavedOptimizerState:
        out: dict[str, ParamState] = {}
        for (prefix, name), slots in found.items():
            lr = hp.lr if hp is not None else None
            base = ParamState("none", lr=lr, lr_timing="used", group=0)
            if "trace" in slots:
                nesterov = bool(hp.nesterov) if hp is not None else False
                base = replace(base, rule="optax-trace-nesterov" if nesterov else "optax-trace",
                               arrays={"trace": _np(leaves[slots["trace"]]())})
            elif "mu" in slots and "nu" in slots and f"{prefix}/count" in leaves:
                decoupled = hp is not None and hp.wd_mode == "decoupled"
                base = replace(base, rule="optax-adam", arrays={"m": _np(leaves[slots["mu"]]()),
                                                                "v": _np(leaves[slots["nu"]]())},
                               step=_scalar(leaves[f"{prefix}/count"]()), decoupled=decoupled,
                               weight_decay=(hp.weight_decay or 0.0) if hp is not None and decoupled else 0.0,
                               beta1=hp.momentum if hp is not None and hp.momentum is not None else 0.9,
                               beta2=hp.beta2 if hp is not None and hp.beta2 is not None else 0.999,
                               eps=hp.eps if hp is not None and hp.eps is not None else 1e-8)
            else:
                base.why = "optax state without a trace or Adam moments for this parameter"
            out.setdefault(name, base)
        return SavedOptimizerState("optax", out)

    return load


# -- the algebra of the last update ---------------------------------------------------------------------------


def last_update(ps: ParamState, lr: float) -> tuple[np.ndarray, float]:
    """(u, s) with w_{t−1} = (w_t + u)/(1 − s): u undoes the gradient part of the last update, s the decoupled
    weight-decay shrink. ``lr`` is the learning rate that update used."""
    a = ps.arrays
    if ps.rule in ("sgd", "sgd-nesterov"):
        # torch: v_t = μ v_{t−1} + (1−d)(g + λw_{t−1}); w_t = w_{t−1} − η v_t (Nesterov: − η(g' + μ v_t) ≈ − η v_t).
        return lr * a["buf"].astype(np.float64), 0.0
    if ps.rule == "adam":
        t = float(ps.step or 0.0)
        bc1, bc2 = 1.0 - ps.beta1**t, 1.0 - ps.beta2**t
        denom = np.sqrt(a["v"].astype(np.float64)) / math.sqrt(bc2) + ps.eps
        shrink = lr * ps.weight_decay if ps.decoupled else 0.0
        return (lr / bc1) * a["m"].astype(np.float64) / denom, shrink
    if ps.rule == "lion":
        # The sign is taken of β1·m_{t−1} + (1−β1)·g, not of the stored m_t: the direction is an estimate.
        return lr * np.sign(a["m"].astype(np.float64)), lr * ps.weight_decay
    if ps.rule in ("keras-sgd", "keras-sgd-nesterov"):
        # Keras: m ← μm − ηg; w ← w + m (after w ← w − w·λη). The buffer already carries the lr.
        return -a["m"].astype(np.float64), lr * ps.weight_decay
    if ps.rule == "keras-adam":
        # Keras forms the bias corrections in float32 (1 − β2^t loses ~4 digits at small t): reproduce that.
        t32, one = np.float32(ps.step or 0.0), np.float32(1.0)
        bc1 = float(one - np.float32(ps.beta1) ** t32)
        bc2 = float(one - np.float32(ps.beta2) ** t32)
        alpha = lr * math.sqrt(bc2) / bc1
        return alpha * a["m"].astype(np.float64) / (np.sqrt(a["v"].astype(np.float64)) + ps.eps), \
            lr * ps.weight_decay
    if ps.rule in ("optax-trace", "optax-trace-nesterov"):
        return lr * a["trace"].astype(np.float64), lr * ps.weight_decay if ps.decoupled else 0.0
    if ps.rule == "optax-adam":
        t32, one = np.float32(ps.step or 0.0), np.float32(1.0)  # optax, too, corrects in the moments' float32
        mhat = a["m"].astype(np.float64) / float(one - np.float32(ps.beta1) ** t32)
        vhat = a["v"].astype(np.float64) / float(one - np.float32(ps.beta2) ** t32)
        return lr * mhat / (np.sqrt(vhat + ps.eps_root) + ps.eps), lr * ps.weight_decay if ps.decoupled else 0.0
    raise ValueError(f"no update algebra for rule {ps.rule!r}")


def block_angles(pairs: Sequence[tuple[np.ndarray, np.ndarray]], blocks: int) -> np.ndarray:
    """Angle per block between a = w_{t−1} and b = w_t, given (b, d = a − b) per member, reshaped to
    (blocks, −1) and joined along the second axis. Float64 and P = ‖d‖² − (‖a‖ − ‖b‖)², so tiny angles keep
    their digits (the difference d is known directly, not as a − b of two rounded vectors)."""
    bb = np.zeros(blocks)
    dd = np.zeros(blocks)
    db = np.zeros(blocks)
    for b, d in pairs:
        b2, d2 = b.reshape(blocks, -1), d.reshape(blocks, -1)
        bb += np.einsum("ij,ij->i", b2, b2)
        dd += np.einsum("ij,ij->i", d2, d2)
        db += np.einsum("ij,ij->i", d2, b2)
    aa = bb + 2.0 * db + dd
    na, nb = np.sqrt(np.maximum(aa, 0.0)), np.sqrt(bb)
    with np.errstate(divide="ignore", invalid="ignore"):
        # ‖a‖ − ‖b‖ = (‖a‖² − ‖b‖²)/(‖a‖ + ‖b‖) = (2⟨d,b⟩ + ‖d‖²)/(‖a‖ + ‖b‖): no cancellation either.
        radial = (2.0 * db + dd) / (na + nb)
        p = np.maximum(dd - radial * radial, 0.0)
        q = np.clip(p / (na * nb), 0.0, 4.0)
    theta = 2.0 * np.arctan2(np.sqrt(q), np.sqrt(4.0 - q))
    return np.where((na > 0) & (nb > 0), theta, np.nan)


def _blocks_of(unit: Unit, shapes: Sequence[tuple[int, ...]]) -> int:
    """The same blocks as the angles table: one, or one per output channel / group for channel and group units."""
    if unit.kind not in ("channel", "group") or not shapes:
        return 1
    rows = [int(s[0]) if len(s) >= 1 else 1 for s in shapes]
    if len(set(rows)) != 1 or rows[0] <= 1 or (len(shapes[0]) == 1 and rows[0] > 1 << 16):
        return 1
    if unit.kind == "group" and unit.groups and rows[0] % unit.groups == 0:
        return int(unit.groups)
    return rows[0]


# -- the learning rate the last step used ---------------------------------------------------------------------


def _sched_closed_form(sched: Mapping[str, Any], gi: int, epoch: int) -> float | None:
    """The lr a torch scheduler gives at ``epoch`` for group ``gi``, for the schedulers whose state names them."""
    base_lrs = sched.get("base_lrs")
    if not isinstance(base_lrs, (list, tuple)) or gi >= len(base_lrs) or epoch < 0:
        return None
    base = float(base_lrs[gi])
    keys = set(sched)
    gamma = _scalar(sched.get("gamma"))
    if {"step_size", "gamma"} <= keys and gamma is not None:
        return base * gamma ** (epoch // int(sched["step_size"]))
    if {"milestones", "gamma"} <= keys and gamma is not None:
        ms = sched["milestones"]
        flat = sorted(m for m, c in ms.items() for _ in range(int(c))) if isinstance(ms, Mapping) \
            else sorted(int(m) for m in ms)
        return base * gamma ** bisect.bisect_right(flat, epoch)
    if {"T_max", "eta_min"} <= keys and "T_0" not in keys:
        t_max, eta_min = float(sched["T_max"]), float(sched["eta_min"])
        return eta_min + (base - eta_min) * (1 + math.cos(math.pi * epoch / t_max)) / 2
    if keys >= {"gamma"} and not keys & {"step_size", "milestones", "max_lr", "total_steps"} and gamma is not None:
        return base * gamma**epoch  # ExponentialLR
    return None


@dataclass
class _Prev:
    step: float | None = None
    lrs: dict[str, float] = field(default_factory=dict)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= LR_RTOL * max(abs(a), abs(b), 1e-300)


class Reconstructor:
    """Walks a series in step order and reconstructs each unit's last-step angle at every checkpoint.

    Keeps only the previous checkpoint's stored learning rates (to know the lr the last step used when the
    checkpoints are one step apart, or the lr was constant over the gap)."""

    def __init__(self, logs: Any = None) -> None:
        self.logs = logs
        self.hps: Mapping[str, HParams] | None = None  # the series' hyperparameters at the current checkpoint
        self.prev = _Prev()
        self._log_lr: Any = None
        self._log_tried = False

    def _logged_used_lr(self, step: float) -> float | None:
        if self.logs is None:
            return None
        if not self._log_tried:
            self._log_tried = True
            try:
                self._log_lr = self.logs.lr_series(timing="used")
            except Exception:  # logs are optional evidence; a reader problem must not stop the measurement
                self._log_lr = None
        s = self._log_lr
        if s is None or step not in s.index:
            return None
        return float(s.loc[step])

    def lr_used(self, name: str, ps: ParamState, state: SavedOptimizerState, step: float | None,
                single_group: bool) -> tuple[float | None, bool, str]:
        """(lr, exact, how) for the last update of parameter ``name``."""
        lr = ps.lr
        if lr is None:
            # Not in the state (optax without inject_hyperparams): a logged lr used at this very step is exact.
            logged = self._logged_used_lr(step) if step is not None and single_group else None
            if logged is not None:
                return logged, True, "lr logged as used at this step"
            hp = (self.hps or {}).get(name)
            if hp is None or hp.lr is None:
                return None, False, "no learning rate saved or logged"
            return hp.lr, False, f"lr from {hp.source} ({hp.lr_timing}), not logged at this step"
        if ps.lr_timing == "used":
            return lr, True, "stored lr (the one the last step used)"
        prev_lr = self.prev.lrs.get(name)
        gap = step - self.prev.step if step is not None and self.prev.step is not None else None
        if prev_lr is not None and gap == 1:
            return prev_lr, True, "lr stored at the previous checkpoint, one step earlier"
        if step is not None and single_group:
            logged = self._logged_used_lr(step)
            if logged is not None:
                return logged, True, "lr logged as used at this step"
        sched = state.scheduler
        if sched is not None and "last_epoch" in sched:
            e = int(sched["last_epoch"])
            now, before = _sched_closed_form(sched, ps.group, e), _sched_closed_form(sched, ps.group, e - 1)
            if now is not None and before is not None and now > 0 and abs(now - lr) <= 1e-6 * abs(lr):
                used = lr * before / now
                if step is not None and e == int(step):
                    return used, True, "the saved scheduler, one step back"
                if _close(before, now):
                    return lr, True, "the saved scheduler did not change the lr at its last step"
                return used, False, ("the saved scheduler steps per epoch: its previous lr assumed for the last step "
                                     "(checkpoint saved right after scheduler.step())")
        if ps.initial_lr is None and sched is None:
            return lr, True, "no lr scheduler attached: constant lr"
        if prev_lr is not None and _close(prev_lr, lr):
            return lr, True, "lr constant over the gap from the previous checkpoint"
        if prev_lr is not None and gap:
            return lr - (lr - prev_lr) / gap, False, "lr interpolated between the previous checkpoint and this one"
        return lr, False, "lr of the last step unknown: the stored (next-step) lr used"

    def checkpoint(self, ck: Checkpoint, units: Sequence[Unit], more: Sequence[Unit] = (),
                   hps: Mapping[str, HParams] | None = None) -> tuple[dict[str, StepAngle], dict[str, StepAngle]]:
        """Per unit name: its reconstructed last-step angle (or why not), for ``units`` and for ``more`` (the
        per-tensor units), reading the optimizer state once. ``hps`` supply the lr where the state has none."""
        self.hps = hps
        loader = getattr(ck, "optimizer_state", None)
        step = float(ck.step) if ck.step is not None else None

        def none(why: str) -> tuple[dict[str, StepAngle], dict[str, StepAngle]]:
            self.prev = _Prev(step)
            sa = StepAngle(math.nan, "unavailable", None, why)
            return {u.name: sa for u in units}, {u.name: sa for u in more}

        if loader is None:
            return none("no optimizer state saved")
        try:
            state: SavedOptimizerState = loader()
        except Exception as exc:  # a damaged optimizer entry leaves the weights measurable
            msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            return none(f"optimizer state not read: {msg}")
        single = len({p.group for p in state.params.values()}) <= 1
        lrs: dict[str, tuple[float | None, bool, str]] = {
            n: self.lr_used(n, ps, state, step, single) for n, ps in state.params.items() if ps.rule != "none"}
        first = {u.name: self._unit(ck, u, state, lrs) for u in units}
        second = {u.name: self._unit(ck, u, state, lrs) for u in more}
        self.prev = _Prev(step, {n: p.lr for n, p in state.params.items() if p.lr is not None})
        return first, second

    def _unit(self, ck: Checkpoint, u: Unit, state: SavedOptimizerState,
              lrs: Mapping[str, tuple[float | None, bool, str]]) -> StepAngle:
        worst: Source = "exact"
        notes: list[str] = []
        pairs: list[tuple[np.ndarray, np.ndarray]] = []
        used: list[float] = []
        shapes = [tuple(ck.tensors[m].shape) for m in u.members if m in ck.tensors]
        for m in u.members:
            ps = state.params.get(m)
            if ps is None or m not in ck.tensors:
                why = state.note or f"no optimizer state for {m}"
                return StepAngle(math.nan, "unavailable", None, why)
            if ps.rule == "none":
                return StepAngle(math.nan, "unavailable", None, ps.why)
            lr, exact, how = lrs[m]
            if lr is None:
                return StepAngle(math.nan, "unavailable", None, how)
            src: Source = "exact" if (ps.rule in EXACT_RULES and exact and not ps.note) else "estimate"
            if ps.rule in ESTIMATE_RULES:
                notes.append(f"{ps.rule}: the update needs the unsaved gradient; estimated from the buffer")
            if ps.note:
                notes.append(ps.note)
            if not exact:
                notes.append(how)
            worst = src if _RANK[src] > _RANK[worst] else worst
            w = np.asarray(ck.read(m), dtype=np.float64)
            try:  # the buffers are read here (lazily loaded state): a damaged or unreachable one spoils this unit
                upd, shrink = last_update(ps, lr)
            except (IlrError, OSError) as exc:
                return StepAngle(math.nan, "unavailable", None,
                                 f"optimizer state of {m} not read: {str(exc).splitlines()[0][:200]}")
            if upd.shape != w.shape:
                return StepAngle(math.nan, "unavailable", None,
                                 f"optimizer state of {m} has shape {upd.shape}, the weight {w.shape}")
            # d = w_{t−1} − w_t = (u + s·w_t)/(1 − s)
            pairs.append((w, (upd + shrink * w) / (1.0 - shrink)))
            used.append(lr)
        theta = block_angles(pairs, _blocks_of(u, shapes))
        ok = np.isfinite(theta)
        angle = float(np.sqrt(np.mean(theta[ok] ** 2))) if ok.any() else math.nan  # RMS over channels, as angles
        lr_note = lrs[u.members[0]][2]
        note = "; ".join(dict.fromkeys([*notes, f"lr: {lr_note}"]))
        return StepAngle(angle, worst, used[0] if used else None, note)


def predicted(hp: HParams | None, lr_used: float | None, scale_invariant: bool) -> float:
    """Equilibrium per-step angle Δ* at the lr the last step used (NaN where the theory has none)."""
    if hp is None or not scale_invariant:
        return math.nan
    if lr_used is not None:
        hp = replace(hp, lr=lr_used)
    d = theory.equilibrium_angle(theory.dynamics(hp))
    return math.nan if d is None else float(d)


def columns(sa: StepAngle | None, hp: HParams | None, scale_invariant: bool) -> dict[str, Any]:
    """The norms-table columns of one unit at one checkpoint."""
    if sa is None:
        return {"step_angle": math.nan, "step_angle_predicted": math.nan, "step_angle_ratio": math.nan,
                "step_angle_source": "unavailable", "step_angle_lr": math.nan, "step_angle_note": "not computed"}
    pred = predicted(hp, sa.lr_used, scale_invariant) if sa.source != "unavailable" else math.nan
    ratio = sa.angle / pred if math.isfinite(sa.angle) and math.isfinite(pred) and pred > 0 else math.nan
    return {"step_angle": sa.angle, "step_angle_predicted": pred, "step_angle_ratio": ratio,
            "step_angle_source": sa.source, "step_angle_lr": math.nan if sa.lr_used is None else sa.lr_used,
            "step_angle_note": sa.note}


__all__ = ["OptimizerStateLoader", "ParamState", "Reconstructor", "SavedOptimizerState", "StepAngle",
           "block_angles", "columns", "last_update", "predicted", "torch_loader", "torch_state"]
