"""All-pairs distance matrix over N checkpoints vs N plain forward passes over the probe set, in one run.

The claim under test: each checkpoint is evaluated once (outputs cached), so the N·(N−1)/2-pair matrix costs about
N forward passes — ratio ≈ 1 with ``--bn-mode eval`` (≈ 2 with ``recalibrate``, which adds one statistics pass
per checkpoint). Usage: python benchmarks/bench_distance.py [--n 20] [--probe 2048] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MODEL = """
import torch.nn as nn

def block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

def build():
    return nn.Sequential(block(3, 16, 1), block(16, 32, 2), block(32, 32, 1), block(32, 64, 2),
                         block(64, 64, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
"""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=20, help="checkpoints")
    ap.add_argument("--probe", type=int, default=1024, help="probe examples (3×32×32)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the minimum time is reported")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from ilr_inspect.function_space import distance, resolve_device
    from ilr_inspect.models import build_model
    from ilr_inspect.probe import load_probe
    from ilr_inspect.series import open_series

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "model.py").write_text(MODEL)
        torch.manual_seed(0)
        net = build_model(f"{root}/model.py:build")
        (root / "ckpts").mkdir()
        for i in range(args.n):  # a drifting random walk in weight space stands in for a training run
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.05 * torch.randn_like(p) * p.detach().std().clamp_min(1e-3))
            torch.save(net.state_dict(), root / "ckpts" / f"step_{i * 100:06d}.pt")
        rng = np.random.default_rng(0)
        np.savez(root / "probe.npz", x=rng.normal(size=(args.probe, 3, 32, 32)).astype(np.float32),
                 y=rng.integers(0, 10, args.probe))
        probe = load_probe(root / "probe.npz")

        # Baseline: N plain forward passes of one loaded model (no checkpoint reading, no metrics). Measurements are
        # interleaved and repeated (minimum kept) so that load from other processes hits both sides alike.
        plain = build_model(f"{root}/model.py:build").to(device).eval()
        x = probe.inputs

        def plain_passes() -> float:
            with torch.inference_mode():
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(args.n):
                    for s in range(0, len(x), args.batch_size):
                        plain(x[s:s + args.batch_size].to(device)).cpu()
                _sync(device)
            return time.perf_counter() - t0

        plain_passes()  # warm-up
        t_plain = float("inf")
        results: dict[str, tuple[float, int, int]] = {}
        with open_series([root / "ckpts"]) as series:
            for _ in range(args.repeats):
                t_plain = min(t_plain, plain_passes())
                for mode in ("eval", "recalibrate"):
                    t0 = time.perf_counter()
                    res = distance(series, f"{root}/model.py:build", probe, pairs="all",
                                   bn_mode=mode,  # type: ignore[arg-type]
                                   device=str(device), batch_size=args.batch_size)
                    _sync(device)
                    t = time.perf_counter() - t0
                    if mode not in results or t < results[mode][0]:
                        results[mode] = (t, len(res.rows), res.meta["probe_passes"])

    print(f"device {device}, {args.n} checkpoints, probe {args.probe}×3×32×32, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{args.n} plain forward passes over the probe set: {t_plain:.2f} s (min of {args.repeats})")
    for mode, (t, rows, passes) in results.items():
        print(f"all-pairs matrix, bn-mode {mode:<11}: {t:.2f} s (min of {args.repeats}) for {rows} pairs "
              f"({passes} probe passes, incl. reading {args.n} checkpoints) — ratio {t / t_plain:.2f}×")


if __name__ == "__main__":
    main()
