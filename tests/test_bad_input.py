"""Bad input to the PyTorch-family readers: a typed error naming the file and a hint, never a traceback."""

from __future__ import annotations

import json
import pathlib
import struct
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ilr_inspect.errors import CorruptCheckpointError, IlrError, InputError, UnknownFormatError, UnsafePickleError
from ilr_inspect.formats import OpenOptions, dcp, hf_folder, lightning, open_checkpoint, safetensors_file, torch_pickle

ALL = (hf_folder, dcp, lightning, torch_pickle, safetensors_file)


def small_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).state_dict()


def assert_clear(err: IlrError, path: Path, *words: str) -> None:
    assert err.path == path, err.render()
    assert str(path) in err.render()
    assert err.hint, "every error must say what to do"
    for w in words:
        assert w in err.message, err.message


def test_truncated_torch_file(tmp_path: Path) -> None:
    p = tmp_path / "model.pt"
    torch.save({"model": small_sd(), "step": 3}, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError) as ei:
        torch_pickle.open(p, OpenOptions())
    assert_clear(ei.value, p, "cannot read")


def test_zero_byte_files(tmp_path: Path) -> None:
    for name, mod in (("a.pt", torch_pickle), ("b.ckpt", lightning), ("c.safetensors", safetensors_file)):
        p = tmp_path / name
        p.write_bytes(b"")
        assert mod.sniff(p)
        with pytest.raises(CorruptCheckpointError) as ei:
            mod.open(p, OpenOptions())
        assert_clear(ei.value, p)


def _short_data() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + b"\x00" * 8  # 8 data bytes where 16 are promised


@pytest.mark.parametrize(
    "payload",
    [
        struct.pack("<Q", 20) + b'{"not json at all',  # broken JSON header
        struct.pack("<Q", 10_000) + b"{}",  # header length past the end of the file
        _short_data(),
    ],
)
def test_corrupt_safetensors(tmp_path: Path, payload: bytes) -> None:
    p = tmp_path / "model.safetensors"
    p.write_bytes(payload)
    with pytest.raises(CorruptCheckpointError) as ei:
        safetensors_file.open(p, OpenOptions())  # safe_open validates the header against the file size
    assert_clear(ei.value, p)


def test_text_file_named_model_pt(tmp_path: Path) -> None:
    p = tmp_path / "model.pt"
    p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    assert torch_pickle.sniff(p)  # reaches the reader instead of 'unknown format'
    with pytest.raises(CorruptCheckpointError) as ei:
        torch_pickle.open(p, OpenOptions())
    assert_clear(ei.value, p, "not a PyTorch checkpoint: the file is text")
    assert "git lfs pull" in (ei.value.hint or "")


def test_random_bytes_named_ckpt(tmp_path: Path) -> None:
    p = tmp_path / "last.ckpt"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CorruptCheckpointError) as ei:
        lightning.open(p, OpenOptions())
    assert_clear(ei.value, p, "neither a zip archive nor a pickle")


