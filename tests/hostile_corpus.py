"""Generator of the hostile/broken input corpus used by tests/test_hostile.py (docs/security.md).

Every case is built at test time in a temporary folder from the small reference fixtures (fixtures/reference/)
and a few hand-made payloads; nothing binary is committed. A case is the CLI arguments to run, the exit codes
that are acceptable, and the file name the one-line error must mention. Damage is deterministic (fixed offsets
and a seeded ``random.Random``), so every run sees the same corpus.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REF = Path(__file__).resolve().parent.parent / "fixtures" / "reference"

# Single-file formats: (case label, fixture file).
FILES = [
    ("torch-zip", "state_dict.pt"),
    ("torch-train", "training_checkpoint.pt"),
    ("torch-bin", "pytorch_model.bin"),
    ("lightning", "lightning.ckpt"),
    ("safetensors", "reference.safetensors"),
    ("torch-export", "model.pt2"),
    ("torchscript", "torchscript.pt"),
    ("keras", "keras_model.keras"),
    ("keras-h5", "keras_model.weights.h5"),
    ("flax", "flax_model.msgpack"),
    ("npz", "weights.npz"),
    ("onnx", "model.onnx"),
]
# Folder formats: (label, fixture folder, member damaged, copied as). A copy named run/checkpoint-10 is passed
# as run/, so the folder itself is the checkpoint (not its files a series).
FOLDERS = [
    ("hf-single", "hf_single", "model.safetensors", "hf_single"),
    ("hf-sharded-index", "hf_sharded", "model.safetensors.index.json", "run/checkpoint-10"),
    ("hf-sharded-shard", "hf_sharded", "model-00002-of-00002.safetensors", "run/checkpoint-10"),
    ("dcp-metadata", "dcp", ".metadata", "dcp"),
    ("dcp-data", "dcp", "__0_0.distcp", "dcp"),
    ("orbax-metadata", "orbax", "3000/default/_METADATA", "orbax"),
]

OK, INPUT, UNSAFE, USAGE = 0, 4, 5, 2


@dataclass
class Case:
    id: str
    build: Callable[[Path, Path], list[str]]  # (tmp folder, marker file) -> CLI args
    expect: frozenset[int]
    names: str | None = None  # the file the error line must name (basename), when the exit is not 0
    stderr_has: tuple[str, ...] = ()  # substrings stderr must contain (warnings for skipped files)
    tags: set[str] = field(default_factory=set)


# ---------------------------------------------------------------------------------------------- damage
def _copy(name: str, tmp: Path, as_name: str | None = None) -> Path:
    src = REF / name
    dst = tmp / "in" / (as_name or name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)
    return dst


def truncate(p: Path, keep: int) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: max(0, min(keep, len(data) - 1))])


def flip(p: Path, seed: int, n: int = 4, head: int = 4096) -> None:
    """Flip ``n`` bits at seeded offsets: most in the header region, one anywhere."""
    data = bytearray(p.read_bytes())
    rng = random.Random(seed)
    for i in range(n):
        hi = min(head, len(data)) if i < n - 1 else len(data)
        off = rng.randrange(0, hi)
        data[off] ^= 1 << rng.randrange(8)
    p.write_bytes(bytes(data))


def _damage_cases() -> list[Case]:
    cases: list[Case] = []
    damages: list[tuple[str, Callable[[Path], None]]] = [
        ("trunc-1", lambda p: truncate(p, 1)),
        ("trunc-12", lambda p: truncate(p, 12)),
        ("trunc-half", lambda p: truncate(p, p.stat().st_size // 2)),
        ("trunc-tail", lambda p: truncate(p, p.stat().st_size - 9)),
        ("flip-a", lambda p: flip(p, 1)),
        ("flip-b", lambda p: flip(p, 2)),
        ("flip-c", lambda p: flip(p, 3, n=8)),
    ]
    for label, fname in FILES:
        for dname, fn in damages:
            def build(tmp: Path, _m: Path, fname: str = fname, fn: Callable[[Path], None] = fn) -> list[str]:
                p = _copy(fname, tmp)
                fn(p)
                return ["norms", str(p)]
            cases.append(Case(f"{label}-{dname}", build, frozenset({OK, INPUT, UNSAFE}), names=fname,
                              tags={"damage"}))
    for label, folder, member, as_name in FOLDERS:
        for dname, fn in damages:
            def buildf(tmp: Path, _m: Path, folder: str = folder, member: str = member, as_name: str = as_name,
                       fn: Callable[[Path], None] = fn) -> list[str]:
                d = _copy(folder, tmp, as_name)
                fn(d / member)
                return ["norms", str(d.parent if "/" in as_name else d)]
            cases.append(Case(f"{label}-{dname}", buildf, frozenset({OK, INPUT, UNSAFE}),
                              names=as_name.rsplit("/", 1)[-1], tags={"damage"}))
    return cases


# ---------------------------------------------------------------------------------------------- payloads
class _Payload:
    """Pickles as ``os.system("touch MARKER")``: proof of code execution if the marker ever appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def payload_pickle(marker: Path, protocol: int = 2) -> bytes:
    return pickle.dumps({"weight": [1.0], "x": _Payload(marker)}, protocol=protocol)


