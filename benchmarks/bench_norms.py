"""`norms` + `angles` must cost at most 1.3× simply reading every tensor once (issue 3, "Performance").

Builds a series of checkpoints (half safetensors, half torch zip; default 2 GB in all) in a temporary folder
outside the repository, warms the page cache, then times in the same run:
  (a) read       - open each series and read every tensor once through the library's readers into memory
                   (memory-mapped views are copied out, as a plain read would, so every byte is touched);
  (r) raw read   - read every byte of the same files once into a reused buffer (the strictest baseline: no
                   parsing, no allocation);
  (b) measure    - the library's single pass that produces norms and angles together (units from name rules);
and prints the ratios (b)/(a) and (b)/(r), plus the peak traced memory of (b) against the largest tensor.
Run: python benchmarks/bench_norms.py [--size-gb 2] [--count 4] [--noise 1e-3|1] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

SHAPE = (512, 512, 3, 3)  # a 9.4 MB conv kernel in float32


def make_series(folder: Path, count: int, bytes_per_ckpt: int, kind: str, noise: float = 1e-3) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    per = int(np.prod(SHAPE)) * 4
    n = max(1, bytes_per_ckpt // per)
    g = torch.Generator().manual_seed(0)
    state = {f"layer{i}.conv.weight": torch.randn(SHAPE, generator=g) for i in range(n)}
    state.update({f"layer{i}.bn.weight": torch.ones(SHAPE[0]) for i in range(n)})
    state.update({f"layer{i}.bn.running_var": torch.ones(SHAPE[0]) for i in range(n)})
    paths = []
    for step in range(count):
        for k, v in state.items():
            if k.endswith("conv.weight"):
                v.mul_(0.999).add_(torch.randn(SHAPE, generator=g), alpha=noise)
        p = folder / f"step_{(step + 1) * 100:06d}.{'pt' if kind == 'torch' else 'safetensors'}"
        if kind == "torch":
            torch.save(state, p)
        else:
            save_file(state, str(p))
        paths.append(p)
    return paths


def warm(paths: list[Path]) -> None:
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    for p in paths:
        with p.open("rb", buffering=0) as fh:
            while fh.readinto(view):
                pass


def read_all(paths: list[Path]) -> int:
    from ilr_inspect.series import open_series

    total = 0
    with open_series(paths, read_logs=False) as series:
        for ck in series.checkpoints:
            for name in ck.tensors:
                arr = ck.read(name)
                if not arr.flags.owndata:
                    arr = np.array(arr)  # touch every byte of a memory-mapped view
                total += arr.nbytes
    return total


def read_raw(paths: list[Path]) -> int:
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    total = 0
    for p in paths:
        with p.open("rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total


def measure_all(paths: list[Path]) -> int:
    from ilr_inspect.invariance import detect_units
    from ilr_inspect.measure import measure
    from ilr_inspect.series import open_series

    with open_series(paths, read_logs=False) as series:
        m = measure(series, detect_units(series.checkpoints[0]))
        return len(m.norms) + len(m.angles)


def timed(fn: object, *args: object) -> float:
    t = time.perf_counter()
    fn(*args)  # type: ignore[operator]
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size-gb", type=float, default=2.0, help="total size of both series")
    ap.add_argument("--count", type=int, default=4, help="checkpoints per format")
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a new temp folder)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--noise", type=float, default=1e-3,
                    help="update size between checkpoints: 1e-3 gives ~1e-3 rad (small-angle path), 1 gives ~0.8 rad")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument("--kernel", choices=("auto", "on", "off"), default="auto",
                    help="the compiled numba pass (extra `fast`): auto uses it from ~1 GB of pairs on")
    args = ap.parse_args()
    import os

    os.environ["ILR_INSPECT_KERNEL"] = args.kernel
    root = args.dir or Path(tempfile.mkdtemp(prefix="ilr-bench-norms-"))
    per_ckpt = int(args.size_gb * 1e9 / (2 * args.count))
    t0 = time.perf_counter()
    series = {kind: make_series(root / kind, args.count, per_ckpt, kind, args.noise)
              for kind in ("safetensors", "torch")}
    size = sum(p.stat().st_size for ps in series.values() for p in ps)
    print(f"series: {size / 1e9:.2f} GB in {sum(map(len, series.values()))} files under {root} "
          f"(written in {time.perf_counter() - t0:.0f} s); largest tensor {np.prod(SHAPE) * 4 / 1e6:.1f} MB")
    for kind, paths in series.items():
        warm(paths)
        read_all(paths)
        first = timed(measure_all, paths)  # imports, numba load and first-touch costs out of the way
        print(f"{kind:12s} first norms+angles call (one-time imports / kernel load included): {first:.3f} s")
        reads, raws, meas = [], [], []
        for _ in range(args.repeat):  # interleaved, so that drifting machine load hits all three alike
            reads.append(timed(read_all, paths))
            raws.append(timed(read_raw, paths))
            meas.append(timed(measure_all, paths))
        rate = sum(p.stat().st_size for p in paths) / min(reads) / 1e9
        print(f"{kind:12s} read {min(reads):6.3f} s ({rate:.2f} GB/s)   raw read {min(raws):6.3f} s   "
              f"norms+angles {min(meas):6.3f} s   ratio {min(meas) / min(reads):.2f}x vs read, "
              f"{min(meas) / min(raws):.2f}x vs raw read   (median ratios {np.median(meas) / np.median(reads):.2f}x, "
              f"{np.median(meas) / np.median(raws):.2f}x)")
    largest = int(np.prod(SHAPE)) * 4
    for kind, paths in series.items():
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.start()
        measure_all(paths)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"{kind:12s} peak traced memory of norms+angles {peak / 1e6:7.1f} MB = {peak / largest:5.1f}x the "
              f"largest tensor; max RSS grew {(rss1 - rss0) / 1e3:.1f} MB")
    if not args.keep and args.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
