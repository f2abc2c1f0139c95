"""``torch.export.save`` archives (``.pt2``): weights plus an ATen graph (docs/formats.md).

Reading the weights never unpickles anything: raw tensor bytes and JSON configs only (docs/security.md).

``metadata["graph"] = "torch.export"`` and ``metadata["loader"]`` tell graph-based unit detection how to get the
program back (:func:`load_exported`). AOTInductor packages are also ``.pt2`` but carry no graph; they are refused.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, TensorKind
from ..errors import CorruptCheckpointError, InputError
from . import OpenOptions

NAME = "torch.export"
EXTRA = None


def _members(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return []


def sniff(path: Path) -> bool:
    return path.suffix.lower() == ".pt2" and path.is_file()


def load_exported(path: str | Path) -> Any:
    """The ``torch.export.ExportedProgram`` stored in ``path``. ``torch.export.load`` unpickles the archive's
    sample inputs, so this runs only on a file the user named with ``--model``/``--graph`` (docs/security.md)."""
    import torch

    p = Path(path)
    names = _members(p)
    if not names:
        raise CorruptCheckpointError("not a torch.export archive (not a readable zip file)",
                                     hint="re-save it with torch.export.save", path=p)
    if not any(n.endswith("models/model.json") or n.endswith("serialized_exported_program.json") for n in names):
        raise InputError("this .pt2 holds no exported program (an AOTInductor package has no graph or names)",
                         hint="save with torch.export.save(ep, path) to keep the graph", path=p)
    try:
        return torch.export.load(str(p))
    except Exception as exc:  # serde errors from a damaged or version-mismatched archive
        raise CorruptCheckpointError(f"cannot load the exported program ({str(exc)[:200]})",
                                     hint="re-export it with this torch version", path=p) from exc


# torch._export.serde.schema.ScalarType values → torch dtype names (the archive's tensor_meta.dtype).
_SCALAR_TYPES = {
    1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float16", 7: "float32", 8: "float64",
    9: "complex32", 10: "complex64", 11: "complex128", 12: "bool", 13: "bfloat16", 28: "uint16",
    29: "float8_e4m3fn", 30: "float8_e5m2", 31: "float8_e4m3fnuz", 32: "float8_e5m2fnuz", 33: "float8_e8m0fnu",
    34: "uint32", 35: "uint64",
}
_STRIDED = 7
_HINT = "re-save it with torch.export.save, or save the state_dict as safetensors"


def _bad(path: Path, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"not a readable torch.export archive: {why}", hint=_HINT, path=path)


def _ints(values: Any, what: str, path: Path) -> list[int]:
    """``[{"as_int": n}, …]`` (a serialized SymInt list) as plain ints; symbolic sizes are refused."""
    if not isinstance(values, list):
        raise _bad(path, f"{what} is not a list")
    out: list[int] = []
    for v in values:
        n = v.get("as_int") if isinstance(v, dict) else None
        if isinstance(n, bool) or not isinstance(n, int):
            raise _bad(path, f"{what} holds a symbolic or malformed size ({str(v)[:60]})")
        out.append(n)
    return out


def _meta_int(v: Any, what: str, path: Path) -> int:
    n = v.get("as_int") if isinstance(v, dict) else v
    if isinstance(n, bool) or not isinstance(n, int):
        raise _bad(path, f"{what} is malformed")
    return n


def _raw_tensor(data: bytes, meta: Any, name: str, path: Path) -> Any:
    """A tensor from raw little-endian bytes + (dtype, sizes, strides, offset), bounds-checked before viewing."""
    import torch

    from ..safety import check_shape

    if not isinstance(meta, dict):
        raise _bad(path, f"tensor {name!r} has no tensor_meta")
    dname = _SCALAR_TYPES.get(meta.get("dtype"))  # type: ignore[arg-type]
    dtype = getattr(torch, dname, None) if dname else None
    if not isinstance(dtype, torch.dtype):
        raise _bad(path, f"tensor {name!r} has an unknown dtype code {meta.get('dtype')!r}")
    if meta.get("layout", _STRIDED) != _STRIDED:
        raise _bad(path, f"tensor {name!r} is not a dense (strided) tensor")
    sizes = check_shape(_ints(meta.get("sizes"), f"sizes of {name!r}", path), name=name, path=path)
    strides = _ints(meta.get("strides"), f"strides of {name!r}", path)
    offset = _meta_int(meta.get("storage_offset", 0), f"storage offset of {name!r}", path)
    if len(strides) != len(sizes) or any(st < 0 for st in strides) or offset < 0:
        raise _bad(path, f"tensor {name!r} has inconsistent strides or offset")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) % itemsize:
        raise _bad(path, f"the data of {name!r} is not a whole number of {dname} elements")
    n_avail = len(data) // itemsize
    if 0 in sizes:
        return torch.empty(sizes, dtype=dtype)
    last = offset + sum((sz - 1) * st for sz, st in zip(sizes, strides, strict=True))
    if last >= n_avail:
        raise _bad(path, f"tensor {name!r} needs more data than the archive holds")
    flat = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
    return torch.as_strided(flat, sizes, strides, offset)


def _pickled_tensor(data: bytes, name: str, path: Path, trust: bool) -> Any:
    """A tensor subclass torch.export stored with torch.save: loaded with weights_only (no code) unless trusted."""
    import io
    import pickle

    import torch

    from ..errors import UnsafePickleError
    from ._torchutil import allowed_globals

    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise _bad(path, f"tensor {name!r} cannot be unpickled") from exc
        if not trust:
            raise UnsafePickleError(path, [f"tensor {name!r} (a pickled tensor subclass)"]) from exc
    except Exception as exc:  # truncated/damaged torch.save payload
        raise _bad(path, f"tensor {name!r} cannot be read ({str(exc)[:120]})") from exc
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise _bad(path, f"tensor {name!r} cannot be read ({str(exc)[:120]})") from exc


def _signature_order(zf: zipfile.ZipFile, prefix: str, model: str, path: Path) -> list[tuple[str, bool]]:
    """(name, is_parameter) in the program's input order, from models/<model>.json (plain JSON; nothing run)."""
    from ..safety import load_json, zip_member_bytes

    member = f"{prefix}models/{model}.json"
    try:
        spec = load_json(zip_member_bytes(zf, member, max_bytes=256 * 1024 * 1024, path=path), path=path,
                         what=f"archive member {member}", max_depth=256)
    except (KeyError, InputError):
        return []
    sig = spec.get("graph_module", {}).get("signature", {}) if isinstance(spec, dict) else {}
    out: list[tuple[str, bool]] = []
    for item in sig.get("input_specs", []) if isinstance(sig, dict) else []:
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("parameter"), dict):
            out.append((str(item["parameter"].get("parameter_name")), True))
        elif isinstance(item.get("buffer"), dict):
            out.append((str(item["buffer"].get("buffer_name")), False))
    return out


