"""Turning recorded curves into t_eq, its bootstrap interval, norm relaxation and the scaling exponent.

Distances are mean pairwise prediction disagreements on the probe set (docs/equilibrium.md): *between* = pairs of
branches from different starts, *noise floor* = pairs of different seeds of the same start. At equilibrium every
branch is an independent draw from one distribution over functions, so both have the same expectation; the
estimator needs no correction for the number of seeds (unlike the ℓ1 distance between empirical label
distributions, which is reported alongside).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# Status values of an arm (the `status` column).
EQUILIBRATED = "equilibrated"
STARTED_AT_EQUILIBRIUM = "started-at-equilibrium"
NOT_EQUILIBRATED = "not-equilibrated"
SMOKE_TEST = "smoke-test"
PERIODIC = "periodic"
DIVERGED = "diverged"


def pair_weights(groups: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair weights (K, K) for between-start and within-start pairs, given how often each branch is drawn."""
    same = groups[:, None] == groups[None, :]
    w = counts[:, None].astype(np.float64) * counts[None, :]
    between = np.where(same, 0.0, w)
    within = np.where(same & ~np.eye(len(groups), dtype=bool), w, 0.0)
    return between, within


def curves(dis: np.ndarray, groups: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Between-start distance and noise floor per evaluation from pairwise disagreements ``dis`` (E, K, K)."""
    c = np.ones(len(groups)) if counts is None else counts
    wb, ww = pair_weights(groups, c)
    sb, sw = wb.sum(), ww.sum()
    between = np.einsum("eij,ij->e", dis, wb) / sb if sb > 0 else np.full(len(dis), np.nan)
    floor = np.einsum("eij,ij->e", dis, ww) / sw if sw > 0 else np.full(len(dis), np.nan)
    return between, floor


def smooth(times: np.ndarray, x: np.ndarray, width: float) -> np.ndarray:
    """Centred moving average over a window of ``width`` (in the units of ``times``), clipped at the ends.

    The width is in intrinsic time, so the smoothing, and any bias it puts on t_eq, is the same fraction of 1/λ_e
    for every arm: a bias constant in intrinsic time leaves the fitted exponent unchanged."""
    if width <= 0 or len(x) == 0:
        return x.astype(np.float64)
    h = width / 2 + 1e-9
    return np.array([np.mean(x[np.abs(times - t) <= h]) for t in times])


def start_floors(dis: np.ndarray, groups: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Each start's own noise floor per evaluation, (S, E): mean disagreement between different seeds of that
    start (weighted by how often each branch is drawn). NaN for a start with fewer than two distinct branches."""
    c = np.ones(len(groups)) if counts is None else counts
    out = np.full((len(np.unique(groups)), len(dis)), np.nan)
    for i, g in enumerate(np.unique(groups)):
        m = np.nonzero(groups == g)[0]
        w = c[m][:, None] * c[m][None, :]
        np.fill_diagonal(w, 0.0)
        if w.sum() > 0:
            out[i] = np.einsum("eij,ij->e", dis[:, m][:, :, m], w) / w.sum()
    return out


def floor_gap(per_start: np.ndarray) -> float:
    """(largest − smallest) of the per-start floors (S,), relative to their mean."""
    mean = float(np.mean(per_start))
    return float((np.max(per_start) - np.min(per_start)) / mean) if mean > 0 else math.nan


@dataclass(frozen=True)
class Settling:
    t_eq: float  # first settled evaluation time after an approach (NaN otherwise)
    approach: float  # last time before t_eq at which the distance was clearly above the floor (NaN: none)
    started: bool  # the curves settled without having been clearly above the floor first
    ratio_only: float = math.nan  # first time the between/floor condition alone held for a window (diagnostic)


def settle(times: np.ndarray, between: np.ndarray, floor: np.ndarray, *, tolerance: float, window: float,
           width: float, approach: float, per_start: np.ndarray | None = None,
           floor_tolerance: float = math.inf) -> Settling:
    """The t_eq rule (docs/equilibrium.md): the first evaluation time t with smoothed between ≤ (1 + tolerance)·
    smoothed floor at every evaluation in [t, t + window] (the window must end before the horizon) and, when
    ``per_start`` floors (S, E) are given, the starts' own floors averaged over that same window within
    ``floor_tolerance`` of each other (relative to their mean). At equilibrium the network's distribution no
    longer depends on the start, so its spread (each start's floor) must agree too: the between/floor ratio alone
    is ≈ 1 whenever the cross-distance sits between two unequal floors. Counted only when some earlier evaluation
    had between > (1 + approach)·floor. Without that approach the starts were already indistinguishable and there
    is nothing to time: ``started`` is set and t_eq is NaN. So t_eq can never be the first evaluation."""
    b, f = smooth(times, between, width), smooth(times, floor, width)
    if len(b) == 0 or not np.all(np.isfinite(b)) or not np.all(np.isfinite(f)):
        return Settling(math.nan, math.nan, False)
    ok = b <= (1.0 + tolerance) * f + 1e-12
    above = b > (1.0 + approach) * f
    check_floors = per_start is not None and math.isfinite(floor_tolerance)
    ratio_only = math.nan
    for i, t in enumerate(times):
        if t + window > times[-1] + 1e-9:
            break
        win = (times >= t - 1e-9) & (times <= t + window + 1e-9)
        if not np.all(ok[win]):
            continue
        if math.isnan(ratio_only):
            ratio_only = float(t)
        if check_floors:
            assert per_start is not None
            gap = floor_gap(per_start[:, win].mean(1))
            if not gap <= floor_tolerance + 1e-12:  # NaN (a start without a floor) never agrees
                continue
        before = np.nonzero(above[:i])[0]
        if len(before) == 0:
            return Settling(math.nan, math.nan, True, ratio_only)
        return Settling(float(t), float(times[before[-1]]), False, ratio_only)
    return Settling(math.nan, math.nan, False, ratio_only)


def settle_time(times: np.ndarray, between: np.ndarray, floor: np.ndarray, *, tolerance: float, window: float,
                width: float, approach: float = 0.3, per_start: np.ndarray | None = None,
                floor_tolerance: float = math.inf) -> float:
    """t_eq of :func:`settle` (NaN when not settled or settled without an approach)."""
    return settle(times, between, floor, tolerance=tolerance, window=window, width=width, approach=approach,
                  per_start=per_start, floor_tolerance=floor_tolerance).t_eq


@dataclass(frozen=True)
class TeqEstimate:
    t_eq: float  # in the units of ``times``
    low: float
    high: float
    replicates: np.ndarray  # bootstrap t_eq (NaN where the replicate never settles after an approach)
    settling: Settling
    floor_end: float  # noise floor averaged over the final window
    floor_rse: float  # its relative standard error over the bootstrap resamples (NaN without resamples)


def t_eq_with_bootstrap(times: np.ndarray, dis: np.ndarray, groups: np.ndarray, *, tolerance: float,
                        window: float, width: float, resamples: int, seed: int, approach: float = 0.3,
                        floor_tolerance: float = math.inf) -> TeqEstimate:
    """t_eq and a 95 % percentile interval from resampling seeds (branches) within each start (the per-start
    floors are resampled with them); also the noise floor over the final window (the last ``window`` of
    intrinsic time) and its bootstrap relative error."""
    between, floor = curves(dis, groups)
    rule: dict[str, Any] = {"tolerance": tolerance, "window": window, "width": width, "approach": approach,
                            "floor_tolerance": floor_tolerance}
    point = settle(times, between, floor, per_start=start_floors(dis, groups), **rule)
    tail = times >= times[-1] - window - 1e-9
    floor_end = float(np.mean(floor[tail])) if len(times) else math.nan
    rng = np.random.default_rng(seed)
    reps = np.full(resamples, np.nan)
    floor_reps = np.full(resamples, np.nan)
    members = [np.nonzero(groups == g)[0] for g in np.unique(groups)]
    for b in range(resamples):
        counts = np.zeros(len(groups))
        for m in members:
            np.add.at(counts, rng.choice(m, size=len(m), replace=True), 1.0)
        bb, ff = curves(dis, groups, counts)
        if np.all(np.isfinite(ff)):
            reps[b] = settle(times, bb, ff, per_start=start_floors(dis, groups, counts), **rule).t_eq
            floor_reps[b] = float(np.mean(ff[tail]))
    finite = reps[np.isfinite(reps)]
    # The interval covers the replicates that settle; the share that does not is reported next to it.
    low, high = (float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))) if len(finite) else (
        math.nan, math.nan)
    fr = floor_reps[np.isfinite(floor_reps)]
    rse = float(np.std(fr, ddof=1) / floor_end) if len(fr) > 1 and floor_end > 0 else math.nan
    return TeqEstimate(point.t_eq, low, high, reps, point, floor_end, rse)


