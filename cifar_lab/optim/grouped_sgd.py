"""Optimizer and schedule factories for short, high-learning-rate runs (``experiment=speedrun``).

Both are ``_partial_`` factories named from configs: the module calls the optimizer factory
with ``params=`` and the scheduler factory with ``optimizer=`` and, when the config leaves it
out, ``total_steps=`` (see ``ClassifierModule._scheduler_length_kwargs``).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["split_bias_groups", "grouped_sgd", "LinearWarmupDecay", "linear_warmup_decay", "orthogonalize", "MuonSGD",
           "muon_sgd"]


def split_bias_groups(params: Iterable[Any], lr: float, weight_decay: float, bias_lr_scale: float,
                      bias_weight_decay_scale: float) -> list[dict[str, Any]]:
    """Split parameters into matrices/filters (``ndim >= 2``) and vectors (biases, norm shifts).

    ``params`` may be tensors or param-group dicts (e.g. the module's no-decay split); a
    group's own ``weight_decay`` is kept and scaled for its vector part. Empty groups are dropped.
    """
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    out: list[dict[str, Any]] = []
    for group in groups:
        tensors: list[Tensor] = [p for p in group["params"] if p.requires_grad]
        wd = group.get("weight_decay", weight_decay)
        rest = {k: v for k, v in group.items() if k not in ("params", "weight_decay", "lr")}
        matrices = [p for p in tensors if p.ndim >= 2]
        vectors = [p for p in tensors if p.ndim < 2]
        if matrices:
            out.append({**rest, "params": matrices, "lr": group.get("lr", lr), "weight_decay": wd})
        if vectors:
            out.append({**rest, "params": vectors, "lr": group.get("lr", lr) * bias_lr_scale,
                        "weight_decay": wd * bias_weight_decay_scale})
    return out


def grouped_sgd(params: Iterable[Any], lr: float, momentum: float = 0.9, nesterov: bool = True,
                weight_decay: float = 0.0, bias_lr_scale: float = 1.0,
                bias_weight_decay_scale: float | None = None, dampening: float = 0.0) -> SGD:
    """SGD whose vector parameters (biases, BatchNorm shifts) take ``bias_lr_scale`` times the rate.

    ``weight_decay`` is torch's (coupled: the step shrinks weights by ``lr * weight_decay``).
    ``bias_weight_decay_scale`` defaults to ``1 / bias_lr_scale``, so every parameter is
    shrunk by the same amount per step whatever its learning rate.

    With BatchNorm scales frozen, the shifts are the network's only per-channel affine
    parameters; a much higher rate for them (64x in fast CIFAR recipes) speeds up training.
    """
    if bias_lr_scale <= 0:
        raise ValueError(f"bias_lr_scale must be > 0, got {bias_lr_scale}")
    scale = 1.0 / bias_lr_scale if bias_weight_decay_scale is None else bias_weight_decay_scale
    groups = split_bias_groups(params, lr, weight_decay, bias_lr_scale, scale)
    return SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
               dampening=dampening)


class LinearWarmupDecay:
    """Learning-rate factor: ``start -> 1`` linearly over ``warmup`` steps, then ``1 -> end`` by ``total``.

    Past ``total`` the factor stays at ``end``. A callable object (not a closure) so
    ``LambdaLR.state_dict`` saves it and resumed runs continue the same curve.
    """

    def __init__(self, total: int, warmup: int, start: float = 0.2, end: float = 0.0) -> None:
        if total < 1:
            raise ValueError(f"the schedule needs at least one step, got total={total}")
        if not 0 <= warmup <= total:
            raise ValueError(f"warmup ({warmup} steps) must lie in [0, total={total}]")
        self.total, self.warmup = int(total), int(warmup)
        self.start, self.end = float(start), float(end)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.start + (1.0 - self.start) * step / self.warmup
        if step >= self.total:
            return self.end
        span = max(1, self.total - self.warmup)
        return 1.0 + (self.end - 1.0) * (step - self.warmup) / span


def linear_warmup_decay(optimizer: Optimizer, total_steps: int | None = None, warmup_fraction: float = 0.2,
                        start_factor: float = 0.2, end_factor: float = 0.0) -> LambdaLR:
    """Triangular schedule over the whole run, stepped per optimizer step (``interval: step``).

    The rate rises linearly from ``start_factor`` to 1 (times each group's rate) during the first
    ``warmup_fraction`` of ``total_steps``, then falls linearly to ``end_factor`` at the end.
    ``total_steps`` is filled in by the module (the trainer's estimated optimizer steps).
    """
    if total_steps is None or total_steps < 1:
        raise ValueError("linear_warmup_decay needs total_steps >= 1 (filled in by the module when left out)")
    if not 0.0 <= warmup_fraction <= 1.0:
        raise ValueError(f"warmup_fraction must lie in [0, 1], got {warmup_fraction}")
    warmup = round(warmup_fraction * total_steps)
    return LambdaLR(optimizer, LinearWarmupDecay(int(total_steps), warmup, start_factor, end_factor))


# ----------------------------------------------------------------------------- Muon for conv filters


def orthogonalize(update: Tensor, steps: int = 5, eps: float = 1e-7,
                  coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)) -> Tensor:
    """Approximately replace the singular values of a 2-D ``update`` by ~1 (Newton-Schulz iteration).

    The quintic iteration ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` (after scaling
    ``X`` to unit Frobenius norm) pushes every singular value towards 1 in a few steps; the
    coefficients trade exactness for speed (the result's singular values land roughly in
    [0.7, 1.2]), which is all an update direction needs. Runs in bfloat16.
    """
    if update.ndim != 2:
        raise ValueError(f"orthogonalize needs a matrix, got shape {tuple(update.shape)}")
    a, b, c = coefficients
    x = update.to(torch.bfloat16)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.T
    return x.to(update.dtype)


class MuonSGD(Optimizer):
    """Muon for filters, Nesterov SGD for everything else, in one optimizer.

    Param groups with ``muon=True`` (conv filters, any ``ndim >= 2`` tensor followed by a
    normalisation layer) take momentum steps whose direction is orthogonalised
    (:func:`orthogonalize` of the filters flattened to ``(out, -1)``) and whose size is ``lr``
    times a shape factor ``sqrt(max(1, out / fan_in))``. With ``renormalize=True`` the filters
    are first rescaled to Frobenius norm ``sqrt(out)``: a BatchNorm after the conv makes their
    scale irrelevant to the output, so fixing it fixes the effective step size (no weight
    decay needed). Other groups (``muon=False``) are plain SGD with (Nesterov) momentum and
    coupled ``weight_decay``, as ``torch.optim.SGD``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.1, momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float = 0.0, muon: bool = False, ns_steps: int = 5, renormalize: bool = True) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be >= 0")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, muon=muon,
                        ns_steps=ns_steps, renormalize=renormalize)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("muon groups take matrices or filters (ndim >= 2) only")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["muon"] and group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = grad.clone()
                else:
                    buf.mul_(momentum).add_(grad)
                update = grad.add(buf, alpha=momentum) if nesterov else buf
                if group["muon"]:
                    if group["renormalize"]:
                        p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))
                    flat = update.reshape(len(update), -1)
                    scale = max(1.0, flat.shape[0] / flat.shape[1]) ** 0.5
                    update = orthogonalize(flat, group["ns_steps"]).view_as(p) * scale
                p.add_(update, alpha=-lr)
        return loss


def muon_sgd(params: Iterable[Any], lr: float = 0.24, momentum: float = 0.6, nesterov: bool = True,
             ns_steps: int = 5, renormalize: bool = True, sgd_lr: float = 1.5, sgd_momentum: float = 0.85,
             weight_decay: float = 0.0, bias_lr_scale: float = 64.0,
             bias_weight_decay_scale: float | None = None) -> MuonSGD:
    """Muon on conv filters (4-D parameters), Nesterov SGD on the rest.

    Filters: ``lr``, ``momentum``. Matrices (the linear head): ``sgd_lr``, ``sgd_momentum``,
    ``weight_decay``. Vectors (biases, BatchNorm shifts): ``bias_lr_scale`` times ``sgd_lr``, with
    ``weight_decay`` times ``bias_weight_decay_scale`` (default ``1 / bias_lr_scale``).
    """
    tensors = []
    for item in params:
        tensors.extend(item["params"] if isinstance(item, dict) else [item])
    tensors = [p for p in tensors if p.requires_grad]
    filters = [p for p in tensors if p.ndim >= 3]
    others = [p for p in tensors if p.ndim < 3]
    scale = 1.0 / bias_lr_scale if bias_weight_decay_scale is None else bias_weight_decay_scale
    groups: list[dict[str, Any]] = []
    if filters:
        groups.append({"params": filters, "muon": True, "lr": lr, "momentum": momentum, "weight_decay": 0.0})
    for group in split_bias_groups(others, sgd_lr, weight_decay, bias_lr_scale, scale):
        groups.append({**group, "muon": False, "momentum": sgd_momentum})
    return MuonSGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, renormalize=renormalize)
