"""The gradient/trajectory tier: cross-checks from what the series itself shows (docs/theory.md §2).

No gradients are stored in most checkpoints, but consecutive checkpoints constrain a unit:
- without weight decay an SI unit trained by SGD can only grow (‖w_{t+1}‖² = ‖w_t‖² + η²‖g_t‖², §2.5);
- for plain SGD between checkpoints one step apart, cos Δ = (1−ηλ)‖w_t‖/‖w_{t+1}‖ exactly (§3.2).
A violation says the unit is not SI (or the hyperparameters are wrong); agreement is supporting evidence.
"""

from __future__ import annotations

import math

import pandas as pd

IDENTITY_TOL = 1e-3  # relative, on 1 − cos: fp32 checkpoints keep ~7 digits


def cross_check(norms: pd.DataFrame, angles: pd.DataFrame) -> dict[str, str]:
    """A short verdict per unit ('' when the series says nothing either way)."""
    out: dict[str, str] = {}
    if norms.empty:
        return out
    for unit, g in norms.groupby("unit", sort=False):
        g = g.sort_values("step")
        notes: list[str] = []
        wd = g["weight_decay"].to_numpy()
        nr = g["norm"].to_numpy()
        no_wd = [i for i in range(1, len(g)) if wd[i - 1] == 0.0]
        if no_wd and str(g["optimizer"].iloc[0] or "").lower().startswith("sgd"):
            shrink = [i for i in no_wd if nr[i] < nr[i - 1] * (1 - 1e-6)]
            notes.append(f"norm shrank in {len(shrink)}/{len(no_wd)} no-WD intervals"
                         + (" — inconsistent with scale invariance" if shrink else " (consistent with SI)"))
        a = angles[(angles["unit"] == unit) & (angles["steps"] == 1)] if not angles.empty else angles
        if len(a) and str(g["optimizer"].iloc[0] or "").lower() == "sgd":
            errs = []
            by_step = dict(zip(g["step"], zip(g["norm"], g["lr"], g["weight_decay"], g["momentum"], strict=True),
                               strict=True))
            for _, r in a.iterrows():
                n0, lr, lam, mu = by_step.get(r["step_from"], (math.nan,) * 4)
                n1 = by_step.get(r["step_to"], (math.nan,) * 4)[0]
                if mu == 0 and math.isfinite(lr * lam) and n1 > 0:
                    pred = (1 - lr * lam) * n0 / n1
                    errs.append(abs((1 - r["cosine"]) - (1 - pred)) / max(1 - pred, 1e-12))
            if errs:
                worst = max(errs)
                notes.append(f"SGD one-step identity cos Δ = (1−ηλ)‖w_t‖/‖w_t+1‖: worst relative error {worst:.1e}"
                             + (" (holds)" if worst < IDENTITY_TOL else " (violated)"))
        if notes:
            out[str(unit)] = "; ".join(notes)
    return out
