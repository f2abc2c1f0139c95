"""`--ray` on checkpoints in object storage: Ray workers open the ``s3://`` URLs themselves (they are sent paths,
never tensors) from a real S3 API server (moto's, in server mode, on 127.0.0.1 in this process), and the tables are
the same JSON as the local run on the same URL.

- ``--ray local``: the workers inherit the CLI's environment (endpoint, credentials); stderr of a ``-q`` run is
  empty — Ray's own start-up notices (the token-auth line) do not reach it.
- ``--ray ADDRESS`` of a cluster started *without* any storage settings in its environment: the endpoint and
  credentials reach the workers only as the job's runtime_env env_vars (ilr_inspect.scaleout.cluster), so this
  run fails if they are not forwarded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

pytest.importorskip("ray")
pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from test_ray import _same, ray_head
from test_remote import BUCKET, moto_server, upload

from ilr_inspect.cli import app
from ilr_inspect.scaleout.cluster import FORWARD_ENV, FORWARD_PREFIX

pytestmark = pytest.mark.slow  # each run starts or joins a Ray cluster (10-20 s on a busy 2-core machine)

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "fixtures" / "digits" / "ckpts"  # torch.save .pt files: fetched whole (small), lazy zip reader
SHARDED = ROOT / "fixtures" / "torch_other" / "hf_sharded"  # safetensors shards + index: ranged reads


def _no_storage_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in FORWARD_ENV and not k.startswith(FORWARD_PREFIX) and k not in ("RAY_ADDRESS",)}


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    with moto_server() as (env, _counter):
        upload(env, DIGITS, "digits")
        upload(env, SHARDED, "sharded")
        yield env


@pytest.fixture(scope="module")
def bare_cluster(s3: dict[str, str]) -> Iterator[str]:
    """A 2-CPU Ray cluster whose processes have no storage settings (no endpoint, no credentials)."""
    with ray_head(_no_storage_env()) as (address, _pid):
        yield address


def _env(s3: dict[str, str]) -> dict[str, str]:
    # Tiny task bytes: several tasks, so more than one worker opens the URLs.
    env = {**os.environ, **s3, "ILR_INSPECT_KERNEL": "off", "ILR_INSPECT_RAY_TASK_BYTES": "1"}
    env.pop("ILR_INSPECT_RAY_ADDRESS", None)
    return env


def _ray_cli(args: list[str], address: str, env: dict[str, str]) -> tuple[dict[str, Any], str]:
    r = subprocess.run([sys.executable, "-m", "ilr_inspect", *args, "-f", "json", "-q", "--ray", address],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out: dict[str, Any] = json.loads(r.stdout)
    return out, r.stderr


def _local_cli(args: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("ILR_INSPECT_KERNEL", "off")
    monkeypatch.setenv("ILR_INSPECT_RAY_TASK_BYTES", "1")
    monkeypatch.delenv("ILR_INSPECT_RAY_ADDRESS", raising=False)
    r = CliRunner().invoke(app, [*args, "-f", "json", "-q"])
    assert r.exit_code == 0, r.output
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def test_norms_ray_local_on_s3_same_json_and_quiet(s3: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["norms", f"s3://{BUCKET}/digits"]
    ray, err = _ray_cli(args, "local", _env(s3))
    _same(_local_cli(args, monkeypatch), ray)
    assert ray["meta"]["settings"] and len(ray["rows"]) > 10
    assert err == "", err  # -q: nothing of ours, and none of Ray's start-up notices


def test_angles_on_a_cluster_without_storage_settings(s3: dict[str, str], bare_cluster: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["angles", f"s3://{BUCKET}/sharded", "--per-tensor"]
    ray, err = _ray_cli(args, bare_cluster, _env(s3))
    _same(_local_cli(args, monkeypatch), ray)
    assert err == "", err
