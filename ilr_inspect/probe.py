"""Probe data: the fixed inputs (and optional labels) every checkpoint is evaluated on.

Sources: ``.npz`` arrays, a ``.pt`` file (tensor, tuple or dict; read with ``weights_only=True``), a folder of images
(labels from subfolder names), or a Python factory ``module:function`` / ``file.py:function`` returning any of
those shapes. Float inputs become float32; integer inputs (token ids) int64.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import IlrError, ProbeError, require

INPUT_KEYS = ("x", "inputs", "input", "X", "data", "images", "pixel_values", "input_ids", "features")
LABEL_KEYS = ("y", "labels", "label", "targets", "target", "Y")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


@dataclass
class Probe:
    inputs: torch.Tensor
    labels: torch.Tensor | None
    source: str
    path: Path | None = None  # the file or folder it came from (for provenance)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def _as_tensor(value: Any, what: str, path: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
    else:
        try:
            t = torch.from_numpy(np.ascontiguousarray(np.asarray(value)))
        except (TypeError, ValueError) as exc:
            raise ProbeError(f"{what} is not an array ({type(value).__name__}): {exc}", path=path) from None
    if t.ndim == 0:
        raise ProbeError(f"{what} is a scalar; expected one row per probe example", path=path)
    if t.is_floating_point():
        return t.to(torch.float32)
    if t.dtype == torch.bool or t.is_complex():
        raise ProbeError(f"{what} has dtype {t.dtype}; expected numbers", path=path)
    return t.to(torch.int64)


def _finish(inputs: Any, labels: Any, source: str, path: str) -> Probe:
    x = _as_tensor(inputs, "the probe inputs", path)
    y = None
    if labels is not None:
        y = _as_tensor(labels, "the probe labels", path)
        if y.is_floating_point():
            if not torch.equal(y, y.round()):
                raise ProbeError("the probe labels are not integer class indices", path=path)
            y = y.to(torch.int64)
        y = y.reshape(-1) if y.ndim > 1 and y.shape[1:].numel() == 1 else y
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ProbeError(
                f"{x.shape[0]} inputs but labels of shape {tuple(y.shape)}; expected ({x.shape[0]},)", path=path
            )
    if x.shape[0] == 0:
        raise ProbeError("the probe set is empty", path=path)
    return Probe(x, y, source)


def _pick(keys: list[str], wanted: tuple[str, ...]) -> str | None:
    for w in wanted:
        if w in keys:
            return w
    lower = {k.lower(): k for k in keys}
    for w in wanted:
        if w.lower() in lower:
            return lower[w.lower()]
    return None


def _from_mapping(d: Mapping[str, Any], path: str, name: str) -> Probe:
    keys = [str(k) for k in d]
    xk = _pick(keys, INPUT_KEYS)
    yk = _pick(keys, LABEL_KEYS)
    if xk is None:
        if len(keys) == 1 or (len(keys) == 2 and yk is not None):
            xk = next(k for k in keys if k != yk)
        else:
            raise ProbeError(
                f"cannot tell which entry holds the inputs among {keys}",
                hint=f"name the inputs one of {', '.join(INPUT_KEYS[:4])} and the labels y or labels",
                path=path,
            )
    used = f"inputs={xk!r}" + (f", labels={yk!r}" if yk is not None else ", no labels")
    return _finish(d[xk], d[yk] if yk is not None else None, f"{name} ({used})", path)


def _from_object(obj: Any, path: str, name: str) -> Probe:
    if isinstance(obj, Probe):
        return obj
    if isinstance(obj, Mapping):
        return _from_mapping(obj, path, name)
    if isinstance(obj, (tuple, list)) and len(obj) in (1, 2) and not np.isscalar(obj[0]):
        return _finish(obj[0], obj[1] if len(obj) == 2 else None, f"{name} (tuple: inputs, labels)", path)
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return _finish(obj, None, f"{name} (inputs only)", path)
    raise ProbeError(
        f"probe data of type {type(obj).__name__} is not understood",
        hint="give a tensor/array, a tuple (inputs, labels), or a dict with x / y",
        path=path,
    )


def _from_npz(path: Path) -> Probe:
    from .safety import check_zip_member, regular_file

    if not regular_file(path):
        raise ProbeError("not a regular file", hint="point at a .npz file", path=path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ProbeError("not an .npz archive (a single .npy array)", path=path)
            for info in z.zip.infolist():  # declared sizes and ratios checked before inflating (zip bombs)
                check_zip_member(info, max_bytes=4 * 1024 * 1024 * 1024, path=path)
            arrays = {k: z[k] for k in z.files}
    except IlrError:
        raise
    except Exception as exc:  # OSError/ValueError/BadZipFile/EOFError/zlib.error on a damaged archive
        first = str(exc).strip().splitlines()
        raise ProbeError(f"cannot read the .npz probe: {(first[0] if first else type(exc).__name__)[:160]}",
                         path=path) from None
    return _from_mapping(arrays, str(path), path.name)


def _from_pt(path: Path) -> Probe:
    from .safety import regular_file

    if not regular_file(path):
        raise ProbeError("not a regular file", hint="point at a .pt file", path=path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ProbeError(
            f"cannot read the .pt probe with weights_only=True: {str(exc).splitlines()[0]}",
            hint="save plain tensors (torch.save({'x': x, 'y': y}, path))",
            path=path,
        ) from None
    return _from_object(obj, str(path), path.name)


MAX_PROBE_PIXELS = 256 * 1024 * 1024  # all probe images together (docs/security.md)


def _from_images(folder: Path) -> Probe:
    image_mod: Any = require("PIL.Image", "images", "reading a folder of probe images")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    entries: list[tuple[Path, int | None]] = []
    if classes:
        for i, c in enumerate(classes):
            entries += [(f, i) for f in sorted((folder / c).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        entries = [(f, None) for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not entries:
        raise ProbeError("no images found (png, jpg, …) in this folder or its class subfolders", path=folder)
    from .safety import check_pixels, regular_file

    images = []
    total = 0
    for f, _ in entries:
        if not regular_file(f):
            raise ProbeError("not a regular file", hint="remove it from the probe folder", path=f)
        try:
            with image_mod.open(f) as im:
                # The header's size is checked before any pixel is decoded (decompression bombs).
                check_pixels(*im.size, path=f)
                total += im.size[0] * im.size[1]
                if total > MAX_PROBE_PIXELS:
                    raise ProbeError(f"the images hold more than {MAX_PROBE_PIXELS} pixels in all",
                                     hint="use fewer or smaller probe images", path=folder)
                images.append(im.copy())
        except IlrError:
            raise
        except Exception as exc:  # PIL raises UnidentifiedImageError/OSError/ValueError/SyntaxError on damage
            first = str(exc).strip().splitlines()
            raise ProbeError(f"cannot read the image ({(first[0] if first else type(exc).__name__)[:160]})",
                             hint="remove or re-save it", path=f) from None
    gray = all(im.mode in ("L", "1", "I;16", "I") for im in images)
    arrays = [np.asarray(im.convert("L" if gray else "RGB"), dtype=np.float32) / 255.0 for im in images]
    sizes = sorted({a.shape[:2] for a in arrays})
    if len(sizes) > 1:
        raise ProbeError(
            f"images have different sizes {sizes[:4]}; a probe batch needs one size",
            hint="resize them to one size first",
            path=folder,
        )
    x = np.stack([a[None] if gray else a.transpose(2, 0, 1) for a in arrays])
    labels = np.array([lab for _, lab in entries]) if classes else None
    what = f"{len(entries)} images, " + (f"labels from subfolders {classes}" if classes else "no labels")
    return _finish(x, labels, f"{folder.name}/ ({what})", str(folder))


def load_probe(spec: str | Path, *, base_dir: Path | None = None) -> Probe:
    """Load probe inputs (and labels if present) from a file, image folder, or ``module:function``."""
    path = Path(spec)
    if not path.is_absolute() and not path.exists() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if path.is_dir():
        return replace(_from_images(path), path=path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return replace(_from_npz(path), path=path)
        if suffix in (".pt", ".pth"):
            return replace(_from_pt(path), path=path)
        raise ProbeError("unsupported probe file", hint="use .npz, .pt, an image folder, or module:function",
                         path=path)
    text = str(spec)
    if ":" not in text:
        raise ProbeError("no such probe file or folder", hint="check the path", path=path)
    from .models import resolve_callable

    fn = resolve_callable(text, base_dir=base_dir, what="probe", error=ProbeError)
    try:
        obj = fn()
    except (Exception, SystemExit) as exc:  # a factory that calls sys.exit is a probe error, not our exit
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ProbeError(f"the probe factory {text!r} failed: {type(exc).__name__}{': ' + msg if msg else ''}",
                         hint="run the factory directly in Python to see the traceback") from None
    return _from_object(obj, text, text)
