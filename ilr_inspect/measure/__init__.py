"""Norms, effective and intrinsic LR, intrinsic time and angular updates per unit — one pass over the series.

``measure(series, units)`` computes everything together (each checkpoint file read once); the public ``norms`` and
``angles`` (:mod:`ilr_inspect.api`) are its two tables as Results. This package takes units from its caller and
never imports the detectors in :mod:`ilr_inspect.invariance` (only the :class:`Unit` record).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..checkpoint import Checkpoint, HParams
from ..invariance.unit import Unit
from ..output import Records
from . import step_angle, theory
from .regime import Regime, classify
from .stream import TensorStats, stream_stats

if TYPE_CHECKING:
    import pandas as pd

    from ..formats import OpenOptions

CHANGE_TOL = 0.05  # a relative jump of λ_e larger than this between checkpoints is a schedule change


class SeriesLike(Protocol):
    checkpoints: list[Checkpoint]

    def hparams_for(self, ckpt: Checkpoint) -> dict[str, HParams]: ...


@dataclass
class Measurement:
    """Everything one pass produces. The four tables are kept as rows (:class:`~ilr_inspect.output.Records`);
    their DataFrames are built on first access, so the CLI renders them without importing pandas."""

    norm_rows: Records
    angle_rows: Records
    tensor_rows: Records
    tensor_angle_rows: Records
    units: list[Unit]
    regimes: dict[str, Regime]
    warnings: list[str] = field(default_factory=list)

    @property
    def norms(self) -> pd.DataFrame:
        return self.norm_rows.frame()

    @property
    def angles(self) -> pd.DataFrame:
        return self.angle_rows.frame()

    @property
    def per_tensor(self) -> pd.DataFrame:
        return self.tensor_rows.frame()

    @property
    def per_tensor_angles(self) -> pd.DataFrame:
        return self.tensor_angle_rows.frame()


@dataclass
class _Track:
    """Running state of one unit (or tensor) across the series: only what the next checkpoint needs."""

    prev_blocks: np.ndarray | None = None
    prev_step: float | None = None
    prev_lam: float | None = None
    tau: float = 0.0
    total: float = 0.0  # Σ λ_e since the first checkpoint (not reset at schedule changes)
    origin: float | None = None
    rows_norm: list[float] = field(default_factory=list)
    rows_step: list[float] = field(default_factory=list)
    rows_tau: list[float] = field(default_factory=list)
    angle_ratios: list[float] = field(default_factory=list)
    last_done: float | None = None
    last_wd: float | None = None
    step_ratios: list[float] = field(default_factory=list)  # reconstructed last-step angle / Δ*, per checkpoint
    gap_angles: list[tuple[float, float]] = field(default_factory=list)  # (steps, angle) per checkpoint pair


def _hparams_for(series: SeriesLike, ck: Checkpoint) -> dict[str, HParams]:
    fn = getattr(series, "hparams_for", None)
    return fn(ck) if fn is not None else dict(ck.hparams)


@dataclass
class _Sums:
    """A unit's sums per block (one block; rows for ``channel``; row groups for ``group``)."""

    cur: np.ndarray  # ‖b‖²
    prev: np.ndarray | None  # ‖a‖² (previous checkpoint)
    tang: np.ndarray | None  # P = ‖a‖‖b‖·‖â − b̂‖²