def open(path: Path, options: OpenOptions) -> Checkpoint:
    """Weights of a ``.pt2`` read from the archive's raw tensor files and JSON configs — ``torch.export.load``
    is never called here (it unpickles sample inputs; docs/security.md)."""
    from ..safety import load_json, zip_member_bytes
    from ._torchutil import TorchDictSource

    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise _bad(path, "not a zip file") from exc
    with zf:
        names = zf.namelist()
        configs = sorted(n for n in names if n.endswith("_weights_config.json") and "/data/weights/" in f"/{n}")
        if not configs:
            if any(n.endswith(".so") or "/aotinductor/" in n for n in names):
                raise InputError("this .pt2 is an AOTInductor package: compiled code, no readable weights",
                                 hint="save with torch.export.save(ep, path) to keep the weights", path=path)
            raise _bad(path, "no data/weights/*_weights_config.json member")
        config = next((c for c in configs if c.endswith("/model_weights_config.json")), configs[0])
        prefix = config[: config.index("data/weights/")]
        model = config.rsplit("/", 1)[1].removesuffix("_weights_config.json")
        cfg = load_json(zip_member_bytes(zf, config, max_bytes=64 * 1024 * 1024, path=path), path=path,
                        what=f"archive member {config}")
        entries = cfg.get("config") if isinstance(cfg, dict) else None
        if not isinstance(entries, dict):
            raise _bad(path, f"{config} has no 'config' mapping")
        order = _signature_order(zf, prefix, model, path)
        ordered = [n for n, _ in order if n in entries] + [n for n in entries if n not in dict(order)]
        is_param = dict(order)
        tensors: dict[str, Any] = {}
        kinds: dict[str, TensorKind] = {}
        cache: dict[str, bytes] = {}
        for name in ordered:
            meta = entries[name]
            if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
                raise _bad(path, f"entry {name!r} of {config} is malformed")
            member = f"{prefix}data/weights/{meta['path_name']}"
            if member not in cache:
                try:
                    cache[member] = zip_member_bytes(zf, member, path=path)
                except KeyError as exc:
                    raise _bad(path, f"member {member!r} is missing") from exc
            if meta.get("use_pickle"):
                tensors[name] = _pickled_tensor(cache[member], name, path, options.trust_pickle)
            else:
                tensors[name] = _raw_tensor(cache[member], meta.get("tensor_meta"), name, path)
            param = is_param.get(name, bool(meta.get("is_param")))
            kinds[name] = "parameter" if param else "buffer"
    meta_out = {"graph": "torch.export", "loader": f"{__name__}:load_exported"}
    return Checkpoint(path=path, format=NAME, source=TorchDictSource(tensors, kinds), metadata=meta_out)
