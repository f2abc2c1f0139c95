"""Build a model from a spec and put a checkpoint's tensors into it.

Specs: ``path/to/model.py:build`` (a file imported by path), ``pkg.mod:factory`` (importable), a torch.export
``.pt2`` file, a TorchScript file, ``timm:<name>`` / ``torchvision:<name>``, or a Hugging Face folder holding
``config.json`` (built from the config, nothing downloaded). The model is built once; each checkpoint's tensors are
matched to its state-dict keys (wrapper prefixes such as ``module.``, ``_orig_mod.`` and Lightning attribute paths
normalised) and swapped in with ``torch.func.functional_call`` — the module is never rebuilt per checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .checkpoint import Checkpoint
from .errors import IlrError, ModelError, UsageError, require

if TYPE_CHECKING:  # torch is imported where a model is used: a safetensors series never needs it
    import torch

# Buffers a model may have that checkpoints often lack (or carry needlessly): never worth an error.
_IGNORABLE_LEAVES = frozenset({"num_batches_tracked"})
# Wrapper prefixes added by DDP/DataParallel; ``_orig_mod`` (torch.compile) can sit at any depth.
_WRAPPER_PREFIXES = ("module.",)
_WRAPPER_COMPONENTS = frozenset({"_orig_mod"})
_PREFERRED_ATTRS = ("model", "net", "network", "module", "student")
_SHOWN = 40  # keys listed per category in an error; the count is always complete


# --------------------------------------------------------------------------------------------------- building


def _fail(spec: str, exc: BaseException, doing: str, error: type[IlrError] = ModelError) -> IlrError:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return error(
        f"{doing} {spec!r} failed: {type(exc).__name__}{': ' + msg if msg else ''}",
        hint="fix the factory (run it directly in Python to see the traceback) or pass another --model",
    )


def _import_file(path: Path, error: type[IlrError] = ModelError) -> Any:
    """Import a Python file by path (its folder goes on sys.path so sibling imports work)."""
    name = f"_ilr_user_{path.stem}_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise error("cannot import this file as Python", path=path)
    mod = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    except (Exception, SystemExit) as exc:  # user code that calls sys.exit is a model error, not our exit
        sys.modules.pop(name, None)
        raise _fail(str(path), exc, "importing", error) from None
    finally:
        if added:
            sys.path.remove(folder)
    return mod


def resolve_callable(
    spec: str, *, base_dir: Path | None = None, what: str = "model", error: type[IlrError] = ModelError
) -> Callable[..., Any]:
    """``file.py:fn`` or ``pkg.mod:fn`` → the callable (imports user code); failures raise ``error``."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise UsageError(f"{what} spec {spec!r} is not of the form module:function or file.py:function")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_absolute() and not path.exists() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise error(f"{what} file {target!r} not found", hint="give a path to an existing .py file", path=path)
        mod = _import_file(path, error)
    else:
        try:
            mod = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise error(
                f"cannot import {target!r} for the {what} spec {spec!r}: {exc}",
                hint="install the package, or use file.py:function to import a file by path",
            ) from None
        except Exception as exc:
            raise _fail(target, exc, "importing", error) from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise error(
            f"{target!r} has no callable named {attr!r}",
            hint=f"define def {attr}(): ... there, or name another function after the colon",
        )
    return fn  # type: ignore[no-any-return]


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive, as the format registry recognises it (the one detection; see formats/__init__.py)."""
    from .formats import sniffed

    return sniffed(path) == "torchscript"


def is_torch_export(path: Path) -> bool:
    """A torch.export ``.pt2`` archive, as the format registry recognises it."""
    from .formats import sniffed

    return sniffed(path) == "torch.export"


def _huggingface(folder: Path) -> torch.nn.Module:
    transformers: Any = require("transformers", "hf", "building a Hugging Face model from config.json")
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ModelError(f"config.json could not be read: {exc}", path=folder) from None
    errors = []
    for auto in ("AutoModelForImageClassification", "AutoModelForSequenceClassification", "AutoModel"):
        try:
            return getattr(transformers, auto).from_config(config)  # type: ignore[no-any-return]
        except (ValueError, KeyError) as exc:  # this auto class does not cover the config's model type
            errors.append(f"{auto}: {str(exc).splitlines()[0]}")
    raise ModelError("no transformers auto class builds this config: " + "; ".join(errors), path=folder)


def build_model(spec: str, *, base_dir: Path | None = None, trust_code: bool = True) -> torch.nn.Module:
    """Build the model a spec names, in eval mode on the CPU (see the module docstring for spec forms)."""
    import torch
    if spec.startswith(("timm:", "torchvision:")):
        lib, _, name = spec.partition(":")
        if lib == "timm":
            timm: Any = require("timm", "timm", f"the model spec {spec!r}")
            make: Callable[[], Any] = lambda: timm.create_model(name, pretrained=False)  # noqa: E731
        else:
            tv: Any = require("torchvision", "torchvision", f"the model spec {spec!r}")
            make = lambda: tv.models.get_model(name, weights=None)  # noqa: E731
        try:
            module = make()
        except Exception as exc:
            raise _fail(spec, exc, "building") from None
        return _checked(module, spec)

    path = Path(spec)
    if not path.is_absolute() and not path.exists() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError("a model folder needs a config.json (Hugging Face layout)", path=path)
        return _checked(_huggingface(path), spec)
    if path.is_file():
        if is_torch_export(path):
            try:
                return _checked(torch.export.load(str(path)).module(), spec)
            except Exception as exc:
                raise ModelError(f"torch.export.load failed: {exc}", path=path) from None
        if is_torchscript(path):
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the user's file is TorchScript
                    loaded = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
                return _checked(loaded, spec)
            except Exception as exc:
                raise ModelError(f"torch.jit.load failed: {exc}", path=path) from None
        raise ModelError(
            "not a model file: expected a torch.export .pt2 or a TorchScript archive",
            hint="for Python code use --model file.py:function",
            path=path,
        )
    if ":" not in spec:
        raise ModelError(
            f"model spec {spec!r} is neither an existing file/folder nor module:function",
            hint="examples: model.py:build, mypkg.nets:resnet20, model.pt2, timm:resnet18",
        )
    if not trust_code:
        raise UsageError(f"the model spec {spec!r} runs Python code; it is refused here (trust_code=False)")
    factory = resolve_callable(spec, base_dir=base_dir, what="model")
    try:
        module = factory()
    except (Exception, SystemExit) as exc:  # a factory that calls sys.exit is a model error, not our exit
        raise _fail(spec, exc, "the model factory") from None
    return _checked(module, spec)


def _checked(module: Any, spec: str) -> torch.nn.Module:
    import torch
    if not isinstance(module, torch.nn.Module):
        raise ModelError(
            f"the model spec {spec!r} gave a {type(module).__name__}, not a torch.nn.Module",
            hint="the factory must return the network itself",
        )
    with contextlib.suppress(NotImplementedError):  # torch.export modules keep the mode they were exported in
        module.eval()
    return module


def model_kind(module: torch.nn.Module) -> str:
    """``eager`` (functional_call works and normalizers are visible), ``torchscript`` or ``export``."""
    import torch
    if isinstance(module, torch.jit.ScriptModule):
        return "torchscript"
    if isinstance(module, torch.fx.GraphModule) and any(
        n.op == "placeholder" and "val" in n.meta for n in module.graph.nodes
    ):
        return "export"
    return "eager"


def expected_input(module: torch.nn.Module) -> str | None:
    """What input the model wants, as far as it can be read off the model (for probe-shape errors)."""
    import torch
    if model_kind(module) == "export":
        assert isinstance(module, torch.fx.GraphModule)
        shapes = [tuple(n.meta["val"].shape) for n in module.graph.nodes if n.op == "placeholder" and "val" in n.meta]
        if shapes:
            return f"{shapes[0]} (the input the .pt2 was exported with)"
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            dims = len(m.kernel_size)
            tail = ", ".join(["H", "W", "D"][:dims]) if dims <= 3 else "…"
            layer = f"first layer {name}: {type(m).__name__} with in_channels={m.in_channels}"
            return f"(N, {m.in_channels}, {tail}) ({layer})"
        if isinstance(m, torch.nn.Linear):
            return f"(N, {m.in_features}) (first layer {name}: Linear with in_features={m.in_features})"
        if isinstance(m, torch.nn.Embedding):
            return f"(N, T) integer token ids below {m.num_embeddings} (first layer {name}: Embedding)"
    return None


# --------------------------------------------------------------------------------------------- key matching


def _canonical(name: str) -> str:
    for p in _WRAPPER_PREFIXES:
        while name.startswith(p):
            name = name[len(p):]
    return ".".join(c for c in name.split(".") if c not in _WRAPPER_COMPONENTS)


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


@dataclass
class LoadReport:
    """How checkpoint tensors map onto the model's state-dict keys."""

    mapping: dict[str, str]  # model state-dict key → checkpoint tensor name
    transform: str  # how names were rewritten, in words
    ignored: list[str] = field(default_factory=list)  # checkpoint tensors not used (other attributes, counters)
    kept: list[str] = field(default_factory=list)  # model keys left at the model's value (counters, tied aliases)

    def describe(self) -> str:
        parts = [f"{len(self.mapping)} tensors matched ({self.transform})"]
        if self.ignored:
            parts.append(f"{len(self.ignored)} checkpoint tensors ignored")
        if self.kept:
            parts.append(f"{len(self.kept)} model buffers/aliases kept")
        return ", ".join(parts)


