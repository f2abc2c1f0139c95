"""`ilr-inspect ls` and `norms` on a checkpoint series in S3 (a moto S3 server on 127.0.0.1), as whole processes.

The claims under test (docs/scale-out.md): `ls` on a remote series reads headers with ranged requests, so it moves
< 1 % of the bytes (issue target: 20 x 512 MiB safetensors files); `norms` streams each tensor once, so it moves
about 100 % once, and gives the same table as the local run; `hparams` on Trainer-layout `checkpoint-N/` folders
reads `optimizer.pt` lazily (zip directory, data.pkl, step counters), a small fraction of it. Bytes are counted
twice: by the client (ILR_INSPECT_IO_STATS=1) and by the server (object bytes sent).

Usage: python benchmarks/bench_remote_ls.py [--n 20] [--mib 512] [--norms-n 5] [--norms-mib 32]
                                            [--hparams-n 3] [--hparams-mib 64]
The full size needs ~2 x 10 GiB of temporary disk (the files, and moto's copy of them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


class Counter:
    """WSGI middleware: object bytes the server sent (GET bucket/key; listings excluded)."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app, self.bytes, self.lock = app, 0, threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        counted = environ["REQUEST_METHOD"] == "GET" and environ.get("PATH_INFO", "").strip("/").count("/") >= 1
        for chunk in self.app(environ, start_response):
            if counted:
                with self.lock:
                    self.bytes += len(chunk)
            yield chunk


