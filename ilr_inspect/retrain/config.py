"""``ilr.toml``: how to rebuild, feed and retrain a run (reference and full example: docs/equilibrium.md).

Everything is validated before any training starts; each message names the file and the key at fault.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import InputError, UsageError

CONFIG_NAME = "ilr.toml"
OPTIMIZERS = ("sgd", "adamw")
# "scale-invariant": decay only the weights found to feed a normalizer, so that arms differing in weight decay
# differ in λ_e of those weights and in nothing else (the other parameters train identically in every arm).
DECAY_MODES = ("all", "weights", "scale-invariant")
_TOP = {"model", "data", "starts", "protocol", "arms"}
_MODEL = {"spec"}
_DATA = {"npz", "train", "test", "factory", "probe"}
_STARTS = {"checkpoints", "select", "step_regex"}
_PROTOCOL = {"horizon", "eval_every", "seeds", "tolerance", "approach", "window", "smooth", "bootstrap", "seed",
             "input_noise", "eval_batch", "norm_tolerance", "floor_tolerance"}
_ARM = {"name", "optimizer", "lr", "weight_decay", "intrinsic_lr", "momentum", "betas", "eps", "batch_size",
        "seeds", "input_noise", "decay"}


@dataclass(frozen=True)
class ProtocolSpec:
    horizon: float = 8.0  # retraining length, in units of 1/λ_e
    eval_every: float = 0.1  # evaluation cadence, intrinsic time (λ_e · steps); sets the resolution of t_eq
    seeds: int = 4  # branches per start
    tolerance: float = 0.15  # equilibrated when between-start distance ≤ (1 + tolerance) · noise floor
    approach: float = 0.3  # ... after having been > (1 + approach) · floor (else: started at equilibrium)
    window: float = 1.0  # ... and stays so for at least this much intrinsic time before the horizon
    floor_tolerance: float = 0.2  # ... while the starts' own noise floors agree to within this fraction there
    smooth: float = 0.3  # width (intrinsic time) of the centred moving average applied to both curves
    bootstrap: int = 200  # resamples over seeds for the t_eq interval
    seed: int = 0  # base seed: batch order, input noise
    input_noise: float = 0.0  # std of Gaussian noise added to every training input (fresh every step)
    eval_batch: int = 1024
    norm_tolerance: float = 0.05  # ε of the parameter-space (norm) relaxation time (docs/theory.md)


@dataclass(frozen=True)
class Arm:
    """One retraining condition (a unit of work): every start × ``seeds`` branches."""

    id: str
    optimizer: str
    lr: float
    weight_decay: float
    momentum: float
    beta2: float
    eps: float
    batch_size: int
    seeds: int
    input_noise: float
    decay: str = "all"  # "all" (torch default), "weights" (tensors with ≥ 2 dims) or "scale-invariant" only

    @property
    def intrinsic_lr(self) -> float:
        """λ_e per step: ηλ/(1−μ) for SGD with coupled WD, ηλ for AdamW (docs/theory.md)."""
        if self.optimizer == "sgd":
            return self.lr * self.weight_decay / (1.0 - self.momentum)
        return self.lr * self.weight_decay


@dataclass(frozen=True)
class Config:
    path: Path
    model: str
    data_npz: Path | None
    data_split: tuple[Path, Path] | None
    data_factory: str | None
    probe: Path | None
    checkpoints: tuple[Path, ...]
    select: tuple[str | int, ...]
    step_regex: str | None
    protocol: ProtocolSpec
    arms: tuple[Arm, ...] = field(default_factory=tuple)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one."""
        d = asdict(self)
        d.pop("path")
        plain: dict[str, Any] = _plain(d)
        return plain


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def _err(path: Path, key: str, problem: str, hint: str | None = None) -> UsageError:
    return UsageError(f"[{key}] {problem}", hint=hint, path=path)


def _unknown(path: Path, table: str, got: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(got) - allowed)
    if extra:
        raise _err(path, f"{table}.{extra[0]}" if table else extra[0], "unknown key",
                   hint="allowed here: " + ", ".join(sorted(allowed)))