def _state_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}


def _aliases(module: torch.nn.Module) -> dict[str, set[str]]:
    """State-dict keys that name the same tensor (tied weights): any one of them suffices."""
    groups: dict[int, set[str]] = {}
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(t), set()).add(name)
    return {n: g for g in groups.values() if len(g) > 1 for n in g}


def _candidates(ck_names: list[str], mod_names: list[str]) -> list[tuple[str, Callable[[str], str | None]]]:
    out: list[tuple[str, Callable[[str], str | None]]] = [("names as stored", lambda n: n)]
    # Known wrapper attributes first, so that a tie (a Lightning module holding `model.*` and `ema.*`) picks the model.
    rank = {p: i for i, p in enumerate(_PREFERRED_ATTRS)}
    firsts = sorted({n.split(".", 1)[0] for n in ck_names if "." in n}, key=lambda p: (rank.get(p, len(rank)), p))
    for p in firsts:
        pre = p + "."
        out.append((f"stripped prefix {pre!r}", lambda n, pre=pre: n[len(pre):] if n.startswith(pre) else None))  # type: ignore[misc]
    for q in sorted({n.split(".", 1)[0] for n in mod_names if "." in n}):
        pre = q + "."
        out.append((f"added prefix {pre!r}", lambda n, pre=pre: pre + n))  # type: ignore[misc]
    return out