def write_sparse(path: Path, mib: int, step: int, rng: np.random.Generator) -> None:
    """A valid safetensors file of ``mib`` MiB: a few big float32 tensors left as zeros (sparse on disk) and a
    small random one that makes every file's bytes distinct."""
    small = rng.standard_normal(256).astype("<f4").tobytes()
    big = (mib << 20) - len(small)
    n_big = 4
    per = (big // n_big) // 4 // 1024 * 1024  # float32 elements per big tensor, a multiple of 1024
    header: dict[str, Any] = {"__metadata__": {"step": str(step), "lr": "0.1", "weight_decay": "0.0005"}}
    offset = 0
    for i in range(n_big):
        header[f"layer{i}.weight"] = {"dtype": "F32", "shape": [per // 1024, 1024],
                                      "data_offsets": [offset, offset + per * 4]}
        offset += per * 4
    header["head.bias"] = {"dtype": "F32", "shape": [256], "data_offsets": [offset, offset + len(small)]}
    offset += len(small)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.seek(8 + len(raw) + offset - len(small))
        fh.write(small)


def write_dense(path: Path, mib: int, step: int, rng: np.random.Generator) -> None:
    from safetensors.numpy import save_file

    n = (mib << 20) // 4 // 4
    save_file({f"layer{i}.weight": rng.standard_normal((n // 512, 512)).astype(np.float32) for i in range(4)},
              str(path), metadata={"step": str(step), "lr": "0.1", "weight_decay": "0.0005"})


def write_trainer_checkpoint(folder: Path, mib: int, step: int) -> None:
    """A ``checkpoint-N/`` folder as the HF Trainer lays it out: model.safetensors, optimizer.pt (torch.save of a
    real AdamW state_dict after ``step`` updates, ``mib`` MiB of moments), scheduler.pt, trainer_state.json."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(step)
    width = 512
    layers = max(1, (mib << 20) // (2 * 4 * (width * width + width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 1000)
    for _ in range(step):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
    folder.mkdir(parents=True)
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    torch.save(sched.state_dict(), folder / "scheduler.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, str, int]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    m = re.search(r"remote storage: (\d+) bytes fetched", proc.stderr)
    return wall, proc.stdout, int(m.group(1)) if m else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20, help="files in the ls series")
    ap.add_argument("--mib", type=int, default=512, help="MiB per file of the ls series")
    ap.add_argument("--norms-n", type=int, default=5)
    ap.add_argument("--norms-mib", type=int, default=32)
    ap.add_argument("--hparams-n", type=int, default=3, help="checkpoint-N folders of the hparams series")
    ap.add_argument("--hparams-mib", type=int, default=64, help="MiB of optimizer.pt per checkpoint")
    args = ap.parse_args()

    import boto3  # type: ignore[import-untyped]
    from boto3.s3.transfer import TransferConfig  # type: ignore[import-untyped]
    from moto.moto_server.threaded_moto_server import MotoRequestHandler  # type: ignore[attr-defined]
    from moto.server import DomainDispatcherApplication, create_backend_app  # type: ignore[attr-defined]
    from werkzeug.serving import make_server

    counter = Counter(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, counter, True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "ILR_INSPECT_IO_STATS": "1"}
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="bench")
    cli = [sys.executable, "-m", "ilr_inspect"]
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        ls_dir = Path(tmp) / "ls"
        ls_dir.mkdir()
        t0 = time.perf_counter()
        for i in range(args.n):
            f = ls_dir / f"step_{(i + 1) * 1000:07d}.safetensors"
            write_sparse(f, args.mib, (i + 1) * 1000, rng)
            s3.upload_file(str(f), "bench", f"ls/{f.name}", Config=TransferConfig(multipart_threshold=1 << 40))
        setup = time.perf_counter() - t0
        total = sum(f.stat().st_size for f in ls_dir.iterdir())
        before = counter.bytes
        wall, out, client = run([*cli, "ls", "s3://bench/ls", "-f", "csv"], env)
        server_bytes = counter.bytes - before
        assert len(out.strip().splitlines()) == args.n + 1, out
        local_wall, _, _ = run([*cli, "ls", str(ls_dir), "-f", "csv"], env)
        rows.append((f"ls {args.n} x {args.mib} MiB", total, local_wall, wall, client, server_bytes))

        nd = Path(tmp) / "norms"
        nd.mkdir()
        for i in range(args.norms_n):
            f = nd / f"step_{(i + 1) * 100:06d}.safetensors"
            write_dense(f, args.norms_mib, (i + 1) * 100, rng)
            s3.upload_file(str(f), "bench", f"norms/{f.name}", Config=TransferConfig(multipart_threshold=1 << 40))
        total_n = sum(f.stat().st_size for f in nd.iterdir())
        before = counter.bytes
        wall_r, out_r, client_n = run([*cli, "norms", "s3://bench/norms", "-f", "csv"], env)
        server_n = counter.bytes - before
        wall_l, out_l, _ = run([*cli, "norms", str(nd), "-f", "csv"], env)
        same = out_r.replace("s3://bench/norms", "<root>") == out_l.replace(str(nd), "<root>")
        rows.append((f"norms {args.norms_n} x {args.norms_mib} MiB", total_n, wall_l, wall_r, client_n, server_n))

        hd = Path(tmp) / "trainer"
        for i in range(args.hparams_n):
            write_trainer_checkpoint(hd / f"checkpoint-{i + 1}", args.hparams_mib, i + 1)
        for f in sorted(hd.rglob("*")):
            if f.is_file():
                s3.upload_file(str(f), "bench", f"trainer/{f.relative_to(hd).as_posix()}",
                               Config=TransferConfig(multipart_threshold=1 << 40))
        total_h = sum(f.stat().st_size for f in hd.rglob("optimizer.pt"))
        before = counter.bytes
        wall_hr, out_hr, client_h = run([*cli, "hparams", "s3://bench/trainer", "-f", "csv"], env)
        server_h = counter.bytes - before
        wall_hl, out_hl, _ = run([*cli, "hparams", str(hd), "-f", "csv"], env)
        same_h = out_hr.replace("s3://bench/trainer", "<root>") == out_hl.replace(str(hd), "<root>")
        rows.append((f"hparams {args.hparams_n} x {args.hparams_mib} MiB opt", total_h, wall_hl, wall_hr, client_h,
                     server_h))
    server.shutdown()

    print(f"setup (write + upload): {setup:.1f} s; moto S3 server on {endpoint}")
    print(f"{'command':<24} {'bytes':>14} {'local s':>8} {'remote s':>9} {'client bytes':>13} {'server bytes':>13}"
          f" {'fraction':>9}")
    for name, tot, lw, rw, cb, sb in rows:
        print(f"{name:<24} {tot:>14} {lw:>8.2f} {rw:>9.2f} {cb:>13} {sb:>13} {sb / tot:>9.4%}")
    print(f"norms table remote == local: {same}")
    print(f"hparams table remote == local: {same_h} (bytes: every object read, against the optimizer.pt sizes)")
    ls_fraction = rows[0][5] / rows[0][1]
    print(f"ls target < 1 % of the bytes: {'met' if ls_fraction < 0.01 else 'NOT met'} ({ls_fraction:.4%})")


if __name__ == "__main__":
    main()