def floor_spread(times: np.ndarray, dis: np.ndarray, groups: np.ndarray, window: float) -> float:
    """(largest − smallest) per-start noise floor over the final ``window``, relative to the pooled floor.

    At equilibrium every start's seeds are draws from one distribution, so each start's own floor has the same
    expectation. The between/floor ratio is blind to starts whose distributions differ in spread (one start's
    copies noisier and less accurate than the other's: the cross-disagreement then sits near the average of the
    two floors); this diagnostic is not."""
    if len(times) == 0:
        return math.nan
    tail = times >= times[-1] - window - 1e-9
    return floor_gap(start_floors(dis[tail], groups).mean(1))


def predicted_angle(optimizer: str, lr: float, weight_decay: float, momentum: float) -> float:
    """Equilibrium angular update per step of a scale-invariant weight (docs/theory.md): √(2ηλ/(1+μ)) for SGD
    with coupled decay, √(2ηλ(1−β1)/(1+β1)) for AdamW (``momentum`` = β1)."""
    if optimizer == "sgd":
        return math.sqrt(2.0 * lr * weight_decay / (1.0 + momentum))
    return math.sqrt(2.0 * lr * weight_decay * (1.0 - momentum) / (1.0 + momentum))


def label_l1(preds: np.ndarray, groups: np.ndarray, classes: int) -> float:
    """LLA20's distance (docs/equilibrium.md): mean over inputs of Σ_y |p_a(y|x) − p_b(y|x)|, p = label frequencies over
    a start's seeds, averaged over start pairs. Biased upwards by finite seeds; for comparison only."""
    dists = []
    starts = np.unique(groups)
    freq = {g: np.stack([(preds[groups == g] == c).mean(0) for c in range(classes)]) for g in starts}
    for i, a in enumerate(starts):
        for b in starts[i + 1:]:
            dists.append(float(np.abs(freq[a] - freq[b]).sum(0).mean()))
    return float(np.mean(dists)) if dists else math.nan