def _unit_sums(unit: Unit, stats: dict[str, TensorStats]) -> _Sums | None:
    """Combine member rows into blocks. For a block of several entries (rows or tensors) i,
    P = Σ P_i + 2(‖a‖‖b‖ − Σ ‖a_i‖‖b_i‖), which follows from P = 2(‖a‖‖b‖ − ⟨a,b⟩) and ⟨a,b⟩ = Σ⟨a_i,b_i⟩."""
    sts = [stats[m] for m in unit.members if m in stats]
    if not sts or len(sts) < len(unit.members):
        return None
    rows = sts[0].sumsq.shape[0]
    per_row = unit.kind in ("channel", "group") and rows > 1 and all(s.sumsq.shape[0] == rows for s in sts)
    groups = unit.groups if unit.kind == "group" and unit.groups and rows % unit.groups == 0 else None
    n_blocks = (groups or rows) if per_row else 1

    def block(x: np.ndarray) -> np.ndarray:
        if not per_row:
            return np.array([float(x.sum())])
        return np.asarray(x.reshape(n_blocks, -1).sum(axis=1)) if groups else x

    cur = block(np.sum([s.sumsq for s in sts], axis=0)) if per_row else block(
        np.array([float(s.sumsq.sum()) for s in sts]))
    if any(s.prev_sumsq is None or s.tang is None for s in sts):
        return _Sums(cur, None, None)
    prev_rows = [s.prev_sumsq for s in sts if s.prev_sumsq is not None]
    tang_rows = [s.tang for s in sts if s.tang is not None]
    if per_row:
        a2 = np.sum(prev_rows, axis=0)
        cross = np.sum([np.sqrt(p * s.sumsq) for p, s in zip(prev_rows, sts, strict=True)], axis=0)
        prev, tsum, csum = block(a2), block(np.sum(tang_rows, axis=0)), block(cross)
    else:
        prev = np.array([float(sum(float(p.sum()) for p in prev_rows))])
        tsum = np.array([float(sum(float(t.sum()) for t in tang_rows))])
        csum = np.array([float(sum(float(np.sqrt(p * s.sumsq).sum()) for p, s in zip(prev_rows, sts, strict=True)))])
    tang = tsum + 2.0 * np.maximum(np.sqrt(prev * cur) - csum, 0.0)
    return _Sums(cur, prev, tang)


