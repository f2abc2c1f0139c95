"""Regime of a unit over the series (design.md §4 ``units.regime``), with the numbers behind the verdict.

- ``no-weight-decay``: λ = 0 where the series ends — no equilibrium exists, the norm only grows (theory.md §2.5);
- ``periodic``: repeated norm collapse → spike cycles (Lobacheva et al. 2021, theory.md §10.7);
- ``equilibrium``: the norm relaxation is ≥ 95 % done (intrinsic time since the last schedule change) and the
  norm is flat over the last part of the segment;
- ``approaching``: still relaxing, with the fraction done;
- ``undetermined``: not scale-invariant, too few checkpoints, or hyperparameters unknown.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

SPIKE = 0.15  # a norm jump of ≥ 15 % between consecutive checkpoints after a decline counts as a spike
FLAT_SLOPE = 0.1  # |d log‖w‖ / dτ| below this (τ = intrinsic time) counts as flat
DONE = 0.95


@dataclass(frozen=True)
class Regime:
    regime: str
    detail: str


def classify(steps: Sequence[float], norms: Sequence[float], taus: Sequence[float], weight_decay: float | None,
             relaxation_done: float | None, angle_ratios: Sequence[float], scale_invariant: bool) -> Regime:
    n = len(norms)
    if not scale_invariant:
        return Regime("undetermined", "not scale-invariant: the equilibrium theory does not apply")
    if weight_decay is not None and weight_decay == 0.0:
        growth = norms[-1] / norms[0] if n and norms[0] > 0 else math.nan
        return Regime("no-weight-decay", f"λ = 0 at the last checkpoint; norm grew ×{growth:.3g} over the series "
                                         "(no equilibrium: the effective LR only decays)")
    if n < 3:
        return Regime("undetermined", f"only {n} checkpoint(s): need at least 3")
    ratios = [b / a if a > 0 else 1.0 for a, b in itertools.pairwise(norms)]
    spikes = [i for i in range(1, len(ratios)) if ratios[i] > 1 + SPIKE and ratios[i - 1] < 1]
    if len(spikes) >= 2:
        spike_steps = [steps[i + 1] for i in spikes]
        period = (spike_steps[-1] - spike_steps[0]) / (len(spike_steps) - 1)
        return Regime("periodic", f"{len(spikes)} norm collapse→spike cycles (jumps ≥ {SPIKE:.0%} after a decline), "
                                  f"mean period {period:.0f} steps; norm range {min(norms):.4g}…{max(norms):.4g}")
    if weight_decay is None or relaxation_done is None:
        return Regime("undetermined", "weight decay or learning rate unknown (pass --lr/--wd or keep optimizer state)")
    # Flatness over the last half of the current segment, per unit of intrinsic time.
    half = max(1, n // 2)
    t0, t1 = taus[-half - 1], taus[-1]
    dlog = math.log(norms[-1] / norms[-half - 1]) if norms[-half - 1] > 0 and norms[-1] > 0 else math.nan
    slope = dlog / (t1 - t0) if t1 > t0 else math.nan
    ang = [r for r in angle_ratios[-half:] if math.isfinite(r)]
    ang_txt = f"; angle/predicted {sum(ang) / len(ang):.3f} (last {len(ang)} pairs)" if ang else ""
    detail = (f"relaxation {relaxation_done:.1%} done (τ = Σλ_e = {taus[-1]:.3g} since the last schedule change); "
              f"d ln‖w‖/dτ = {slope:.3g} over the last {half} intervals{ang_txt}")
    flat = math.isfinite(slope) and abs(slope) < FLAT_SLOPE
    if relaxation_done >= DONE and (flat or not math.isfinite(slope)):
        return Regime("equilibrium", detail)
    return Regime("approaching", detail)
