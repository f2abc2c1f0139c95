"""Folder layouts around a checkpoint series: aliases of one checkpoint, and the final save of an output folder.

Frameworks keep several names for one checkpoint: timm's ``last.pth.tar`` / ``model_best.pth.tar`` (hard links or
copies of a numbered file), ``latest.pt`` symlinks, the Hugging Face Trainer's ``save_model()`` at the top of
``output_dir`` beside ``checkpoint-N/``. Counting each name as a point would put the same weights at two places in
the series (a zero update, a doubled interval). Aliases are found from the file system (symlink target, inode) and
from the bytes (same size, then a sampled and a full hash), never from names alone; names only choose which of
the identical files is listed (docs/formats.md, "The series").
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .storage import identity, is_remote, read_range

# Names that are another name for "the newest" or "the best" checkpoint: listed after numbered names.
_ALIAS_NAMES = re.compile(r"^(last|latest|best|model_best|final|current|newest|tmp)([._-]|$)", re.IGNORECASE)
_SAMPLES = 8  # sampled blocks compared before a full hash
_BLOCK = 4096


@dataclass(frozen=True)
class Alias:
    """``path`` holds the same checkpoint as ``same_as`` (``how``: symlink, hard link, identical bytes)."""

    path: Path
    same_as: Path
    how: str

    def describe(self) -> str:
        return f"{self.path.name} is the same checkpoint as {self.same_as.name} ({self.how}): counted once"


def _has_number(path: Path) -> bool:
    return bool(re.search(r"\d", path.name)) and not _ALIAS_NAMES.match(path.name)


def preference(path: Path) -> tuple[int, int, str]:
    """Sort key: which of several names of one checkpoint to keep (a real file with a step or epoch number)."""
    return (int(path.is_symlink()), int(not _has_number(path)), path.name)


def weight_files(path: Path) -> list[Path]:
    """The files whose bytes identify a checkpoint: the file itself, or a folder's weight files."""
    if path.is_file():
        return [path]
    names = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
    found = [path / n for n in names if (path / n).is_file()]
    found += sorted(path.glob("model-*-of-*.safetensors")) + sorted(path.glob("pytorch_model-*-of-*.bin"))
    return found


def _size(files: Sequence[Path]) -> tuple[int, ...]:
    return tuple(f.stat().st_size for f in files)


def _sample_digest(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        if is_remote(f):  # the store's ETag (listed already: no request), else eight 4 KiB ranged reads
            tag = f.etag()  # type: ignore[attr-defined]
            if tag:
                h.update(tag.encode())
                continue
            for i in range(_SAMPLES):
                start = max(0, (size - _BLOCK) * i // max(1, _SAMPLES - 1))
                h.update(read_range(f, start, min(size, start + _BLOCK)))
            continue
        with f.open("rb") as fh:
            for i in range(_SAMPLES):
                fh.seek(max(0, (size - _BLOCK) * i // max(1, _SAMPLES - 1)))
                h.update(fh.read(_BLOCK))
    return h.hexdigest()


def _full_digest(files: Sequence[Path]) -> str:
    """A hash of all bytes; for remote objects the store's ETags instead (no download). A store without ETags
    streams the bytes in ranged reads: reached only for files whose sizes and sampled blocks already match."""
    h = hashlib.sha256()
    for f in files:
        if is_remote(f):
            tag = f.etag()  # type: ignore[attr-defined]
            if tag:
                h.update(tag.encode())
                continue
            size = f.stat().st_size
            for start in range(0, size, 8 << 20):
                h.update(read_range(f, start, min(size, start + (8 << 20))))
            continue
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def same_bytes(a: Path, b: Path) -> bool:
    """True when two checkpoints (files, or folders by their weight files) hold byte-identical weights."""
    fa, fb = weight_files(a), weight_files(b)
    if not fa or len(fa) != len(fb) or (a.is_dir() and [f.name for f in fa] != [f.name for f in fb]):
        return False
    try:
        return _size(fa) == _size(fb) and _sample_digest(fa) == _sample_digest(fb) and _full_digest(
            fa) == _full_digest(fb)
    except OSError:
        return False


def find_aliases(paths: Sequence[Path]) -> tuple[list[Path], list[Alias]]:
    """Split candidate checkpoints into one path per distinct checkpoint and the aliases of those.

    Symlinks and hard links are found from the file system; other files are compared by bytes only when their
    sizes are equal (a sampled hash first, so distinct checkpoints of one size cost a few reads each).
    """
    keep: list[Path] = []
    aliases: list[Alias] = []
    # 1. The same file under several names: symlinks (resolved path) and hard links (device, inode).
    by_id: dict[tuple[int, int] | str, list[Path]] = {}
    for p in paths:
        try:
            st = p.stat()
            key: tuple[int, int] | str = identity(p) if is_remote(p) else (
                (st.st_dev, st.st_ino) if p.is_file() else str(p.resolve()))
        except OSError:
            key = str(p)
        by_id.setdefault(key, []).append(p)
    distinct: list[Path] = []
    for group in by_id.values():
        best = min(group, key=preference)
        distinct.append(best)
        for other in group:
            if other != best:
                how = "symlink" if other.is_symlink() or best.is_symlink() else (
                    "hard link" if other.is_file() else "same folder")
                aliases.append(Alias(other, best, how))
    # 2. Byte-identical copies: only among candidates of equal size.
    by_size: dict[tuple[str, tuple[int, ...]], list[Path]] = {}
    for p in distinct:
        try:
            files = weight_files(p)
            label = "" if p.is_file() else ",".join(f.name for f in files)  # a file's own name is irrelevant
            by_size.setdefault((label, _size(files)), []).append(p)
        except OSError:
            by_size.setdefault((str(p), ()), []).append(p)
    dropped: set[Path] = set()
    for (_names, sizes), group in by_size.items():
        if len(group) < 2 or not sizes:
            continue
        try:
            sampled: dict[str, list[Path]] = {}
            for p in group:
                sampled.setdefault(_sample_digest(weight_files(p)), []).append(p)
            for same in sampled.values():
                if len(same) < 2:
                    continue
                full: dict[str, list[Path]] = {}
                for p in same:
                    full.setdefault(_full_digest(weight_files(p)), []).append(p)
                for twins in full.values():
                    best = min(twins, key=preference)
                    for other in twins:
                        if other != best:
                            aliases.append(Alias(other, best, "identical bytes"))
                            dropped.add(other)
        except OSError:
            continue
    keep = [p for p in distinct if p not in dropped]
    order = {p: i for i, p in enumerate(paths)}
    keep.sort(key=lambda p: order[p])
    return keep, aliases


def is_output_dir(folder: Path, subfolders: Sequence[Path]) -> bool:
    """A training output folder that holds checkpoint subfolders and, at its top, a final model save."""
    return bool(subfolders) and bool(weight_files(folder))
