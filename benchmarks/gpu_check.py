"""GPU checks for `equilibrium`, driven by gpu_check.sh (one device call). Writes everything under OUT.

1. graph equivalence: 20 fused steps with and without a whole-step CUDA graph must give the same weights;
2. the bundled FEC sweep (fixtures/fec-sweep with the fixtures/digits it reads, copied outside the repo:
   5 intrinsic LRs × 2 starts × 8 seeds), interrupted after a few evaluations and resumed (counting that nothing
   finished is recomputed);
3. the measured exponent and per-arm t_eq are in OUT/sweep.json and OUT/summary.json.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ilr_inspect.output import serialize  # noqa: E402
from ilr_inspect.retrain import equilibrium  # noqa: E402
from ilr_inspect.retrain.engine import Engine, OptimSpec  # noqa: E402


class Interrupt(Exception):  # noqa: N818 - a simulated Ctrl-C, not an error
    pass


def graph_equivalence(dev: torch.device) -> dict[str, object]:
    sys.path.insert(0, str(ROOT / "fixtures" / "digits"))
    import model as digits  # type: ignore[import-not-found]

    net = digits.build()
    states = []
    for k in range(4):
        torch.manual_seed(k)
        states.append(digits.build().state_dict())
    gen = torch.Generator(device=dev).manual_seed(0)
    xs = torch.randn(20, 4, 64, 1, 8, 8, device=dev, generator=gen)
    ys = torch.randint(0, 10, (20, 4, 64), device=dev, generator=gen)
    out: dict[str, object] = {}
    for opt in (OptimSpec("sgd", momentum=0.9), OptimSpec("adamw")):
        lrs = [0.1, 0.05, 0.1, 0.2] if opt.name == "sgd" else [1e-3] * 4
        flats = []
        for graph in (False, True):
            eng = Engine(net, states, lrs, [5e-4] * 4, opt, device=dev, cuda_graph=graph, amp=False,
                         probe_input=xs[0, 0])
            for t in range(20):
                eng.step(xs[t], ys[t])
            torch.cuda.synchronize()
            flats.append(eng.flat.clone())
            out[f"{opt.name}_graph_active_{graph}"] = eng.cuda_graph
        out[f"{opt.name}_max_abs_diff"] = float((flats[0] - flats[1]).abs().max())
    out["ok"] = all(float(v) < 1e-4 for k, v in out.items() if k.endswith("diff"))  # type: ignore[arg-type]
    return out


def main() -> None:
    out = Path(sys.argv[1])
    smoke = "--cpu-smoke" in sys.argv  # the same flow on the CPU with a tiny horizon (to test this script)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu" if smoke else "cuda")
    summary: dict[str, object] = {"device": "cpu" if smoke else torch.cuda.get_device_name(dev),
                                  "torch": torch.__version__}
    t0 = time.perf_counter()
    use_graph = False
    if not smoke:
        eq = graph_equivalence(dev)
        summary["graph_equivalence"] = eq
        print("graph equivalence:", eq, flush=True)
        use_graph = bool(eq["ok"])

    # The bundled FEC sweep (fixtures/fec-sweep reads ../digits), copied outside the repository.
    base = Path("/tmp/ilr-gpu-run")
    shutil.rmtree(base, ignore_errors=True)
    for name in ("digits", "fec-sweep"):
        shutil.copytree(ROOT / "fixtures" / name, base / name,
                        ignore=shutil.ignore_patterns("tb", "__pycache__", "ilr-results"))
    run = base / "fec-sweep"
    results = base / "results"
    seen: list[tuple[str, int]] = []

    def stop_early(arm: str, done: int, _total: int) -> None:
        seen.append((arm, done))
        if len(seen) == 5:
            raise Interrupt

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    t1 = time.perf_counter()
    try:
        equilibrium(run, out=results, device=dev.type, cuda_graph=use_graph, log=log, on_eval=stop_early, quick=smoke)
    except Interrupt:
        print(f"interrupted after {len(seen)} evaluations", flush=True)
    resumed: list[tuple[str, int]] = []
    result = equilibrium(run, out=results, device=dev.type, cuda_graph=use_graph, resume=True, log=log,
                         on_eval=lambda a, d, _t: resumed.append((a, d)), quick=smoke)
    t2 = time.perf_counter()
    # Every evaluation saved before the interrupt must not run again: the interrupted arm resumes at the next one.
    before = {(a, d) for a, d in seen}
    cut_arm, cut_done = seen[-1]
    again = [d for a, d in resumed if a == cut_arm]
    summary["resume"] = {
        "evaluations_before_interrupt": seen,
        "resumed_evaluations": len(resumed),
        "first_resumed_evaluation_of_interrupted_arm": min(again) if again else None,
        "recomputed_nothing": not (before & set(resumed)) and (not again or min(again) == cut_done + 1),
    }
    summary["sweep_seconds"] = t2 - t1
    summary["exponent"] = [result.meta["exponent"], result.meta["exponent_low"], result.meta["exponent_high"]]
    summary["exponent_note"] = result.meta["exponent_note"]
    summary["arms"] = result.rows[["arm", "intrinsic_lr", "t_eq_steps", "t_eq_resolution_steps", "t_eq_low_steps",
                                   "t_eq_high_steps", "t_eq_intrinsic", "noise_floor", "noise_floor_rse",
                                   "t_norm_steps", "t_norm_predicted_steps", "angle_ratio", "test_acc", "status",
                                   "fused", "branch_steps_per_s"]].to_dict(orient="records")
    summary["total_seconds"] = time.perf_counter() - t0
    (out / "sweep.json").write_bytes(serialize(result, "json"))
    if result.curves is not None:
        (out / "curves.csv").write_bytes(serialize(result.curves, "csv"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps(summary, indent=2, default=str), flush=True)


if __name__ == "__main__":
    main()
