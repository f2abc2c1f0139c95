"""`ls` must answer in about the time it takes to read the headers, not the weights (issue 2).

Builds a series of N checkpoints of SIZE bytes each (torch zip and safetensors), then times, in one run:
  raw header       - the bytes a reader must touch: the safetensors JSON header / the torch zip's pickle record;
  framework header - what the maintained loaders take to list tensors: safe_open + shapes / torch.load(mmap=True);
  ilr-inspect ls   - the library call behind the command (open series, steps, hyperparameters, table);
  full read        - reading every byte of every file once (what a weight-reading tool would pay).
Run: python benchmarks/bench_ls.py --count 20 --size-gb 1 --dir /tmp/ilr-bench-ls
"""

from __future__ import annotations

import argparse
import json
import struct
import time
import zipfile
from pathlib import Path

import numpy as np


def make_series(folder: Path, count: int, size_bytes: int, kind: str) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    n_tensors = 64
    per = max(size_bytes // 4 // n_tensors, 1)
    paths = []
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(n_tensors)}
    for step in range(count):
        p = folder / (f"step_{step * 100:06d}.pt" if kind == "torch" else f"step_{step * 100:06d}.safetensors")
        paths.append(p)
        if p.exists() and abs(p.stat().st_size - size_bytes) < size_bytes * 0.05:
            continue
        if kind == "torch":
            opt = {"state": {}, "param_groups": [{"lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9,
                                                  "dampening": 0, "nesterov": False,
                                                  "params": list(range(n_tensors)),
                                                  "param_names": list(base)}]}
            torch.save({"model": base, "optimizer": opt, "step": step * 100}, p)
        else:
            save_file(base, str(p), metadata={"step": str(step * 100)})
    return paths


def header_baseline(paths: list[Path]) -> float:
    t = time.perf_counter()
    for p in paths:
        if p.suffix == ".safetensors":
            with p.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                json.loads(fh.read(n))
        else:
            with zipfile.ZipFile(p) as z:
                name = next(n for n in z.namelist() if n.endswith("data.pkl"))
                z.read(name)
    return time.perf_counter() - t


def framework_header_load(paths: list[Path]) -> float:
    """What the maintained libraries need to list tensors: torch.load(mmap, weights_only) / safe_open + shapes."""
    import torch
    from safetensors import safe_open

    t = time.perf_counter()
    for p in paths:
        if p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                for k in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    f.get_slice(k).get_shape()
        else:
            torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    return time.perf_counter() - t


def full_read(paths: list[Path]) -> float:
    t = time.perf_counter()
    for p in paths:
        buf = bytearray(1 << 24)
        with p.open("rb") as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t


def run_ls(paths: list[Path]) -> float:
    from ilr_inspect.inventory import ls

    t = time.perf_counter()
    result = ls(paths)
    elapsed = time.perf_counter() - t
    assert len(result.rows) == len(paths)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ilr-bench-ls"))
    args = ap.parse_args()
    size = int(args.size_gb * (1 << 30))
    results = {}
    for kind in ("torch", "safetensors"):
        paths = make_series(args.dir / kind, args.count, size, kind)
        full_read(paths)  # warm the page cache so every timing below reads from memory
        hb = min(header_baseline(paths) for _ in range(3))
        fh = min(framework_header_load(paths) for _ in range(3))
        ls_t = min(run_ls(paths) for _ in range(3))
        fr = min(full_read(paths) for _ in range(2))
        results[kind] = {"files": len(paths), "GB": round(sum(p.stat().st_size for p in paths) / 2**30, 2),
                         "raw_header_s": round(hb, 4), "framework_header_s": round(fh, 4), "ls_s": round(ls_t, 4),
                         "full_read_s": round(fr, 3), "ls_over_framework_header": round(ls_t / fh, 2),
                         "ls_over_raw_header": round(ls_t / hb, 1), "full_read_over_ls": round(fr / ls_t, 1)}
        print(kind, json.dumps(results[kind]))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
