"""What a user waits for: whole-process `ilr-inspect norms` / `angles` against reading the same bytes (issue 14).

Writes a series under /tmp (default 10 checkpoints × 256 MiB, 8 float32 tensors each, ≈2.7 GB) as safetensors
and as torch zip, warms the page cache, and times whole processes, minimum of --repeat runs:
  cat      - `cat` of the files to /dev/null (the floor: bytes from the page cache, nothing else);
  loader   - a minimal Python process reading every tensor once with the framework's loader and summing it
             (safetensors: safe_open(framework="np").get_tensor; torch: torch.load(mmap=True) + Tensor.sum);
  ideal    - a minimal one-pass reduction: float64 norms and consecutive dot products per tensor, 2 threads,
             compiled (numba), over memory-mapped safetensors data (no torch-zip variant);
  norms / angles - the tool, output to a file in /tmp.
CPU s is user + sys of the process (all threads): less sensitive than wall time to a busy machine.
Also: the fixed cost on a tiny 2-file safetensors series against `ilr-inspect --help`, and for every process the
peak anonymous memory and the peak resident file pages (RssAnon / RssFile polled from /proc/<pid>/status every
2 ms). Everything written is deleted at the end (unless --keep).

Run:  python benchmarks/bench_process.py                      # the 2.7 GB table
      python benchmarks/bench_process.py --mib 32             # quick, 10 × 32 MiB
      python benchmarks/bench_process.py --big                # also 20 × 1 GiB (needs ~40 GB free under /tmp)
      python benchmarks/bench_process.py --fixed-only --repeat 5  # only the tiny-series fixed cost
      python benchmarks/bench_process.py --fixed-only --python VENV/bin/python  # ... of a non-editable install
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TENSORS = 8
PY = sys.executable
CLI = [PY, "-m", "ilr_inspect"]

LOADER_ST = """
import sys
from safetensors import safe_open
for f in sys.argv[1:]:
    with safe_open(f, framework="np") as h:
        for k in h.keys():
            h.get_tensor(k).sum()
"""
LOADER_PT = """
import sys, torch
for f in sys.argv[1:]:
    for t in torch.load(f, mmap=True, weights_only=True, map_location="cpu").values():
        t.sum()
"""
# One pass, float64 sums, two threads, compiled: per tensor ‖b‖² and ⟨a,b⟩ against the previous checkpoint.
IDEAL_ST = """
import json, mmap, struct, sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from numba import njit

@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def sums(b, a):
    bb = 0.0
    ab = 0.0
    for i in range(b.size):
        x = np.float64(b[i])
        bb += x * x
        ab += x * np.float64(a[i])
    return bb, ab

@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def norm(b):
    bb = 0.0
    for i in range(b.size):
        x = np.float64(b[i])
        bb += x * x
    return bb

def tensors(path):
    fh = open(path, "rb")
    (n,) = struct.unpack("<Q", fh.read(8))
    head = json.loads(fh.read(n))
    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    out = {}
    for k, v in head.items():
        if k != "__metadata__":
            lo, hi = v["data_offsets"]
            out[k] = np.frombuffer(mm, np.float32, (hi - lo) // 4, 8 + n + lo)
    return out

prev = None
out = []
with ThreadPoolExecutor(2) as pool:
    for f in sys.argv[1:]:
        cur = tensors(f)
        futs = [pool.submit(sums, t, prev[k]) if prev else pool.submit(norm, t) for k, t in cur.items()]
        out.append([x.result() for x in futs])
        prev = cur
print(len(out))
"""


def write_series(folder: Path, count: int, mib: int, fmt: str) -> list[Path]:
    """``count`` checkpoints of ``mib`` MiB, TENSORS float32 tensors each; checkpoint k is a rotated, decayed copy
    of one random base (cheap to make, every value different between checkpoints)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = mib * (1 << 20) // 4 // TENSORS
    cols = 1024
    rows = max(1, n // cols)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((TENSORS, rows, cols), dtype=np.float32)
    paths = []
    for k in range(count):
        w = base * np.float32(1.0 - 0.01 * k) + np.float32(0.01) * np.roll(base, k + 1, axis=2)
        state = {f"layer{i}.weight": np.ascontiguousarray(w[i]) for i in range(TENSORS)}
        step = 100 * (k + 1)
        if fmt == "safetensors":
            from safetensors.numpy import save_file

            p = folder / f"checkpoint-{step}.safetensors"
            save_file(state, str(p), metadata={"step": str(step)})
        else:
            import torch

            p = folder / f"checkpoint-{step}.pt"
            torch.save({n: torch.from_numpy(v) for n, v in state.items()}, p)
        paths.append(p)
        del w, state
    return paths


def _status(pid: int) -> tuple[int, int]:
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1]) * 1024
    except OSError:
        pass
    return anon, file


Timing = tuple[float, float, int, int]  # wall s, CPU s (user + sys), peak RssAnon, peak RssFile


