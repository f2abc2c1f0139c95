"""Retraining from checkpoints to measure the time to equilibrium (``ilr-inspect equilibrium``).

Public API: :func:`equilibrium` returns an :class:`EquilibriumResult` (one row per arm; the curves, one row per
arm × evaluation × start, in ``.curves``). See docs/equilibrium.md for ``ilr.toml`` and the protocol.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import UsageError
from ..output import Result, atomic_write_text, file_fingerprint, provenance, serialize
from .config import CONFIG_NAME, Config, load_config, with_overrides

__all__ = ["EquilibriumResult", "Setup", "equilibrium", "load_config", "prepare", "run_arm"]


@dataclass
class EquilibriumResult(Result):
    """One row per arm; ``curves`` holds the evaluation curves (arm × evaluation × start)."""

    curves: Result | None = field(default=None)


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here", hint="use --device cpu or auto")
    return dev


def _default_out(run_dir: Path, cfg: Config, start_paths: Sequence[Path]) -> Path:
    # Results never go into a checkpoint folder: a run dir that holds checkpoints itself needs an explicit --out.
    if any(p.parent.resolve() == run_dir.resolve() for p in start_paths):
        raise UsageError("the run directory holds the checkpoints themselves; results are never written there",
                         path=run_dir, hint="pass --out DIR")
    return run_dir / "ilr-results"


@dataclass
class Setup:
    """Everything an arm needs, built from paths and settings alone, so that a Ray worker rebuilds the same thing
    the driver validated (``ilr_inspect.scaleout.sweep``)."""

    cfg: Config
    starts: list[Any]
    data: Any
    model: Any
    states: dict[str, Any]
    si_names: list[str]
    si_note: str
    classes: int
    out_dir: Path
    fingerprint: dict[str, Any]
    quick: bool


# (row, curve rows, bootstrap t_eq replicates) of one arm.
ArmOutcome = tuple[dict[str, Any], list[dict[str, Any]], np.ndarray]


def prepare(run_dir: str | Path, *, config: str | Path | None = None, out: str | Path | None = None,
            horizon: float | None = None, eval_every: float | None = None, seeds: int | None = None,
            bootstrap: int | None = None, quick: bool = False, arms: list[str] | None = None) -> Setup:
    """Read and validate ``ilr.toml``, its data, model and start checkpoints (nothing is written)."""
    from . import inputs

    run_dir = Path(run_dir)
    cfg = with_overrides(load_config(Path(config) if config else run_dir / CONFIG_NAME), horizon=horizon,
                         eval_every=eval_every, seeds=seeds, bootstrap=bootstrap, quick=quick, arms=arms)
    starts = inputs.find_starts(cfg)
    out_dir = Path(out) if out is not None else _default_out(run_dir, cfg, [s.path for s in starts])
    data = inputs.load_data(cfg)
    model = inputs.build(cfg)
    states = {s.label: inputs.start_state(model, s.path) for s in starts}
    si_names, si_note = inputs.si_tensors(model)
    classes = int(max(data.y_train.max(), data.y_test.max())) + 1
    _check_fit(cfg, model, data, classes)
    # A resume must see the same settings and the same start files (size + head/tail hash).
    starts_id = [{k: v for k, v in file_fingerprint(s.path).items() if k != "path"} for s in starts]
    return Setup(cfg, starts, data, model, states, si_names, si_note, classes, out_dir,
                 {**cfg.fingerprint(), "start_files": starts_id}, quick)


def run_arm(setup: Setup, arm: Any, store: Any, dev: Any, *, fuse: bool | None = None, compile: bool = False,
            cuda_graph: bool = False, log: Callable[[str], None] | None = None,
            on_eval: Callable[[str, int, int], None] | None = None,
            on_steps: Callable[[int], None] | None = None) -> ArmOutcome:
    """One arm, wherever it runs (this process or a Ray worker): train it to the horizon, resuming from its last
    saved evaluation, summarize it and write its summary.json. A finished arm is not trained again: its saved
    state is checked against the arm and its row and curves are recomputed from the saved evaluations."""
    import torch

    from .protocol import ArmRunner, summarize

    cfg = setup.cfg
    # Module randomness (dropout), if any, is seeded per arm: an arm's numbers do not depend on which arms ran
    # before it in the same process.
    torch.manual_seed(cfg.protocol.seed)
    runner = ArmRunner(arm, cfg.protocol, setup.model, setup.starts, setup.states, setup.data, setup.si_names, dev,
                       fuse=fuse, compile=compile, cuda_graph=cuda_graph, log=log)
    records = runner.run(store, on_eval=on_eval, on_steps=on_steps)
    row, crows, reps = summarize(arm, cfg.protocol, setup.starts, records, classes=setup.classes, smoke=setup.quick)
    row["fused"] = runner.engine.fused
    row["branch_steps_per_s"] = runner.branch_steps_per_s
    saved = store.load_summary(arm.id)
    if saved is not None and not math.isfinite(runner.branch_steps_per_s):
        # Nothing was trained now: report how the arm was trained (possibly on another machine).
        row["fused"] = saved.get("fused", row["fused"])
        row["branch_steps_per_s"] = saved.get("branch_steps_per_s", math.nan)
    store.save_summary(arm.id, {**row, "replicates": reps.tolist()})
    return row, crows, reps


def equilibrium(
    run_dir: str | Path,
    *,
    config: str | Path | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    resume: bool = False,
    horizon: float | None = None,
    eval_every: float | None = None,
    seeds: int | None = None,
    bootstrap: int | None = None,
    quick: bool = False,
    arms: list[str] | None = None,
    fuse: bool | None = None,
    compile: bool = False,
    cuda_graph: bool = False,
    threads: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    on_eval: Callable[[str, int, int], None] | None = None,
    ray: str | None = None,
) -> EquilibriumResult:
    """Retrain every arm of ``run_dir/ilr.toml`` from its start checkpoints and measure the time to equilibrium.

    Results are written incrementally to ``out`` (default ``run_dir/ilr-results``); ``resume`` continues an
    interrupted run there. ``on_eval(arm, done, total)`` is called after every saved evaluation. ``threads``: CPU
    threads for torch (default: on the CPU, whichever of 1 and torch's default runs a step faster, timed here).
    ``ray``: run one Ray task per arm on this cluster (``local``, ``auto``, ``host:port``; docs/equilibrium.md) —
    the same results folder and the same table; ``threads`` is then the CPUs (and torch threads) per arm, default 1.
    """
    say = log or (lambda _m: None)
    setup = prepare(run_dir, config=config, out=out, horizon=horizon, eval_every=eval_every, seeds=seeds,
                    bootstrap=bootstrap, quick=quick, arms=arms)
    if not setup.si_names:
        say(f"note: no scale-invariant weights found ({setup.si_note}); norm curves are empty")
    extra: dict[str, Any] = {}
    if ray is not None:
        from ..scaleout.sweep import WorkerSpec, run_arms

        spec = WorkerSpec(run_dir=str(Path(run_dir).resolve()), config=str(setup.cfg.path),
                          out=str(setup.out_dir.resolve()), horizon=horizon, eval_every=eval_every, seeds=seeds,
                          bootstrap=bootstrap, quick=quick, arms=arms, device=device, fuse=fuse, compile=compile,
                          cuda_graph=cuda_graph, threads=threads or 1)
        dev, outcomes, extra = run_arms(ray, setup, spec, resume=resume, progress=progress, log=say,
                                        on_eval=on_eval)
    else:
        dev, outcomes = _run_local(setup, device=device, resume=resume, fuse=fuse, compile=compile,
                                   cuda_graph=cuda_graph, threads=threads, progress=progress, log=say,
                                   on_eval=on_eval)
    return _finish(setup, outcomes, dev, resume=resume, compile=compile, cuda_graph=cuda_graph, log=say, extra=extra)


def _run_local(setup: Setup, *, device: str, resume: bool, fuse: bool | None, compile: bool, cuda_graph: bool,
               threads: int | None, progress: bool, log: Callable[[str], None],
               on_eval: Callable[[str, int, int], None] | None) -> tuple[Any, list[ArmOutcome]]:
    from .protocol import Schedule
    from .store import Store

    cfg = setup.cfg
    dev = _device(device)
    # Only now, with everything validated, claim the results folder.
    store = Store(setup.out_dir, setup.fingerprint, resume=resume)
    if dev.type == "cpu" and cfg.arms:
        _set_threads(threads, setup.model, [setup.states[s.label] for s in setup.starts], cfg.arms[0], setup.data,
                     dev, log)
    outcomes: list[ArmOutcome] = []
    bar = _Progress(sum(Schedule.of(a, cfg.protocol).steps for a in cfg.arms), enabled=progress)
    try:
        for arm in cfg.arms:
            bar.describe(arm.id)
            outcome = run_arm(setup, arm, store, dev, fuse=fuse, compile=compile, cuda_graph=cuda_graph, log=log,
                              on_eval=on_eval, on_steps=bar.advance)
            log(_arm_line(outcome[0]))
            outcomes.append(outcome)
    except KeyboardInterrupt:
        bar.close()
        log(f"interrupted: finished evaluations are saved in {setup.out_dir}; rerun with --resume to continue")
        raise
    finally:
        bar.close()
    return dev, outcomes


def _finish(setup: Setup, outcomes: Sequence[ArmOutcome], dev: Any, *, resume: bool, compile: bool,
            cuda_graph: bool, log: Callable[[str], None], extra: dict[str, Any]) -> EquilibriumResult:
    """The tables, equilibrium.json, curves.csv and the chart from the arms' outcomes (in config order)."""
    from .analysis import Exponent, fit_exponent

    cfg, out_dir, quick, say = setup.cfg, setup.out_dir, setup.quick, log
    rows = [o[0] for o in outcomes]
    curves = [c for o in outcomes for c in o[1]]
    replicates = [o[2] for o in outcomes]
    frame = pd.DataFrame(rows)
    if quick:
        fit = Exponent(math.nan, math.nan, math.nan, 0, "--quick is a smoke test: too short to measure t_eq")
    else:
        fit = fit_exponent(frame["intrinsic_lr"].to_numpy(float), frame["t_eq_steps"].to_numpy(float), replicates)
    # What the parameter-space (norm) relaxation alone predicts for the same arms (docs/equilibrium.md): with a
    # start far from the equilibrium norm, its ln(r0⁴) factor bends the exponent below 1.
    eq_arms = (frame["status"] == "equilibrated").to_numpy()
    norm_fit = fit_exponent(frame["intrinsic_lr"].to_numpy(float)[eq_arms],
                            frame["t_norm_predicted_steps"].to_numpy(float)[eq_arms],
                            [np.empty(0)] * int(eq_arms.sum()))
    starts = setup.starts
    settings = {
        "config": str(cfg.path), "out": str(out_dir), "device": str(dev), "resume": resume,
        "compile": compile, "cuda_graph": cuda_graph,
        "protocol": cfg.fingerprint()["protocol"], "si_tensors": setup.si_names, "si_detection": setup.si_note,
        "starts": [{"label": s.label, "path": str(s.path), "step": s.step} for s in starts],
        "distance": "mean pairwise prediction disagreement on the probe set; noise floor = same start, other seed",
        "t_eq_rule": "first evaluation t with smoothed between-start distance ≤ (1+tolerance)·smoothed noise floor "
                     "at every evaluation in [t, t+window] (intrinsic time; the window must end before the horizon), "
                     "after an earlier evaluation with distance > (1+approach)·floor (else: started-at-equilibrium); "
                     "step 0 is excluded (its floor is 0 by construction); resolution: one evaluation interval",
        "quick": quick,
        **extra,
    }
    meta = provenance([cfg.path, *(s.path for s in starts)], settings)
    meta.update({
        "exponent": fit.slope, "exponent_low": fit.low, "exponent_high": fit.high, "exponent_arms": fit.arms,
        "exponent_intercept": fit.intercept, "exponent_replicates_used": fit.replicates_used,
        "exponent_contains_1": fit.contains_one,
        "exponent_norm_predicted": norm_fit.slope,
        "exponent_note": fit.note or _exponent_note(fit, norm_fit.slope),
    })
    curves_result = Result("equilibrium-curves", pd.DataFrame(curves), dict(meta))
    result = EquilibriumResult("equilibrium", frame, meta, curves=curves_result)
    atomic_write_text(out_dir / "equilibrium.json", serialize(result, "json").decode())
    atomic_write_text(out_dir / "curves.csv", serialize(curves_result, "csv").decode())
    charts = _write_chart(result, out_dir, say)
    if quick:
        say(f"results in {out_dir}; --quick is a smoke test: too short to measure t_eq (no verdicts, no exponent)")
    elif math.isfinite(fit.slope):
        say(f"results in {out_dir}{charts}; exponent {_fmt(fit.slope)} (95 % interval [{_fmt(fit.low)}, "
            f"{_fmt(fit.high)}]) over {fit.arms} equilibrated arm(s): {meta['exponent_note']}")
    else:
        say(f"results in {out_dir}; no exponent: {fit.note}")
    return result


def _arm_line(row: dict[str, Any]) -> str:
    """One line per finished arm: the verdict, t_eq with its resolution and interval, and the regime checks."""
    head = f"{row['arm']} (λ_e {row['intrinsic_lr']:.3g}): {row['status']}"
    rse = row["noise_floor_rse"]
    seeds_note = " (over ±10 %: add seeds)" if rse > 0.10 and row["status"] != "smoke-test" else ""
    checks = (f"noise floor {row['noise_floor']:.3g} ± {100 * rse:.0f} %{seeds_note} (per-start floors differ by "
              f"{100 * row['floor_spread']:.0f} % of it over the last window), per-step angle "
              f"{row['angle_ratio']:.2f}× the equilibrium prediction, test acc {row['test_acc']:.3f}")
    if row["status"] == "equilibrated":
        return (f"{head} at t_eq {row['t_eq_steps']:.0f} steps (resolution {row['t_eq_resolution_steps']} steps; "
                f"95 % [{row['t_eq_low_steps']:.0f}, {row['t_eq_high_steps']:.0f}]) = {row['t_eq_intrinsic']:.3g}/λ_e, "
                f"after being clearly apart at step {row['approach_steps']:.0f}; {checks}")
    return f"{head}: {row['status_detail']}; {checks}"


def _exponent_note(fit: Any, norm_predicted: float) -> str:
    inside = fit.contains_one
    where = ("1 (the conjecture) is inside the 95 % interval" if inside else
             "1 (the conjecture) is outside the 95 % interval" if inside is False else "no interval")
    norm = (f"; the norm relaxation alone predicts {norm_predicted:.3g} for these starts (its ln r0⁴ factor, "
            "docs/equilibrium.md)" if math.isfinite(norm_predicted) else "")
    return f"slope of log t_eq_steps vs log(1/intrinsic_lr); {where}{norm}"


def _write_chart(result: EquilibriumResult, out_dir: Path, say: Callable[[str], None]) -> str:
    """t_eq vs 1/λ_e (log–log, fitted line, slope-1 reference) as fec_exponent.png / .html (offline)."""
    try:
        from ..reporting.charts import fec_exponent_figure
        from .chart import write_standalone
    except ImportError as exc:  # the reporting extra (altair, vl-convert) is optional for this command
        say(f"note: no chart ({exc})")
        return ""
    fig = fec_exponent_figure(result.rows, result.meta)
    if fig is None:
        return ""
    written = write_standalone(fig, out_dir / fig.name)
    return " (chart: " + ", ".join(p.name for p in written) + ")"


def _set_threads(threads: int | None, model: Any, start_states: list[Any], arm: Any, data: Any, dev: Any,
                 say: Callable[[str], None]) -> None:
    """Pin torch's CPU threads. Unasked, time a few fused steps with 1 thread and with torch's default and keep
    the faster: a small model gains little from intra-op threads, and on a shared machine a second thread that
    waits for a busy core can make every step several times slower."""
    import time

    import torch

    from .engine import Engine, OptimSpec

    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be ≥ 1, got {threads}")
        torch.set_num_threads(threads)
        return
    default = torch.get_num_threads()
    if default <= 1:
        return
    states = [s for s in start_states for _ in range(arm.seeds)]
    k = len(states)
    x = torch.from_numpy(data.x_train[: arm.batch_size]).unsqueeze(0).expand(k, *data.x_train[: arm.batch_size].shape)
    y = torch.from_numpy(data.y_train[: arm.batch_size]).unsqueeze(0).expand(k, -1)
    timings: dict[int, float] = {}
    for n in (1, default):
        torch.set_num_threads(n)
        eng = Engine(model, states, [arm.lr] * k, [arm.weight_decay] * k, OptimSpec("sgd"), device=dev)
        eng.step(x, y)  # warm-up
        t0 = time.perf_counter()
        for _ in range(3):
            eng.step(x, y)
        timings[n] = (time.perf_counter() - t0) / 3
    best = min(timings, key=lambda n: timings[n])
    torch.set_num_threads(best)
    say(f"note: {best} CPU thread(s): a step took {timings[1]:.3g} s with 1 thread, {timings[default]:.3g} s with "
        f"{default} (pin with --threads)")


def _check_fit(cfg: Config, model: Any, data: Any, classes: int) -> None:
    """Fail before training when the model, the data and the arms do not fit together."""
    import copy

    import torch

    from ..errors import ModelError

    for arm in cfg.arms:
        if arm.batch_size > len(data.x_train):
            raise UsageError(f"[arms] arm {arm.id}: batch_size {arm.batch_size} exceeds the "
                             f"{len(data.x_train)} training examples", path=cfg.path)
    probe = copy.deepcopy(model).train()
    try:
        with torch.no_grad():
            out = probe(torch.from_numpy(data.x_train[:2]))
    except Exception as exc:
        raise ModelError(f"the model does not run on the training inputs {data.x_train.shape[1:]}: "
                         f"{type(exc).__name__}: {exc}", path=cfg.path, hint="check [model] and [data]") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] < classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"the model must return logits (batch, classes ≥ {classes}); it returned {shape}",
                         path=cfg.path)


def _fmt(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.3g}"


class _Progress:
    """Rich progress with ETA on stderr (steps over all arms)."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self._p: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("steps"), TimeRemainingColumn(), console=Console(stderr=True))
        self._p.start()
        self._task = self._p.add_task("equilibrium", total=total)

    def describe(self, text: str) -> None:
        if self._p is not None:
            self._p.update(self._task, description=text)

    def advance(self, n: int) -> None:
        if self._p is not None:
            self._p.advance(self._task, n)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None


def read_summary(out_dir: Path) -> dict[str, Any]:
    """The final JSON of a results folder (for reports)."""
    data: dict[str, Any] = json.loads((Path(out_dir) / "equilibrium.json").read_text(encoding="utf-8"))
    return data
