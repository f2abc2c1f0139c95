"""``equilibrium --ray``: one Ray task per arm, in the same resumable results folder as the local path.

The driver validates everything and claims the results folder exactly as the local path does, then submits one
task per arm that has no ``summary.json`` yet. A task receives only paths and settings (:class:`WorkerSpec` and an
arm id), never tensors: the worker rebuilds the config, data, model and start states from the files, reopens the
same folder with resume semantics (the fingerprint must match ``run.json``), trains the arm with the very function
the local path calls (:func:`ilr_inspect.retrain.run_arm`), writes its evaluations, state and summary there, and
returns the arm's row. A worker that dies is retried by Ray and resumes from the arm's last saved evaluation;
an interrupted sweep resumes with or without Ray. The results folder must therefore be a path every node sees
(a shared filesystem), as must the ``ilr.toml`` and everything it points at. Nothing here imports ray or torch at
module level.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import IlrError, UsageError

if TYPE_CHECKING:
    from ..retrain import ArmOutcome, Setup

_RETRIES = 3  # Ray re-runs a task whose worker died this many times; each retry resumes from the saved evaluations
_POLL_S = 1.0  # how often the driver looks at the results folder for progress


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to rebuild an arm: absolute paths and the command's settings, nothing else."""

    run_dir: str
    config: str
    out: str
    horizon: float | None
    eval_every: float | None
    seeds: int | None
    bootstrap: int | None
    quick: bool
    arms: list[str] | None
    device: str  # as asked on the driver; resolved against the cluster's resources to "cpu" or "cuda"
    fuse: bool | None
    compile: bool
    cuda_graph: bool
    threads: int  # CPUs Ray reserves per arm, and torch's thread count in the worker


def cluster_device(name: str, gpus: float) -> str:
    """The workers' device kind, decided by the cluster's resources rather than the driver's (the driver of a
    GPU cluster often has none). Ray gives each task its own GPU through CUDA_VISIBLE_DEVICES, so a task always
    uses ``cuda`` (its first visible device), whatever index was asked."""
    kind = name.split(":", 1)[0]
    if name == "auto":
        return "cuda" if gpus >= 1 else "cpu"
    if kind == "cuda":
        if gpus < 1:
            raise UsageError("--device cuda: the Ray cluster has no GPU", hint="use --device cpu or auto")
        return "cuda"
    if name == "cpu":
        return "cpu"
    raise UsageError(f"--device {name}: with --ray the device is auto, cpu or cuda")


def _largest_node_cpus(ray: Any) -> float:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return max((float(n.get("Resources", {}).get("CPU", 0)) for n in nodes), default=0.0)