def is_periodic(norms: np.ndarray, swing: float = 0.2) -> bool:
    """Norm curves (E, K) that, over the second half of the run, both rise and fall by more than ``swing`` in log
    (largest draw-up and largest draw-down) in at least half of the branches: the periodic regime (norms shrink,
    a step destabilises, they jump back up), not an equilibrium. Equilibrium noise on the digits example moves
    the log norm by ≤ 0.1; the periodic regime there by 0.5–0.9."""
    if norms.shape[0] < 4 or not np.all(np.isfinite(norms)) or np.any(norms <= 0):
        return False
    z = np.log(norms[norms.shape[0] // 2:])
    up = (z - np.minimum.accumulate(z, axis=0)).max(0)
    down = (np.maximum.accumulate(z, axis=0) - z).max(0)
    return bool(np.mean((up > swing) & (down > swing)) >= 0.5)


def relaxation(times: np.ndarray, norms: np.ndarray, groups: np.ndarray, *, optimizer: str, intrinsic_lr: float,
               eps: float) -> tuple[float, float]:
    """Parameter-space (norm) relaxation (docs/theory.md): measured and predicted steps for the total SI norm to
    stay within ε of its equilibrium value (mean over the last quarter of the run). Slowest start."""
    if norms.size == 0 or not np.all(np.isfinite(norms)):
        return math.nan, math.nan
    tail = times >= times[-1] - 0.25 * (times[-1] - times[0])
    target = float(norms[tail].mean())
    measured, predicted = [], []
    power, rate = (4.0, 4.0) if optimizer == "sgd" else (2.0, 2.0)
    for g in np.unique(groups):
        r = norms[:, groups == g] / target
        per_seed = []
        for k in range(r.shape[1]):
            bad = np.nonzero(np.abs(r[:, k] - 1.0) > eps)[0]
            per_seed.append(times[0] if len(bad) == 0 else (times[bad[-1] + 1] if bad[-1] + 1 < len(times) else np.nan))
        measured.append(float(np.median(per_seed)))
        r0 = float(r[0].mean())
        edge = (1.0 + eps) if r0 > 1 else (1.0 - eps)
        if abs(r0 - 1.0) <= eps:
            predicted.append(0.0)
        else:
            predicted.append(math.log(abs(r0**power - 1) / abs(edge**power - 1)) / (rate * intrinsic_lr))
    return float(np.max(measured)), float(np.max(predicted))


@dataclass(frozen=True)
class Exponent:
    slope: float  # k in t_eq ∝ (1/λ_e)^k
    low: float  # 95 % percentile interval of k over paired bootstrap replicates
    high: float
    arms: int
    note: str
    intercept: float = math.nan  # log t_eq at 1/λ_e = 1 (for drawing the fitted line)
    replicates_used: float = math.nan  # share of bootstrap replicates in which ≥ 3 arms settled

    @property
    def contains_one(self) -> bool | None:
        """Whether the conjecture's exponent 1 lies inside the interval (None without an interval)."""
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return None
        return self.low <= 1.0 <= self.high


def fit_exponent(intrinsic_lr: np.ndarray, t_eq: np.ndarray, replicates: list[np.ndarray]) -> Exponent:
    """Least-squares slope of log t_eq (steps) vs log(1/λ_e) over arms that equilibrated, with a percentile
    interval from refitting on paired bootstrap replicates (replicate b of every arm; arms are independent
    trainings, so pairing by index is a valid joint resample). A replicate counts only when ≥ 3 arms settle in
    it, as for the point estimate."""
    ok = np.isfinite(t_eq) & (t_eq > 0)
    # Two points always fit a line exactly (no residual, no honest interval): a slope needs three arms.
    if len(np.unique(intrinsic_lr[ok])) < 3:
        return Exponent(math.nan, math.nan, math.nan, int(ok.sum()),
                        "fewer than three equilibrated arms with different intrinsic LRs: no fit")
    x = np.log(1.0 / intrinsic_lr[ok])
    slope, intercept = (float(v) for v in np.polyfit(x, np.log(t_eq[ok]), 1))
    boots = []
    reps = [r for r, k in zip(replicates, ok, strict=True) if k]
    n = min((len(r) for r in reps), default=0)
    for b in range(n):
        yb = np.array([r[b] for r in reps])
        good = np.isfinite(yb) & (yb > 0)
        if len(np.unique(x[good])) >= 3:
            boots.append(float(np.polyfit(x[good], np.log(yb[good]), 1)[0]))
    low, high = (float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))) if boots else (math.nan, math.nan)
    return Exponent(slope, low, high, int(ok.sum()), "" if boots else "no bootstrap replicates: interval unknown",
                    intercept, len(boots) / n if n else math.nan)
