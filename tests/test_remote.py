"""Checkpoint series in object storage (docs/scale-out.md): a real S3 API server (moto's, in server mode) on
127.0.0.1, real fixture series uploaded to it, and the CLI pointed at ``s3://`` URLs must give the same tables as
the local run on the same files, while ``ls`` fetches headers only (counted by the client and at the server)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from typer.testing import CliRunner

from ilr_inspect import storage
from ilr_inspect.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"
BUCKET = "ilr"
SERIES = {  # S3 prefix -> fixture folder (written by the frameworks' own save paths, fixtures/make_*.py)
    # (the same folder names as locally: tables name a final save by its folder)
    "runs/safetensors_meta": FIX / "layouts" / "safetensors_meta",  # safetensors files, hparams in __metadata__
    "runs/hf_trainer_final": FIX / "layouts" / "hf_trainer_final",  # Trainer output_dir + save_model() on top
    "runs/hf_sharded": FIX / "torch_other" / "hf_sharded",  # model-0000x-of-00002.safetensors + index
    "runs/flax": FIX / "flax",  # Flax msgpack (no ranged reader: staged) + hparams.yaml + TensorBoard runs/
}


class _Counter:
    """WSGI middleware: bytes of object data the server sent (GET on bucket/key, listings excluded)."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self.object_bytes = 0
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        is_object = environ["REQUEST_METHOD"] == "GET" and environ.get("PATH_INFO", "").strip("/").count("/") >= 1
        for chunk in self.app(environ, start_response):
            if is_object:
                with self.lock:
                    self.object_bytes += len(chunk)
            yield chunk


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from moto.moto_server.threaded_moto_server import MotoRequestHandler  # type: ignore[attr-defined]
    from moto.server import DomainDispatcherApplication, create_backend_app  # type: ignore[attr-defined]
    from werkzeug.serving import make_server

    counter = _Counter(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, counter, True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3  # type: ignore[import-untyped]

    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    for prefix, folder in SERIES.items():
        for f in sorted(folder.rglob("*")):
            if f.is_file() and f.name != "truth.json":
                client.upload_file(str(f), BUCKET, f"{prefix}/{f.relative_to(folder).as_posix()}")
    # Bigger files for the "ls reads headers only" check: 3 checkpoints of ~8 MiB (two float32 tensors each).
    from safetensors.numpy import save_file

    big = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    for step in (100, 200, 300):
        save_file({"layer.weight": rng.standard_normal((1024, 1024)).astype(np.float32),
                   "layer.bias": rng.standard_normal(1024).astype(np.float32),
                   "norm.weight": rng.standard_normal((1024, 1024)).astype(np.float32)},
                  str(big / f"step_{step:06d}.safetensors"), metadata={"step": str(step), "lr": "0.1"})
        client.upload_file(str(big / f"step_{step:06d}.safetensors"), BUCKET, f"big/step_{step:06d}.safetensors")
    SERIES_BIG = big  # noqa: N806
    try:
        yield {"endpoint": endpoint, "counter": counter, "big": SERIES_BIG, "env": env}
    finally:
        server.shutdown()
        thread.join(5)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage._FS.clear()
        storage._LISTINGS.clear()


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def _table(out: str, *roots: str) -> pd.DataFrame:
    for r in roots:  # the only expected difference: where the files are
        out = out.replace(r.rstrip("/") + "/", "<root>/").replace(r.rstrip("/"), "<root>")
    return pd.read_csv(io.StringIO(out))


def _same(cmd: str, local: Path, url: str, *extra: str) -> pd.DataFrame:
    code_l, out_l, err_l = _cli(cmd, str(local), "-f", "csv", *extra)
    code_r, out_r, err_r = _cli(cmd, url, "-f", "csv", *extra)
    assert code_l == 0, err_l
    assert code_r == 0, err_r
    a, b = _table(out_l, str(local)), _table(out_r, url)
    assert list(a.columns) == list(b.columns)
    numeric = [c for c in a.columns if pd.api.types.is_float_dtype(a[c])]
    pd.testing.assert_frame_equal(a.drop(columns=numeric), b.drop(columns=numeric))
    for c in numeric:  # the same bytes give the same floats; 1e-12 relative leaves room for nothing else
        np.testing.assert_allclose(b[c].to_numpy(float), a[c].to_numpy(float), rtol=1e-12, atol=0, equal_nan=True)
    assert len(a) > 0
    return b


@pytest.mark.parametrize("prefix", list(SERIES))
def test_ls_and_hparams_match_local(s3: dict[str, Any], prefix: str) -> None:
    for cmd in ("ls", "hparams"):
        _same(cmd, SERIES[prefix], f"s3://{BUCKET}/{prefix}")


@pytest.mark.parametrize(("prefix", "commands"), [
    ("runs/safetensors_meta", ("norms", "angles")),
    ("runs/hf_sharded", ("norms", "angles")),
    pytest.param("runs/hf_trainer_final", ("norms",), marks=pytest.mark.slow),  # config.json units + functional
    ("runs/flax", ("norms",)),
])
def test_measurements_match_local(s3: dict[str, Any], prefix: str, commands: tuple[str, ...]) -> None:
    for cmd in commands:
        table = _same(cmd, SERIES[prefix], f"s3://{BUCKET}/{prefix}")
        if cmd == "norms":
            assert table["norm"].notna().all() and (table["norm"] > 0).all()


def test_hf_final_save_found_by_etag(s3: dict[str, Any]) -> None:
    """The Trainer's save_model() copy at the top equals checkpoint-20 (same bytes → same ETag): counted once."""
    code, out, err = _cli("ls", f"s3://{BUCKET}/runs/hf_trainer_final", "-f", "csv")
    assert code == 0, err
    table = pd.read_csv(io.StringIO(out))
    assert sorted(table["step"]) == [10, 20]
    assert "identical to checkpoint-20" in err


def test_staged_formats_say_so(s3: dict[str, Any]) -> None:
    """A format without a ranged reader is copied to a temporary folder, with one line naming the bytes."""
    code, _out, err = _cli("ls", f"s3://{BUCKET}/runs/flax", "-f", "csv")
    assert code == 0, err
    size = sum(f.stat().st_size for f in (SERIES["runs/flax"] / "ckpts").rglob("*") if f.is_file())
    notes = [ln for ln in err.splitlines() if "downloaded" in ln and "temporary copy" in ln]
    assert notes and sum(int(ln.split("downloaded ")[1].split()[0]) for ln in notes) == size, err


def test_damaged_remote_header_is_one_line_error(s3: dict[str, Any]) -> None:
    import boto3  # type: ignore[import-untyped]

    client = boto3.client("s3", endpoint_url=s3["endpoint"])
    good = (SERIES["runs/safetensors_meta"] / "step_000010.safetensors").read_bytes()
    client.put_object(Bucket=BUCKET, Key="bad/truncated/step_000010.safetensors", Body=good[:200])
    client.put_object(Bucket=BUCKET, Key="bad/lying/step_000010.safetensors",
                      Body=b"\xff" * 8 + good[8:])  # a header length far beyond the object
    for case in ("truncated", "lying"):
        code, _out, err = _cli("ls", f"s3://{BUCKET}/bad/{case}")
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 4 and len(lines) == 1 and lines[0].startswith("Error: s3://ilr/bad/"), err


def test_ls_reads_headers_only(s3: dict[str, Any]) -> None:
    total = sum(f.stat().st_size for f in s3["big"].glob("*.safetensors"))
    counter = s3["counter"]
    before_server = counter.object_bytes
    storage.reset_counter()
    code, out, err = _cli("ls", f"s3://{BUCKET}/big", "-f", "csv")
    assert code == 0, err
    client_bytes, server_bytes = storage.bytes_fetched(), counter.object_bytes - before_server
    table = pd.read_csv(io.StringIO(out))
    assert list(table["step"]) == [100, 200, 300]
    assert 0 < client_bytes < 0.01 * total, (client_bytes, total)
    assert 0 < server_bytes < 0.01 * total, (server_bytes, total)
    assert server_bytes == client_bytes  # the client's counter sees every byte the server sent


def test_norms_stream_single_tensors(s3: dict[str, Any]) -> None:
    """norms reads each tensor with one ranged request: every byte of the three files' tensors once, and the
    values equal a float64 NumPy recomputation from the local files."""
    from safetensors.numpy import load_file

    storage.reset_counter()
    code, out, err = _cli("norms", f"s3://{BUCKET}/big", "-f", "csv", "--per-tensor")
    assert code == 0, err
    table = pd.read_csv(io.StringIO(out))
    for step in (100, 200, 300):
        sd = load_file(str(s3["big"] / f"step_{step:06d}.safetensors"))
        for name, value in sd.items():
            row = table[(table["step"] == step) & (table["unit"] == name)]
            if len(row):
                expect = float(np.linalg.norm(value.astype(np.float64)))
                assert float(row["norm"].iloc[0]) == pytest.approx(expect, rel=1e-6)
    data = sum(f.stat().st_size for f in s3["big"].glob("*.safetensors"))
    assert storage.bytes_fetched() <= data * 1.05  # never the whole file twice


@pytest.mark.parametrize(("url", "needle"), [
    ("s3://no-such-bucket/run", "no such"),
    (f"s3://{BUCKET}/does/not/exist", "no such"),
    ("unknownproto://x/y", "unknown URL scheme"),
    ("gs://bucket/run", "pip install 'ilr-inspect[gcs]'"),
])
def test_bad_urls_are_one_line_errors(s3: dict[str, Any], url: str, needle: str) -> None:
    if "gs://" in url:
        try:
            import gcsfs  # type: ignore[import-not-found]  # noqa: F401
            pytest.skip("gcsfs is installed: the missing-backend message is tested for s3 below")
        except ImportError:
            pass
    code, out, err = _cli("ls", url)
    assert code == 4, (code, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], err
    assert "Traceback" not in err


def test_missing_s3_backend_names_the_extra(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['s3fs'] = None\n"
            "from ilr_inspect.cli import main\n"
            "sys.argv = ['ilr-inspect', 'ls', 's3://bucket/run']\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "ILR_INSPECT_SLOW_EXIT": "1"})
    assert proc.returncode == 4, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install 'ilr-inspect[s3]'" in lines[0], proc.stderr


@pytest.mark.slow  # botocore's and s3fs's connection retries take 10-20 s on a busy machine
def test_unreachable_endpoint_is_one_line_error(s3: dict[str, Any]) -> None:
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1",
           "AWS_RETRY_MODE": "standard", "ILR_INSPECT_SLOW_EXIT": "1"}
    proc = subprocess.run([sys.executable, "-m", "ilr_inspect", "ls", "s3://bucket/run"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 4, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "s3://bucket/run" in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_prefix_bounds_remote_reads(s3: dict[str, Any]) -> None:
    """An index naming a shard outside the URL prefix given (``../``) is refused, as locally."""
    import json

    import boto3  # type: ignore[import-untyped]

    client = boto3.client("s3", endpoint_url=s3["endpoint"])
    folder = SERIES["runs/hf_sharded"] / "checkpoint-23"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../outside.safetensors"
    for f in folder.iterdir():
        client.upload_file(str(f), BUCKET, f"evil/ck/checkpoint-23/{f.name}")
    client.put_object(Bucket=BUCKET, Key="evil/ck/checkpoint-23/model.safetensors.index.json",
                      Body=json.dumps(index).encode())
    code, _out, err = _cli("ls", f"s3://{BUCKET}/evil/ck")
    assert code == 4, err
    assert "outside" in err and "Traceback" not in err


def test_local_runs_do_not_import_fsspec() -> None:
    code = ("import sys\n"
            "from ilr_inspect.cli import main\n"
            f"sys.argv = ['ilr-inspect', 'ls', {str(SERIES['runs/safetensors_meta'])!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('fsspec', 's3fs', 'gcsfs', 'botocore',"
            " 'aiobotocore'))\n"
            "print('IMPORTED', bad)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ILR_INSPECT_SLOW_EXIT": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED []" in proc.stdout, proc.stdout[-500:]
