"""Hostile and broken inputs (docs/security.md): no code runs, nothing outside the input is read, nothing hangs,
every problem is one line naming the file with exit 4 (5 for a refused pickle), never an internal error.

The corpus is generated at test time by tests/hostile_corpus.py; each case runs the real CLI in-process under a
wall-clock alarm, and a pickled payload would ``touch`` a marker file that must never appear.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hostile_corpus import ALIAS_BOMB, OK, UNSAFE, Case, all_cases
from typer.testing import CliRunner

from ilr_inspect import safety
from ilr_inspect.cli.app import app
from ilr_inspect.errors import InputError, ProbeError, UnsafePickleError

CASES = all_cases()
CASE_TIMEOUT_S = 30  # generous: the suite shares 2 cores with other work; a hang is minutes, not seconds


class _Hang(BaseException):
    """Raised by the alarm; a BaseException so the CLI's error boundary cannot turn it into an exit code."""


@pytest.fixture
def alarm() -> Iterator[None]:
    def fire(*_: object) -> None:
        raise _Hang()

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(CASE_TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_case(case: Case, tmp_path: Path, alarm: None) -> None:
    marker = tmp_path / "MARKER"
    args = case.build(tmp_path, marker)
    try:
        code, err = _run(args)
    except _Hang:
        pytest.fail(f"{case.id}: no result within {CASE_TIMEOUT_S} s (hang)")
    assert not marker.exists(), f"{case.id}: the payload ran (marker file created)"
    assert code != 1 and "internal error" not in err and "Traceback" not in err, err
    assert code in case.expect, f"{case.id}: exit {code}, stderr: {err}"
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    if code != OK:
        assert len(errors) == 1, err
        assert case.names is not None and case.names in errors[0], errors[0]
        assert "(hint: " in errors[0], errors[0]
        if code == UNSAFE:  # the refusal names what the pickle would import
            assert re.search(r"import code to load: \S", errors[0]), errors[0]
    else:
        assert not errors, err
    for text in case.stderr_has:
        assert text in err, f"{case.id}: {text!r} not in stderr: {err}"


def test_corpus_size() -> None:
    kinds = Counter(next(iter(c.tags), "special") for c in CASES)
    assert len(CASES) >= 150 and kinds["damage"] >= 100, kinds


# ------------------------------------------------------------------------------------------- allowlists
def _globals_under_test() -> list[tuple[str, str]]:
    from ilr_inspect.formats import _torchutil, dcp

    return sorted(set(_torchutil.DATA_GLOBALS) | set(dcp.SAFE_GLOBALS))


# Names that would run code or touch the system if an unpickler called them.
_DANGEROUS = ("os.", "subprocess", "system(", "popen", "exec(", "eval(", "__import__", "import_module", "open(",
              "compile(", "getattr(", "setattr(", "globals(", "spawn", "socket", "unlink", "rmtree", "write")


# Reviewed uses of a flagged token (docs/security.md): Namespace.__init__ does ``setattr(self, key, value)`` for
# keyword arguments only — a plain attribute store on itself; unpicklers pass no keyword arguments to __init__.
_REVIEWED = {("argparse", "Namespace", "__init__"): "setattr("}


def _assert_generated_dataclass_code(cls: type, attr: str, fn: object) -> None:
    import dataclasses

    import torch

    assert dataclasses.is_dataclass(cls) and attr in ("__init__", "__setattr__"), f"{cls}.{attr} has no source"
    assert fn.__code__.co_filename.startswith("<string>"), fn  # type: ignore[attr-defined]
    for f in dataclasses.fields(cls):
        # A default_factory is called by the generated __init__: only empty builtin containers are acceptable.
        # (torch.get_default_dtype: a pure getter TensorProperties uses for its dtype field.)
        assert f.default_factory in (dataclasses.MISSING, list, dict, set, tuple, torch.get_default_dtype), (  # type: ignore[comparison-overlap]
            cls, f.name)


def _own_code(cls: type, attr: str) -> object | None:
    """The function ``attr`` resolves to on ``cls`` when written in Python (builtins' slots are C data code)."""
    for klass in cls.__mro__:
        if attr in vars(klass):
            fn = vars(klass)[attr]
            return fn if inspect.isfunction(fn) else None
    return None


@pytest.mark.parametrize(("module", "name"), _globals_under_test())
def test_allowlisted_global_is_data_only(module: str, name: str) -> None:
    """Every allowlisted global is a class (or a pure lookup function) whose construction paths an unpickler
    uses — ``__new__``, ``__init__``, ``__setstate__``, ``__post_init__`` and ``__setattr__`` — contain no code that
    imports, opens, executes or writes; and an exact (module, name) resolves to that object itself."""
    obj = getattr(importlib.import_module(module), name)
    assert "." not in name
    if inspect.isfunction(obj):
        src = inspect.getsource(obj)
        assert (module, name) == ("torch.serialization", "_get_layout"), f"unexpected function {module}.{name}"
        assert not any(d in src for d in _DANGEROUS), src
        return
    assert isinstance(obj, type), f"{module}.{name} is neither a class nor an audited function"
    for attr in ("__new__", "__init__", "__setstate__", "__post_init__", "__setattr__", "__init_subclass__"):
        fn = _own_code(obj, attr)
        if fn is None:
            continue
        try:
            src = inspect.getsource(fn)  # type: ignore[arg-type]
        except OSError:  # code generated by @dataclass: field stores (and __post_init__, audited above)
            _assert_generated_dataclass_code(obj, attr, fn)
            continue
        bad = [d for d in _DANGEROUS if d in src]
        # pathlib's constructors parse strings only; os.fspath/os.path.* calls are pure string functions.
        bad = [d for d in bad if not (module == "pathlib" and d == "os.")]
        bad = [d for d in bad if _REVIEWED.get((module, name, attr)) != d]
        assert not bad, f"{module}.{name}.{attr} contains {bad}"


def test_allowlisted_classes_take_hostile_state_without_calling_it(tmp_path: Path) -> None:
    """BUILD with a state holding a callable stores it as data: nothing is called."""
    called: list[int] = []

    def trap(*_: object) -> None:
        called.append(1)

    from ilr_inspect.formats import _torchutil

    checked = 0
    for cls in _torchutil.data_globals():
        if cls.__module__ == "pathlib":  # no BUILD state: paths are rebuilt from strings by REDUCE
            continue
        inst = cls.__new__(cls)
        setstate = getattr(inst, "__setstate__", None)
        state = {"x": trap, "__class__": trap}
        if setstate is not None:
            setstate(state)
        else:
            inst.__dict__.update(state)
        assert type(inst) is cls
        checked += 1
    assert checked and not called


@pytest.mark.parametrize(("module", "name"), [
    ("torch.distributed.checkpoint.metadata", "os.system"),
    ("torch.distributed.checkpoint.metadata.os", "system"),
    ("torch.distributed.checkpoint.metadata", "pickle.loads"),
    ("torch", "Size.__reduce_ex__"),
    ("pathlib", "os.system"),
    ("torch", "load"),
    ("builtins", "eval"),
])
def test_dcp_unpickler_refuses_dotted_and_foreign_names(tmp_path: Path, module: str, name: str) -> None:
    from hostile_corpus import dotted_payload

    from ilr_inspect.formats import dcp

    marker = tmp_path / "MARKER"
    d = tmp_path / "ck"
    d.mkdir()
    (d / ".metadata").write_bytes(dotted_payload(marker, module, name))
    (d / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(UnsafePickleError) as ei:
        dcp._read_metadata(d, trust=False)
    assert ei.value.globals_needed == [f"{module}.{name}"]
    assert not marker.exists()


def test_namespace_args_load_without_trust(tmp_path: Path) -> None:
    """timm's CheckpointSaver stores `args` as an argparse.Namespace; it loads with the default (no trust)."""
    import argparse

    import torch

    from ilr_inspect.formats import OpenOptions, torch_pickle

    p = tmp_path / "checkpoint-3.pth.tar"
    torch.save({"state_dict": {"fc.weight": torch.ones(2, 2)}, "epoch": 3,
                "args": argparse.Namespace(lr=0.25, weight_decay=1e-4, opt="sgd")}, p)
    ck = torch_pickle.open(p, OpenOptions())
    np.testing.assert_array_equal(ck.source.read("fc.weight"), np.ones((2, 2), np.float32))


# ------------------------------------------------------------------------------------------- parsing limits
def test_yaml_alias_bomb_is_rejected_fast() -> None:
    assert len(ALIAS_BOMB) < 1500
    t = time.perf_counter()
    with pytest.raises(InputError, match="alias bomb"):
        safety.load_yaml(ALIAS_BOMB.encode())
    assert time.perf_counter() - t < 2.0
    # A legitimate document with shared anchors still loads, as plain data.
    doc = safety.load_yaml(b"base: &b {lr: 0.1, wd: 0.0005}\ntrain: *b\nopt: !!python/name:torch.optim.SGD ''\n")
    assert doc == {"base": {"lr": 0.1, "wd": 0.0005}, "train": {"lr": 0.1, "wd": 0.0005}, "opt": ""}


@pytest.mark.parametrize("text", [b"&a [*a]", b"a: " + b"[" * 3000 + b"]" * 3000, b"\xff\xfe"])
def test_yaml_recursive_deep_or_binary(text: bytes) -> None:
    with pytest.raises(InputError):
        safety.load_yaml(text)


def test_json_limits() -> None:
    with pytest.raises(InputError, match="nest"):
        safety.load_json(b"[" * 100000 + b"]" * 100000)
    with pytest.raises(InputError, match="too large"):
        safety.load_json(b"[1]", max_bytes=2)
    assert safety.load_json(b'{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}


def test_ensure_inside(tmp_path: Path) -> None:
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "a.bin").write_bytes(b"")
    assert safety.ensure_inside(tmp_path / "ck" / "a.bin", tmp_path / "ck") == (tmp_path / "ck" / "a.bin").resolve()
    with pytest.raises(InputError, match="outside"):
        safety.ensure_inside(tmp_path / "ck" / ".." / "x", tmp_path / "ck")
    (tmp_path / "ck" / "link").symlink_to(tmp_path)
    with pytest.raises(InputError, match="outside"):
        safety.ensure_inside(tmp_path / "ck" / "link" / "x", tmp_path / "ck")
    (tmp_path / "ck" / "loop").symlink_to(tmp_path / "ck" / "loop")
    with pytest.raises(InputError):
        safety.ensure_inside(tmp_path / "ck" / "loop", tmp_path / "ck")


def test_shape_checks() -> None:
    assert safety.check_shape([2, 3], name="w") == (2, 3)
    with pytest.raises(InputError, match="negative"):
        safety.check_shape([2, -3], name="w")
    with pytest.raises(InputError, match="impossible"):
        safety.check_shape([2 ** 40, 2 ** 40], name="w")


def _png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 8)) + chunk(
        b"IEND", b"")


