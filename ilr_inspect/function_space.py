"""Function-space distances between checkpoints (docs/theory.md §10).

Each checkpoint's tensors are swapped into one model instance and run over the probe set once; its outputs are
cached on the CPU in float64 (log-probabilities for classifiers), so any set of pairs over N checkpoints costs N
probe passes (2N with ``bn_mode="recalibrate"``, whose first pass only re-estimates normalizer statistics;
the default compares the networks as evaluated, with their saved running statistics).
Per pair: top-1 disagreement, mean total variation ½Σ|p_a − p_b|, KL both ways, accuracy of each side, and L2 /
cosine of the raw outputs (the only metrics for non-classification outputs). With replicated runs (several seeds
per condition) the LLA20 ℓ1 distance between empirical label distributions, with the replica-vs-replica value as
noise floor.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from .checkpoint import Checkpoint
from .errors import ModelError, ProbeError, UsageError
from .models import (
    LoadReport,
    build_model,
    checkpoint_tensors,
    expected_input,
    match_keys,
    model_kind,
    tensors_from_mapping,
)
from .output import Result, provenance
from .probe import Probe, load_probe
from .series import SeriesSource, borrow

PairMode = Literal["consecutive", "all", "reference"]
BnMode = Literal["auto", "recalibrate", "eval", "train"]
Device = Literal["cpu", "cuda", "mps", "auto"]
OutputsMode = Literal["auto", "logits", "values"]



# ------------------------------------------------------------------------------------------------ evaluation


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device must be cpu, cuda, mps or auto, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available", hint="use --device cpu or auto")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: no Apple MPS device is available", hint="use --device cpu or auto")
    return torch.device(device)


def _output_tensor(out: Any) -> torch.Tensor:
    """The prediction tensor of a forward pass: a tensor, ``.logits`` of a model output, or the first element."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, dict):
        for key in ("logits", "out", "output"):
            if isinstance(out.get(key), torch.Tensor):
                return out[key]  # type: ignore[no-any-return]
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ModelError(f"the model returned {type(out).__name__}; expected a tensor of outputs (or .logits)")


_SCRIPT_NORMS = frozenset({
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "InstanceNorm1d", "InstanceNorm2d",
    "InstanceNorm3d",
})


def _running_stat_norms(module: torch.nn.Module, kind: str) -> list[tuple[str, torch.nn.Module]]:
    if kind == "eager":
        return [
            (n, m) for n, m in module.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats
        ]
    if kind == "torchscript":
        return [(n, m) for n, m in module.named_modules() if getattr(m, "original_name", "") in _SCRIPT_NORMS]
    return []