def arm_task(spec: WorkerSpec, arm_id: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[float], dict[str, Any]]:
    """The body of one Ray task (also callable in-process): rebuild, resume, train one arm, return its row."""
    import torch

    from ..retrain import prepare, run_arm
    from ..retrain.store import Store

    torch.set_num_threads(spec.threads)
    dev = torch.device(spec.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("this Ray worker was given a GPU but torch sees no CUDA device",
                         hint="check the node's CUDA installation, or use --device cpu")
    setup = prepare(spec.run_dir, config=spec.config, out=spec.out, horizon=spec.horizon,
                    eval_every=spec.eval_every, seeds=spec.seeds, bootstrap=spec.bootstrap, quick=spec.quick,
                    arms=spec.arms)
    store = Store(setup.out_dir, setup.fingerprint, resume=True)  # run.json was written by the driver
    arm = next((a for a in setup.cfg.arms if a.id == arm_id), None)
    if arm is None:
        raise UsageError(f"no arm {arm_id!r} in {setup.cfg.path}", hint="the ilr.toml changed under the sweep")
    notes: list[str] = []
    row, crows, reps = run_arm(setup, arm, store, dev, fuse=spec.fuse, compile=spec.compile,
                               cuda_graph=spec.cuda_graph, log=notes.append)
    info: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "notes": notes}
    try:
        import ray

        if ray.is_initialized():
            info["gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]
            info["node"] = ray.get_runtime_context().get_node_id()
    except ImportError:  # called in-process without ray
        pass
    return row, crows, reps.tolist(), info


def run_arms(address: str, setup: Setup, spec: WorkerSpec, *, resume: bool, progress: bool,
             log: Callable[[str], None], on_eval: Callable[[str, int, int], None] | None = None,
             ) -> tuple[Any, list[ArmOutcome], dict[str, Any]]:
    """Run the arms of ``setup`` as Ray tasks on ``address``; returns (device, outcomes in config order, meta)."""
    import numpy as np
    import torch

    from ..retrain import _arm_line, run_arm
    from ..retrain.protocol import Schedule
    from ..retrain.store import Store
    from .cluster import session

    cfg = setup.cfg
    with session(address) as ray:
        kind = cluster_device(spec.device, float(ray.cluster_resources().get("GPU", 0)))
        spec = replace(spec, device=kind)
        if spec.threads < 1:
            raise UsageError(f"--threads must be ≥ 1, got {spec.threads}")
        if spec.threads > (most := _largest_node_cpus(ray)):
            raise UsageError(f"--threads {spec.threads}: no node of the Ray cluster has that many CPUs "
                             f"(largest: {most:g})", hint="lower --threads (CPUs per arm)")
        # Only now, with everything validated, claim the results folder (as the local path does).
        store = Store(setup.out_dir, setup.fingerprint, resume=resume)
        todo = [a for a in cfg.arms if store.load_summary(a.id) is None]
        opts = {"num_cpus": spec.threads, "num_gpus": 1 if kind == "cuda" else 0, "max_retries": _RETRIES}
        task = ray.remote(arm_task)
        refs = {task.options(**opts).remote(spec, a.id): a.id for a in todo}
        totals = {a.id: Schedule.of(a, cfg.protocol).evals + 1 for a in todo}
        log(f"ray: {len(todo)} of {len(cfg.arms)} arm(s) as tasks on {address} ({opts['num_cpus']} CPU"
            f"{', 1 GPU' if kind == 'cuda' else ''} each)")
        bar = _SweepProgress(len(cfg.arms), len(cfg.arms) - len(todo), sum(totals.values()), enabled=progress)
        seen = dict.fromkeys(totals, 0)
        done: dict[str, tuple[dict[str, Any], list[dict[str, Any]], np.ndarray]] = {}
        workers: dict[str, Any] = {}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=_POLL_S)
                for ref in ready:
                    arm_id = refs[ref]
                    row, crows, reps, info = _get(ray, ref, arm_id)
                    done[arm_id] = (row, crows, np.asarray(reps, dtype=np.float64))
                    for note in info.pop("notes", []):
                        log(f"{arm_id}: {note}")
                    workers[arm_id] = info
                    bar.evals(totals[arm_id] - seen[arm_id])
                    seen[arm_id] = totals[arm_id]
                    log(_arm_line(row))
                    bar.arm_done()
                _poll_evals(setup.out_dir, totals, seen, bar, on_eval)
        except BaseException as exc:  # Ctrl-C, or one arm failed: stop the others; what they saved is kept
            for ref in pending:
                ray.cancel(ref, force=True)
            bar.close()
            what = "interrupted" if isinstance(exc, KeyboardInterrupt) else "stopped"
            log(f"{what}: finished evaluations are saved in {setup.out_dir}; rerun with --resume (with or "
                "without --ray) to continue")
            raise
        finally:
            bar.close()
    outcomes: list[ArmOutcome] = []
    cpu = torch.device("cpu")
    for arm in cfg.arms:
        if arm.id in done:
            outcomes.append(done[arm.id])
        else:  # finished before this run: its table is recomputed from the saved evaluations (no training)
            outcomes.append(run_arm(setup, arm, store, cpu, fuse=spec.fuse, log=log))
            log(_arm_line(outcomes[-1][0]))
    meta = {"ray": {"address": address, "tasks": len(todo), "num_cpus_per_task": opts["num_cpus"],
                    "num_gpus_per_task": opts["num_gpus"], "max_retries": _RETRIES, "workers": workers}}
    return torch.device(kind), outcomes, meta


def _get(ray: Any, ref: Any, arm_id: str) -> Any:
    """The task's result; the worker's own error (bad input, ...) is re-raised as itself."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, IlrError):
            raise cause from None
        raise
    except ray.exceptions.RayError as exc:  # the worker died more often than Ray retries, or its node was lost
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise IlrError(f"arm {arm_id}: Ray gave up on the task ({type(exc).__name__}: {first})",
                       hint="rerun with --resume: the saved evaluations are kept") from None


def _poll_evals(out_dir: Path, totals: dict[str, int], seen: dict[str, int], bar: _SweepProgress,
                on_eval: Callable[[str, int, int], None] | None) -> None:
    """Evaluations saved so far, counted from the results folder (cheap: one listdir per running arm)."""
    for arm_id, total in totals.items():
        if seen[arm_id] >= total:
            continue
        folder = out_dir / "arms" / arm_id
        n = min(total, sum(1 for p in folder.glob("eval_*.npz"))) if folder.is_dir() else 0
        if n > seen[arm_id]:
            bar.evals(n - seen[arm_id])
            seen[arm_id] = n
            if on_eval is not None:
                on_eval(arm_id, n, total)


class _SweepProgress:
    """Arms done/total and evaluations saved/total on stderr."""

    def __init__(self, arms: int, arms_done: int, evals: int, *, enabled: bool) -> None:
        self._p: Any = None
        self._t0 = time.perf_counter()
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           console=Console(stderr=True))
        self._p.start()
        self._arms = self._p.add_task("arms", total=arms, completed=arms_done)
        self._evals = self._p.add_task("evaluations", total=evals)

    def arm_done(self) -> None:
        if self._p is not None:
            self._p.advance(self._arms, 1)

    def evals(self, n: int) -> None:
        if self._p is not None:
            self._p.advance(self._evals, n)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None