def test_image_probe_pixel_bomb(tmp_path: Path, alarm: None) -> None:
    pytest.importorskip("PIL")
    from ilr_inspect.probe import load_probe

    d = tmp_path / "probe"
    d.mkdir()
    (d / "bomb.png").write_bytes(_png(200_000, 200_000))
    with pytest.raises(ProbeError, match="pixels") as ei:
        load_probe(d)
    assert "bomb.png" in str(ei.value)


# ------------------------------------------------------------------------------------------- logs
def test_truncated_tensorboard_attributes_only_records_read(tmp_path: Path) -> None:
    pytest.importorskip("tbparse")
    from torch.utils.tensorboard import SummaryWriter

    from ilr_inspect.logs import read_logs
    from ilr_inspect.logs.tensorboard import scan_records

    w = SummaryWriter(str(tmp_path / "run"))
    lrs = {s: 0.1 / (1 + s) for s in range(0, 100, 10)}
    for s, v in lrs.items():
        w.add_scalar("lr", v, s)
    w.close()
    ev = next((tmp_path / "run").glob("events.out.tfevents.*"))
    records, good, problem = scan_records(ev)
    assert problem is None and good == ev.stat().st_size and records == len(lrs) + 1  # + file_version record
    data = ev.read_bytes()
    # Cut inside the 7th scalar record: records 0..5 (file_version + steps 0..40) stay whole.
    ends = []
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        pos += 16 + n
        ends.append(pos)
    ev.write_bytes(data[: ends[5] + 7])
    logs = read_logs([ev])
    rows = logs.scalars[logs.scalars["tag"] == "lr"]
    assert rows["step"].tolist() == [0, 10, 20, 30, 40]
    np.testing.assert_allclose(rows["value"].to_numpy(), [np.float32(lrs[s]) for s in (0, 10, 20, 30, 40)])
    assert any(ev.name in w and "truncated" in w and "step 40" in w for w in logs.warnings), logs.warnings
    # A flipped bit inside record 3's payload: the CRC catches it; only records before it count.
    damaged = bytearray(data)
    damaged[ends[2] + 14] ^= 0x10
    ev.write_bytes(bytes(damaged))
    logs = read_logs([ev])
    rows = logs.scalars[logs.scalars["tag"] == "lr"]
    assert rows["step"].tolist() == [0, 10]
    assert any("damaged record" in w for w in logs.warnings), logs.warnings


