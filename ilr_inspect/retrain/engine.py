"""The fused multi-branch training step: K independent trainings of one architecture as one computation.

Each branch has its own weights, BatchNorm statistics, optimizer state, lr and weight decay. Parameters of all
branches live in ONE flat fp32 buffer (one block of K·numel per tensor), so the optimizer update is a handful of
element-wise kernels over the whole state whatever the number of tensors; the per-branch lr/wd are expanded to
per-element vectors once. The forward/backward runs the module through ``torch.func.functional_call`` under
``torch.vmap`` (a vmapped conv becomes a grouped conv): branches never mix, so fusing is exact. BatchNorm running
statistics are stacked per branch and updated in place by the batched kernel. Models vmap cannot run fall back to a
loop over branches with the same state layout and the same update (the caller is told).

The update rules are PyTorch's: ``torch.optim.SGD`` (coupled weight decay into the momentum buffer, dampening 0,
no Nesterov) and ``torch.optim.AdamW`` (decoupled decay ``p *= 1 - lr·wd``, bias-corrected moments).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, ModelError, UsageError

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class OptimSpec:
    """The base optimizer shared by all branches of one engine (lr and wd are per branch)."""

    name: str = "sgd"  # "sgd" (torch.optim.SGD semantics) or "adamw"
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


def _vmappable(model: nn.Module, params: Tensors, buffers: Tensors, x: torch.Tensor) -> str | None:
    """None when a vmapped forward works on a probe batch, else the reason (state left untouched)."""
    trial_buffers = {n: b.clone() for n, b in buffers.items()}
    try:
        with torch.no_grad():
            torch.func.vmap(lambda p, b, xx: torch.func.functional_call(model, (p, b), (xx,)),
                            randomness="different")(params, trial_buffers, x)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


class Engine:
    """K branches of ``model`` trained together. ``states[k]`` holds branch k's initial parameters and buffers
    (module state-dict names; missing entries keep the module's own values). Parameters named in ``no_decay``
    get no weight decay (a separate torch param group with weight_decay=0)."""

    def __init__(
        self,
        model: nn.Module,
        states: Sequence[Mapping[str, torch.Tensor]],
        lr: Sequence[float],
        weight_decay: Sequence[float],
        optim: OptimSpec,
        *,
        no_decay: Collection[str] = (),
        device: torch.device | str = "cpu",
        amp: bool | None = None,
        fuse: bool | None = None,
        compile: bool = False,
        cuda_graph: bool = False,
        log: Callable[[str], None] | None = None,
        probe_input: torch.Tensor | None = None,
    ) -> None:
        if not states or len(states) != len(lr) or len(lr) != len(weight_decay):
            raise UsageError("the engine needs one state, lr and weight_decay per branch (and at least one branch)")
        if optim.name not in ("sgd", "adamw"):
            raise UsageError(f"unknown optimizer {optim.name!r}", hint="use sgd or adamw")
        self.device = torch.device(device)
        self.K = len(states)
        self.optim = optim
        self.log = log or (lambda _msg: None)
        # bf16 autocast with fp32 master weights on CUDA; fp32 everywhere on the CPU (exact reference path).
        self.amp = (self.device.type == "cuda") if amp is None else amp
        self.model = copy.deepcopy(model).to(self.device).train()
        for p in self.model.parameters():
            p.requires_grad_(False)
        own = self.model.state_dict()
        names = [n for n, _ in self.model.named_parameters()]
        self.param_names = names
        self.buffer_names = [n for n, _ in self.model.named_buffers()]

        def stacked(name: str) -> torch.Tensor:
            return torch.stack([
                (s[name] if name in s else own[name]).detach().to(self.device, own[name].dtype).reshape(own[name].shape)
                for s in states
            ])

        # One flat fp32 buffer; tensor n occupies [offset, offset + K·numel) laid out as (K, *shape).
        sizes = [own[n].numel() * self.K for n in names]
        total = sum(sizes)
        self.flat = torch.empty(total, device=self.device, dtype=torch.float32)
        self.flat_grad = torch.zeros(total, device=self.device, dtype=torch.float32)
        self.params: Tensors = {}
        self.slices: dict[str, tuple[int, int]] = {}
        off = 0
        for n, size in zip(names, sizes, strict=True):
            view = self.flat[off:off + size].view(self.K, *own[n].shape)
            view.copy_(stacked(n))
            leaf = view.detach().requires_grad_(True)  # shares storage with self.flat
            leaf.grad = self.flat_grad[off:off + size].view(self.K, *own[n].shape)  # accumulated in place
            self.params[n] = leaf
            self.slices[n] = (off, size)
            off += size
        self.buffers: Tensors = {n: stacked(n).clone() for n in self.buffer_names}
        self.lr_flat = torch.empty_like(self.flat)
        self.wd_flat = torch.empty_like(self.flat)
        for n in names:
            o, size = self.slices[n]
            per = size // self.K
            self.lr_flat[o:o + size] = torch.tensor(lr, dtype=torch.float64).repeat_interleave(per).to(self.device)
            wd_n = [0.0] * self.K if n in no_decay else weight_decay
            self.wd_flat[o:o + size] = torch.tensor(wd_n, dtype=torch.float64).repeat_interleave(per).to(self.device)
        self.lr = [float(v) for v in lr]
        self.weight_decay = [float(v) for v in weight_decay]
        self.step_count = 0
        self.state: Tensors = {}
        if optim.name == "sgd" and optim.momentum != 0.0:
            self.state["momentum_buffer"] = torch.zeros_like(self.flat)
        if optim.name == "adamw":
            self.state["exp_avg"] = torch.zeros_like(self.flat)
            self.state["exp_avg_sq"] = torch.zeros_like(self.flat)
            self.decay_flat = 1.0 - self.lr_flat * self.wd_flat
        # Bias corrections live on the device so a captured CUDA graph reads the current step's values.
        self._bias = torch.ones(2, device=self.device)  # 1/(1−β1^t), 1/sqrt(1−β2^t)

        self.fused = True if fuse is None else fuse
        if self.fused and probe_input is not None:
            why = _vmappable(self.model, self._detached(), self.buffers,
                             probe_input.to(self.device).unsqueeze(0).expand(self.K, *probe_input.shape))
            if why is not None:
                if fuse:
                    raise ModelError(f"the model cannot be fused with torch.vmap ({why})",
                                     hint="drop fuse=True (the engine then trains branches one by one)")
                self.fused = False
                self.log(f"note: the model cannot be fused with torch.vmap ({why}); training branches one by one")
        self._loss_fn: Callable[..., torch.Tensor] = self._losses
        if compile:
            self._loss_fn = torch.compile(self._losses)
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self._graph: Any = None
        self._static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ----------------------------------------------------------------------------------------------- forward
    def _detached(self) -> Tensors:
        return {n: p.detach() for n, p in self.params.items()}

    def _one(self, p: Tensors, b: Tensors, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.func.functional_call(self.model, (p, b), (x,))
        return out

    def _forward(self, params: Tensors, x: torch.Tensor, shared_input: bool) -> torch.Tensor:
        """Logits (K, B, classes); ``x`` is (K, B, ...) or, with ``shared_input``, (B, ...) for all branches."""
        # autocast's weight-cast cache must be off under CUDA graph capture
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp,
                            cache_enabled=not self.cuda_graph):
            if self.fused:
                out = torch.func.vmap(self._one, in_dims=(0, 0, None if shared_input else 0),
                                      randomness="different")(params, self.buffers, x)
            else:
                outs = []
                for k in range(self.K):
                    pk = {n: t[k] for n, t in params.items()}
                    bk = {n: t[k] for n, t in self.buffers.items()}  # views: BN updates land in self.buffers
                    outs.append(self._one(pk, bk, x if shared_input else x[k]))
                out = torch.stack(outs)
        return out.float()

    def _losses(self, params: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self._forward(params, x, shared_input=False)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(self.K, -1).mean(1)

    # ---------------------------------------------------------------------------------------------- training
    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step of every branch on its own batch ``x[k], y[k]``; returns the (K,) batch losses."""
        self.model.train()
        if self.cuda_graph:
            return self._graph_step(x, y)
        self._advance()
        return self._body(x, y)

    def _body(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Device work of one step (what a CUDA graph captures): zero grads, forward, backward, update."""
        self.flat_grad.zero_()
        losses = self._loss_fn(self.params, x, y)
        losses.sum().backward()  # type: ignore[no-untyped-call]  # branch losses are independent: d(sum)/dθ_k = dL_k/dθ_k
        self._update()
        return losses.detach()

    def _advance(self) -> None:
        """Host-side bookkeeping of a step, done before its device work."""
        self.step_count += 1
        if self.optim.name == "adamw":
            t = self.step_count
            vals = [1.0 / (1.0 - self.optim.beta1**t), 1.0 / math.sqrt(1.0 - self.optim.beta2**t)]
            self._bias.copy_(torch.tensor(vals, dtype=torch.float32))

    def _graph_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Whole-step CUDA graph: three eager warm-up steps on a side stream, then capture once, replay after."""
        if self._graph is None and self.step_count < 3:
            side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._advance()
                out = self._body(x, y)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self._graph is None:
            sx, sy = x.clone(), y.clone()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    loss = self._body(sx, sy)
            except Exception as exc:  # capture is not possible for every model: stay eager, say so
                self.log(f"note: CUDA graph capture failed ({type(exc).__name__}: {exc}); running eagerly")
                self.cuda_graph = False
                self._advance()
                return self._body(x, y)
            self._graph, self._static = graph, (sx, sy, loss)
        assert self._static is not None
        sx, sy, loss = self._static
        sx.copy_(x)
        sy.copy_(y)
        self._advance()
        self._graph.replay()
        return loss.clone()

    @torch.no_grad()
    def _update(self) -> None:
        p, g = self.flat, self.flat_grad
        if self.optim.name == "sgd":
            d = torch.addcmul(g, self.wd_flat, p)  # coupled weight decay, as torch.optim.SGD
            if "momentum_buffer" in self.state:
                # torch starts the buffer at d; from a zero buffer μ·0 + d is exactly d
                d = self.state["momentum_buffer"].mul_(self.optim.momentum).add_(d)
            p.addcmul_(self.lr_flat, d, value=-1.0)
            return
        b1, b2 = self.optim.beta1, self.optim.beta2
        p.mul_(self.decay_flat)  # decoupled weight decay, as torch.optim.AdamW
        m, v = self.state["exp_avg"], self.state["exp_avg_sq"]
        m.lerp_(g, 1.0 - b1)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        denom = (v.sqrt() * self._bias[1]).add_(self.optim.eps)
        p.addcmul_(self.lr_flat * self._bias[0], m / denom, value=-1.0)

    # -------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def logits(self, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
        """Eval-mode logits (K, N, classes) of every branch on the same inputs (BN uses running statistics)."""
        self.model.eval()
        try:
            params = self._detached()
            saved = {n: b.clone() for n, b in self.buffers.items()}
            outs = [self._forward(params, x[i:i + batch].to(self.device), shared_input=True)
                    for i in range(0, x.shape[0], batch)]
            for n, b in saved.items():  # eval must never move the statistics
                self.buffers[n].copy_(b)
        finally:
            self.model.train()
        return torch.cat(outs, dim=1)

    def branch_state(self, k: int) -> Tensors:
        """Branch k's parameters and buffers as a plain state dict (copies, on the CPU)."""
        out = {n: p[k].detach().cpu().clone() for n, p in self.params.items()}
        out.update({n: b[k].cpu().clone() for n, b in self.buffers.items()})
        return out

    # ----------------------------------------------------------------------------------- save / restore state
    def state_dict(self) -> dict[str, Any]:
        return {
            "step_count": self.step_count,
            "flat": self.flat.detach().cpu().clone(),
            "buffers": {n: b.cpu().clone() for n, b in self.buffers.items()},
            "optim": {n: s.cpu().clone() for n, s in self.state.items()},
            "lr": self.lr,
            "weight_decay": self.weight_decay,
        }

    def load_state_dict(self, sd: Mapping[str, Any], *, path: str | None = None) -> None:
        """Restore a saved state (before the first step: a captured CUDA graph keeps its buffers' addresses).

        A state that does not fit this engine (other hyperparameters, other model, a damaged file) is bad input,
        not a bug: InputError naming ``path``."""
        hint = "rerun without --resume into a new --out folder"
        try:
            if list(sd["lr"]) != self.lr or list(sd["weight_decay"]) != self.weight_decay:
                raise InputError("the saved engine state belongs to other hyperparameters", path=path, hint=hint)
            if set(sd["buffers"]) != set(self.buffers) or set(sd["optim"]) != set(self.state):
                raise InputError("the saved engine state belongs to another model or optimizer", path=path, hint=hint)
            with torch.no_grad():
                self.flat.copy_(sd["flat"].to(self.device))
                for n, b in sd["buffers"].items():
                    self.buffers[n].copy_(b.to(self.device))
                for n, s in sd["optim"].items():
                    self.state[n].copy_(s.to(self.device))
            step_count = int(sd["step_count"])
        except (KeyError, TypeError, AttributeError, RuntimeError, ValueError) as exc:
            raise InputError(f"the saved engine state is damaged ({type(exc).__name__}: {exc})", path=path,
                             hint=hint) from None
        self.step_count = step_count
        if self.optim.name == "adamw" and self.step_count:
            self.step_count -= 1
            self._advance()  # bias corrections of the restored step
