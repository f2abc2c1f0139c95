"""A checkpoint series: expand user paths, open each checkpoint's headers, order by training step, and merge the
hyperparameter timeline from optimizer state, logs, sidecar files and command-line overrides."""

from __future__ import annotations

import glob
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from .checkpoint import Checkpoint, HParams
from .errors import ArchitectureMismatchError, EmptySeriesError, IlrError, InputError, UsageError
from .formats import REGISTRY, OpenOptions, detect, load_format
from .layout import Alias, find_aliases, same_bytes
from .safety import regular_file
from .storage import identity, inside, is_remote, is_url, remote_glob, to_path, walk

if TYPE_CHECKING:
    from .logs import LogData

# File extensions that are meant to be checkpoints: a bad one is an error, not something to skip silently.
CHECKPOINT_SUFFIXES = frozenset(
    {".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".pt2", ".onnx", ".keras", ".h5", ".msgpack", ".npz", ".tar"}
)
# Files that live next to checkpoints but are never checkpoints themselves.
_NOT_CHECKPOINTS = frozenset(
    {"optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", "training_args.bin", "probe.npz",
     "train.npz", "test.npz", "data.npz", "model.pt2", "model.ts",
     # Accelerate save_state companions, timm's in-progress save
     "optimizer.bin", "scheduler.bin", "scaler.bin", "sampler.bin", "tmp.pth.tar"}
)
# Numbered companions: rng_state_0.pth (multi-GPU Trainer), optimizer_1.bin / scheduler_1.bin / sampler_1.bin
# (Accelerate with several of each).
_NOT_CHECKPOINT_RE = re.compile(r"^(rng_state|optimizer|scheduler|scaler|sampler|random_states)_\d+\.(pth?|bin|pkl)$")


def is_companion(name: str) -> bool:
    """A file that sits next to checkpoints (optimizer, scheduler, RNG state...) but is not a checkpoint."""
    return name in _NOT_CHECKPOINTS or bool(_NOT_CHECKPOINT_RE.match(name))
_FOLDER_FORMATS = ("hf_folder", "dcp", "orbax")

# Step patterns, most specific first; each has one group: the step.
_STEP_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("lightning", re.compile(r"(?:^|[^a-z])step[=_-]?(\d+)", re.IGNORECASE)),
    ("hf", re.compile(r"checkpoint-(\d+)$")),
    ("deepspeed", re.compile(r"global_step[_-]?(\d+)")),
    ("iter", re.compile(r"(?:^|[^a-z])iter(?:ation)?[=_-]?(\d+)", re.IGNORECASE)),
    ("bare-number", re.compile(r"^(\d+)$")),
)
_EPOCH_PATTERN = re.compile(r"(?:^|[^a-z])epoch[=_-]?(\d+)", re.IGNORECASE)


def natural_key(text: str) -> tuple[Any, ...]:
    """Sort 'ckpt-9' before 'ckpt-10'."""
    return tuple(int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text))


def step_from_name(path: Path, step_regex: str | None = None) -> int | None:
    return _named_number(path, step_regex)[0]


def _named_number(path: Path, step_regex: str | None = None) -> tuple[int | None, str | None]:
    """The number in a checkpoint's name and the pattern that found it (``regex``, ``lightning``, ``hf``...)."""
    stem = path.name
    while True:  # strip compound suffixes such as .pth.tar
        suffix = next((s for s in sorted(CHECKPOINT_SUFFIXES, key=len, reverse=True) if stem.endswith(s)), None)
        if suffix is None:
            break
        stem = stem[: -len(suffix)]
    if step_regex:
        m = re.search(step_regex, path.name)
        return (int(m.group(1)), "regex") if m else (None, None)
    for name, pattern in _STEP_PATTERNS:
        m = pattern.search(stem)
        if m:
            return int(m.group(1)), name
    return None, None


def epoch_from_name(path: Path) -> int | None:
    m = _EPOCH_PATTERN.search(path.name)
    return int(m.group(1)) if m else None


def _is_checkpoint_folder(path: Path) -> bool:
    return any(load_format(name).sniff(path) for name in _FOLDER_FORMATS if name in REGISTRY)


