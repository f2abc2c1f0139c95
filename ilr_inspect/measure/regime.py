"""Regime of a unit over the series (docs/theory.md §9), with the numbers behind the verdict.

- ``no-weight-decay``: λ = 0 where the series ends — no equilibrium exists, the norm only grows (docs/theory.md §9);
- ``periodic``: repeated norm collapse → spike cycles (Lobacheva et al. 2021, docs/theory.md §9);
- ``equilibrium``: with optimizer state, the last-step angle reconstructed at each checkpoint has a median within
  ``STEP_BAND`` of the predicted Δ* over the recent checkpoints and the norm is flat; without it, the relaxation
  is ≥ 95 % done (intrinsic time since the last schedule change) and the norm is flat, or — hyperparameters
  unknown — the series is stationary (gap angle and norm over equal gaps stop drifting);
- ``approaching``: still relaxing, with the fraction done;
- ``undetermined``: not scale-invariant, too few checkpoints, or nothing to judge by.

The angle between checkpoints k steps apart is compared with arccos(e^{−λ_e k}) only as a free-diffusion bound:
the loss pulls the weights back, so a sparse series sits below it at equilibrium (docs/step-angle.md).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

SPIKE = 0.15  # a norm jump of ≥ 15 % between consecutive checkpoints after a decline counts as a spike
FLAT_SLOPE = 0.1  # |d log‖w‖ / dτ| below this (τ = intrinsic time) counts as flat
DONE = 0.95
RECENT = 10  # checkpoints whose last-step ratios decide the verdict
STEP_BAND = (0.8, 1.25)  # median last-step angle / Δ* inside this band: at equilibrium (one sample is noisy)
MIN_STEP_SAMPLES = 3
DRIFT = 0.15  # stationarity: relative change of the mean gap angle between the halves of the recent window
NORM_DRIFT = 0.05  # ... and of the norm


@dataclass(frozen=True)
class Regime:
    regime: str
    detail: str


def step_summary(step_ratios: Sequence[float]) -> tuple[float, float, float, int] | None:
    """(median, min, max, count) of the last RECENT finite ratios, or None when fewer than MIN_STEP_SAMPLES."""
    recent = [r for r in step_ratios if math.isfinite(r)][-RECENT:]
    if len(recent) < MIN_STEP_SAMPLES:
        return None
    return statistics.median(recent), min(recent), max(recent), len(recent)


def stationarity(norms: Sequence[float], gap_angles: Sequence[tuple[float, float]]) -> tuple[bool, str] | None:
    """Do the gap angle and the norm stop drifting? Compares the two halves of the recent window, using only the
    pairs with the most common gap (equal gaps, so the angles are comparable). None when too few."""
    if not gap_angles or len(norms) < 4:
        return None
    # The recent window: the later half of the series (at most 2·RECENT pairs), so that an early relaxation
    # does not count as drift.
    span = min(2 * RECENT, max(6, len(gap_angles) // 2))
    common = Counter(k for k, _ in gap_angles[-span:]).most_common(1)[0][0]
    ang = [a for k, a in gap_angles[-span:] if k == common]
    if len(ang) < 4:
        return None
    h = len(ang) // 2
    a1, a2 = sum(ang[:h]) / h, sum(ang[-h:]) / h
    ns = list(norms[-(span + 1):])
    hn = len(ns) // 2
    n1, n2 = sum(ns[:hn]) / hn, sum(ns[-hn:]) / hn
    da = abs(a2 - a1) / max(a1, a2, 1e-300)
    dn = abs(n2 - n1) / max(n1, n2, 1e-300)
    ok = da < DRIFT and dn < NORM_DRIFT
    return ok, (f"stationarity over equal gaps of {common:.0f} steps (no optimizer state to measure the last step): "
                f"gap angle {a1:.4g}→{a2:.4g} rad ({da:.1%} drift), norm {n1:.4g}→{n2:.4g} ({dn:.1%} drift) "
                f"between the halves of the last {len(ang)} pairs")


def classify(steps: Sequence[float], norms: Sequence[float], taus: Sequence[float], weight_decay: float | None,
             relaxation_done: float | None, angle_ratios: Sequence[float], scale_invariant: bool, *,
             step_ratios: Sequence[float] = (), gap_angles: Sequence[tuple[float, float]] = ()) -> Regime:
    """``angle_ratios``: gap angle / free-diffusion bound per pair (reported, never judged); ``step_ratios``:
    reconstructed last-step angle / Δ* per checkpoint; ``gap_angles``: (steps, angle) per checkpoint pair."""
    n = len(norms)
    if not scale_invariant:
        return Regime("undetermined", "not scale-invariant: the equilibrium theory does not apply")
    if weight_decay is not None and weight_decay == 0.0:
        growth = norms[-1] / norms[0] if n and norms[0] > 0 else math.nan
        return Regime("no-weight-decay", f"λ = 0 at the last checkpoint; norm grew ×{growth:.3g} over the series "
                                         "(no equilibrium: the effective LR only decays)")
    if n < 3:
        return Regime("undetermined", f"only {n} checkpoint(s): need at least 3")
    steps_txt = ""
    summary = step_summary(step_ratios)
    if summary is not None:
        med, lo, hi, cnt = summary
        steps_txt = (f"last-step angle from the optimizer state / Δ*: median {med:.3f} (range {lo:.3g}…{hi:.3g}) "
                     f"over the last {cnt} checkpoints")
    ratios = [b / a if a > 0 else 1.0 for a, b in itertools.pairwise(norms)]
    spikes = [i for i in range(1, len(ratios)) if ratios[i] > 1 + SPIKE and ratios[i - 1] < 1]
    if len(spikes) >= 2:
        spike_steps = [steps[i + 1] for i in spikes]
        period = (spike_steps[-1] - spike_steps[0]) / (len(spike_steps) - 1)
        return Regime("periodic", f"{len(spikes)} norm collapse→spike cycles (jumps ≥ {SPIKE:.0%} after a decline), "
                                  f"mean period {period:.0f} steps; norm range {min(norms):.4g}…{max(norms):.4g}"
                      + (f"; {steps_txt}" if steps_txt else ""))
    bound = [r for r in angle_ratios[-RECENT:] if math.isfinite(r)]
    bound_txt = (f"; gap angle is {statistics.median(bound):.3f}× the free-diffusion bound arccos(e^(−λ_e·k)) "
                 "(a bound, not a prediction)" if bound else "")
    stat = stationarity(norms, gap_angles)
    if weight_decay is None or relaxation_done is None:
        if stat is not None and summary is None:
            return Regime("equilibrium" if stat[0] else "undetermined",
                          stat[1] + "; weight decay or learning rate unknown, so no relaxation time")
        return Regime("undetermined", "weight decay or learning rate unknown (pass --lr/--wd or keep optimizer state)")
    # Flatness over the last half of the current segment, per unit of intrinsic time.
    half = max(1, n // 2)
    t0, t1 = taus[-half - 1], taus[-1]
    dlog = math.log(norms[-1] / norms[-half - 1]) if norms[-half - 1] > 0 and norms[-1] > 0 else math.nan
    slope = dlog / (t1 - t0) if t1 > t0 else math.nan
    flat = math.isfinite(slope) and abs(slope) < FLAT_SLOPE
    base = (f"relaxation {relaxation_done:.1%} done (τ = Σλ_e = {taus[-1]:.3g} since the last schedule change); "
            f"d ln‖w‖/dτ = {slope:.3g} over the last {half} intervals")
    if summary is not None:
        med = summary[0]
        detail = f"{steps_txt}; {base}{bound_txt}"
        inside = STEP_BAND[0] <= med <= STEP_BAND[1]
        if relaxation_done >= DONE and inside and (flat or not math.isfinite(slope)):
            return Regime("equilibrium", "evidence: " + detail)
        why = ("still relaxing" if relaxation_done < DONE else
               f"median outside {STEP_BAND[0]}…{STEP_BAND[1]}" if not inside else "norm still drifting")
        return Regime("approaching", f"{why}: {detail}")
    if relaxation_done >= DONE and (flat or not math.isfinite(slope)):
        if stat is not None:
            return Regime("equilibrium" if stat[0] else "approaching", f"{stat[1]}; {base}{bound_txt}")
        return Regime("equilibrium", f"{base}{bound_txt}")
    return Regime("approaching", f"{base}{bound_txt}")