class Evaluator:
    """Runs one model instance over the probe set with one checkpoint's tensors at a time."""

    def __init__(self, module: torch.nn.Module, probe: Probe, *, device: torch.device, batch_size: int,
                 bn_mode: BnMode) -> None:
        if batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        self.module = module.to(device)
        self.probe = probe
        self.device = device
        self.kind = model_kind(module)
        self.norms = _running_stat_norms(module, self.kind)
        self.bn_mode, self.bn_note = self._resolve(bn_mode)
        self.batch_size = batch_size
        self.pad_to: int | None = None
        if self.kind == "export":
            # torch.export specialises the batch size unless exported with dynamic shapes: pad the last batch.
            assert isinstance(module, torch.fx.GraphModule)
            first = next(n for n in module.graph.nodes if n.op == "placeholder" and "val" in n.meta)
            b = first.meta["val"].shape[0]
            if isinstance(b, int):
                self.batch_size, self.pad_to = b, b
        self.probe_passes = 0
        self.forward_calls = 0
        self.report: LoadReport | None = None

    def _resolve(self, requested: BnMode) -> tuple[str, str]:
        if requested not in ("auto", "recalibrate", "eval", "train"):
            raise UsageError(f"--bn-mode must be auto, recalibrate, eval or train, not {requested!r}")
        if self.kind == "export":
            if requested not in ("auto", "eval"):
                raise ModelError(
                    f"--bn-mode {requested} is not possible with a torch.export program: it runs in the mode "
                    "it was exported in", hint="use --bn-mode auto, or build the model from Python code")
            return "as-exported", "torch.export program: normalizers run as exported"
        if not self.norms:
            return ("eval" if requested in ("auto", "recalibrate") else requested,
                    "the model has no normalizers with running statistics")
        if requested == "auto":
            # The network as the user evaluates it (eval mode, saved running statistics), so the accuracies
            # here match the user's own numbers; recalibrate is an explicit choice (see docs/step-angle.md).
            return "eval", "each checkpoint's saved running statistics (eval mode, as the user evaluates it)"
        if requested == "recalibrate" and self.kind != "eager":
            raise ModelError("--bn-mode recalibrate needs a model built from Python code (TorchScript normalizer "
                             "momentum is a compiled constant)", hint="use --bn-mode eval or train")
        notes = {"recalibrate": "running statistics re-estimated on the probe set for each checkpoint",
                 "eval": "each checkpoint's saved running statistics",
                 "train": "batch statistics of each probe batch"}
        return requested, notes[requested]

    def _batches(self) -> Iterator[tuple[torch.Tensor, int]]:
        x = self.probe.inputs
        for start in range(0, x.shape[0], self.batch_size):
            xb = x[start:start + self.batch_size]
            real = xb.shape[0]
            if self.pad_to is not None and real < self.pad_to:
                xb = torch.cat([xb, xb[-1:].expand(self.pad_to - real, *xb.shape[1:])])
            yield xb.to(self.device, non_blocking=True), real

    def _forward(self, tensors: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        self.forward_calls += 1
        try:
            if self.kind == "eager":
                out = torch.func.functional_call(self.module, tensors, (xb,))
            else:
                out = self.module(xb)
        except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
            if self.forward_calls > 1:  # a probe that does not fit fails on the first batch; later errors are real
                raise
            want = expected_input(self.module)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ProbeError(
                f"the model rejected probe inputs of shape {tuple(self.probe.inputs.shape)} "
                f"(dtype {self.probe.inputs.dtype}): {first}"
                + (f"; the model expects {want}" if want else ""),
                hint="give a probe whose inputs have the shape the model takes (one row per example)",
            ) from None
        return _output_tensor(out)

    def _pass(self, tensors: dict[str, torch.Tensor], keep: bool) -> torch.Tensor | None:
        outs: list[torch.Tensor] = []
        with torch.inference_mode():
            for xb, real in self._batches():
                y = self._forward(tensors, xb)
                if keep:
                    outs.append(y[:real].detach().to("cpu", torch.float64))
        self.probe_passes += 1
        return torch.cat(outs) if keep else None

    @contextmanager
    def _norm_mode(self, train_norms: bool, cumulative: bool) -> Iterator[None]:
        saved: list[Any] = [getattr(m, "momentum", None) for _, m in self.norms]
        try:
            if self.kind != "export":
                self.module.eval()
                for _, m in self.norms:
                    m.train(train_norms)
                    if cumulative:
                        m.momentum = None  # type: ignore[assignment]
            yield
        finally:
            for (_, m), mom in zip(self.norms, saved, strict=True):
                if cumulative:
                    m.momentum = mom
            if self.kind != "export":
                self.module.eval()

    def outputs(self, ckpt: Checkpoint) -> torch.Tensor:
        """Raw model outputs on the probe set for one checkpoint, float64 on the CPU, one row per input."""
        if self.report is None:
            self.report = match_keys(self.module, ckpt)
        tensors = checkpoint_tensors(self.module, ckpt, self.report, device=self.device)
        if self.kind != "eager":
            tensors_from_mapping(self.module, tensors)
        if self.bn_mode == "recalibrate":
            state = self.module.state_dict(keep_vars=True)
            for name, _ in self.norms:
                pre = f"{name}." if name else ""
                tensors[pre + "running_mean"] = torch.zeros_like(state[pre + "running_mean"])
                tensors[pre + "running_var"] = torch.ones_like(state[pre + "running_var"])
                tensors[pre + "num_batches_tracked"] = torch.zeros_like(state[pre + "num_batches_tracked"])
            with self._norm_mode(train_norms=True, cumulative=True):
                self._pass(tensors, keep=False)
        with self._norm_mode(train_norms=self.bn_mode == "train", cumulative=False):
            out = self._pass(tensors, keep=True)
        assert out is not None
        return out


# ---------------------------------------------------------------------------------------------------- metrics


@dataclass
class Cached:
    """One checkpoint's outputs on the probe set, ready for pair metrics."""

    values: np.ndarray  # (n, d) raw outputs, float64
    logp: np.ndarray | None  # (n, C) log-softmax, float64 (classification only)
    prob: np.ndarray | None
    pred: np.ndarray | None  # (n,) argmax of the outputs
    accuracy: float


def is_classification(out: torch.Tensor, mode: OutputsMode = "auto") -> bool:
    if mode == "values":
        return False
    ok = out.ndim == 2 and out.shape[1] >= 2
    if mode == "logits" and not ok:
        raise ModelError(f"--outputs logits: the model's outputs have shape {tuple(out.shape)}, not (N, classes)",
                         hint="use --outputs values (l2 / cosine) for these outputs")
    return ok


def cache_outputs(out: torch.Tensor, labels: torch.Tensor | None, classification: bool) -> Cached:
    values = out.reshape(out.shape[0], -1).numpy()
    if not classification:
        return Cached(values, None, None, None, float("nan"))
    logp = torch.log_softmax(out, dim=1).numpy()
    pred = out.argmax(dim=1).numpy()
    acc = float("nan")
    if labels is not None:
        acc = float(np.mean(pred == labels.numpy()))
    return Cached(values, logp, np.exp(logp), pred, acc)


def pair_metrics(a: Cached, b: Cached) -> dict[str, float]:
    """Disagreement, TV, KL both ways (classification), and L2 / cosine of raw outputs; means over inputs."""
    diff = a.values - b.values
    na, nb = np.linalg.norm(a.values, axis=1), np.linalg.norm(b.values, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.sum(a.values * b.values, axis=1) / (na * nb)
    out = {
        "l2": float(np.mean(np.linalg.norm(diff, axis=1))),
        "cosine": float(np.mean(cos)),
        "disagreement": float("nan"), "tv": float("nan"), "kl_ab": float("nan"), "kl_ba": float("nan"),
    }
    if a.logp is not None and b.logp is not None and a.prob is not None and b.prob is not None:
        assert a.pred is not None and b.pred is not None
        dl = a.logp - b.logp
        out["disagreement"] = float(np.mean(a.pred != b.pred))
        out["tv"] = float(np.mean(0.5 * np.abs(a.prob - b.prob).sum(axis=1)))
        out["kl_ab"] = float(np.mean(np.sum(a.prob * dl, axis=1)))
        out["kl_ba"] = float(np.mean(np.sum(b.prob * -dl, axis=1)))
    return out


def label_distribution(preds: Sequence[np.ndarray], n_classes: int) -> np.ndarray:
    """Empirical p(y|x) over replicas: fraction of replicas predicting y, shape (n, C)."""
    stacked = np.stack(preds)  # (R, n)
    dist = np.zeros((stacked.shape[1], n_classes))
    for row in stacked:
        dist[np.arange(stacked.shape[1]), row] += 1.0
    return np.asarray(dist / stacked.shape[0], dtype=np.float64)


def l1_distance(p: np.ndarray, q: np.ndarray) -> float:
    """LLA20's estimator (theory §8.2): mean over inputs of Σ_y |p(y|x) − q(y|x)|."""
    return float(np.mean(np.abs(p - q).sum(axis=1)))


# --------------------------------------------------------------------------------------------------- planning


def plan_pairs(n: int, mode: PairMode, ref: int | None) -> list[tuple[int, int]]:
    if mode == "consecutive":
        return [(i, i + 1) for i in range(n - 1)]
    if mode == "all":
        return list(combinations(range(n), 2))
    if mode == "reference":
        assert ref is not None
        return [(i, ref) for i in range(n) if i != ref]
    raise UsageError(f"--pairs must be consecutive, all or reference, not {mode!r}")


def _reference_index(ckpts: list[Checkpoint], reference: int | None) -> int:
    if reference is None:
        return len(ckpts) - 1
    for i, c in enumerate(ckpts):
        if c.step == reference:
            return i
    steps = [c.step for c in ckpts]
    raise UsageError(f"--reference {reference} is not a step of the series; steps: {steps[:20]}")


def _group_key(pattern: str | None) -> Callable[[Path], str]:
    if pattern is None or pattern == "folder":
        # runs/<condition>/<seed>/ckpt.pt: the condition is the folder above the seed folder.
        return lambda p: p.resolve().parent.parent.name
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--group-by is not a valid regular expression: {exc}") from None

    def key(p: Path) -> str:
        m = rx.search(str(p))
        if m is None:
            raise UsageError(f"--group-by {pattern!r} does not match {p}",
                             hint="the regex must match every checkpoint path; its first group names the condition")
        return m.group(1) if rx.groups else m.group(0)

    return key


class _Progress:
    def __init__(self, enabled: bool, total: int, what: str) -> None:
        self._bar: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(what, total=total)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# ----------------------------------------------------------------------------------------------------- driver


def distance(
    series: SeriesSource,
    model: torch.nn.Module | str,
    probe: Probe | str | Path,
    *,
    pairs: PairMode = "consecutive",
    reference: int | None = None,
    bn_mode: BnMode = "auto",
    device: Device | str = "cpu",
    batch_size: int = 256,
    replicas: str | None = None,
    outputs: OutputsMode = "auto",
    progress: bool = False,
    **series_kwargs: Any,
) -> Result:
    """Function-space distances between the checkpoints of a series on a fixed probe set.

    ``series``: a folder, glob, list of paths or an open :class:`~ilr_inspect.series.Series`;
    ``series_kwargs`` (``options``, ``step_regex``, ``on_mismatch``, …) are how paths are opened, as for every
    other table function (:func:`ilr_inspect.series.borrow`).

    ``pairs``: consecutive checkpoints, all pairs i < j, or every checkpoint against ``reference`` (a step; the
    last checkpoint by default). ``replicas``: a regex whose first group names the condition of each checkpoint
    path (or ``"folder"``: the folder above each run's folder); conditions are then compared step by step with the
    ℓ1 distance between empirical label distributions, against the replica-vs-replica noise floor.
    ``outputs``: ``"logits"`` (class scores), ``"values"`` (regression / features: l2 and cosine only), or
    ``"auto"``: 2-D outputs with at least two columns are taken as logits.
    """
    if outputs not in ("auto", "logits", "values"):
        raise UsageError(f"--outputs must be auto, logits or values, not {outputs!r}")
    # Paths are opened (without logs: distances need none) and closed here; an open Series stays open.
    with borrow(series, **{"read_logs": False, **series_kwargs}) as opened:
        return _distance(list(opened.checkpoints), model, probe, pairs=pairs, reference=reference,
                         bn_mode=bn_mode, device=device, batch_size=batch_size, replicas=replicas, outputs=outputs,
                         progress=progress)


def _distance(ckpts: list[Checkpoint], model: torch.nn.Module | str, probe: Probe | str | Path, *, pairs: PairMode,
              reference: int | None, bn_mode: BnMode, device: Device | str, batch_size: int, replicas: str | None,
              outputs: OutputsMode, progress: bool) -> Result:
    if not ckpts:
        raise UsageError("no checkpoints to compare")
    base_dir = ckpts[0].path.parent
    model_desc = model if isinstance(model, str) else type(model).__name__
    module = build_model(model, base_dir=base_dir) if isinstance(model, str) else model
    probe_obj = load_probe(probe, base_dir=base_dir) if isinstance(probe, (str, Path)) else probe
    dev = resolve_device(str(device))
    ev = Evaluator(module, probe_obj, device=dev, batch_size=batch_size, bn_mode=bn_mode)
    started = time.perf_counter()
    bar = _Progress(progress, len(ckpts), "forward passes")
    try:
        if replicas is not None:
            rows, extra = _replica_rows(ckpts, ev, probe_obj, replicas, bar, outputs)
        else:
            if len(ckpts) < 2:
                raise UsageError("a distance needs at least two checkpoints")
            ref = _reference_index(ckpts, reference) if pairs == "reference" else None
            rows, extra = _pair_rows(ckpts, ev, probe_obj, pairs, ref, bar, outputs)
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    settings = {
        "pairs": pairs if replicas is None else "conditions", "reference": reference, "bn_mode_requested": bn_mode,
        "device": str(dev), "batch_size": ev.batch_size, "replicas": replicas, "outputs": outputs,
        "model": model_desc,
        "probe": probe_obj.source,
    }
    inputs = [c.path for c in ckpts] + ([probe_obj.path] if probe_obj.path is not None else [])
    meta = provenance(inputs, settings)
    meta.update({
        "bn_mode": ev.bn_mode,
        "bn_mode_detail": ev.bn_note,
        "model_kind": ev.kind,
        "probe_examples": len(probe_obj),
        "labels": probe_obj.labels is not None,
        "weights": ev.report.describe() if ev.report is not None else None,
        "probe_passes": ev.probe_passes,
        "forward_calls": ev.forward_calls,
        "seconds": round(elapsed, 3),
        **extra,
    })
    return Result("distance", pd.DataFrame(rows), meta)


def _step(c: Checkpoint, i: int) -> int:
    return c.step if c.step is not None else i


def _pair_rows(ckpts: list[Checkpoint], ev: Evaluator, probe: Probe, mode: PairMode, ref: int | None,
               bar: _Progress, outputs: OutputsMode) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    plan = plan_pairs(len(ckpts), mode, ref)
    order = ([ref] if ref is not None else []) + [i for i in range(len(ckpts)) if i != ref]
    needed = {i for p in plan for i in p}
    remaining = {i: sum(i in p for p in plan) for i in needed}
    cache: dict[int, Cached] = {}
    accuracy: dict[int, float] = {}
    results: dict[tuple[int, int], dict[str, float]] = {}
    classification: bool | None = None
    out_shape: tuple[int, ...] = ()
    for i in order:
        if i not in needed:
            continue
        out = ev.outputs(ckpts[i])
        bar.advance()
        if classification is None:
            classification, out_shape = is_classification(out, outputs), tuple(out.shape[1:])
            if classification:
                _check_labels(probe, int(out_shape[0]))
        cache[i] = cache_outputs(out, probe.labels, classification)
        accuracy[i] = cache[i].accuracy
        # Pairs complete as soon as both sides are cached; a side no pair still needs is dropped (memory bound).
        for a, b in plan:
            if (a, b) not in results and a in cache and b in cache:
                results[(a, b)] = pair_metrics(cache[a], cache[b])
                for k in (a, b):
                    remaining[k] -= 1
                    if remaining[k] == 0 and k != i:
                        del cache[k]
        if remaining.get(i) == 0:
            cache.pop(i, None)
    rows = []
    for a, b in plan:
        m = results[(a, b)]
        rows.append({
            "step_a": _step(ckpts[a], a), "step_b": _step(ckpts[b], b),
            **{k: m[k] for k in ("disagreement", "tv", "kl_ab", "kl_ba")},
            "accuracy_a": accuracy[a], "accuracy_b": accuracy[b], "l2": m["l2"], "cosine": m["cosine"],
            "checkpoint_a": str(ckpts[a].path), "checkpoint_b": str(ckpts[b].path), "index_a": a, "index_b": b,
        })
    return rows, _kind_meta(bool(classification), out_shape, probe)


def _check_labels(probe: Probe, n_classes: int) -> None:
    if probe.labels is not None and (int(probe.labels.max()) >= n_classes or int(probe.labels.min()) < 0):
        raise ProbeError(f"probe labels range over [{int(probe.labels.min())}, {int(probe.labels.max())}] "
                         f"but the model has {n_classes} outputs", hint="give the labels as class indices")


def _kind_meta(classification: bool, out_shape: tuple[int, ...], probe: Probe) -> dict[str, Any]:
    if classification:
        applies = ["disagreement", "tv", "kl_ab", "kl_ba", "l2", "cosine"]
        if probe.labels is not None:
            applies += ["accuracy_a", "accuracy_b"]
        note = f"classification: {out_shape[0]} classes; l2/cosine are of the logits"
    else:
        applies = ["l2", "cosine"]
        note = (f"outputs of shape (N, {', '.join(map(str, out_shape))}) are not 2-D class logits: only l2 "
                "(mean ‖f_a(x) − f_b(x)‖) and cosine (mean cos(f_a(x), f_b(x))) apply; disagreement, tv, kl "
                "and accuracy are left empty")
    return {"output_kind": "classification" if classification else "non-classification",
            "metrics_apply": applies, "output_note": note}


def _replica_rows(ckpts: list[Checkpoint], ev: Evaluator, probe: Probe, pattern: str,
                  bar: _Progress, outputs: OutputsMode) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    key = _group_key(pattern)
    preds: dict[tuple[str, int], list[np.ndarray]] = {}
    accs: dict[tuple[str, int], list[float]] = {}
    n_classes = 0
    for i, c in enumerate(ckpts):
        out = ev.outputs(c)
        bar.advance()
        if not is_classification(out, "logits" if outputs == "auto" else outputs):
            raise ModelError("replicated-run distances need class predictions; the model's outputs have shape "
                             f"{tuple(out.shape)}", hint="drop --group-by to get l2/cosine between checkpoints")
        if n_classes == 0:
            _check_labels(probe, int(out.shape[1]))
        n_classes = int(out.shape[1])
        cached = cache_outputs(out, probe.labels, True)
        assert cached.pred is not None
        k = (key(c.path), _step(c, i))
        preds.setdefault(k, []).append(cached.pred)
        accs.setdefault(k, []).append(cached.accuracy)
    groups = sorted({g for g, _ in preds})
    if len(groups) < 2:
        raise UsageError(f"replicated-run distances need at least two conditions; found {groups}",
                         hint="check --group-by: its first group must name the condition (e.g. the schedule)")
    rows: list[dict[str, Any]] = []
    floors: dict[str, dict[int, float]] = {}
    for ga, gb in combinations(groups, 2):
        for step in sorted({s for g, s in preds if g == ga} & {s for g, s in preds if g == gb}):
            pa, pb = preds[(ga, step)], preds[(gb, step)]
            full_a, full_b = label_distribution(pa, n_classes), label_distribution(pb, n_classes)
            h = min(len(pa), len(pb)) // 2
            half = floor = float("nan")
            if h >= 1:
                ha1, ha2 = label_distribution(pa[:h], n_classes), label_distribution(pa[h:2 * h], n_classes)
                hb1, hb2 = label_distribution(pb[:h], n_classes), label_distribution(pb[h:2 * h], n_classes)
                half = 0.5 * (l1_distance(ha1, hb2) + l1_distance(ha2, hb1))
                fa, fb = l1_distance(ha1, ha2), l1_distance(hb1, hb2)
                floor = 0.5 * (fa + fb)
                floors.setdefault(ga, {})[step] = fa
                floors.setdefault(gb, {})[step] = fb
            l1 = l1_distance(full_a, full_b)
            rows.append({
                "step_a": step, "step_b": step,
                "disagreement": float(np.mean(1.0 - np.sum(full_a * full_b, axis=1))),
                "tv": 0.5 * l1, "kl_ab": float("nan"), "kl_ba": float("nan"),
                "accuracy_a": float(np.mean(accs[(ga, step)])), "accuracy_b": float(np.mean(accs[(gb, step)])),
                "group_a": ga, "group_b": gb, "replicas_a": len(pa), "replicas_b": len(pb),
                "l1": l1, "l1_half": half, "noise_floor": floor,
                "above_floor": bool(half > floor) if h >= 1 else None,
            })
    meta = {
        "output_kind": "classification",
        "metrics_apply": ["l1", "l1_half", "noise_floor", "tv", "disagreement", "accuracy_a", "accuracy_b"],
        "output_note": (
            "conditions compared at equal steps: l1 = mean_x Σ_y |p_A(y|x) − p_B(y|x)| with p the fraction of "
            "replicas predicting y (LLA20, theory §8.2); tv = l1/2; disagreement = chance that a random replica "
            "of A and one of B disagree; l1_half compares disjoint halves of equal size h = min(R_A, R_B)//2 and "
            "noise_floor is the same estimator between the two halves of one condition (replica vs replica), "
            "averaged over A and B, so above_floor compares like with like"),
        "conditions": groups,
        "noise_floor_by_condition": floors,
    }
    return rows, meta
