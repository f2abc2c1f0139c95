"""`distance`: function-space distances between checkpoints (no torch import until the command runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ModelError, ProbeError
from .app import app
from .common import (
    EmaOpt,
    FormatOpt,
    KeyOpt,
    OnMismatchOpt,
    OutOpt,
    PathsArg,
    QuietOpt,
    StepRegexOpt,
    TrustOpt,
    emit,
    open_series_from_cli,
    print_warnings,
    stderr,
)

BN_MODE_HELP = (
    "auto | recalibrate | eval | train. How BatchNorm-style normalizers are evaluated. recalibrate (what auto "
    "picks for models built from Python): reset the running statistics and re-estimate them on the probe set "
    "for each checkpoint, then evaluate — saved running statistics lag the weights (an EMA over past batches), "
    "so this compares the functions the weights define on equal terms. eval: each checkpoint's saved running "
    "statistics (the model as deployed). train: per-batch statistics (depends on --batch-size). TorchScript "
    "allows eval/train (auto = eval); a torch.export .pt2 runs as exported."
)
_MODEL_SUFFIXES = (".pt2", ".pt", ".pth", ".ts", ".torchscript", ".jit")
_TABLE = ["step_a", "step_b", "disagreement", "tv", "kl_ab", "kl_ba", "accuracy_a", "accuracy_b", "l2", "cosine"]
_TABLE_REPLICAS = ["step_a", "group_a", "group_b", "replicas_a", "replicas_b", "l1", "l1_half", "noise_floor",
                   "above_floor", "accuracy_a", "accuracy_b"]


def _search_dirs(candidates: list[Path]) -> list[Path]:
    """The checkpoints' folder and the one above it (runs/x/model.py beside runs/x/ckpts/)."""
    if not candidates:
        return []
    root = candidates[0].resolve().parent
    return [root, root.parent]


def discover_model(candidates: list[Path]) -> Path | None:
    """A step-less .pt2 / TorchScript file next to the checkpoints or one folder up.

    A ``model.py`` is never picked up on its own: running Python found beside downloaded checkpoints would be
    the same risk as an untrusted pickle. :func:`model_py_hint` names it so the user can pass it explicitly.
    """
    from ..models import is_torch_export, is_torchscript
    from ..series import step_from_name

    for d in _search_dirs(candidates):
        for f in sorted(d.iterdir()):
            if f.is_file() and f.suffix in _MODEL_SUFFIXES and step_from_name(f) is None and (
                is_torch_export(f) or is_torchscript(f)
            ):
                return f
    return None


def model_py_hint(candidates: list[Path]) -> str | None:
    """``path/model.py:build`` when such a file sits next to the checkpoints (for messages only)."""
    for d in _search_dirs(candidates):
        py = d / "model.py"
        if py.is_file() and "def build" in py.read_text(errors="replace"):
            return f"{py}:build"
    return None


def discover_probe(candidates: list[Path]) -> Path | None:
    for d in _search_dirs(candidates):
        for name in ("probe.npz", "probe.pt"):
            if (d / name).is_file():
                return d / name
    return None