def _angle(prev_n2: np.ndarray, cur_n2: np.ndarray, tang: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Angle and cosine per block: q = ‖â−b̂‖² = P/(‖a‖‖b‖), θ = 2·atan2(√q, √(4−q)) (docs/theory.md §5)."""
    na, nb = np.sqrt(prev_n2), np.sqrt(cur_n2)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = tang / (na * nb)
    q = np.clip(q, 0.0, 4.0)
    theta = 2.0 * np.arctan2(np.sqrt(q), np.sqrt(4.0 - q))
    bad = (na == 0) | (nb == 0)
    theta = np.where(bad, np.nan, theta)
    return theta, np.where(bad, np.nan, 1.0 - q / 2.0)


def _f(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _unit_hp(unit: Unit, hps: dict[str, HParams]) -> tuple[HParams | None, str]:
    found = [hps[m] for m in unit.members if m in hps]
    if not found:
        return None, ""
    first = found[0]
    differs = any((h.lr, h.weight_decay, h.momentum) != (first.lr, first.weight_decay, first.momentum) for h in found)
    return first, ("members have different hyperparameters; the first member's are used" if differs else "")


def _row(unit: Unit, track: _Track, ck: Checkpoint, hp: HParams | None, blocks: np.ndarray, numel: int,
         warnings: list[str], note: str) -> tuple[dict[str, Any], float | None]:
    d = theory.dynamics(hp)
    step = float(ck.step) if ck.step is not None else math.nan
    lam = d.intrinsic_lr
    # Intrinsic time since the last schedule change: Σ λ_e over the steps between checkpoints.
    if track.prev_step is None or not math.isfinite(step):
        track.tau, track.origin = 0.0, step
    else:
        spent = track.prev_lam if (hp is None or hp.lr_timing == "next") else lam
        track.total += (spent or 0.0) * (step - track.prev_step)
        changed = (lam is None) != (track.prev_lam is None) or (
            lam is not None and track.prev_lam is not None
            and abs(lam - track.prev_lam) > CHANGE_TOL * max(abs(lam), abs(track.prev_lam), 1e-300))
        if changed:
            track.tau, track.origin = 0.0, step
        else:
            rate = track.prev_lam if (hp is None or hp.lr_timing == "next") else lam
            track.tau += (rate or 0.0) * (step - track.prev_step)
    blocks_norm = np.sqrt(blocks)
    total = float(math.sqrt(float(blocks.sum())))
    b = len(blocks)
    norm = total if b == 1 else float(math.sqrt(float(blocks.mean())))  # RMS over channels/groups (REQ)
    lr = d.lr
    eff_sq = lr / norm**2 if lr is not None and norm > 0 else math.nan
    eff_lin = lr / norm if lr is not None and norm > 0 else math.nan
    adam_like = d.family in ("adam", "lion")
    # Equilibrium predictions describe scale-invariant units only; elsewhere they would be numbers without meaning.
    si = bool(unit.scale_invariant)
    relax = theory.relaxation_time(d) if si else None
    done = theory.relaxation_done(d, track.tau) if si else None
    closed = theory.equilibrium_norm_closed_form(d, max(1, numel // b)) if si else None
    row: dict[str, Any] = {
        "step": ck.step, "checkpoint": str(ck.path), "unit": unit.name, "members": unit.members_text,
        "scale_invariant": unit.scale_invariant, "evidence": unit.evidence, "numel": numel, "norm": norm,
        "lr": _f(lr), "weight_decay": _f(d.weight_decay), "momentum": _f(hp.momentum if hp else None),
        "optimizer": hp.optimizer if hp else None, "wd_mode": d.wd_mode, "intrinsic_lr": _f(lam),
        "effective_lr": eff_lin if adam_like else eff_sq, "intrinsic_time": track.tau if lam is not None else math.nan,
        "intrinsic_time_total": track.total if lam is not None else math.nan,
        "kind": unit.kind, "role": unit.role, "norm_total": total,
        "row_norm_min": float(blocks_norm.min()) if b > 1 else math.nan,
        "row_norm_max": float(blocks_norm.max()) if b > 1 else math.nan,
        "effective_lr_form": "lr/norm" if adam_like else "lr/norm^2", "effective_lr_sq": eff_sq,
        "effective_lr_lin": eff_lin, "schedule_origin_step": track.origin,
        "steps_since_change": step - track.origin if track.origin is not None else math.nan,
        "relaxation_steps": _f(relax), "relaxation_done": _f(done),
        "predicted_angle_per_step": _f(theory.equilibrium_angle(d)) if si else math.nan,
        "predicted_norm": _f(closed), "predicted_norm_source": "closed-form" if closed else None,
        "norm_ratio": norm / closed if closed else math.nan,
        "hparams_source": hp.source if hp else None, "lr_timing": hp.lr_timing if hp else None,
        "note": "; ".join(x for x in (d.note, note) if x),
    }
    track.prev_step, track.prev_lam = step, lam
    track.last_done, track.last_wd = done, d.weight_decay
    return row, closed


def _angle_row(unit: Unit, track: _Track, prev_ck: Checkpoint, ck: Checkpoint, hp_prev: HParams | None,
               hp_cur: HParams | None, prev_b: np.ndarray, cur_b: np.ndarray, tang_b: np.ndarray) -> dict[str, Any]:
    theta, cos = _angle(prev_b, cur_b, tang_b)
    ok = np.isfinite(theta)
    angle = float(np.sqrt(np.mean(theta[ok] ** 2))) if ok.any() else math.nan  # RMS over channels (REQ)
    cosine = float(np.mean(cos[ok])) if ok.any() else math.nan
    steps = (ck.step - prev_ck.step) if ck.step is not None and prev_ck.step is not None else None
    hp = hp_prev if (hp_cur is None or hp_cur.lr_timing == "next") else hp_cur
    d = theory.dynamics(hp if hp is not None else hp_cur)
    pred = theory.predicted_angle(d, steps) if steps and unit.scale_invariant else None
    diff2 = tang_b + (np.sqrt(prev_b) - np.sqrt(cur_b)) ** 2  # ‖a − b‖² per block
    rel = math.sqrt(float(diff2.sum()) / float(prev_b.sum())) if prev_b.sum() > 0 else math.nan
    row: dict[str, Any] = {
        "step_from": prev_ck.step, "step_to": ck.step, "steps": steps, "unit": unit.name, "cosine": cosine,
        "angle": angle, "angle_per_step": angle / steps if steps else math.nan,
        "angle_per_sqrt_step": angle / math.sqrt(steps) if steps else math.nan, "relative_update": rel,
        "predicted_angle_per_step": pred / steps if pred is not None and steps else math.nan,
        "ratio": angle / pred if pred else math.nan, "predicted_angle": _f(pred),
        "equilibrium_angle_per_step": _f(theory.equilibrium_angle(d)) if unit.scale_invariant else math.nan,
        "members": unit.members_text,
        "kind": unit.kind, "scale_invariant": unit.scale_invariant, "evidence": unit.evidence,
        "angle_max": float(np.max(theta[ok])) if ok.any() and len(theta) > 1 else math.nan,
        "checkpoint_from": str(prev_ck.path), "checkpoint_to": str(ck.path),
    }
    ratio = float(row["ratio"])
    if math.isfinite(ratio):
        track.angle_ratios.append(ratio)
    return row


def _tensor_units(units: Sequence[Unit]) -> list[tuple[str, Unit]]:
    out = []
    for u in units:
        for m in u.members:
            out.append((m, Unit(m, (m,), "tensor", u.scale_invariant, u.evidence, u.reason, role=u.role)))
    return out


def _needs_angle(u: Unit, cks: Sequence[Checkpoint], hps: Sequence[dict[str, HParams]]) -> bool:
    """Whether a norms row of ``u`` may take its ``predicted_norm`` from the angle to the previous checkpoint
    (the "angle-implied" equilibrium norm of :func:`measure`): a scale-invariant unit at a checkpoint where the
    closed form is unavailable and the theory predicts an angle for the gap. Decided from hyperparameters and
    shapes alone, before any tensor is read; it errs towards True (the closed form is tried at the unit's full
    size, where it is largest, and the measured angle is not known yet)."""
    if not u.scale_invariant:
        return False
    for i in range(1, len(cks)):
        prev_ck, ck = cks[i - 1], cks[i]
        steps = (ck.step - prev_ck.step) if ck.step is not None and prev_ck.step is not None else None
        if not steps:
            continue
        hp, _ = _unit_hp(u, hps[i])
        numel = sum(math.prod(ck.tensors[m].shape) for m in u.members if m in ck.tensors)
        if math.isfinite(_f(theory.equilibrium_norm_closed_form(theory.dynamics(hp), max(1, numel)))):
            continue
        hp_prev, _ = _unit_hp(u, hps[i - 1])
        pred = theory.predicted_angle(theory.dynamics(hp_prev or hp), steps)
        if pred is not None and pred > 0:
            return True
    return False


def measure(series: SeriesLike, units: Sequence[Unit], *, per_tensor: bool = False,
            granularity: str = "tensor", quiet: bool = True, ray: str | None = None,
            options: OpenOptions | None = None, angles: bool = True) -> Measurement:
    """One streamed pass: norms, angles and regimes for every unit (and optionally every member tensor).

    ``angles=False``: only the norms tables are wanted (``norm_rows``, ``tensor_rows``; they are the same as with
    angles). Tensors are then read once per checkpoint with no previous value kept, except the members of units
    whose norms row may need its angle (:func:`_needs_angle`); ``angle_rows``, ``tensor_angle_rows`` and
    ``regimes`` come back empty.

    ``ray``: run the pass as tasks on that Ray cluster (``local``, ``auto``, ``host:port``), reopening the
    checkpoints there with ``options`` (the ones the series was opened with); the tables are the same.

    ``units`` come from the caller (:func:`ilr_inspect.invariance.detect_units` or a user file): measuring never
    detects, so this module does not depend on the detectors. ``granularity`` is recorded, not acted on.
    """
    cks = list(series.checkpoints)
    units = list(units)
    tensor_units = _tensor_units(units) if per_tensor else []
    names = sorted({m for u in units for m in u.members})
    tracks = {u.name: _Track() for u in units}
    ttracks = {f"{u.name}\x00{m}": _Track() for m, u in tensor_units}
    owner = {m: u.name for u in units for m in u.members}
    norm_rows: list[dict[str, Any]] = []
    angle_rows: list[dict[str, Any]] = []
    t_rows: list[dict[str, Any]] = []
    ta_rows: list[dict[str, Any]] = []
    warnings: list[str] = list(getattr(series, "warnings", []) or [])
    prev_ck: Checkpoint | None = None
    prev_hps: dict[str, HParams] = {}
    row_names = {m for u in units if u.kind in ("channel", "group") for m in u.members}
    recon = step_angle.Reconstructor(getattr(series, "logs", None))
    all_hps: list[dict[str, HParams]] | None = None
    pair_names: set[str] | None = None
    if not angles:
        all_hps = [_hparams_for(series, ck) for ck in cks]
        pair_names = {m for u in [*units, *(tu for _, tu in tensor_units)] if _needs_angle(u, cks, all_hps)
                      for m in u.members}
    for cs in stream_stats(cks, names, quiet=quiet, row_names=row_names, ray=ray, options=options,
                           pair_names=pair_names):
        ck = cs.checkpoint
        warnings.extend(f"{ck.path.name}: {w}" for w in cs.warnings)
        hps = all_hps[cs.index] if all_hps is not None else _hparams_for(series, ck)
        # The last update, from the optimizer state (a second read of the unit tensors, only where state exists).
        step_units, step_tensors = recon.checkpoint(ck, units, [u for _, u in tensor_units], hps)
        for kind_rows, a_rows, pairs, trk in ((norm_rows, angle_rows, [(u.name, u) for u in units], tracks),
                                              (t_rows, ta_rows, tensor_units, ttracks)):
            for key, u in pairs:
                tkey = key if trk is tracks else f"{u.name}\x00{key}"
                track = trk[tkey]
                sums = _unit_sums(u, cs.tensors)
                if sums is None:
                    continue
                cur = sums.cur
                numel = sum(cs.tensors[m].numel for m in u.members)
                hp, note = _unit_hp(u, hps)
                row, _ = _row(u, track, ck, hp, cur, numel, warnings, note)
                got = (step_units if trk is tracks else step_tensors).get(u.name)
                row.update(step_angle.columns(got, hp, bool(u.scale_invariant)))
                if math.isfinite(row["step_angle_ratio"]):
                    track.step_ratios.append(row["step_angle_ratio"])
                if trk is ttracks:
                    row["parameter"] = key
                    row["unit"] = owner.get(key, key)
                if prev_ck is not None and sums.prev is not None and sums.tang is not None \
                        and sums.prev.shape == cur.shape:
                    hp_prev, _ = _unit_hp(u, prev_hps)
                    arow = _angle_row(u, track, prev_ck, ck, hp_prev, hp, sums.prev, cur, sums.tang)
                    if trk is ttracks:
                        arow["parameter"] = key
                        arow["unit"] = owner.get(key, key)
                    a_rows.append(arow)
                    if arow["steps"] and math.isfinite(arow["angle"]):
                        track.gap_angles.append((float(arow["steps"]), float(arow["angle"])))
                    closed = row["predicted_norm"]
                    if not math.isfinite(closed) and u.scale_invariant and arow["steps"]:
                        implied = theory.implied_equilibrium_norm(theory.dynamics(hp_prev or hp), row["norm"],
                                                                  arow["angle"], arow["steps"])
                        if implied:
                            row["predicted_norm"], row["predicted_norm_source"] = implied, "angle-implied"
                            row["norm_ratio"] = row["norm"] / implied
                track.prev_blocks = cur
                track.rows_norm.append(row["norm"])
                track.rows_step.append(float(ck.step) if ck.step is not None else math.nan)
                track.rows_tau.append(row["intrinsic_time"])
                kind_rows.append(row)
        prev_ck, prev_hps = ck, hps
    regimes: dict[str, Regime] = {}
    for u in units:
        tr = tracks[u.name]
        seg = _current_segment(tr)
        regimes[u.name] = classify([tr.rows_step[i] for i in seg], [tr.rows_norm[i] for i in seg],
                                   [tr.rows_tau[i] for i in seg], tr.last_wd, tr.last_done, tr.angle_ratios,
                                   u.scale_invariant, step_ratios=tr.step_ratios, gap_angles=tr.gap_angles)
        if u.role == "no-effect":
            regimes[u.name] = Regime("undetermined", "no effect on the output (removed by a normalizer)")
    if not angles:  # partial (only the units that needed them): not handed out as if complete
        angle_rows, ta_rows, regimes = [], [], {}
    return Measurement(Records(norm_rows), Records(angle_rows), Records(t_rows), Records(ta_rows), units, regimes,
                       warnings)


def _current_segment(tr: _Track) -> list[int]:
    """Indices since the last schedule change (where τ was reset), for periodicity the whole series."""
    n = len(tr.rows_tau)
    start = 0
    for i in range(1, n):
        if tr.rows_tau[i] == 0.0 and tr.rows_tau[i - 1] != 0.0:
            start = i
    idx = list(range(start, n))
    return idx if len(idx) >= 3 else list(range(n))


__all__ = ["Measurement", "SeriesLike", "measure"]