def dotted_payload(marker: Path, module: str, name: str) -> bytes:
    """A protocol-4 pickle whose STACK_GLOBAL is ``module`` + dotted ``name`` (e.g. ``os.system``), called."""
    cmd = f"touch {marker}".encode()
    mod, nm = module.encode(), name.encode()
    return (b"\x80\x04" + b"\x8c" + bytes([len(mod)]) + mod + b"\x8c" + bytes([len(nm)]) + nm + b"\x93"
            + b"\x8c" + bytes([len(cmd)]) + cmd + b"\x85R.")


def _torch_zip_with_payload(tmp: Path, marker: Path, name: str) -> Path:
    import torch

    p = tmp / "in" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.ones(2, 2)}, "cfg": _Payload(marker)}, p)
    return p


def _payload_cases() -> list[Case]:
    cases: list[Case] = []

    def legacy(tmp: Path, marker: Path) -> list[str]:
        p = tmp / "in" / "legacy.pt"
        p.parent.mkdir(parents=True)
        p.write_bytes(payload_pickle(marker))
        return ["norms", str(p)]
    cases.append(Case("pickle-legacy-os-system", legacy, frozenset({UNSAFE, INPUT}), "legacy.pt"))

    def zipped(tmp: Path, marker: Path) -> list[str]:
        return ["norms", str(_torch_zip_with_payload(tmp, marker, "model.pt"))]
    cases.append(Case("pickle-torch-zip", zipped, frozenset({UNSAFE}), "model.pt"))

    def ckpt(tmp: Path, marker: Path) -> list[str]:
        return ["norms", str(_torch_zip_with_payload(tmp, marker, "epoch=0-step=10.ckpt"))]
    cases.append(Case("pickle-lightning-ckpt", ckpt, frozenset({UNSAFE}), "epoch=0-step=10.ckpt"))

    def hf_bin(tmp: Path, marker: Path) -> list[str]:
        d = tmp / "in" / "checkpoint-10"
        d.mkdir(parents=True)
        _torch_zip_with_payload(tmp, marker, "checkpoint-10/pytorch_model.bin")
        (d / "config.json").write_text("{}")
        return ["norms", str(d)]
    cases.append(Case("pickle-hf-bin", hf_bin, frozenset({UNSAFE}), "checkpoint-10"))

    def hf_optimizer(tmp: Path, marker: Path) -> list[str]:
        d = _copy("hf_single", tmp)
        (d / "optimizer.pt").write_bytes(payload_pickle(marker))
        (d / "training_args.bin").write_bytes(payload_pickle(marker))
        return ["norms", str(d)]
    cases.append(Case("pickle-hf-optimizer-and-args", hf_optimizer, frozenset({OK})))

    def dcp_dotted(tmp: Path, marker: Path) -> list[str]:
        d = _copy("dcp", tmp)
        (d / ".metadata").write_bytes(dotted_payload(marker, "torch.distributed.checkpoint.metadata", "os.system"))
        return ["norms", str(d)]
    cases.append(Case("pickle-dcp-dotted-os-system", dcp_dotted, frozenset({UNSAFE}), ".metadata"))

    def dcp_module(tmp: Path, marker: Path) -> list[str]:
        d = _copy("dcp", tmp)
        (d / ".metadata").write_bytes(dotted_payload(marker, "torch.distributed.checkpoint.metadata.os", "system"))
        return ["norms", str(d)]
    cases.append(Case("pickle-dcp-submodule-os-system", dcp_module, frozenset({UNSAFE}), ".metadata"))

    def pt2_sample_inputs(tmp: Path, marker: Path) -> list[str]:
        p = _copy("model.pt2", tmp)
        _replace_member(p, "model/data/sample_inputs/model.pt", _payload_zip_bytes(marker))
        return ["norms", str(p)]
    cases.append(Case("pickle-pt2-sample-inputs", pt2_sample_inputs, frozenset({OK})))

    def pt2_pickled_weight(tmp: Path, marker: Path) -> list[str]:
        p = _copy("model.pt2", tmp)
        cfg_name = "model/data/weights/model_weights_config.json"
        with zipfile.ZipFile(p) as zf:
            cfg = json.loads(zf.read(cfg_name))
        cfg["config"]["conv1.weight"]["use_pickle"] = True
        _replace_member(p, cfg_name, json.dumps(cfg).encode())
        _replace_member(p, "model/data/weights/weight_0", _payload_zip_bytes(marker))
        return ["norms", str(p)]
    cases.append(Case("pickle-pt2-weight", pt2_pickled_weight, frozenset({UNSAFE, INPUT}), "model.pt2"))

    def pt2_beside_series(tmp: Path, marker: Path) -> list[str]:
        d = tmp / "in" / "ckpts"
        d.mkdir(parents=True)
        shutil.copyfile(REF / "state_dict.pt", d / "step_000010.pt")
        shutil.copyfile(REF / "state_dict.pt", d / "step_000020.pt")
        shutil.copyfile(REF / "model.pt2", tmp / "in" / "model.pt2")
        _replace_member(tmp / "in" / "model.pt2", "model/data/sample_inputs/model.pt", _payload_zip_bytes(marker))
        shutil.copyfile(REF / "torchscript.pt", tmp / "in" / "model.ts")
        return ["norms", str(d)]
    cases.append(Case("model-pt2-beside-series", pt2_beside_series, frozenset({OK}),
                      stderr_has=("pass --model",)))

    def torchscript_global(tmp: Path, marker: Path) -> list[str]:
        p = _copy("torchscript.pt", tmp)
        _replace_member(p, "torchscript/data.pkl", payload_pickle(marker))
        return ["norms", str(p)]
    cases.append(Case("pickle-torchscript-data-pkl", torchscript_global, frozenset({UNSAFE, INPUT}),
                      "torchscript.pt"))

    def npz_object(tmp: Path, marker: Path) -> list[str]:
        p = tmp / "in" / "w.npz"
        p.parent.mkdir(parents=True)
        buf = io.BytesIO()
        header = b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
        header += b" " * (63 - len(header) % 64) + b"\n"
        buf.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + payload_pickle(marker))
        with zipfile.ZipFile(p, "w") as zf:
            zf.writestr("w.npy", buf.getvalue())
        return ["norms", str(p)]
    cases.append(Case("pickle-npz-object-array", npz_object, frozenset({INPUT}), "w.npz"))

    def sidecar_python_tag(tmp: Path, marker: Path) -> list[str]:
        d = _series(tmp)
        (d / "hparams.yaml").write_text(f"lr: 0.1\nx: !!python/object/apply:os.system ['touch {marker}']\n")
        return ["norms", str(d)]
    cases.append(Case("yaml-python-tag", sidecar_python_tag, frozenset({OK})))

    def model_exit(tmp: Path, marker: Path) -> list[str]:
        d = _series(tmp)
        (tmp / "in" / "model.py").write_text("import sys\n\ndef build():\n    sys.exit(3)\n")
        return ["norms", str(d), "--model", f"{tmp / 'in' / 'model.py'}:build"]
    cases.append(Case("model-build-sys-exit", model_exit, frozenset({INPUT}), "model.py"))

    def model_raises(tmp: Path, marker: Path) -> list[str]:
        d = _series(tmp)
        (tmp / "in" / "model.py").write_text("def build():\n    raise RuntimeError('boom')\n")
        return ["norms", str(d), "--model", f"{tmp / 'in' / 'model.py'}:build"]
    cases.append(Case("model-build-raises", model_raises, frozenset({INPUT}), "model.py"))
    return cases