@app.command("distance")
def distance_cmd(
    paths: PathsArg,
    model: Annotated[str | None, typer.Option(
        "--model", "-m",
        help="model.py:build, pkg.mod:factory, a .pt2 / TorchScript file, timm:NAME, torchvision:NAME, or a "
             "Hugging Face folder with config.json. Default: a step-less .pt2/TorchScript file or a model.py "
             "with build() next to the checkpoints.")] = None,
    probe: Annotated[str | None, typer.Option(
        "--probe", "-p",
        help=".npz (x / y), .pt, an image folder (labels from subfolders) or module:function. "
             "Default: probe.npz next to the checkpoints.")] = None,
    pairs: Annotated[str, typer.Option(
        "--pairs", help="consecutive | all (every i < j) | reference (every checkpoint vs --reference).")]
        = "consecutive",
    reference: Annotated[int | None, typer.Option(
        "--reference", help="Step of the reference checkpoint for --pairs reference (default: the last).")] = None,
    bn_mode: Annotated[str, typer.Option("--bn-mode", help=BN_MODE_HELP)] = "auto",
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | mps | auto.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Probe examples per forward pass.")] = 256,
    group_by: Annotated[str | None, typer.Option(
        "--group-by",
        help="Replicated runs: a regex whose first group names each checkpoint's condition (or 'folder' = the "
             "folder above each run folder). Conditions are compared step by step with the ℓ1 distance between "
             "empirical label distributions, against the replica-vs-replica noise floor.")] = None,
    outputs: Annotated[str, typer.Option(
        "--outputs", help="auto | logits | values. auto: 2-D outputs with ≥ 2 columns are class logits; values: "
                          "regression/feature outputs, compared by l2 and cosine only.")] = "auto",
    fmt: FormatOpt = "table",
    output: OutOpt = None,
    trust_pickle: TrustOpt = False,
    key: KeyOpt = None,
    ema: EmaOpt = False,
    step_regex: StepRegexOpt = None,
    on_mismatch: OnMismatchOpt = "stop",
    quiet: QuietOpt = False,
) -> None:
    """Function-space distances between checkpoints on a fixed probe set: top-1 disagreement, total variation
    and KL (both ways) of the softmax outputs, accuracy of each side; l2/cosine for non-classifiers.

    Each checkpoint is run over the probe once (outputs cached), so --pairs all over N checkpoints costs N passes.
    Example: ilr-inspect distance runs/x/ckpts --model model.py:build --probe probe.npz --pairs all -f csv
    """
    from ..series import expand_paths

    candidates = expand_paths(paths)
    model_spec: str | Path | None = model
    if model_spec is None:
        model_spec = discover_model(candidates)
        if model_spec is None:
            named = model_py_hint(candidates)
            hint = (f"pass --model {named} to use the model.py found there (code is only run when you name it)"
                    if named else "pass --model model.py:build (or a .pt2 / TorchScript file)")
            raise ModelError("no --model given and no .pt2 / TorchScript model found next to the checkpoints",
                             hint=hint)
        if not quiet:
            stderr.print(f"model: {model_spec} (found next to the checkpoints)", markup=False)
    # A model file sitting among the checkpoints is not itself a checkpoint of the series.
    if Path(str(model_spec)).is_file():
        model_file = Path(str(model_spec)).resolve()
        candidates = [c for c in candidates if c.resolve() != model_file]
    probe_spec: str | Path | None = probe
    if probe_spec is None:
        probe_spec = discover_probe(candidates)
        if probe_spec is None:
            raise ProbeError("no --probe given and no probe.npz next to the checkpoints",
                             hint="pass --probe data.npz (arrays x and optional y)")
        if not quiet:
            stderr.print(f"probe: {probe_spec} (found next to the checkpoints)", markup=False)

    from ..function_space import distance
    from ..models import build_model
    from ..probe import load_probe

    # Model and probe first: a broken factory or probe fails fast, before any checkpoint is read.
    module = build_model(str(model_spec))
    probe_obj = load_probe(probe_spec)
    series = open_series_from_cli([str(c) for c in candidates], trust_pickle=trust_pickle, key=key, ema=ema,
                                  step_regex=step_regex, on_mismatch=on_mismatch, quiet=quiet, read_logs=False)
    with series:
        # Option strings (pairs, bn_mode, outputs) are validated by the library.
        result = distance(series, module, probe_obj, pairs=pairs, reference=reference,  # type: ignore[arg-type]
                          bn_mode=bn_mode, device=device, batch_size=batch_size,  # type: ignore[arg-type]
                          replicas=group_by, outputs=outputs,  # type: ignore[arg-type]
                          progress=not quiet and stderr.is_terminal)
    result.meta["settings"]["model"] = str(model_spec)
    print_warnings(series, quiet)
    if not quiet:
        m = result.meta
        stderr.print(f"{m['probe_examples']} probe examples ({m['settings']['probe']}); weights: {m['weights']}; "
                     f"bn mode: {m['bn_mode']} ({m['bn_mode_detail']}); {m['probe_passes']} probe passes in "
                     f"{m['seconds']} s", markup=False)
        if m.get("output_kind") == "non-classification":
            stderr.print(f"note: {m['output_note']}", markup=False)
    emit(result, fmt, output, table_columns=_TABLE_REPLICAS if group_by else _TABLE, quiet=quiet)
