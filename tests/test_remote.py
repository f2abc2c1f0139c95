"""Checkpoint series in object storage (docs/scale-out.md): a real S3 API server (moto's, in server mode) on
127.0.0.1, real fixture series uploaded to it, and the CLI pointed at ``s3://`` URLs must give the same tables as
the local run on the same files, while ``ls`` fetches headers only (counted by the client and at the server)."""

from __future__ import annotations

import collections
import io
import json
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    "runs/hf_bin": FIX / "reference" / "hf_bin",  # save_pretrained(safe_serialization=False): pytorch_model.bin
    "runs/accelerate": FIX / "layouts" / "accelerate",  # save_state(): optimizer.bin / scheduler.bin beside weights
    "runs/lightning": FIX / "lightning",  # ModelCheckpoint's lightning_logs/version_0/checkpoints/epoch=…-step=….ckpt
}


class _Counter:
    """WSGI middleware: bytes of object data the server sent (GET on bucket/key, listings excluded), in all and
    per object (``per_key["/bucket/key"]``)."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self.object_bytes = 0
        self.per_key: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        key = environ.get("PATH_INFO", "")
        is_object = environ["REQUEST_METHOD"] == "GET" and key.strip("/").count("/") >= 1
        for chunk in self.app(environ, start_response):
            if is_object:
                with self.lock:
                    self.object_bytes += len(chunk)
                    self.per_key[key] += len(chunk)
            yield chunk


@contextmanager
def moto_server() -> Iterator[tuple[dict[str, str], _Counter]]:
    """A real S3 API server (moto's, in server mode) on 127.0.0.1 with an empty bucket ``BUCKET``; yields the
    environment that points a client at it (set in os.environ meanwhile) and the traffic counter."""
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
    try:
        import boto3  # type: ignore[import-untyped]

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield env, counter
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


def upload(env: dict[str, str], folder: Path, prefix: str) -> None:
    """Every file under ``folder`` (truth.json excepted) to ``s3://BUCKET/prefix/`` with the same layout."""
    import boto3  # type: ignore[import-untyped]

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != "truth.json":
            client.upload_file(str(f), BUCKET, f"{prefix}/{f.relative_to(folder).as_posix()}")
    storage._LISTINGS.clear()  # this process's listings (and s3fs's) predate the upload
    for fs in storage._FS.values():
        fs.invalidate_cache()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from safetensors.numpy import save_file

    with moto_server() as (env, counter):
        for prefix, folder in SERIES.items():
            upload(env, folder, prefix)
        # Bigger files for the "ls reads headers only" check: 3 checkpoints of ~8 MiB (two float32 tensors each).
        big = tmp_path_factory.mktemp("big")
        rng = np.random.default_rng(0)
        for step in (100, 200, 300):
            save_file({"layer.weight": rng.standard_normal((1024, 1024)).astype(np.float32),
                       "layer.bias": rng.standard_normal(1024).astype(np.float32),
                       "norm.weight": rng.standard_normal((1024, 1024)).astype(np.float32)},
                      str(big / f"step_{step:06d}.safetensors"), metadata={"step": str(step), "lr": "0.1"})
        upload(env, big, "big")
        yield {"endpoint": env["AWS_ENDPOINT_URL"], "counter": counter, "big": big, "env": env}


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
    ("runs/hf_bin", ("norms",)),  # pickled weights, read lazily by ranged reads (no temporary copy)
    ("runs/accelerate", ("norms",)),  # the step angle from optimizer.bin, read lazily
    ("runs/lightning", ("norms", "angles")),  # .ckpt zips: weights, optimizer state and hparams by ranged reads
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


# A real transformers Trainer run (its own save path: checkpoint-N/ with model.safetensors, optimizer.pt,
# scheduler.pt, trainer_state.json), big enough that reading optimizer.pt whole would show: 1.8 MB per checkpoint.
# The live optimizer's param groups at each save are the truth for the hyperparameters.
_TRAINER = r"""
import json, sys
import torch
from transformers import (BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments,
                          set_seed)

root = sys.argv[1]
set_seed(0)
cfg = BertConfig(vocab_size=64, hidden_size=128, num_hidden_layers=1, num_attention_heads=2, intermediate_size=512,
                 max_position_embeddings=8, type_vocab_size=1, num_labels=2)
model = BertForSequenceClassification(cfg)
g = torch.Generator().manual_seed(0)
ids = torch.randint(1, 64, (32, 8), generator=g)
labels = ((ids < 32).sum(1) > 4).long()


class Toks(torch.utils.data.Dataset):
    def __len__(self):
        return len(ids)

    def __getitem__(self, i):
        return {"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": labels[i]}


truth = {}


class Truth(TrainerCallback):
    def on_save(self, args, state, control, **kw):
        truth[f"checkpoint-{state.global_step}"] = sorted(
            {(g["lr"], g["weight_decay"]) for g in kw["optimizer"].param_groups})


args = TrainingArguments(output_dir=root, max_steps=4, save_steps=2, per_device_train_batch_size=16,
                         learning_rate=1e-3, weight_decay=0.01, warmup_steps=1, lr_scheduler_type="linear",
                         logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                         dataloader_num_workers=0)
Trainer(model=model, args=args, train_dataset=Toks(), callbacks=[Truth()]).train()
json.dump(truth, open(root + "/truth.json", "w"))
"""


@pytest.fixture(scope="module")
def trainer(s3: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trainer") / "out"
    proc = subprocess.run([sys.executable, "-c", _TRAINER, str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    upload(s3["env"], out, "trainer")
    return out


def _must_read(optimizer_pt: Path, slack: int = 128) -> int:
    """What ``hparams`` has to fetch of a torch.save zip: its first bytes (the file type), the end records as
    zipfile probes them (22, 42, 98 bytes: end record, + Zip64 locator, + Zip64 end record), the zip directory
    with the end records, data.pkl and byteorder, and the storages of ≤ 64 bytes (fetched together right after
    data.pkl: the Adam ``step`` counters give the update count), each member with its local header; ``slack``
    bytes more per member, as the reader asks for (torch pads the header's extra field to align the data)."""
    with zipfile.ZipFile(optimizer_pt) as zf:
        members = [i for i in zf.infolist() if i.filename.endswith(("/data.pkl", "/byteorder"))
                   or (i.filename.split("/")[-2] == "data" and i.file_size <= 64)]
        tail = optimizer_pt.stat().st_size - zf.start_dir  # type: ignore[attr-defined]
    return 64 + (22 + 42 + 98) + tail + sum(30 + len(i.filename) + slack + i.file_size for i in members)


@pytest.mark.slow  # a real Trainer run first (~10 s on a busy 2-core machine)
def test_trainer_optimizer_state_read_by_range(s3: dict[str, Any], trainer: Path) -> None:
    """hparams on a Trainer output_dir in S3 reads optimizer.pt through the lazy zip reader: the same table as
    locally (and the live optimizer's lr / weight decay), fetching under 2 % of each optimizer.pt — its zip
    directory, data.pkl and the step counters (about 0.9 % here), never the Adam moments."""
    counter = s3["counter"]
    with counter.lock:
        counter.per_key.clear()
    table = _same("hparams", trainer, f"s3://{BUCKET}/trainer")
    truth = json.loads((trainer / "truth.json").read_text())
    assert sorted(truth) == ["checkpoint-2", "checkpoint-4"]
    for ck, groups in truth.items():
        rows = table[table["checkpoint"] == f"<root>/{ck}"]
        got = sorted({(float(r.lr), float(r.weight_decay)) for r in rows.itertuples()})
        np.testing.assert_allclose(np.array(got), np.array(sorted(tuple(g) for g in groups)), rtol=1e-12)
        opt = trainer / ck / "optimizer.pt"
        fetched = counter.per_key[f"/{BUCKET}/trainer/{ck}/optimizer.pt"]
        must = _must_read(opt)
        size = opt.stat().st_size
        assert 0 < fetched <= must, (ck, fetched, must)
        assert fetched < 0.02 * size, (ck, fetched, size)
        sched = trainer / ck / "scheduler.pt"  # small: fetched whole, once
        assert counter.per_key[f"/{BUCKET}/trainer/{ck}/scheduler.pt"] == sched.stat().st_size
    assert not any("temporary copy" in str(w) for w in table.columns)


def test_step_angles_from_remote_optimizer_state(s3: dict[str, Any]) -> None:
    """The last-step angle from the SGD momentum buffers saved beside the weights (torch.save training
    checkpoints): read lazily from S3, the same exact values as locally."""
    upload(s3["env"], FIX / "step_angle" / "equilibrium", "step_angle")
    table = _same("norms", FIX / "step_angle" / "equilibrium", f"s3://{BUCKET}/step_angle")
    assert (table["step_angle_source"] == "exact").all()
    assert table["step_angle"].notna().all() and (table["step_angle"] > 0).all()


@pytest.mark.parametrize("pad", [0, 2 << 20], ids=["small-fetched-whole", "big-read-by-range"])
def test_hostile_remote_optimizer_state_runs_nothing(s3: dict[str, Any], tmp_path: Path, pad: int) -> None:
    """A Trainer folder in S3 whose optimizer.pt pickles ``os.system``: refused by the lazy reader's allowlist
    without --trust-pickle (nothing runs, the marker never appears), exactly as locally — whether the file is
    fetched whole (≤ 1 MiB) or read by ranges."""
    import shutil

    import torch
    from hostile_corpus import _Payload

    marker = tmp_path / "PWNED"
    folder = tmp_path / "run" / "checkpoint-10"
    shutil.copytree(SERIES["runs/hf_trainer_final"] / "checkpoint-10", folder)
    torch.save({"state": {0: {"exp_avg": torch.zeros(pad // 4)}}, "param_groups": [{"lr": 0.1, "params": [0]}],
                "x": _Payload(marker)}, folder / "optimizer.pt")
    assert (folder / "optimizer.pt").stat().st_size > pad
    upload(s3["env"], tmp_path / "run", f"evil/payload-{pad}")
    for cmd in ("hparams", "norms"):
        code_l, out_l, err_l = _cli(cmd, str(tmp_path / "run"), "-f", "csv")
        code_r, out_r, err_r = _cli(cmd, f"s3://{BUCKET}/evil/payload-{pad}", "-f", "csv")
        assert not marker.exists()
        assert (code_r, len(out_r.splitlines())) == (code_l, len(out_l.splitlines())), err_r
        for err in (err_l, err_r):  # the weights stay measurable; the refusal is named, with the way out
            assert "pickle would import code to load: posix.system" in err and "--trust-pickle" in err, err


def test_storage_settings_forwarded_to_ray_only_for_urls(s3: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """What a job joining a Ray cluster sends its workers (tests/test_ray_remote.py runs it end to end): the
    endpoint and credentials once this process reads URLs; nothing for a run on local files."""
    from ilr_inspect.scaleout.cluster import forwarded_env

    monkeypatch.setenv("FSSPEC_S3_ANON", "false")
    monkeypatch.setenv("HOME_OF_SOMETHING_ELSE", "x")
    monkeypatch.setattr(storage, "_FS", {})
    assert forwarded_env() == {}
    storage.to_path(f"s3://{BUCKET}/runs")
    got = forwarded_env()
    assert {k: got.get(k) for k in s3["env"]} == s3["env"]
    assert got["FSSPEC_S3_ANON"] == "false" and "HOME_OF_SOMETHING_ELSE" not in got