def run(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Timing:
    """Wall and CPU time of one whole process, and its peak RssAnon and RssFile (polled)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=cwd)
    anon = file = 0
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        a, f = _status(p.pid)
        anon, file = max(anon, a), max(file, f)
        time.sleep(0.002)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}")
    return wall, ru.ru_utime + ru.ru_stime, anon, file


def best(cmd: list[str], repeat: int, env: dict[str, str] | None = None) -> Timing:
    runs = [run(cmd, env) for _ in range(repeat)]
    return (min(r[0] for r in runs), min(r[1] for r in runs), max(r[2] for r in runs), max(r[3] for r in runs))


def table(count: int, mib: int, repeat: int, work: Path) -> None:
    print(f"\n## {count} × {mib} MiB ({count * mib / 1024:.2f} GiB), {TENSORS} float32 tensors per checkpoint, "
          f"page cache warm, min of {repeat}, {os.cpu_count()} CPUs")
    print(f"{'format':12} {'process':8} {'wall s':>7} {'/loader':>8} {'/cat':>6} {'CPU s':>6} {'anon MiB':>9} "
          f"{'file MiB':>9}")
    out = work / "out.csv"
    for fmt in ("safetensors", "torch"):
        folder = work / fmt
        files = write_series(folder, count, mib, fmt)
        names = [str(f) for f in files]
        subprocess.run(["cat", *names], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
        rows: dict[str, Timing] = {}
        rows["cat"] = best(["cat", *names], repeat)
        rows["loader"] = best([PY, "-c", LOADER_ST if fmt == "safetensors" else LOADER_PT, *names], repeat)
        if fmt == "safetensors":
            ideal = work / "ideal.py"  # a file, so numba can cache its machine code (warmed by one untimed run)
            ideal.write_text(IDEAL_ST)
            run([PY, str(ideal), *names])
            rows["ideal"] = best([PY, str(ideal), *names], repeat)
        for cmd in ("norms", "angles"):
            rows[cmd] = best([*CLI, cmd, str(folder), "-f", "csv", "-o", str(out), "-q"], repeat)
        for k, (wall, cpu, anon, file) in rows.items():
            print(f"{fmt:12} {k:8} {wall:7.2f} {wall / rows['loader'][0]:8.2f} {wall / rows['cat'][0]:6.2f} "
                  f"{cpu:6.2f} {anon / 2**20:9.0f} {file / 2**20:9.0f}")
        shutil.rmtree(folder)


def fixed_cost(repeat: int, work: Path, python: str = PY) -> None:
    folder = work / "tiny"
    write_series(folder, 2, 1, "safetensors")
    cli = [python, "-m", "ilr_inspect"]
    cmds = {
        "norms -f csv": [*cli, "norms", str(folder), "-f", "csv", "-o", str(work / "tiny.csv"), "-q"],
        "norms (table)": [*cli, "norms", str(folder), "-q"],
        "angles -f json": [*cli, "angles", str(folder), "-f", "json", "-q"],
        "ls": [*cli, "ls", str(folder)],
        "hparams": [*cli, "hparams", str(folder), "-q"],
    }
    # The floor under any of them: the interpreter's start-up (site, .pth files: an editable install adds its
    # finder), NumPy (every measurement needs it) and Typer (the CLI), each as a bare process.
    floor = {
        "python -c pass": [python, "-c", "pass"],
        "import numpy": [python, "-c", "import numpy"],
        "import typer": [python, "-c", "import typer.main"],
        "import numpy, typer": [python, "-c", "import numpy, typer.main"],
    }
    # Bytecode is cached as an installed package's would be (PYTHONDONTWRITEBYTECODE would recompile every
    # module of the tool in every run), in a folder of its own; one warm-up run fills it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    # Interleaved with --help in the same loop, so a busy machine slows both alike; minimum over the loop.
    times: dict[str, Timing] = {}
    for i in range(repeat + 1):
        for name, cmd in {"--help": [*cli, "--help"], **cmds, **floor}.items():
            t = run(cmd, env, cwd=work)  # not the checkout: `python -m` would import the source tree from there
            if i == 0:
                continue
            times[name] = t if name not in times or t[0] < times[name][0] else times[name]
    help_ = times["--help"]
    print(f"\n## fixed cost: tiny 2-file safetensors series, min of {repeat} (interleaved with --help), {python}")
    print(f"ilr-inspect --help          {help_[0]:.2f} s (CPU {help_[1]:.2f} s)  anon {help_[2] / 2**20:.0f} MiB")
    for name in cmds:
        t = times[name]
        print(f"ilr-inspect {name:15s} {t[0]:.2f} s (CPU {t[1]:.2f} s)  anon {t[2] / 2**20:.0f} MiB  "
              f"ratio {t[0] / help_[0]:.2f}× --help (CPU {t[1] / help_[1]:.2f}×)")
    print("floor (bare processes):")
    for name in floor:
        t = times[name]
        print(f"  {name:25s} {t[0]:.3f} s (CPU {t[1]:.3f} s)  {t[0] / help_[0]:.2f}× --help")
    shutil.rmtree(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--mib", type=int, default=256, help="MiB per checkpoint")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--big", action="store_true", help="also 20 × 1 GiB")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--fixed-only", action="store_true", help="only the fixed cost on a tiny series")
    ap.add_argument("--python", default=PY, help="interpreter for the fixed cost (e.g. one of a venv with a "
                    "regular, non-editable install of ilr-inspect)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ilr-bench-process-", dir="/tmp"))
    try:
        fixed_cost(args.repeat, work, args.python)
        if args.fixed_only:
            return
        table(args.count, args.mib, args.repeat, work)
        if args.big:
            table(20, 1024, args.repeat, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