def _children(folder: Path) -> tuple[list[Path], list[Path]]:
    subdirs, files = [], []
    for child in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if child.name.startswith(".") or is_companion(child.name):
            continue
        if child.is_dir():
            if _is_checkpoint_folder(child):
                subdirs.append(child)
        elif child.suffix.lower() in CHECKPOINT_SUFFIXES:
            files.append(child)
    return subdirs, files


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Directories, globs and explicit paths → candidate checkpoint files/folders (unordered duplicates removed)."""
    return _expand(paths)[0]


def _nested(top: Path, max_depth: int = 4) -> list[Path]:
    """Checkpoint folders and files up to ``max_depth`` levels below ``top`` (a checkpoint folder is not entered:
    Accelerate's ``checkpoints/checkpoint_0/``, Lightning's ``lightning_logs/version_0/checkpoints/*.ckpt``)."""
    found: list[Path] = []
    base = len(top.parts)
    for here, dirnames, filenames in walk(top):  # a local folder, or a remote prefix (docs/scale-out.md)
        depth = len(here.parts) - base
        keep = []
        for d in sorted(dirnames, key=natural_key):
            sub = here / d
            if d.startswith("."):
                continue
            if _is_checkpoint_folder(sub):
                found.append(sub)
            elif depth + 1 < max_depth:
                keep.append(d)
        dirnames[:] = keep
        found += [here / f for f in sorted(filenames, key=natural_key)
                  if Path(f).suffix.lower() in CHECKPOINT_SUFFIXES and not is_companion(f) and not f.startswith(".")]
    return sorted(found, key=lambda q: natural_key(str(q)))


def _expand(paths: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """Candidate checkpoints, and output folders whose top level holds a final save beside checkpoint folders."""
    from .layout import is_output_dir, weight_files

    out: list[Path] = []
    finals: list[Path] = []
    for raw in paths:
        p = to_path(raw)  # a URL (s3://, gs://, hf://...) becomes a remote path
        if not p.exists() and any(ch in str(raw) for ch in "*?["):
            matches = sorted(remote_glob(p), key=lambda m: natural_key(str(m))) if is_remote(p) else [
                Path(m) for m in sorted(glob.glob(str(raw), recursive=True), key=natural_key)]
            if not matches:
                raise EmptySeriesError(f"the pattern {raw!r} matches nothing", hint="check the glob (quote it)")
            out.extend(m for m in matches if m.is_dir() or (m.is_file() and not is_companion(m.name)))
            continue
        if not p.exists():
            raise InputError("no such file or folder", hint="check the path", path=p)
        if not p.is_dir():  # a file, or a FIFO/device (skipped with a warning in open_series)
            out.append(p)
            continue
        subdirs, files = _children(p)
        if subdirs and is_output_dir(p, subdirs):
            # HF Trainer output_dir after save_model(): the top-level weights are the final save, not a series
            # point of their own (resolved against the checkpoints in open_series).
            finals.append(p)
            top = set(weight_files(p))
            files = [f for f in files if f not in top]
        if not subdirs and len(files) == 1 and not _is_checkpoint_folder(p):
            # Keras/plain scripts: ModelCheckpoint writes into ckpts/ and model.save() leaves one file at the run's
            # top. The series is the folder below; the lone top file is the final save, placed like HF's.
            below = [q for q in _nested(p) if q.parent != p]
            if len(below) >= 2:
                finals.extend(files)
                out.extend(below)
                continue
        if subdirs or files:
            out.extend(subdirs + files)
        elif _is_checkpoint_folder(p):
            out.append(p)
        else:
            # Common layouts put checkpoints a few levels down (lightning_logs/version_0/checkpoints/).
            nested = _nested(p)
            if not nested:
                raise EmptySeriesError(
                    "no checkpoint files or folders found here",
                    hint="point at the folder holding the checkpoints, a glob, or the files themselves",
                    path=p,
                )
            out.extend(nested)
    # The same path given twice is dropped here; other names of one checkpoint (symlinks, hard links, copies)
    # are reported as aliases by open_series.
    seen: set[str] = set()
    unique = []
    for q in out:
        r = identity(q)
        if r not in seen:
            seen.add(r)
            unique.append(q)
    return unique, finals


def _signature(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    return {n: t.shape for n, t in ckpt.tensors.items() if t.kind == "parameter"}


def _describe_mismatch(ref: dict[str, tuple[int, ...]], other: dict[str, tuple[int, ...]]) -> str:
    missing = sorted(set(ref) - set(other))
    extra = sorted(set(other) - set(ref))
    shape = sorted(n for n in set(ref) & set(other) if ref[n] != other[n])
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
    if shape:
        parts.append(f"{len(shape)} with other shapes (e.g. {shape[0]}: {other[shape[0]]} vs {ref[shape[0]]})")
    return "; ".join(parts)


@dataclass
class Series:
    """Checkpoints ordered by training step, plus the logs and overrides that complete their hyperparameters."""

    checkpoints: list[Checkpoint]
    root: Path | None = None
    warnings: list[str] = field(default_factory=list)
    logs: LogData | None = None
    overrides: HParams | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    # Other names of listed checkpoints (symlinks, hard links, copies, a final save): reported, not counted.
    aliases: list[Alias] = field(default_factory=list)
    # "step", or "epoch" when no checkpoint stores a step and the series is ordered by the epochs the files store.
    axis: Literal["step", "epoch"] = "step"

    def __len__(self) -> int:
        return len(self.checkpoints)

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(self.checkpoints)

    def __getitem__(self, i: int) -> Checkpoint:
        return self.checkpoints[i]

    @property
    def steps(self) -> list[int | None]:
        return [c.step for c in self.checkpoints]

    def hparams_for(self, ckpt: Checkpoint) -> dict[str, HParams]:
        """Per trainable parameter: CLI overrides > the checkpoint's optimizer state > logs at its step > sidecars.

        Saved optimizer state holds the lr of the *next* update, so log values that complete it are taken with the
        same timing; a checkpoint without optimizer state gets the logged lr *used* at its step.
        """
        log_next = log_used = None
        if self.logs is not None and ckpt.step is not None:
            log_next = _informative(self.logs.hparams_at(ckpt.step, timing="next"))
            log_used = _informative(self.logs.hparams_at(ckpt.step, timing="used"))
        out: dict[str, HParams] = {}
        for name in ckpt.parameters:
            stored = ckpt.hparams.get(name)
            if stored is None:
                hp = log_used if log_used is not None else HParams(source="none")
            else:
                hp = stored.merged(log_next) if log_next is not None else stored
            if self.overrides is not None:
                hp = self.overrides.merged(hp) if hp.source != "none" else self.overrides
            out[name] = hp
        return out

    def field_sources(self, ckpt: Checkpoint, name: str, hp: HParams) -> dict[str, str]:
        """Where each of lr / weight_decay / momentum in ``hp`` (parameter ``name``'s value of :meth:`hparams_for`)
        came from: ``cli``, the checkpoint's own source (``optimizer``, ``safetensors:metadata``...),
        ``log:<file>`` or ``sidecar:<file>``; empty when missing. Precedence as in :meth:`hparams_for`."""
        parts = [p for p in hp.source.split("+") if p not in ("none", "unknown")]
        stored = ckpt.hparams.get(name)
        own = [p for p in parts if not p.startswith(("log:", "sidecar:")) and p != "cli"]
        out: dict[str, str] = {}
        for fld in HP_FIELDS:
            value = getattr(hp, fld)
            if value is None:
                out[fld] = ""
            elif self.overrides is not None and getattr(self.overrides, fld) is not None:
                out[fld] = "cli"
            elif stored is not None and getattr(stored, fld) is not None and own:
                # A reader that combines files (Orbax, Keras weights + .keras) names each field's own source.
                per_field = ckpt.metadata.get("hparam_sources")
                got = per_field.get(fld) if isinstance(per_field, dict) else None
                out[fld] = str(got) if got else "+".join(own)
            else:
                const = self.logs.constant_sources.get(fld) if self.logs is not None else None
                if const is not None and self.logs is not None and f"sidecar:{const}" in parts and _close(
                        self.logs.constants.get(fld), value):
                    out[fld] = f"sidecar:{const}"
                else:
                    logs = [p for p in parts if p.startswith("log:")]
                    out[fld] = "+".join(logs or parts)
        return out

    def close(self) -> None:
        for c in self.checkpoints:
            c.close()

    def __enter__(self) -> Series:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


HP_FIELDS = ("lr", "weight_decay", "momentum")


def _close(a: Any, b: float) -> bool:
    try:
        return a is not None and abs(float(a) - b) <= 1e-12 * max(1.0, abs(b))
    except (TypeError, ValueError):
        return False


def _informative(hp: HParams) -> HParams | None:
    fields = (hp.lr, hp.weight_decay, hp.momentum, hp.beta2, hp.optimizer)
    return hp if any(v is not None for v in fields) else None


def _common_root(paths: Sequence[Path]) -> Path | None:
    if not paths:
        return None
    parents = [p.resolve().parent for p in paths]
    root = parents[0]
    for q in parents[1:]:
        while root not in (q, *q.parents):
            root = root.parent
    return root


def open_series(
    paths: Sequence[str | Path] | str | Path,
    options: OpenOptions | None = None,
    *,
    step_regex: str | None = None,
    on_mismatch: Literal["stop", "skip"] = "stop",
    overrides: HParams | None = None,
    read_logs: bool = True,
    progress: Callable[[Path], None] | None = None,
) -> Series:
    """Open every checkpoint under ``paths`` (headers and hyperparameters only) and order them by step.

    The step comes from inside the checkpoint when stored there, else from the name (``step_000100.pt``,
    ``epoch=0-step=100.ckpt``, ``checkpoint-500``, ``global_step500``, ``epoch3_iter150.pth``), else the natural sort
    order of names; each checkpoint's ``step_source`` says which.
    """
    if on_mismatch not in ("stop", "skip"):
        raise UsageError(f"--on-mismatch must be 'stop' or 'skip', not {on_mismatch!r}")
    if step_regex is not None:
        try:
            if re.compile(step_regex).groups < 1:
                raise UsageError("--step-regex needs one capturing group for the step, e.g. 'it(\\d+)'")
        except re.error as exc:
            raise UsageError(f"--step-regex is not a valid regular expression: {exc}") from exc
    opts = options or OpenOptions()
    arg: list[str | Path] = ([cast(Path, paths)] if isinstance(paths, (str, Path)) or is_remote(paths)
                             else list(paths))
    if not arg:
        raise EmptySeriesError("no paths given", hint="pass a checkpoint folder, a glob, or files")
    found, finals = _expand(arg)
    # FIFOs, devices, sockets, broken links and symlink loops named like checkpoints: reading one would block
    # or fail, so it is skipped with a warning (docs/security.md).
    specials = [p for p in found if not p.is_dir() and not regular_file(p)]
    found = [p for p in found if p not in specials]
    if not found and specials:
        raise EmptySeriesError("not a regular file (FIFO, device, socket, broken link or symlink loop)",
                               hint="point at real checkpoint files", path=specials[0])
    candidates, aliases = find_aliases(found)
    ckpts: list[Checkpoint] = []
    try:
        for path in candidates:
            if progress is not None:
                progress(path)
            ckpts.append(_open_one(path, opts, step_regex))
    except IlrError:
        for c in ckpts:
            c.close()
        raise
    series = Series(ckpts, root=_common_root(candidates), overrides=overrides, aliases=aliases)
    series.warnings += [f"{p}: skipped, not a regular file (FIFO, device, socket, broken link or symlink loop)"
                        for p in specials]
    for a in aliases:
        series.warnings.append(f"{a.path}: {a.describe()}")
    for c in ckpts:
        series.warnings.extend(f"{c.path}: {w}" for w in c.metadata.get("warnings", []))
        if c.metadata.get("hparams_error"):
            how = "partly read" if c.hparams else "not read"  # a partial optimizer-group mapping keeps what is known
            series.warnings.append(f"{c.path}: hyperparameters {how}: {c.metadata['hparams_error']}")
    _order(series)
    for folder in finals:
        _add_final_save(series, folder, opts)
    _check_architecture(series, on_mismatch)
    if read_logs and series.root is not None:
        given = [p for p in (to_path(a) for a in arg if is_url(a)) if is_remote(p)]
        series.logs = _load_logs(series.root, series.warnings, given)
        if series.logs is not None and not series.logs.epoch_scalars.empty:
            _map_epoch_logs(series)
    note = missing_hparams_note(series)
    if note:
        series.warnings.append(note)
    return series


def missing_hparams_note(series: Series) -> str | None:
    """One line naming the parameters (and so the units holding them) left without an intrinsic LR, and the
    flags that supply what the files and logs lack; None when nothing is missing."""

    from .inventory import missing_note

    rows = [{"checkpoint": str(c.path), "parameter": n, "lr": h.lr, "weight_decay": h.weight_decay,
             "momentum": h.momentum, "optimizer": h.optimizer, "wd_mode": h.wd_mode}
            for c in series.checkpoints for n, h in series.hparams_for(c).items()]
    return missing_note(rows) if rows else None


def _map_epoch_logs(series: Series) -> None:
    """Epoch-indexed logs (Keras CSVLogger) join the step axis only when the checkpoints give steps per epoch."""
    from .logs import map_epochs, steps_per_epoch

    assert series.logs is not None
    sources = sorted(set(series.logs.epoch_scalars["source"]))
    per_epoch = steps_per_epoch((c.step, c.metadata.get("epoch")) for c in series.checkpoints)
    if per_epoch is None:
        series.warnings.append(f"{', '.join(sources)}: logged by epoch, and no checkpoint gives both its step and its "
                               "epoch, so the steps per epoch are unknown: not used")
        return
    map_epochs(series.logs, per_epoch)
    series.warnings.append(f"{', '.join(sources)}: logged by epoch; mapped to steps at {per_epoch} steps per epoch "
                           "(from the checkpoints' steps and epochs)")


def _open_one(path: Path, opts: OpenOptions, step_regex: str | None) -> Checkpoint:
    ckpt = detect(path).open(path, opts)
    if ckpt.step is None or step_regex is not None:
        named, pattern = _named_number(path, step_regex)
        stored_epoch = ckpt.metadata.get("epoch")
        if named is not None and pattern in ("hf", "bare-number") and _is_int(stored_epoch) and int(
                float(stored_epoch or 0)) == named:
            # timm's checkpoint-N.pth.tar: N is the epoch the file also stores, not a step; never a step.
            ckpt.metadata["name_is_epoch"] = True
        elif named is not None:
            ckpt.step, ckpt.step_source = named, "name"
    epoch = epoch_from_name(path)
    if epoch is not None:
        ckpt.metadata.setdefault("epoch", epoch)
    return ckpt


def _is_int(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer())


def _add_final_save(series: Series, folder: Path, opts: OpenOptions) -> None:
    """Place the final save at the top of a training output folder (HF ``trainer.save_model()``): the same
    checkpoint as a listed one when the weights are byte-identical; its own point when its ``trainer_state.json``
    gives a step no checkpoint has; otherwise left out with a warning (its step is unknown)."""
    label = (f"{folder}: the top-level model files are the final save (e.g. trainer.save_model()), not a checkpoint-N"
             if folder.is_dir() else
             f"{folder}: a single file beside the series below it, taken as the run's final save (e.g. model.save())")
    for c in series.checkpoints:
        if c.path.is_dir() == folder.is_dir() and same_bytes(folder, c.path):
            step = f" at step {c.step}" if c.step is not None else ""
            series.aliases.append(Alias(folder, c.path, "final save, identical weights"))
            series.warnings.append(f"{label}; identical to {c.path.name}{step}: counted once")
            return
    try:
        final = detect(folder).open(folder, opts)
    except IlrError as exc:
        series.warnings.append(f"{label}; not read: {exc.render()}")
        return
    steps = {c.step for c in series.checkpoints}
    if final.step is not None and final.step not in steps and series.axis == "step":
        final.metadata["final_save"] = True
        series.checkpoints.append(final)
        _order(series)
        where = "its trainer_state.json" if (folder / "trainer_state.json").is_file() else "its files"
        series.warnings.append(f"{label}; included at step {final.step} (from {where})")
        return
    final.close()
    if final.step is not None and final.step in steps and not folder.is_dir():
        why = f"the series already has a checkpoint at its step {final.step}"
    elif final.step is not None and final.step in steps:
        why = f"its weights differ from the checkpoint at step {final.step} (e.g. load_best_model_at_end)"
    else:
        why = "its step is unknown (no trainer_state.json beside it, and no checkpoint has the same weights)"
    series.warnings.append(f"{label}; left out: {why}; pass its weights file explicitly to read it alone")


def _order(series: Series) -> None:
    ckpts = series.checkpoints
    if ckpts and all(c.step is None for c in ckpts) and all(_is_int(c.metadata.get("epoch")) for c in ckpts):
        # No step anywhere, but every file stores its epoch: order by epoch and say the axis is epochs.
        ckpts.sort(key=lambda c: (int(c.metadata["epoch"]), natural_key(c.path.name)))
        for c in ckpts:
            c.step_source = "order"
        if series.axis != "epoch":
            series.axis = "epoch"
            series.warnings.append(
                "no checkpoint stores a training step (and the numbers in the names are the epochs the files "
                "store): the series axis is epochs; steps are left empty and per-step rates are not computed")
        return
    if all(c.step is not None for c in ckpts):
        ckpts.sort(key=lambda c: (c.step, natural_key(c.path.name)))
        steps = [c.step for c in ckpts]
        dupes = sorted({s for s in steps if steps.count(s) > 1 and s is not None})
        if dupes:
            series.warnings.append(
                f"several checkpoints share step(s) {dupes[:5]}: ordered by name within a step"
            )
        return
    if any(c.step is not None for c in ckpts):
        series.warnings.append(
            "some checkpoints have no step (neither stored nor in the name): the series is ordered by name, "
            "and those checkpoints get no step"
        )
    ckpts.sort(key=lambda c: natural_key(str(c.path)))
    for c in ckpts:
        if c.step is None:
            c.step_source = "order"


def _check_architecture(series: Series, on_mismatch: str) -> None:
    if len(series.checkpoints) < 2:
        return
    # The most common parameter signature is the architecture of the series.
    sigs = [_signature(c) for c in series.checkpoints]
    keyed = [tuple(sorted(s.items())) for s in sigs]
    majority = max(set(keyed), key=keyed.count)
    ref = dict(majority)
    kept: list[Checkpoint] = []
    for ckpt, sig, key in zip(series.checkpoints, sigs, keyed, strict=True):
        if key == majority:
            kept.append(ckpt)
            continue
        why = _describe_mismatch(ref, sig)
        if on_mismatch == "stop":
            raise ArchitectureMismatchError(
                f"a different architecture from the rest of the series: {why}",
                hint="remove it, or pass --on-mismatch skip to leave such checkpoints out with a warning",
                path=ckpt.path,
            )
        series.warnings.append(f"skipped {ckpt.path}: different architecture ({why})")
        series.skipped.append((ckpt.path, why))
        ckpt.close()
    series.checkpoints = kept


def _load_logs(root: Path, warnings: list[str], given: Sequence[Path] = ()) -> LogData | None:
    try:
        from . import logs
    except ImportError:  # the logs package is optional at import time during development
        return None
    try:
        if is_remote(root):  # logs are small: copy the candidates under the URL prefix, then read them locally
            root = _stage_logs(root, warnings, given)
        found = logs.discover(root)
        if not found:
            return None
        data = logs.read_logs(found, root=root)
    except IlrError as exc:
        warnings.append(f"training logs not read: {exc.render()}")
        return None
    warnings.extend(data.warnings)
    return data


_LOG_MAX_BYTES = 64 * 1024 * 1024  # a log or sidecar bigger than this is not copied from remote storage


def _stage_logs(root: Path, warnings: list[str], given: Sequence[Path]) -> Path:
    """Copy the log and sidecar files under a remote ``root``, and under its parent as the local search does when
    that parent is still inside a URL prefix the user gave (never above it), into a private temporary folder with
    the same layout; the local log readers then read that copy. Returns the copy of ``root``."""
    from .logs import _LOG_CSV, _MAX_DEPTH, _SKIP_DIRS, sidecar
    from .storage import stage_tree

    def wanted(name: str) -> bool:
        return (name == "trainer_state.json" or name.startswith("events.out.tfevents.") or name in _LOG_CSV
                or name.endswith((".csv", ".log", ".jsonl", ".ndjson")) or name in sidecar.NAMES)

    top = root.parent if any(inside(root.parent, g) for g in given) else root
    picked: list[Path] = []
    base = len(top.parts)
    for here, dirnames, filenames in walk(top):
        depth = len(here.parts) - base
        dirnames[:] = [] if depth >= _MAX_DEPTH + (top != root) else [d for d in dirnames if d not in _SKIP_DIRS
                                                      and not d.startswith(".")]
        for f in filenames:
            if wanted(f):
                if (here / f).stat().st_size > _LOG_MAX_BYTES:
                    warnings.append(f"{here / f}: larger than {_LOG_MAX_BYTES} bytes: not copied, not read")
                else:
                    picked.append(here / f)
    local = stage_tree(picked, top)
    if top != root:
        local = local / str(root.relative_to(top))
        local.mkdir(parents=True, exist_ok=True)
    return local


def with_overrides(
    lr: float | None = None, wd: float | None = None, momentum: float | None = None, optimizer: str | None = None
) -> HParams | None:
    """CLI overrides as one HParams record (None when nothing was overridden)."""
    if lr is None and wd is None and momentum is None and optimizer is None:
        return None
    family = optimizer.lower() if optimizer else None
    # "decoupledadamw" is Composer's DecoupledAdamW: weight decay not multiplied by the lr (wd_mode "unscaled").
    modes = {"sgd": "coupled", "adam": "coupled", "adamw": "decoupled", "lion": "decoupled", "sgdw": "decoupled",
             "decoupledadamw": "unscaled"}
    names = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "lion": "Lion", "sgdw": "SGDW",
             "decoupledadamw": "DecoupledAdamW"}
    if family is not None and family not in modes:
        raise UsageError(f"--optimizer must be one of {', '.join(modes)}, not {optimizer!r}")
    hp = HParams(lr=lr, weight_decay=wd, momentum=momentum, source="cli", lr_timing="used")
    if family is not None:
        hp = replace(hp, optimizer=names[family], wd_mode=modes[family])  # type: ignore[arg-type]
    return hp


# What every public function accepts as a series: an open Series (borrowed, left open), checkpoints already opened
# (left open), or paths / a glob / one folder (opened and closed here).
SeriesSource = Series | Sequence[Checkpoint] | Sequence[str | Path] | str | Path


@contextmanager
def borrow(
    source: SeriesSource,
    options: OpenOptions | None = None,
    *,
    step_regex: str | None = None,
    on_mismatch: Literal["stop", "skip"] = "stop",
    overrides: HParams | None = None,
    read_logs: bool = True,
) -> Iterator[Series]:
    """The series behind ``source`` for the duration of a ``with`` block; closes only what it opened itself.

    A single ``str`` or ``Path`` is one path (a folder, a file or a glob), never a sequence of characters.
    """
    if isinstance(source, Series) or hasattr(source, "checkpoints"):  # a Series, or an object shaped like one
        yield cast(Series, source)
        return
    items: list[Any] = [source] if isinstance(source, (str, Path)) or is_remote(source) else list(source)
    if items and all(isinstance(c, Checkpoint) for c in items):
        yield Series(items, root=_common_root([c.path for c in items]), overrides=overrides)
        return
    with open_series(items, options, step_regex=step_regex, on_mismatch=on_mismatch, overrides=overrides,
                     read_logs=read_logs) as series:
        yield series
