"""The torch-free lazy reader of torch.save zip archives (ilr_inspect/formats/_torchzip.py).

Every tensor is checked bit-for-bit against ``torch.load(weights_only=True)`` of the same file; hostile pickles are
refused without running anything; a damaged file is one typed error; listing reads only the zip directory and
data.pkl.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ilr_inspect import storage
from ilr_inspect.errors import CorruptCheckpointError, UnsafePickleError
from ilr_inspect.formats import OpenOptions, _torchutil, _torchzip, lightning, torch_pickle
from ilr_inspect.formats._torchzip import LazyTensor

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _open_remote(data: bytes, name: str, options: OpenOptions) -> Any:
    """``torch_pickle.open`` on an fsspec ``memory://`` URL holding ``data``: the path remote files take (small ones
    fetched whole, bigger zips by exact ranged reads)."""
    import fsspec

    from ilr_inspect.storage import to_path

    folder = f"tz-remote-{uuid.uuid4().hex}"  # a fresh folder: listings of a remote folder are cached per process
    fsspec.filesystem("memory").pipe(f"/{folder}/{name}", data)
    return torch_pickle.open(to_path(f"memory://{folder}/{name}"), options)


def ref_numpy(t: torch.Tensor) -> np.ndarray:
    """What the torch path hands on: bfloat16 widened to float32, everything else as stored."""
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def assert_same(ref: Any, got: Any, where: str = "") -> int:
    """Walk torch.load's tree and the lazy tree together; tensors equal bit-for-bit. Returns tensors compared."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(got, LazyTensor), where
        assert _torchutil.dtype_name(ref.dtype) == got.dtype, where
        assert tuple(ref.shape) == got.shape and tuple(ref.stride()) == got.stride(), where
        assert ref.storage_offset() == got.storage_offset(), where
        a, b = ref_numpy(ref), got.numpy()
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), where
        assert isinstance(got, LazyTensor) and got.is_parameter == isinstance(ref, nn.Parameter), where
        return 1
    if isinstance(ref, Mapping):
        assert isinstance(got, Mapping) and list(ref) == list(got), where
        return sum(assert_same(v, got[k], f"{where}/{k}") for k, v in ref.items())
    if isinstance(ref, (list, tuple)):
        assert (tuple if isinstance(ref, torch.Size) else type(ref)) is type(got) and len(ref) == len(got), where
        return sum(assert_same(a, b, f"{where}[{i}]") for i, (a, b) in enumerate(zip(ref, got, strict=True)))
    if isinstance(ref, torch.dtype):
        assert isinstance(got, _torchzip.TorchDType) and got.name == _torchutil.dtype_name(ref), where
        return 0
    if isinstance(ref, torch.device):
        assert isinstance(got, _torchzip.TorchDevice) and str(got) == str(ref), where
        return 0
    assert type(ref) is type(got) and ref == got, where
    return 0


def odd_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    base = torch.randn(6, 5)
    return {
        "plain": torch.randn(3, 4),
        "transposed": base.t(),  # non-contiguous strides
        "view": base[1:4, 2:5],  # offset into a shared storage
        "base": base,
        "col": base[:, 3],
        "bf16": torch.randn(4, 7).bfloat16(),
        "bf16_t": torch.randn(4, 7).bfloat16().t(),
        "f16": torch.randn(9).half(),
        "f64": torch.randn(2, 2, dtype=torch.float64),
        "i64": torch.arange(-5, 6),
        "i32": torch.arange(4, dtype=torch.int32),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(3, dtype=torch.complex64),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(7),
        "param": nn.Parameter(torch.randn(2, 3)),
        "expanded": torch.randn(3, 1).expand(3, 4),  # stride 0
    }


def training_checkpoint() -> dict[str, Any]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        loss = model(torch.randn(16, 4)).pow(2).mean()
        opt.zero_grad()
        sgd.zero_grad()
        loss.backward()
        opt.step()
        sgd.step()
        sched.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "sgd": sgd.state_dict(),
            "lr_scheduler": sched.state_dict(), "epoch": 3, "step": torch.tensor(30), "best": 0.25,
            "blob": b"\x00\xffbytes", "names": {"a", "b"}, "dtype": torch.bfloat16, "device": torch.device("cpu"),
            "size": torch.Size([2, 3]), "pair": (1, 2.5), "nothing": None}


