"""Bounded, code-free parsing of untrusted input (docs/security.md).

Every reader that parses text or containers from a checkpoint folder goes through these helpers, so the limits
(size, nesting depth, YAML alias expansion, folder confinement) are enforced in one place and every failure is an
:class:`~ilr_inspect.errors.InputError` naming the file — never a hang, a MemoryError or a traceback.
"""

from __future__ import annotations

import json
import os
import stat
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from .errors import CorruptCheckpointError, InputError

# Limits. Generous for real files (a trainer_state.json of a long run is a few MB; hparams files are KB),
# small enough that a hostile file fails in milliseconds.
MAX_JSON_BYTES = 256 * 1024 * 1024
MAX_YAML_BYTES = 8 * 1024 * 1024
MAX_DEPTH = 64
MAX_YAML_NODES = 1_000_000  # nodes after alias expansion: a "billion laughs" bomb exceeds it by far
MAX_MEMBER_BYTES = 16 * 1024 * 1024 * 1024  # one decompressed archive member
MAX_RATIO = 1024  # decompressed/compressed ratio beyond which a deflated member is treated as a bomb
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
MAX_ELEMENTS = 1 << 40  # per tensor: beyond this a declared shape is nonsense (4 TiB of bytes at least)

_PARSE_HINT = "the file is damaged or not what its name says; fix or remove it"


