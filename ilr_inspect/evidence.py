"""The model and probe that go with a series: what the user named, what sits beside the checkpoints, loaded once.

Policy (docs/security.md): code is only run when the user names it. A ``model.py``, a torch.export ``.pt2`` or a
TorchScript file found beside the checkpoints is never loaded on its own; it is only named in hints so the user
can pass it with ``--model``. Data files (``probe.npz``, ``probe.pt`` read without pickled code) may be found and
used. Importing this module is cheap: torch is imported only when a model or probe is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelError, ProbeError, UsageError

if TYPE_CHECKING:
    import torch

    from .probe import Probe
    from .series import Series

MODEL_SUFFIXES = (".pt2", ".pt", ".pth", ".ts", ".torchscript", ".jit")
PROBE_NAMES = ("probe.npz", "probe.pt")


def search_dirs(candidates: Sequence[Path]) -> list[Path]:
    """The checkpoints' folder and the one above it (runs/x/model.py beside runs/x/ckpts/)."""
    if not candidates:
        return []
    root = candidates[0].resolve().parent
    return [root, root.parent]


def find_model(candidates: Sequence[Path]) -> Path | None:
    """A step-less .pt2 / TorchScript file beside the checkpoints or one folder up — for hints only."""
    from .models import is_torch_export, is_torchscript
    from .series import step_from_name

    for d in search_dirs(candidates):
        for f in sorted(d.iterdir()):
            if f.is_file() and f.suffix in MODEL_SUFFIXES and step_from_name(f) is None and (
                is_torch_export(f) or is_torchscript(f)
            ):
                return f
    return None


def model_hint(candidates: Sequence[Path]) -> str | None:
    """What to pass as ``--model``: a model file or ``model.py:build`` found beside the checkpoints, if any."""
    found = find_model(candidates)
    if found is not None:
        return str(found)
    for d in search_dirs(candidates):
        py = d / "model.py"
        if py.is_file() and "def build" in py.read_text(errors="replace"):
            return f"{py}:build"
    return None


def find_probe(candidates: Sequence[Path]) -> Path | None:
    for d in search_dirs(candidates):
        for name in PROBE_NAMES:
            if (d / name).is_file():
                return d / name
    return None


def without_model_file(candidates: list[Path], model: str | None) -> list[Path]:
    """A model file sitting among the checkpoints is not itself a checkpoint of the series."""
    if model is None or not Path(model).is_file():
        return candidates
    target = Path(model).resolve()
    return [c for c in candidates if c.resolve() != target]


@dataclass
class Evidence:
    """What the detectors and the distance computation may use, with where each piece came from."""

    model_spec: str | None = None
    probe_spec: str | None = None
    probe_found: bool = False  # the probe was found beside the checkpoints, not named
    model: torch.nn.Module | None = None
    probe: Probe | None = None
    graph: Any = None
    param_names: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def detect_kwargs(self, probe_size: int) -> dict[str, Any]:
        """Keyword arguments for :func:`ilr_inspect.invariance.detect_units`."""
        kw: dict[str, Any] = {"graph": self.graph}
        if self.model is not None:
            kw["model"] = self.model
            kw["param_names"] = self.param_names
        if self.model is not None and self.probe is not None:
            kw["probe"] = self.probe.inputs[:probe_size]
        return kw


def no_model_error(candidates: Sequence[Path]) -> ModelError:
    named = model_hint(candidates)
    hint = (f"found {named}; pass --model {named} to use it (model code is only run when you name it)"
            if named else "pass --model model.py:build (or a .pt2 / TorchScript file)")
    return ModelError("no --model given", hint=hint)


def locate(candidates: Sequence[Path], model: str | None, probe: str | None) -> Evidence:
    """Name the model and probe to use without loading anything; the probe may be found beside the series."""
    ev = Evidence(model_spec=model, probe_spec=probe)
    if probe is None and model is not None:
        found = find_probe(candidates)
        if found is not None:
            ev.probe_spec, ev.probe_found = str(found), True
            ev.notes.append(f"probe: {found} (found next to the checkpoints)")
    return ev


def for_distance(candidates: Sequence[Path], model: str | None, probe: str | None) -> Evidence:
    """Model and probe for function-space distances, both loaded (fails fast, before any checkpoint is read)."""
    if model is None:
        raise no_model_error(candidates)
    ev = locate(candidates, model, probe)
    if ev.probe_spec is None:
        raise ProbeError("no --probe given and no probe.npz next to the checkpoints",
                         hint="pass --probe data.npz (arrays x and optional y)")
    from .models import build_model
    from .probe import load_probe

    ev.model = build_model(model)
    ev.probe = load_probe(ev.probe_spec)
    return ev


def for_detection(series: Series, model: str | None, probe: str | None, graph: Path | None) -> Evidence:
    """The graph / functional evidence for unit detection: the model loaded with the first checkpoint's weights."""
    cks = series.checkpoints
    ev = locate([c.path for c in cks], model, probe)
    if graph is not None:
        ev.graph = _graph_from_file(graph)
    if model is None and cks:
        found = find_model([c.path for c in cks])  # never used unless named: a .pt2/TorchScript file is code too
        if found is not None:
            ev.notes.append(f"note: found {found}; pass --model {found} to use it")
    if model is None:
        if probe is not None:
            raise UsageError("--probe needs a model", hint="pass --model model.py:build (or a .pt2 file)")
        return ev
    if not cks:
        return ev
    from .models import build_model, is_torch_export, load_weights

    ev.model = build_model(model)
    ev.param_names = dict(load_weights(ev.model, cks[0]).mapping)
    if ev.graph is None and Path(model).is_file() and is_torch_export(Path(model)):
        ev.graph = Path(model)
    if ev.probe_spec is not None:
        from .probe import load_probe

        ev.probe = load_probe(ev.probe_spec)
    return ev


def _graph_from_file(path: Path) -> Any:
    if path.suffix.lower() == ".onnx":
        from .invariance.onnx_graph import load_onnx_graph

        return load_onnx_graph(path)
    return path


__all__ = ["Evidence", "find_model", "find_probe", "for_detection", "for_distance", "locate", "model_hint",
           "no_model_error", "search_dirs", "without_model_file"]