# ------------------------------------------------------------------------------------------- determinism
def test_messages_do_not_depend_on_hash_seed(tmp_path: Path) -> None:
    """The same hostile input gives identical stderr in a process with another PYTHONHASHSEED."""
    from hostile_corpus import payload_pickle

    d = tmp_path / "ck"
    d.mkdir()
    (d / "a.pt").write_bytes(payload_pickle(tmp_path / "MARKER"))
    (d / "hparams.yaml").write_text(ALIAS_BOMB)
    here = _run(["ls", str(d)])
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    env = {**os.environ, "PYTHONHASHSEED": seed, "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "ilr_inspect", "ls", str(d)], capture_output=True, text=True,
                       env=env, timeout=300, check=False)
    assert (r.returncode, r.stderr) == here and here[0] == UNSAFE, (r.returncode, r.stderr, here)
    assert "posix.system" in here[1] or "os.system" in here[1]
    assert not (tmp_path / "MARKER").exists()


# ------------------------------------------------------------------------------------------- code-free readers
def test_code_free_readers_match_the_frameworks_loaders(tmp_path: Path) -> None:
    """torch.export / TorchScript weights read without unpickling or compiling equal what torch's own loaders
    return (names, parameter/buffer split, values)."""
    import warnings

    import torch

    from ilr_inspect.formats import OpenOptions, torch_export, torchscript

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                              torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))).eval()
    x = torch.randn(1, 1, 4, 4)
    ts = tmp_path / "net.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(net), str(ts))  # type: ignore[no-untyped-call]
        ref = torch.jit.load(str(ts))  # type: ignore[no-untyped-call]
    ck = torchscript.open(ts, OpenOptions())
    params = {n for n, _ in ref.named_parameters()}
    assert [i.name for i in ck.source.infos()] == list(ref.state_dict())
    for info in ck.source.infos():
        np.testing.assert_array_equal(ck.source.read(info.name), ref.state_dict()[info.name].numpy())
        assert (info.kind == "parameter") == (info.name in params)
    pt2 = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (x,)), pt2)
    ep = torch.export.load(str(pt2))
    ck2 = torch_export.open(pt2, OpenOptions())
    sig = ep.graph_signature
    assert [i.name for i in ck2.source.infos()] == list(sig.parameters) + list(sig.buffers)
    for info in ck2.source.infos():
        np.testing.assert_array_equal(ck2.source.read(info.name), ep.state_dict[info.name].detach().numpy())
