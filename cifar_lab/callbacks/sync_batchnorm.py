"""Synchronised BatchNorm for DDP on CPUs (gloo): the batch statistics of all processes, as on one process.

torch's ``nn.SyncBatchNorm`` runs on GPUs only (DDP refuses it on the CPU), so ``trainer=ddp_cpu`` with
``sync_batchnorm: true`` could not train a network with BatchNorm. :class:`DistributedBatchNorm` computes a
training batch's mean and variance over every process's part of the batch with two differentiable
all-reduces (the sums, then the squared deviations from the global mean), so 2 processes with batch B/2
each normalise exactly like 1 process with batch B, up to floating-point rounding; the gradient flows through
the all-reduces as through torch's SyncBatchNorm. Evaluation and single-process training use the running
statistics and torch's own kernel. :class:`CPUSyncBatchNorm` is the Lightning plugin that swaps the layers in
(``builders.build_trainer`` adds it when the accelerator is the CPU); the state dict keys are BatchNorm's, so
checkpoints are interchangeable with single-process runs.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import Tensor, nn
from torch.distributed.nn.functional import all_reduce
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["DistributedBatchNorm", "CPUSyncBatchNorm"]

# torch 2.x marks the differentiable collectives deprecated in favour of functional ones without autograd
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
                        category=FutureWarning)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class DistributedBatchNorm(_BatchNorm):
    """BatchNorm over the whole distributed batch (any input rank >= 2, channels in dim 1)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of 2 or more dimensions (got {input.dim()}D)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and _distributed()):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()
        count = torch.tensor([x.numel() / x.size(1)], dtype=x.dtype, device=x.device)
        sums = all_reduce(torch.cat([x.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centered = x - mean.view(shape)
        var = all_reduce(centered.pow(2).sum(dims)) / n
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), n.detach())
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * n / (n - 1).clamp(min=1)
        self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)


def _swap(module: nn.Module, to: type[_BatchNorm], source: tuple[type, ...]) -> nn.Module:
    """``module`` with every ``source`` BatchNorm replaced by ``to`` holding the same parameters and buffers."""
    converted = module
    if isinstance(module, source) and type(module) is not to:
        converted = to(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, _swap(child, to, source))
    return converted


class _PlainBatchNorm(_BatchNorm):
    def _check_input_dim(self, input: Tensor) -> None:
        return


class CPUSyncBatchNorm(TorchSyncBatchNorm):
    """Lightning's ``sync_batchnorm`` for processes on CPUs: BatchNorm layers become :class:`DistributedBatchNorm`."""

    def apply(self, model: nn.Module) -> nn.Module:
        return _swap(model, DistributedBatchNorm, (_BatchNorm,))

    def revert(self, model: nn.Module) -> nn.Module:
        return _swap(model, _PlainBatchNorm, (DistributedBatchNorm,))