def _payload_zip_bytes(marker: Path) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    return buf.getvalue()


def _replace_member(p: Path, member: str, data: bytes) -> None:
    with zipfile.ZipFile(p) as zf:
        items = [(i, zf.read(i)) for i in zf.infolist()]
    with zipfile.ZipFile(p, "w") as zf:
        for info, blob in items:
            zf.writestr(info, data if info.filename == member else blob)


def _series(tmp: Path, n: int = 2) -> Path:
    d = tmp / "in" / "ckpts"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shutil.copyfile(REF / "state_dict.pt", d / f"step_{(i + 1) * 10:06d}.pt")
    return d


# ---------------------------------------------------------------------------------------------- escapes
def _escape_cases() -> list[Case]:
    cases: list[Case] = []

    def hf_index(tmp: Path, _m: Path) -> list[str]:
        d = _copy("hf_sharded", tmp, "run/checkpoint-10")
        other = tmp / "elsewhere"
        other.mkdir()
        shutil.move(d / "model-00002-of-00002.safetensors", other / "model-00002-of-00002.safetensors")
        idx = json.loads((d / "model.safetensors.index.json").read_text())
        idx["weight_map"] = {k: ("../../elsewhere/" + v if "00002" in v else v) for k, v in idx["weight_map"].items()}
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))
        return ["norms", str(d.parent)]
    cases.append(Case("hf-index-traversal", hf_index, frozenset({INPUT}), "checkpoint-10"))

    def hf_index_symlink(tmp: Path, _m: Path) -> list[str]:
        d = _copy("hf_sharded", tmp, "run/checkpoint-10")
        other = tmp / "elsewhere"
        other.mkdir()
        shutil.move(d / "model-00002-of-00002.safetensors", other / "x.safetensors")
        (d / "model-00002-of-00002.safetensors").symlink_to(other / "x.safetensors")
        return ["norms", str(d.parent)]
    cases.append(Case("hf-index-symlink-out", hf_index_symlink, frozenset({INPUT}), "checkpoint-10"))

    def dcp_relative(tmp: Path, _m: Path) -> list[str]:
        d = _copy("dcp", tmp)
        other = tmp / "elsewhere"
        other.mkdir()
        shutil.move(d / "__0_0.distcp", other / "__0_0.distcp")
        with (d / ".metadata").open("rb") as fh:
            md = pickle.load(fh)  # our own fixture file, read to write the hostile variant
        for info in md.storage_data.values():
            info.relative_path = "../../elsewhere/__0_0.distcp"
        (d / ".metadata").write_bytes(pickle.dumps(md))
        (d / "__0_0.distcp").write_bytes(b"")  # keeps the folder recognisable as DCP
        return ["norms", str(d)]
    cases.append(Case("dcp-relative-path-traversal", dcp_relative, frozenset({INPUT}), "dcp"))

    def h5_external_link(tmp: Path, _m: Path) -> list[str]:
        import h5py

        p = _copy("keras_model.weights.h5", tmp)
        other = tmp / "elsewhere.h5"
        with h5py.File(other, "w") as f:
            f["secret"] = [1.0, 2.0]
        with h5py.File(p, "a") as f:
            f["vars_link"] = h5py.ExternalLink(str(other), "/secret")
        return ["norms", str(p)]
    cases.append(Case("h5-external-link", h5_external_link, frozenset({INPUT}), "keras_model.weights.h5"))

    def h5_external_storage(tmp: Path, _m: Path) -> list[str]:
        import h5py

        p = _copy("keras_model.weights.h5", tmp)
        other = tmp / "elsewhere.bin"
        other.write_bytes(b"\x00" * 64)
        with h5py.File(p, "a") as f:
            f.create_dataset("layers/ext/vars/0", shape=(16,), dtype="f4", external=[(str(other), 0, 64)])
        return ["norms", str(p)]
    cases.append(Case("h5-external-storage", h5_external_storage, frozenset({INPUT}), "keras_model.weights.h5"))
    return cases


