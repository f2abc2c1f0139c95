"""One arm of the protocol: retrain every start with several seeds, evaluate on a schedule in intrinsic time.

Branch k = start s · seeds + seed r. Everything random is a pure function of (protocol seed, branch, step):
each branch's batch order comes from its own generator re-seeded per epoch, the input noise of step t from a
generator seeded with t. So a resumed run reproduces the uninterrupted one exactly, and the same seeds give the
same numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from . import analysis
from .config import Arm, ProtocolSpec
from .engine import Engine, OptimSpec
from .inputs import Data, Start
from .store import Store

EvalCallback = Callable[[str, int, int], None]  # (arm id, evaluations done, evaluations in total)


@dataclass(frozen=True)
class Schedule:
    interval: int  # steps between evaluations
    evals: int  # evaluations after step 0
    intrinsic_lr: float

    @property
    def steps(self) -> int:
        return self.interval * self.evals

    @staticmethod
    def of(arm: Arm, proto: ProtocolSpec) -> Schedule:
        lam = arm.intrinsic_lr
        interval = max(1, round(proto.eval_every / lam))
        return Schedule(interval, max(1, math.ceil(proto.horizon / lam / interval)), lam)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


class _Batches:
    """Per-branch shuffled epochs (drop-last), drawn on the CPU, gathered on the device."""

    def __init__(self, seeds: Sequence[int], n: int, batch: int, device: torch.device) -> None:
        if batch > n:
            raise UsageError(f"batch size {batch} exceeds the {n} training examples")
        self.seeds, self.n, self.batch, self.device = list(seeds), n, batch, device
        self.per_epoch = n // batch
        self._epoch = -1
        self._perm = torch.empty(0)

    def indices(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gens = [torch.Generator().manual_seed(_seed(s, epoch)) for s in self.seeds]
            self._perm = torch.stack([torch.randperm(self.n, generator=g) for g in gens]).to(self.device)
            self._epoch = epoch
        return self._perm[:, pos * self.batch:(pos + 1) * self.batch]


def _no_decay(model: nn.Module, decay: str, si_names: Sequence[str]) -> list[str]:
    """Parameters trained without weight decay under the arm's ``decay`` mode."""
    names = [n for n, _ in model.named_parameters()]
    if decay == "weights":
        return [n for n, p in model.named_parameters() if p.ndim < 2]
    if decay == "scale-invariant":
        if not si_names:
            raise UsageError('decay = "scale-invariant", but no scale-invariant weights were found in the model',
                             hint='use decay = "weights" or "all"')
        return [n for n in names if n not in set(si_names)]
    return []


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-branch angle between (K, ...) weights, 2·atan2(‖â−b̂‖, ‖â+b̂‖) in float64 (accurate for tiny angles)."""
    ua = a.flatten(1).double()
    ub = b.flatten(1).double()
    ua = ua / ua.norm(dim=1, keepdim=True)
    ub = ub / ub.norm(dim=1, keepdim=True)
    return 2.0 * torch.atan2((ua - ub).norm(dim=1), (ua + ub).norm(dim=1))


def _angle_summary(arm: Arm, records: Sequence[Mapping[str, np.ndarray]]) -> tuple[float, float]:
    """Measured per-step angle of the scale-invariant weights (RMS over tensors, mean over branches, median over
    the second half of the evaluations) and the equilibrium prediction for the arm's optimizer."""
    pred = analysis.predicted_angle(arm.optimizer, arm.lr, arm.weight_decay, arm.momentum)
    per_eval = [float(np.mean(np.sqrt(np.mean(a**2, axis=1)))) for r in records
                if (a := r.get("si_angle")) is not None and a.size and np.all(np.isfinite(a))]
    if not per_eval:
        return math.nan, pred
    return float(np.median(per_eval[len(per_eval) // 2:])), pred


def branch_seeds(proto_seed: int, n_starts: int, seeds: int) -> list[int]:
    return [_seed(proto_seed, s, r) for s in range(n_starts) for r in range(seeds)]


class ArmRunner:
    """Retrains one arm (resuming from ``store`` when it holds a partial run) and returns its records."""

    def __init__(self, arm: Arm, proto: ProtocolSpec, model: nn.Module, starts: Sequence[Start],
                 start_states: Mapping[str, Mapping[str, torch.Tensor]], data: Data, si_names: Sequence[str],
                 device: torch.device, *, fuse: bool | None = None, compile: bool = False, cuda_graph: bool = False,
                 log: Callable[[str], None] | None = None) -> None:
        self.arm, self.proto, self.device = arm, proto, device
        self.schedule = Schedule.of(arm, proto)
        self.starts = list(starts)
        self.K = len(starts) * arm.seeds
        self.groups = np.repeat(np.arange(len(starts)), arm.seeds)
        self.si_names = list(si_names)
        self.seeds = branch_seeds(proto.seed, len(starts), arm.seeds)
        states = [start_states[s.label] for s in starts for _ in range(arm.seeds)]
        no_decay = _no_decay(model, arm.decay, si_names)
        optim = OptimSpec(arm.optimizer, momentum=arm.momentum if arm.optimizer == "sgd" else 0.0,
                          beta1=arm.momentum if arm.optimizer == "adamw" else 0.9, beta2=arm.beta2, eps=arm.eps)
        self.x_train = torch.from_numpy(data.x_train).to(device)
        self.y_train = torch.from_numpy(data.y_train).to(device)
        self.x_test = torch.from_numpy(data.x_test).to(device)
        self.y_test = torch.from_numpy(data.y_test).to(device)
        self.x_probe = None if data.x_probe is data.x_test else torch.from_numpy(data.x_probe).to(device)
        self.engine = Engine(model, states, [arm.lr] * self.K, [arm.weight_decay] * self.K, optim,
                             no_decay=no_decay, device=device, fuse=fuse, compile=compile, cuda_graph=cuda_graph,
                             log=log, probe_input=self.x_train[: min(arm.batch_size, 8)])
        self.batches = _Batches(self.seeds, len(self.x_train), arm.batch_size, device)
        self.noise_gen = torch.Generator(device=device)
        self.branch_steps_per_s = math.nan
        self._before: dict[str, torch.Tensor] | None = None  # SI weights before the last step (per-step angle)

    # ------------------------------------------------------------------------------------------------------
    def _train(self, steps: int) -> torch.Tensor:
        e = self.engine
        total = torch.zeros(self.K, device=self.device)
        for i in range(steps):
            if i == steps - 1:
                self._before = {n: e.params[n].detach().clone() for n in self.si_names}
            t = e.step_count
            idx = self.batches.indices(t)
            x, y = self.x_train[idx], self.y_train[idx]
            if self.arm.input_noise > 0:
                self.noise_gen.manual_seed(_seed(self.proto.seed, 1_000_003, t))
                x = x + self.arm.input_noise * torch.randn(x.shape, generator=self.noise_gen, device=self.device)
            total += e.step(x, y)
        return total / max(steps, 1)

    @torch.no_grad()
    def _evaluate(self, train_loss: torch.Tensor) -> dict[str, np.ndarray]:
        e = self.engine
        logits = e.logits(self.x_test, self.proto.eval_batch)
        pred = logits.argmax(-1)
        acc = (pred == self.y_test).float().mean(1)
        loss = F.cross_entropy(logits.flatten(0, 1), self.y_test.repeat(self.K), reduction="none").view(self.K, -1)
        probe = pred if self.x_probe is None else e.logits(self.x_probe, self.proto.eval_batch).argmax(-1)
        dis = (probe[:, None, :] != probe[None, :, :]).float().mean(-1)
        norms = torch.stack([e.params[n].detach().flatten(1).double().pow(2).sum(1).sqrt() for n in self.si_names],
                            1) if self.si_names else torch.zeros(self.K, 0, dtype=torch.float64)
        angles = torch.full((self.K, len(self.si_names)), math.nan, dtype=torch.float64)
        if self._before is not None and self.si_names:
            angles = torch.stack([_angle(self._before[n], e.params[n].detach()) for n in self.si_names], 1).cpu()
        self._before = None
        return {
            "step": np.array(e.step_count),
            "train_loss": train_loss.cpu().numpy().astype(np.float64),
            "test_acc": acc.cpu().numpy().astype(np.float64),
            "test_loss": loss.mean(1).cpu().numpy().astype(np.float64),
            "preds": probe.cpu().numpy().astype(np.int16),
            "dis": dis.cpu().numpy().astype(np.float64),
            "si_norms": norms.cpu().numpy(),
            "si_angle": angles.numpy(),
        }

    def run(self, store: Store, on_eval: EvalCallback | None = None,
            on_steps: Callable[[int], None] | None = None) -> list[dict[str, np.ndarray]]:
        """Train to the horizon, one evaluation interval at a time, saving after each evaluation."""
        arm, sch, e = self.arm, self.schedule, self.engine
        saved = store.load_state(arm.id)
        records: list[dict[str, np.ndarray]] = []
        if saved is not None:
            e.load_state_dict(saved["engine"], path=str(store.state_path(arm.id)))
            records = store.load_evals(arm.id, int(saved["evals"]))
            if on_steps is not None:
                on_steps(e.step_count)
        steps_run, t0 = 0, time.perf_counter()
        while len(records) <= sch.evals:
            if records:
                train_loss = self._train(sch.interval)
                steps_run += sch.interval
                if on_steps is not None:
                    on_steps(sch.interval)
            else:
                train_loss = torch.full((self.K,), math.nan, device=self.device)
            rec = self._evaluate(train_loss)
            store.save_eval(arm.id, len(records), rec)
            records.append(rec)
            store.save_state(arm.id, {"evals": len(records), "engine": e.state_dict()})
            if on_eval is not None:
                on_eval(arm.id, len(records), sch.evals + 1)
        if steps_run:
            self.branch_steps_per_s = steps_run * self.K / (time.perf_counter() - t0)
        return records


def summarize(arm: Arm, proto: ProtocolSpec, starts: Sequence[Start], records: Sequence[Mapping[str, np.ndarray]],
              *, classes: int, smoke: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]], np.ndarray]:
    """The arm's result row, its curve rows (one per evaluation × start), and the bootstrap t_eq replicates.

    ``smoke`` (--quick): the run is far too short to time anything; the status says so and no t_eq is given."""
    sch = Schedule.of(arm, proto)
    lam = sch.intrinsic_lr
    groups = np.repeat(np.arange(len(starts)), arm.seeds)
    steps = np.array([int(r["step"]) for r in records], dtype=np.float64)
    times = steps * lam
    dis = np.stack([r["dis"] for r in records])
    between, floor = analysis.curves(dis, groups)
    # Step 0 is left out of the t_eq rule: every seed of a start is the same network there, so the floor is 0 by
    # construction and says nothing about the noise.
    est = analysis.t_eq_with_bootstrap(times[1:], dis[1:], groups, tolerance=proto.tolerance, window=proto.window,
                                       width=proto.smooth, resamples=proto.bootstrap, seed=_seed(proto.seed, 99),
                                       approach=proto.approach, floor_tolerance=proto.floor_tolerance)
    gap_end = analysis.floor_spread(times[1:], dis[1:], groups, proto.window)
    norms = np.stack([np.sqrt((r["si_norms"] ** 2).sum(1)) for r in records]) if records[0]["si_norms"].size else (
        np.zeros((len(records), 0)))
    losses = np.stack([r["train_loss"] for r in records[1:]]) if len(records) > 1 else np.zeros((0, 0))
    angle, angle_pred = _angle_summary(arm, records)
    if losses.size and not np.all(np.isfinite(losses)):
        status, detail = analysis.DIVERGED, "a training loss became NaN/inf"
    elif norms.size and analysis.is_periodic(norms):
        status, detail = analysis.PERIODIC, "scale-invariant norms rise and fall repeatedly (periodic regime)"
    elif smoke:
        status, detail = analysis.SMOKE_TEST, "--quick is a smoke test: too short to measure t_eq"
    elif math.isfinite(est.t_eq):
        status, detail = analysis.EQUILIBRATED, ""
    elif est.settling.started:
        status, detail = analysis.STARTED_AT_EQUILIBRIUM, (
            f"the between-start distance was never above (1+{proto.approach:g})× the noise floor before it settled: "
            "the starts were already indistinguishable after the first evaluation interval, so there is no "
            "approach to time (use starts that differ more, or a finer eval_every)")
    elif math.isfinite(est.settling.ratio_only):
        status, detail = analysis.NOT_EQUILIBRATED, (
            f"between-start distance within (1+{proto.tolerance:g})× the noise floor from "
            f"{est.settling.ratio_only:g}/λ_e on, but the starts' own noise floors never agreed within "
            f"{proto.floor_tolerance:g} over the same window before the horizon (final window: they differ by "
            f"{gap_end:.0%}): the retrained copies still depend on the start")
    else:
        status, detail = analysis.NOT_EQUILIBRATED, (
            f"between-start distance never within (1+{proto.tolerance:g})× the noise floor for a whole window of "
            f"{proto.window:g}/λ_e before the horizon")
    ok = status == analysis.EQUILIBRATED
    t_eq = est.t_eq if ok else math.nan
    t_norm, t_norm_pred = (analysis.relaxation(times / lam, norms, groups, optimizer=arm.optimizer,
                                               intrinsic_lr=lam, eps=proto.norm_tolerance)
                           if norms.size else (math.nan, math.nan))
    settled = float(np.mean(np.isfinite(est.replicates))) if len(est.replicates) else math.nan
    sm_b = analysis.smooth(times[1:], between[1:], proto.smooth) if len(times) > 1 else between
    last = records[-1]
    row: dict[str, Any] = {
        "arm": arm.id,
        "start": ",".join(s.label for s in starts),
        "optimizer": arm.optimizer,
        "lr": arm.lr,
        "weight_decay": arm.weight_decay,
        "momentum": arm.momentum,
        "intrinsic_lr": lam,
        "batch_size": arm.batch_size,
        "input_noise": arm.input_noise,
        "seeds": arm.seeds,
        "starts": len(starts),
        "horizon_steps": sch.steps,
        "eval_every_steps": sch.interval,
        "t_eq_steps": t_eq / lam,
        "t_eq_intrinsic": t_eq,
        "t_eq_resolution_steps": sch.interval,  # t_eq is an evaluation time: the crossing lies in the interval before
        "t_eq_low_steps": est.low / lam if ok else math.nan,
        "t_eq_high_steps": est.high / lam if ok else math.nan,
        "bootstrap_settled": settled,
        "approach_steps": est.settling.approach / lam if ok else math.nan,
        "noise_floor": est.floor_end,
        "noise_floor_rse": est.floor_rse,
        "floor_spread": gap_end,
        "ratio_settled_intrinsic": est.settling.ratio_only,  # when the between/floor condition alone held
        "distance_between": float(sm_b[-1]),
        "label_l1": analysis.label_l1(last["preds"], groups, classes),
        "t_norm_steps": t_norm,
        "t_norm_predicted_steps": t_norm_pred,
        "angle_per_step": angle,
        "angle_predicted": angle_pred,
        "angle_ratio": angle / angle_pred if angle_pred > 0 else math.nan,
        "test_acc": float(last["test_acc"].mean()),
        "status": status,
        "status_detail": detail,
        "tolerance": proto.tolerance,
        "approach": proto.approach,
        "window_intrinsic": proto.window,
        "floor_tolerance": proto.floor_tolerance,
    }
    curve_rows: list[dict[str, Any]] = []
    for i, r in enumerate(records):
        for s_idx, s in enumerate(starts):
            m = groups == s_idx
            n_s = norms[i, m] if norms.size else np.array([math.nan])
            per_tensor = r["si_norms"][m]
            ang = r.get("si_angle")
            ang_s = float(np.mean(np.sqrt(np.mean(ang[m] ** 2, axis=1)))) if ang is not None and ang.size else math.nan
            curve_rows.append({
                "arm": arm.id, "intrinsic_lr": lam, "step": int(r["step"]), "intrinsic_time": float(times[i]),
                "start": s.label, "distance_between": float(between[i]), "noise_floor": float(floor[i]),
                "test_acc": float(r["test_acc"][m].mean()), "test_loss": float(r["test_loss"][m].mean()),
                "train_loss": float(r["train_loss"][m].mean()), "si_norm": float(n_s.mean()),
                "effective_lr": float(np.mean(arm.lr / per_tensor**2)) if per_tensor.size else math.nan,
                "angle_per_step": ang_s,
            })
    return row, curve_rows, est.replicates / lam