def lazy(path: Path) -> Any:
    return _torchzip.load_path(path)


def test_state_dict_bit_for_bit(tmp_path: Path) -> None:
    p = tmp_path / "sd.pt"
    sd = odd_tensors()
    torch.save(sd, p)
    ref = torch.load(p, weights_only=True)
    got = lazy(p)
    assert assert_same(ref, got) == len(sd)
    # Views of one storage share one storage record, as torch's tensors share one storage.
    assert got["view"].storage is got["base"].storage is got["transposed"].storage
    assert got["param"].is_parameter and not got["plain"].is_parameter
    assert got["scalar"].item() == 7 and isinstance(got["scalar"].item(), int)
    # A contiguous float32 tensor is a view of the map, not a copy; writable like torch's (copy-on-write: the file
    # never changes).
    view = got["plain"].numpy()
    assert not view.flags.owndata and view.flags.writeable
    before = p.read_bytes()
    view[0, 0] = 1234.5
    assert p.read_bytes() == before


def test_training_checkpoint_tree(tmp_path: Path) -> None:
    p = tmp_path / "ckpt.pth"
    torch.save(training_checkpoint(), p)
    ref = torch.load(p, weights_only=True)
    got = lazy(p)
    n = assert_same(ref, got)
    assert n == 9 + 1 + 6 * 3 + 6  # state dict (6 params + 3 BN buffers), step, AdamW m/v/step, SGD buffers
    assert got["optimizer"]["state"][0]["step"].item() == 3.0