def _read_limited(path: Path, max_bytes: int, what: str) -> bytes:
    if not regular_file(path):
        raise InputError(f"is not a regular file ({what} expected)", hint="point to a regular file", path=path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InputError(f"{what} is too large ({size} bytes > limit {max_bytes})",
                             hint="this does not look like a real " + what, path=path)
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(f"cannot read the file ({exc.strerror or exc})", hint="check its permissions",
                         path=path) from exc
    if len(data) > max_bytes:
        raise InputError(f"{what} is too large (> limit {max_bytes} bytes)",
                         hint="this does not look like a real " + what, path=path)
    return data


def _text(data: bytes, path: Path | None, what: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorruptCheckpointError(f"{what} is not UTF-8 text (byte {exc.start})", hint=_PARSE_HINT,
                                     path=path) from exc


def check_depth(obj: Any, limit: int = MAX_DEPTH, *, path: Path | None = None, what: str = "data") -> None:
    """Raise InputError when containers nest deeper than ``limit`` (iterative: no recursion of our own)."""
    stack: list[tuple[Any, int]] = [(obj, 0)]
    seen: set[int] = set()
    while stack:
        cur, d = stack.pop()
        if isinstance(cur, dict | list | tuple):
            if d >= limit:
                raise InputError(f"{what} nests deeper than {limit} levels", hint=_PARSE_HINT, path=path)
            if id(cur) in seen:  # shared (YAML alias) or cyclic: each container walked once
                continue
            seen.add(id(cur))
            children: Iterable[Any] = cur.values() if isinstance(cur, dict) else cur
            stack.extend((c, d + 1) for c in children)


def _source_text(source: str | Path | bytes, max_bytes: int, path: Path | None, what: str) -> tuple[str, Path | None]:
    """The text of ``source`` (bytes, or a file read with a size limit) and the path errors should name."""
    if isinstance(source, bytes):
        if len(source) > max_bytes:
            raise InputError(f"{what} is too large ({len(source)} bytes > limit {max_bytes})", hint=_PARSE_HINT,
                             path=path)
        data = source
    else:
        local = source if _remote(source) else Path(source)  # a remote path keeps its URL (ilr_inspect.storage)
        data = _read_limited(local, max_bytes, what)  # type: ignore[arg-type]
        path = local  # type: ignore[assignment]
    return _text(data, path, what), path


def load_json(source: str | Path | bytes, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH,
              path: Path | None = None, what: str = "JSON file") -> Any:
    """Parse JSON from a file or bytes with size and nesting limits; errors name ``path``."""
    text, path = _source_text(source, max_bytes, path, what)
    try:
        obj = json.loads(text)
    except RecursionError as exc:
        raise InputError(f"{what} nests too deeply to parse", hint=_PARSE_HINT, path=path) from exc
    except ValueError as exc:  # JSONDecodeError, and int strings over Python's digit limit
        raise CorruptCheckpointError(f"{what} is not valid JSON ({str(exc)[:120]})", hint=_PARSE_HINT,
                                     path=path) from exc
    check_depth(obj, max_depth, path=path, what=what)
    return obj


class _TooDeepError(Exception):
    pass


def _yaml_loader(max_depth: int) -> Any:
    import yaml

    class DataLoader(yaml.SafeLoader):
        """SafeLoader that reads ``!!python/…`` and custom tags as plain mappings/sequences/strings, and stops
        composing past ``max_depth`` levels (before Python's recursion limit is anywhere near)."""

        _depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            self._depth += 1
            try:
                if self._depth > max_depth:
                    raise _TooDeepError()
                return super().compose_node(parent, index)  # type: ignore[no-untyped-call]
            finally:
                self._depth -= 1

    def plain(loader: yaml.SafeLoader, _suffix: str, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            return loader.construct_mapping(node, deep=True)
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node, deep=True)
        return loader.construct_scalar(node)  # type: ignore[arg-type]

    DataLoader.add_multi_constructor("tag:yaml.org,2002:python/", plain)
    DataLoader.add_multi_constructor("!", plain)
    return DataLoader


def _yaml_expanded_size(root: Any, max_nodes: int, max_depth: int, path: Path | None) -> None:
    """Nodes the document has once aliases are expanded, computed on the shared graph (memoised, no expansion)."""
    import yaml

    size: dict[int, int] = {}
    on_path: set[int] = set()
    # Iterative post-order walk: (node, depth, children_done)
    stack: list[tuple[Any, int, bool]] = [(root, 0, False)]
    while stack:
        node, d, done = stack.pop()
        key = id(node)
        if not isinstance(node, yaml.CollectionNode):
            size[key] = 1
            continue
        children: list[Any] = ([n for kv in node.value for n in kv] if isinstance(node, yaml.MappingNode)
                               else list(node.value))
        if done:
            on_path.discard(key)
            total = 1 + sum(size[id(c)] for c in children)
            if total > max_nodes:
                raise InputError(f"YAML expands to more than {max_nodes} nodes (alias bomb?)",
                                 hint="YAML aliases are limited; write the values out", path=path)
            size[key] = total
            continue
        if key in size:
            continue
        if key in on_path:
            raise InputError("YAML refers to itself (recursive alias)", hint=_PARSE_HINT, path=path)
        if d >= max_depth:
            raise InputError(f"YAML nests deeper than {max_depth} levels", hint=_PARSE_HINT, path=path)
        on_path.add(key)
        stack.append((node, d, True))
        stack.extend((c, d + 1, False) for c in children if id(c) not in size)


def load_yaml(source: str | Path | bytes, *, max_bytes: int = MAX_YAML_BYTES, max_depth: int = MAX_DEPTH,
              max_nodes: int = MAX_YAML_NODES, path: Path | None = None, what: str = "YAML file") -> Any:
    """Parse YAML as plain data: safe loader (Python tags become plain data), size, depth and alias limits."""
    import yaml

    text, path = _source_text(source, max_bytes, path, what)
    loader = _yaml_loader(max_depth)(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _yaml_expanded_size(node, max_nodes, max_depth, path)
        return loader.construct_document(node)
    except (RecursionError, _TooDeepError) as exc:
        raise InputError(f"{what} nests deeper than {max_depth} levels", hint=_PARSE_HINT, path=path) from exc
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()
        raise CorruptCheckpointError(f"{what} is not valid YAML ({(first[0] if first else 'parse error')[:120]})",
                                     hint=_PARSE_HINT, path=path) from exc
    except (ValueError, TypeError) as exc:  # e.g. unhashable keys from a hostile document
        raise CorruptCheckpointError(f"{what} is not plain YAML data ({str(exc)[:120]})", hint=_PARSE_HINT,
                                     path=path) from exc
    finally:
        loader.dispose()


def _remote(path: object) -> bool:
    return type(path).__name__ == "RemotePath" and hasattr(path, "read_range")


def regular_file(path: str | Path) -> bool:
    """True for a regular file (after following symlinks); False for FIFOs, devices, sockets, loops, missing."""
    if _remote(path):  # an object in fsspec storage (ilr_inspect.storage): a file or nothing
        return bool(path.is_file())  # type: ignore[union-attr]
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, RuntimeError, ValueError):
        return False


def special_file(path: str | Path) -> bool:
    """True when ``path`` exists but is neither a regular file nor a folder (FIFO, device, socket)."""
    if _remote(path):
        return False
    try:
        mode = os.stat(path).st_mode
    except (OSError, RuntimeError, ValueError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def resolve(path: str | Path) -> Path:
    """``Path.resolve`` that turns symlink loops and unreadable links into an InputError naming the path."""
    p = Path(path)
    try:
        return p.resolve(strict=False)
    except (RuntimeError, OSError) as exc:  # RuntimeError: "Symlink loop" (Python < 3.13)
        raise InputError("cannot resolve the path (symlink loop?)", hint="fix or remove the symlink",
                         path=p) from exc


def ensure_inside(path: str | Path, root: str | Path, *, what: str = "file") -> Path:
    """``path`` resolved after symlinks; InputError when it leaves ``root``'s folder tree (docs/security.md).
    A remote ``path`` (ilr_inspect.storage) must stay under the URL prefix ``root`` after ``..`` is normalized."""
    if _remote(path) or _remote(root):
        from .storage import inside

        if not (_remote(path) and _remote(root) and inside(path, root)):  # type: ignore[arg-type]
            raise InputError(f"{what} {str(path)!r} points outside the URL prefix {str(root)!r}",
                             hint="only objects under the checkpoint's own prefix are read", path=root)
        return path.resolve()  # type: ignore[union-attr,return-value]
    r = resolve(root)
    p = resolve(path)
    if p != r and r not in p.parents:
        raise InputError(f"{what} {str(path)!r} points outside the checkpoint folder (to {p})",
                         hint="only files inside the checkpoint's own folder are read; copy it in if you trust it",
                         path=root)
    return p


def zip_member_bytes(zf: zipfile.ZipFile, member: str | zipfile.ZipInfo, *, max_bytes: int = MAX_MEMBER_BYTES,
                     path: Path | None = None) -> bytes:
    """Read one zip member after checking its declared size (and compression ratio) against limits."""
    info = member if isinstance(member, zipfile.ZipInfo) else zf.getinfo(member)
    check_zip_member(info, max_bytes=max_bytes, path=path)
    try:
        with zf.open(info) as fh:
            data = _read_capped(fh, info.file_size)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise CorruptCheckpointError(f"archive member {info.filename!r} is damaged ({str(exc)[:120]})",
                                     hint=_PARSE_HINT, path=path) from exc
    if len(data) != info.file_size:
        raise CorruptCheckpointError(f"archive member {info.filename!r} is not the size its header declares",
                                     hint=_PARSE_HINT, path=path)
    return data


def _read_capped(fh: IO[bytes], declared: int) -> bytes:
    data = fh.read(declared + 1)  # one byte more reveals a member longer than declared
    return data


def check_zip_member(info: zipfile.ZipInfo, *, max_bytes: int = MAX_MEMBER_BYTES, path: Path | None = None) -> None:
    """Declared size within limits, and no absurd compression ratio (a zip bomb) — checked before inflating."""
    if info.file_size > max_bytes:
        raise InputError(f"archive member {info.filename!r} declares {info.file_size} bytes (limit {max_bytes})",
                         hint=_PARSE_HINT, path=path)
    if (info.compress_type != zipfile.ZIP_STORED and info.file_size > 1024 * 1024
            and info.file_size > MAX_RATIO * max(info.compress_size, 1)):
        raise InputError(f"archive member {info.filename!r} inflates {info.file_size // max(info.compress_size, 1)}"
                         f"x (zip bomb?)", hint=_PARSE_HINT, path=path)


def check_shape(shape: Iterable[Any], *, name: str, path: Path | None = None) -> tuple[int, ...]:
    """A declared tensor shape as ints; negative, non-integer or overflowing shapes are input errors."""
    out: list[int] = []
    total = 1
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int):
            try:
                import operator

                d = operator.index(d)
            except TypeError as exc:
                raise CorruptCheckpointError(f"tensor {name!r} has a non-integer dimension {d!r}",
                                             hint=_PARSE_HINT, path=path) from exc
        if d < 0:
            raise CorruptCheckpointError(f"tensor {name!r} has a negative dimension ({d})", hint=_PARSE_HINT,
                                         path=path)
        total *= d
        if total > MAX_ELEMENTS:
            raise CorruptCheckpointError(f"tensor {name!r} declares an impossible size ({total} elements)",
                                         hint=_PARSE_HINT, path=path)
        out.append(int(d))
    return tuple(out)


def check_pixels(width: int, height: int, *, path: Path | None = None) -> None:
    """Refuse images whose declared size would need more than MAX_IMAGE_PIXELS pixels to decode."""
    if width <= 0 or height <= 0 or width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"image declares {width}x{height} pixels (limit {MAX_IMAGE_PIXELS})",
                         hint="use smaller probe images", path=path)


def check_hdf5(h5: Any, path: Path) -> None:
    """Refuse HDF5 content that reads other files: external links, external raw storage, virtual datasets.

    Links are listed without being followed (``visit_links``), so nothing outside the file is opened here.
    """
    import h5py

    def visit(name: str) -> None:
        link = h5.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            raise InputError(f"HDF5 object {name!r} is an external link to {link.filename!r}",
                             hint="only data inside the checkpoint file is read; re-save without external links",
                             path=path)
        if isinstance(link, h5py.SoftLink):
            return
        obj = h5.get(name)
        if isinstance(obj, h5py.Dataset):
            if obj.external:
                raise InputError(f"HDF5 dataset {name!r} stores its data in external file(s)",
                                 hint="only data inside the checkpoint file is read; re-save it", path=path)
            if obj.is_virtual:
                raise InputError(f"HDF5 dataset {name!r} is a virtual dataset mapping other files",
                                 hint="only data inside the checkpoint file is read; re-save it", path=path)

    try:
        h5.visit_links(visit)
    except InputError:
        raise
    except Exception as exc:  # h5py raises OSError/KeyError/RuntimeError on damaged object headers
        raise CorruptCheckpointError(f"cannot walk the HDF5 file ({str(exc)[:120]})", hint=_PARSE_HINT,
                                     path=path) from exc
