"""`distance`: function-space distances between checkpoints (no torch import until the command runs)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from .common import OutputOptions, PathsArg, SeriesOptions, choice, command, print_warnings, stderr

BN_MODE_HELP = (
    "auto | recalibrate | eval | train. How BatchNorm-style normalizers are evaluated. eval (what auto picks): "
    "each checkpoint's saved running statistics in eval mode — the network as you evaluate it, so accuracies "
    "match your own numbers. recalibrate: reset the running statistics and re-estimate them on the probe set "
    "for each checkpoint — use it when saved statistics lag the weights (large lr, short EMA) or were not "
    "saved, to compare the functions the weights define on equal terms. train: per-batch statistics (depends "
    "on --batch-size). TorchScript allows eval/train; a torch.export .pt2 runs as exported."
)
_TABLE = ["step_a", "step_b", "disagreement", "tv", "kl_ab", "kl_ba", "accuracy_a", "accuracy_b", "l2", "cosine"]
_TABLE_REPLICAS = ["step_a", "group_a", "group_b", "replicas_a", "replicas_b", "l1", "l1_half", "noise_floor",
                   "above_floor", "accuracy_a", "accuracy_b"]


Pairs = StrEnum("Pairs", "consecutive all reference")
BnMode = StrEnum("BnMode", "auto recalibrate eval train")
Device = StrEnum("Device", "auto cpu cuda mps")
Outputs = StrEnum("Outputs", "auto logits values")


@command("distance")
def distance_cmd(
    paths: PathsArg,
    out: OutputOptions,
    so: SeriesOptions,
    model: Annotated[str | None, typer.Option(
        "--model", "-m",
        help="model.py:build, pkg.mod:factory, a .pt2 / TorchScript file, timm:NAME, torchvision:NAME, or a "
             "Hugging Face folder with config.json. Required: a model file beside the checkpoints is only named "
             "in the error's hint, never loaded on its own.")] = None,
    probe: Annotated[str | None, typer.Option(
        "--probe", "-p",
        help=".npz (x / y), .pt, an image folder (labels from subfolders) or module:function. "
             "Default: probe.npz next to the checkpoints.")] = None,
    pairs: Annotated[Pairs, typer.Option(
        "--pairs", help="all: every i < j; reference: every checkpoint vs --reference.")] = Pairs.consecutive,
    reference: Annotated[int | None, typer.Option(
        "--reference", help="Step of the reference checkpoint for --pairs reference (default: the last).")] = None,
    bn_mode: Annotated[BnMode, typer.Option("--bn-mode", help=BN_MODE_HELP)] = BnMode.auto,
    device: Annotated[Device, typer.Option("--device", help="Where the forward passes run.")] = Device.auto,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Probe examples per forward pass.")] = 256,
    group_by: Annotated[str | None, typer.Option(
        "--group-by",
        help="Replicated runs: a regex whose first group names each checkpoint's condition (or 'folder' = the "
             "folder above each run folder). Conditions are compared step by step with the ℓ1 distance between "
             "empirical label distributions, against the replica-vs-replica noise floor.")] = None,
    outputs: Annotated[Outputs, typer.Option(
        "--outputs", help="auto: 2-D outputs with ≥ 2 columns are class logits; values: regression/feature "
                          "outputs, compared by l2 and cosine only.")] = Outputs.auto,
) -> None:
    """Function-space distances between checkpoints on a fixed probe set: top-1 disagreement, total variation
    and KL (both ways) of the softmax outputs, accuracy of each side; l2/cosine for non-classifiers.

    Each checkpoint is run over the probe once (outputs cached), so --pairs all over N checkpoints costs N passes.
    Example: ilr-inspect distance runs/x/ckpts --model model.py:build --probe probe.npz --pairs all -f csv
    """
    from ..evidence import for_distance, without_model_file
    from ..function_space import distance
    from ..series import expand_paths

    candidates = without_model_file(expand_paths(paths), model)
    # Model and probe first: a broken factory or probe fails fast, before any checkpoint is read.
    ev = for_distance(candidates, model, probe)
    for note in ev.notes if not so.quiet else []:
        stderr.print(note, markup=False)
    assert ev.model is not None and ev.probe is not None
    with so.open([str(c) for c in candidates], read_logs=False) as series:
        result = distance(series, ev.model, ev.probe, pairs=choice(pairs),  # type: ignore[arg-type]
                          reference=reference, bn_mode=choice(bn_mode),  # type: ignore[arg-type]
                          device=choice(device), batch_size=batch_size, replicas=group_by,
                          outputs=choice(outputs), progress=not so.quiet and stderr.is_terminal)  # type: ignore[arg-type]
    result.meta["settings"]["model"] = str(model)
    print_warnings(series, so.quiet)
    if not so.quiet:
        m = result.meta
        stderr.print(f"{m['probe_examples']} probe examples ({m['settings']['probe']}); weights: {m['weights']}; "
                     f"bn mode: {m['bn_mode']} ({m['bn_mode_detail']}); {m['probe_passes']} probe passes in "
                     f"{m['seconds']} s", markup=False)
        if m.get("output_kind") == "non-classification":
            stderr.print(f"note: {m['output_note']}", markup=False)
    out.emit(result, _TABLE_REPLICAS if group_by else _TABLE, quiet=so.quiet)
