"""A checkpoint series: expand user paths, open each checkpoint's headers, order by training step, and merge the
hyperparameter timeline from optimizer state, logs, sidecar files and command-line overrides."""

from __future__ import annotations

import glob
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .checkpoint import Checkpoint, HParams
from .errors import ArchitectureMismatchError, EmptySeriesError, IlrError, InputError, UsageError
from .formats import REGISTRY, OpenOptions, detect, load_format

if TYPE_CHECKING:
    from .logs import LogData

# File extensions that are meant to be checkpoints: a bad one is an error, not something to skip silently.
CHECKPOINT_SUFFIXES = frozenset(
    {".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".pt2", ".onnx", ".keras", ".h5", ".msgpack", ".npz", ".tar"}
)
# Files that live next to checkpoints but are never checkpoints themselves.
_NOT_CHECKPOINTS = frozenset(
    {"optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", "training_args.bin", "probe.npz",
     "train.npz", "test.npz", "data.npz", "model.pt2", "model.ts"}
)
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
    stem = path.name
    while True:  # strip compound suffixes such as .pth.tar
        suffix = next((s for s in sorted(CHECKPOINT_SUFFIXES, key=len, reverse=True) if stem.endswith(s)), None)
        if suffix is None:
            break
        stem = stem[: -len(suffix)]
    if step_regex:
        m = re.search(step_regex, path.name)
        return int(m.group(1)) if m else None
    for _name, pattern in _STEP_PATTERNS:
        m = pattern.search(stem)
        if m:
            return int(m.group(1))
    return None


def epoch_from_name(path: Path) -> int | None:
    m = _EPOCH_PATTERN.search(path.name)
    return int(m.group(1)) if m else None


def _is_checkpoint_folder(path: Path) -> bool:
    return any(load_format(name).sniff(path) for name in _FOLDER_FORMATS if name in REGISTRY)


def _children(folder: Path) -> tuple[list[Path], list[Path]]:
    subdirs, files = [], []
    for child in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if child.name.startswith(".") or child.name in _NOT_CHECKPOINTS:
            continue
        if child.is_dir():
            if _is_checkpoint_folder(child):
                subdirs.append(child)
        elif child.suffix.lower() in CHECKPOINT_SUFFIXES:
            files.append(child)
    return subdirs, files


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Directories, globs and explicit paths → candidate checkpoint files/folders (unordered duplicates removed)."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists() and any(ch in str(raw) for ch in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(str(raw), recursive=True), key=natural_key)]
            if not matches:
                raise EmptySeriesError(f"the pattern {raw!r} matches nothing", hint="check the glob (quote it)")
            out.extend(m for m in matches if m.is_dir() or m.suffix.lower() in CHECKPOINT_SUFFIXES or m.is_file())
            continue
        if not p.exists():
            raise InputError("no such file or folder", hint="check the path", path=p)
        if p.is_file():
            out.append(p)
            continue
        subdirs, files = _children(p)
        if subdirs or files:
            out.extend(subdirs + files)
        elif _is_checkpoint_folder(p):
            out.append(p)
        else:
            # Common layouts put checkpoints one or two levels down (lightning_logs/version_0/checkpoints/).
            nested = [q for q in sorted(p.rglob("*"), key=lambda q: natural_key(str(q)))
                      if q.is_file() and q.suffix.lower() in CHECKPOINT_SUFFIXES and q.name not in _NOT_CHECKPOINTS
                      and len(q.relative_to(p).parts) <= 4 and not any(s.startswith(".") for s in q.parts)]
            if not nested:
                raise EmptySeriesError(
                    "no checkpoint files or folders found here",
                    hint="point at the folder holding the checkpoints, a glob, or the files themselves",
                    path=p,
                )
            out.extend(nested)
    seen: set[Path] = set()
    unique = []
    for q in out:
        r = q.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(q)
    return unique


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

    def close(self) -> None:
        for c in self.checkpoints:
            c.close()

    def __enter__(self) -> Series:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    arg = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not arg:
        raise EmptySeriesError("no paths given", hint="pass a checkpoint folder, a glob, or files")
    candidates = expand_paths(arg)
    ckpts: list[Checkpoint] = []
    try:
        for path in candidates:
            if progress is not None:
                progress(path)
            fmt = detect(path)
            ckpt = fmt.open(path, opts)
            if ckpt.step is None or step_regex is not None:
                named = step_from_name(path, step_regex)
                if named is not None:
                    ckpt.step, ckpt.step_source = named, "name"
            epoch = epoch_from_name(path)
            if epoch is not None:
                ckpt.metadata.setdefault("epoch", epoch)
            ckpts.append(ckpt)
    except IlrError:
        for c in ckpts:
            c.close()
        raise
    series = Series(ckpts, root=_common_root(candidates), overrides=overrides)
    for c in ckpts:
        series.warnings.extend(f"{c.path}: {w}" for w in c.metadata.get("warnings", []))
        if c.metadata.get("hparams_error"):
            series.warnings.append(f"{c.path}: hyperparameters not read: {c.metadata['hparams_error']}")
    _order(series)
    _check_architecture(series, on_mismatch)
    if read_logs and series.root is not None:
        series.logs = _load_logs(series.root, series.warnings)
    return series


def _order(series: Series) -> None:
    ckpts = series.checkpoints
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


def _load_logs(root: Path, warnings: list[str]) -> LogData | None:
    try:
        from . import logs
    except ImportError:  # the logs package is optional at import time during development
        return None
    try:
        found = logs.discover(root)
        if not found:
            return None
        data = logs.read_logs(found, root=root)
    except IlrError as exc:
        warnings.append(f"training logs not read: {exc.render()}")
        return None
    warnings.extend(data.warnings)
    return data


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
