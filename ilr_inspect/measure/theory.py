"""Closed-form predictions of the random-walk theory (docs/theory.md §1, §3–§8), PyTorch conventions.

Every function takes plain floats so it can be checked against the oracles of docs/theory.md §6 directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..checkpoint import HParams

SGD_FAMILY = frozenset({"sgd", "sgdw", "sgdm"})
ADAM_FAMILY = frozenset({"adam", "adamw", "lamb", "adafactor", "nadam", "radam"})
LION_FAMILY = frozenset({"lion"})


@dataclass(frozen=True, slots=True)
class Dynamics:
    """The per-unit constants the theory needs, resolved from one HParams record."""

    lr: float | None
    weight_decay: float | None
    momentum: float  # SGD momentum, or β1 for Adam/Lion
    beta2: float | None
    family: str  # "sgd" | "adam" | "lion" | "unknown"
    optimizer: str | None
    wd_mode: str | None  # coupled | decoupled | unscaled
    note: str = ""

    @property
    def known(self) -> bool:
        return self.lr is not None and self.weight_decay is not None

    @property
    def shrink(self) -> float | None:
        """Per-step fraction of w removed by weight decay (docs/theory.md §4 s_t)."""
        if self.lr is None or self.weight_decay is None:
            return None
        return self.weight_decay if self.wd_mode == "unscaled" else self.lr * self.weight_decay

    @property
    def intrinsic_lr(self) -> float | None:
        """λ_e = s·κ, κ = 1/(1−μ) only when WD goes through an SGD momentum buffer (docs/theory.md §4)."""
        s = self.shrink
        if s is None:
            return None
        if self.family in ("adam", "adaptive") and self.wd_mode == "coupled":
            return None  # Adam/RMSprop + L2: no hyperparameter-only shrink rate (docs/theory.md §6 last row)
        if self.family == "sgd" and self.wd_mode == "coupled" and self.momentum < 1.0:
            return s / (1.0 - self.momentum)
        return s

    @property
    def norm_power(self) -> int:
        """Exponent p with ‖w‖^p relaxing like e^{−2p·λ_e t}/... : 4 for SGD (norm⁴ law), 2 for AdamW/Lion."""
        return 4 if self.family == "sgd" else 2


ADAPTIVE_L2 = frozenset({"rmsprop", "adagrad", "adadelta"})


def family_of(optimizer: str | None) -> str:
    """sgd | adam | lion | adaptive (RMSprop-like, L2 through the preconditioner) | unknown."""
    name = (optimizer or "").lower()
    if name in SGD_FAMILY or name.startswith("sgd") or name == "lars":
        return "sgd"
    if name in ADAM_FAMILY or "adam" in name or name in ("lamb", "adafactor"):
        return "adam"
    if name in LION_FAMILY:
        return "lion"
    if name in ADAPTIVE_L2:
        return "adaptive"
    return "unknown"


def dynamics(hp: HParams | None) -> Dynamics:
    """Resolve defaults the way each optimizer family applies weight decay when the record leaves it open."""
    if hp is None:
        return Dynamics(None, None, 0.0, None, "unknown", None, None, "no hyperparameters")
    fam = family_of(hp.optimizer)
    opt = (hp.optimizer or "").lower() or None
    mode = hp.wd_mode
    note = ""
    if mode is None:
        if opt in ("adamw", "lion", "sgdw", "nadamw", "radamw") or fam == "lion":
            mode = "decoupled"
        elif opt is not None and "cannot tell" in opt:
            mode = "decoupled"
            note = "Adam vs AdamW undecidable from the saved state: decoupled weight decay (AdamW) assumed"
        elif fam in ("sgd", "adam", "adaptive"):
            mode = "coupled"
    mom = hp.momentum if hp.momentum is not None else (0.9 if fam in ("adam", "lion") else 0.0)
    if hp.nesterov:
        note = "nesterov momentum: not covered by the theory (treated as plain momentum)"
    if fam == "unknown" and hp.lr is not None:
        fam = "sgd"
        note = (note + "; " if note else "") + "optimizer unknown: SGD formulas assumed"
    return Dynamics(hp.lr, hp.weight_decay, float(mom), hp.beta2, fam, opt, mode, note)


def equilibrium_angle(d: Dynamics) -> float | None:
    """Per-step angular update at equilibrium Δ* (docs/theory.md §6).

    One formula covers SGD(M) and AdamW: the long-window diffusion is 2λ_e per step and momentum correlates
    consecutive updates, so Δ*² = 2λ_e(1−μ)/(1+μ). Plain SGD uses the exact arccos(1−ηλ).
    """
    lam_e = d.intrinsic_lr
    if lam_e is None or lam_e <= 0:
        return None
    if d.family == "lion":
        if d.shrink is None:
            return None
        b1, b2 = d.momentum, (d.beta2 if d.beta2 is not None else 0.99)
        spread = math.sqrt((1 - b1) ** 2 + b1 * b1 * (1 - b2) / (1 + b2))
        return math.sqrt(math.pi / 2) * math.sqrt(2 * d.shrink) * spread
    mu = d.momentum
    if d.family == "sgd" and mu == 0.0 and d.wd_mode != "unscaled":
        return math.acos(max(-1.0, 1.0 - lam_e))
    return math.sqrt(2.0 * lam_e * (1.0 - mu) / (1.0 + mu))


def correlated_steps(mu: float, k: float) -> float:
    """S_k = Σ_{i,j<k} μ^|i−j|: variance multiplier of a sum of k AR(1)-correlated unit steps."""
    if k <= 0:
        return 0.0
    if mu == 0.0:
        return float(k)
    return float(k * (1 + mu) / (1 - mu) - 2 * mu * (1 - mu**k) / (1 - mu) ** 2)


def predicted_angle(d: Dynamics, k: float) -> float | None:
    """Expected angle between checkpoints k steps apart at equilibrium: arccos(exp(−Δ*²·S_k/2)).

    k = 1 gives Δ*; for k ≫ 1/(1−μ) it gives arccos(e^{−λ_e k}) (docs/theory.md §6).
    """
    delta = equilibrium_angle(d)
    if delta is None or k <= 0:
        return None
    if d.family == "sgd" and d.momentum == 0.0 and d.wd_mode != "unscaled":
        cos_k = math.cos(delta) ** k  # exact mean-field: cos Δ* = 1 − ηλ per step
    else:
        cos_k = math.exp(-0.5 * delta * delta * correlated_steps(d.momentum if d.family != "lion" else 0.0, k))
    return math.acos(min(1.0, max(-1.0, cos_k)))


def equilibrium_norm_closed_form(d: Dynamics, numel: int) -> float | None:
    """Hyperparameter-only equilibrium norm: AdamW sqrt(ηC/(2λ)), Lion η·sqrt(C)/Δ* (docs/theory.md §7).

    SGD needs E‖g̃‖² (not in a checkpoint); see :func:`implied_equilibrium_norm`.
    """
    if not d.known or d.lr is None or d.weight_decay is None or d.weight_decay <= 0:
        return None
    if d.family == "adam" and d.wd_mode != "coupled":
        shrink = d.shrink
        if shrink is None or shrink <= 0:
            return None
        return d.lr * math.sqrt(numel / (2.0 * shrink))  # = sqrt(ηC/(2λ)) for decoupled η·λ shrink
    if d.family == "lion":
        delta = equilibrium_angle(d)
        return None if not delta else d.lr * math.sqrt(numel) / delta
    return None


def implied_equilibrium_norm(d: Dynamics, norm: float, angle: float, steps: float) -> float | None:
    """Equilibrium norm implied by the measured angular speed at the current gradient noise (noise model).

    SGD: the angle scales like 1/‖w‖², so ‖w*‖ = ‖w‖·sqrt(θ/θ*); Adam/Lion: like 1/‖w‖, so ‖w*‖ = ‖w‖·θ/θ*.
    """
    pred = predicted_angle(d, steps)
    if pred is None or pred <= 0 or not math.isfinite(angle) or angle <= 0:
        return None
    r = angle / pred
    return norm * (math.sqrt(r) if d.family == "sgd" else r)


def relaxation_time(d: Dynamics) -> float | None:
    """Time constant (steps) of the norm relaxation: 1/(4λ_e) for SGD(M), 1/(2λ_e) for AdamW (docs/theory.md §8)."""
    lam_e = d.intrinsic_lr
    if lam_e is None or lam_e <= 0:
        return None
    return 1.0 / (d.norm_power * lam_e)


def relaxation_done(d: Dynamics, intrinsic_time: float) -> float | None:
    """Fraction of the norm relaxation completed after intrinsic time τ = Σλ_e: 1 − e^{−pτ}."""
    if d.intrinsic_lr is None or d.intrinsic_lr <= 0 or not math.isfinite(intrinsic_time):
        return None
    return 1.0 - math.exp(-d.norm_power * intrinsic_time)


def steps_to_within(d: Dynamics, r0: float, eps: float) -> float | None:
    """Steps until ‖w‖/‖w*‖ is within ε of 1, starting from ratio r0 (docs/theory.md §8)."""
    lam_e = d.intrinsic_lr
    if lam_e is None or lam_e <= 0:
        return None
    p = d.norm_power
    target = abs((1 + eps if r0 > 1 else 1 - eps) ** p - 1)
    start = abs(r0**p - 1)
    if start <= target:
        return 0.0
    return math.log(start / target) / (p * lam_e)