# ---------------------------------------------------------------------------------------------- bombs, odd files
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True))


def _bomb_cases() -> list[Case]:
    cases: list[Case] = []

    def yaml_bomb(tmp: Path, _m: Path) -> list[str]:
        d = _series(tmp)
        (d / "hparams.yaml").write_text(ALIAS_BOMB)
        return ["norms", str(d)]
    cases.append(Case("yaml-alias-bomb", yaml_bomb, frozenset({OK}), stderr_has=("hparams.yaml",)))

    def yaml_deep(tmp: Path, _m: Path) -> list[str]:
        d = _series(tmp)
        (d / "hparams.yaml").write_text("a: " + "[" * 20000 + "]" * 20000 + "\n")
        return ["norms", str(d)]
    cases.append(Case("yaml-deep", yaml_deep, frozenset({OK}), stderr_has=("hparams.yaml",)))

    def yaml_not_utf8(tmp: Path, _m: Path) -> list[str]:
        d = _series(tmp)
        (d / "hparams.yaml").write_bytes(b"lr: \xff\xfe0.1\n")
        return ["norms", str(d)]
    cases.append(Case("yaml-not-utf8", yaml_not_utf8, frozenset({OK}), stderr_has=("hparams.yaml",)))

    def json_deep(tmp: Path, _m: Path) -> list[str]:
        d = _series(tmp)
        (d / "trainer_state.json").write_text('{"log_history": ' + "[" * 100000 + "]" * 100000 + "}")
        return ["norms", str(d)]
    cases.append(Case("json-deep-trainer-state", json_deep, frozenset({OK}), stderr_has=("trainer_state.json",)))

    def json_types(tmp: Path, _m: Path) -> list[str]:
        d = _series(tmp)
        (d / "trainer_state.json").write_text(json.dumps({"log_history": [
            {"step": "10", "learning_rate": "x"}, {"step": 10 ** 30, "learning_rate": 1}, 5, None,
            {"step": 10, "learning_rate": 10 ** 400}], "global_step": [1]}))
        return ["norms", str(d)]
    cases.append(Case("json-odd-types-trainer-state", json_types, frozenset({OK})))

    def hf_index_deep(tmp: Path, _m: Path) -> list[str]:
        d = _copy("hf_sharded", tmp, "run/checkpoint-10")
        (d / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 50000 + "]" * 50000 + "}")
        return ["norms", str(d.parent)]
    cases.append(Case("hf-index-deep-json", hf_index_deep, frozenset({INPUT}), "model.safetensors.index.json"))

    def msgpack_deep(tmp: Path, _m: Path) -> list[str]:
        p = tmp / "in" / "flax_model.msgpack"
        p.parent.mkdir(parents=True)
        p.write_bytes(b"\x81\xa1a" * 5000 + b"\xc0")  # {"a": {"a": … nil}} 5000 levels
        return ["norms", str(p)]
    cases.append(Case("msgpack-deep", msgpack_deep, frozenset({INPUT}), "flax_model.msgpack"))

    def flax_leaf(shape: list[int], dtype: str, nbytes: int) -> Callable[[Path, Path], list[str]]:
        def build(tmp: Path, _m: Path) -> list[str]:
            import msgpack

            leaf = msgpack.ExtType(1, msgpack.packb((shape, dtype, b"\x00" * nbytes), use_bin_type=True))
            ok = msgpack.ExtType(1, msgpack.packb(([2], "float32", b"\x00" * 8), use_bin_type=True))
            p = tmp / "in" / "flax_model.msgpack"
            p.parent.mkdir(parents=True)
            p.write_bytes(msgpack.packb({"params": {"w": leaf, "b": ok}}, use_bin_type=True))
            return ["norms", str(p)]
        return build
    for label, shape, dtype, nbytes in [("negative-shape", [-2, -2], "float32", 16),
                                        ("overflow-shape", [2 ** 40, 2 ** 40], "float32", 16),
                                        ("unknown-dtype", [2, 2], "qq9", 16), ("short-data", [3], "float32", 8)]:
        cases.append(Case(f"msgpack-{label}", flax_leaf(shape, dtype, nbytes), frozenset({INPUT}),
                          "flax_model.msgpack"))

    def zip_bomb(tmp: Path, _m: Path) -> list[str]:
        p = tmp / "in" / "w.npz"
        p.parent.mkdir(parents=True)
        header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1073741824,), }"
        header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
        npy_head = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header
        with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as zf, \
                zf.open("w.npy", "w", force_zip64=True) as fh:
            fh.write(npy_head)
            chunk = b"\x00" * (1 << 20)
            for _ in range(64):  # 64 MiB of zeros: ~64 KiB compressed
                fh.write(chunk)
        return ["norms", str(p)]
    cases.append(Case("npz-zip-bomb-short-data", zip_bomb, frozenset({INPUT}), "w.npz"))

    def npz_negative(tmp: Path, _m: Path) -> list[str]:
        p = tmp / "in" / "w.npz"
        p.parent.mkdir(parents=True)
        header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (-4, 2), }"
        header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
        with zipfile.ZipFile(p, "w") as zf:
            zf.writestr("w.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\x00" * 32)
        return ["norms", str(p)]
    cases.append(Case("npz-negative-shape", npz_negative, frozenset({INPUT}), "w.npz"))

    def npz_compound(tmp: Path, _m: Path) -> list[str]:
        import numpy as np

        p = tmp / "in" / "w.npz"
        p.parent.mkdir(parents=True)
        arrays = {"fc.weight": np.ones((3, 2), np.float32), "pairs": np.zeros(3, dtype=[("a", "<f4"), ("b", "<i4")])}
        np.savez(p, **arrays)  # type: ignore[arg-type]
        return ["norms", str(p)]
    cases.append(Case("npz-compound-dtype-named", npz_compound, frozenset({OK}), stderr_has=("pairs",)))

    def st_header(tmp: Path, _m: Path, header: dict[str, object], data: bytes = b"") -> Path:
        p = tmp / "in" / "model.safetensors"
        p.parent.mkdir(parents=True)
        raw = json.dumps(header).encode()
        p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        return p

    def st_negative(tmp: Path, m: Path) -> list[str]:
        return ["norms", str(st_header(tmp, m, {"w": {"dtype": "F32", "shape": [-2, 2], "data_offsets": [0, 16]}},
                                       b"\x00" * 16))]
    cases.append(Case("safetensors-negative-shape", st_negative, frozenset({INPUT}), "model.safetensors"))

    def st_dtype(tmp: Path, m: Path) -> list[str]:
        return ["norms", str(st_header(tmp, m, {"w": {"dtype": "Q9", "shape": [2, 2], "data_offsets": [0, 16]}},
                                       b"\x00" * 16))]
    cases.append(Case("safetensors-unknown-dtype", st_dtype, frozenset({INPUT}), "model.safetensors"))

    def st_overflow(tmp: Path, m: Path) -> list[str]:
        return ["norms", str(st_header(tmp, m, {"w": {"dtype": "F32", "shape": [2 ** 62, 2 ** 62],
                                                      "data_offsets": [0, 16]}}, b"\x00" * 16))]
    cases.append(Case("safetensors-overflow-shape", st_overflow, frozenset({INPUT}), "model.safetensors"))

    def st_huge_header(tmp: Path, _m: Path) -> list[str]:
        p = tmp / "in" / "model.safetensors"
        p.parent.mkdir(parents=True)
        p.write_bytes(struct.pack("<Q", 2 ** 62) + b"{}")
        return ["norms", str(p)]
    cases.append(Case("safetensors-huge-header-length", st_huge_header, frozenset({INPUT}), "model.safetensors"))

    def st_not_utf8(tmp: Path, _m: Path) -> list[str]:
        p = tmp / "in" / "model.safetensors"
        p.parent.mkdir(parents=True)
        raw = b'{"w\xff": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
        p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00" * 4)
        return ["norms", str(p)]
    cases.append(Case("safetensors-header-not-utf8", st_not_utf8, frozenset({INPUT}), "model.safetensors"))

    def fifo_in_series(tmp: Path, _m: Path) -> list[str]:
        d = _series(tmp)
        os.mkfifo(d / "step_000030.pt")
        os.mkfifo(d / "events.out.tfevents.123.host")
        return ["norms", str(d)]
    cases.append(Case("fifo-in-series", fifo_in_series, frozenset({OK}), stderr_has=("step_000030.pt",)))

    def fifo_direct(tmp: Path, _m: Path) -> list[str]:
        p = tmp / "in" / "model.pt"
        p.parent.mkdir(parents=True)
        os.mkfifo(p)
        return ["norms", str(p)]
    cases.append(Case("fifo-named-directly", fifo_direct, frozenset({INPUT}), "model.pt"))

    def fifo_in_dcp(tmp: Path, _m: Path) -> list[str]:
        d = _copy("dcp", tmp)
        (d / "__0_0.distcp").unlink()
        os.mkfifo(d / "__0_0.distcp")
        return ["norms", str(d)]
    cases.append(Case("fifo-dcp-data-file", fifo_in_dcp, frozenset({INPUT}), "dcp"))

    def fifo_in_hf(tmp: Path, _m: Path) -> list[str]:
        d = _copy("hf_sharded", tmp, "run/checkpoint-10")
        (d / "model-00002-of-00002.safetensors").unlink()
        os.mkfifo(d / "model-00002-of-00002.safetensors")
        return ["norms", str(d.parent)]
    cases.append(Case("fifo-hf-shard", fifo_in_hf, frozenset({INPUT}), "checkpoint-10"))

    def symlink_loop(tmp: Path, _m: Path) -> list[str]:
        d = _series(tmp)
        (d / "step_000030.pt").symlink_to(d / "step_000040.pt")
        (d / "step_000040.pt").symlink_to(d / "step_000030.pt")
        return ["norms", str(d)]
    cases.append(Case("symlink-loop-in-series", symlink_loop, frozenset({OK}), stderr_has=("step_000030.pt",)))

    def symlink_loop_direct(tmp: Path, _m: Path) -> list[str]:
        p = tmp / "in" / "loop.pt"
        p.parent.mkdir(parents=True)
        p.symlink_to(p)
        return ["norms", str(p)]
    cases.append(Case("symlink-loop-named", symlink_loop_direct, frozenset({INPUT}), "loop.pt"))

    def out_is_dir(tmp: Path, _m: Path) -> list[str]:
        d = _series(tmp)
        (tmp / "outdir").mkdir()
        return ["norms", str(d), "-f", "json", "-o", str(tmp / "outdir")]
    cases.append(Case("output-is-a-folder", out_is_dir, frozenset({USAGE, INPUT}), "outdir"))

    def out_unwritable(tmp: Path, _m: Path) -> list[str]:
        d = _series(tmp)
        (tmp / "afile").write_text("x")
        return ["norms", str(d), "-f", "json", "-o", str(tmp / "afile" / "out.json")]
    cases.append(Case("output-parent-is-a-file", out_unwritable, frozenset({USAGE, INPUT}), "out.json"))

    def not_utf8_name(tmp: Path, _m: Path) -> list[str]:
        d = tmp / "in"
        d.mkdir()
        p = Path(os.fsdecode(bytes(d) + b"/bad\xff.pt"))
        p.write_bytes(b"not a checkpoint at all")
        return ["norms", str(p)]
    cases.append(Case("file-name-not-utf8", not_utf8_name, frozenset({INPUT}), "bad"))
    return cases


def all_cases() -> list[Case]:
    return _damage_cases() + _payload_cases() + _escape_cases() + _bomb_cases()