def test_readers_match_torch_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole Checkpoint (selection, step, hparams, optimizer state) is the same through both paths."""
    p = tmp_path / "ckpt.pth"
    torch.save(training_checkpoint(), p)
    fast = torch_pickle.open(p, OpenOptions())
    monkeypatch.setenv("ILR_INSPECT_TORCHZIP", "0")
    slow = torch_pickle.open(p, OpenOptions())
    assert fast.step == slow.step == 30 and fast.metadata == slow.metadata
    assert fast.hparams == slow.hparams and fast.hparams["0.weight"].weight_decay == 0.1
    assert list(fast.tensors.values()) == list(slow.tensors.values())
    for name in fast.tensors:
        assert fast.read(name).tobytes() == slow.read(name).tobytes()
    assert fast.optimizer_state is not None and slow.optimizer_state is not None
    fo, so = fast.optimizer_state(), slow.optimizer_state()
    assert fo.params.keys() == so.params.keys()
    for name, ps in fo.params.items():
        assert ps.rule == so.params[name].rule == "adam" and ps.step == so.params[name].step == 3.0
        for k, arr in ps.arrays.items():
            assert arr.dtype == so.params[name].arrays[k].dtype
            assert arr.tobytes() == so.params[name].arrays[k].tobytes()


@pytest.mark.parametrize("ckpt", sorted((FIXTURES / "lightning").rglob("*.ckpt"))[:2], ids=lambda p: p.name)
def test_lightning_fixture(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = _torchutil.load(ckpt, trust=False)
    got = lazy(ckpt)
    assert assert_same(ref, got) > 0
    fast = lightning.open(ckpt, OpenOptions())
    monkeypatch.setenv("ILR_INSPECT_TORCHZIP", "0")
    slow = lightning.open(ckpt, OpenOptions())
    assert fast.step == slow.step and fast.metadata == slow.metadata and fast.hparams == slow.hparams
    for name in fast.tensors:
        assert fast.read(name).tobytes() == slow.read(name).tobytes()


def _rezip(src: Path, dst: Path, *, compress: int = zipfile.ZIP_STORED, big_endian: bool = False) -> None:
    """Copy a torch archive member by member; optionally deflate it, or rewrite it as a big-endian machine would."""
    ref_sd = torch.load(src, weights_only=True) if big_endian else {}
    # storage byte length → item size (the test's tensors have distinct byte lengths)
    sizes = {t.untyped_storage().nbytes(): t.element_size() for t in ref_sd.values()}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=compress) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            prefix = info.filename.split("/", 1)[0]
            if big_endian and info.filename == f"{prefix}/byteorder":
                data = b"big"
            elif big_endian and "/data/" in info.filename:
                item = sizes[len(data)]
                data = np.frombuffer(data, dtype=f"<u{item}").astype(f">u{item}").tobytes() if item > 1 else data
            zout.writestr(info.filename, data)


def test_big_endian_and_deflated_archives(tmp_path: Path) -> None:
    torch.manual_seed(2)
    sd = {"f32": torch.randn(5, 3), "i64": torch.arange(7) * 1000003, "f16": torch.randn(11).half(),
          "bf16": torch.randn(13).bfloat16()}  # distinct byte sizes identify each storage
    src = tmp_path / "little.pt"
    torch.save(sd, src)
    ref = torch.load(src, weights_only=True)
    big = tmp_path / "big.pt"
    _rezip(src, big, big_endian=True)
    assert zipfile.ZipFile(big).read("little/byteorder") == b"big"
    assert assert_same(ref, lazy(big)) == 4
    deflated = tmp_path / "deflated.pt"
    _rezip(src, deflated, compress=zipfile.ZIP_DEFLATED)
    assert assert_same(ref, lazy(deflated)) == 4


class Payload:
    def __init__(self, fn: Any, arg: str) -> None:
        self.fn, self.arg = fn, arg

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return self.fn, (self.arg,)


@pytest.mark.parametrize(("fn", "named"), [(os.system, "posix.system"), (eval, "builtins.eval")])
def test_payload_refused_without_running(tmp_path: Path, fn: Any, named: str) -> None:
    marker = tmp_path / "pwned"
    code = f"touch {marker}" if fn is os.system else f"open({str(marker)!r}, 'w')"
    p = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "x": Payload(fn, code)}, p)
    with pytest.raises(UnsafePickleError) as err:
        lazy(p)
    assert named in err.value.globals_needed and named in err.value.render()
    assert "pickle would import code to load" in err.value.render()
    with pytest.raises(UnsafePickleError):  # the reader's own entry point refuses the same way
        torch_pickle.open(p, OpenOptions())
    with pytest.raises(_torchzip.NotLazy):  # trusted: handed to torch.load, never run by this reader
        _torchzip.load_path(p, trust=True)
    with pytest.raises(UnsafePickleError):  # a remote file too
        _open_remote(p.read_bytes(), p.name, OpenOptions())
    assert not marker.exists()


def test_legacy_payload_through_a_file_object(tmp_path: Path) -> None:
    """A legacy (non-zip) remote pickle never reaches the lazy reader: the stream goes to torch.load, which must
    refuse it without --trust-pickle (naming the global) and run it only with trust."""
    marker = tmp_path / "pwned"
    p = tmp_path / "evil_legacy.pt"
    torch.save({"w": torch.ones(2), "x": Payload(os.system, f"touch {marker}")}, p,
               _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafePickleError) as err:
        _open_remote(p.read_bytes(), p.name, OpenOptions())
    assert "posix.system" in err.value.globals_needed
    assert not marker.exists()
    _open_remote(p.read_bytes(), p.name, OpenOptions(trust_pickle=True))
    assert marker.exists()  # the explicit flag is the only way the payload runs


def test_damaged_files_are_one_typed_error(tmp_path: Path) -> None:
    p = tmp_path / "model.pt"
    torch.save(training_checkpoint(), p)
    data = p.read_bytes()
    cases = {"half": data[: len(data) // 2], "tail_cut": data[:-30], "no_directory": data[: len(data) - 200]}
    # data.pkl with its bytes overwritten (the central directory still intact)
    with zipfile.ZipFile(p) as zf:
        info = zf.getinfo(f"{zf.namelist()[0].split('/')[0]}/data.pkl")
    start = info.header_offset + 30 + len(info.filename.encode()) + 64
    cases["garbled_pickle"] = data[:start] + bytes(range(256)) * 2 + data[start + 512:]
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.pt"
        bad.write_bytes(blob)
        with pytest.raises(CorruptCheckpointError) as err:
            _torchutil.load_lazy(bad, trust=False)
        text = err.value.render()
        assert "\n" not in text and str(bad) in text and err.value.hint, (name, text)


def test_tensor_past_its_storage_is_corrupt(tmp_path: Path) -> None:
    src = tmp_path / "ok.pt"
    torch.save({"w": torch.randn(64)}, src)
    dst = tmp_path / "short.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            blob = zin.read(info)
            zout.writestr(info.filename, blob[:16] if "/data/" in info.filename else blob)
    with pytest.raises(CorruptCheckpointError, match="storage"):
        lazy(dst)


def test_listing_reads_only_directory_and_pickle(tmp_path: Path) -> None:
    p = tmp_path / "big.pt"
    torch.manual_seed(3)
    torch.save({"model": {f"layer{i}.weight": torch.randn(256, 256) for i in range(16)}, "step": 5}, p)
    data = p.read_bytes()
    with zipfile.ZipFile(p) as zf:
        pkl = next(i for i in zf.infolist() if i.filename.endswith("/data.pkl")).file_size
        cd = len(zf.infolist()) * 120  # a central-directory entry: 46 bytes + name + zip64 extra
    storage.reset_counter()
    ck = _open_remote(data, p.name, OpenOptions())  # 4 MiB: above WHOLE_BELOW, so read by ranges
    assert ck.step == 5 and len(ck.tensors) == 16
    listed = storage.bytes_fetched()
    # the zip directory through one read-ahead block, then data.pkl (and byteorder) by exact ranges
    assert listed < pkl + cd + _torchutil.ZIP_BLOCK + 4096, (listed, pkl, len(data))
    assert listed < len(data) / 100
    got = ck.read("layer3.weight")
    assert storage.bytes_fetched() - listed < 256 * 256 * 4 + 200  # one tensor: its bytes and its local header
    assert got.tobytes() == torch.load(p, weights_only=True)["model"]["layer3.weight"].numpy().tobytes()


def test_torch_zip_series_never_imports_torch(tmp_path: Path) -> None:
    """ls / norms / angles on a torch zip series run without importing torch (measured by -X importtime)."""
    folder = tmp_path / "run"
    folder.mkdir()
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for step in (10, 20):
        for _ in range(10):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step},
                   folder / f"step_{step}.pt")
    env = {**os.environ, "ILR_INSPECT_TORCHZIP": "1"}
    for cmd in ("ls", "norms", "angles"):
        run = subprocess.run([sys.executable, "-X", "importtime", "-m", "ilr_inspect", cmd, str(folder)],
                             capture_output=True, text=True, env=env, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if "import time:" in line}
        assert "ilr_inspect.formats._torchzip" in imported, cmd
        assert "torch" not in imported, cmd


def test_remote_series_matches_local(tmp_path: Path) -> None:
    """A torch zip series and a Lightning series behind a URL (fsspec's memory filesystem) give the same tables
    as the local files, read by ranged reads (no staged copy)."""
    import fsspec
    import pandas as pd
    from typer.testing import CliRunner

    from ilr_inspect.cli import app

    fs = fsspec.filesystem("memory")
    series = {"run": FIXTURES / "step_angle" / "equilibrium",
              "pl": FIXTURES / "lightning" / "lightning_logs" / "version_0" / "checkpoints"}
    local = {}
    try:
        for name, src in series.items():
            local[name] = tmp_path / name
            local[name].mkdir()
            for f in sorted(src.iterdir())[:3]:
                fs.pipe(f"/tz-test/{name}/{f.name}", f.read_bytes())
                (local[name] / f.name).write_bytes(f.read_bytes())
        runner = CliRunner()
        for name, cmd in (("run", "ls"), ("run", "hparams"), ("run", "norms"), ("run", "angles"), ("pl", "norms")):
            url = f"memory://tz-test/{name}"
            a = runner.invoke(app, [cmd, str(local[name]), "-f", "csv"])
            b = runner.invoke(app, [cmd, url, "-f", "csv"])
            assert a.exit_code == 0 and b.exit_code == 0, (a.stderr, b.stderr)
            assert "temporary copy" not in b.stderr
            ta = pd.read_csv(io.StringIO(a.stdout.replace(str(local[name]), "<root>")))
            tb = pd.read_csv(io.StringIO(b.stdout.replace(f"memory:///tz-test/{name}", "<root>")))
            pd.testing.assert_frame_equal(ta, tb, check_exact=True)
    finally:
        fs.rm("/tz-test", recursive=True)