def match_keys(module: torch.nn.Module, checkpoint: Checkpoint) -> LoadReport:
    """Map checkpoint tensor names onto the module's state-dict keys, or raise listing every mismatch."""
    shapes = _state_shapes(module)
    mod_by_canon = {_canonical(k): k for k in shapes}
    ck_infos = checkpoint.tensors
    ck_by_canon: dict[str, str] = {}
    for n in ck_infos:
        ck_by_canon.setdefault(_canonical(n), n)
    best: tuple[int, str, Callable[[str], str | None]] | None = None
    also: list[str] = []
    for desc, fn in _candidates(list(ck_by_canon), list(mod_by_canon)):
        hits = sum(1 for c in ck_by_canon if (t := fn(c)) is not None and t in mod_by_canon)
        if best is None or hits > best[0]:
            best, also = (hits, desc, fn), []
        elif hits == best[0] and hits > 0:
            also.append(desc)
    assert best is not None
    _, transform, fn = best
    if also:
        transform += f" (equally good: {', '.join(also)})"

    mapping: dict[str, str] = {}
    ignored: list[str] = []
    unexpected: list[str] = []
    for canon, ck_name in ck_by_canon.items():
        target = fn(canon)
        if target is None:  # outside the namespace that holds the model (e.g. a Lightning EMA copy)
            ignored.append(ck_name)
        elif target in mod_by_canon:
            mapping[mod_by_canon[target]] = ck_name
        elif _leaf(ck_name) in _IGNORABLE_LEAVES:
            ignored.append(ck_name)
        else:
            unexpected.append(ck_name)
    aliases = _aliases(module)
    kept: list[str] = []
    missing: list[str] = []
    for key in shapes:
        if key in mapping:
            continue
        if _leaf(key) in _IGNORABLE_LEAVES or any(a in mapping for a in aliases.get(key, ())):
            kept.append(key)
        else:
            missing.append(key)
    mismatched = [
        f"{k} (model {shapes[k]}, checkpoint {ck_infos[c].shape})"
        for k, c in mapping.items()
        if tuple(ck_infos[c].shape) != shapes[k] and _leaf(k) not in _IGNORABLE_LEAVES
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing from the checkpoint", missing), ("not in the model", unexpected),
                            ("with other shapes", mismatched)):
            if keys:
                shown = ", ".join(keys[:_SHOWN]) + (f", … ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        raise ModelError(
            f"the model does not match the checkpoint ({len(mapping)} of {len(shapes)} model keys matched, "
            f"{transform}); " + "; ".join(parts),
            hint="pass the --model that was trained (same architecture and configuration)",
            path=checkpoint.path,
        )
    for k, c in list(mapping.items()):
        if _leaf(k) in _IGNORABLE_LEAVES and tuple(ck_infos[c].shape) != shapes[k]:
            del mapping[k]
            kept.append(k)
    return LoadReport(mapping=mapping, transform=transform, ignored=sorted(ignored), kept=sorted(kept))


def _to_tensor(arr: np.ndarray, like: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    import torch
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # a read-only map of the checkpoint: torch wants memory it may write
        arr = arr.copy()
    t = torch.from_numpy(arr)
    return t.to(device=device or like.device, dtype=like.dtype).reshape(like.shape)


def checkpoint_tensors(
    module: torch.nn.Module,
    checkpoint: Checkpoint,
    report: LoadReport | None = None,
    *,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors keyed by the module's state-dict names, in the module's dtypes, for
    ``torch.func.functional_call``. Pass the ``report`` from :func:`match_keys` to skip re-matching."""
    import torch
    rep = report or match_keys(module, checkpoint)
    state = module.state_dict(keep_vars=True)
    dev = torch.device(device) if device is not None else None
    return {key: _to_tensor(checkpoint.read(name), state[key], dev) for key, name in rep.mapping.items()}


def load_weights(module: torch.nn.Module, checkpoint: Checkpoint, report: LoadReport | None = None) -> LoadReport:
    """Copy the checkpoint's tensors into the module in place (works for TorchScript too)."""
    import torch
    rep = report or match_keys(module, checkpoint)
    state = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, name in rep.mapping.items():
            state[key].copy_(_to_tensor(checkpoint.read(name), state[key], None))
    return rep


def tensors_from_mapping(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy ready tensors into the module in place (the swap used where functional_call is unavailable)."""
    import torch
    state = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, t in tensors.items():
            state[key].copy_(t)
