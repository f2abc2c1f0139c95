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

__all__ = ["EquilibriumResult", "equilibrium", "load_config"]


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
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    on_eval: Callable[[str, int, int], None] | None = None,
) -> EquilibriumResult:
    """Retrain every arm of ``run_dir/ilr.toml`` from its start checkpoints and measure the time to equilibrium.

    Results are written incrementally to ``out`` (default ``run_dir/ilr-results``); ``resume`` continues an
    interrupted run there. ``on_eval(arm, done, total)`` is called after every saved evaluation.
    """
    import torch

    from . import inputs
    from .protocol import ArmRunner, Schedule, summarize
    from .store import Store

    say = log or (lambda _m: None)
    run_dir = Path(run_dir)
    cfg = with_overrides(load_config(Path(config) if config else run_dir / CONFIG_NAME), horizon=horizon,
                         eval_every=eval_every, seeds=seeds, bootstrap=bootstrap, quick=quick, arms=arms)
    dev = _device(device)
    starts = inputs.find_starts(cfg)
    out_dir = Path(out) if out is not None else _default_out(run_dir, cfg, [s.path for s in starts])
    data = inputs.load_data(cfg)
    model = inputs.build(cfg)
    states = {s.label: inputs.start_state(model, s.path) for s in starts}
    si_names, si_note = inputs.si_tensors(model)
    if not si_names:
        say(f"note: no scale-invariant weights found ({si_note}); norm curves are empty")
    classes = int(max(data.y_train.max(), data.y_test.max())) + 1
    _check_fit(cfg, model, data, classes)
    # Only now, with everything validated, claim the results folder. A resume must see the same settings and the
    # same start files (size + head/tail hash).
    starts_id = [{k: v for k, v in file_fingerprint(s.path).items() if k != "path"} for s in starts]
    store = Store(out_dir, {**cfg.fingerprint(), "start_files": starts_id}, resume=resume)
    torch.manual_seed(cfg.protocol.seed)  # dropout and other module randomness, if any

    rows: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    replicates: list[np.ndarray] = []
    total_steps = sum(Schedule.of(a, cfg.protocol).steps for a in cfg.arms)
    bar = _Progress(total_steps, enabled=progress)
    try:
        for arm in cfg.arms:
            runner = ArmRunner(arm, cfg.protocol, model, starts, states, data, si_names, dev, fuse=fuse,
                               compile=compile, cuda_graph=cuda_graph, log=say)
            bar.describe(arm.id)
            records = runner.run(store, on_eval=on_eval, on_steps=bar.advance)
            row, crows, reps = summarize(arm, cfg.protocol, starts, records, classes=classes)
            row["fused"] = runner.engine.fused
            row["branch_steps_per_s"] = runner.branch_steps_per_s
            store.save_summary(arm.id, {**row, "replicates": reps.tolist()})
            rows.append(row)
            curves.extend(crows)
            replicates.append(reps)
    except KeyboardInterrupt:
        bar.close()
        say(f"interrupted: finished evaluations are saved in {out_dir}; rerun with --resume to continue")
        raise
    finally:
        bar.close()

    from .analysis import fit_exponent

    frame = pd.DataFrame(rows)
    fit = fit_exponent(frame["intrinsic_lr"].to_numpy(float), frame["t_eq_steps"].to_numpy(float), replicates)
    settings = {
        "config": str(cfg.path), "out": str(out_dir), "device": str(dev), "resume": resume,
        "compile": compile, "cuda_graph": cuda_graph,
        "protocol": cfg.fingerprint()["protocol"], "si_tensors": si_names, "si_detection": si_note,
        "starts": [{"label": s.label, "path": str(s.path), "step": s.step} for s in starts],
        "distance": "mean pairwise prediction disagreement on the probe set; noise floor = same start, other seed",
        "t_eq_rule": "first evaluation t with smoothed between-start distance ≤ (1+tolerance)·smoothed noise floor "
                     "at every evaluation in [t, t+window] (intrinsic time; the window must end before the horizon)",
    }
    meta = provenance([cfg.path, *(s.path for s in starts)], settings)
    meta.update({
        "exponent": fit.slope, "exponent_low": fit.low, "exponent_high": fit.high, "exponent_arms": fit.arms,
        "exponent_note": fit.note or "slope of log t_eq_steps vs log(1/intrinsic_lr); the conjecture predicts ≈ 1",
    })
    curves_result = Result("equilibrium-curves", pd.DataFrame(curves), dict(meta))
    result = EquilibriumResult("equilibrium", frame, meta, curves=curves_result)
    atomic_write_text(out_dir / "equilibrium.json", serialize(result, "json").decode())
    atomic_write_text(out_dir / "curves.csv", serialize(curves_result, "csv").decode())
    if math.isfinite(fit.slope):
        say(f"results in {out_dir}; exponent {_fmt(fit.slope)} [{_fmt(fit.low)}, {_fmt(fit.high)}] "
            f"over {fit.arms} equilibrated arm(s)")
    else:
        say(f"results in {out_dir}; no exponent: {fit.note}")
    return result


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
