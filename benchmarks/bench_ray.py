"""`norms` (or `--cmd angles`) on a ≥ 2 GB safetensors series: local vs `--ray local` vs `--ray auto` (a head
started beforehand).

Every run is the whole CLI process (imports, series listing, the pass, the table), so the Ray times include
connecting, starting workers and, for `--ray local`, starting the cluster. All three use the same cores: the
local pass its thread pool, the Ray runs a cluster of ``--cpus`` CPUs on this machine. The page cache is warmed
first, so the comparison is of the pass, not of the disk. Prints the times, the overhead ratios (target: Ray ≤ 1.2×
local) and the task granularity chosen (:func:`ilr_inspect.scaleout.measure.plan`). CPU is user + sys of the CLI
process and the children it waited for: the whole run for local, only the driver for Ray (its workers belong to
the cluster).

Usage: python benchmarks/bench_ray.py [--gib 2.0] [--checkpoints 8] [--cpus 2] [--repeats 1] [--cmd norms]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_HEAD = r"""
import sys
import ray
ray.init(num_cpus=int(sys.argv[1]), include_dashboard=False, configure_logging=False, log_to_driver=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
ray.shutdown()
"""


def write_series(folder: Path, gib: float, n_ck: int) -> int:
    """n_ck checkpoints of 16 float32 tensors (1024 × cols), about gib GiB in all; returns the bytes written."""
    from safetensors.numpy import save_file

    per_tensor = int(gib * 2**30 / n_ck / 16)
    cols = max(1, per_tensor // (4 * 1024))
    rng = np.random.default_rng(0)
    w = {f"layers.{i}.weight": rng.standard_normal((1024, cols), dtype=np.float32) for i in range(16)}
    total = 0
    for k in range(n_ck):
        if k:
            for a in w.values():  # a small random step, in place
                a += np.float32(0.01) * rng.standard_normal(a.shape, dtype=np.float32)
        path = folder / f"step_{1000 * k:07d}.safetensors"
        save_file(w, str(path))
        total += path.stat().st_size
    return total


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall s, CPU s of the process and its waited-for children)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return dt, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def evict(folder: Path) -> None:
    """Drop the series' pages from the page cache (POSIX_FADV_DONTNEED on clean pages needs no privilege), so the
    next run reads from disk — the case of a series larger than memory."""
    for p in sorted(folder.iterdir()):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gib", type=float, default=2.0, help="series size")
    ap.add_argument("--checkpoints", type=int, default=8)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the Ray cluster (use this machine's)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats; the minimum time is reported")
    ap.add_argument("--cmd", default="norms", choices=["norms", "angles"])
    ap.add_argument("--cold", action="store_true", help="evict the series from the page cache before every run")
    args = ap.parse_args()
    # Bytecode cached as in an installed package (PYTHONDONTWRITEBYTECODE would recompile every module per run).
    drop = ("ILR_INSPECT_RAY_ADDRESS", "RAY_ADDRESS", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        folder = Path(tmp) / "ckpts"
        folder.mkdir()
        t0 = time.perf_counter()
        nbytes = write_series(folder, args.gib, args.checkpoints)
        print(f"series: {args.checkpoints} checkpoints, {nbytes / 2**30:.2f} GiB "
              f"(written in {time.perf_counter() - t0:.1f} s)")

        from ilr_inspect.scaleout.measure import plan
        from ilr_inspect.series import open_series

        with open_series(folder) as series:
            cks = series.checkpoints
            print("granularity:", plan(cks, list(cks[0].tensors), args.cpus).describe())
        os.sync()  # written pages must be clean before they can be evicted
        for p in sorted(folder.iterdir()):  # warm the page cache
            with open(p, "rb") as fh:
                while fh.read(1 << 24):
                    pass

        def run(cmd: list[str], run_env: dict[str, str]) -> tuple[float, float]:
            if args.cold:
                evict(folder)
            return timed(cmd, run_env)

        base = [sys.executable, "-m", "ilr_inspect", args.cmd, str(folder), "-f", "json", "-q"]
        head = subprocess.Popen([sys.executable, "-c", _HEAD, str(args.cpus)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert head.stdout is not None and head.stdin is not None
        try:
            address = head.stdout.readline().strip()
            auto_env = {**env, "RAY_ADDRESS": address}  # `auto` joins this head, not another cluster here
            times: dict[str, list[tuple[float, float]]] = {"local": [], "ray local": [], "ray auto": []}
            for _ in range(args.repeats):
                times["local"].append(run(base, env))
                times["ray local"].append(run([*base, "--ray", "local"], env))
                times["ray auto"].append(run([*base, "--ray", "auto"], auto_env))
        finally:
            head.stdin.close()
            head.wait(timeout=120)
            head.stdout.close()
    best = {k: min(w for w, _ in v) for k, v in times.items()}
    gb = nbytes / 1e9
    print(f"command: {args.cmd}, page cache {'cold (evicted before every run)' if args.cold else 'warm'}")
    for k, t in best.items():
        cpu = min(c for _, c in times[k])
        print(f"{k:>10}: {t:7.2f} s  ({gb / t:.2f} GB/s)  CPU {cpu:.2f} s{' (driver only)' if k != 'local' else ''}"
              f"  all: {', '.join(f'{w:.2f}' for w, _ in times[k])}")
    print(f"overhead ray auto / local:  {best['ray auto'] / best['local']:.2f}x (target <= 1.2x)")
    print(f"overhead ray local / local: {best['ray local'] / best['local']:.2f}x (includes starting the cluster)")


if __name__ == "__main__":
    main()