@pytest.fixture
def unimportable_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkpoint pickling an instance of a class whose module is gone afterwards."""
    mod_dir = tmp_path / "gone"
    mod_dir.mkdir()
    (mod_dir / "ilr_gone_mod.py").write_text(textwrap.dedent("""
        class TrainConfig:
            def __init__(self):
                self.lr = 0.1
    """))
    monkeypatch.syspath_prepend(str(mod_dir))
    import ilr_gone_mod  # type: ignore[import-not-found]

    p = tmp_path / "ckpt.pth"
    torch.save({"model": small_sd(), "config": ilr_gone_mod.TrainConfig()}, p)
    monkeypatch.delitem(sys.modules, "ilr_gone_mod")
    monkeypatch.setattr(sys, "path", [x for x in sys.path if x != str(mod_dir)])
    (mod_dir / "ilr_gone_mod.py").unlink()
    return p


def test_pickle_needing_missing_class(unimportable_pickle: Path) -> None:
    p = unimportable_pickle
    with pytest.raises(UnsafePickleError) as ei:
        torch_pickle.open(p, OpenOptions())
    assert ei.value.globals_needed == ["ilr_gone_mod.TrainConfig"]
    assert_clear(ei.value, p, "ilr_gone_mod.TrainConfig")
    assert "--trust-pickle" in (ei.value.hint or "")
    with pytest.raises(InputError) as ei2:
        torch_pickle.open(p, OpenOptions(trust_pickle=True))
    assert not isinstance(ei2.value, UnsafePickleError)
    assert_clear(ei2.value, p, "cannot be imported", "ilr_gone_mod")


def test_legacy_pickle_unsafe_globals_are_listed(tmp_path: Path) -> None:
    import argparse
    import decimal

    p = tmp_path / "old.pth"
    # argparse.Namespace is allowlisted as data-only (docs/security.md); decimal.Decimal is not.
    torch.save({"state_dict": small_sd(), "args": argparse.Namespace(lr=1.0), "best": decimal.Decimal("0.5")}, p,
               _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafePickleError) as ei:
        torch_pickle.open(p, OpenOptions())
    assert ei.value.globals_needed == ["decimal.Decimal"]
    assert torch_pickle.open(p, OpenOptions(trust_pickle=True)).metadata["args"] == {"lr": 1.0}


def test_unreadable_file_permission_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root, where chmod 000 does not stop reads: make Path.open raise PermissionError instead.
    p = tmp_path / "model.pt"
    torch.save(small_sd(), p)
    real_open = pathlib.Path.open

    def deny(self: Path, *a: Any, **k: Any) -> Any:
        if self == p:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "open", deny)
    with pytest.raises(InputError) as ei:
        torch_pickle.open(p, OpenOptions())
    assert_clear(ei.value, p, "Permission denied")
    assert "permission" in (ei.value.hint or "")


def test_folder_named_like_a_file(tmp_path: Path) -> None:
    p = tmp_path / "x.pt"
    p.mkdir()
    assert not hf_folder.sniff(p) and not dcp.sniff(p)
    with pytest.raises(InputError) as ei:
        torch_pickle.open(p, OpenOptions())
    assert_clear(ei.value, p, "is a folder")


def test_folder_without_checkpoints(tmp_path: Path) -> None:
    d = tmp_path / "run"
    d.mkdir()
    (d / "notes.txt").write_text("nothing here")
    (d / "config.json").write_text("{}")
    assert not any(m.sniff(d) for m in ALL)
    with pytest.raises(UnknownFormatError) as e0:  # through the whole registry, as the CLI does
        open_checkpoint(d)
    assert_clear(e0.value, d)
    with pytest.raises(InputError) as ei:
        hf_folder.open(d, OpenOptions())
    assert_clear(ei.value, d, "no model weights")
    with pytest.raises(CorruptCheckpointError) as ei2:
        dcp.open(d, OpenOptions())
    assert_clear(ei2.value, d, ".metadata")


def test_hf_folder_missing_shard_and_unsafe_optimizer(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in small_sd().items()}
    d = tmp_path / "checkpoint-5"
    d.mkdir()
    save_file(sd, d / "model-00001-of-00002.safetensors")
    wm = {k: "model-00001-of-00002.safetensors" for k in sd} | {"extra.weight": "model-00002-of-00002.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    with pytest.raises(CorruptCheckpointError) as ei:
        hf_folder.open(d, OpenOptions())
    assert_clear(ei.value, d, "model-00002-of-00002.safetensors")

    # A pickled optimizer that would import code: weights stay readable, the reason is recorded.
    import decimal

    (d / "model.safetensors.index.json").unlink()
    torch.save({"param_groups": [], "state": {}, "cfg": decimal.Decimal("0.5")}, d / "optimizer.pt")
    ck = hf_folder.open(d, OpenOptions())
    assert ck.hparams == {} and "decimal.Decimal" in ck.metadata["hparams_error"]
    assert set(ck.tensors) == set(sd)


def test_optimizer_that_cannot_be_mapped_is_reported_not_fatal(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    other = nn.Linear(3, 3)  # optimizer of a different model
    opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    other(torch.randn(2, 3)).sum().backward()
    opt.step()
    p = tmp_path / "mixed.pt"
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict()}, p)
    ck = torch_pickle.open(p, OpenOptions())
    assert ck.hparams == {} and ck.hparams_source is None
    assert "cannot tell which parameters" in ck.metadata["hparams_error"] and "--lr" in ck.metadata["hparams_error"]


def _save_dcp(state: dict[str, Any], d: Path) -> None:
    import warnings

    import torch.distributed.checkpoint as tdcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        tdcp.save(state, checkpoint_id=str(d))


def test_dcp_pickled_objects_need_trust(tmp_path: Path) -> None:
    import argparse
    import pickle

    sd = small_sd()
    d = tmp_path / "dcp_cfg"
    import decimal

    # argparse.Namespace is allowlisted as data-only (docs/security.md); decimal.Decimal is not.
    _save_dcp({"model": sd, "cfg": decimal.Decimal("0.5"), "args": argparse.Namespace(lr=0.5), "step": 3}, d)
    with pytest.raises(UnsafePickleError) as ei:
        dcp.open(d, OpenOptions())  # torch itself would torch.load(weights_only=False) the 'cfg' bytes
    assert ei.value.path == d and ei.value.globals_needed == ["decimal.Decimal"]
    assert dcp.open(d, OpenOptions(trust_pickle=True)).step == 3

    # A .metadata file (plain pickle in torch) carrying a foreign global is refused before anything runs.
    e = tmp_path / "dcp_meta"
    _save_dcp({"model": sd}, e)
    with (e / ".metadata").open("rb") as fh:
        md = pickle.load(fh)  # our own file, written a line above
    md.planner_data = argparse.Namespace(x=1)
    with (e / ".metadata").open("wb") as fh:
        pickle.dump(md, fh)
    with pytest.raises(UnsafePickleError) as ei2:
        dcp.open(e, OpenOptions())
    assert ei2.value.globals_needed == ["argparse.Namespace"] and ei2.value.path == e / ".metadata"
    ck = dcp.open(e, OpenOptions(trust_pickle=True))
    assert set(ck.tensors) == {"model." + k for k in sd} or set(ck.tensors) == set(sd)
