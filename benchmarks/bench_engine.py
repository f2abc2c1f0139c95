"""Train one model three ways and compare branch-steps per second.

1. plain: an eager PyTorch loop with torch.optim.SGD (momentum 0.9, wd 5e-4), data resident on the device,
   bf16 autocast and channels_last on CUDA — what a careful user writes by hand;
2. the retraining engine with 1 branch;
3. the engine with K fused branches (torch.vmap over stacked weights, per-branch lr/wd).
Optionally the engine variants again with a whole-step CUDA graph (--cuda-graph) or torch.compile (--compile).

    python benchmarks/bench_engine.py --model digits                     # CPU
    python benchmarks/bench_engine.py --model preresnet32 --k 32 --batch 128 --cuda-graph --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ilr_inspect.retrain.engine import Engine, OptimSpec
from ilr_inspect.retrain.zoo import preresnet32

LR, WD, MOMENTUM = 0.1, 5e-4, 0.9


def make_model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    if name == "preresnet32":
        return preresnet32(), (3, 32, 32)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures" / "digits"))
    import model as digits  # type: ignore[import-not-found]  # fixtures/digits/model.py

    net: nn.Module = digits.build()
    return net, (1, 8, 8)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(step: Callable[[int], object], steps: int, warmup: int, dev: torch.device) -> float:
    for i in range(warmup):
        step(i)
    sync(dev)
    t0 = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    sync(dev)
    return steps / (time.perf_counter() - t0)


def bench_plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, steps: int, warmup: int) -> float:
    dev = x.device
    net = model.to(dev).train()
    cuda = dev.type == "cuda"
    if cuda and x.ndim == 4:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    gen = torch.Generator(device=dev).manual_seed(0)

    def step(_i: int) -> None:
        idx = torch.randint(0, len(x), (batch,), device=dev, generator=gen)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(net(x[idx]).float(), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()

    return timed(step, steps, warmup, dev)


def bench_engine(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, k: int, steps: int, warmup: int,
                 *, cuda_graph: bool = False, compile: bool = False) -> tuple[float, bool]:
    dev = x.device
    states = [model.state_dict()] * k
    eng = Engine(model, states, [LR] * k, [WD] * k, OptimSpec("sgd", momentum=MOMENTUM), device=dev,
                 cuda_graph=cuda_graph, compile=compile, probe_input=x[:4],
                 log=lambda m: print(m, file=sys.stderr))
    gen = torch.Generator(device=dev).manual_seed(0)

    def step(_i: int) -> None:
        idx = torch.randint(0, len(x), (k, batch), device=dev, generator=gen)
        eng.step(x[idx], y[idx])

    return timed(step, steps, warmup, dev), eng.fused


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["preresnet32", "digits"], default="digits")
    ap.add_argument("--k", type=int, default=8, help="fused branches")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cuda-graph", action="store_true", help="also time the engine with a whole-step CUDA graph")
    ap.add_argument("--compile", action="store_true", help="also time the engine with torch.compile")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model, shape = make_model(a.model)
    x = torch.randn(4096, *shape, device=dev)
    y = torch.randint(0, 10, (4096,), device=dev)
    results: list[dict[str, object]] = []

    def record(name: str, k: int, steps_per_s: float, **extra: object) -> None:
        results.append({"variant": name, "branches": k, "steps_per_s": steps_per_s,
                        "branch_steps_per_s": steps_per_s * k, **extra})
        print(f"{name:<28} K={k:<3} {steps_per_s:9.2f} steps/s {steps_per_s * k:10.1f} branch-steps/s", flush=True)

    import copy

    record("plain eager torch.optim", 1, bench_plain(copy.deepcopy(model), x, y, a.batch, a.steps, a.warmup))
    variants: list[tuple[str, dict[str, bool]]] = [("engine", {})]
    if a.cuda_graph and dev.type == "cuda":
        variants.append(("engine + cuda graph", {"cuda_graph": True}))
    if a.compile:
        variants.append(("engine + compile", {"compile": True}))
    for name, flags in variants:
        for k in (1, a.k):
            try:
                sps, fused = bench_engine(model, x, y, a.batch, k, a.steps, a.warmup, **flags)
                record(name, k, sps, fused=fused)
            except Exception as exc:  # report and go on: one failing variant must not hide the others
                print(f"{name} K={k}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                results.append({"variant": name, "branches": k, "error": f"{type(exc).__name__}: {exc}"})
    base = float(results[0]["branch_steps_per_s"])  # type: ignore[arg-type]
    for r in results[1:]:
        if "branch_steps_per_s" in r:
            r["ratio_vs_plain"] = float(r["branch_steps_per_s"]) / base  # type: ignore[arg-type]
            print(f"ratio {r['variant']} K={r['branches']}: {r['ratio_vs_plain']:.2f}x plain")
    info = {"model": a.model, "batch": a.batch, "k": a.k, "steps": a.steps, "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}
    if a.json is not None:
        a.json.write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