def _num(path: Path, key: str, v: Any, *, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False, integer: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise _err(path, key, f"must be {'an integer' if integer else 'a number'}, got {v!r}")
    x = float(v)
    if not math.isfinite(x):
        raise _err(path, key, f"must be finite, got {v!r}")
    if lo is not None and (x <= lo if lo_open else x < lo):
        raise _err(path, key, f"must be {'>' if lo_open else '≥'} {lo:g}, got {v!r}")
    if hi is not None and x > hi:
        raise _err(path, key, f"must be ≤ {hi:g}, got {v!r}")
    return x


def _num_list(path: Path, key: str, v: Any) -> list[float]:
    items = v if isinstance(v, list) else [v]
    if not items:
        raise _err(path, key, "must not be empty")
    return [_num(path, f"{key}[{i}]" if isinstance(v, list) else key, x, lo=0.0, lo_open=True)
            for i, x in enumerate(items)]


def _table(path: Path, raw: dict[str, Any], key: str, required: bool = True) -> dict[str, Any]:
    v = raw.get(key)
    if v is None:
        if required:
            raise _err(path, key, "missing table", hint=f"add a [{key}] table (see docs/equilibrium.md)")
        return {}
    if not isinstance(v, dict):
        raise _err(path, key, "must be a table")
    return v


def _str(path: Path, key: str, v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _err(path, key, f"must be a non-empty string, got {v!r}")
    return v


def _arm_id(name: str, lr: float, wd: float) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{name}-lr{lr:g}-wd{wd:g}")


def _arms(path: Path, raw: Any, proto: ProtocolSpec) -> tuple[Arm, ...]:
    if not isinstance(raw, list) or not raw:
        raise _err(path, "arms", "need at least one [[arms]] table")
    out: list[Arm] = []
    for i, a in enumerate(raw):
        k = f"arms[{i}]"
        if not isinstance(a, dict):
            raise _err(path, k, "must be a table")
        _unknown(path, k, a, _ARM)
        opt = a.get("optimizer", "sgd")
        if opt not in OPTIMIZERS:
            raise _err(path, f"{k}.optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {opt!r}")
        if "lr" not in a:
            raise _err(path, f"{k}.lr", "missing", hint="the learning rate η of the retraining")
        lr = _num(path, f"{k}.lr", a["lr"], lo=0.0, lo_open=True)
        has_wd, has_ilr = "weight_decay" in a, "intrinsic_lr" in a
        if has_wd == has_ilr:
            raise _err(path, f"{k}.weight_decay", "give exactly one of weight_decay and intrinsic_lr",
                       hint="intrinsic_lr = λ_e sets weight_decay = λ_e(1−momentum)/lr for SGD, λ_e/lr for AdamW")
        momentum = _num(path, f"{k}.momentum", a.get("momentum", 0.0), lo=0.0, hi=0.999)
        if opt == "adamw" and "momentum" in a:
            raise _err(path, f"{k}.momentum", "AdamW takes betas = [β1, β2], not momentum")
        beta2 = 0.999
        if "betas" in a:
            if opt != "adamw":
                raise _err(path, f"{k}.betas", "only for optimizer = \"adamw\"")
            b = a["betas"]
            if not isinstance(b, list) or len(b) != 2:
                raise _err(path, f"{k}.betas", f"must be a list [β1, β2], got {b!r}")
            momentum = _num(path, f"{k}.betas[0]", b[0], lo=0.0, hi=0.999)
            beta2 = _num(path, f"{k}.betas[1]", b[1], lo=0.0, hi=0.99999)
        elif opt == "adamw":
            momentum = 0.9
        eps = _num(path, f"{k}.eps", a.get("eps", 1e-8), lo=0.0, lo_open=True)
        if "batch_size" not in a:
            raise _err(path, f"{k}.batch_size", "missing")
        bs = int(_num(path, f"{k}.batch_size", a["batch_size"], lo=1, integer=True))
        seeds = int(_num(path, f"{k}.seeds", a.get("seeds", proto.seeds), lo=2, integer=True))
        noise = _num(path, f"{k}.input_noise", a.get("input_noise", proto.input_noise), lo=0.0)
        name = _str(path, f"{k}.name", a.get("name", f"{opt}"))
        decay = a.get("decay", "all")
        if decay not in DECAY_MODES:
            raise _err(path, f"{k}.decay", f'must be one of {", ".join(DECAY_MODES)}, got {decay!r}')
        kappa = (1.0 - momentum) if opt == "sgd" else 1.0
        if has_wd:
            wds = _num_list(path, f"{k}.weight_decay", a["weight_decay"])
        else:
            wds = [le * kappa / lr for le in _num_list(path, f"{k}.intrinsic_lr", a["intrinsic_lr"])]
        for wd in wds:
            arm = Arm(_arm_id(name, lr, wd), opt, lr, wd, momentum, beta2, eps, bs, seeds, noise, decay)
            if arm.intrinsic_lr >= 0.5:
                raise _err(path, f"{k}.weight_decay", f"intrinsic LR {arm.intrinsic_lr:g} is not small",
                           hint="λ_e = ηλ/(1−μ) must be ≪ 1 (typical: 1e-4 … 1e-2)")
            out.append(arm)
    ids = [a.id for a in out]
    dup = next((x for x in ids if ids.count(x) > 1), None)
    if dup is not None:
        raise _err(path, "arms", f"two arms resolve to the same id {dup!r}", hint="give them different names")
    return tuple(out)


def _protocol(path: Path, p: dict[str, Any]) -> ProtocolSpec:
    _unknown(path, "protocol", p, _PROTOCOL)
    d = ProtocolSpec()
    k = "protocol."
    return ProtocolSpec(
        horizon=_num(path, k + "horizon", p.get("horizon", d.horizon), lo=0.0, lo_open=True),
        eval_every=_num(path, k + "eval_every", p.get("eval_every", d.eval_every), lo=0.0, lo_open=True),
        seeds=int(_num(path, k + "seeds", p.get("seeds", d.seeds), lo=2, integer=True)),
        tolerance=_num(path, k + "tolerance", p.get("tolerance", d.tolerance), lo=0.0),
        approach=_num(path, k + "approach", p.get("approach", d.approach), lo=0.0),
        window=_num(path, k + "window", p.get("window", d.window), lo=0.0),
        floor_tolerance=_num(path, k + "floor_tolerance", p.get("floor_tolerance", d.floor_tolerance), lo=0.0),
        smooth=_num(path, k + "smooth", p.get("smooth", d.smooth), lo=0.0),
        bootstrap=int(_num(path, k + "bootstrap", p.get("bootstrap", d.bootstrap), lo=0, integer=True)),
        seed=int(_num(path, k + "seed", p.get("seed", d.seed), lo=0, integer=True)),
        input_noise=_num(path, k + "input_noise", p.get("input_noise", d.input_noise), lo=0.0),
        eval_batch=int(_num(path, k + "eval_batch", p.get("eval_batch", d.eval_batch), lo=1, integer=True)),
        norm_tolerance=_num(path, k + "norm_tolerance", p.get("norm_tolerance", d.norm_tolerance),
                            lo=0.0, lo_open=True, hi=0.5),
    )


def _existing(path: Path, key: str, rel: str) -> Path:
    p = (path.parent / rel).resolve()
    if not p.exists():
        raise _err(path, key, f"{rel!r} does not exist (relative to {path.parent})")
    return p


def load_config(path: Path) -> Config:
    """Parse and validate an ``ilr.toml``; raise UsageError/InputError naming the file and key."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.is_file():
        raise InputError(f"no {CONFIG_NAME} here", hint="write one (docs/equilibrium.md) or pass --config", path=path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"not valid TOML: {exc}", path=path) from None
    _unknown(path, "", raw, _TOP)
    model = _table(path, raw, "model")
    _unknown(path, "model", model, _MODEL)
    spec = _str(path, "model.spec", model.get("spec"))
    data = _table(path, raw, "data")
    _unknown(path, "data", data, _DATA)
    if ("train" in data) != ("test" in data):
        raise _err(path, "data.test" if "train" in data else "data.train", "give both train and test")
    if ("npz" in data) + ("factory" in data) + ("train" in data) != 1:
        raise _err(path, "data", "give exactly one of npz, train + test, and factory",
                   hint='npz = "data.npz" (x_train, y_train, x_test, y_test), train = "train.npz" + '
                        'test = "test.npz" (x, y each), or factory = "data.py:load"')
    npz = _existing(path, "data.npz", _str(path, "data.npz", data["npz"])) if "npz" in data else None
    split = (_existing(path, "data.train", _str(path, "data.train", data["train"])),
             _existing(path, "data.test", _str(path, "data.test", data["test"]))) if "train" in data else None
    factory = _str(path, "data.factory", data["factory"]) if "factory" in data else None
    probe = _existing(path, "data.probe", _str(path, "data.probe", data["probe"])) if "probe" in data else None
    starts = _table(path, raw, "starts")
    _unknown(path, "starts", starts, _STARTS)
    ck = starts.get("checkpoints")
    ck_list = ck if isinstance(ck, list) else [ck]
    if not ck_list or not all(isinstance(c, str) and c for c in ck_list):
        raise _err(path, "starts.checkpoints", "must be a folder (or a list of folders, one per run)")
    folders = tuple(_existing(path, "starts.checkpoints", str(c)) for c in ck_list)
    sel = starts.get("select", ["first", "last"])
    if not isinstance(sel, list) or not sel:
        raise _err(path, "starts.select", 'must be a non-empty list of steps or "first"/"last"')
    for s in sel:
        if not (s in ("first", "last") or (isinstance(s, int) and not isinstance(s, bool) and s >= 0)):
            raise _err(path, "starts.select", f'{s!r} is neither a step number nor "first"/"last"')
    if len(folders) * len(sel) < 2:
        raise _err(path, "starts.select", "need at least two starts to compare",
                   hint='e.g. select = ["first", "last"], or several runs in checkpoints')
    step_regex = starts.get("step_regex")
    if step_regex is not None:
        try:
            if re.compile(_str(path, "starts.step_regex", step_regex)).groups != 1:
                raise _err(path, "starts.step_regex", "needs exactly one capture group")
        except re.error as exc:
            raise _err(path, "starts.step_regex", f"not a regex: {exc}") from None
    proto = _protocol(path, _table(path, raw, "protocol", required=False))
    if proto.eval_every >= proto.horizon:
        raise _err(path, "protocol.eval_every", "must be smaller than protocol.horizon")
    if proto.approach < proto.tolerance:
        raise _err(path, "protocol.approach", f"must be ≥ protocol.tolerance ({proto.tolerance:g})",
                   hint="'clearly above the floor' must lie outside the band that counts as equilibrium")
    arms = _arms(path, raw.get("arms"), proto)
    return Config(path.resolve(), spec, npz, split, factory, probe, folders, tuple(sel), step_regex, proto, arms)


def with_overrides(cfg: Config, *, horizon: float | None = None, eval_every: float | None = None,
                   seeds: int | None = None, bootstrap: int | None = None, quick: bool = False,
                   arms: list[str] | None = None) -> Config:
    """Command-line overrides. ``quick``: a smoke run (horizon 0.3/λ_e, 3 evaluations, 2 seeds)."""
    p = cfg.protocol
    if quick:
        p = replace(p, horizon=0.3, eval_every=0.1, seeds=2, bootstrap=min(p.bootstrap, 50), window=0.1, smooth=0.0)
    if horizon is not None:
        if horizon <= 0:
            raise UsageError(f"--horizon must be > 0, got {horizon}")
        p = replace(p, horizon=horizon)
    if eval_every is not None:
        if eval_every <= 0:
            raise UsageError(f"--eval-every must be > 0, got {eval_every}")
        p = replace(p, eval_every=eval_every)
    if bootstrap is not None:
        p = replace(p, bootstrap=bootstrap)
    if p.eval_every >= p.horizon:
        raise UsageError(f"the evaluation cadence {p.eval_every:g} must be below the horizon {p.horizon:g}")
    new_arms = cfg.arms
    if seeds is not None or quick:
        n = seeds if seeds is not None else 2
        if n < 2:
            raise UsageError("--seeds must be ≥ 2 (the noise floor compares seeds)")
        new_arms = tuple(replace(a, seeds=n) for a in new_arms)
    if arms:
        known = {a.id for a in new_arms}
        bad = [a for a in arms if a not in known]
        if bad:
            raise UsageError(f"no arm {bad[0]!r} in {cfg.path}", hint="arms: " + ", ".join(sorted(known)))
        new_arms = tuple(a for a in new_arms if a.id in arms)
    return replace(cfg, protocol=p, arms=new_arms)
